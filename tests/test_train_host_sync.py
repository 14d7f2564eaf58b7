"""The training loop reads numbers to the host only at log, checkpoint and end steps.

Every call that copies a tensor's value to the host (``item``, ``tolist``, ``cpu``, ``numpy``,
``bool()``, ``float()``, ``int()``, ``index``, ``np.asarray``) is a device synchronisation on a
GPU: the host waits for every queued kernel. These tests count such calls, made from Python in
our code or in torch's Python code, per phase of :class:`fastebm.train.trainer.Trainer` on a CPU
run; calls made inside C++ kernels are not seen (on CUDA, ``torch.cuda.set_sync_debug_mode``
would see those).
"""
import os
import socket
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

from test_train_helpers import fast_args, make_image_folder, read_summary
from fastebm import distributed as fdist
from fastebm.cli.train import main
from fastebm.train import trainer as trainer_mod
from fastebm.train.faults import INJECT_ENV
from fastebm.runlog import read_metrics

# Reads of host tensors that are no device sync on any device: the corruption's check of the sample
# ids, which the loop passes as the loader's CPU tensor (fastebm/corrupt/api.py, _sample_ids).
HOST_SIDE = {("api.py", "_sample_ids")}
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__")
PHASES = ("micro_step", "optimizer_step", "after_step")


class SyncCounter:
    """Counts host reads per (phase, optimiser step) while a Trainer phase runs."""

    def __init__(self, monkeypatch):
        self.calls = defaultdict(list)  # (phase, step) -> names of the reads
        self.collectives = defaultdict(int)  # (phase, step) -> all_reduce calls
        self.phase = None
        self.reading = False
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))
        all_reduce = torch.distributed.all_reduce

        def counted_all_reduce(*args, **kw):
            if self.phase is not None:
                self.collectives[self.phase] += 1
            return all_reduce(*args, **kw)

        monkeypatch.setattr(torch.distributed, "all_reduce", counted_all_reduce)
        for phase in PHASES:
            monkeypatch.setattr(trainer_mod.Trainer, phase, self._in_phase(phase, getattr(trainer_mod.Trainer, phase)))

    def _counting(self, name, original):
        counter = self

        def read(self, *args, **kw):
            if counter.phase is None or counter.reading:  # a read inside a read (__array__ -> numpy) is one
                return original(self, *args, **kw)
            caller = sys._getframe(1).f_code
            if (os.path.basename(caller.co_filename), caller.co_name) in HOST_SIDE:
                return original(self, *args, **kw)
            counter.calls[counter.phase].append(name)
            counter.reading = True
            try:
                return original(self, *args, **kw)
            finally:
                counter.reading = False

        return read

    def _in_phase(self, phase, method):
        counter = self

        def run(trainer, *args, **kw):
            step = trainer.state.step
            counter.phase, outer = (phase, step), counter.phase
            try:
                return method(trainer, *args, **kw)
            finally:
                counter.phase = outer

        return run

    def reads(self, phase):
        """{optimiser step: [reads]} of one phase (steps without reads left out)."""
        return {step: names for (p, step), names in self.calls.items() if p == phase and names}

    def collective_counts(self, phase):
        return {step: n for (p, step), n in self.collectives.items() if p == phase}


def test_counter_sees_reads_inside_a_phase(monkeypatch):
    """The instrument itself: a read inside a phase is counted, one outside is not."""
    counter = SyncCounter(monkeypatch)
    t = torch.rand(3) + 0.5
    t.sum().item()
    counter.phase = ("micro_step", 0)
    t.sum().item(), t.tolist(), bool(t[0] > 0), float(t[1]), np.asarray(t)
    counter.phase = None
    assert counter.reads("micro_step") == {0: ["item", "tolist", "__bool__", "__float__", "__array__"]}


def test_no_host_reads_between_log_steps(tmp_path, monkeypatch):
    """Micro-steps and optimiser steps never read; after_step reads only on log steps and the last one.

    A NaN loss at step 1 is skipped exactly as before: found at the next log step, listed in
    summary.json, the weights left finite.
    """
    data = str(tmp_path / "data")
    make_image_folder(data, n=16, seed=int(torch.randint(0, 1000, (1,))))
    monkeypatch.setenv(INJECT_ENV, "1")
    counter = SyncCounter(monkeypatch)
    out = str(tmp_path / "out")
    assert main(fast_args(out, data, max_steps=7, accum_iter=2, batch_size=2, log_every=3)) == 0
    assert counter.reads("micro_step") == {}
    assert counter.reads("optimizer_step") == {}
    # after_step runs with state.step already advanced: the log steps are 3, 6 and the last, 7
    assert set(counter.reads("after_step")) <= {3, 6, 7} and counter.reads("after_step")
    summary = read_summary(out)
    assert summary["skipped_steps"] == [1] and summary["step"] == 7
    logged = read_metrics(out)
    assert [r["step"] for r in logged] == [3, 6, 7]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in logged)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process_group(monkeypatch):
    """The environment torchrun gives a one-process job: the run builds a (gloo) process group."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)


def test_one_collective_per_optimizer_step_with_a_process_group(tmp_path, monkeypatch):
    """With a (one-process gloo) process group: one all-reduce per optimiser step, none per micro-step.

    The stop vote rides in that all-reduce: no collective of its own at the step boundary, and one
    flag read per boundary (the previous step's vote), the only read between log steps.
    """
    data = str(tmp_path / "data")
    make_image_folder(data, n=12)
    _one_process_group(monkeypatch)
    counter = SyncCounter(monkeypatch)
    out = str(tmp_path / "out")
    try:
        assert main(fast_args(out, data, max_steps=4, accum_iter=2, batch_size=2, log_every=4, device="cpu")) == 0
    finally:
        fdist.destroy_distributed()
    assert counter.reads("micro_step") == {} and counter.reads("optimizer_step") == {}
    assert counter.collective_counts("micro_step") == {}
    assert counter.collective_counts("optimizer_step") == {0: 1, 1: 1, 2: 1, 3: 1}
    assert counter.collective_counts("after_step") == {}
    # after_step runs with state.step advanced (1..4; 4 is the log step): step 1 has no earlier vote to read
    assert {s: n for s, n in counter.reads("after_step").items() if s != 4} == {2: ["__bool__"], 3: ["__bool__"]}
    assert read_summary(out)["step"] == 4


@pytest.mark.parametrize("group,stop_step", [(False, 3), (True, 4)])
def test_stop_request_lands_at_the_agreed_boundary(tmp_path, monkeypatch, group, stop_step):
    """SIGTERM during step 2's micro-batches: one process stops at the next boundary (step 3); with a
    process group the vote is read a step later (step 4). Either way one checkpoint at that step,
    status interrupted_sigterm, exit code 0."""
    import signal

    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_image_folder(data, n=12)
    if group:
        _one_process_group(monkeypatch)
    real = trainer_mod.micro_batch_stream

    class SignalledStream:
        def __init__(self, *args):
            self.inner = real(*args)

        def iterate(self, start, end):
            for batch in self.inner.iterate(start, end):
                if batch["step"] == 2 and batch["micro"] == 0:
                    os.kill(os.getpid(), signal.SIGTERM)  # fastebm's handler sets the stop flag
                yield batch

    monkeypatch.setattr(trainer_mod, "micro_batch_stream", SignalledStream)
    try:
        assert main(fast_args(out, data, max_steps=8, accum_iter=2, batch_size=2, log_every=3, device="cpu")) == 0
    finally:
        fdist.destroy_distributed()
    summary = read_summary(out)
    assert summary["status"] == "interrupted_sigterm" and summary["step"] == stop_step
    from fastebm.checkpoint import load_checkpoint

    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == stop_step


def test_fp16_reads_one_flag_per_optimizer_step(tmp_path, monkeypatch):
    """fp16 (GradScaler): exactly one read per optimiser step (the loss verdict), none per micro-step."""
    data = str(tmp_path / "data")
    make_image_folder(data, n=12)
    monkeypatch.setenv(INJECT_ENV, "2")
    counter = SyncCounter(monkeypatch)
    out = str(tmp_path / "out")
    assert main(fast_args(out, data, max_steps=4, accum_iter=2, batch_size=2, log_every=4, precision="fp16")) == 0
    assert counter.reads("micro_step") == {}
    assert counter.reads("optimizer_step") == {s: ["__bool__"] for s in range(4)}
    assert read_summary(out)["skipped_steps"] == [2]


def _adamw_reference(p, g, m, v, t, lr, wd, betas=(0.9, 0.95), eps=1e-8):
    """One decoupled-weight-decay Adam step in float64 (Loshchilov & Hutter 2019, Algorithm 2)."""
    p = p * (1 - lr * wd)
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


def test_step_unless_skips_exactly_and_steps_like_adamw():
    """A vetoed step leaves parameters and moments bitwise unchanged (even with NaN gradients); the
    others match a float64 AdamW written from the paper."""
    from fastebm.train.optim import build_optimizer, step_unless

    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.05, device=torch.device("cpu"))
    params = [p for p in model.parameters()]
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    ref = {id(p): (p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64),
                   torch.zeros_like(p, dtype=torch.float64)) for p in params}
    t = 0
    for skip in [False, True, False, False, True, True, False]:
        before = [p.detach().clone() for p in params]
        moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
        for p in params:
            p.grad = torch.randn_like(p)
            if skip:
                p.grad.view(-1)[0] = float("nan")
        step_unless(opt, torch.tensor(skip))
        if skip:
            assert all(torch.equal(a, p) for a, p in zip(before, params))
            for saved, p in zip(moments, params):
                assert all(torch.equal(v, opt.state[p][k]) for k, v in saved.items())
            continue
        t += 1
        for p in params:
            rp, rm, rv = ref[id(p)]
            ref[id(p)] = _adamw_reference(rp, p.grad.double(), rm, rv, t, 3e-3, decay[id(p)])
            torch.testing.assert_close(p.detach().double(), ref[id(p)][0], rtol=1e-5, atol=1e-6)
            assert float(opt.state[p]["step"]) == t
    with pytest.raises(TypeError, match="fused"):
        step_unless(torch.optim.AdamW(model.parameters()), torch.tensor(False))


def test_stat_vector_names_and_values_match_flatten_stats():
    from fastebm.runlog import flatten_stats
    from fastebm.train.window import stat_vector

    n = int(torch.randint(2, 6, (1,)))
    stats = {"loss_t": torch.rand(n), "energy": torch.randn(()), "alphas": torch.rand(1) + 0.5, "lr": 0.25,
             "note": "text"}
    names, values = stat_vector(stats, torch.device("cpu"))
    assert values.dtype == torch.float64
    assert dict(zip(names, values.tolist())) == flatten_stats(stats)


def test_window_means_are_over_good_steps_only():
    """Loss/statistics per step are micro-batch means; a skipped step's (NaN) numbers never reach the means."""
    from fastebm.train.window import MetricsWindow

    accum, window = 3, MetricsWindow(torch.device("cpu"), 3)
    kept = {"loss": [], "e": [], "grad_norm": []}
    for step, skip in enumerate([False, True, False, False]):
        window.start_step()
        losses = torch.rand(accum) + 0.1
        energies = torch.randn(accum)
        if skip:
            losses[1] = float("nan")
        for i in range(accum):
            window.add_micro_step(losses[i], {"e": energies[i]})
        assert bool(window.step_bad) == skip
        norm = torch.rand(()) * 3
        window.end_step(step, window.step_bad, norm, images=8)
        if not skip:
            kept["loss"].append(losses.double().mean().item())
            kept["e"].append(energies.double().mean().item())
            kept["grad_norm"].append(norm.double().item())
    assert window.take_verdicts() == [(0, False), (1, True), (2, False), (3, False)]
    assert window.take_verdicts() == []
    assert window.images == 32
    means = window.take_means()
    assert list(means) == ["e", "loss", "grad_norm"]
    for k, vals in kept.items():
        assert means[k] == pytest.approx(float(np.mean(vals)), rel=1e-12)
    assert window.take_means() == {} and window.images == 0

"""Stop signals however they arrive: to the whole process group (loader workers included), as
SIGINT, during start-up, and a loader worker that died of the signal before it could ignore it."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train_helpers import fast_args, make_image_folder, read_summary
from fastebm.checkpoint import load_checkpoint
from fastebm.cli.train import main


def _start(argv):
    """fastebm-train in its own session: its pid is the process-group id (like `setsid fastebm-train`)."""
    cmd = [sys.executable, "-m", "fastebm", "train"] + argv
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _wait_for_steps(proc, n, timeout=300):
    deadline, seen = time.time() + timeout, 0
    for line in proc.stdout:
        seen += line.startswith("step ")
        if seen == n:
            return
        assert time.time() < deadline, "no progress"
    raise AssertionError(f"the run ended before {n} logged steps: {proc.stderr.read()[-2000:]}")


def _loader_workers(pid):
    """pids of the children of ``pid`` (the DataLoader workers) from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


@pytest.mark.parametrize("sig, code, status", [(signal.SIGTERM, 0, "interrupted_sigterm"),
                                               (signal.SIGINT, 130, "interrupted_sigint")])
def test_signal_to_the_process_group_with_loader_workers_saves(tmp_path, sig, code, status):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_image_folder(data, n=12)
    proc = _start(fast_args(out, data, epochs=500, num_workers=2))
    try:
        _wait_for_steps(proc, 2)
        assert len(_loader_workers(proc.pid)) >= 2  # the signal really reaches loader workers
        os.killpg(proc.pid, sig)  # what schedulers, container runtimes and torchrun do
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert "killed by signal" not in err  # the workers ignored the signal (the main process stopped them)
    assert f"received {signal.Signals(sig).name}: checkpoint saved" in rest
    state = load_checkpoint(os.path.join(out, "last.pt"))
    summary = read_summary(out)
    assert summary["status"] == status and summary["step"] == state["step"] >= 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_sigterm_during_start_up_ends_cleanly(tmp_path):
    # The data folder's only "image" is a FIFO: the start-up check blocks reading it, deterministically,
    # until the signal arrives (the test keeps the writing end open, so the read never ends by itself).
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()  # an output folder that exists gets summary.json
    fifo = str(data / "slow.png")
    os.mkfifo(fifo)
    proc = _start(fast_args(str(out), str(data)))
    writer = None
    try:
        deadline = time.time() + 300
        while writer is None:
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds once the run opened it to read
            except OSError as exc:
                assert exc.errno == errno.ENXIO and proc.poll() is None and time.time() < deadline, proc.stderr.read()
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=120)
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "SIGTERM" in line]
    assert lines == ["fastebm-train: warning: received SIGTERM during start-up: nothing was trained yet "
                     "(no checkpoint written)"]
    summary = read_summary(str(out))
    assert summary["status"] == "interrupted_sigterm" and summary["step"] == 0 and summary["trained_steps"] == 0
    assert not os.path.exists(out / "last.pt")


def test_loader_worker_killed_by_the_stop_signal_is_a_stop_not_a_crash(tmp_path, monkeypatch, capsys):
    """The signal reached a worker before its worker_init_fn ignored it: the DataLoader's error is the stop."""
    import fastebm.train.trainer as trainer_mod

    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_image_folder(data, n=12)
    real = trainer_mod.micro_batch_stream

    class DyingStream:
        def __init__(self, *args):
            self.inner = real(*args)

        def iterate(self, start, end):
            for batch in self.inner.iterate(start, end):
                if batch["step"] == 2:
                    os.kill(os.getpid(), signal.SIGTERM)  # handled by fastebm's handler: sets the stop flag
                    time.sleep(0.1)
                    raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")
                yield batch

    monkeypatch.setattr(trainer_mod, "micro_batch_stream", DyingStream)
    assert main(fast_args(out, data, epochs=50)) == 0
    captured = capsys.readouterr()
    assert "received SIGTERM: checkpoint saved at step 2" in captured.out
    assert "a data-loader worker died of the SIGTERM meant for this run" in captured.err
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == 2
    assert read_summary(out)["status"] == "interrupted_sigterm"
    # without a stop request the same error is a crash
    monkeypatch.setattr(trainer_mod, "micro_batch_stream", lambda *a: _Raising())
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        main(fast_args(str(tmp_path / "out2"), data, epochs=50))


class _Raising:
    def iterate(self, start, end):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")
        yield  # noqa: unreachable (a generator)

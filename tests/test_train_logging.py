"""Console output (tqdm on a terminal, plain lines otherwise) and metrics.jsonl on resume."""
import io
import json
import os
import random

import numpy as np
import torch

from fastebm.runlog import Console, MetricsLogger, flatten_stats, read_metrics


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    console = Console(total_steps=40, start_step=0, stream=stream)
    assert console.bar is None
    loss, rate = random.uniform(0.1, 2), random.uniform(5, 500)
    console.report(10, 0, loss, rate, 1e-3)
    line = stream.getvalue().strip()
    assert line.startswith("step 10/40") and f"loss {loss:.4f}" in line and f"{rate:.1f} img/s" in line and "eta" in line


def test_progress_bar_on_a_terminal():
    stream = _Tty()
    console = Console(total_steps=12, start_step=2, stream=stream)
    assert console.bar is not None
    console.step()
    console.report(3, 0, 0.5, 42.0, 1e-3)
    console.close()
    text = stream.getvalue()
    assert "3/12" in text and "img_s" in text


def test_metrics_resume_drops_steps_after_the_checkpoint(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    for step in range(1, 9):
        log.log({"step": step, "loss": random.random()})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 9, "loss": 0.')  # a line cut by a crash
    resumed = MetricsLogger(str(tmp_path), resume_step=5, tensorboard=False)
    resumed.log({"step": 6, "loss": 1.0})
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]


def test_flatten_stats():
    t = torch.rand(3)
    flat = flatten_stats({"loss_t": t, "lr": 0.5, "energy": torch.tensor(2.0)})
    assert flat["loss_t/1"] == t[0].item() and flat["loss_t/3"] == t[2].item()
    assert flat["lr"] == 0.5 and flat["energy"] == 2.0
    json.dumps(flat)


def _tb_scalars(folder):
    """{events file name: [(step, value) of tag loss]} of every TensorBoard file in ``folder``/tb."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for name in sorted(os.listdir(folder / "tb")):
        acc = EventAccumulator(str(folder / "tb" / name))
        acc.Reload()
        out[name] = [(e.step, e.value) for e in acc.Scalars("loss")] if "loss" in acc.Tags()["scalars"] else []
    return out


def test_a_new_run_replaces_the_earlier_tensorboard_events_and_a_resume_keeps_them(tmp_path):
    """A repeated fastebm-eval command starts a new log in its own folder: the earlier run's TensorBoard events
    go with its metrics.jsonl, so the two runs are not drawn as one curve; a resume keeps them, and files
    that are not event files stay."""
    first = [random.random() for _ in range(4)]
    second = [random.random() + 2 for _ in range(3)]
    for values in (first, second):
        log = MetricsLogger(str(tmp_path))
        for step, v in enumerate(values, 1):
            log.log({"step": step, "loss": v})
        log.close()
    curves = list(_tb_scalars(tmp_path).values())
    assert len(curves) == 1 and [s for s, _ in curves[0]] == [1, 2, 3]
    assert np.allclose([v for _, v in curves[0]], second)
    (tmp_path / "tb" / "notes.txt").write_text("mine")
    resumed = MetricsLogger(str(tmp_path), resume_step=2)
    resumed.log({"step": 3, "loss": 7.5})
    resumed.close()
    names = os.listdir(tmp_path / "tb")
    assert sum(n.startswith("events.out.tfevents.") for n in names) == 2 and "notes.txt" in names
    MetricsLogger(str(tmp_path)).close()
    names = os.listdir(tmp_path / "tb")
    assert sum(n.startswith("events.out.tfevents.") for n in names) == 1 and "notes.txt" in names


def test_a_new_run_deletes_no_events_outside_its_folder(tmp_path, caplog):
    """A ``tb`` that links to a folder other runs share keeps their event files (with a warning), and a
    folder named like an event file inside the run's own ``tb`` is left alone, not an error."""
    shared = tmp_path / "shared"
    shared.mkdir()
    other = shared / f"events.out.tfevents.{random.randrange(10**9)}.otherhost"
    other.write_bytes(os.urandom(64))
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(shared, run / "tb")
    with caplog.at_level("WARNING", logger="fastebm.runlog"):
        MetricsLogger(str(run)).close()
    assert other.exists() and "is a link" in caplog.text
    own = tmp_path / "own"
    (own / "tb" / "events.out.tfevents.dir").mkdir(parents=True)
    MetricsLogger(str(own)).close()
    assert (own / "tb" / "events.out.tfevents.dir").is_dir()

"""Faults during training: injected NaN losses, and SIGTERM -> checkpoint -> resume."""
import os
import signal
import subprocess
import sys
import time

import torch

from test_train_helpers import fast_args, make_image_folder, read_summary
from fastebm.cli.train import main
from fastebm.checkpoint import load_checkpoint
from fastebm.train.faults import INJECT_ENV


def test_single_nan_step_is_skipped(tmp_path, monkeypatch, capsys):
    data = str(tmp_path / "data")
    make_image_folder(data, n=12)
    monkeypatch.setenv(INJECT_ENV, "2")
    out = str(tmp_path / "out")
    assert main(fast_args(out, data, max_steps=4)) == 0
    assert "non-finite loss" in capsys.readouterr().err
    summary = read_summary(out)
    assert summary["skipped_steps"] == [2] and summary["step"] == 4
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_streak_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    data = str(tmp_path / "data")
    make_image_folder(data, n=12)
    monkeypatch.setenv(INJECT_ENV, "3-50")
    out = str(tmp_path / "out")
    code = main(fast_args(out, data, max_steps=20, epochs=10, save_every=2, max_bad_steps=3))
    assert code == 3
    err = capsys.readouterr().err
    assert "3 non-finite losses in a row" in err and "last good checkpoint" in err and "Traceback" not in err
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert state["step"] == 2
    assert read_summary(out)["status"] == "diverged"
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_sigterm_saves_and_resume_continues(tmp_path):
    data = str(tmp_path / "data")
    make_image_folder(data, n=12)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "fastebm", "train"] + fast_args(out, data, epochs=500)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 300
        for line in proc.stdout:
            if line.startswith("step "):
                break
            assert time.time() < deadline, "no progress line"
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM" in rest and "Traceback" not in err
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    k = state["step"]
    assert k >= 1 and read_summary(out)["status"] == "interrupted_sigterm"
    assert main(fast_args(out, data, epochs=500, resume="auto", max_steps=k + 2)) == 0
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == k + 2

"""Faults during training: injected NaN losses, and SIGTERM -> checkpoint -> resume."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train_helpers import fast_args, make_image_folder, read_summary
from fastebm.cli.train import main
from fastebm.checkpoint import load_checkpoint
from fastebm.train.faults import INJECT_ENV, RestorationWatch


def test_single_nan_step_is_skipped(tmp_path, monkeypatch, capsys):
    data = str(tmp_path / "data")
    make_image_folder(data, n=12)
    monkeypatch.setenv(INJECT_ENV, "2")
    out = str(tmp_path / "out")
    assert main(fast_args(out, data, max_steps=4)) == 0
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "worse than the corrupted input" not in err
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
    assert all(flag in err for flag in ("--blr", "--alpha_init", "--clip_grad"))  # what can cause it
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


def test_far_off_restoration_warns_once_naming_alpha_init(tmp_path, capsys):
    """Step sizes far too large (--alpha_init 100): finite losses hundreds of times the input's, no NaN."""
    data = str(tmp_path / "data")
    make_image_folder(data, n=12)
    out = str(tmp_path / "out")
    assert main(fast_args(out, data, max_steps=4, alpha_init=100, warmup_epochs=0)) == 0
    err = capsys.readouterr().err
    assert err.count("worse than the corrupted input") == 1  # once, although every window qualifies
    assert "--alpha_init" in err and "--blr" in err


def test_restoration_watch_threshold_warmup_and_key_names():
    corrupted = float(torch.empty(1).uniform_(0.05, 2.0))
    watch = RestorationWatch(warmup_steps=2, factor=10.0)
    bad = {"loss_t/1": corrupted * 50, "loss_t/2": corrupted * 11, "loss_corrupted": corrupted}
    assert watch.check(2, bad) is None  # a window inside the warm-up (steps 1-2)
    assert watch.check(4, dict(bad, **{"loss_t/2": corrupted * 9.9})) is None  # below 10x (loss_t/1 is not the last)
    assert watch.check(6, bad) == pytest.approx(11.0)
    assert watch.check(8, bad) is None  # warned once
    single = RestorationWatch(warmup_steps=0)  # T = 1: the metrics key is plain loss_t
    assert single.check(2, {"loss_t": corrupted * 30, "loss_corrupted": corrupted}) == pytest.approx(30.0)

"""Acceptance: the README's run command (the built-in demo) learns to restore.

One end-to-end run of `fastebm-train` with no arguments except the output folder. Marked slow
(it trains for real, a few minutes on 2 CPU cores) but CI runs it. How long it takes is a benchmark
(the demo's summary.json records `wall_time_s`; docs/training.md), never an assertion here: a wall
time fails on a loaded machine whatever the code does.
"""
import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_demo_learns_to_restore(tmp_path):
    out = tmp_path / "demo"
    exe = os.path.join(os.path.dirname(sys.executable), "fastebm-train")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "fastebm", "train"]
    proc = subprocess.run(cmd + ["--output_dir", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    print(f"demo wall time {summary['wall_time_s']:.0f} s; psnr_gain_db {summary['psnr_gain_db']}; linprobe_acc {summary['linprobe_acc']}")
    # the model learned to restore held-out images
    assert summary["psnr_gain_db"]["pretrained"] > summary["psnr_gain_db"]["init"]
    assert summary["status"] == "completed" and summary["step"] == summary["total_steps"]
    # the probe is reported (whatever it shows), both numbers are accuracies
    for key in ("init", "pretrained"):
        assert 0.0 <= summary["linprobe_acc"][key] <= 1.0
    assert "psnr_gain_db" in proc.stdout and "linprobe_acc" in proc.stdout
    # outputs a user looks at
    for name in ("restoration_grid.png", "loss_curve.png", "metrics.jsonl", "config.yaml", "last.pt", "backbone.pth"):
        assert (out / name).stat().st_size > 0, name
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == summary["step"]

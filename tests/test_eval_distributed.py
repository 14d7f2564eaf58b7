"""fastebm-eval under torchrun (CPU, gloo, 2 processes): sharded features and validation are exact."""
import json
import os
import subprocess
import sys

from fastebm import distributed as fdist
from fastebm.cli.eval import main
from test_eval_support import image_folder, trained_checkpoint


def _torchrun(*args, timeout=240):
    env = dict(os.environ)
    for k in fdist.TORCHRUN_VARS + ("LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           "-m", "fastebm.cli.eval", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_knn_two_processes_equals_one(tmp_path):
    # 7 + 5 + 4 training and 3 x 3 validation images: odd counts, so shards are unequal
    root = image_folder(tmp_path / "data", size=16, per_class=(7, 5, 4))
    common = ["knn", "--ckpt", trained_checkpoint(), "--data", root, "--k", "4", "--crop_pct", "1",
              "--num_workers", "0", "--batch_size", "3"]
    assert main(common + ["--output_dir", str(tmp_path / "one")]) == 0
    _torchrun(*common, "--output_dir", str(tmp_path / "two"))
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert [r["top1"] for r in one["sweep"]] == [r["top1"] for r in two["sweep"]]


def test_finetune_two_processes(tmp_path):
    root = image_folder(tmp_path / "data", size=16, per_class=(6, 5, 5))
    _torchrun("finetune", "--ckpt", trained_checkpoint(), "--data", root, "--batch_size", "4", "--epochs", "2",
              "--warmup_epochs", "1", "--num_workers", "0", "--output_dir", str(tmp_path / "ft"))
    s = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["status"] == "completed"
    # 16 images, global batch 2 x 4 = 8: two optimiser steps per epoch
    assert s["updates"] == 4 and [r["epoch"] for r in s["history"]] == [1, 2]
    # every one of the 9 validation images counted once: accuracies are multiples of 1/9
    for r in s["history"]:
        assert abs(r["val_top1"] * 9 - round(r["val_top1"] * 9)) < 1e-9
    assert (tmp_path / "ft" / "checkpoint.pt").exists()

"""fastebm-train --loader dali end to end (CPU operators; needs NVIDIA DALI, which CI installs)."""
import os

import torch

from test_train_helpers import fast_args, make_image_folder, read_summary
from fastebm.checkpoint import load_checkpoint
from fastebm.cli.train import main


def test_loader_dali_trains_and_reports_a_corrupt_file_like_the_torch_loader(tmp_path, capsys):
    data = tmp_path / "data"
    make_image_folder(str(data), n=11, seed=int(torch.randint(0, 1000, (1,))))
    broken = data / "b" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))  # a JPEG header, then garbage
    summaries = {}
    for loader in ("torch", "dali"):
        out = str(tmp_path / loader)
        # epochs=2 with 12 files and batch 4: every file, the broken one included, is drawn
        assert main(fast_args(out, str(data), epochs=2, loader=loader, device="cpu", num_workers=2)) == 0
        summaries[loader] = read_summary(out)
        assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == 6
    captured = capsys.readouterr()
    assert "--loader dali: 12 files: 11 read by DALI directly, 1 unreadable, skipped" in captured.out
    torch_run, dali_run = summaries["torch"], summaries["dali"]
    assert (torch_run["loader"], dali_run["loader"]) == ("torch", "dali")
    assert dali_run["skipped_files"] == torch_run["skipped_files"]
    assert dali_run["skipped_files"]["count"] == 1 and dali_run["skipped_files"]["files"][0].startswith(str(broken))
    assert dali_run["status"] == "completed" and dali_run["step"] == torch_run["step"] == 6

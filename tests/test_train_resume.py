"""Resuming is exact: N steps + resume to 2N == 2N steps straight (CPU, same seed)."""
import os

import pytest
import torch

from test_train_helpers import fast_args, make_image_folder, read_summary
import fastebm
from fastebm.cli.train import main
from fastebm.runlog import read_metrics
from fastebm.checkpoint import load_checkpoint


def _params(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)


def test_resume_matches_straight_run(tmp_path, capsys):
    data = str(tmp_path / "data")
    make_image_folder(data, n=20, seed=int(torch.randint(0, 1000, (1,))))
    seed = str(int(torch.randint(0, 1 << 30, (1,))))
    # 20 images, batch 3 x accum 2 -> 3 steps/epoch; 3 epochs; stop at 7; the split at 4 is mid-epoch.
    common = dict(batch_size=3, accum_iter=2, epochs=3, seed=seed, noise_sigma=0.01, save_every=2, steps=2)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert main(fast_args(straight, data, max_steps=7, **common)) == 0
    assert main(fast_args(split, data, max_steps=4, **common)) == 0
    assert load_checkpoint(os.path.join(split, "last.pt"))["step"] == 4
    assert main(fast_args(split, data, max_steps=7, resume="auto", **common)) == 0
    assert "resumed from" in capsys.readouterr().out

    a, b = _params(straight), _params(split)
    assert a["step"] == b["step"] == 7
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # optimiser moments are identical too, so the runs would stay identical from here on
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # the training moved the weights (a run that does nothing would also "match")
    torch.manual_seed(int(seed))
    fresh = fastebm.RestorationObjective(fastebm.create_model("vit_demo", img_size=16), steps=2).state_dict()
    assert not torch.equal(fresh["model.blocks.0.attn.qkv.weight"], a["model"]["model.blocks.0.attn.qkv.weight"])
    # metrics of the resumed run continue the first part without duplicated steps
    steps = [r["step"] for r in read_metrics(split)]
    assert steps == sorted(set(steps)) and steps[-1] == 7
    assert read_summary(split)["step"] == 7


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, capsys):
    data = str(tmp_path / "data")
    make_image_folder(data, n=8)
    out = str(tmp_path / "out")
    assert main(fast_args(out, data, max_steps=1, resume="auto")) == 0
    assert "starting from scratch" in capsys.readouterr().out
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == 1


def test_truncated_checkpoint_explicit_and_auto(tmp_path, capsys):
    data = str(tmp_path / "data")
    make_image_folder(data, n=8)
    out = str(tmp_path / "out")
    assert main(fast_args(out, data, max_steps=2, save_every=1)) == 0  # last.pt = step 2, last.prev.pt = step 1
    last = os.path.join(out, "last.pt")
    with open(last, "rb") as fh:
        blob = fh.read()
    with open(last, "wb") as fh:
        fh.write(blob[: len(blob) // 2])
    capsys.readouterr()
    assert main(fast_args(out, data, max_steps=3, resume=last)) == 2
    err = capsys.readouterr().err
    assert last in err and "truncated or corrupt" in err and "Traceback" not in err
    with pytest.warns(UserWarning, match="last.prev.pt"):
        assert main(fast_args(out, data, max_steps=3, resume="auto")) == 0
    captured = capsys.readouterr()
    assert "resumed from" in captured.out and "last.prev.pt at step 1" in captured.out
    assert load_checkpoint(last)["step"] == 3


def test_save_ckpt_freq_keeps_epoch_checkpoints(tmp_path):
    """--save_ckpt_freq 2 (MAE's flag): checkpoint-2.pt and checkpoint-4.pt beside last.pt, nothing else."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_image_folder(data, n=8)  # batch 4: 2 steps per epoch
    assert main(fast_args(out, data, epochs=4, save_ckpt_freq=2)) == 0
    kept = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert kept == ["checkpoint-2.pt", "checkpoint-4.pt"]
    two, four = load_checkpoint(os.path.join(out, "checkpoint-2.pt")), load_checkpoint(os.path.join(out, "checkpoint-4.pt"))
    last = load_checkpoint(os.path.join(out, "last.pt"))
    assert (two["step"], two["epoch"], four["step"], last["step"]) == (4, 2, 8, 8)
    key = "model.blocks.0.attn.qkv.weight"
    assert torch.equal(four["model"][key], last["model"][key]) and not torch.equal(two["model"][key], last["model"][key])


def test_resuming_a_checkpoint_from_before_the_16px_default(tmp_path, capsys):
    """Checkpoints written before vit_demo pretrained at 16 px by default saved ``img_size: None`` for its 32 px.
    Resuming one under today's default fails with a hint that names the flag to give; given, it resumes
    without reporting a change of size."""
    from fastebm.checkpoint import atomic_torch_save

    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_image_folder(data, n=8)
    assert main(fast_args(out, data, img_size=32, max_steps=1)) == 0
    last = os.path.join(out, "last.pt")
    ckpt = load_checkpoint(last)
    ckpt["config"]["img_size"] = None  # as the earlier fastebm wrote it
    atomic_torch_save(ckpt, last)
    argv = fast_args(out, data, max_steps=2, resume="auto")
    i = argv.index("--img_size")
    default_size = argv[:i] + argv[i + 2:]  # no --img_size: today's 16 px
    capsys.readouterr()
    assert main(default_size) == 2
    err = capsys.readouterr().err
    assert "--img_size 32 (this run: 16)" in err and "Traceback" not in err
    assert "changed settings" not in err  # a checkpoint that does not fit is an error, not also a warning
    assert main(fast_args(out, data, img_size=32, max_steps=2, resume="auto")) == 0
    resumed = capsys.readouterr()
    assert "resumed from" in resumed.out and "img_size" not in resumed.out + resumed.err
    assert load_checkpoint(last)["step"] == 2
    # a resume that loads but changes a setting says so
    assert main(fast_args(out, data, img_size=32, epochs=3, max_steps=3, resume="auto")) == 0
    assert "changed settings (epochs: 2 -> 3)" in capsys.readouterr().err


def test_resumed_run_reports_the_whole_runs_wall_time(tmp_path, capsys):
    """summary.json's wall_time_s counts the earlier process up to its checkpoint; resuming a finished
    run does not replace it with the few seconds the resumed process took."""
    data = str(tmp_path / "data")
    make_image_folder(data, n=9, seed=int(torch.randint(0, 1000, (1,))))
    out = str(tmp_path / "out")
    assert main(fast_args(out, data, max_steps=2)) == 0
    first = read_summary(out)
    saved = load_checkpoint(os.path.join(out, "last.pt"))["wall_time_s"]
    assert 0 < saved <= first["wall_time_s"]
    assert first["wall_time_s"] == pytest.approx(first["process_wall_time_s"], abs=1e-9)  # one process: the same
    capsys.readouterr()
    assert main(fast_args(out, data, max_steps=3, resume="auto")) == 0
    second = read_summary(out)
    # the whole run = the earlier process up to its checkpoint + this process
    assert second["wall_time_s"] - second["process_wall_time_s"] == pytest.approx(saved, abs=1e-6)
    assert load_checkpoint(os.path.join(out, "last.pt"))["wall_time_s"] > saved
    assert "since the resume" in capsys.readouterr().out

"""fastebm-eval's command line: config file + overrides, recipes, and every bad input -> exit 2, one line.

A bad input must leave nothing behind: the output folder is not even created.
"""
import os

import pytest
import torch

from fastebm.cli.eval import main
from fastebm.eval.config import FinetuneConfig, make_config, parse_args
from fastebm.eval.recipes import RECIPES
from test_eval_support import image_folder, trained_checkpoint


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fastebm-eval: error:") and "Traceback" not in err[0]
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_yaml_config_overrides_and_recipe(tmp_path):
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text("epochs: 7\nblr: 0.002\nmixup: 0\nk_sweep_is_not_here: 1\n".replace("k_sweep_is_not_here: 1\n", ""))
    command, cfg = parse_args(["finetune", "--init", "random", "--config", str(cfg_file), "--blr", "0.005"])
    assert command == "finetune" and isinstance(cfg, FinetuneConfig)
    assert cfg.epochs == 7 and cfg.blr == 0.005 and cfg.mixup == 0.0
    # unset recipe fields come from the built-in recipe
    assert cfg.layer_decay == RECIPES["small"]["finetune"]["layer_decay"] and cfg.hflip == 0.0
    # folder data takes MAE's ImageNet recipe
    folder = image_folder(tmp_path / "data")
    cfg2 = make_config("finetune", init="random", data=folder)
    assert cfg2.layer_decay == 0.65 and cfg2.hflip == 0.5 and cfg2.epochs == 100


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["knn", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--ckpt", "--init", "--k", "--temperature", "--pool", "--layer", "--few_shot", "--output_dir"):
        assert flag in text


@pytest.mark.parametrize("argv, needle", [
    (["knn"], "--ckpt"),
    (["knn", "--init", "random", "--ckpt", "x.pt"], "exclude"),
    (["knn", "--init", "zeros"], "--init"),
    (["finetune", "--init", "random", "--batch_size", "0"], "--batch_size"),
    (["finetune", "--init", "random", "--blr", "-1"], "--blr"),
    (["finetune", "--init", "random", "--warmup_epochs", "9", "--epochs", "2"], "--warmup_epochs"),
    (["knn", "--init", "random", "--pool", "max"], "--pool"),
    (["knn", "--init", "random", "--no_such_flag", "1"], "no_such_flag"),
    (["linprobe", "--init", "random", "--train_dir", "a"], "--val_dir"),
    (["frobnicate"], "frobnicate"),
    (["knn", "--init", "random", "--dist_timeout", "-1"], "--dist_timeout"),
    (["knn", "--init", "random", "--device", "tpu"], "--device"),
    (["finetune", "--init", "random", "--seed", "-1"], "--seed"),
    (["knn", "--init", "random", "--seed", str(2 ** 32)], "--seed"),
    (["finetune", "--init", "random", "--aa", "foo"], "--aa"),
    (["finetune", "--init", "random", "--aa", "rand-m9-mstd0.5-inc1"], "-mmax9"),  # posterize to 0 bits: see below
    (["finetune", "--init", "random", "--opt", "foo"], "--opt"),
    (["knn", "--init", "random", "--interpolation", "foo"], "--interpolation"),
])
def test_bad_flags_exit_2(argv, needle, capsys, tmp_path):
    out = tmp_path / "out"
    assert main(argv + ["--output_dir", str(out)] if argv[0] != "frobnicate" else argv) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def _run_bad(capsys, tmp_path, argv, *needles):
    out = tmp_path / "never_written"
    assert main(argv + ["--output_dir", str(out)]) == 2
    line = _one_line_error(capsys, *needles)
    assert not out.exists(), "a bad input must not leave a half-made output folder"
    return line


@pytest.mark.parametrize("command", ["finetune", "linprobe", "knn"])
def test_missing_checkpoint(command, capsys, tmp_path):
    _run_bad(capsys, tmp_path, [command, "--ckpt", str(tmp_path / "nope.pt")], "nope.pt", "does not exist")


def test_truncated_checkpoint(capsys, tmp_path):
    good = open(trained_checkpoint(), "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: len(good) // 2])
    _run_bad(capsys, tmp_path, ["knn", "--ckpt", str(cut)], "cut.pt", "truncated")
    cut_st = tmp_path / "cut.safetensors"
    from safetensors.torch import save_file

    save_file({"pos_embed": torch.randn(1, 17, 8)}, str(tmp_path / "whole.safetensors"))
    data = (tmp_path / "whole.safetensors").read_bytes()
    cut_st.write_bytes(data[: len(data) - 7])
    _run_bad(capsys, tmp_path, ["knn", "--ckpt", str(cut_st)], "cut.safetensors", "truncated")


def test_other_tools_files(capsys, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint at all\n" * 20)
    _run_bad(capsys, tmp_path, ["knn", "--ckpt", str(text)], "notes.pt")
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.randn(8, 3, 7, 7), "fc.weight": torch.randn(10, 8)}, resnet)
    _run_bad(capsys, tmp_path, ["knn", "--ckpt", str(resnet)], "resnet.pth", "not a ViT backbone")
    optim_only = tmp_path / "optim.pth"
    torch.save({"step": 3, "lr": 0.1}, optim_only)
    _run_bad(capsys, tmp_path, ["knn", "--ckpt", str(optim_only)], "optim.pth", "another tool")


def test_checkpoint_of_another_architecture_than_the_flags(capsys, tmp_path):
    _run_bad(capsys, tmp_path, ["knn", "--ckpt", trained_checkpoint(), "--model", "vit_tiny_patch16"],
             "--model vit_tiny_patch16", "vit_demo")


def test_data_without_train_val(capsys, tmp_path):
    flat = tmp_path / "flat"
    (flat / "cats").mkdir(parents=True)
    _run_bad(capsys, tmp_path, ["knn", "--init", "random", "--data", str(flat)], "train/", "val/")
    _run_bad(capsys, tmp_path, ["knn", "--init", "random", "--data", str(tmp_path / "absent")], "does not exist")


def test_class_folders_differ(capsys, tmp_path):
    root = image_folder(tmp_path / "d", classes=("ant", "bee"), per_class=(2, 2), val_classes=("ant", "wasp"))
    _run_bad(capsys, tmp_path, ["knn", "--init", "random", "--data", root], "differ", "bee", "wasp")


def test_few_shot_larger_than_smallest_class(capsys, tmp_path):
    root = image_folder(tmp_path / "d", classes=("ant", "bee", "cat"), per_class=(6, 5, 4))
    _run_bad(capsys, tmp_path, ["finetune", "--init", "random", "--data", root, "--few_shot", "5"],
             "--few_shot 5", "'cat'", "4 images")


@pytest.mark.parametrize("layer", [0, 5, 99])
def test_layer_outside_model(layer, capsys, tmp_path):
    line = _run_bad(capsys, tmp_path, ["linprobe", "--ckpt", trained_checkpoint(), "--layer", str(layer)], "--layer")
    if layer:
        assert "1..4" in line


def test_img_size_not_divisible_by_patch(capsys, tmp_path):
    _run_bad(capsys, tmp_path, ["knn", "--ckpt", trained_checkpoint(), "--img_size", "18"], "18", "patch size 4")


def test_odd_batch_with_mixup(capsys, tmp_path):
    root = image_folder(tmp_path / "d")
    _run_bad(capsys, tmp_path, ["finetune", "--init", "random", "--data", root, "--batch_size", "3"], "even")


def test_resume_of_foreign_file(capsys, tmp_path):
    bogus = tmp_path / "bogus.pt"
    torch.save({"format": "something-else"}, bogus)
    _run_bad(capsys, tmp_path, ["finetune", "--init", "random", "--resume", str(bogus)], "not a fastebm-eval")


def test_make_config_rejects_unknown_settings():
    from fastebm.errors import UsageError

    with pytest.raises(UsageError, match="bogus"):
        make_config("knn", init="random", bogus=3)
    with pytest.raises(UsageError, match="--k"):
        make_config("knn", init="random", k=0)
    assert not os.path.exists("./fastebm_eval")


def _files(folder):
    return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder)) if (folder / p).is_file()}


def test_a_folder_holding_another_commands_results_is_refused(tmp_path, capsys):
    """knn, linprobe and finetune each refuse an --output_dir whose summary.json another command (or another
    program) wrote, and leave its files as they were; the same command replaces its own results."""
    import json

    root = image_folder(tmp_path / "data", size=16, per_class=(4, 3, 3), seed=int(torch.randint(0, 1000, ())))
    common = ["--ckpt", trained_checkpoint(), "--data", root, "--crop_pct", "1", "--num_workers", "0"]
    lp = tmp_path / "lp"
    assert main(["linprobe", *common, "--epochs", "2", "--warmup_epochs", "0", "--output_dir", str(lp)]) == 0
    before = _files(lp)
    capsys.readouterr()
    for argv in (["knn", *common, "--k", "3"], ["finetune", *common, "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4"]):
        assert main([*argv, "--output_dir", str(lp)]) == 2
        _one_line_error(capsys, f"--output_dir {lp} holds fastebm-eval linprobe's results (summary.json), which "
                                f"fastebm-eval {argv[0]} would overwrite: give another --output_dir")
        assert _files(lp) == before
    assert main(["linprobe", *common, "--epochs", "2", "--warmup_epochs", "0", "--seed", "5", "--output_dir", str(lp)]) == 0
    assert json.loads((lp / "summary.json").read_text())["seed"] == 5
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text('{"final_loss": 0.25}')
    capsys.readouterr()
    assert main(["knn", *common, "--k", "3", "--output_dir", str(other)]) == 2
    _one_line_error(capsys, "holds another program's results (summary.json)")
    assert os.listdir(other) == ["summary.json"]
    # an unfinished run has no summary yet: its checkpoint (a killed fine-tuning) or last.pt (fastebm-train) marks it;
    # a summary.json that cannot be read (a folder, absurd nesting) is refused before anything runs
    cases = {"ft_killed": ("checkpoint.pt", "a fastebm-eval finetune run (checkpoint.pt)"),
             "train": ("last.pt", "a fastebm-train run (last.pt)"),
             "nested": ("summary.json", "a summary.json fastebm-eval cannot read (RecursionError)"),
             "folder": ("summary.json", "a summary.json fastebm-eval cannot read (")}
    for name, (marker, said) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        if name == "folder":
            (folder / marker).mkdir()
        else:
            (folder / marker).write_bytes(b"[" * 100_000 if name == "nested" else os.urandom(64))
        before = _files(folder)
        capsys.readouterr()
        assert main(["knn", *common, "--k", "3", "--output_dir", str(folder)]) == 2, name
        _one_line_error(capsys, f"--output_dir {folder} holds {said}")
        assert _files(folder) == before and sorted(os.listdir(folder)) == [marker], name
    # a fastebm-train run killed before its first checkpoint holds its config.yaml and its log, which a new
    # run would replace: refused too; a fastebm-eval config the user keeps in its output folder is not one
    from fastebm.train.config import TrainConfig
    from fastebm.train.config.files import save_yaml

    early = tmp_path / "train_early"
    early.mkdir()
    save_yaml(TrainConfig(output_dir=str(early), epochs=int(torch.randint(1, 9, ()))), str(early / "config.yaml"))
    (early / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": float(torch.rand(()))}) + "\n")
    before = _files(early)
    capsys.readouterr()
    assert main(["knn", *common, "--k", "3", "--output_dir", str(early)]) == 2
    _one_line_error(capsys, f"--output_dir {early} holds a fastebm-train run (config.yaml)")
    assert _files(early) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("k: 3\nseed: %d\n" % int(torch.randint(0, 100, ())))
    assert main(["knn", *common, "--config", str(mine / "config.yaml"), "--output_dir", str(mine)]) == 0
    assert json.loads((mine / "summary.json").read_text())["command"] == "knn"


def _posterize_crashes(aa, draws, seed):
    """Run each posterize op of timm's policy ``aa`` ``draws`` times on a small image, as RandAugment would
    when it picks the op: True when the installed Pillow refuses one draw."""
    import random

    from PIL import Image
    from timm.data import create_transform

    from fastebm.eval.config import _posterize_ops

    image = Image.new("RGB", (5, 3), (200, 90, 17))
    ops = _posterize_ops(create_transform(input_size=8, is_training=True, auto_augment=aa))
    assert ops, aa
    state = random.getstate()
    random.seed(seed)
    try:
        for op in ops:
            op.prob = 1.0  # every call posterizes, at a freshly drawn magnitude
            for _ in range(draws):
                op(image)
    except ValueError:
        return True
    finally:
        random.setstate(state)
    return False


@pytest.mark.parametrize("aa, fix", [("rand-m9-mstd0.5-inc1", "cap the magnitude with -mmax9"),
                                     ("rand-m10-inc1", "cap the magnitude with -mmax9"),
                                     ("rand-m9-mstd0.5-inc1-mmax10", "lower its -mmax to 9"),
                                     ("rand-m2", "choose another policy"), ("v0", "choose another policy")])
def test_an_augmentation_that_would_crash_mid_run_is_refused_before_anything_runs(aa, fix, capsys, tmp_path):
    """MAE's literal ``rand-m9-mstd0.5-inc1`` draws magnitude 10 for ~2 % of posterize calls, which timm maps
    to 0 kept bits and Pillow 13 refuses: the policy really crashes (checked by drawing), and fastebm-eval
    says so up front, with the fix, instead of failing a few hundred images into fine-tuning."""
    assert _posterize_crashes(aa, draws=2000, seed=int(torch.randint(0, 2 ** 31, ())))
    _run_bad(capsys, tmp_path, ["finetune", "--init", "random", "--aa", aa], f"--aa {aa!r}", "0 bits", fix)


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1-mmax9", "original", "rand-m9-mstd0.5", "augmix-m5-w4-d2",
                                "augmix-m10-w4-d2"])
def test_accepted_augmentations_never_posterize_to_zero_bits(aa):
    from fastebm.eval.config import make_config
    from fastebm.eval.recipes import RAND_AUGMENT

    assert make_config("finetune", init="random", aa=aa).aa == aa
    assert make_config("finetune", init="random", recipe="imagenet").aa == RAND_AUGMENT
    assert not _posterize_crashes(aa, draws=2000, seed=int(torch.randint(0, 2 ** 31, ())))

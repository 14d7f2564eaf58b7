"""fastebm-restore / fastebm-score output folders and what they record.

* a folder scan never reads the command's own output folder (nor fastebm-train's --output_dir);
* an -o holding an earlier run's outputs is refused without --overwrite (nothing touched), and
  --overwrite deletes only the tool's own files;
* a task parameter of another task is a usage error; results.json records every effective setting;
* unreadable files are counted once however many models score them; the restore means cover the
  same images; --resize writes restored images at the model's size; tiny/thin panels are readable.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fastebm
from fastebm.cli import restore as restore_cli
from fastebm.cli import score as score_cli
from fastebm.data.errors import DataError
from fastebm.data.folder import ImageFolderData, scan_image_files
from fastebm.tools.pictures import MIN_PANEL_SIDE, panel_size, strip
from fastebm.tools.restoration import RestorationResult, summarise, task_params


def _save_checkpoint(path, img_size=16, steps=2):
    from fastebm.checkpoint import save_checkpoint
    from fastebm.train.config import TrainConfig

    cfg = TrainConfig(img_size=img_size, steps=steps)
    objective = fastebm.RestorationObjective(fastebm.create_model("vit_demo", img_size=img_size), steps=steps)
    os.makedirs(path, exist_ok=True)
    save_checkpoint({"model": objective.state_dict(), "optimizer": {}, "step": 1, "config": cfg.to_dict(),
                     "rng": {}}, str(path))
    return os.path.join(str(path), "last.pt")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _images(folder, sizes, grey=()):
    os.makedirs(folder, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        arr = (np.random.rand(h, w, 3) * 255).astype(np.uint8)
        if i in grey:
            arr[:] = arr[..., :1]
        Image.fromarray(arr).save(os.path.join(folder, f"img{i}.png"))
    return str(folder)


def _restore(capsys, argv):
    code = restore_cli.main(argv)
    return code, capsys.readouterr()


def _snapshot(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def _one_error_line(io, prog):
    lines = io.err.strip().splitlines()
    assert lines[-1].startswith(f"{prog}: error: ") and "Traceback" not in io.err, io.err
    assert len([ln for ln in lines if "error" in ln]) == 1, io.err
    return lines[-1]


# ----------------------------------------------------------------------------- the output folder is not input

def test_restore_skips_its_output_folder_inside_the_input_folder(tmp_path, ckpt, capsys):
    data = _images(tmp_path / "odd", [(16, 16), (20, 12)])
    out = os.path.join(data, "out")
    code, io = _restore(capsys, ["--ckpt", ckpt, data, "-o", out])
    assert code == 0, io.err
    assert "skipped" not in io.err  # nothing under -o yet
    code, io = _restore(capsys, ["--ckpt", ckpt, data, "-o", out, "--overwrite"])
    assert code == 0, io.err
    summary = json.loads(open(os.path.join(out, "results.json")).read())
    assert [r["path"] for r in summary["images"]] == [os.path.join(data, "img0.png"), os.path.join(data, "img1.png")]
    # grid.png + 2 strips + 2 restored images of the first run, named once in one warning
    assert summary["excluded_outputs"] == 5
    warnings = [ln for ln in io.err.splitlines() if "under the output folder" in ln]
    assert len(warnings) == 1 and "skipped 5 image file(s)" in warnings[0], io.err
    assert sorted(os.listdir(os.path.join(out, "strips"))) == ["0000_img0.png", "0001_img1.png"]


def test_score_skips_its_output_folder_and_a_folder_only_holding_outputs_is_an_error(tmp_path, ckpt, capsys):
    data = _images(tmp_path / "in", [(16, 16), (16, 16), (16, 16)])
    os.makedirs(os.path.join(data, "scores"))
    Image.new("RGB", (16, 16)).save(os.path.join(data, "scores", "energy_hist.png"))  # as if written earlier
    code = score_cli.main(["--ckpt", ckpt, "--in", data, "-o", os.path.join(data, "scores"), "--overwrite"])
    io = capsys.readouterr()
    assert code == 0, io.err
    summary = json.loads(open(os.path.join(data, "scores", "ood.json")).read())
    assert summary["sets"] == {"in": 3} and summary["excluded_outputs"] == 1
    assert "skipped 1 image file(s) under the output folder" in io.err
    only = tmp_path / "only"
    os.makedirs(only / "out")
    Image.new("RGB", (16, 16)).save(only / "out" / "grid.png")
    code = score_cli.main(["--ckpt", ckpt, "--in", str(only), "-o", str(only / "out")])
    line = _one_error_line(capsys.readouterr(), "fastebm-score")
    assert code == 2 and "all lie under the output folder" in line and "outside" in line


def test_training_folder_data_leaves_out_its_output_dir(tmp_path):
    data = _images(tmp_path / "odd3", [(12, 12)] * 3)
    _images(tmp_path / "odd3" / "cats", [(12, 12)])
    run = tmp_path / "odd3" / "run"
    os.makedirs(run)
    for name in ("restoration_grid.png", "loss_curve.png"):
        Image.new("RGB", (12, 12)).save(run / name)
    assert len(scan_image_files(data)[0]) == 6  # without exclude the run's pictures are samples
    with pytest.warns(UserWarning, match=r"skipped 2 image file\(s\) under --output_dir"):
        source = ImageFolderData(data, 8, 0, exclude=str(run))
    assert len(source) == 4 and source.excluded == 2 and source.classes == ["cats"]
    assert not any("run" in p for p in source.paths)
    outside = ImageFolderData(data, 8, 0, exclude=str(tmp_path / "elsewhere"))  # not inside: no effect
    assert len(outside) == 6 and outside.excluded == 0
    only = tmp_path / "only3"
    _images(only / "run", [(12, 12)])
    with pytest.raises(DataError, match="only under --output_dir"):
        ImageFolderData(str(only), 8, 0, exclude=str(only / "run"))
    # --output_dir IS the data folder: the user's images are not "a run's own outputs"
    for same in (data, os.path.join(data, "cats", ".."), data + os.sep):
        with pytest.raises(DataError) as err:
            ImageFolderData(data, 8, 0, exclude=same)
        assert str(err.value) == (f"--data: --output_dir {same!r} is the data folder itself; give an --output_dir "
                                  f"outside --data (a run's own pictures would become training data)")
        assert "skipped" not in str(err.value)
    # fastebm-train's own data builder passes its --output_dir
    from fastebm.train.build import build_data
    from fastebm.train.config import TrainConfig

    with pytest.warns(UserWarning, match=r"skipped 2 image file\(s\) under --output_dir"):
        built = build_data(TrainConfig(data=data, output_dir=str(run)), 8)
    assert sorted(built.paths) == sorted(source.paths)


# ----------------------------------------------------------------------------- re-running into the same -o

def test_restore_refuses_earlier_outputs_and_overwrite_deletes_only_its_own(tmp_path, ckpt, capsys):
    first = _images(tmp_path / "a", [(16, 16), (16, 20), (12, 16)])
    second = _images(tmp_path / "b", [(16, 16)])
    out = tmp_path / "out"
    code, io = _restore(capsys, ["--ckpt", ckpt, first, "-o", str(out)])
    assert code == 0, io.err
    (out / "notes.txt").write_text("mine")
    (out / "photo.png").write_bytes(b"not ours")
    (out / "strips" / "mine.png").write_bytes(b"mine too")
    before = _snapshot(out)
    code, io = _restore(capsys, ["--ckpt", ckpt, second, "-o", str(out)])
    line = _one_error_line(io, "fastebm-restore")
    assert code == 2 and "holds the outputs of an earlier fastebm-restore run" in line and "--overwrite" in line
    assert "strips/ (3 files)" in line
    assert _snapshot(out) == before  # refusal touches nothing
    # an all-unreadable input with --overwrite fails before anything is deleted
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"broken")
    code, io = _restore(capsys, ["--ckpt", ckpt, str(tmp_path / "bad"), "-o", str(out), "--overwrite"])
    assert code == 2 and _snapshot(out) == before
    code, io = _restore(capsys, ["--ckpt", ckpt, second, "-o", str(out), "--overwrite"])
    assert code == 0, io.err
    after = _snapshot(out)
    for foreign in ("notes.txt", "photo.png", os.path.join("strips", "mine.png")):
        assert after[foreign] == before[foreign]
    assert sorted(os.listdir(out / "strips")) == ["0000_img0.png", "mine.png"]
    assert os.listdir(out / "restored") == ["0000_img0.png"]
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["images"]) == 1 and (out / "index.html").read_text().count("<img") == 1
    # --overwrite never deletes an image named as input
    code, io = _restore(capsys, ["--ckpt", ckpt, str(out / "restored" / "0000_img0.png"), "-o", str(out), "--overwrite"])
    assert code == 2 and "would delete the input image" in _one_error_line(io, "fastebm-restore")
    assert (out / "restored" / "0000_img0.png").is_file()


def test_score_refuses_earlier_outputs_and_overwrite_drops_the_stale_table(tmp_path, ckpt, capsys):
    inset = _images(tmp_path / "in", [(16, 16)] * 3)
    odd = _images(tmp_path / "odd", [(16, 16)] * 3)
    out = tmp_path / "out"
    assert score_cli.main(["--ckpt", ckpt, "--in", inset, "--ood", odd, "-o", str(out)]) == 0
    assert (out / "ood.md").is_file()
    (out / "keep.md").write_text("mine")
    before = _snapshot(out)
    code = score_cli.main(["--ckpt", ckpt, "--in", inset, "-o", str(out)])
    line = _one_error_line(capsys.readouterr(), "fastebm-score")
    assert code == 2 and "earlier fastebm-score run" in line and "ood.md" in line and _snapshot(out) == before
    code = score_cli.main(["--ckpt", ckpt, "--in", inset, "-o", str(out), "--overwrite"])
    capsys.readouterr()
    assert code == 0
    assert not (out / "ood.md").exists() and (out / "keep.md").read_text() == "mine"
    assert json.loads((out / "ood.json").read_text())["metrics"] == []


def test_restore_overwrite_deletes_only_the_files_results_json_lists(tmp_path, ckpt, capsys):
    images = _images(tmp_path / "a", [(16, 16), (16, 16)])
    out = tmp_path / "out"
    code, io = _restore(capsys, ["--ckpt", ckpt, images, "-o", str(out)])
    assert code == 0, io.err
    # a user's own files that look like per-image outputs but are not listed in results.json
    (out / "strips" / "9999_custom.png").write_bytes(b"mine")
    (out / "restored" / "0005_other.png").write_bytes(b"mine too")
    code, io = _restore(capsys, ["--ckpt", ckpt, images, "-o", str(out)])
    line = _one_error_line(io, "fastebm-restore")
    assert code == 2 and "strips/ (2 files)" in line and "restored/ (2 files)" in line  # only the listed ones
    code, io = _restore(capsys, ["--ckpt", ckpt, os.path.join(images, "img0.png"), "-o", str(out), "--overwrite"])
    assert code == 0, io.err
    assert sorted(os.listdir(out / "strips")) == ["0000_img0.png", "9999_custom.png"]
    assert sorted(os.listdir(out / "restored")) == ["0000_img0.png", "0005_other.png"]
    assert (out / "strips" / "9999_custom.png").read_bytes() == b"mine"
    # no readable results.json: the name pattern decides (the listed strip survives only if named otherwise)
    (out / "results.json").write_text("{not json")
    code, io = _restore(capsys, ["--ckpt", ckpt, os.path.join(images, "img1.png"), "-o", str(out), "--overwrite"])
    assert code == 0, io.err
    assert sorted(os.listdir(out / "strips")) == ["0000_img1.png"]
    # a listed path outside strips/ and restored/ is never deleted
    summary = json.loads((out / "results.json").read_text())
    summary["images"][0]["strip"] = "../victim.png"
    (out / "results.json").write_text(json.dumps(summary))
    (tmp_path / "victim.png").write_bytes(b"keep")
    code, io = _restore(capsys, ["--ckpt", ckpt, os.path.join(images, "img0.png"), "-o", str(out), "--overwrite"])
    assert code == 0, io.err
    assert (tmp_path / "victim.png").read_bytes() == b"keep"
    assert sorted(os.listdir(out / "restored")) == ["0000_img0.png"]


# ----------------------------------------------------------------------------- nothing written on bad input

def test_refused_runs_create_no_output_folder(tmp_path, ckpt, capsys):
    images = _images(tmp_path / "imgs", [(16, 16)])
    backbone = tmp_path / "backbone.pth"
    torch.save({"weight": torch.zeros(2)}, str(backbone))  # an exported backbone, not a training checkpoint
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"broken")
    (tmp_path / "empty").mkdir()
    restore_cases = [
        ["--ckpt", str(backbone), os.path.join(images, "img0.png")],
        ["--ckpt", str(tmp_path / "nonexist.pt"), images],
        ["--ckpt", ckpt, str(tmp_path / "missing.png")],
        ["--ckpt", ckpt, str(tmp_path / "empty")],
        ["--ckpt", ckpt, str(tmp_path / "bad")],  # every image unreadable
        ["--ckpt", ckpt, images, "--overlap", "3"],
        ["--ckpt", ckpt, images, "--task", "sr", "--sr_factor", "3"],
        ["--ckpt", ckpt, images, "--resize", "--overlap", "4"],
    ]
    for i, argv in enumerate(restore_cases):
        out = tmp_path / f"ro_{i}" / "nested"
        code, io = _restore(capsys, argv + ["-o", str(out)])
        _one_error_line(io, "fastebm-restore")
        assert code == 2 and not (tmp_path / f"ro_{i}").exists(), (argv, io.err)
    score_cases = [
        ["--ckpt", str(tmp_path / "nonexist.pt"), "--in", images],
        ["--ckpt", str(backbone), "--in", images],
        ["--ckpt", ckpt, "--in", str(tmp_path / "empty")],
        ["--ckpt", ckpt, "--in", str(tmp_path / "bad")],
        ["--ckpt", ckpt, "--in", images, "--overlap", "3"],
        ["--ckpt", ckpt, "--in", images, "--resize", "--overlap", "4"],
    ]
    for i, argv in enumerate(score_cases):
        out = tmp_path / f"so_{i}"
        code = score_cli.main(argv + ["-o", str(out)])
        _one_error_line(capsys.readouterr(), "fastebm-score")
        assert code == 2 and not out.exists(), argv


@pytest.mark.parametrize("main, prog, verb, data", [(restore_cli.main, "fastebm-restore", "restores", []),
                                                     (score_cli.main, "fastebm-score", "scores", ["--in"])])
def test_overlap_with_resize_is_a_usage_error(tmp_path, ckpt, capsys, main, prog, verb, data):
    images = _images(tmp_path / "imgs", [(16, 16)])
    code = main(["--ckpt", ckpt, *data, images, "-o", str(tmp_path / "out"), "--resize", "--overlap", "4"])
    line = _one_error_line(capsys.readouterr(), prog)
    assert code == 2 and line == (f"{prog}: error: --overlap applies to tiling, and --resize {verb} the whole image "
                                  f"as one tile; drop one of them")
    assert not (tmp_path / "out").exists()


def test_score_records_no_overlap_with_resize(tmp_path, ckpt, capsys):
    images = _images(tmp_path / "imgs", [(20, 24)])
    out = tmp_path / "out"
    assert score_cli.main(["--ckpt", ckpt, "--in", images, "-o", str(out), "--resize"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "ood.json").read_text())
    assert summary["resize"] is True and summary["overlap"] is None


# ----------------------------------------------------------------------------- flags and recorded settings

@pytest.mark.parametrize("extra, owner", [(["--mask_ratio", "0.5"], "mim"),
                                          (["--task", "mim", "--sr_factor", "2"], "sr"),
                                          (["--task", "sr", "--sigma", "0.1"], "denoise"),
                                          (["--already_corrupted", "--sigma", "0.1"], "denoise")])
def test_restore_task_parameter_of_another_task_is_a_usage_error(tmp_path, ckpt, capsys, extra, owner):
    images = _images(tmp_path / "imgs", [(16, 16)])
    code, io = _restore(capsys, ["--ckpt", ckpt, images, "-o", str(tmp_path / "out")] + extra)
    line = _one_error_line(io, "fastebm-restore")
    assert code == 2 and f"{extra[-2]} applies to --task {owner} only" in line
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_task_params_hold_every_effective_value():
    assert task_params("denoise") == {"denoise": {"sigma": 0.2}}
    assert task_params("sr") == {"sr": {"factor": 4}}
    assert task_params("mim") == {"mim": {"ratio": 0.6}}
    assert task_params("sort") == {"sort": {"ratio": 0.25}}
    assert task_params("colorize") == {"colorize": {}}
    assert task_params("mim", mask_ratio=0.3, sigma=0.5) == {"mim": {"ratio": 0.3}}


def test_results_json_records_task_params_and_overlap_and_means_cover_the_same_images(tmp_path, ckpt, capsys):
    images = _images(tmp_path / "imgs", [(20, 28), (24, 16)], grey=(0,))
    out = tmp_path / "out"
    code, io = _restore(capsys, ["--ckpt", ckpt, images, "-o", str(out), "--task", "colorize"])
    assert code == 0, io.err
    summary = json.loads((out / "results.json").read_text())
    assert summary["task_params"] == {} and summary["overlap"] == 4  # a quarter of the 16 px tile
    grey, rgb = summary["images"]
    assert grey["psnr_corrupted"] is None and grey["ssim_corrupted"] is not None
    mean = summary["mean"]
    assert mean["images_in_mean"] == 1 and mean["images"] == 2 and mean["left_out"] == {"grey": 1}
    assert mean["ssim_restored"] == pytest.approx(rgb["ssim_restored"])  # not averaged with the grey image's
    assert mean["psnr_restored"] == pytest.approx(rgb["psnr_restored"])
    assert mean["psnr_per_step"][-1] == pytest.approx(rgb["psnr_restored"])
    assert "mean over 1 of 2 images (1 grey image with nothing to colorize)" in io.out
    out2 = tmp_path / "out2"
    code, io = _restore(capsys, ["--ckpt", ckpt, images, "-o", str(out2), "--resize"])
    assert code == 0, io.err
    summary = json.loads((out2 / "results.json").read_text())
    # --resize: one tile per image, no overlap used
    assert summary["task_params"] == {"sigma": 0.2} and summary["overlap"] is None and summary["resize"]
    # --resize: the restored image is written at the model's size (docs/tools.md)
    row = summary["images"][0]
    assert Image.open(out2 / row["restored"]).size == (16, 16)
    assert (row["source_height"], row["source_width"]) == (20, 28)


def test_summarise_means_are_over_the_images_with_every_metric():
    rows = [{"task": "denoise", "psnr_corrupted": 10.0, "psnr_restored": 14.0, "ssim_corrupted": 0.2, "ssim_restored": 0.4},
            {"task": "denoise", "psnr_corrupted": 20.0, "psnr_restored": 21.0, "ssim_corrupted": None, "ssim_restored": None},
            {"task": "denoise", "psnr_corrupted": None, "psnr_restored": 30.0, "ssim_corrupted": 1.0, "ssim_restored": 0.9}]
    mean = summarise(rows)
    assert mean["psnr_gain"] == 4.0 and mean["ssim_corrupted"] == 0.2 and mean["ssim_restored"] == 0.4
    assert mean["images_in_mean"] == 1 and mean["images_with_psnr"] == 2
    assert mean["left_out"] == {"no_ssim": 1, "unchanged": 1}


def test_score_counts_an_unreadable_file_once_with_two_models(tmp_path, ckpt, capsys):
    data = _images(tmp_path / "odd", [(16, 16)] * 2)
    (tmp_path / "odd" / "text.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code = score_cli.main(["--ckpt", ckpt, "--in", data, "-o", str(out), "--random_init"])
    io = capsys.readouterr()
    assert code == 0, io.err
    assert io.err.count("skipped unreadable image") == 1
    assert "4 energies (1 unreadable skipped)" in io.out
    summary = json.loads((out / "ood.json").read_text())
    assert [s["path"] for s in summary["skipped"]] == [os.path.join(data, "text.png")]
    assert summary["overlap"] == 4


# ----------------------------------------------------------------------------- pictures

@pytest.mark.parametrize("h, w", [(1, 1), (3, 200), (200, 3), (16, 16), (9, 30), (300, 500)])
def test_strip_panels_reach_a_readable_size_along_each_axis(h, w):
    ph, pw = panel_size(h, w)
    assert min(ph, pw) >= MIN_PANEL_SIDE and max(ph, pw) <= max(512, h, w)
    assert ph % h == 0 and pw % w == 0  # whole pixels (nearest neighbour)
    if min(h, w) >= MIN_PANEL_SIDE:
        assert (ph, pw) == (h, w)
    if -(-MIN_PANEL_SIDE // min(h, w)) * max(h, w) <= 512:
        assert ph * w == pw * h  # an image that one factor brings to size keeps its aspect ratio
    else:
        assert ph * w != pw * h  # a thin one is stretched along its short axis
    x = torch.rand(3, h, w)
    result = RestorationResult(0, "x", "denoise", (h, w), (h, w), 1, x, [x, x], [1.0, 2.0, 3.0], clean=x)
    picture = strip(result)
    assert picture.size == (4 * pw + 3 * 4, ph + 42)  # clean | corrupted | 2 steps, labels above

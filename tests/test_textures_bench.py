"""benchmarks/quality/textures.py (the texture benchmark) and ``run.py --benchmark textures``.

The split is checked against the images themselves: every window is the pixels of the source image at
its recorded corner, lies inside one tile of its own region, and no test window overlaps a training
tile. The folder is read back through fastebm-eval's own loader, and a quick study runs end to end.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUALITY = os.path.join(ROOT, "benchmarks", "quality")
sys.path.insert(0, QUALITY)

import textures as T  # noqa: E402


@pytest.fixture(scope="module")
def split():
    return T.texture_split(return_regions=True)


def _inside(corner, tile):
    (y, x), (ty, tx) = corner, tile
    return ty <= y and y + T.WINDOW <= ty + T.TILE and tx <= x and x + T.WINDOW <= tx + T.TILE


def test_every_window_is_its_images_pixels_inside_a_tile_of_its_own_region(split):
    x_tr, y_tr, x_te, y_te, regions = split
    assert x_tr.shape == (len(T.CLASSES) * T.TRAIN_PER_CLASS, T.WINDOW, T.WINDOW) and x_tr.dtype == np.uint8
    assert x_te.shape == (len(T.CLASSES) * T.TEST_PER_CLASS, T.WINDOW, T.WINDOW)
    assert np.bincount(y_tr).tolist() == [T.TRAIN_PER_CLASS] * len(T.CLASSES)
    assert np.bincount(y_te).tolist() == [T.TEST_PER_CLASS] * len(T.CLASSES)
    import skimage.data

    for label, name in enumerate(T.CLASSES):
        img = np.asarray(getattr(skimage.data, name)())  # read again here, not through the builder
        reg = regions[name]
        train, test = set(reg["train_tiles"]), set(reg["test_tiles"])
        assert train and len(test) >= T.MIN_TEST_TILES and not train & test
        rows, cols = img.shape[0] // T.TILE, img.shape[1] // T.TILE
        assert train | test == {(r * T.TILE, c * T.TILE) for r in range(rows) for c in range(cols)}
        assert len(test) == max(T.MIN_TEST_TILES, round(T.TEST_TILE_FRACTION * rows * cols))
        for xs, ys, corners, own in ((x_tr, y_tr, reg["train_corners"], train), (x_te, y_te, reg["test_corners"], test)):
            windows = xs[ys == label]
            assert len(windows) == len(corners)
            for win, (y, x) in zip(windows, corners):
                assert np.array_equal(win, img[y:y + T.WINDOW, x:x + T.WINDOW])
                assert any(_inside((y, x), t) for t in own)
                assert win.astype(np.float64).std() >= T.MIN_STD
        # a test window shares no pixel with any training tile
        for y, x in reg["test_corners"]:
            for ty, tx in train:
                assert y + T.WINDOW <= ty or ty + T.TILE <= y or x + T.WINDOW <= tx or tx + T.TILE <= x


def test_the_split_is_the_same_on_every_call(split):
    again = T.texture_split()
    assert all(np.array_equal(a, b) for a, b in zip(split[:4], again))


def test_no_class_is_a_photo_the_backbones_are_pretrained_on():
    from fastebm.data.builtin import HELD_OUT_PHOTOS, TRAIN_PHOTOS

    used = {p.split(":")[-1].split(".")[0] for p in TRAIN_PHOTOS + HELD_OUT_PHOTOS} | {"cat"}  # cat is chelsea
    assert not used & set(T.CLASSES)


def test_split_tiles_refuses_an_image_too_small_to_split():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="tiles"):
        T.split_tiles((T.TILE, 2 * T.TILE), rng)
    train, test = T.split_tiles((3 * T.TILE + 5, T.TILE), rng)  # 3 tiles: 2 test (the minimum), 1 train
    assert len(test) == T.MIN_TEST_TILES and len(train) == 1


def test_a_flat_region_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(T, "MAX_DRAWS", 50)
    flat = np.full((2 * T.TILE, 2 * T.TILE), 117, dtype=np.uint8)
    with pytest.raises(RuntimeError, match="std"):
        T.draw_windows(flat, [(0, 0)], 3, np.random.default_rng(1), "flat")


def test_the_folder_reads_back_through_fastebm_eval_in_the_same_order(tmp_path, split):
    from fastebm.eval.config import make_config
    from fastebm.eval.datasets import few_shot_indices, load_eval_data

    out = tmp_path / "tex"
    manifest = T.write_folder(str(out))
    assert manifest["classes"] == list(T.CLASSES) and json.loads((out / "manifest.json").read_text()) == manifest
    x_tr, y_tr, x_te, y_te = split[:4]
    seed = 5
    data = load_eval_data(make_config("linprobe", init="random", data=str(out), few_shot=10, seed=seed), 32)
    assert data.classes == list(T.CLASSES) and data.val.labels == y_te.tolist()
    idx = few_shot_indices(y_tr.tolist(), 10, seed, T.CLASSES)  # what the pixel reference draws
    assert data.train.labels == y_tr[idx].tolist()
    got = np.stack([np.asarray(data.train[i][0])[..., 0] for i in range(len(idx))])  # grey PNG -> RGB, equal channels
    assert np.array_equal(got, x_tr[idx])
    assert np.array_equal(np.asarray(data.val[len(y_te) - 1][0])[..., 2], x_te[-1])
    # a second call keeps the folder; a foreign folder is refused and left as it was
    T.write_folder(str(out))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not this benchmark"):
        T.write_folder(str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me" and sorted(os.listdir(foreign)) == ["notes.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".textures-")]  # no temporary folder left behind


def test_the_command_line_fills_an_empty_folder_and_refuses_bad_paths_without_writing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert T.main([str(empty)]) == 0  # an empty folder (mktemp -d) is filled
    assert oct((empty).stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's 0700
    thinned = tmp_path / "thinned"
    shutil.copytree(empty, thinned)
    shutil.rmtree(thinned / "val" / "moon")
    capsys.readouterr()
    assert T.main([str(thinned)]) == 2  # a copy with images missing is not reused
    assert "images are missing" in capsys.readouterr().err and not (thinned / "val" / "moon").exists()
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert T.main([str(blocker / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err and blocker.read_text() == "x"
    for bad in (tmp_path / "nodir" / "x.png", tmp_path / "x.jpg", tmp_path):
        assert T.main([str(tmp_path / "new"), "--examples", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "--examples" in err and "Traceback" not in err
        assert not (tmp_path / "new").exists()  # checked before the data set is written
    png = tmp_path / "ex.png"
    assert T.main([str(tmp_path / "new"), "--examples", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_pixel_reference_scores_a_logistic_regression_fitted_here(split):
    """textures.pixel_logistic_regression at 32 px (no resize) against a model fitted here from the raw arrays."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from fastebm.eval.datasets import few_shot_indices

    x_tr, y_tr, x_te, y_te = split[:4]
    seed = 3
    got = T.pixel_logistic_regression([seed], img_size=T.WINDOW)
    idx = few_shot_indices(y_tr.tolist(), 10, seed, T.CLASSES)
    f_tr = x_tr.reshape(len(x_tr), -1).astype(np.float64)
    f_te = x_te.reshape(len(x_te), -1).astype(np.float64)
    scaler = StandardScaler().fit(f_tr[idx])
    model = LogisticRegression(max_iter=5000).fit(scaler.transform(f_tr[idx]), y_tr[idx])
    want = float((model.predict(scaler.transform(f_te)) == y_te).mean())
    assert got["lp_100"][str(seed)] == pytest.approx(want, abs=2.5 / len(y_te))  # float32 vs float64 pixels: a test image or two
    assert 1 / len(T.CLASSES) < got["lp_100"][str(seed)] < 1.0


def test_textures_commands_read_the_folder_with_the_small_recipe(tmp_path):
    import arms as A

    budget = A.Budget(data_dir=str(tmp_path / "tex"))
    assert budget.eval_folder == "eval_textures" and A.Budget().eval_folder == "eval"
    parts = A.eval_commands(A.ARMS["fastebm"], 0, str(tmp_path / "p"), str(tmp_path / "e"), budget)
    evals = [c for cmds in parts.values() for c in cmds if c[1:4] == ["-m", "fastebm", "eval"]]
    assert len(evals) == 7  # 2 probes, k-NN, 2 fine-tunings and their re-probes
    for c in evals:
        i = c.index("--data")
        assert c[i + 1] == str(tmp_path / "tex") and c[c.index("--recipe") + 1] == "small"
    assert not any("diagnose.py" in " ".join(c) for cmds in parts.values() for c in cmds)
    digits = A.eval_commands(A.ARMS["fastebm"], 0, str(tmp_path / "p"), str(tmp_path / "e"), A.Budget())
    assert any("diagnose.py" in " ".join(c) for c in digits["frozen"])
    assert not any("--data" in c or "--recipe" in c for cmds in digits.values() for c in cmds)


def test_quick_textures_study_runs_end_to_end(tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, os.path.join(QUALITY, "run.py"), "--quick", "--benchmark", "textures", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p for p in os.listdir(out) if p != "runs") == ["textures.json", "textures.md", "textures.png", "textures_curves.png"]
    data = json.loads((out / "textures.json").read_text())
    assert data["meta"]["benchmark"] == "textures"
    for name, arm in data["arms"].items():
        m = arm["seeds"]["0"]["metrics"]
        for key in ("ft_100", "ft_all", "lp_100", "lp_all", "knn_all"):
            assert 0.0 <= m[key] <= 1.0, (name, key)
        assert "fragility" not in m  # diagnose.py runs with the digits only
    summary = json.loads((out / "runs" / "eval_textures" / "fastebm_s0" / "ft_100" / "summary.json").read_text())
    assert summary["val_images"] == len(T.CLASSES) * T.TEST_PER_CLASS and summary["config"]["recipe"] == "small"
    assert summary["config"]["layer_decay"] == 0.75 and summary["config"]["mixup"] == 0.0  # the small recipe, not MAE's
    table = (out / "textures.md").read_text()
    assert "500 test patches" in table and "textures.py" in table and "Diagnostics" not in table
    ref = data["reference_pixels"]
    assert f"{ref['lp_all']['0']:.3f}" in table


def test_run_refuses_a_work_folder_it_cannot_use_with_one_line_errors(tmp_path, capsys):
    import run

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert run.main(["--quick", "--benchmark", "textures", "--output_dir", str(blocker / "out")]) == 2
    assert "cannot make the work folder" in capsys.readouterr().err and blocker.read_text() == "x"
    foreign = tmp_path / "w" / "runs" / "data" / "textures"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep me")
    assert run.main(["--quick", "--benchmark", "textures", "--output_dir", str(tmp_path / "w")]) == 2
    assert "not this benchmark's folder" in capsys.readouterr().err
    assert sorted(os.listdir(foreign)) == ["mine.txt"] and not (tmp_path / "w" / "textures.json").exists()


def test_the_lr_search_split_holds_out_whole_training_tiles(split, tmp_path):
    """texture_ft_lr.py's validation split: every training patch goes to exactly one side, every class keeps
    enough training patches for 100 labels and some validation ones, no validation window shares a pixel with
    a window left for training (checked on the corners, not the tile bookkeeping), no test patch is used, and
    the folder written holds those pixels."""
    import texture_ft_lr as L
    from PIL import Image

    x_tr, y_tr, _, _, regions = split
    s = L.val_split()
    is_val = s["is_val"]
    assert is_val.shape == y_tr.shape and 0 < is_val.sum() < len(is_val)
    assert np.array_equal(s["x_val"], x_tr[is_val]) and np.array_equal(s["x_train"], x_tr[~is_val])
    start = 0
    for label, name in enumerate(T.CLASSES):
        corners = regions[name]["train_corners"]
        held = is_val[start:start + len(corners)]
        start += len(corners)
        assert (~held).sum() >= 10 and held.sum() >= 1, name
        for vy, vx in corners[held]:
            for ty, tx in corners[~held]:
                assert abs(int(vy) - int(ty)) >= T.WINDOW or abs(int(vx) - int(tx)) >= T.WINDOW, name
    counts = L.write_val_split(str(tmp_path / "split"))
    assert counts == {"train": int((~is_val).sum()), "val": int(is_val.sum())}
    name = T.CLASSES[int(s["y_val"][0])]
    first = sorted(os.listdir(tmp_path / "split" / "val" / name))[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "split" / "val" / name / first)), s["x_val"][0])


@pytest.mark.parametrize("cell", ["builtin", "hflip", "randaug", "steps2000", "hflip_randaug_steps2000", "head_random"])
def test_the_recipe_grid_cells_parse_as_the_study_command_with_their_flags(cell, tmp_path):
    """texture_ft_recipe.py: each cell is the study's 100-label fine-tuning on the split with its flags winning:
    a flip of probability 0.5, MAE's RandAugment, 2,000 optimiser steps at 100 labels and batch 32 (the last partial
    batch dropped), a random head instead of LP-FT's probe, or the built-in value of each; the test-patch arm of a
    cell adds the same flags."""
    import arms as A
    import texture_ft_lr as L
    import texture_ft_recipe as R
    from fastebm.eval.config import parse_args
    from fastebm.eval.recipes import RAND_AUGMENT, RECIPES, UPDATE_BUDGET

    flags = R.CELLS[cell]
    split = str(tmp_path / "split")
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "backbone.pth").write_bytes(b"")  # fastebm-eval's parser checks that the backbone file exists
    for arm in R.ARMS:
        cmd = L.finetune_command(arm, 0, str(pre), 3, A.Budget(data_dir=split), flags, str(tmp_path / "ft"))
        assert cmd[1:5] == ["-m", "fastebm", "eval", "finetune"]
        command, cfg = parse_args(cmd[4:])
        assert command == "finetune" and cfg.few_shot == 10 and cfg.seed == 3 and cfg.data == split and cfg.img_size == 32
        assert cfg.recipe == "small" and cfg.blr is None and cfg.lr is None  # the built-in lr in every cell
        assert (cfg.init, cfg.ckpt) == (("random", None) if arm.startswith("random_timm") else (None, str(pre / "backbone.pth")))
        parts = set(cell.split("_"))
        builtin = RECIPES["small"]["finetune"]
        assert cfg.hflip == (0.5 if "hflip" in parts else builtin["hflip"]) and builtin["hflip"] == 0
        assert cfg.aa == (RAND_AUGMENT if "randaug" in parts else builtin["aa"]) and builtin["aa"] == "off"
        assert cfg.head_init == ("random" if cell == "head_random" else builtin["head_init"]) and builtin["head_init"] == "probe"
        if "steps2000" in parts:
            per_epoch = 100 // RECIPES["small"]["finetune"]["batch_size"]
            assert 2 * UPDATE_BUDGET <= cfg.epochs * per_epoch < 2 * UPDATE_BUDGET + per_epoch
        else:
            assert cfg.epochs is None
    if flags:
        arm = A.ARMS[f"fastebm_16px_8ep_ft100_{cell}"]
        assert arm.ft_flags == flags and arm.parts == ["ft_100"] and arm.pretrained_as == "fastebm_16px_8ep"
        assert A.ARMS[f"random_timm_32px_ft100_{cell}"].ft_flags == flags


def test_the_recipe_grid_picks_each_arms_highest_mean_and_skips_missing_cells():
    """texture_ft_recipe.picks: per arm, the cell with the highest mean over its seeds (not the highest single run);
    a tie goes to the cell listed first; cells and arms without a finished run are left out."""
    import texture_ft_recipe as R

    rng = np.random.default_rng()
    base = rng.uniform(0.3, 0.6)
    rows = [dict(arm="a", cell="x", seed=0, val_top1=base + 0.30), dict(arm="a", cell="x", seed=1, val_top1=base),
            dict(arm="a", cell="y", seed=0, val_top1=base + 0.20), dict(arm="a", cell="y", seed=1, val_top1=base + 0.12),
            dict(arm="b", cell="y", seed=0, val_top1=base), dict(arm="b", cell="z", seed=0, val_top1=base)]
    # a: x has the best run (base + 0.30) but y the best mean (base + 0.16 against base + 0.15)
    assert R.picks(rows, ["a", "b", "c"], ["x", "y", "z"]) == {"a": "y", "b": "y"}
    assert R.picks(rows, ["b"], ["z", "y"]) == {"b": "z"}
    assert R.cell_top1(rows, "a", "y") == [base + 0.20, base + 0.12]

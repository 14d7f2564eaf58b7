"""--data folders: scanning, conversion to RGB, deterministic crops, bad files and bad folders."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_train_helpers import fast_args, make_image_folder, read_summary
from fastebm.cli.train import main
from fastebm.data.errors import DataError
from fastebm.data.folder import ImageFolderData, scan_image_files
from fastebm.data.sampling import BatchPlan


def test_scan_is_recursive_sorted_and_labels_first_level(tmp_path):
    make_image_folder(tmp_path, n=7)
    (tmp_path / "a" / "deeper").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / "a" / "deeper" / "x.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    paths, labels, classes = scan_image_files(str(tmp_path))
    assert classes == ["a", "b"] and len(paths) == 8
    assert paths == sorted(paths, key=lambda p: (os.path.dirname(p), p)) or len(set(paths)) == 8
    assert labels[paths.index(str(tmp_path / "a" / "deeper" / "x.bmp"))] == 0
    assert labels[paths.index(str(tmp_path / "img000.jpg"))] == -1


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    rng = np.random.default_rng()
    base = Image.fromarray(rng.integers(0, 256, size=(21, 27, 3), dtype=np.uint8))
    im = base.convert(mode) if mode != "I;16" else base.convert("L").convert("I;16")
    im.save(tmp_path / "x.png")
    data = ImageFolderData(str(tmp_path), img_size=12, seed=int(rng.integers(1 << 30)))
    x, label = data.load(0, epoch=0)
    assert x.dtype == torch.uint8 and x.shape == (3, 12, 12) and label == -1
    if mode in ("L", "LA", "I;16"):
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_crops_are_a_pure_function_of_seed_epoch_index(tmp_path):
    make_image_folder(tmp_path, n=5, size=(40, 31))
    seed = int(torch.randint(0, 1 << 30, (1,)))
    a = ImageFolderData(str(tmp_path), img_size=16, seed=seed)
    b = ImageFolderData(str(tmp_path), img_size=16, seed=seed)
    for i in range(5):
        assert torch.equal(a.load(i, 3)[0], b.load(i, 3)[0])
    assert any(not torch.equal(a.load(i, 3)[0], a.load(i, 4)[0]) for i in range(5))


def test_global_batch_is_split_across_ranks():
    n, b, accum, seed = 103, 5, 2, int(torch.randint(0, 1 << 30, (1,)))
    single = BatchPlan(n, 2 * b, accum, world_size=1, rank=0, seed=seed)
    ranks = [BatchPlan(n, b, accum, world_size=2, rank=r, seed=seed) for r in (0, 1)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == n // (2 * b * accum)
    for step in (0, 3, single.steps_per_epoch + 1):
        for micro in range(accum):
            assert single.micro_batch_keys(step, micro) == ranks[0].micro_batch_keys(step, micro) + ranks[1].micro_batch_keys(step, micro)
    # every sample of an epoch is used at most once
    seen = [k.index for s in range(single.steps_per_epoch) for m in range(accum) for k in single.micro_batch_keys(s, m)]
    assert len(seen) == len(set(seen))


def test_epoch_parts_cover_the_steps_once_cut_at_epoch_boundaries():
    plan = BatchPlan(97, 4, accum_iter=3, seed=1)  # 8 steps per epoch
    spe = plan.steps_per_epoch
    for start, end in ((0, 1), (5, 21), (spe, 2 * spe), (11, None)):
        parts = list(itertools.islice(plan.epoch_parts(start, end), 4))
        flat = [sm for _, sm in parts for sm in sm]
        want_end = end if end is not None else (start // spe + 4) * spe  # four parts of an endless run
        assert flat == [(s, m) for s in range(start, want_end) for m in range(3)]
        for epoch, schedule in parts:  # one epoch per part, and each part as long as possible
            assert {s // spe for s, _ in schedule} == {epoch}
        assert [e for e, _ in parts] == list(range(start // spe, start // spe + len(parts)))


def test_corrupt_files_are_skipped_and_reported(tmp_path, capsys):
    data = tmp_path / "data"
    paths = make_image_folder(data, n=8)
    with open(paths[3], "rb") as fh:
        good = fh.read()
    (data / "b" / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (data / "a" / "garbage.png").write_bytes(os.urandom(200))
    out = str(tmp_path / "out")
    # 10 files, batch 5: every file is drawn in the first epoch
    assert main(fast_args(out, str(data), batch_size=5, epochs=1)) == 0
    summary = read_summary(out)
    assert summary["skipped_files"]["count"] == 2
    listed = " ".join(summary["skipped_files"]["files"])
    assert "broken.jpg" in listed and "garbage.png" in listed
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err

    assert main(fast_args(str(tmp_path / "strict"), str(data), batch_size=5, epochs=1, strict_data="true")) == 2
    err = capsys.readouterr().err
    assert "--strict_data" in err and ("broken.jpg" in err or "garbage.png" in err) and "Traceback" not in err


def test_folder_without_readable_image(tmp_path, capsys):
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (tmp_path / "y.png").write_bytes(os.urandom(64))
    with pytest.raises(DataError, match="no readable image"):
        ImageFolderData(str(tmp_path), 16, 0).check_readable()
    assert main(fast_args(str(tmp_path / "out"), str(tmp_path))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable image" in err[0]


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_bad_data_folder_exits_2_without_traceback(tmp_path, kind):
    target = tmp_path / "data"
    if kind == "empty":
        target.mkdir()
        (target / "readme.txt").write_text("no images here")
    elif kind == "file":
        target.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "fastebm", "train", "--data", str(target), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastebm-train: error: --data") and str(target) in lines[0]
    assert "Traceback" not in proc.stderr


def test_images_only_in_hidden_folders_are_named_as_skipped(tmp_path, capsys):
    """A folder whose images all sit in dot-folders (or have dot-names) does not 'hold no image files'."""
    make_image_folder(str(tmp_path / ".ipynb_checkpoints"), n=3)
    Image.new("RGB", (8, 8)).save(tmp_path / "._photo.jpg")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        scan_image_files(str(tmp_path))
    text = str(info.value)
    assert "hidden" in text and "4 skipped" in text and ".ipynb_checkpoints/ (3)" in text and "._photo.jpg (1)" in text
    assert "holds no image" not in text
    assert main(fast_args(str(tmp_path / "out"), str(tmp_path))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hidden" in err[0]
    # with one visible image the hidden ones are still skipped, silently as before
    Image.new("RGB", (8, 8)).save(tmp_path / "visible.png")
    assert scan_image_files(str(tmp_path))[0] == [str(tmp_path / "visible.png")]

"""Backups survive resumes: a fallback from a damaged last.pt never rotates it over the good last.prev.pt,
a resume with nothing to train writes nothing, and checkpoint paths that are folders or exported
backbones are named for what they are."""
import os
import shutil

import pytest
import torch

from test_train_helpers import fast_args, make_image_folder
from fastebm.checkpoint import LAST, PREVIOUS, find_resume_checkpoint, load_checkpoint, save_checkpoint
from fastebm.cli.train import main
from fastebm.errors import CheckpointError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished run: last.pt = step 3, last.prev.pt = step 2 (shared, copy before changing it)."""
    root = tmp_path_factory.mktemp("backup")
    data = str(root / "data")
    make_image_folder(data, n=8)
    out = str(root / "run")
    assert main(fast_args(out, data, max_steps=3, save_every=1, threads=1)) == 0
    return data, out


def _copy(run, tmp_path, name):
    data, out = run
    dst = str(tmp_path / name)
    shutil.copytree(out, dst)
    return data, dst


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 3)


def _step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def _bytes(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))
            if os.path.isfile(os.path.join(out, n))}


@pytest.mark.parametrize("how", ["auto", "explicit_previous"])
def test_fallback_resume_keeps_the_good_backup(run, tmp_path, capsys, how):
    data, out = _copy(run, tmp_path, "e")
    last, prev = os.path.join(out, LAST), os.path.join(out, PREVIOUS)
    _truncate(last)
    damaged = open(last, "rb").read()
    good = open(prev, "rb").read()
    capsys.readouterr()
    resume = "auto" if how == "auto" else prev
    with pytest.warns(UserWarning) if how == "auto" else _nothing():
        assert main(fast_args(out, data, max_steps=4, resume=resume, threads=1)) == 0
    err = capsys.readouterr().err
    moved = last + ".damaged"
    assert f"moved the damaged checkpoint {last} aside to {moved}" in err
    assert open(moved, "rb").read() == damaged  # renamed, not copied or lost
    assert _step(last) == 4
    assert open(prev, "rb").read() == good and _step(prev) == 2  # the good backup was not replaced


def test_a_second_damaged_file_gets_its_own_name(run, tmp_path):
    data, out = _copy(run, tmp_path, "e2")
    last = os.path.join(out, LAST)
    open(last + ".damaged", "wb").write(b"earlier")
    _truncate(last)
    with pytest.warns(UserWarning):
        assert main(fast_args(out, data, max_steps=4, resume="auto", threads=1)) == 0
    assert open(last + ".damaged", "rb").read() == b"earlier" and os.path.isfile(last + ".damaged-2")
    assert _step(os.path.join(out, PREVIOUS)) == 2


@pytest.mark.parametrize("max_steps", [2, 3])
def test_resume_with_nothing_to_train_writes_nothing(run, tmp_path, capsys, max_steps):
    data, out = _copy(run, tmp_path, "noop")
    before = _bytes(out)
    capsys.readouterr()
    assert main(fast_args(out, data, max_steps=max_steps, resume="auto", threads=1)) == 0
    err = capsys.readouterr().err
    assert _bytes(out) == before  # last.pt and last.prev.pt (and everything else) byte-identical
    lines = [ln for ln in err.splitlines() if "nothing to train" in ln]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"{os.path.join(out, LAST)} is at step 3 and --max_steps is {max_steps}" in lines[0]
    assert "--max_steps above 3" in lines[0]


def test_resume_at_the_end_of_the_schedule_writes_nothing(tmp_path, capsys):
    data = str(tmp_path / "data")
    make_image_folder(data, n=8)  # 8 images, batch 4: 2 steps/epoch, 1 epoch
    out = str(tmp_path / "run")
    assert main(fast_args(out, data, epochs=1, warmup_epochs=0, threads=1)) == 0
    before = _bytes(out)
    capsys.readouterr()
    assert main(fast_args(out, data, epochs=1, warmup_epochs=0, resume="auto", threads=1)) == 0
    err = capsys.readouterr().err
    assert _bytes(out) == before
    assert "nothing to train" in err and "the end of its schedule" in err and "larger --epochs" in err


def test_both_damaged_names_both_and_a_real_fix(run, tmp_path, capsys):
    data, out = _copy(run, tmp_path, "g")
    for name in (LAST, PREVIOUS):
        _truncate(os.path.join(out, name))
    before = _bytes(out)
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert main(fast_args(out, data, max_steps=4, resume="auto", threads=1)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert os.path.join(out, LAST) in err and os.path.join(out, PREVIOUS) in err
    assert "--overwrite" in err and "readable" in err
    assert "such as last.prev.pt" not in err and "earlier checkpoint" not in err
    assert _bytes(out) == before


def test_find_resume_checkpoint_messages(tmp_path):
    state = {"model": {"w": torch.zeros(2)}, "optimizer": {}, "step": 1, "config": {}, "rng": {}}
    save_checkpoint(state, str(tmp_path))
    save_checkpoint(dict(state, step=2), str(tmp_path))
    for name in (LAST, PREVIOUS):
        (tmp_path / name).write_bytes(b"PK\x03\x04 broken")
    with pytest.warns(UserWarning) as record, pytest.raises(CheckpointError) as info:
        find_resume_checkpoint(str(tmp_path))
    assert len(record) == 2 and f"trying the previous checkpoint {tmp_path / PREVIOUS}" in str(record[0].message)
    assert "no other checkpoint to try" in str(record[1].message)  # not "trying" a file that is not there
    text = str(info.value)
    assert "tried last.pt and last.prev.pt" in text and "--overwrite" in text and "earlier checkpoint" not in text


def test_a_damaged_last_pt_names_its_previous_and_a_previous_names_no_itself(tmp_path):
    state = {"model": {"w": torch.zeros(2)}, "optimizer": {}, "step": 1, "config": {}, "rng": {}}
    save_checkpoint(state, str(tmp_path))
    save_checkpoint(dict(state, step=2), str(tmp_path))
    for name in (LAST, PREVIOUS):
        (tmp_path / name).write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(CheckpointError, match=f"resume from the previous checkpoint {tmp_path / PREVIOUS}"):
        load_checkpoint(str(tmp_path / LAST))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(tmp_path / PREVIOUS))
    assert str(info.value).count(PREVIOUS) == 1 and "give a readable checkpoint file" in str(info.value)


def test_a_folder_is_not_reported_missing(run, tmp_path, capsys):
    data, out = run
    with pytest.raises(CheckpointError, match=rf"'{out}' is a folder; give the checkpoint file in it, e.g. {out}/last.pt"):
        load_checkpoint(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "checkpoint-2.pt").write_bytes(b"x")
    (empty / "checkpoint-10.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"is a folder; give the checkpoint file in it, e.g. .*checkpoint-10\.pt"):
        load_checkpoint(str(empty))
    capsys.readouterr()
    assert main(fast_args(str(tmp_path / "new"), data, resume=out)) == 2
    err = capsys.readouterr().err
    assert f"--resume: checkpoint '{out}' is a folder; give the checkpoint file in it, e.g. {out}/last.pt" in err
    assert "does not exist" not in err and "Traceback" not in err


def test_an_exported_backbone_is_named_as_such(run, tmp_path):
    data, out = run
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(os.path.join(out, "backbone.pth"))
    text = str(info.value)
    assert "is an exported backbone" in text and f"{out}/last.pt" in text and "energy head" in text
    sd = torch.load(os.path.join(out, "backbone.pth"), weights_only=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="is a .safetensors export .*training checkpoint"):
        load_checkpoint(str(tmp_path / "model.safetensors"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")  # not a ViT: the plain message
    with pytest.raises(CheckpointError, match="no 'fastebm-train-checkpoint' marker"):
        load_checkpoint(str(tmp_path / "other.pt"))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

"""Checkpoint files: atomic rotation, weights_only loading, damaged files, RNG round trip."""
import os
import random

import numpy as np
import pytest
import torch

from fastebm.checkpoint import LAST, PREVIOUS, find_resume_checkpoint, load_checkpoint, save_checkpoint
from fastebm.errors import CheckpointError
from fastebm.train.rng import capture_rng_state, restore_rng_state


def _state(step):
    return {"model": {"w": torch.randn(3, 5)}, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "step": step, "config": {"seed": 1, "tasks": ["mim"]}, "rng": capture_rng_state()}


def test_save_rotates_and_loads_weights_only(tmp_path):
    first, second = _state(3), _state(7)
    save_checkpoint(first, str(tmp_path))
    save_checkpoint(second, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([LAST, PREVIOUS])  # no temp file left behind
    last = torch.load(tmp_path / LAST, weights_only=True)
    prev = torch.load(tmp_path / PREVIOUS, weights_only=True)
    assert last["step"] == 7 and prev["step"] == 3
    assert torch.equal(last["model"]["w"], second["model"]["w"]) and torch.equal(prev["model"]["w"], first["model"]["w"])


def test_truncated_checkpoint_names_the_file(tmp_path):
    save_checkpoint(_state(5), str(tmp_path))
    path = tmp_path / LAST
    data = path.read_bytes()
    path.write_bytes(data[: random.randint(10, len(data) // 2)])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(str(path))


def test_foreign_file_is_rejected(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.randn(2)}, path)
    with pytest.raises(CheckpointError, match="not a fastebm training checkpoint"):
        load_checkpoint(str(path))


@pytest.mark.parametrize("content", [b"step,loss\n1,0.5\n", bytes(range(7, 200)), b"{\"model\": 1}"])
def test_a_file_that_is_no_pytorch_file_is_named_as_such(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint at all") as info:
        load_checkpoint(str(path))
    assert str(path) in str(info.value) and "truncated" not in str(info.value)


def test_auto_falls_back_to_previous_with_warning(tmp_path):
    save_checkpoint(_state(4), str(tmp_path))
    save_checkpoint(_state(8), str(tmp_path))
    (tmp_path / LAST).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.warns(UserWarning) as record:
        state, path = find_resume_checkpoint(str(tmp_path))
    assert path.endswith(PREVIOUS) and state["step"] == 4
    messages = " | ".join(str(w.message) for w in record)
    assert "unreadable" in messages and "fallback checkpoint" in messages and LAST in messages


def test_auto_with_nothing_usable(tmp_path):
    assert find_resume_checkpoint(str(tmp_path)) == (None, None)
    (tmp_path / LAST).write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resume_checkpoint(str(tmp_path))


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(random.randint(0, 2 ** 31))
    np.random.seed(random.randint(0, 2 ** 31))
    random.random()
    state = capture_rng_state()
    save_checkpoint({**_state(1), "rng": state}, str(tmp_path))  # building the state draws random numbers
    restore_rng_state(state)
    expect = (torch.rand(4), np.random.rand(3), random.random(), np.random.randn())
    restore_rng_state(load_checkpoint(str(tmp_path / LAST))["rng"])
    got = (torch.rand(4), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1])
    assert expect[2] == got[2] and expect[3] == got[3]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask_not_mkstemp(tmp_path, umask):
    """mkstemp creates 0600 files; checkpoints get 0666 & ~umask like any other output."""
    from fastebm.eval.export import export_backbone
    from fastebm import create_model

    old = os.umask(umask)
    try:
        save_checkpoint(_state(1), str(tmp_path))
        save_checkpoint(_state(2), str(tmp_path))  # the first becomes last.prev.pt
        export_backbone(create_model("vit_demo", img_size=16), str(tmp_path / "backbone.pth"))
        with open(tmp_path / "plain.txt", "w") as fh:  # what open() gives under this umask
            fh.write("x")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert os.stat(tmp_path / "plain.txt").st_mode & 0o777 == expected
    for name in (LAST, PREVIOUS, "backbone.pth"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == expected, name


def test_another_tools_checkpoint_is_named_for_what_it_is(tmp_path):
    """An MAE-style file (pickled argparse.Namespace) is complete: not 'truncated or corrupt'."""
    import argparse

    path = tmp_path / "checkpoint-399.pth"
    torch.save({"model": {"w": torch.randn(3)}, "args": argparse.Namespace(lr=1e-3), "epoch": 399}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))
    text = str(info.value)
    assert "not a fastebm training checkpoint" in text and "argparse.Namespace" in text and str(path) in text
    assert "truncated" not in text and PREVIOUS not in text


def test_atomic_write_failure_names_the_path_and_leaves_no_temp_file(tmp_path):
    import errno

    from fastebm.files import atomic_write
    from fastebm.errors import OutputError

    target = tmp_path / "summary.json"
    target.write_bytes(b"old")

    def disk_full(fh):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=f"cannot write {target}: No space left on device"):
        atomic_write(str(target), disk_full)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["summary.json"]
    with pytest.raises(OutputError, match="cannot write"):
        atomic_write(str(tmp_path / "gone" / "x.json"), lambda fh: fh.write(b"x"))
    assert isinstance(OutputError("x"), OSError)  # callers catching OSError keep working

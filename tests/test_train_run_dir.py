"""--output_dir: a finished run survives typos and reruns; unwritable folders are one line, exit 2."""
import errno
import os

import pytest
import torch

from test_train_helpers import fast_args, make_image_folder, read_summary
from fastebm.checkpoint import load_checkpoint
from fastebm.cli.train import main


def _snapshot(folder):
    """{relative path: bytes} of every file under ``folder`` (and every folder, as None)."""
    out = {}
    for here, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(here, d), folder)] = None
        for f in files:
            path = os.path.join(here, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def _one_error_line(capsys):
    """The one error line on stderr (warnings may precede it), without a traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastebm-train: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_a_finished_run_is_never_touched_by_a_bad_start(tmp_path, capsys):
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    make_image_folder(data, n=12)
    assert main(fast_args(out, data, max_steps=2, save_every=1)) == 0
    before = _snapshot(out)
    assert {"last.pt", "last.prev.pt", "metrics.jsonl", "config.yaml", "summary.json"} <= set(before)
    capsys.readouterr()

    bad_starts = [
        (dict(attn_backend="mathh"), "mathh"),  # refused by the parser
        (dict(resume="auto", batch_size=64), "--batch_size"),  # known after the data scan (12 images)
        (dict(resume="auto", energy="linear"), "does not fit"),  # known after loading the checkpoint
        (dict(resume="auto", model="vit_tiny_patch16", img_size=16), "trained with --model vit_demo (this run: vit_tiny_patch16)"),
        (dict(overwrite="true", batch_size=64), "--batch_size"),  # --overwrite deletes only once all checks pass
        (dict(overwrite="true", resume="auto"), "--overwrite and --resume"),
    ]
    for over, needle in bad_starts:
        assert main(fast_args(out, data, max_steps=3, **over)) == 2, over
        assert needle in _one_error_line(capsys), over
        assert _snapshot(out) == before, over

    # started again without --resume: refused, naming both ways out
    assert main(fast_args(out, data, max_steps=3)) == 2
    line = _one_error_line(capsys)
    assert "holds a run" in line and "--resume auto" in line and "--overwrite" in line
    assert _snapshot(out) == before

    # --overwrite: a new run from scratch; nothing of the old one is left to mix with it
    assert main(fast_args(out, data, max_steps=1, overwrite="true")) == 0
    assert not os.path.exists(os.path.join(out, "last.prev.pt"))
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == 1
    assert read_summary(out)["step"] == 1
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        assert [line.count('"step": 1,') for line in fh] == [1]
    with open(os.path.join(out, "config.yaml")) as fh:
        assert "overwrite" not in fh.read()  # a config.yaml given back to --config never overwrites by itself
    # the earlier run's TensorBoard events went too: one curve, the new run's
    assert len([n for n in os.listdir(os.path.join(out, "tb")) if n.startswith("events.out.tfevents.")]) == 1


def _unwritable_cases(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = {"existing file": (str(a_file), "is an existing file"),
             "under a file": (str(a_file / "run"), "is a file, not a folder")}
    return a_file, cases


@pytest.mark.parametrize("case", ["existing file", "under a file"])
def test_output_dir_that_is_or_lies_under_a_file(tmp_path, capsys, case):
    data = str(tmp_path / "data")
    make_image_folder(data, n=8)
    a_file, cases = _unwritable_cases(tmp_path)
    path, needle = cases[case]
    assert main(fast_args(path, data, max_steps=1)) == 2
    line = _one_error_line(capsys)
    assert needle in line and path in line
    assert a_file.read_text() == "not a folder"


def test_read_only_output_dir(tmp_path, capsys, monkeypatch):
    data = str(tmp_path / "data")
    make_image_folder(data, n=8)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            # root: chmod cannot make a folder read-only for this process; what os.access would say on a
            # read-only mount (EROFS) or for another user is simulated, the rest of the path is real
            assert os.geteuid() == 0
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(ro)
                                else real_access(p, mode, **kw))
        monkeypatch.chdir(tmp_path)
        for target, needle in ((ro, "is not writable"), (ro / "run", "would be created in"), ("ro", "'ro' is not")):
            assert main(fast_args(str(target), data, max_steps=1)) == 2
            line = _one_error_line(capsys)
            assert needle in line and str(target) in line and "read-only or no permission" in line
        assert os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o755)


def test_a_write_failing_later_names_the_path(tmp_path, capsys, monkeypatch):
    """Disk full while writing a checkpoint: one line naming last.pt, exit 2, the old checkpoint intact."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_image_folder(data, n=8)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(fast_args(out, data, max_steps=1)) == 2
    line = _one_error_line(capsys)
    assert os.path.join(out, "last.pt") in line and "No space left on device" in line
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]  # no temporary file left behind


@pytest.mark.parametrize("flags", [{}, {"resume": "auto"}, {"overwrite": "true"}])
def test_another_commands_results_are_refused_whatever_the_flags(tmp_path, capsys, flags):
    """fastebm-eval's folders hold a metrics.jsonl, which looks like a run: --resume auto would start from
    scratch over it and --overwrite would delete its summary. A k-NN run's real folder, and an interrupted
    fine-tuning's checkpoint.pt, are refused and left byte for byte; fastebm-train's own finished run is not."""
    from fastebm.cli.eval import main as eval_main

    data = str(tmp_path / "data")
    make_image_folder(data, n=12)
    knn = str(tmp_path / "knn")
    assert eval_main(["knn", "--init", "random", "--k", "3", "--few_shot", "2", "--output_dir", knn]) == 0
    capsys.readouterr()
    ft = tmp_path / "ft_killed"
    ft.mkdir()
    (ft / "checkpoint.pt").write_bytes(os.urandom(64))
    (ft / "metrics.jsonl").write_text('{"epoch": 1, "top1": 0.5}\n')
    for out, needle in ((knn, "another command's results (its summary.json names command 'knn')"),
                        (str(ft), "a fastebm-eval finetune run (checkpoint.pt)")):
        before = _snapshot(out)
        assert main(fast_args(out, data, max_steps=1, **flags)) == 2
        line = _one_error_line(capsys)
        assert needle in line and "give another --output_dir" in line, line
        assert _snapshot(out) == before
    own = str(tmp_path / "own")
    assert main(fast_args(own, data, max_steps=1)) == 0
    assert main(fast_args(own, data, max_steps=2, **flags)) == (2 if not flags else 0)

"""The one table from errors to exit codes (fastebm/cli/_run.py) and every command's use of it."""
import errno
import importlib

import pytest

from fastebm.cli import COMMANDS
from fastebm.cli._run import run
from fastebm.errors import (CheckpointError, DataError, DistributedFailure, DistributedSetupError, FastEBMError,
                            OutputError, TrainingDiverged, UsageError)
from fastebm.tools import ToolInputError


def _raises(exc):
    def body():
        raise exc
    return body


@pytest.mark.parametrize("exc, code", [
    (UsageError("bad --x"), 2), (ToolInputError("no images"), 2), (DataError("empty folder"), 2),
    (CheckpointError("truncated"), 2), (OutputError("cannot write o"), 2), (DistributedSetupError("no backend"), 2),
    (TrainingDiverged("nan loss"), 3), (DistributedFailure("rank 1 died"), 1),
])
def test_each_error_class_has_its_exit_code_and_one_line(exc, code, capsys):
    assert run("prog-x", _raises(exc)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"prog-x: error: {exc}"]


def test_escape_sequences_and_line_breaks_become_one_plain_line(capsys):
    assert run("prog-x", _raises(DataError("\x1b[31mred\x1b[0m text\nsecond\tline\x07"))) == 2
    assert capsys.readouterr().err == "prog-x: error: red text second line\n"


def test_os_error_naming_a_file_is_one_line_other_errors_keep_their_traceback(capsys):
    gone = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/a.png")
    assert run("prog-x", _raises(gone)) == 2
    assert capsys.readouterr().err == "prog-x: error: cannot access /data/a.png: No such file or directory\n"
    moved = OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")
    assert run("prog-x", _raises(moved)) == 2
    assert "cannot access /a -> /b: Invalid cross-device link" in capsys.readouterr().err
    for bug in (ConnectionResetError(errno.ECONNRESET, "reset"), KeyError("x"), FastEBMError("unmapped")):
        with pytest.raises(type(bug)):
            run("prog-x", _raises(bug))


def test_an_error_raised_in_a_loader_worker_keeps_only_its_own_message(capsys):
    """torch re-raises a DataLoader worker's exception with the worker's traceback as the message."""
    import torch

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise DataError(f"image {i} of /data/x.png is truncated; remove it or fix it")

    def body():
        next(iter(torch.utils.data.DataLoader(Broken(), batch_size=2, num_workers=1)))

    assert run("prog-x", body) == 2
    assert capsys.readouterr().err == "prog-x: error: image 0 of /data/x.png is truncated; remove it or fix it\n"


def test_summary_status_and_system_exit(capsys):
    assert run("prog-x", lambda: {"status": "interrupted_sigint"}) == 130
    assert run("prog-x", lambda: {"status": "interrupted_sigterm"}) == 0
    assert run("prog-x", lambda: {"status": "completed"}) == 0 and run("prog-x", lambda: None) == 0
    assert run("prog-x", _raises(SystemExit(0))) == 0 and run("prog-x", _raises(SystemExit(None))) == 0
    assert capsys.readouterr().err == ""


def test_warnings_get_the_command_prefix():
    import warnings

    assert run("prog-y", lambda: None) == 0
    assert warnings.formatwarning("careful", UserWarning, "lib.py", 7) == "prog-y: warning: careful\n"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_turns_a_bad_flag_into_one_line_and_exit_2(command, capsys):
    module = importlib.import_module(COMMANDS[command])
    argv = (["knn"] if command == "eval" else []) + ["--no_such_flag_here", "1"]
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{module.PROG}: error: ") and "(see --help)" in err[0], err
    assert module.main(["--help"] if command != "eval" else ["knn", "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32), str(2 ** 64)])
@pytest.mark.parametrize("command, argv", [
    ("train", []), ("eval", ["finetune", "--init", "random"]), ("eval", ["knn", "--init", "random"]),
    ("restore", ["--ckpt", "missing.pt", "builtin:digits"]), ("score", []),
])
def test_every_seed_out_of_range_is_one_line_and_nothing_is_written(command, argv, seed, capsys, tmp_path):
    module = importlib.import_module(COMMANDS[command])
    out = tmp_path / "out"
    out_flag = ["-o", str(out)] if command in ("restore", "score") else ["--output_dir", str(out)]
    assert module.main(argv + ["--seed", seed] + out_flag) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{module.PROG}: error: --seed must be a whole number in [0, 2**32), got {seed}"]
    assert not out.exists()


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    assert run("prog-x", _raises(KeyboardInterrupt())) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prog-x: error: stopped by Ctrl-C (SIGINT)")


def test_sigint_during_a_knn_run_is_one_line_and_exit_130(tmp_path):
    """A real SIGINT part-way through ``fastebm-eval knn`` (no step boundaries): no traceback, 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "knn"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastebm", "eval", "knn", "--init", "random", "--output_dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not out.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # the run has started (its output folder exists) and is extracting features
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("fastebm-eval: error: stopped by Ctrl-C"), err

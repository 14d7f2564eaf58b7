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

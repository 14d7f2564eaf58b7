"""CPU thread defaults: --threads, OMP_NUM_THREADS (the user's, not torchrun's), cores // local processes,
and OMP_WAIT_POLICY=PASSIVE for the training command only."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastebm import threads
from fastebm.cli.train import main
from fastebm.train.config import parse_config


@pytest.fixture
def cores(monkeypatch):
    n = int(torch.randint(3, 65, (1,)))
    monkeypatch.setattr(threads, "usable_cores", lambda: n)
    return n


def test_explicit_flag_wins(cores):
    k = int(torch.randint(1, 9, (1,)))
    assert threads.resolve_threads(k, 4, env={"OMP_NUM_THREADS": "3"})[0] == k


def test_users_omp_num_threads_stands(cores):
    n, why = threads.resolve_threads(None, 2, env={"OMP_NUM_THREADS": "3"})
    assert n is None and "OMP_NUM_THREADS=3" in why


@pytest.mark.parametrize("local_world", [1, 2, 3, 100])
def test_auto_is_cores_over_local_processes(cores, local_world):
    n, why = threads.resolve_threads(None, local_world, env={})
    assert n == max(1, cores // local_world) and "auto" in why


def test_usable_cores_is_within_the_affinity_mask():
    n = threads.usable_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


# A parent process that sets OMP_NUM_THREADS=1 at run time, as torchrun does, then starts a worker.
_PARENT = textwrap.dedent("""
    import os, subprocess, sys
    os.environ.update(OMP_NUM_THREADS="1", TORCHELASTIC_RUN_ID="test")
    child = "from fastebm import threads; threads.usable_cores = lambda: 8; print(threads.resolve_threads(None, 2)[0])"
    sys.exit(subprocess.run([sys.executable, "-c", child]).returncode)
""")


@pytest.mark.parametrize("user_set", [False, True])
def test_torchruns_default_is_replaced_the_users_kept(user_set):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID")}
    if user_set:
        env["OMP_NUM_THREADS"] = "1"  # in the environment the "torchrun" parent starts with: the user's
    out = subprocess.run([sys.executable, "-c", _PARENT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("None" if user_set else "4")


@pytest.mark.parametrize("argv, expected", [
    (["/usr/bin/python3", "/venv/bin/fastebm-train", "--max_steps", "3"], True),
    (["python", "-m", "fastebm", "train", "--eval", "false"], True),
    (["python", "-u", "-m", "fastebm", "train"], True),  # torchrun's worker command
    (["python", "-m", "fastebm.cli.train"], True),
    (["python", "-m", "fastebm", "--help"], False),
    (["python", "-m", "pytest", "tests"], False),
    (["python", "-c", "import fastebm"], False),
    (["python", "my_script.py", "train"], False),
])
def test_training_command_detection(argv, expected):
    assert threads.is_training_command(argv) is expected


def _wait_policy_in_child(code_argv, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_extra or {})
    code = (f"import sys; sys.orig_argv = {code_argv!r}\n"
            "import fastebm, os; print(os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_passive_wait_for_the_training_command_only():
    assert _wait_policy_in_child(["python", "-m", "fastebm", "train"]) == "PASSIVE"
    assert _wait_policy_in_child(["python", "-m", "fastebm", "train"], {"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    assert _wait_policy_in_child(["python", "-c", "import fastebm"]) == "None"  # a library user: untouched


def test_prefer_passive_wait_never_after_torch_is_loaded():
    env = {}
    assert "torch" in sys.modules
    assert not threads.prefer_passive_wait(["python", "-m", "fastebm", "train"], env) and env == {}


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_bad_threads_flag_exits_2(value, capsys):
    assert main(["--threads", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0] and "auto" in err[0]


def test_threads_flag_values():
    assert parse_config([]).threads == "auto"
    assert parse_config(["--threads", " AUTO "]).threads == "auto"
    assert parse_config(["--threads", "3"]).threads == "3"


def test_configure_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    k = int(torch.randint(1, 4, (1,)))
    try:
        assert threads.configure_threads(k) == k == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

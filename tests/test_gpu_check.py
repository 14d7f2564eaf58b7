"""benchmarks/gpu_check.sh in its CPU dry run (what CI can run): it keeps to its deadline, leaves at
most 4 files, prints the summary last, and a SIGTERM half-way still leaves a summary of the steps
that finished. Small deadlines keep both tests near a minute on a loaded 2-core machine."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STATUSES = {"ok", "failed", "timeout", "skipped", "interrupted"}


def dry_run_env(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", GPU_CHECK_COMMIT="0123abc-test",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    env.pop("OUT", None)
    return env


def read_summary(out):
    return json.loads((out / "summary.json").read_text())


def test_dry_run_keeps_its_deadline_and_reports_every_table(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / "torch_extensions" / "fastebm_corrupt_ext" / "lock"  # left by a killed JIT build
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    deadline = 90
    t0 = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--deadline", str(deadline), str(out)], cwd=ROOT,
                          env=dry_run_env(tmp_path), capture_output=True, text=True, timeout=deadline + 120)
    elapsed = time.monotonic() - t0
    assert elapsed < deadline + 15, f"took {elapsed:.0f} s for a {deadline} s deadline\n{proc.stdout[-3000:]}"
    assert sorted(os.listdir(out)) == ["gpu_check_detail.tar.gz", "summary.json", "summary.md"]
    md = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(md.rstrip()), "summary.md is not what was printed last"

    s = read_summary(out)
    run = s["run"]
    assert run["final"] and run["mode"] == "cpu-dry-run" and run["commit"] == "0123abc-test"
    assert run["exit_code"] == proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = {st["name"]: st for st in s["steps"]}
    assert all(st["status"] in STATUSES for st in steps.values())
    assert steps["env"]["status"] == "ok" and steps["install"]["status"] == "skipped"
    assert steps["bench_attention"]["status"] == "ok", steps["bench_attention"]
    priority_ok = all(st["status"] == "ok" for n, st in steps.items() if st["priority"] == "priority" and n != "install")
    assert (proc.returncode == 0) == (priority_ok and not any(st["status"] in ("failed", "timeout") for st in steps.values()))
    assert not stale.exists(), "the stale torch_extensions lock was not removed"

    # every benchmark that finished has its table in summary.md, rendered from its streamed rows
    headings = {"bench_attention": "### Attention", "bench_corrupt": "### Corruption",
                "bench_train_step": "### Training step"}
    for step, heading in headings.items():
        if steps.get(step, {}).get("status") == "ok":
            assert heading in md and step.replace("bench_", "") in s["benchmarks"], step
    for impl in ("SDPA math, PyTorch default", "SDPA math, bf16 reductions", "xformers"):
        assert impl in md
    cuda_only = {"tests_kernels", "tests_corrupt", "tests_engines", "tests_cuda_rest", "tests_distributed"}  # -m cuda
    for name, t in s["tests"].items():  # no test fails on a CPU; the -m cuda selections are skipped, not run
        if steps[name]["status"] == "ok":
            assert t["counts"]["FAILED"] == t["counts"]["ERROR"] == 0, t
            if name in cuda_only:
                assert t["counts"]["SKIPPED"] > 0 and t["counts"]["PASSED"] == 0, t
    with tarfile.open(out / "gpu_check_detail.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"gpu_check/steps.tsv", "gpu_check/env.json", "gpu_check/logs/env.log",
            "gpu_check/rows/attention.jsonl"} <= names


def test_sigterm_after_the_first_step_still_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", SCRIPT, "--dry-run", "--deadline", "200", str(out)], cwd=ROOT,
                            env=dry_run_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        finished = []
        deadline = time.monotonic() + 120
        while not finished and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                finished = [st["name"] for st in read_summary(out)["steps"] if st["status"] == "ok"]
            except (OSError, ValueError):  # not written yet
                pass
        assert finished, "no step finished within 120 s"
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stdout[-3000:]
    assert len(os.listdir(out)) <= 4
    s = read_summary(out)
    assert s["run"]["final"] and s["run"]["interrupted"] == "SIGTERM" and s["run"]["exit_code"] == 143
    status = {st["name"]: st["status"] for st in s["steps"]}
    assert all(status[name] == "ok" for name in finished), status
    stopped = [st for st in s["steps"] if st["status"] == "interrupted"]  # the step running at the signal, if any
    assert len(stopped) <= 1 and all(st["note"] == "stopped by SIGTERM" for st in stopped), stopped
    md = (out / "summary.md").read_text()
    assert "INTERRUPTED by SIGTERM" in md and all(f"| {name} |" in md for name in finished)
    assert stdout.rstrip().endswith(md.rstrip())

"""gpu_check.sh's report: ``summary.md``, ``summary.json`` and ``gpu_check_detail.tar.gz`` in OUT.

Standard library only (it runs after every step, and must work when torch does not import).
It reads gpu_check.sh's work folder: ``steps.tsv`` (one line per finished step: name, priority,
type, status, exit code, start offset s, seconds, cap s, note), ``env.json`` (``_bench.py env``),
``logs/<step>.log``, ``rows/*.jsonl`` (the benchmarks' streamed rows), and renders every table from
those, so a run that was stopped half-way still reports what finished. Every file is written
atomically (temporary file + rename).

    python3 benchmarks/gpu_check_summary.py --work WORK --out OUT --mode gpu --t0 EPOCH_S ...
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import tarfile
import time

from _tables import attention_markdown, corrupt_markdown, fmt, train_step_markdown

STEP_FIELDS = ("name", "priority", "type", "status", "rc", "start_s", "seconds", "cap_s", "note")
TEST_LINE = re.compile(r"^(\S+::\S+?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
TEST_STARTED = re.compile(r"^(tests/\S+::\S+)\s*$")
COLLECT_ERROR = re.compile(r"^ERROR (\S+\.py)\b(?: - (.*))?$")
DURATION = re.compile(r"^\s*([\d.]+)s (call|setup|teardown)\s+(\S+::\S+)")
RESULT_LINE = re.compile(r"^=+ (.*(?:passed|failed|error|skipped|no tests ran|deselected).*) =+$")
DETAIL_NAME = "gpu_check_detail.tar.gz"


def read_steps(work: str) -> list:
    steps = []
    path = os.path.join(work, "steps.tsv")
    if os.path.exists(path):
        for line in open(path, errors="replace"):
            parts = line.rstrip("\n").split("\t")
            if len(parts) == len(STEP_FIELDS):
                step = dict(zip(STEP_FIELDS, parts))
                for key in ("rc", "start_s", "seconds", "cap_s"):
                    step[key] = int(step[key]) if step[key].lstrip("-").isdigit() else None
                steps.append(step)
    return steps


def read_jsonl(paths) -> tuple:
    """``(first meta dict, rows)`` from JSONL files; a torn last line (killed writer) is skipped."""
    meta, rows = None, []
    for path in paths:
        for line in open(path, errors="replace"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "meta" in obj:
                meta = meta or obj["meta"]
            elif isinstance(obj, dict):
                rows.append(obj)
    return meta, rows


def parse_pytest_log(text: str) -> dict:
    """Per-test outcomes from a ``pytest -v -rA`` log, including a log cut off mid-run."""
    outcomes, durations, result, running = {}, [], None, None
    for line in text.splitlines():
        m = TEST_LINE.match(line)
        if m:
            outcomes[m.group(1)] = m.group(2)
            running = None
            continue
        m = TEST_STARTED.match(line)
        if m:
            running = m.group(1)
            continue
        m = COLLECT_ERROR.match(line)
        if m:
            outcomes[m.group(1)] = "ERROR"
            continue
        m = DURATION.match(line)
        if m:
            durations.append((float(m.group(1)), m.group(2), m.group(3)))
            continue
        m = RESULT_LINE.match(line.strip())
        if m:
            result = m.group(1)
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return dict(counts=counts, failing=sorted(t for t, v in outcomes.items() if v in ("FAILED", "ERROR")),
                running_when_stopped=running, result_line=result, durations=durations)


def last_line(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4000))
        lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def collect(args) -> dict:
    work = args.work
    env = {}
    if os.path.exists(os.path.join(work, "env.json")):
        try:
            env = json.load(open(os.path.join(work, "env.json")))
        except ValueError:
            env = {"error": "env.json unreadable"}
    steps = read_steps(work)
    tests = {}
    for step in steps:
        log = os.path.join(work, "logs", step["name"] + ".log")
        step["last_line"] = last_line(log)
        if step["type"] == "tests" and os.path.exists(log):
            tests[step["name"]] = parse_pytest_log(open(log, errors="replace").read())
    rows = os.path.join(work, "rows")
    benches = {}
    for name, pattern in (("attention", "attention*.jsonl"), ("corrupt", "corrupt*.jsonl"),
                          ("train_step", "train_step*.jsonl"), ("compile_check", "compile_check*.jsonl")):
        paths = sorted(glob.glob(os.path.join(rows, pattern)))
        if paths:
            meta, found = read_jsonl(paths)
            benches[name] = dict(meta=meta, rows=found)
    now = int(time.time())
    run = dict(mode=args.mode, commit=args.commit, deadline_s=args.deadline, elapsed_s=now - args.t0,
               final=args.final, exit_code=args.exit_code if args.final else None, interrupted=args.interrupted,
               error=args.error, cleared_env=[v for v in (args.cleared_env or "").split() if v],
               date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)), detail=DETAIL_NAME)
    return dict(run=run, env=env, steps=steps, tests=tests, benchmarks=benches)


def _result_word(run: dict) -> str:
    if not run["final"]:
        return "RUNNING (partial summary, refreshed after every step)"
    if run["interrupted"]:
        return f"INTERRUPTED by {run['interrupted']} (exit {run['exit_code']})"
    return ("PASS" if run["exit_code"] == 0 else "FAIL") + f" (exit {run['exit_code']})"


def to_markdown(s: dict) -> str:
    run, env = s["run"], s["env"]
    lines = ["# gpu_check summary", "", f"- result: **{_result_word(run)}**"]
    if run["error"]:
        lines.append(f"- error: {run['error']}")
    lines += [
        f"- mode: {run['mode']}; device: {env.get('device', '?')} {env.get('capability', '')}; "
        f"nvidia-smi: {env.get('nvidia_smi', '—')}",
        f"- torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, python {env.get('python')}, "
        f"xformers {env.get('xformers') or 'not installed'}, pytest-timeout {env.get('pytest_timeout') or 'not installed'}",
        f"- date: {run['date']}; commit: {run['commit']}; host: {env.get('host', '?')}",
        f"- time: {run['elapsed_s']} s of a {run['deadline_s']} s deadline",
    ]
    if run["cleared_env"]:
        lines.append(f"- cleared from the environment: {', '.join(run['cleared_env'])}")
    lines += ["", "## Steps", "", "| step | priority | status | seconds | cap s | note / last log line |",
              "|---|---|---|---:|---:|---|"]
    for st in s["steps"]:
        note = st["note"] if st["note"] else st.get("last_line", "")
        lines.append(f"| {st['name']} | {st['priority']} | {st['status']} | {fmt(st['seconds'], 'd')} | "
                     f"{fmt(st['cap_s'], 'd')} | {str(note).replace('|', '/')[:200]} |")
    if s["tests"]:
        lines += ["", "## Tests", "", "| step | passed | failed | errors | skipped | pytest's last line | "
                  "running when stopped | failing tests |", "|---|---:|---:|---:|---:|---|---|---|"]
        durations = []
        for name, t in s["tests"].items():
            c = t["counts"]
            failing = ", ".join(t["failing"][:10]) + (" ..." if len(t["failing"]) > 10 else "")
            lines.append(f"| {name} | {c['PASSED']} | {c['FAILED']} | {c['ERROR']} | {c['SKIPPED']} | "
                         f"{t['result_line'] or '—'} | {t['running_when_stopped'] or ''} | {failing} |")
            durations += [d for d in t["durations"] if d[0] >= 0.1]
        if durations:
            lines += ["", "Slowest test phases:", ""] + [
                f"- {d:.1f} s {phase} {node}" for d, phase, node in sorted(durations, reverse=True)[:8]]
    b = s["benchmarks"]
    renderers = (("attention", attention_markdown), ("corrupt", corrupt_markdown), ("train_step", train_step_markdown))
    for key, render in renderers:
        if key in b:
            lines += ["", render(b[key]["meta"], b[key]["rows"]).rstrip()]
    if "compile_check" in b:
        lines += ["", compile_check_markdown(b["compile_check"]["rows"]).rstrip()]
    lines += ["", f"Detail (every log, JSONL row file, JSON/Markdown report): `{run['detail']}`.", ""]
    return "\n".join(lines)


def compile_check_markdown(rows: list) -> str:
    lines = ["### Kernels compiled ahead of time (compile_check.py, the JIT's specialisation)", "",
             "| arch | dtype | d | kernel | M | N | warps | stages | mma | shared KB | regs | spill B |",
             "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| sm_{r['arch']} | {r['dtype']} | {r['head_dim']} | {r['kernel']} | {r['error'][:120]} |||||||")
            continue
        c = r["config"]
        lines.append(f"| sm_{r['arch']} | {r['dtype']} | {r['head_dim']} | {r['kernel']} | {c['BLOCK_M']} | {c['BLOCK_N']} | "
                     f"{c['num_warps']} | {c['num_stages']} | {r['mma']} | {r['shared'] // 1024} | {r['registers']} | "
                     f"{r['spill_bytes']} |")
    return "\n".join(lines) + "\n"


def _atomic(path: str, write) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_all(args, summary: dict) -> str:
    md = to_markdown(summary)

    def text(content):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(content)
        return write

    def tarball(tmp):
        with tarfile.open(tmp, "w:gz") as tar:
            for entry in sorted(os.listdir(args.work)):
                if entry not in ("site", "torch_extensions"):  # installed wheels, build trees
                    tar.add(os.path.join(args.work, entry), arcname=os.path.join("gpu_check", entry))

    _atomic(os.path.join(args.out, DETAIL_NAME), tarball)
    _atomic(os.path.join(args.out, "summary.json"), text(json.dumps(summary, indent=2, default=str)))
    _atomic(os.path.join(args.out, "summary.md"), text(md))
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="gpu")
    p.add_argument("--t0", type=int, default=int(time.time()))
    p.add_argument("--deadline", type=int, default=None)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--final", action="store_true", help="the run is over: record the exit code, print summary.md")
    p.add_argument("--exit-code", type=int, default=None)
    p.add_argument("--interrupted", default=None, help="the signal that stopped the run")
    p.add_argument("--error", default=None)
    p.add_argument("--cleared-env", default="")
    args = p.parse_args(argv)
    md = write_all(args, collect(args))
    if args.final:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""CPU thread settings under contention: one ``fastebm-train`` run alone, and two side by side.

Each configuration is a name, environment variables and extra flags. For every repetition and
configuration the script times (wall clock, and the children's user+system CPU seconds) one run
alone, then two identical runs started together (each its own fresh ``--output_dir``), and records
the 1-minute load average before each. The report gives the medians over repetitions.

Usage (the measurements in docs/training.md, "Threads"):

    python benchmarks/bench_threads.py --reps 3 --out /tmp/threads \\
        --config 'default;;' --config 'omp1;OMP_NUM_THREADS=1;' --config 'passive;OMP_WAIT_POLICY=PASSIVE;'
    python benchmarks/bench_threads.py --pythonpath /tmp/main_src ...   # measure another copy of the code

A configuration is ``NAME;ENV=VALUE,ENV=VALUE;--flag value --flag value[;REPS]`` (empty parts
allowed; REPS caps that configuration's repetitions below --reps, for very slow ones).
Every run is ``nice -n NICE python -m fastebm train --max_steps N --demo_eval false --output_dir DIR``
plus the configuration's flags, so all runs share one nice level. Timings on a shared machine move
with the other processes' load: compare configurations measured in the same invocation only.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import RowLog, utc_now, write_report  # noqa: E402


def parse_config(text: str) -> Dict:
    parts = (text.split(";") + ["", "", ""])[:4]
    name, envs, flags, reps = (p.strip() for p in parts)
    if not name:
        raise argparse.ArgumentTypeError(f"--config {text!r}: needs a name (NAME;ENV=V,...;--flags)")
    env = {}
    for item in filter(None, (e.strip() for e in envs.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--config {text!r}: {item!r} is not ENV=VALUE")
        env[key] = value
    return {"name": name, "env": env, "flags": shlex.split(flags), "reps": int(reps) if reps else None}


def launch(cfg: Dict, args, out_dir: str) -> subprocess.Popen:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS"):
        if key not in cfg["env"] and args.clean_env:
            env.pop(key, None)
    env.update(cfg["env"])
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cmd = ["nice", "-n", str(args.nice), sys.executable, "-m", "fastebm", "train", "--max_steps", str(args.max_steps),
           "--demo_eval", "false", "--output_dir", out_dir, *cfg["flags"]]
    err = open(out_dir + ".stderr", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    proc.err_file = err
    return proc


def run_together(cfg: Dict, args, n: int, scratch: str, tag: str) -> List[Dict]:
    """Starts ``n`` identical runs at once; returns one row per run (wall s, CPU s, exit code)."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    procs = [launch(cfg, args, os.path.join(scratch, f"{tag}_{i}")) for i in range(n)]
    rows = []
    pending = {p.pid: (i, p) for i, p in enumerate(procs)}
    while pending:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in pending:
            continue
        i, proc = pending.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.err_file.seek(0)
        err = proc.err_file.read()
        proc.err_file.close()
        rows.append({"config": cfg["name"], "mode": "alone" if n == 1 else f"{n} side by side", "run": i,
                     "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                     "returncode": proc.returncode, "load1_before": round(load, 2),
                     "error": err.strip().splitlines()[-1][:200] if proc.returncode else None})
    return rows


def summarise(rows: List[Dict]) -> List[Dict]:
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["mode"]), []).append(r)
    out = []
    for (config, mode), rs in groups.items():
        ok = [r for r in rs if r["returncode"] == 0]
        out.append({"config": config, "mode": mode, "runs": len(rs), "failed": len(rs) - len(ok),
                    "median_wall_s": statistics.median(r["wall_s"] for r in ok) if ok else None,
                    "walls": [r["wall_s"] for r in ok],
                    "median_cpu_s": statistics.median(r["cpu_s"] for r in ok) if ok else None,
                    "median_load1": statistics.median(r["load1_before"] for r in rs)})
    return out


def markdown(report: Dict) -> str:
    meta = report["meta"]
    lines = [f"# `fastebm-train --max_steps {meta['max_steps']} --demo_eval false`: CPU threads under contention", "",
             f"{meta['date']}; {meta['cpus']} CPUs; nice {meta['nice']}; {meta['reps']} repetition(s); "
             f"code: {meta['pythonpath'] or 'installed'}", "",
             "| config | env / flags | mode | median wall s | walls | median CPU s | median load1 before |",
             "|---|---|---|---|---|---|---|"]
    configs = {c["name"]: c for c in meta["configs"]}
    for s in report["summary"]:
        c = configs[s["config"]]
        what = " ".join([f"{k}={v}" for k, v in c["env"].items()] + c["flags"]) or "(defaults)"
        wall = "failed" if s["median_wall_s"] is None else f"{s['median_wall_s']:.1f}"
        cpu = "—" if s["median_cpu_s"] is None else f"{s['median_cpu_s']:.1f}"
        lines.append(f"| {s['config']} | `{what}` | {s['mode']} | {wall} | {', '.join(f'{w:.0f}' for w in s['walls'])} "
                     f"| {cpu} | {s['median_load1']:.1f} |")
    return "\n".join(lines) + "\n"


def summarise_files(paths: List[str], out: str) -> int:
    meta, rows = None, []
    for path in paths:
        with open(path) as fh:
            for line in fh:
                item = json.loads(line)
                if "meta" in item:
                    if meta is None:
                        meta = dict(item["meta"])
                    else:  # several files: keep every configuration, the earliest date
                        known = {c["name"] for c in meta["configs"]}
                        meta["configs"] += [c for c in item["meta"]["configs"] if c["name"] not in known]
                else:
                    rows.append(item)
    meta["reps"] = max(r["rep"] for r in rows) + 1
    report = {"meta": meta, "rows": rows, "summary": summarise(rows)}
    write_report(report, markdown(report), out, "threads_cpu")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=parse_config, action="append", default=[],
                        help="NAME;ENV=VALUE,...;--flags[;REPS] (repeatable)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--side_by_side", type=int, default=2, help="runs started together in the second mode")
    parser.add_argument("--pythonpath", default=None, help="put this source tree first on PYTHONPATH")
    parser.add_argument("--clean_env", type=int, default=1, help="1: unset OMP_*/MKL_* threads unless configured")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "fastebm_bench"))
    parser.add_argument("--rows", default=None, help="also append every row, as it finishes, to this JSONL file")
    parser.add_argument("--summarise", nargs="+", default=None, metavar="ROWS.jsonl",
                        help="no runs: rebuild the report from these --rows files (e.g. of an interrupted run)")
    args = parser.parse_args(argv)
    if args.summarise:
        return summarise_files(args.summarise, args.out)
    if not args.config:
        parser.error("give at least one --config (or --summarise)")
    rowlog = RowLog(args.rows)
    meta = {"date": utc_now(), "cpus": os.cpu_count(), "nice": args.nice, "reps": args.reps,
            "max_steps": args.max_steps, "pythonpath": args.pythonpath, "configs": args.config}
    rowlog.meta(meta)
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as scratch:
        for rep in range(args.reps):
            for cfg in args.config:
                if cfg["reps"] is not None and rep >= cfg["reps"]:
                    continue
                for n in (1, args.side_by_side):
                    for row in run_together(cfg, args, n, scratch, f"{cfg['name']}_{rep}_{n}"):
                        row["rep"] = rep
                        rows.append(row)
                        rowlog.write(row)
                        print(row, flush=True)
    report = {"meta": meta, "rows": rows, "summary": summarise(rows)}
    write_report(report, markdown(report), args.out, "threads_cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

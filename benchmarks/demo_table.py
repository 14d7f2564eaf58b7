"""The demo's results as the Markdown tables of README.md and docs/training.md, from a run's summary.json.

    python benchmarks/demo_table.py --summary fastebm_out/summary.json           # README table
    python benchmarks/demo_table.py --summary fastebm_out/summary.json --style training
    python benchmarks/demo_table.py --run demo_run --threads 2                     # run the demo first

``--run DIR`` runs ``fastebm-train --output_dir DIR`` (the demo's defaults, plus any flags after
``--``) with ``--threads`` CPU threads (OMP_NUM_THREADS; the numbers depend on the thread count,
through floating-point summation order), then prints the tables of its summary.json. A caption
line says what was measured (seed, device, threads, wall time) so the tables can be pasted with it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict, List

# How each demo task is described in the docs' tables (the corruption's parameters in the demo).
TASK_LABELS = {
    "readme": {"mim": "mim (masked patches)", "sort": "sort (shuffled patches)", "sr": "sr (x4)",
               "denoise": "denoise (sigma 0.2)", "colorize": "colorize"},
    "training": {"mim": "mim (masked patches only)", "sort": "sort (shuffled patches)", "sr": "sr (x4)",
                 "denoise": "denoise (sigma 0.2)", "colorize": "colorize (photos; grey digits excluded)"},
}


def _gain(value) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def _acc(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def demo_table(summary: Dict[str, Any], style: str = "readme") -> str:
    """The Markdown table of one demo run's ``summary.json`` (``style``: ``readme`` or ``training``).

    Raises ValueError when the summary has no demo evaluation (a run on --data, or --demo_eval false).
    """
    if "psnr_gain_db" not in summary or "linprobe_acc" not in summary:
        raise ValueError("this summary.json has no demo evaluation (psnr_gain_db, linprobe_acc): "
                         "run the built-in demo with --demo_eval true")
    mean, per_task, probe = summary["psnr_gain_db"], summary.get("psnr_gain_db_per_task", {}), summary["linprobe_acc"]
    labels = TASK_LABELS[style]
    rows: List[str]
    if style == "readme":
        rows = ["| held-out metric | at initialisation | after the demo |", "|---|---|---|",
                f"| PSNR gain of the restoration, mean of {len(per_task)} tasks (dB) | {_gain(mean['init'])} | "
                f"**{_gain(mean['pretrained'])}** |"]
        rows += [f"| &nbsp;&nbsp;{labels.get(t, t)} | {_gain(v['init'])} | {_gain(v['pretrained'])} |"
                 for t, v in per_task.items()]
        rows.append(f"| linear-probe accuracy on digits (frozen features) | {_acc(probe['init'])} | "
                    f"{_acc(probe['pretrained'])} |")
    else:
        rows = ["| | init | pretrained |", "|---|---|---|",
                f"| `psnr_gain_db` (mean of {len(per_task)} tasks) | {_gain(mean['init'])} dB | "
                f"**{_gain(mean['pretrained'])} dB** |"]
        rows += [f"| {labels.get(t, t)} | {_gain(v['init'])} | {_gain(v['pretrained'])} |" for t, v in per_task.items()]
        rows.append(f"| `linprobe_acc` (held-out digits) | {_acc(probe['init'])} | {_acc(probe['pretrained'])} |")
    return "\n".join(rows)


def caption(summary: Dict[str, Any]) -> str:
    """What was measured: command, seed, device, threads, steps, wall time."""
    cfg = summary.get("config", {})
    threads = summary.get("num_threads")
    return (f"Measured with `fastebm-train` (seed {cfg.get('seed', '?')}, {summary.get('device', '?')}, "
            f"{threads if threads is not None else '?'} CPU thread(s), {summary.get('step', '?')} steps, "
            f"{summary.get('wall_time_s', float('nan')):.0f} s wall), held-out images:")


def run_demo(output_dir: str, threads: int, extra: List[str]) -> str:
    """Runs the demo into ``output_dir`` with ``threads`` CPU threads; returns its summary.json path."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "fastebm", "train", "--output_dir", output_dir, *extra]
    print("running:", f"OMP_NUM_THREADS={threads}", " ".join(cmd), file=sys.stderr, flush=True)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise SystemExit(f"demo_table: fastebm-train exited with code {code}")
    return os.path.join(output_dir, "summary.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--summary", help="a demo run's summary.json")
    source.add_argument("--run", metavar="DIR", help="run the demo into DIR first (must not hold a run)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for --run (the docs' numbers: 2)")
    parser.add_argument("--style", choices=sorted(TASK_LABELS), default="readme", help="which document's table")
    parser.add_argument("extra", nargs="*", help="after --: more fastebm-train flags for --run")
    args = parser.parse_args(argv)
    path = run_demo(args.run, args.threads, args.extra) if args.run else args.summary
    try:
        with open(path) as fh:
            summary = json.load(fh)
        table = demo_table(summary, args.style)
    except (OSError, ValueError) as exc:
        print(f"demo_table: error: {path}: {exc}", file=sys.stderr)
        return 2
    print(caption(summary))
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs a list of commands in one Python process (the benchmark's evaluation jobs).

Each command is the argv of a console tool: ``fastebm-eval ...`` (``python -m fastebm eval ...``)
is run through ``fastebm.cli.eval.main``, ``diagnose.py`` and ``train_accuracy.py`` through their ``main``: the same code the
command line runs, without paying Python's and torch's start-up once per command. A command whose
output (its summary.json, or diagnose.py's --out) exists is skipped, so a job can be re-run; the
output folder of one that did not finish is removed and the command runs again from the start.

    python benchmarks/quality/job.py COMMANDS.json
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def output_of(argv):
    flag = "--output_dir" if "--output_dir" in argv else "--out"
    path = argv[argv.index(flag) + 1]
    return os.path.join(path, "summary.json") if flag == "--output_dir" else path


def run_one(argv) -> int:
    if argv[1:4] == ["-m", "fastebm", "eval"]:
        from fastebm.cli.eval import main

        return main(argv[4:])
    script = os.path.basename(argv[1])
    if script in ("diagnose.py", "train_accuracy.py"):
        sys.path.insert(0, HERE)
        module = __import__(script[:-3])
        return module.main(argv[2:])
    raise ValueError(f"job.py runs fastebm-eval, diagnose.py and train_accuracy.py commands, not {argv[:3]}")


def main() -> int:
    with open(sys.argv[1]) as fh:
        commands = json.load(fh)
    for argv in commands:
        if os.path.exists(output_of(argv)):
            continue
        if "--output_dir" in argv and os.path.isdir(argv[argv.index("--output_dir") + 1]):
            shutil.rmtree(argv[argv.index("--output_dir") + 1])  # an interrupted run: start it again from scratch
        t0 = time.time()
        rc = run_one(argv)
        print(f"[job] rc {rc} in {time.time() - t0:.1f} s: {' '.join(argv[1:])}", flush=True)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())

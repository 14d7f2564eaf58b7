"""benchmarks/bench_threads.py: configuration parsing, medians, and the report rebuilt from rows."""
import json
import os
import random
import statistics
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_threads  # noqa: E402


def test_config_parsing():
    c = bench_threads.parse_config("old;PYTHONPATH=/x,OMP_NUM_THREADS=1;--threads 2 --seed 3;1")
    assert c == {"name": "old", "env": {"PYTHONPATH": "/x", "OMP_NUM_THREADS": "1"},
                 "flags": ["--threads", "2", "--seed", "3"], "reps": 1}
    assert bench_threads.parse_config("plain;;") == {"name": "plain", "env": {}, "flags": [], "reps": None}
    for bad in (";;", "x;NOEQUALS;"):
        with pytest.raises(Exception, match="--config"):
            bench_threads.parse_config(bad)


def test_report_from_rows_has_the_medians(tmp_path):
    rows, walls = [], {}
    for rep in range(3):
        for config in ("a", "b"):
            for mode, n in (("alone", 1), ("2 side by side", 2)):
                for run in range(n):
                    w = round(random.uniform(10, 500), 2)
                    walls.setdefault((config, mode), []).append(w)
                    rows.append({"config": config, "mode": mode, "run": run, "wall_s": w, "cpu_s": w / 2,
                                 "returncode": 0, "load1_before": random.uniform(0, 9), "error": None, "rep": rep})
    meta = {"date": "now", "cpus": 2, "nice": 10, "reps": 3, "max_steps": 20, "pythonpath": None,
            "configs": [bench_threads.parse_config("a;;"), bench_threads.parse_config("b;X=1;")]}
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [{"meta": meta}] + rows) + "\n")
    assert bench_threads.main(["--summarise", str(path), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "threads_cpu.json").read_text())
    got = {(s["config"], s["mode"]): s["median_wall_s"] for s in report["summary"]}
    assert got == {k: statistics.median(v) for k, v in walls.items()}
    assert "`X=1`" in (tmp_path / "threads_cpu.md").read_text()

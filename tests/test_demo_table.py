"""benchmarks/demo_table.py: the docs' demo tables from a summary.json (random values, parsed back)."""
import json
import os
import re
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import demo_table  # noqa: E402

TASKS = ["mim", "sr", "denoise", "colorize"]


def _summary():
    r = (torch.rand(2 * len(TASKS) + 4, dtype=torch.float64) * 10 - 5).tolist()
    per_task = {t: {"init": r[2 * i], "pretrained": r[2 * i + 1]} for i, t in enumerate(TASKS)}
    return {"psnr_gain_db": {"init": r[-4], "pretrained": r[-3]}, "psnr_gain_db_per_task": per_task,
            "linprobe_acc": {"init": abs(r[-2]) / 5, "pretrained": abs(r[-1]) / 5},
            "config": {"seed": 7}, "device": "cpu", "num_threads": 3, "step": 87, "wall_time_s": 123.4}


def _numbers(row):
    """The numbers of the two value cells (the label may hold numbers too, e.g. sigma 0.2)."""
    cells = [c.strip() for c in row.strip("|").split("|")]
    return [float(re.search(r"[-+]?\d+\.\d+", c).group()) for c in cells[1:]]


@pytest.mark.parametrize("style", ["readme", "training"])
def test_table_rows_carry_the_summary_values(style):
    s = _summary()
    rows = demo_table.demo_table(s, style).splitlines()
    assert len(rows) == 2 + 1 + len(TASKS) + 1 and rows[1] == "|---|---|---|"
    assert all(r.startswith("|") and r.endswith("|") and r.count("|") == 4 for r in rows)
    expected = [(s["psnr_gain_db"]["init"], s["psnr_gain_db"]["pretrained"])]
    expected += [(s["psnr_gain_db_per_task"][t]["init"], s["psnr_gain_db_per_task"][t]["pretrained"]) for t in TASKS]
    expected += [(s["linprobe_acc"]["init"], s["linprobe_acc"]["pretrained"])]
    for row, (a, b), places in zip(rows[2:], expected, [2] * (1 + len(TASKS)) + [3]):
        got = _numbers(row)
        assert got == pytest.approx([a, b], abs=0.5 * 10 ** -places + 1e-12), row
    assert f"mean of {len(TASKS)} tasks" in rows[2]
    for task, row in zip(TASKS, rows[3:]):
        assert task in row


def test_command_line_reads_a_summary_and_refuses_one_without_demo_metrics(tmp_path, capsys):
    s = _summary()
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(s))
    assert demo_table.main(["--summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "seed 7" in out and "3 CPU thread(s)" in out and "87 steps" in out
    assert out.strip().endswith(demo_table.demo_table(s, "readme"))
    path.write_text(json.dumps({"status": "completed", "step": 3}))
    assert demo_table.main(["--summary", str(path)]) == 2
    assert "no demo evaluation" in capsys.readouterr().err

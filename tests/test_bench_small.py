"""benchmarks/bench_train_step.py --small runs end to end on CPU and writes a sane JSON + table."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_step_small_mode(tmp_path):
    # aot_eager keeps the compile of the two compiled engines to seconds on 2 CPU cores
    rows_file = tmp_path / "rows.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_train_step.py"), "--small",
           "--out", str(tmp_path), "--compile-backend", "aot_eager", "--rows", str(rows_file)]
    env = dict(os.environ, FASTEBM_ATTENTION_BACKEND="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "train_step_cpu_small.json").read_text())
    info = result["info"]
    for key in ("device", "torch", "date", "peak_flops"):
        assert info[key], key
    assert info["peak_flops"] > 0
    rows = {r["engine"]: r for r in result["results"]}
    assert set(rows) == {"baseline", "baseline_bf16", "eager", "func", "explicit"}
    for engine, row in rows.items():
        assert "error" not in row, (engine, row.get("error"))
        assert row["images_per_s"] > 0 and row["step_ms"] > 0 and 0 < row["mfu"] < 1, row
    assert rows["func"]["compiled"] and rows["explicit"]["compiled"]
    assert rows["baseline_bf16"]["attn_backend"] == "sdpa-math-bf16"
    for engine in ("eager", "func", "explicit"):  # ratios against both baselines, from the same run
        for base in ("baseline", "baseline_bf16"):
            suffix = "" if base == "baseline" else "_bf16"
            assert rows[engine][f"speedup_vs_baseline{suffix}"] == rows[engine]["images_per_s"] / rows[base]["images_per_s"]
    table = (tmp_path / "train_step_cpu_small.md").read_text()
    assert "| explicit |" in table and "| baseline_bf16 |" in table and info["device"] in table
    # the streamed rows: a meta line, then one line per engine in the order they ran
    lines = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert lines[0]["meta"]["peak_flops"] == info["peak_flops"]
    assert [r["engine"] for r in lines[1:]] == [r["engine"] for r in result["results"]]

"""The benchmarks' shared pieces: GPU detection before triton, streamed rows, the attention FLOP
counts (against torch.utils.flop_counter), the honest-baseline switch, the issue-7 target
arithmetic, and gpu_check_summary.py's reading of pytest logs and torn JSONL files."""
import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import _bench  # noqa: E402
import _tables  # noqa: E402
import gpu_check_summary  # noqa: E402


def test_gpu_detection_honours_hidden_devices_and_only_then_picks_the_interpreter(monkeypatch):
    monkeypatch.setattr(_bench.os.path, "exists", lambda p: p == "/dev/nvidia0")
    monkeypatch.setattr(_bench.shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _bench.nvidia_gpu_present()
    for hidden in ("", "-1", " "):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not _bench.nvidia_gpu_present()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert _bench.nvidia_gpu_present()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not _bench.prepare_triton_env() and "TRITON_INTERPRET" not in os.environ  # a GPU: compiled kernels
    monkeypatch.setattr(_bench.os.path, "exists", lambda p: False)
    assert _bench.prepare_triton_env() and os.environ["TRITON_INTERPRET"] == "1"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # an explicit choice is left alone
    assert not _bench.prepare_triton_env() and os.environ["TRITON_INTERPRET"] == "0"


def test_row_log_appends_one_flushed_line_per_row(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    log = _bench.RowLog(str(path))
    log.meta({"device": "x"})
    log.write({"a": 1.5})
    assert path.read_text().count("\n") == 2  # on disk before the log object goes away
    log.write({"b": [1, 2]})
    meta, rows = gpu_check_summary.read_jsonl([str(path)])
    assert meta == {"device": "x"} and rows == [{"a": 1.5}, {"b": [1, 2]}]
    with open(path, "a") as f:
        f.write('{"c": 1, "torn')  # a writer killed mid-line
    assert gpu_check_summary.read_jsonl([str(path)])[1] == rows
    _bench.RowLog(None).write({"ignored": True})  # no file: a no-op


@pytest.fixture(scope="module")
def bench_attention():
    import bench_attention as module

    return module


@pytest.mark.parametrize("stage", ["fwd", "fwd_bwd", "fwd_bwd_dbwd"])
def test_attention_flop_counts_match_torch_flop_counter(bench_attention, stage):
    from torch.utils.flop_counter import FlopCounterMode

    shape = (2, 3, 37, 24)
    x = bench_attention.make_inputs(shape, dtype=torch.float32, device="cpu", seed=int(torch.randint(0, 2**31, ())))
    with FlopCounterMode(display=False) as counter:
        bench_attention.make_step("sdpa_math", stage, x)()
    assert counter.get_total_flops() == bench_attention.stage_flops(shape, stage)


def test_bf16_math_switch_changes_the_math_path_and_is_restored(bench_attention):
    from torch.backends.cuda import fp16_bf16_reduction_math_sdp_allowed as allowed

    before = allowed()
    x = bench_attention.make_inputs((1, 2, 29, 16), dtype=torch.bfloat16, device="cpu", seed=int(torch.randint(0, 2**31, ())))
    upcast = bench_attention.make_step("sdpa_math", "fwd", x)()
    low = bench_attention.make_step("sdpa_math_bf16", "fwd", x)()
    assert allowed() == before
    ref = bench_attention.float64_reference(x)  # double-backward outputs, float64
    err_upcast = bench_attention.max_rel_err(bench_attention.make_step("sdpa_math", "fwd_bwd_dbwd", x)(), ref)
    err_low = bench_attention.max_rel_err(bench_attention.make_step("sdpa_math_bf16", "fwd_bwd_dbwd", x)(), ref)
    assert not torch.equal(upcast, low)  # the flag really reaches the math path
    assert 0 < err_upcast < err_low < 0.1, (err_upcast, err_low)  # fp32 inside is more accurate than bf16


def test_attention_targets_use_the_faster_math_baseline():
    def row(name, n, fused, math, math_bf16):
        return dict(shape_name=name, shape=[1, 1, n, 64], stage="fwd_bwd_dbwd",
                    impls=dict(fused={"ms": fused}, sdpa_math={"ms": math}, sdpa_math_bf16=math_bf16))

    rows = [row("a", 197, 1.0, 5.0, {"ms": 1.5}), row("b", 4096, 2.0, 30.0, {"error": "out of memory"}),
            dict(shape_name="c", shape=[1, 1, 8, 64], stage="fwd", impls={})]
    t = _tables.attention_targets(rows)
    assert set(t) == {"a", "b"}
    assert t["a"] == dict(required=2.0, measured=1.5, met=False)  # 1.5 ms bf16 math, not the 5 ms default
    assert t["b"] == dict(required=5.0, measured=15.0, met=True)
    md = _tables.attention_markdown({"device": "d"}, rows[:2])
    assert "| out of memory |" in md and "NOT met" in md


def test_pytest_log_parsing_counts_outcomes_and_the_test_cut_off():
    log = "\n".join([
        "tests/test_a.py::test_one PASSED                                  [ 20%]",
        "tests/test_a.py::test_two[bf16-(1,2)] FAILED                      [ 40%]",
        "tests/test_a.py::test_three SKIPPED (needs a CUDA GPU)            [ 60%]",
        "ERROR tests/test_b.py - ImportError: no module named x",
        "==== slowest 20 durations ====",
        "3.21s call     tests/test_a.py::test_two[bf16-(1,2)]",
        "tests/test_a.py::test_four ",
    ])
    r = gpu_check_summary.parse_pytest_log(log)
    assert r["counts"] == {"PASSED": 1, "FAILED": 1, "ERROR": 1, "SKIPPED": 1}
    assert r["failing"] == ["tests/test_a.py::test_two[bf16-(1,2)]", "tests/test_b.py"]
    assert r["running_when_stopped"] == "tests/test_a.py::test_four"
    assert r["durations"] == [(3.21, "call", "tests/test_a.py::test_two[bf16-(1,2)]")]
    done = gpu_check_summary.parse_pytest_log(log + " PASSED [ 80%]\n===== 2 passed, 1 failed in 4.0s =====")
    assert done["running_when_stopped"] is None and done["result_line"] == "2 passed, 1 failed in 4.0s"


def test_summary_renders_partial_runs_from_the_work_folder(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    (work / "rows").mkdir()
    out.mkdir()
    (work / "steps.tsv").write_text("env\tpriority\tsetup\tok\t0\t0\t3\t60\t\n"
                                    "bench_corrupt\tpriority\tbench\tinterrupted\t\t3\t7\t90\tstopped by SIGTERM\n")
    (work / "logs" / "env.log").write_text("{}\nenv: H200\n")
    (work / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11"}))
    (work / "rows" / "corrupt.jsonl").write_text(json.dumps({"meta": {"device": "NVIDIA H200"}}) + "\n"
                                                + json.dumps({"tasks": "mix", "reference_ms": 4.25}) + "\n")
    argv = ["--work", str(work), "--out", str(out), "--mode", "gpu", "--t0", "0", "--commit", "c0ffee",
            "--final", "--exit-code", "143", "--interrupted", "SIGTERM"]
    assert gpu_check_summary.main(argv) == 0
    assert sorted(os.listdir(out)) == ["gpu_check_detail.tar.gz", "summary.json", "summary.md"]
    md = (out / "summary.md").read_text()
    assert "INTERRUPTED by SIGTERM (exit 143)" in md and "c0ffee" in md and "| mix | 4.250 |" in md
    assert "| bench_corrupt | priority | interrupted | 7 | 90 | stopped by SIGTERM |" in md
    s = json.loads((out / "summary.json").read_text())
    assert [st["status"] for st in s["steps"]] == ["ok", "interrupted"] and s["steps"][0]["last_line"] == "env: H200"

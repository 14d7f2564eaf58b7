"""fastebm.kernels.compile_check compiles with the specialisation the JIT applies at run time, for
sm_90 and sm_80, without a GPU.

compile_check refuses TRITON_INTERPRET (the interpreter compiles nothing) and tests/conftest.py sets
it on machines without a GPU, so every check runs in a subprocess without it.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_python(tmp_path, code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    script = tmp_path / "check.py"  # a file: @triton.jit needs the function's source
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=timeout)


def test_specialisation_is_the_jit_binders_and_agrees_with_the_rules(tmp_path):
    # Triton's own binder (JITFunction.run without a device) against compile_check's independent
    # statement of the rules, for every kernel, dtype and head dim bucket (d=24: row strides not
    # divisible by 16; d=1: the JIT turns an int equal to 1, the row stride, into a constant).
    out = run_python(tmp_path, """
        import json, torch
        from fastebm.kernels import compile_check as cc, attention as A
        res = {}
        for name, fn in cc.kernel_functions().items():
            for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
                for d in (1, 24, 64, 128):
                    opts = A.launch_options(dtype, d, 197, 197, name, on_gpu=True)
                    jit = cc.specialize(fn, dtype, d, 90, opts, "jit")
                    rules = cc.specialize(fn, dtype, d, 90, opts, "rules")
                    names = fn.arg_names
                    res[f"{name} {dtype} {d}"] = dict(
                        how=jit[3], same=jit[:3] == rules[:3], sig=jit[0],
                        divisible=sorted(names[i] for (i,), a in jit[2].items() if ["tt.divisibility", 16] in a),
                        consts=sorted(names[i] for (i,) in jit[1]),
                        dns=sorted(p.name for p in fn.params if p.do_not_specialize))
        print(json.dumps(res))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert len(res) == 5 * 4 * 4
    for key, r in res.items():
        assert r["how"] == "jit" and r["same"], key
        pointers = [n for n, t in r["sig"].items() if t.startswith("*")]
        assert pointers and set(pointers) <= set(r["divisible"]), key  # torch's allocator: 16-byte aligned
        d = int(key.split()[-1])
        strides = [n for n in r["sig"] if n.startswith("stride_")] + [n for n in r["consts"] if n.startswith("stride_")]
        assert strides and all(n[-1] in "bhnd" for n in strides), key
        for n in strides:
            if n.endswith("d"):  # unit head-dim stride: a constant, so loads vectorise
                assert n in r["consts"], (key, n)
            elif n.endswith("n"):  # row stride = d
                assert (n in r["divisible"]) == (d % 16 == 0) and (n in r["consts"]) == (d == 1), (key, n)
        assert "H" in r["sig"] and "H" not in r["divisible"] + r["consts"], key  # 12 heads
        assert r["dns"] and not set(r["dns"]) & set(r["divisible"] + r["consts"]), key  # NQ/NK stay generic
        for ptr in ("LSE", "DELTA", "R", "C"):
            if ptr in r["sig"]:
                assert r["sig"][ptr] == ("*fp64" if "float64" in key else "*fp32"), key


def test_compiles_for_sm80_and_sm90_with_real_figures(tmp_path):
    rows = tmp_path / "cc.jsonl"
    cmd = [sys.executable, "-m", "fastebm.kernels.compile_check", "--arch", "80,90", "--dtypes", "bfloat16",
           "--head-dims", "64", "--kernels", "fwd", "--jsonl", str(rows)]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    recs = {r["arch"]: r for r in map(json.loads, rows.read_text().splitlines())}
    assert set(recs) == {80, 90}
    assert recs[80]["mma"] == "mma" and recs[90]["mma"] == "wgmma"
    for r in recs.values():
        assert r["spec"] == "jit" and r["registers"] and r["registers"] > 0 and r["shared"] > 0
        assert {"Q", "K", "V", "O", "LSE", "stride_qn", "stride_kh"} <= set(r["divisible_by_16"])
        assert "NQ" not in r["divisible_by_16"] and r["mma_instructions"]["wgmma" if r["arch"] == 90 else "mma_sync"] > 0
        assert r["config"]["EVEN_M"] is False and r["seq_len"] == 197  # ViT-B/16: ragged tiles
        assert r["config"]["num_stages"] > 1 and r["async_copy"], r  # the pipelined loads the JIT would emit
    lines = [line for line in out.stdout.splitlines() if line.startswith("ok")]
    assert len(lines) == 2 and "sm_80" in lines[0] and "sm_90" in lines[1]


@pytest.mark.parametrize("case", ["unknown_constexpr", "missing_kernel"])
def test_kernel_changes_fail_with_a_clear_message(tmp_path, case):
    out = run_python(tmp_path, f"""
        import triton, triton.language as tl, torch
        from fastebm.kernels import compile_check as cc, attention as A

        @triton.jit
        def _attn_fwd_kernel(Q, NQ, NEW_FLAG: tl.constexpr):
            pass

        if "{case}" == "unknown_constexpr":
            opts = A.launch_options(torch.bfloat16, 64, 197, 197, "fwd", on_gpu=True)
            cc.sample_arguments(_attn_fwd_kernel, torch.bfloat16, 64, opts)
        else:
            del A._attn_fwd_kernel
            cc.kernel_functions()
    """)
    assert out.returncode != 0
    expected = "takes constexpr 'NEW_FLAG'" if case == "unknown_constexpr" else "expected one @triton.jit function named *_fwd_kernel"
    assert expected in out.stderr, out.stderr[-2000:]


def test_even_launches_compile_without_spills_in_bf16(tmp_path):
    # N = 256: every tile full (EVEN_M = EVEN_N = True, no row masks), the other compiled variant of
    # each kernel; the double-backward kernels are the ones near the register limit.
    rows = tmp_path / "cc.jsonl"
    cmd = [sys.executable, "-m", "fastebm.kernels.compile_check", "--arch", "90", "--dtypes", "bfloat16",
           "--head-dims", "64", "--kernels", "dbwd_row,dbwd_col", "--seq-len", "256", "--jsonl", str(rows)]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    recs = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["kernel"] for r in recs] == ["dbwd_row", "dbwd_col"]
    for r in recs:
        assert r["config"]["EVEN_M"] is True and r["config"]["EVEN_N"] is True, r
        assert r["mma"] == "wgmma" and r["mma_instructions"]["mma_sync"] == 0 and r["spill_bytes"] == 0, r


def test_mma_kind_names_a_kernel_with_both_instruction_kinds_mixed(tmp_path):
    out = run_python(tmp_path, """
        from fastebm.kernels.compile_check import _mma_kind
        print(_mma_kind(8, 0), _mma_kind(8, 40), _mma_kind(0, 40), _mma_kind(0, 0))
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["wgmma", "mixed", "mma", "fma"]

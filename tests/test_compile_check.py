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
    # statement of the rules, for every kernel, dtype and head dim bucket (d=24: not divisible by 16;
    # d=1: the JIT turns an int equal to 1 into a constant).
    out = run_python(tmp_path, """
        import json, torch
        from fastebm.kernels import compile_check as cc, attention as A
        res = {}
        for name, fn in cc.kernel_functions().items():
            for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
                for d in (1, 24, 64, 128):
                    cfg = A.launch_config(dtype, d, name, on_gpu=True)
                    jit = cc.specialize(fn, dtype, d, 90, cfg, "jit")
                    rules = cc.specialize(fn, dtype, d, 90, cfg, "rules")
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
        assert ("D" in r["divisible"]) == (d % 16 == 0), key
        assert ("D" in r["consts"]) == (d == 1), key
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
        assert {"Q", "K", "V", "O", "LSE", "D"} <= set(r["divisible_by_16"]) and "NQ" not in r["divisible_by_16"]
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
            cfg = A.launch_config(torch.bfloat16, 64, "fwd", on_gpu=True)
            cc.sample_arguments(_attn_fwd_kernel, torch.bfloat16, 64, cfg)
        else:
            del A._attn_fwd_kernel
            cc.kernel_functions()
    """)
    assert out.returncode != 0
    expected = "takes constexpr 'NEW_FLAG'" if case == "unknown_constexpr" else "expected one @triton.jit function named *_fwd_kernel"
    assert expected in out.stderr, out.stderr[-2000:]

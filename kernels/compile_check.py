"""Compiles the attention kernels for a GPU target without a GPU (ahead of time) and reports
shared memory and ptxas register/spill figures for every launch configuration.

    python -m fastebm.kernels.compile_check                 # sm_90 (H100/H200), all dtypes
    python -m fastebm.kernels.compile_check --arch 80 --dtypes bfloat16 --head-dims 64

A kernel that does not compile for the target, or a configuration over the shared-memory limit,
is reported and makes the exit status 1. Needs the ptxas that ships with Triton; must run without
TRITON_INTERPRET (the interpreter compiles nothing).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter does not compile kernels)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastebm.kernels import attention as A  # noqa: E402

KERNEL_FNS = {
    "fwd": A._attn_fwd_kernel,
    "dkdv": A._attn_bwd_dkdv_kernel,
    "dq": A._attn_bwd_dq_kernel,
    "dbwd_row": A._attn_dbwd_row_kernel,
    "dbwd_col": A._attn_dbwd_col_kernel,
}
_PTR = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
_ROW_STATS = ("LSE", "DELTA", "R", "C")  # float32 (float64 for float64 inputs) row vectors
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _signature(fn, dtype: torch.dtype) -> dict:
    acc = "fp64" if dtype == torch.float64 else "fp32"
    sig = {}
    for name in fn.arg_names:
        if name in ("ACC", "DOT_PREC") or name.startswith("BLOCK_"):
            sig[name] = "constexpr"
        elif name in ("scale_hi", "scale_lo"):
            sig[name] = "fp32"
        elif name in ("NQ", "NK", "D"):
            sig[name] = "i32"
        else:
            sig[name] = "*" + (acc if name in _ROW_STATS else _PTR[dtype])
    return sig


def compile_one(kernel: str, dtype: torch.dtype, head_dim: int, arch: int) -> dict:
    fn = KERNEL_FNS[kernel]
    cfg = A.launch_config(dtype, head_dim, kernel, on_gpu=True)
    constexprs = dict(ACC=A._tl_acc(dtype), DOT_PREC=A._dot_precision(dtype), **{
        k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")
    })
    compiled = triton.compile(
        ASTSource(fn, _signature(fn, dtype), constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
    )
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma")
    info = dict(kernel=kernel, dtype=str(dtype), head_dim=head_dim, shared=compiled.metadata.shared,
                config=cfg, mma=mma)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.o")],
            capture_output=True, text=True,
        )
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    info["registers"] = int(regs.group(1)) if regs else None
    info["spill_bytes"] = int(spill.group(1)) if spill else None
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = H100/H200)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32,float64")
    parser.add_argument("--head-dims", default="64,128", help="one head dim per config bucket (<= 64, <= 128)")
    parser.add_argument("--kernels", default=",".join(KERNEL_FNS))
    args = parser.parse_args(argv)
    limit = SHARED_LIMIT.get(args.arch, 99 * 1024)
    failures = 0
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for d in (int(x) for x in args.head_dims.split(",")):
            for kernel in args.kernels.split(","):
                try:
                    r = compile_one(kernel, dtype, d, args.arch)
                except Exception as exc:  # report every failure, then exit 1
                    failures += 1
                    print(f"FAIL {dtype_name} d={d} {kernel}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                over = r["shared"] > limit
                failures += over
                c = r["config"]
                print(
                    f"{'OVER' if over else 'ok  '} {dtype_name:8s} d={d:<3d} {kernel:8s} "
                    f"M={c['BLOCK_M']:<3d} N={c['BLOCK_N']:<3d} warps={c['num_warps']} stages={c['num_stages']} "
                    f"{r['mma']:5s} shared={r['shared'] // 1024} KB regs={r['registers']} spill={r['spill_bytes']} B",
                    flush=True,
                )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

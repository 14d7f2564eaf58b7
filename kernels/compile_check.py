"""Compiles the attention kernels for a GPU target without a GPU (ahead of time) and reports
shared memory, ptxas register/spill figures and the instructions used, per launch configuration.

    python -m fastebm.kernels.compile_check                 # sm_90 (H100/H200), all dtypes
    python -m fastebm.kernels.compile_check --arch 80 --dtypes bfloat16 --head-dims 64
    python -m fastebm.kernels.compile_check --jsonl out.jsonl   # also one JSON record per kernel

Each kernel is compiled as the JIT compiles it at run time, so the figures are the real ones:

- the kernels are found by introspection: every ``@triton.jit`` function of
  ``fastebm.kernels.attention`` named ``*_<kernel>_kernel`` for a ``<kernel>`` in its ``KERNELS``;
- their arguments are classified by name (the module's convention: ``LSE``/``DELTA``/``R``/``C``
  are float32 row statistics, float64 for float64 inputs; other upper-case names are tensors of the
  input dtype, except the sizes ``N*``/``B``/``H``, 32-bit ints; ``stride_<tensor><b|h|n|d>``
  are the strides of a contiguous (B, H, N, d) tensor; other lower-case names are float scalars),
  and the constexprs are exactly what the wrappers pass (``attention.launch_options``: ``HEAD_DIM``,
  ``ACC``, ``DOT_PREC``, the policy's tiles, ``EVEN_M``/``EVEN_N`` for the sequence length, warps
  and stages);
- the specialisation comes from Triton's own JIT binder applied to sample arguments like those of a
  ViT-B/16 call (tensors from torch's allocator are 16-byte aligned, 12 heads, sequence length
  197 (``--seq-len``), the unit head-dim stride becomes a constant, a row stride d divisible by 16
  for d = 64 or 128; ``do_not_specialize`` is honoured). On a Triton without that private API the
  same rules are applied by hand (reported as ``spec=rules``).

A kernel that does not compile for the target, or a configuration over the shared-memory limit,
is reported and makes the exit status 1. Needs the ptxas that ships with Triton; must run without
TRITON_INTERPRET (the interpreter compiles nothing).
"""
from __future__ import annotations

import argparse
import json
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
from triton.runtime.jit import JITFunction  # noqa: E402

from fastebm.kernels import attention as A  # noqa: E402

_PTR = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
_ROW_STATS = ("LSE", "DELTA", "R", "C")  # float32 (float64 for float64 inputs) row vectors
_INT_NAME = re.compile(r"^(N[A-Z0-9_]*|B|H)$")
_STRIDE_NAME = re.compile(r"^stride_[a-z]+([bhnd])$")
SEQ_LEN = 197  # ViT-B/16 at 224 px: 196 patches + the class token
HEADS = 12  # ViT-B
SCALE = 0.125
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def kernel_functions() -> dict:
    """``{kernel name: JITFunction}`` for every name in ``A.KERNELS`` (raises if one is missing)."""
    jitted = {name: fn for name, fn in vars(A).items() if isinstance(fn, JITFunction) and name.endswith("_kernel")}
    found = {}
    for kernel in A.KERNELS:
        matches = [fn for name, fn in jitted.items() if name.endswith(f"_{kernel}_kernel")]
        if len(matches) != 1:
            raise LookupError(f"compile_check: expected one @triton.jit function named *_{kernel}_kernel in "
                              f"{A.__name__}, found {len(matches)} among {sorted(jitted)}")
        found[kernel] = matches[0]
    return found


class _Ptr:
    """A tensor argument as the JIT binder sees it: a dtype and a 16-byte aligned address."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    @staticmethod
    def data_ptr() -> int:
        return 0


def _constexpr_values(opts: dict) -> dict:
    """Every constexpr the wrappers pass, from ``attention.launch_options`` (``opts``)."""
    return {k: v for k, v in opts.items() if k not in ("num_warps", "num_stages")}


def _sample_stride(axis: str, head_dim: int, seq_len: int) -> int:
    # A contiguous (B, H, N, d) tensor: what the JIT sees for q/k/v views of the ViT's qkv
    # projection too (strides 3*H*d and d are divisible by 16 exactly when d is).
    return {"d": 1, "n": head_dim, "h": seq_len * head_dim, "b": HEADS * seq_len * head_dim}[axis]


def sample_arguments(fn: JITFunction, dtype: torch.dtype, head_dim: int, opts: dict, seq_len: int = SEQ_LEN):
    """``(positional args, constexpr kwargs)`` of a call like the wrappers', classified by name;
    ``opts`` is ``attention.launch_options(...)`` for this kernel."""
    known = _constexpr_values(opts)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args, constexprs = [], {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            if name not in known:
                raise KeyError(f"compile_check: {fn.__name__} takes constexpr {name!r}, which compile_check does not "
                               f"know; add it to attention.launch_options ({sorted(known)} are known)")
            constexprs[name] = known[name]
        elif _STRIDE_NAME.match(name):
            args.append(_sample_stride(_STRIDE_NAME.match(name).group(1), head_dim, seq_len))
        elif _INT_NAME.match(name):
            args.append(HEADS if name == "H" else seq_len)
        elif name[:1].islower():
            args.append(SCALE)
        else:
            args.append(_Ptr(acc if name in _ROW_STATS else dtype))
    return args, constexprs


def _rules_specialization(fn: JITFunction, args: list, constexprs: dict):
    """What the JIT does, by hand: pointers 16-byte aligned and ints divisible by 16 get
    ``tt.divisibility=16``, an int equal to 1 becomes a constant; ``do_not_specialize`` ints and
    float scalars are left alone."""
    signature, consts, attrs = {}, dict(constexprs), {}
    pos = iter(args)
    for i, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        value = next(pos)
        if isinstance(value, _Ptr):
            signature[param.name] = "*" + _PTR[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif param.do_not_specialize:
            signature[param.name] = "i32"
        elif value == 1:
            signature[param.name] = "constexpr"
            consts[param.name] = 1
        else:
            signature[param.name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def _jit_specialization(fn: JITFunction, args: list, constexprs: dict, backend, launch: dict):
    """Triton's own binder and argument packing (``JITFunction.run`` without a device)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(constexprs, **launch)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, consts, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    consts = {(fn.arg_names.index(k),) if isinstance(k, str) else k: v for k, v in consts.items()}
    return signature, consts, attrs


def _has_jit_binder(fn: JITFunction) -> bool:
    try:
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError:
        return False
    return hasattr(fn, "_pack_args")


def specialize(fn: JITFunction, dtype: torch.dtype, head_dim: int, arch: int, opts: dict, how: str = "jit",
               seq_len: int = SEQ_LEN):
    """``(signature, constexprs, attrs, how)`` for ``triton.compile``; ``how`` is ``jit`` or ``rules``;
    ``opts`` is ``attention.launch_options(...)`` (GPU) for this kernel and sequence length.

    ``constexprs`` and ``attrs`` are keyed by argument path ``(index,)``; attributes that are empty
    lists are dropped (the JIT lists one per constexpr)."""
    from triton.compiler import make_backend

    args, constexprs = sample_arguments(fn, dtype, head_dim, opts, seq_len)
    launch = dict(num_warps=opts["num_warps"], num_stages=opts["num_stages"])
    if how == "jit" and _has_jit_binder(fn):
        backend = make_backend(GPUTarget("cuda", arch, 32))
        signature, consts, attrs = _jit_specialization(fn, args, constexprs, backend, launch)
    else:
        how = "rules"
        signature, consts, attrs = _rules_specialization(fn, args, constexprs)
        consts = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    return signature, consts, {k: v for k, v in attrs.items() if v}, how


def compile_one(kernel: str, dtype: torch.dtype, head_dim: int, arch: int, fns: dict | None = None,
                seq_len: int = SEQ_LEN) -> dict:
    fn = (fns or kernel_functions())[kernel]
    opts = A.launch_options(dtype, head_dim, seq_len, seq_len, kernel, on_gpu=True)
    cfg = {k: v for k, v in opts.items() if k.startswith("BLOCK_") or k in ("num_warps", "num_stages", "EVEN_M", "EVEN_N")}
    signature, consts, attrs, how = specialize(fn, dtype, head_dim, arch, opts, seq_len=seq_len)
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
    )
    ptx = compiled.asm["ptx"]
    counts = dict(wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)), mma_sync=len(re.findall(r"\bmma\.sync\b", ptx)))
    mma = _mma_kind(counts["wgmma"], counts["mma_sync"])
    aligned = [name for (i,), a in attrs.items() for name in [fn.arg_names[i]] if ["tt.divisibility", 16] in a]
    info = dict(kernel=kernel, dtype=str(dtype).replace("torch.", ""), head_dim=head_dim, arch=arch, seq_len=seq_len,
                shared=compiled.metadata.shared, config=cfg, mma=mma, mma_instructions=counts, spec=how,
                divisible_by_16=aligned,
                async_copy="cp.async" in ptx, vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx)))
    info.update(_ptxas(ptx, arch))
    return info


def _mma_kind(wgmma: int, mma_sync: int) -> str:
    """``wgmma`` when every tensor-core product is a Hopper warpgroup MMA, ``mma`` when all are
    warp-level ``mma.sync``, ``mixed`` when both appear (some dot missed wgmma, e.g. a tile under 64
    rows), ``fma`` when there is no tensor-core instruction."""
    if wgmma and mma_sync:
        return "mixed"
    return "wgmma" if wgmma else ("mma" if mma_sync else "fma")


def _ptxas(ptx: str, arch: int) -> dict:
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
    return dict(registers=int(regs.group(1)) if regs else None, spill_bytes=int(spill.group(1)) if spill else None)


def _compile_job(job) -> dict:
    """One (arch, dtype name, head dim, kernel, seq len): the compile_one record, or one with ``error``."""
    arch, dtype_name, d, kernel, seq_len = job
    try:
        r = compile_one(kernel, getattr(torch, dtype_name), d, arch, seq_len=seq_len)
    except Exception as exc:  # report every failure, then exit 1
        return dict(kernel=kernel, dtype=dtype_name, head_dim=d, arch=arch, error=f"{type(exc).__name__}: {exc}"[:300])
    r["over_shared_limit"] = r["shared"] > SHARED_LIMIT.get(arch, 99 * 1024)
    return r


def _line(r: dict) -> str:
    if "error" in r:
        return f"FAIL {r['dtype']} d={r['head_dim']} {r['kernel']} sm_{r['arch']}: {r['error']}"
    c = r["config"]
    return (f"{'OVER' if r['over_shared_limit'] else 'ok  '} {r['dtype']:8s} d={r['head_dim']:<3d} {r['kernel']:8s} "
            f"M={c['BLOCK_M']:<3d} N={c['BLOCK_N']:<3d} warps={c['num_warps']} stages={c['num_stages']} "
            f"{r['mma']:5s} shared={r['shared'] // 1024} KB regs={r['registers']} spill={r['spill_bytes']} B "
            f"sm_{r['arch']} spec={r['spec']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="compute capabilities as integers, comma-separated (90 = H100/H200, 80 = A100)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32,float64")
    parser.add_argument("--head-dims", default="64,128", help="one head dim per config bucket (<= 64, <= 128)")
    parser.add_argument("--kernels", default=",".join(A.KERNELS))
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN,
                        help="Nq = Nk of the sample call: picks the table's sequence bucket and EVEN_M/EVEN_N "
                             f"(default {SEQ_LEN}, ViT-B/16: ragged tiles; 256 for the even variant)")
    parser.add_argument("--jsonl", default=None, help="append one JSON record per kernel to this file")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (output order is kept)")
    args = parser.parse_args(argv)
    kernel_functions()  # a renamed or missing kernel fails here, before any compile
    for name in args.dtypes.split(","):
        if not isinstance(getattr(torch, name, None), torch.dtype):
            parser.error(f"unknown dtype {name!r}; use torch names such as bfloat16,float32")
    jobs = [(int(arch), dtype_name, int(d), kernel, args.seq_len) for arch in args.arch.split(",") for dtype_name in args.dtypes.split(",")
            for d in args.head_dims.split(",") for kernel in args.kernels.split(",")]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.map(_compile_job, jobs)
            failures = _report(results, args.jsonl)
    else:
        failures = _report(map(_compile_job, jobs), args.jsonl)
    return 1 if failures else 0


def _report(results, jsonl) -> int:
    failures = 0
    for r in results:
        failures += "error" in r or r["over_shared_limit"]
        print(_line(r), flush=True)
        if jsonl:
            with open(jsonl, "a") as f:
                f.write(json.dumps(r, default=str) + "\n")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())

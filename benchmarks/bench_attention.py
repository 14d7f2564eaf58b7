"""Fused Triton attention against honest baselines, measured side by side in one run: forward,
forward+backward, and forward+backward+double-backward (the restoration objective's pattern),
with time, TFLOP/s, MFU, peak memory and the error against a float64 reference.

    python benchmarks/bench_attention.py --out benchmarks/results [--rows rows.jsonl]
    pytest benchmarks/bench_attention.py --benchmark-only       # pytest-benchmark table

On a CUDA machine: bfloat16 at ViT-B shapes (B=64, H=12, N=197, d=64) and long sequences (N=1024,
N=4096 with smaller batches). Without CUDA: a smoke mode (tiny float32 shapes, Triton interpreter)
that only checks that the benchmark runs; its timings mean nothing.

Implementations (rows of the table):

- ``fused``: ``fastebm.ops.attention(backend="triton")``;
- ``sdpa_math``: ``F.scaled_dot_product_attention`` on its math backend, as PyTorch runs it by
  default: bf16/fp16 inputs are upcast to fp32 inside (the only SDPA path with a double backward);
- ``sdpa_math_bf16``: the same with ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)``
  (matmuls and softmax in the input dtype), so "fused vs math" is not a precision change;
- ``sdpa_default``: SDPA's default dispatch (FlashAttention-2 / memory-efficient / cuDNN): the
  first-order baseline; it has no double backward;
- ``xformers``: ``xformers.ops.memory_efficient_attention`` where xformers is installed (first order).

FLOPs are the matmul FLOPs of the math algorithm with Nq = Nk = N: ``fwd`` 4, ``fwd_bwd`` 12,
``fwd_bwd_dbwd`` 32 times B*H*N^2*d (the same for every implementation; the fused kernels'
recomputation is not counted); tests/test_bench_helpers.py checks them against
``torch.utils.flop_counter``. MFU = FLOP/s over the peak measured by ``_bench.measure_peak_flops``.

JSONL rows (``--rows``), one per (shape, stage), written as each finishes: ``shape_name``,
``shape`` [B, H, N, d], ``stage``, ``flops``, ``impls`` {name: {``ms``, ``tflops``, ``mfu``,
``peak_mem_bytes``, ``err_vs_fp64`` (double backward only)} or {``error``} or {``na``}}.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

from _bench import prepare_triton_env

prepare_triton_env()  # before triton is imported (by fastebm.ops)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _bench import (RowLog, environment, error_text, is_oom, kernel_bench_main, measure_peak_flops,  # noqa: E402
                    peak_memory_bytes, time_ms)
from _tables import attention_markdown  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from fastebm.ops import attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32

# name -> (B, H, N, d)
GPU_SHAPES = {
    "vit_b_n197": (64, 12, 197, 64),
    "n1024": (8, 12, 1024, 64),
    "n4096": (2, 12, 4096, 64),
}
CPU_SHAPES = {"cpu_smoke_n37": (1, 2, 37, 16)}
SHAPES = GPU_SHAPES if CUDA else CPU_SHAPES
STAGES = ("fwd", "fwd_bwd", "fwd_bwd_dbwd")
FLOPS_PER_BHN2D = {"fwd": 4, "fwd_bwd": 12, "fwd_bwd_dbwd": 32}


def stage_flops(shape, stage: str) -> float:
    B, H, N, D = shape
    return float(FLOPS_PER_BHN2D[stage] * B * H * N * N * D)


@contextlib.contextmanager
def math_reductions_in_input_dtype(enabled: bool):
    """Set ``allow_fp16_bf16_reduction_math_sdp`` for the block (restored after)."""
    before = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(before)


def _fused(q, k, v):
    return attention(q, k, v, backend="triton")


def _sdpa_math(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def _sdpa_default(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _xformers(q, k, v):
    import xformers.ops as xops  # layout (B, N, H, d)

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


# name -> (function, stages it has, math reductions in the input dtype)
IMPLS = {
    "fused": (_fused, STAGES, False),
    "sdpa_math": (_sdpa_math, STAGES, False),
    "sdpa_math_bf16": (_sdpa_math, STAGES, True),
    "sdpa_default": (_sdpa_default, STAGES[:2], False),
    "xformers": (_xformers, STAGES[:2], False),
}


def xformers_unavailable() -> Optional[str]:
    """Why xformers cannot be measured here (None if it can)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - optional baseline
        return "not installed" if isinstance(exc, ModuleNotFoundError) else f"unusable: {error_text(exc)}"
    return None if CUDA else "needs a CUDA GPU"


def make_inputs(shape, dtype=DTYPE, device=DEVICE, seed=0):
    B, H, N, D = shape
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r():
        return torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)

    q, k, v = (r().requires_grad_(True) for _ in range(3))
    return dict(q=q, k=k, v=v, do=r().requires_grad_(True), gq=r(), gk=r(), gv=r())


def make_step(impl: str, stage: str, x) -> Callable[[], object]:
    """A callable running one stage of ``impl`` on the inputs ``x`` and synchronising the GPU."""
    fn, _, low_precision_math = IMPLS[impl]
    q, k, v, do = x["q"], x["k"], x["v"], x["do"]

    def sync():
        if CUDA:
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad(), math_reductions_in_input_dtype(low_precision_math):
            out = fn(q, k, v)
        sync()
        return out

    def fwd_bwd():
        with math_reductions_in_input_dtype(low_precision_math):
            grads = torch.autograd.grad(fn(q, k, v), (q, k, v), do)
        sync()
        return grads

    def fwd_bwd_dbwd():
        # The restoration pattern: a gradient with a graph, then a gradient of a function of it.
        with math_reductions_in_input_dtype(low_precision_math):
            grads = torch.autograd.grad(fn(q, k, v), (q, k, v), do, create_graph=True)
            inner = sum((g * x[n]).float().sum() for g, n in zip(grads, ("gq", "gk", "gv")))
            bars = torch.autograd.grad(inner, (q, k, v, do))
        sync()
        return bars

    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "fwd_bwd_dbwd": fwd_bwd_dbwd}[stage]


def max_rel_err(outputs, reference) -> float:
    """Largest norm-relative difference over matching tensors, computed in float64."""
    return max(((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()
               for a, b in zip(outputs, reference))


def float64_reference(x):
    """The double-backward outputs of math attention in float64 on the same (rounded) inputs."""
    x64 = {n: t.detach().double().requires_grad_(t.requires_grad) for n, t in x.items()}
    return [t.detach() for t in make_step("sdpa_math", "fwd_bwd_dbwd", x64)()]


def measure(impl: str, stage: str, x, shape, reps: int, warmup: int, peak_flops: float, ref) -> Dict[str, object]:
    step = make_step(impl, stage, x)
    try:
        out = step()  # compile / warm up outside the timing
        res: Dict[str, object] = {}
        if ref is not None:
            res["err_vs_fp64"] = max_rel_err(out, ref)
        del out
        res["peak_mem_bytes"] = peak_memory_bytes(step)
        res["ms"] = time_ms(step, reps, warmup)
    except Exception as exc:  # noqa: BLE001 - one implementation's failure must not stop the others
        return {"error": "out of memory" if is_oom(exc) else error_text(exc)}
    finally:
        if CUDA:
            torch.cuda.empty_cache()
    res["tflops"] = stage_flops(shape, stage) / (res["ms"] * 1e-3) / 1e12
    res["mfu"] = res["tflops"] * 1e12 / peak_flops
    return res


def run(reps: int, warmup: int, rows: Optional[RowLog] = None) -> Dict[str, object]:
    rows = rows or RowLog(None)
    env = environment()
    meta = dict(benchmark="attention", device=env["device"], dtype=str(DTYPE).replace("torch.", ""),
                torch=env["torch"], triton=env.get("triton"), date=env["date"], reps=reps, warmup=warmup,
                xformers=env.get("xformers") or xformers_unavailable(), **measure_peak_flops(DEVICE))
    unavailable = {"xformers": xformers_unavailable()}
    rows.meta(meta)
    results: List[Dict[str, object]] = []
    for name, shape in SHAPES.items():
        x = make_inputs(shape)
        try:
            ref = float64_reference(x)
        except Exception as exc:  # noqa: BLE001 - the accuracy column is then empty
            print(f"{name}: no float64 reference ({error_text(exc)})", flush=True)
            ref = None
        for stage in STAGES:
            row = dict(shape_name=name, shape=list(shape), stage=stage, flops=stage_flops(shape, stage), impls={})
            for impl, (_, stages, _) in IMPLS.items():
                if stage not in stages:
                    row["impls"][impl] = {"na": "no double backward"}
                elif unavailable.get(impl):
                    row["impls"][impl] = {"na": unavailable[impl]}
                else:
                    row["impls"][impl] = measure(impl, stage, x, shape, reps, warmup, meta["peak_flops"],
                                                 ref if stage == "fwd_bwd_dbwd" else None)
            rows.write(row)
            results.append(row)
            print(f"{name} {stage}: " + ", ".join(f"{k} {v.get('ms', v.get('error') or v.get('na'))}"
                                                   for k, v in row["impls"].items()), flush=True)
        del x, ref
    return dict(meta=meta, results=results)


def to_markdown(report: Dict[str, object]) -> str:
    return attention_markdown(report["meta"], report["results"])


# ------------------------------------------------------------------------------ pytest-benchmark


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_attention(benchmark, shape_name, stage, impl):
    if stage not in IMPLS[impl][1]:
        pytest.skip(f"{impl} has no double backward")
    if impl == "xformers" and xformers_unavailable():
        pytest.skip(f"xformers: {xformers_unavailable()}")
    shape = SHAPES[shape_name]
    step = make_step(impl, stage, make_inputs(shape))
    step()
    try:
        peak = peak_memory_bytes(step)
    except torch.cuda.OutOfMemoryError:  # the quadratic baselines at long N on a small GPU
        pytest.skip(f"{impl} {stage} {shape_name}: out of GPU memory")
    benchmark.extra_info.update(shape=list(shape), dtype=str(DTYPE), impl=impl, stage=stage, peak_mem_bytes=peak,
                                flops=stage_flops(shape, stage))
    rounds, warmup = (10, 2) if CUDA else (2, 0)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)


def main(argv=None) -> int:
    return kernel_bench_main(argv, description=__doc__.split("\n\n")[0], stem="attention_bench", run=run,
                             to_markdown=to_markdown, cuda=CUDA, gpu_reps=10)


if __name__ == "__main__":
    raise SystemExit(main())

"""Fused normalise + corrupt CUDA kernel vs the PyTorch reference pipeline (``prepare_batch``).

Two ways to run it:

    pytest benchmarks/bench_corrupt.py --benchmark-only       # pytest-benchmark table
    python benchmarks/bench_corrupt.py --out benchmarks/results  # JSON + Markdown with ratios

On a CUDA machine: a 256 x 3 x 224 x 224 uint8 batch, every task alone and ``mix``. Three timings:
``fused`` = ``prepare_batch(backend="cuda")`` (plan + kernel, what training calls), ``kernel`` = the
op alone on a ready plan, ``reference`` = ``prepare_batch(backend="reference")`` on the same GPU.
Throughput counts the bytes the kernel must move (uint8 input read once; clean, corrupted and
weight written once) and is compared with the card's copy bandwidth, measured here by timing a
device-to-device copy. Targets (issue 4): fused >= 5x faster than the reference, kernel time
<= 2x the copy-bandwidth bound. Without CUDA: a smoke mode that runs the reference on a tiny batch
(its timings mean nothing). Timed callables synchronise the GPU.

JSONL rows (``--rows``), one per task set, written as each finishes: ``tasks``, ``reference_ms``,
``fused_ms``, ``kernel_ms``, ``speedup_fused_vs_reference``, ``kernel_GBps``,
``kernel_vs_copy_bound``, ``bitwise_equal_to_reference``, ``{reference,fused}_peak_mem_bytes``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from _bench import prepare_triton_env

prepare_triton_env()  # before fastebm (which may import triton)

import pytest  # noqa: E402
import torch  # noqa: E402
from _bench import RowLog, environment, kernel_bench_main, peak_memory_bytes, sync, time_ms  # noqa: E402
from _tables import corrupt_markdown  # noqa: E402

from fastebm.corrupt import _ext, make_plan, prepare_batch  # noqa: E402
from fastebm.corrupt.api import IMAGENET_MEAN, IMAGENET_STD, _prepare_tasks  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = (256, 3, 224, 224) if CUDA else (4, 3, 32, 32)
PATCH = 16 if CUDA else 8
TASK_SETS = {"mix": "mix", "mim": "mim", "sort": "sort", "sr": "sr", "denoise": "denoise", "colorize": "colorize"}


def make_images(shape=SHAPE, device=DEVICE, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)


def make_step(impl: str, images: torch.Tensor, tasks) -> Callable[[], object]:
    """A callable running one corruption of ``images`` with ``impl`` and synchronising."""
    if impl == "kernel":  # the op alone, on a plan made once
        names, params = _prepare_tasks(tasks, None)
        mean = torch.tensor(IMAGENET_MEAN, device=images.device)
        std = torch.tensor(IMAGENET_STD, device=images.device)
        ids = torch.arange(images.shape[0], device=images.device)
        plan = make_plan(images.shape, images.device, names, params, seed=1, offset=0, sample_ids=ids,
                         patch_size=PATCH, std=std)
        task_ids = plan.task_ids.to(torch.int32)

        def kernel():
            out = torch.ops.fastebm.fused_corrupt(images, task_ids, plan.patch_src, ids, mean, std, plan.noise_scale,
                                                  1, 0, 0, PATCH, plan.sr_factor)
            sync()
            return out

        return kernel
    backend = "cuda" if impl == "fused" else "reference"

    def step():
        out = prepare_batch(images, tasks, seed=1, offset=0, patch_size=PATCH, backend=backend)
        sync()
        return out

    return step


def bytes_moved(shape=SHAPE, in_bytes=1) -> int:
    """Minimum traffic of one fused pass: read the input, write clean + corrupted (fp32) + weight."""
    b, c, h, w = shape
    return b * c * h * w * in_bytes + 2 * b * c * h * w * 4 + b * h * w * 4


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        torch.cuda.synchronize()

    return 2 * nbytes / (time_ms(copy, reps, 3) * 1e-3)


# ---------------------------------------------------------------------------------- pytest-benchmark

IMPLS = ("fused", "kernel", "reference") if CUDA else ("reference",)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tasks", ["mix", "denoise"])
def test_corrupt(benchmark, impl, tasks):
    if impl != "reference" and not _ext.load_extension():
        pytest.fail(f"the CUDA extension did not build: {_ext.extension_error()}")
    images = make_images()
    benchmark.extra_info.update(shape=list(SHAPE), device=DEVICE, bytes=bytes_moved())
    benchmark(make_step(impl, images, tasks))


@pytest.mark.skipif(not CUDA, reason="copy bandwidth needs a CUDA GPU")
def test_copy_bandwidth(benchmark):
    n = bytes_moved()
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        torch.cuda.synchronize()

    benchmark(copy)


# ---------------------------------------------------------------------------------- script mode


def run(reps: int, warmup: int, rows: Optional[RowLog] = None) -> Dict[str, object]:
    rows = rows or RowLog(None)
    images = make_images()
    env = environment()
    meta: Dict[str, object] = dict(benchmark="corrupt", device=env["device"], torch=env["torch"], cuda=env["cuda"],
                                   date=env["date"], shape=list(SHAPE), input_dtype="uint8", patch_size=PATCH,
                                   bytes_per_call=bytes_moved(), reps=reps, warmup=warmup)
    have_kernel = CUDA and _ext.load_extension()
    if CUDA and not have_kernel:
        meta["kernel_error"] = _ext.extension_error()
    if CUDA:
        meta["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
    rows.meta(meta)
    results = []
    for name, tasks in TASK_SETS.items() if CUDA else [("mix", "mix")]:
        row = measure_tasks(name, tasks, images, reps, warmup, have_kernel, meta.get("copy_bandwidth_GBps"))
        rows.write(row)
        results.append(row)
        print(row, flush=True)
    return dict(meta=meta, results=results)


def measure_tasks(name, tasks, images, reps, warmup, have_kernel, copy_gbps) -> Dict[str, object]:
    """One table row: the reference, and where the kernel is available the fused path and the bare kernel."""
    row: Dict[str, object] = {"tasks": name}
    reference = make_step("reference", images, tasks)
    row["reference_ms"] = time_ms(reference, reps, warmup)
    row["reference_peak_mem_bytes"] = peak_memory_bytes(reference)
    if not have_kernel:
        return row
    fused = make_step("fused", images, tasks)
    row["fused_ms"] = time_ms(fused, reps, warmup)
    row["fused_peak_mem_bytes"] = peak_memory_bytes(fused)
    row["kernel_ms"] = time_ms(make_step("kernel", images, tasks), reps, warmup)
    row["speedup_fused_vs_reference"] = row["reference_ms"] / row["fused_ms"]
    row["kernel_GBps"] = bytes_moved() / (row["kernel_ms"] * 1e-3) / 1e9
    row["kernel_vs_copy_bound"] = row["kernel_ms"] / (1e3 * bytes_moved() / (copy_gbps * 1e9))
    out, ref = fused(), reference()
    row["bitwise_equal_to_reference"] = all(
        torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                    b.view(torch.int32) if b.is_floating_point() else b) for a, b in zip(out, ref))
    return row


def to_markdown(report: Dict[str, object]) -> str:
    return corrupt_markdown(report["meta"], report["results"])


def main(argv=None) -> int:
    return kernel_bench_main(argv, description=__doc__.split("\n\n")[0], stem="corrupt_bench", run=run,
                             to_markdown=to_markdown, cuda=CUDA, gpu_reps=20)


if __name__ == "__main__":
    raise SystemExit(main())

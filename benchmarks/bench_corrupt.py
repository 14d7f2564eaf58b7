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
"""
from __future__ import annotations

import datetime
import os
import statistics
import time
from typing import Callable, Dict

import pytest
import torch
from _report import kernel_bench_main

from fastebm.corrupt import _ext, make_plan, prepare_batch
from fastebm.corrupt.api import IMAGENET_MEAN, IMAGENET_STD, _prepare_tasks

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = (256, 3, 224, 224) if CUDA else (4, 3, 32, 32)
PATCH = 16 if CUDA else 8
TASK_SETS = {"mix": "mix", "mim": "mim", "sort": "sort", "sr": "sr", "denoise": "denoise", "colorize": "colorize"}


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


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
            _sync()
            return out

        return kernel
    backend = "cuda" if impl == "fused" else "reference"

    def step():
        out = prepare_batch(images, tasks, seed=1, offset=0, patch_size=PATCH, backend=backend)
        _sync()
        return out

    return step


def bytes_moved(shape=SHAPE, in_bytes=1) -> int:
    """Minimum traffic of one fused pass: read the input, write clean + corrupted (fp32) + weight."""
    b, c, h, w = shape
    return b * c * h * w * in_bytes + 2 * b * c * h * w * 4 + b * h * w * 4


def time_step(step: Callable[[], object], reps: int, warmup: int) -> float:
    """Median wall time of ``step`` in seconds."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        torch.cuda.synchronize()

    return 2 * nbytes / time_step(copy, reps, 3)


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


def _device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run(reps: int, warmup: int) -> Dict[str, object]:
    images = make_images()
    report: Dict[str, object] = {
        "benchmark": "fused corruption kernel vs PyTorch reference (prepare_batch)",
        "device": _device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": list(SHAPE),
        "input_dtype": "uint8",
        "patch_size": PATCH,
        "bytes_per_call": bytes_moved(),
        "results": [],
    }
    have_kernel = CUDA and _ext.load_extension()
    if CUDA and not have_kernel:
        report["kernel_error"] = _ext.extension_error()
    if CUDA:
        report["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
    for name, tasks in TASK_SETS.items() if CUDA else [("mix", "mix")]:
        row: Dict[str, object] = {"tasks": name}
        row["reference_ms"] = 1e3 * time_step(make_step("reference", images, tasks), reps, warmup)
        if have_kernel:
            row["fused_ms"] = 1e3 * time_step(make_step("fused", images, tasks), reps, warmup)
            row["kernel_ms"] = 1e3 * time_step(make_step("kernel", images, tasks), reps, warmup)
            row["speedup_fused_vs_reference"] = row["reference_ms"] / row["fused_ms"]
            row["kernel_GBps"] = bytes_moved() / (row["kernel_ms"] * 1e-3) / 1e9
            bound_ms = 1e3 * bytes_moved() / (report["copy_bandwidth_GBps"] * 1e9)
            row["kernel_vs_copy_bound"] = row["kernel_ms"] / bound_ms
            fused = make_step("fused", images, tasks)()
            ref = make_step("reference", images, tasks)()
            row["bitwise_equal_to_reference"] = all(
                torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                            b.view(torch.int32) if b.is_floating_point() else b) for a, b in zip(fused, ref))
        report["results"].append(row)
    report["targets"] = _targets(report["results"]) if have_kernel else {}
    return report


def _targets(rows) -> Dict[str, object]:
    mix = next(r for r in rows if r["tasks"] == "mix")
    return {
        "fused >= 5x faster than reference (mix)": mix["speedup_fused_vs_reference"] >= 5,
        "kernel <= 2x copy-bandwidth bound (every task)": all(r["kernel_vs_copy_bound"] <= 2 for r in rows),
        "bitwise equal to reference (every task)": all(r["bitwise_equal_to_reference"] for r in rows),
    }


def _fmt(v, spec=".3f") -> str:
    return "—" if v is None else format(v, spec)


def to_markdown(report: Dict[str, object]) -> str:
    lines = [
        "# Fused corruption kernel vs PyTorch reference",
        "",
        f"- device: {report['device']}; torch {report['torch']}, CUDA {report['cuda']}; {report['date_utc']}",
        f"- batch {report['shape']} {report['input_dtype']}, patch {report['patch_size']}; "
        f"{report['bytes_per_call'] / 1e6:.1f} MB moved per call (input read + outputs written once)",
    ]
    if "copy_bandwidth_GBps" in report:
        lines.append(f"- device-to-device copy bandwidth: {report['copy_bandwidth_GBps']:.0f} GB/s")
    if "kernel_error" in report:
        lines.append(f"- kernel unavailable: {report['kernel_error']}")
    lines += ["", "| tasks | reference ms | fused ms | kernel ms | speedup | kernel GB/s | kernel / copy bound | bitwise |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(
            f"| {r['tasks']} | {_fmt(r['reference_ms'])} | {_fmt(r.get('fused_ms'))} | {_fmt(r.get('kernel_ms'))} | "
            f"{_fmt(r.get('speedup_fused_vs_reference'), '.1f')} | {_fmt(r.get('kernel_GBps'), '.0f')} | "
            f"{_fmt(r.get('kernel_vs_copy_bound'), '.2f')} | {r.get('bitwise_equal_to_reference', '—')} |")
    if report["targets"]:
        lines += ["", "Targets:"] + [f"- {k}: {'met' if v else 'NOT met'}" for k, v in report["targets"].items()]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    return kernel_bench_main(argv, description=__doc__.split("\n\n")[0], stem="corrupt_bench", run=run,
                             to_markdown=to_markdown, cuda=CUDA, gpu_reps=20)


if __name__ == "__main__":
    raise SystemExit(main())

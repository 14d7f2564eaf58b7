"""Helpers shared by the benchmark scripts and gpu_check.sh.

- ``nvidia_gpu_present()`` / ``prepare_triton_env()``: the one GPU test, made without importing
  torch or triton (Triton picks its interpreter from TRITON_INTERPRET at its first import);
- ``time_ms``, ``peak_memory_bytes``, ``measure_peak_flops``, ``sync``: timing and memory;
- ``RowLog``: one JSON line per finished measurement, flushed at once, so a killed run keeps its rows;
- ``write_report``: atomic JSON + Markdown; ``kernel_bench_main``: the kernel benchmarks' CLI;
- ``environment()``: versions, device and date for the reports.

Importing this module imports nothing heavy. As a script (used by gpu_check.sh):

    python3 benchmarks/_bench.py env --out env.json [--require-gpu]   # exit 3: no GPU visible to torch
    python3 benchmarks/_bench.py build-ext                             # JIT-build the CUDA extension once
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, Optional


def nvidia_gpu_present() -> bool:
    """True where an NVIDIA GPU is visible, judged without importing torch or triton: a
    ``/dev/nvidia0`` device node or ``nvidia-smi`` on PATH, unless ``CUDA_VISIBLE_DEVICES`` is
    empty or ``-1`` (which hides every GPU from CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def prepare_triton_env() -> bool:
    """Choose Triton's interpreter where no GPU is present (call before the first ``import
    triton``); an explicit TRITON_INTERPRET is left alone. Returns True if the interpreter is on."""
    if "TRITON_INTERPRET" not in os.environ and not nvidia_gpu_present():
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- timing and memory
def sync(device=None) -> None:
    """Wait for the GPU (no-op on CPU): host timers read after this see finished work."""
    import torch

    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_ms(step: Callable[[], object], reps: int, warmup: int) -> float:
    """Median wall time of ``step`` in milliseconds; ``step`` must synchronise the GPU itself."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_bytes(step: Callable[[], object]) -> Optional[int]:
    """Peak GPU memory one call of ``step`` allocates above what was allocated before (None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def measure_peak_flops(device) -> Dict[str, object]:
    """The device's attainable matmul rate, measured here: best of 20 bf16 8192^3 products on CUDA
    (5 fp32 1024^3 on CPU). Returns ``peak_flops`` (FLOP/s), ``peak_dtype``, ``matmul_n``."""
    import torch

    device = torch.device(device)
    n, dtype, reps = (8192, torch.bfloat16, 20) if device.type == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"peak_flops": 2 * n ** 3 / best, "peak_dtype": str(dtype).replace("torch.", ""), "matmul_n": n}


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def error_text(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (for a table cell)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:limit]


# ----------------------------------------------------------------------------- environment
def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def environment() -> Dict[str, object]:
    """Versions, device and date: what every report records."""
    import torch

    env: Dict[str, object] = dict(
        date=utc_now(), python=platform.python_version(), host=platform.node(), torch=torch.__version__,
        cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(), device=device_name(),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(capability=f"sm_{props.major}{props.minor}", sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), device_count=torch.cuda.device_count())
    for module in ("triton", "xformers", "pytest_timeout"):
        try:
            mod = __import__(module)
            env[module] = getattr(mod, "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 - optional: record why it is missing
            env[module] = None if isinstance(exc, ModuleNotFoundError) else f"unusable: {error_text(exc)}"
    smi = shutil.which("nvidia-smi")
    if smi:
        import subprocess

        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = (out.stdout.strip() or out.stderr.strip())[:300]
    return env


# ----------------------------------------------------------------------------- rows and reports
class RowLog:
    """Appends one JSON object per line to ``path`` (nothing when ``path`` is None), flushed and
    fsync'd per line: a run that is killed keeps every finished row. ``meta(dict)`` writes a
    ``{"meta": ...}`` line (run information); other lines are rows."""

    def __init__(self, path: Optional[str]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, row: Dict[str, object]) -> None:
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def meta(self, info: Dict[str, object]) -> None:
        self.write({"meta": info})


def atomic_write(path: str, text: str) -> None:
    """``text`` as the whole of ``path``, its folder made first, through fastebm's atomic writer
    (:func:`fastebm.files.atomic_write_text`: temp file + rename, never half-written). Imported here,
    not at the top: importing fastebm imports torch (not triton), and this module stays light."""
    from fastebm.files import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)


def write_report(report: dict, markdown: str, out_dir: str, stem: str) -> str:
    """Writes ``OUT_DIR/STEM.json`` and ``OUT_DIR/STEM.md`` atomically, prints the table; returns the path stem."""
    path = os.path.join(out_dir, stem)
    atomic_write(path + ".json", json.dumps(report, indent=2, default=str))
    atomic_write(path + ".md", markdown)
    print(markdown)
    print(f"wrote {path}.json and {path}.md", flush=True)
    return path


def kernel_bench_main(argv, *, description: str, stem: str, run, to_markdown, cuda: bool, gpu_reps: int) -> int:
    """Command line shared by the kernel benchmarks: ``--out``, ``--reps``, ``--warmup``, ``--rows``.

    ``run(reps, warmup, rows)`` gets a :class:`RowLog`. CPU smoke results are not results: without
    CUDA they go to a temporary folder by default and their file names say ``cpu_smoke``.
    """
    import argparse

    parser = argparse.ArgumentParser(description=description)
    default_out = "benchmarks/results" if cuda else os.path.join(tempfile.gettempdir(), "fastebm_bench")
    parser.add_argument("--out", default=default_out, help=f"folder for {stem}.{{json,md}} ({default_out})")
    parser.add_argument("--reps", type=int, default=gpu_reps if cuda else 2)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 0)
    parser.add_argument("--rows", default=None, help="also append every row, as it finishes, to this JSONL file")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    report = run(args.reps, args.warmup, RowLog(args.rows))
    write_report(report, to_markdown(report), args.out, stem if cuda else stem + "_cpu_smoke")
    return 0


# ----------------------------------------------------------------------------- gpu_check.sh verbs
def _build_extension() -> int:
    """Build (or load) the fused corruption kernel's CUDA extension once, so later steps only load it."""
    import torch

    if not torch.cuda.is_available():
        print("build-ext: torch sees no CUDA GPU; nothing to build (the corruption steps use the reference)")
        return 0
    from fastebm.corrupt import _ext

    t0 = time.perf_counter()
    ok = _ext.load_extension(verbose=True)
    took = time.perf_counter() - t0
    print(f"build-ext: {'ok' if ok else 'FAILED'} in {took:.1f} s" + ("" if ok else f": {_ext.extension_error()}"))
    return 0 if ok else 1


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="gpu_check.sh helpers")
    sub = parser.add_subparsers(dest="verb", required=True)
    env = sub.add_parser("env", help="print (and save) versions, device and date as JSON")
    env.add_argument("--out", default=None)
    env.add_argument("--require-gpu", action="store_true", help="exit 3 unless torch sees a CUDA GPU")
    sub.add_parser("build-ext", help="JIT-build the CUDA corruption extension")
    args = parser.parse_args(argv)
    prepare_triton_env()
    if args.verb == "build-ext":
        return _build_extension()
    info = environment()
    text = json.dumps(info, indent=2)
    print(text)
    if args.out:
        atomic_write(args.out, text)
    print(f"env: {info['device']} {info.get('capability', '')}; torch {info['torch']}, triton {info.get('triton')}, "
          f"xformers {info.get('xformers') or 'not installed'}")
    if args.require_gpu and not info["cuda_available"]:
        print(f"env: torch {info['torch']} sees no CUDA GPU (nvidia-smi: {info.get('nvidia_smi', 'not found')}); "
              "this is a GPU check: fix the driver/CUDA install, or run with --dry-run", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

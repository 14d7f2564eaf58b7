#!/usr/bin/env python
"""Input pipeline throughput: the DALI loader against the torch (PIL) loader on the same folder.

Loaders, each over the same samples, crops and flips (``fastebm.data.streams.build_stream``):

  torch       ``MicroBatchStream``: PIL decode + random-resized crop + flip in DataLoader workers
              (``num_workers`` processes; 0 = the main process);
  dali-cpu    ``DaliMicroBatchStream`` on a CPU device: DALI's CPU operators, ``num_threads`` threads;
  dali-mixed  the same on a CUDA device: nvJPEG ("mixed") decode, resize and flip on the GPU, images
              left on the device (only where a GPU and DALI are present).

For each loader and each worker count (1, 2 and all CPUs by default) it times ``--batches``
micro-batches after ``--warmup`` ones, each run from a fresh stream (so DataLoader worker start-up
and DALI's pipeline build fall in the warm-up), and reports images/s. It also times DALI's one-off
file index (a full PIL decode of every file, parallel; cached afterwards) for a cold cache.

Usage:
    python benchmarks/bench_loader.py --out benchmarks/results                 # generated folder
    python benchmarks/bench_loader.py --data /datasets/imagenet/train --img_size 224 --batch_size 256
    python benchmarks/bench_loader.py --small --out /tmp/x                     # smoke test (CI)

The generated folder holds ``--images`` JPEGs (quality 90) with sides drawn from 256-500 px, made
once per ``--cache`` folder. Run it on an otherwise idle machine (``nice`` does not stop others from
slowing it down); CPU timings on shared machines are indicative only.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import write_report  # noqa: E402

from fastebm.data.folder import ImageFolderData  # noqa: E402
from fastebm.data.sampling import BatchPlan  # noqa: E402
from fastebm.data.streams import build_stream, folder_index  # noqa: E402


def make_folder(root: str, count: int, lo: int, hi: int, seed: int = 0) -> str:
    """``count`` JPEGs of smooth random content with sides in [lo, hi] under two class folders."""
    marker = os.path.join(root, f".complete_{count}_{lo}_{hi}")
    if os.path.exists(marker):
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
        y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
        planes = [127 + 100 * np.sin(2 * np.pi * (rng.uniform(1, 6) * x + rng.uniform(1, 6) * y) + rng.uniform(0, 6))
                  for _ in range(3)]
        img = np.clip(np.stack(planes, -1) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = os.path.join(root, f"class{i % 2}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    open(marker, "w").close()
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(kind: str, source, device: torch.device, workers: int, batch_size: int, batches: int, warmup: int,
                index) -> Dict:
    """images/s of ``batches`` micro-batches after ``warmup`` (the first one includes start-up)."""
    need = batches + warmup
    plan = BatchPlan(len(source), batch_size, 1, 1, 0, seed=0)
    if plan.steps_per_epoch < need:
        raise SystemExit(f"the folder has {len(source)} images: fewer than {need} batches of {batch_size}; "
                         f"use more --images or fewer --batches")
    stream = build_stream(kind, source, plan, device, num_workers=workers, index=index)
    it = stream.iterate(0, need)
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    _sync(device)
    t2 = time.perf_counter()
    assert batch["images"].shape == (batch_size, 3, source.img_size, source.img_size)
    it.close()
    return {"images_per_s": batches * batch_size / (t2 - t1), "startup_s": t1 - t0,
            "images_device": str(batch["images"].device)}


def run(args) -> Dict:
    all_cpus = os.cpu_count() or 1
    worker_counts = sorted({int(w) if w != "all" else all_cpus for w in args.workers.split(",")})
    data = args.data or make_folder(os.path.join(args.cache, f"jpegs_{args.images}"), args.images,
                                    args.min_side, args.max_side)
    source = ImageFolderData(data, args.img_size, seed=0)
    cuda = torch.cuda.is_available()
    try:
        from fastebm.data.dali import require_dali

        dali_version = require_dali().__version__
    except Exception as exc:  # noqa: BLE001 - reported, torch rows still run
        dali_version, dali_error = None, str(exc)
    info = dict(
        device=torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        cpus=all_cpus, torch=torch.__version__, dali=dali_version, python=platform.python_version(),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), data=data, images=len(source),
        img_size=args.img_size, batch_size=args.batch_size, batches=args.batches, warmup=args.warmup,
    )
    results: List[Dict] = []
    index = None
    if dali_version:
        cache = tempfile.mkdtemp(prefix="fastebm_dali_index_")
        try:
            t0 = time.perf_counter()
            folder_index(source, all_cpus, cache_dir=cache)
            info["index_cold_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            index = folder_index(source, all_cpus, cache_dir=cache)
            info["index_cached_s"] = time.perf_counter() - t0
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        info["index_summary"] = index.summary()
    else:
        info["dali_error"] = dali_error
    loaders = [("torch", "torch", torch.device("cuda" if cuda else "cpu"))]
    if dali_version:
        loaders.append(("dali-cpu", "dali", torch.device("cpu")))
        if cuda:
            loaders.append(("dali-mixed", "dali", torch.device("cuda")))
    for name, kind, device in loaders:
        for w in worker_counts:
            row = {"loader": name, "workers": w}
            try:
                row.update(time_loader(kind, source, device, w, args.batch_size, args.batches, args.warmup, index))
            except Exception as exc:  # noqa: BLE001 - one failing loader must not hide the others
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(row, flush=True)
            results.append(row)
    torch_rate = {r["workers"]: r.get("images_per_s") for r in results if r["loader"] == "torch"}
    for r in results:
        if r.get("images_per_s") and torch_rate.get(r["workers"]):
            r["vs_torch"] = r["images_per_s"] / torch_rate[r["workers"]]
    return {"info": info, "results": results}


def to_markdown(report: Dict) -> str:
    info = report["info"]
    lines = [f"# Loader throughput: {info['device']}, {info['cpus']} CPUs", "",
             f"- {info['images']} images from `{info['data']}`, {info['img_size']} px out, batch {info['batch_size']}, "
             f"{info['batches']} timed batches after {info['warmup']} warm-up",
             f"- torch {info['torch']}, DALI {info['dali'] or 'not installed'}, python {info['python']}, {info['date']}"]
    if info.get("index_cold_s") is not None:
        per_image_ms = info["index_cold_s"] / info["images"] * 1e3
        lines.append(f"- DALI file index: {info['index_cold_s']:.2f} s cold ({per_image_ms:.2f} ms per image, "
                     f"{info['cpus']} threads), {info['index_cached_s']:.2f} s cached")
    lines += ["", "| loader | workers | images/s | vs torch | start-up s | images on |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['loader']} | {r['workers']} | error: {r['error']} | | | |")
            continue
        ratio = f"{r['vs_torch']:.2f}x" if r.get("vs_torch") else ""
        lines.append(f"| {r['loader']} | {r['workers']} | {r['images_per_s']:.1f} | {ratio} | {r['startup_s']:.2f} | "
                     f"{r['images_device']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="image folder to read (default: a generated folder of JPEGs)")
    p.add_argument("--images", type=int, default=512, help="generated images (default 512)")
    p.add_argument("--min_side", type=int, default=256)
    p.add_argument("--max_side", type=int, default=500)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "fastebm_bench_loader"),
                   help="where the generated folder is kept between runs")
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--batches", type=int, default=10, help="timed micro-batches per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", default="1,2,all", help="comma-separated worker/thread counts; 'all' = every CPU")
    p.add_argument("--small", action="store_true", help="smoke test: 24 small images, batch 4, 2 batches, 1 worker")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="file name suffix (default: cpu or gpu)")
    args = p.parse_args(argv)
    if args.small:
        args.images, args.min_side, args.max_side, args.img_size = 24, 40, 90, 32
        args.batch_size, args.batches, args.warmup, args.workers = 4, 2, 1, "1"
    report = run(args)
    tag = args.tag or ("small" if args.small else "gpu" if torch.cuda.is_available() else "cpu")
    write_report(report, to_markdown(report), args.out, f"loader_{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""End-to-end training-step benchmark: images/s, peak memory and MFU per engine.

Engines compared side by side in one run, on the same batch size:

  baseline  what a user writes without fastebm: a plain PyTorch ViT (benchmarks/_plain_vit.py),
            SDPA forced to the math backend (the only SDPA path with a double backward), the energy
            gradient by ``torch.autograd.grad(create_graph=True)``, then ``loss.backward()``; under
            bf16 autocast PyTorch's math SDPA upcasts to fp32 by default;
  baseline_bf16  the same with ``allow_fp16_bf16_reduction_math_sdp(True)``: attention math in bf16,
            the plain-PyTorch bf16 number (so fastebm's speed-up is not a precision change);
  eager     fastebm RestorationObjective(engine="eager"), attention "auto" (the fused Triton
            attention on a GPU, math on CPU);
  func      engine="func" (torch.func.grad inside torch.compile; math attention);
  explicit  engine="explicit" (hand-written input gradient + attention custom ops, torch.compile;
            Triton kernels on a GPU, math reference on CPU).

One timed step = the restoration forward (T gradient steps + loss), ``loss.backward()`` and an AdamW
update. bf16 autocast on CUDA (fp32 weights), fp32 on CPU.

FLOPs are counted analytically per image (matmuls only, model FLOPs: no recomputation counted).
With N tokens (1 + patches), Np patches, D width, L depth, P = C * p * p pixels per patch:

    F_fwd = 2 Np P D + L * (24 N D^2 + 4 N^2 D)      energy forward: qkv 6ND^2, proj 2ND^2, MLP 16ND^2,
                                                      QK^T and PV 2N^2D each
    F_in  = 2 Np P D + L * (24 N D^2 + 8 N^2 D)      dE/dx: each linear's input gradient (same FLOPs as
                                                      its forward), attention dP, dV, dQ, dK (2N^2D each)
    per restoration step that keeps its graph:  3 * (F_fwd + F_in)   (the graph, then its backward at
                                                      the usual 2x the FLOPs of what it differentiates)
    per step without a graph (truncated mode):  F_fwd + F_in

MFU = (FLOPs per training step) / (step time) / (peak), where the peak is measured by this script with
a large bf16 matmul on the GPU (fp32 on CPU), not taken from a data sheet.

JSONL rows (``--rows``), one per engine as it finishes (after a ``{"meta": ...}`` line): model, steps,
engine, batch, images_per_s, step_ms, peak_mem_gib, first_step_s, attn_backend, compiled, tflops, mfu,
speedup_vs_baseline[_bf16], mem_vs_baseline[_bf16], or ``error``.

Usage:
    python benchmarks/bench_train_step.py --out benchmarks/results            # GPU: ViT-S/B, T=1,2
    python benchmarks/bench_train_step.py --small --out /tmp/x                # CPU smoke test (CI)
    python benchmarks/bench_train_step.py --config demo                       # CPU mid-size (vit_demo)
    python benchmarks/bench_train_step.py --profile                           # + top CUDA kernels
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
import traceback
from typing import Dict, List

from _bench import prepare_triton_env

# Without a GPU the Triton kernels can only run in the interpreter (far too slow to benchmark), but
# choosing it keeps imports working; the CPU modes never use the Triton backend.
prepare_triton_env()

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastebm  # noqa: E402
from _bench import RowLog, atomic_write, environment, error_text, is_oom, measure_peak_flops, sync  # noqa: E402
from _plain_vit import BaselineStep, PlainViTEnergy  # noqa: E402
from _tables import train_step_markdown  # noqa: E402

ENGINES = ("baseline", "baseline_bf16", "eager", "func", "explicit")
BASELINES = ("baseline", "baseline_bf16")

MODELS = {
    # name: (img, patch, width, depth, heads)
    "vit_small_patch16": (224, 16, 384, 12, 6),
    "vit_base_patch16": (224, 16, 768, 12, 12),
    "vit_demo": (32, 4, 128, 4, 4),
    "tiny": (32, 8, 64, 2, 2),
}


# ------------------------------------------------------------------------------ FLOPs
def flops_per_image(img: int, patch: int, dim: int, depth: int, chans: int = 3) -> Dict[str, float]:
    n_p = (img // patch) ** 2
    n = n_p + 1
    pix = chans * patch * patch
    f_fwd = 2 * n_p * pix * dim + depth * (24 * n * dim ** 2 + 4 * n ** 2 * dim)
    f_in = 2 * n_p * pix * dim + depth * (24 * n * dim ** 2 + 8 * n ** 2 * dim)
    return {"fwd": float(f_fwd), "input_grad": float(f_in)}


def flops_per_step(model_name: str, steps: int, batch: int, grad_mode: str = "exact") -> float:
    img, patch, dim, depth, _ = MODELS[model_name]
    f = flops_per_image(img, patch, dim, depth)
    graph_steps = steps if grad_mode == "exact" else 1
    per_image = graph_steps * 3 * (f["fwd"] + f["input_grad"]) + (steps - graph_steps) * (f["fwd"] + f["input_grad"])
    return per_image * batch


# ------------------------------------------------------------------------------ one measurement
def build(engine: str, model_name: str, steps: int, device, compile_backend: str):
    img, patch, dim, depth, heads = MODELS[model_name]
    if engine in BASELINES:
        model = PlainViTEnergy(img, patch, dim, depth, heads).to(device)
        runner = BaselineStep(model, steps, bf16_math=engine == "baseline_bf16")
        return runner, runner.parameters(), "sdpa-math-bf16" if runner.bf16_math else "sdpa-math", False
    attn = "math" if engine == "func" else "auto"
    model = fastebm.EnergyViT(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                              attn_backend=attn)
    obj = fastebm.RestorationObjective(model, steps=steps, engine=engine, compile_backend=compile_backend).to(device)
    probe = torch.empty(1, 1, 1, dim // heads, device=device)
    from fastebm.ops.attention import resolve_backend

    return obj, list(obj.parameters()), resolve_backend(probe, attn), obj.is_compiled


def make_batch(batch: int, img: int, device):
    clean = torch.randn(batch, 3, img, img, device=device)
    corrupted = clean.clone()
    weight = (torch.rand(batch, 1, img, img, device=device) < 0.6).float()
    corrupted = corrupted * (1 - weight)  # masked pixels -> 0, the loss counts the masked ones
    return clean, corrupted, weight


def time_engine(engine: str, model_name: str, steps: int, batch: int, device, args) -> Dict:
    img = MODELS[model_name][0]
    runner, params, attn, compiled = build(engine, model_name, steps, device, args.compile_backend)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    clean, corrupted, weight = make_batch(batch, img, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def train_step():
        with amp:
            loss, _ = runner(clean, corrupted, weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    train_step()  # first call: compilation (compiled engines), autotuning, allocator warm-up
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        train_step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        loss = train_step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.iters
    if not torch.isfinite(loss.detach()).all():
        raise RuntimeError(f"{engine}: non-finite loss {loss.item()}")
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    still_compiled = getattr(runner, "is_compiled", compiled)
    return dict(step_ms=1e3 * dt, images_per_s=batch / dt, peak_mem_gib=peak, first_step_s=first_s,
                attn_backend=attn, compiled=bool(still_compiled), runner=runner, step_fn=train_step)


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ driver
def plan(args, device):
    """``(configs, engines, first batch)`` of the mode; fills in the iteration defaults."""
    if args.small:
        configs, batch0 = [("tiny", 1)], args.batch or 8
        args.iters, args.warmup = args.iters or 2, 0 if args.warmup is None else args.warmup
    elif args.config == "demo":
        configs, batch0 = [("vit_demo", s) for s in args.steps], args.batch or 64
        args.iters, args.warmup = args.iters or 3, 1 if args.warmup is None else args.warmup
    else:
        if device.type != "cuda":
            raise SystemExit("the full benchmark needs a CUDA GPU; use --small or --config demo on CPU")
        # ViT-B T=1 first: the acceptance configuration, measured even when the time budget runs out
        configs = [(m, s) for s in args.steps for m in args.models]
        configs.sort(key=lambda c: (c[1], c[0] != "vit_base_patch16"))
        batch0 = args.batch or 128
        args.iters, args.warmup = args.iters or 10, 3 if args.warmup is None else args.warmup
    engines = args.engines or (["baseline", "baseline_bf16", "eager", "explicit", "func"] if device.type == "cuda"
                               else ["baseline", "baseline_bf16", "eager", "func", "explicit"])
    return configs, engines, batch0


def measure_engine(engine, model_name, steps, batch, device, args):
    """``(result dict or None, row)``; a baseline that runs out of memory halves the batch and retries."""
    row = dict(model=model_name, steps=steps, engine=engine, batch=batch)
    while True:
        try:
            return time_engine(engine, model_name, steps, row["batch"], device, args), row
        except Exception as exc:  # noqa: BLE001 - one engine's failure must not stop the rest
            _free(device)
            if is_oom(exc) and engine == "baseline" and row["batch"] > 1:
                row["batch"] //= 2  # the largest batch that fits the baseline is used for every engine
                continue
            row["error"] = error_text(exc)
            if args.verbose:
                traceback.print_exc()
            return None, row


def add_ratios(row: Dict, bases: Dict[str, Dict]) -> None:
    for name, base in bases.items():
        if base is row:
            continue
        suffix = "" if name == "baseline" else "_bf16"
        row[f"speedup_vs_baseline{suffix}"] = row["images_per_s"] / base["images_per_s"]
        if base.get("peak_mem_gib") and row.get("peak_mem_gib"):
            row[f"mem_vs_baseline{suffix}"] = row["peak_mem_gib"] / base["peak_mem_gib"]


def run(args, rows_log: RowLog, save) -> Dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small and args.config != "demo" else "cpu")
    configs, engines, batch0 = plan(args, device)
    env = environment()
    info = dict(
        device=env["device"] if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        torch=env["torch"], triton=env.get("triton"), python=env["python"], date=env["date"],
        dtype="bf16 autocast" if device.type == "cuda" else "fp32", compile_backend=args.compile_backend,
        iters=args.iters, warmup=args.warmup, grad_mode="exact", **measure_peak_flops(device),
    )
    rows_log.meta(info)
    print(f"# {info['device']} | torch {info['torch']} | triton {info['triton']} | peak "
          f"{info['peak_flops'] / 1e12:.3g} TFLOP/s ({info['peak_dtype']})", flush=True)
    start = time.perf_counter()
    rows: List[Dict] = []
    best = None
    for model_name, steps in configs:
        batch, bases = batch0, {}
        for engine in engines:
            if time.perf_counter() - start > args.budget_s:
                res, row = None, dict(model=model_name, steps=steps, engine=engine, batch=batch,
                                      error="skipped: time budget exhausted")
            else:
                res, row = measure_engine(engine, model_name, steps, batch, device, args)
                batch = row["batch"]
            if res is not None:
                res.pop("runner"), res.pop("step_fn")
                row.update(res)
                row["tflops"] = flops_per_step(model_name, steps, row["batch"]) / (res["step_ms"] / 1e3) / 1e12
                row["mfu"] = row["tflops"] * 1e12 / info["peak_flops"]
                if engine in BASELINES:
                    bases[engine] = row
                add_ratios(row, bases)
                if engine not in BASELINES and (best is None or row["images_per_s"] > best["images_per_s"]):
                    best = row
            rows.append(row)
            rows_log.write(row)
            print(_row_line(row), flush=True)
            _free(device)
            save(dict(info=info, results=rows, partial=True))  # a timeout still leaves every finished row
    result = dict(info=info, results=rows, flops_formula=__doc__.split("FLOPs are counted")[1].split("JSONL rows")[0].strip())
    if args.profile and best is not None and time.perf_counter() - start > args.budget_s:
        result["profile"] = "not profiled: time budget exhausted"
    elif args.profile and best is not None:
        try:
            result["profile"] = profile(best, device, args)
        except Exception as exc:  # noqa: BLE001
            result["profile"] = f"profiling failed: {error_text(exc)}"
    return result


def profile(row, device, args) -> str:
    """Rebuilds the fastest engine (nothing else alive on the device; compile caches are warm) and
    profiles 3 steps."""
    from torch.profiler import ProfilerActivity, profile as _profile

    prof_args = argparse.Namespace(**{**vars(args), "iters": 1, "warmup": 1})
    res = time_engine(row["engine"], row["model"], row["steps"], row["batch"], device, prof_args)
    step_fn = res["step_fn"]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _profile(activities=acts) as prof:
        for _ in range(3):
            step_fn()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=70)
    header = f"Top kernels, engine {row['engine']} ({row['model']}, T={row['steps']}, batch {row['batch']}), 3 steps"
    print("\n" + header + "\n" + table, flush=True)
    return header + "\n" + table


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _row_line(row: Dict) -> str:
    if "error" in row:
        return f"{row['model']} T={row['steps']} {row['engine']:>13}: {row['error']}"
    return (f"{row['model']} T={row['steps']} b={row['batch']} {row['engine']:>13}: {row['images_per_s']:9.1f} img/s  "
            f"{row['step_ms']:8.1f} ms  mem {_fmt(row.get('peak_mem_gib'), '.2f')} GiB  MFU {100 * row['mfu']:.1f}%  "
            f"x{_fmt(row.get('speedup_vs_baseline'), '.2f')} (bf16 base x{_fmt(row.get('speedup_vs_baseline_bf16'), '.2f')})  "
            f"first step {row['first_step_s']:.1f}s  attn={row['attn_backend']} compiled={row['compiled']}")


def markdown(result: Dict) -> str:
    return train_step_markdown(result["info"], result["results"], result.get("profile"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="output folder for train_step_<tag>.json and .md")
    p.add_argument("--rows", default=None, help="also append every row, as it finishes, to this JSONL file")
    p.add_argument("--small", action="store_true", help="CPU smoke test: tiny model, fp32, 2 timed steps")
    p.add_argument("--config", choices=["full", "demo"], default="full",
                   help="full: ViT-S/16 and ViT-B/16 at 224 px (GPU); demo: vit_demo on CPU")
    p.add_argument("--models", type=lambda s: s.split(","), default=["vit_small_patch16", "vit_base_patch16"])
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2], help="T values")
    p.add_argument("--engines", type=lambda s: s.split(","), default=None, help=f"subset of {','.join(ENGINES)}")
    p.add_argument("--batch", type=int, default=None, help="batch size (halved while the baseline runs out of memory)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of func/explicit")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="skip measurements that start after this many seconds")
    p.add_argument("--profile", action="store_true", help="print the top kernels (torch.profiler) of the fastest engine")
    p.add_argument("--tag", default=None, help="file-name tag (default: cpu_small, cpu_demo or the GPU name)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    for e in args.engines or []:
        if e not in ENGINES:
            p.error(f"unknown engine {e!r}; choose from {','.join(ENGINES)}")
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    os.makedirs(args.out, exist_ok=True)
    paths = {}

    def save(result):
        tag = args.tag or ("cpu_small" if args.small else "cpu_demo" if args.config == "demo" else
                           "".join(c if c.isalnum() else "_" for c in result["info"]["device"]).strip("_").lower())
        base = paths["base"] = os.path.join(args.out, f"train_step_{tag}")
        atomic_write(base + ".json", json.dumps(result, indent=2))
        atomic_write(base + ".md", markdown(result))

    result = run(args, RowLog(args.rows), save)
    save(result)
    print(f"\nwrote {paths['base']}.json and {paths['base']}.md")
    return 0 if any("error" not in r for r in result["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Markdown tables of the benchmarks' rows (standard library only).

The benchmark scripts render their reports with these functions, and gpu_check_summary.py renders
the same tables from the JSONL rows the scripts stream (so a killed run still gets its tables).
Row formats are documented in each benchmark script.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

ATTENTION_LABELS = {
    "fused": "fused (fastebm Triton)",
    "sdpa_math": "SDPA math, PyTorch default (bf16 upcast to fp32)",
    "sdpa_math_bf16": "SDPA math, bf16 reductions",
    "sdpa_default": "SDPA default dispatch (flash/efficient)",
    "xformers": "xformers memory_efficient_attention",
}
DBWD_BASELINES = ("sdpa_math", "sdpa_math_bf16")  # the baselines that have a double backward


def fmt(value, spec: str = ".3f", none: str = "—") -> str:
    if value is None:
        return none
    if isinstance(value, str):
        return value
    return format(value, spec)


def _mib(value) -> str:
    return fmt(None if value is None else value / 2 ** 20, ".1f")


def _pct(value) -> str:
    return fmt(None if value is None else 100 * value, ".1f") + ("" if value is None else "%")


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


# ----------------------------------------------------------------------------- attention
def attention_targets(rows: Iterable[dict]) -> Dict[str, dict]:
    """Issue 7's numbers: the double-backward speed-up of ``fused`` over the FASTER of the two SDPA
    math baselines must be >= 2x at N < 1024 and >= 5x at N >= 1024."""
    out = {}
    for row in rows:
        if row.get("stage") != "fwd_bwd_dbwd":
            continue
        impls = row.get("impls", {})
        fused = impls.get("fused", {}).get("ms")
        base = [impls.get(b, {}).get("ms") for b in DBWD_BASELINES]
        base = [b for b in base if b]
        need = 2.0 if row["shape"][2] < 1024 else 5.0
        got = min(base) / fused if fused and base else None
        out[row["shape_name"]] = dict(required=need, measured=got, met=bool(got and got >= need))
    return out


def attention_markdown(meta: dict, rows: List[dict]) -> str:
    meta = meta or {}
    lines = [
        "### Attention: fused Triton vs baselines (bench_attention.py)",
        "",
        f"- device: {meta.get('device')}; dtype {meta.get('dtype')}; torch {meta.get('torch')}; "
        f"triton {meta.get('triton')}; {meta.get('date')}",
        f"- median of {meta.get('reps')} runs after {meta.get('warmup')} warm-ups, each synchronised; measured peak "
        f"{fmt((meta.get('peak_flops') or 0) / 1e12, '.3g')} TFLOP/s ({meta.get('peak_dtype')}); "
        f"xformers: {meta.get('xformers')}",
        "- FLOPs: matmul FLOPs of the math algorithm (fwd 4, fwd+bwd 12, +double bwd 32 x B·H·N²·d), the same "
        "for every implementation; `fused x` = this row's time / fused time (> 1: fused is faster); "
        "`fused mem` = fused peak / this row's peak",
        "",
        "| shape (B,H,N,d) | stage | implementation | ms | TFLOP/s | MFU | peak MiB | fused x | fused mem | err vs fp64 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        impls = row.get("impls", {})
        fused = impls.get("fused", {})
        for name, res in impls.items():
            head = f"| {row['shape_name']} {tuple(row['shape'])} | {row['stage']} | {ATTENTION_LABELS.get(name, name)} |"
            if "ms" not in res:
                lines.append(f"{head} {_cell(res.get('error') or res.get('na') or '—')} | | | | | | |")
                continue
            ratio = res["ms"] / fused["ms"] if fused.get("ms") and name != "fused" else None
            mem = None
            if name != "fused" and isinstance(fused.get("peak_mem_bytes"), int) and res.get("peak_mem_bytes"):
                mem = fused["peak_mem_bytes"] / res["peak_mem_bytes"]
            lines.append(
                f"{head} {fmt(res['ms'])} | {fmt(res.get('tflops'), '.3g')} | {_pct(res.get('mfu'))} | "
                f"{_mib(res.get('peak_mem_bytes'))} | {fmt(ratio, '.3g')} | {fmt(mem, '.3g')} | "
                f"{fmt(res.get('err_vs_fp64'), '.1e')} |")
    targets = attention_targets(rows)
    if targets:
        lines += ["", "Targets (issue 7; double backward, fused vs the faster SDPA math baseline):", ""]
        for name, t in targets.items():
            lines.append(f"- {name}: required >= {t['required']}x, measured {fmt(t['measured'], '.2f')}x: "
                         f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- corruption
def corrupt_markdown(meta: dict, rows: List[dict]) -> str:
    meta = meta or {}
    lines = [
        "### Corruption: fused CUDA kernel vs PyTorch reference (bench_corrupt.py)",
        "",
        f"- device: {meta.get('device')}; torch {meta.get('torch')}, CUDA {meta.get('cuda')}; {meta.get('date')}",
        f"- batch {meta.get('shape')} {meta.get('input_dtype')}, patch {meta.get('patch_size')}; "
        f"{fmt((meta.get('bytes_per_call') or 0) / 1e6, '.1f')} MB moved per call (input read + outputs written once); "
        f"median of {meta.get('reps')} runs",
    ]
    if meta.get("copy_bandwidth_GBps"):
        lines.append(f"- device-to-device copy bandwidth: {meta['copy_bandwidth_GBps']:.0f} GB/s")
    if meta.get("kernel_error"):
        lines.append(f"- kernel unavailable: {_cell(meta['kernel_error'])[:300]}")
    lines += ["", "| tasks | reference ms | fused ms | kernel ms | fused x | kernel GB/s | kernel / copy bound | "
              "reference peak MiB | fused peak MiB | bitwise |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['tasks']} | {fmt(r.get('reference_ms'))} | {fmt(r.get('fused_ms'))} | {fmt(r.get('kernel_ms'))} | "
            f"{fmt(r.get('speedup_fused_vs_reference'), '.1f')} | {fmt(r.get('kernel_GBps'), '.0f')} | "
            f"{fmt(r.get('kernel_vs_copy_bound'), '.2f')} | {_mib(r.get('reference_peak_mem_bytes'))} | "
            f"{_mib(r.get('fused_peak_mem_bytes'))} | {r.get('bitwise_equal_to_reference', '—')} |")
    targets = corrupt_targets(rows)
    if targets:
        lines += ["", "Targets (issue 4):"] + [f"- {k}: {'met' if v else 'NOT met'}" for k, v in targets.items()]
    return "\n".join(lines) + "\n"


def corrupt_targets(rows: List[dict]) -> Dict[str, bool]:
    timed = [r for r in rows if r.get("fused_ms")]
    mix = next((r for r in timed if r["tasks"] == "mix"), None)
    if mix is None:
        return {}
    return {
        "fused >= 5x faster than reference (mix)": mix["speedup_fused_vs_reference"] >= 5,
        "kernel <= 2x copy-bandwidth bound (every task)": all(r["kernel_vs_copy_bound"] <= 2 for r in timed),
        "bitwise equal to reference (every task)": all(r["bitwise_equal_to_reference"] for r in timed),
    }


# ----------------------------------------------------------------------------- training step
def train_step_markdown(meta: dict, rows: List[dict], profile: Optional[str] = None) -> str:
    meta = meta or {}
    lines = [
        "### Training step per engine (bench_train_step.py)",
        "",
        f"- device: {meta.get('device')}; torch {meta.get('torch')}, triton {meta.get('triton')}; {meta.get('date')}",
        f"- precision: {meta.get('dtype')}; grad mode {meta.get('grad_mode')}; {meta.get('iters')} timed steps after "
        f"{meta.get('warmup')} warm-up steps (+ the first, compiling, step); compile backend {meta.get('compile_backend')}",
        f"- measured peak ({meta.get('peak_dtype')} {meta.get('matmul_n')}^3 matmul): "
        f"{fmt((meta.get('peak_flops') or 0) / 1e12, '.3g')} TFLOP/s",
        "- baseline: plain PyTorch ViT, SDPA math (bf16 upcast to fp32, PyTorch's default); baseline_bf16: the same "
        "with bf16 math reductions; `x base` / `x base bf16` = images/s over theirs, `mem` = peak memory over theirs",
        "",
        "| model | T | batch | engine | attention | compiled | images/s | step ms | peak mem GiB | MFU | "
        "x base | x base bf16 | mem / base | mem / base bf16 | first step s |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['steps']} | {r['batch']} | {r['engine']} |"
        if "error" in r:
            lines.append(f"{head} | | {_cell(r['error'])} | | | | | | | | |")
            continue
        lines.append(
            f"{head} {r['attn_backend']} | {r['compiled']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | "
            f"{fmt(r.get('peak_mem_gib'), '.2f')} | {_pct(r.get('mfu'))} | {fmt(r.get('speedup_vs_baseline'), '.2f')} | "
            f"{fmt(r.get('speedup_vs_baseline_bf16'), '.2f')} | {fmt(r.get('mem_vs_baseline'), '.2f')} | "
            f"{fmt(r.get('mem_vs_baseline_bf16'), '.2f')} | {r['first_step_s']:.1f} |")
    if profile:
        lines += ["", "```", profile, "```"]
    return "\n".join(lines) + "\n"

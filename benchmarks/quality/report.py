"""The quality benchmark's outputs: quality.json, quality.md (mean +- std over seeds), quality.png and
quality_curves.png (fine-tuning training loss and validation top-1 per optimiser step, per arm); with
``run.py --benchmark textures`` the same four files named textures.*.

Metrics per (arm, seed), from the runs' own summary.json files (top-1 fractions on the 497
held-out digits, or the texture benchmark's 500 test patches, unless said otherwise):

* ``ft_100`` / ``ft_all``: fine-tuning with 100 labels / all labels (fastebm-eval finetune, last epoch);
* ``lp_100`` / ``lp_all``: linear probe on the same labels (fastebm-eval linprobe); ``knn_all``: k-NN;
* ``ft_*_train``: the fine-tuning's training accuracy in its last epoch (augmented batches, train mode);
  ``ft_*_train_clean``: the fine-tuned classifier on its labelled training images (train_accuracy.py);
* ``ft_*_probe``: LP-FT's starting head (the logistic-regression probe on the same labels);
* ``ft_*_reprobe``: fastebm-eval linprobe of the fine-tuned backbone on the same labels (did
  fine-tuning keep or damage the features?);
* ``ft_*_loss_first`` / ``ft_*_loss_peak``: the fine-tuning's training loss in its first epoch and its
  maximum over the run (a warm-up spike rewrites the features the LP-FT head was fitted to);
* diagnostics (diagnose.py): fragility, final-block token std, attention entropy, effective rank.

The "stronger random init" of a metric is whichever of the random-init arms in the report (timm's or fastebm's, at 16 px or at 32 px)
has the higher mean.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from typing import Dict, List, Optional

import numpy as np

METRICS = ["ft_100", "lp_100", "ft_all", "lp_all", "knn_all"]
FIT = ["ft_100_train", "ft_100_train_clean", "ft_100_probe", "ft_100_reprobe", "ft_all_train", "ft_all_train_clean",
       "ft_all_probe", "ft_all_reprobe"]
DIAG = ["fragility", "last_token_std", "attn_entropy", "erank_pooled"]
# fine-tuning curves: training loss (label smoothing 0.1, augmented images) in the first epoch and its peak over the run
SPIKE = ["ft_100_loss_first", "ft_100_loss_peak", "ft_all_loss_first", "ft_all_loss_peak"]
TITLES = {"ft_100": "fine-tune, 100 labels", "lp_100": "linear probe, 100 labels", "ft_all": "fine-tune, 1,300 labels",
          "lp_all": "linear probe, 1,300 labels", "knn_all": "k-NN (k 20), 1,300 labels"}
# what the top-1 of each benchmark (run.py --benchmark) is measured on, its outputs' file stem, and its pixel reference
HELD_OUT = {"digits": "the 497 held-out digits", "textures": "the 500 test patches of unseen image regions"}
STEM = {"digits": "quality", "textures": "textures"}
# --quick's "all labels" runs use a 30-per-class subset (arms.Budget.label_sets), not the 1,300 the headers name
QUICK_LABELS = " (quick: the columns headed 1,300 labels use 30 per class, 300 labels; the pixel reference uses all 1,300)"
PIXEL_REFERENCE = {"digits": "logistic regression on the raw pixels (pixels.py) | 0 | - | 32 px",
                   "textures": "logistic regression on the raw pixels (textures.py) | 0 | - | 16 px"}
# the stronger per metric is the baseline: both inits at 16 and 32 px, and (round 13) timm's init fine-tuned at
# the lr the validation split chose for it at 16 px where that is not the built-in
RANDOM_ARMS = ("random_timm", "random_fastebm", "random_timm_32px", "random_fastebm_32px", "random_timm_blr32e-3",
               "random_timm_ft100_blr64e-3")


def _load(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def ft_curve(summary: Dict) -> Dict[str, List[float]]:
    """A fine-tuning run's history as optimiser steps -> training loss and validation top-1; with LP-FT the
    validation curve starts at step 0 with the probe the head was loaded from."""
    hist = summary.get("history") or []
    cfg = summary.get("config") or {}
    if summary.get("train_images") and cfg.get("batch_size"):  # as fastebm-eval counts them (tune.run_finetune)
        per_rank = math.ceil(summary["train_images"] / max(1, summary.get("world_size") or 1))
        per_epoch = per_rank // cfg["batch_size"] // max(1, cfg.get("accum_iter") or 1)
    else:  # an interrupted run's updates include a partial epoch: only an estimate
        per_epoch = summary["updates"] / max(1, summary.get("epochs_done") or (hist[-1]["epoch"] if hist else 1))
    loss = [h for h in hist if "train_loss" in h]
    val = [h for h in hist if "val_top1" in h]
    start = [(0.0, summary["probe"]["top1"])] if summary.get("probe") else []
    val = start + [(h["epoch"] * per_epoch, h["val_top1"]) for h in val]
    return {"loss_step": [h["epoch"] * per_epoch for h in loss], "train_loss": [h["train_loss"] for h in loss],
            "val_step": [v[0] for v in val], "val_top1": [v[1] for v in val]}


def seed_curves(edir: str) -> Dict[str, Dict[str, List[float]]]:
    out = {}
    for labels in ("100", "all"):
        s = _load(os.path.join(edir, f"ft_{labels}", "summary.json"))
        if s and "updates" in s:
            out[f"ft_{labels}"] = ft_curve(s)
    return out


def seed_metrics(edir: str, curves: Dict[str, Dict[str, List[float]]]) -> Dict[str, float]:
    """The metrics of one (arm, seed) from its evaluation folder (absent runs are left out); the
    fine-tuning losses come from ``curves`` (:func:`seed_curves` of the same folder)."""
    out = {}
    for name in ("lp_100", "lp_all", "knn_all"):
        s = _load(os.path.join(edir, name, "summary.json"))
        if s:
            out[name] = s["top1"]
    for labels in ("100", "all"):
        s = _load(os.path.join(edir, f"ft_{labels}", "summary.json"))
        if s and "top1" in s:
            out[f"ft_{labels}"] = s["top1"]
            if "train_top1" in s:
                out[f"ft_{labels}_train"] = s["train_top1"]
            if s.get("probe"):
                out[f"ft_{labels}_probe"] = s["probe"]["top1"]
            out[f"ft_{labels}_steps"] = s["updates"]
            if s.get("lr") is not None:
                out[f"ft_{labels}_lr"] = s["lr"]
            loss = curves.get(f"ft_{labels}", {}).get("train_loss")
            if loss:
                out[f"ft_{labels}_loss_first"], out[f"ft_{labels}_loss_peak"] = loss[0], max(loss)
        r = _load(os.path.join(edir, f"ft_{labels}_reprobe", "summary.json"))
        if r:
            out[f"ft_{labels}_reprobe"] = r["top1"]
        t = _load(os.path.join(edir, f"ft_{labels}_train.json"))
        if t:
            out[f"ft_{labels}_train_clean"] = t["train_eval_top1"]
    d = _load(os.path.join(edir, "diag.json"))
    if d:
        out.update(fragility=d["fragility"], last_token_std=d["blocks"][-1]["token_std"],
                   attn_entropy=float(np.mean([b["attn_entropy"] for b in d["blocks"]])), erank_pooled=d["erank_pooled"])
    return out


def pretrain_record(pdir: str) -> Dict:
    s = _load(os.path.join(pdir, "summary.json")) or {}
    keys = ("status", "final_loss", "first_loss", "wall_time_s", "step", "steps")
    return {k: s[k] for k in keys if k in s}


def mean_std(values: List[float]):
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None), len(v)


def fmt(m, s, digits=3) -> str:
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def paired(arms: Dict, a: str, metric_a: str, b: str, metric_b: str):
    """Per-seed differences ``a[metric_a] - b[metric_b]`` over the seeds both arms ran.

    Seed s of every arm fine-tunes with the same data order and crops (``--seed s``). When the two
    arms' per-seed results are positively correlated the paired std is below the unpaired ones;
    when they are not, it is not (the report shows both). Returns ``{"n", "mean", "std", "wins"}``
    (``std`` None with one seed) or None when no seed has a finite result in both.
    """
    seeds_a, seeds_b = arms[a].get("seeds", {}), arms[b].get("seeds", {})
    diffs = []
    for s in sorted(seeds_a):
        if s not in seeds_b:
            continue
        x, y = seeds_a[s]["metrics"].get(metric_a), seeds_b[s]["metrics"].get(metric_b)
        if x is not None and y is not None and math.isfinite(x - y):
            diffs.append(x - y)
    if not diffs:
        return None
    mu, sd, n = mean_std(diffs)
    return {"n": n, "mean": mu, "std": sd, "wins": sum(d > 0 for d in diffs)}


def acceptance(arms: Dict, ref: str = "fastebm") -> List[Dict]:
    """The issue's acceptance checks, each with the numbers it compares (means over seeds) and the
    per-seed paired difference (:func:`paired`)."""
    checks = []
    if ref not in arms:
        return checks
    m = {a: {k: v["mean"] for k, v in r["summary"].items()} for a, r in arms.items()}
    sd = {a: {k: v["std"] or 0.0 for k, v in r["summary"].items()} for a, r in arms.items()}
    randoms = [a for a in RANDOM_ARMS if a in m]
    for metric in METRICS:
        if randoms and metric in m[ref]:
            best = max(randoms, key=lambda a: m[a].get(metric, -1))
            if metric in m[best]:
                checks.append({"check": f"{ref} {metric} > stronger random init ({best})", "ours": m[ref][metric],
                               "theirs": m[best][metric], "pass": m[ref][metric] > m[best][metric],
                               "noise": max(sd[ref][metric], sd[best].get(metric, 0.0)),
                               "paired": paired(arms, ref, metric, best, metric)})
    for labels in ("100", "all"):
        ft, lp = m[ref].get(f"ft_{labels}"), m[ref].get(f"lp_{labels}")
        if ft is not None and lp is not None:
            checks.append({"check": f"{ref} ft_{labels} > lp_{labels} (same labels)", "ours": ft, "theirs": lp, "pass": ft > lp,
                           "noise": max(sd[ref][f"ft_{labels}"], sd[ref][f"lp_{labels}"]),
                           "paired": paired(arms, ref, f"ft_{labels}", ref, f"lp_{labels}")})
    import arms as A

    maes = [a for a in A.MAE_EQUAL_FLOPS if a in m]
    for labels in ("100", "all"):
        metric = f"ft_{labels}"
        have = [a for a in maes if metric in m[a]]
        if have and metric in m[ref]:
            best = max(have, key=lambda a: m[a][metric])  # the stronger MAE at equal FLOPs
            ours, theirs = m[ref][metric], m[best][metric]
            checks.append({"check": f"stretch: {ref} {metric} >= MAE at equal FLOPs ({best})", "ours": ours, "theirs": theirs,
                           "pass": ours >= theirs, "noise": max(sd[ref][metric], sd[best][metric]),
                           "paired": paired(arms, ref, metric, best, metric)})
    return checks


def environment() -> Dict:
    import sklearn
    import timm
    import torch

    import fastebm

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                    cwd=os.path.dirname(__file__)).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git_commit": commit,
            "git_dirty": dirty, "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "sklearn": sklearn.__version__, "fastebm": getattr(fastebm, "__version__", None), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _cpu_model() -> Optional[str]:
    """/proc/cpuinfo's model name (Linux). A seed's run is bit-identical on one machine, but not always on
    another (docs/quality.md, round 18): the model and torch's vector path (cpu_capability) say which."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None  # not Linux: "cpu" has what platform knows


def collect(jobs, meta: Dict, fl: Dict) -> Dict:
    import arms as A

    arms = {}
    for name in meta["arms"]:
        arm = A.ARMS[name]
        per_seed = {}
        for seed in meta["seeds"]:
            edir = os.path.join(meta["work_dir"], meta.get("eval_folder", "eval"), f"{name}_s{seed}")
            curves = seed_curves(edir)
            rec = {"metrics": seed_metrics(edir, curves), "curves": curves}
            if arm.kind != "init":
                rec["pretrain"] = pretrain_record(os.path.join(meta["work_dir"], "pretrain", f"{arm.pretrain_name}_s{seed}"))
                pj = [j for j in jobs if j.arm == arm.pretrain_name and j.seed == seed and j.part == "pretrain"]
                if pj and pj[0].rc not in (0, None):
                    rec["pretrain"]["failed_rc"] = pj[0].rc
            per_seed[str(seed)] = rec
        keys = sorted({k for r in per_seed.values() for k in r["metrics"]})
        summary = {}
        for k in keys:
            mu, sd, n = mean_std([r["metrics"].get(k) for r in per_seed.values()])
            summary[k] = {"mean": mu, "std": sd, "n": n}
        arms[name] = {"label": arm.label, "kind": arm.kind, "flags": arm.flags, "eval_img_size": A.eval_px(arm),
                      "pretrain_data": A.ARMS[arm.pretrain_name].pretrain_data, "seeds": per_seed, "summary": summary, "flops": fl["arms"].get(name)}
    return arms


def _verdict(check: Dict) -> str:
    """PASS / FAIL on the means; "within noise" when the gap is below the larger seed std of the two."""
    word = "PASS" if check["pass"] else "FAIL"
    return f"{word} (within noise)" if abs(check["ours"] - check["theirs"]) < check.get("noise", 0.0) else word


def _paired_text(p) -> str:
    if not p:
        return ""
    return f"; paired {p['mean']:+.3f}" + (f" ± {p['std']:.3f}" if p["std"] is not None else "") + f", higher in {p['wins']} of {p['n']} seeds"


def _reused(jobs: List[Dict]) -> str:
    n = sum(j["skipped"] == "reused" for j in jobs)
    return f" ({n} of {len(jobs)} jobs reused finished runs of the work folder; their time is not in these totals)" if n else ""


def _probe_budget(settings: Dict) -> str:
    """The linear probe's budget as the header states it: the recipe's step count, or --quick's flags."""
    if settings.get("probe_steps") is not None:
        return f"{settings['probe_steps']} LARS steps"
    return f"LARS with `{' '.join(settings.get('probe_extra_flags') or [])}` (quick)"


def markdown(data: Dict) -> str:
    arms, meta = data["arms"], data["meta"]
    bench = meta.get("benchmark", "digits")
    what = "the built-in digits" if bench == "digits" else "the texture benchmark (textures.py: ten photographs no arm was pretrained on)"
    lines = [f"# Learning quality on {what} ({'QUICK plumbing run, not results' if meta['quick'] else 'benchmark'})", "",
             f"Top-1 on {HELD_OUT[bench]}{QUICK_LABELS if meta['quick'] else ''}, mean ± sample std over seeds {', '.join(map(str, meta['seeds']))}; "
             f"pretraining {data['settings']['pretrain_epochs']} epochs unless the arm's flags say otherwise "
             f"({data['flops']['steps_per_epoch']} steps of batch 32 per epoch unless the arm sets --batch_size; each arm's steps are in the table); fine-tuning {data['settings']['finetune_steps']} optimiser steps "
             f"at peak lr {data['settings'].get('finetune_lr', '-')} with LP-FT "
             f"(`--head_init {data['settings']['head_init']}`); linear probe {_probe_budget(data['settings'])}. "
             f"{meta['jobs']} job{'s' if meta['jobs'] != 1 else ''} x 1 thread, {meta['wall_s'] / 60:.1f} min wall, {meta['cpu_s'] / 60:.1f} CPU min; "
             f"load average {meta['loadavg_start'][0]:.1f} at start, {meta['loadavg_end'][0]:.1f} at the end"
             f"{_reused(data['jobs'])}. "
             f"{data['env']['date_utc']}, commit {str(data['env']['git_commit'])[:10]}{' (dirty)' if data['env']['git_dirty'] else ''}.", "",
             "| arm | pretraining: GFLOP/step x steps | wall s (1 thread) | evaluated at | " + " | ".join(TITLES[m] for m in METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for name, r in arms.items():
        f = r["flops"]
        cost = "0" if not f else f"{f['gflop_per_step']:.1f} x {f['steps']} = {1000 * f['pflop']:.2f} TFLOP"
        walls = [v["pretrain"].get("wall_time_s") for v in r["seeds"].values() if "pretrain" in v]
        wall = fmt(*mean_std(walls)[:2], digits=0) if any(w is not None for w in walls) else "-"
        cells = [fmt(r["summary"].get(m, {}).get("mean"), r["summary"].get(m, {}).get("std")) for m in METRICS]
        fails = [s for s, v in r["seeds"].items() if v.get("pretrain", {}).get("failed_rc")]
        label = r["label"] + (f" (pretraining failed: seeds {', '.join(fails)})" if fails else "")
        px = f"{r['eval_img_size']} px" if r.get("eval_img_size") else "-"
        lines.append(f"| {label} | {cost} | {wall} | {px} | " + " | ".join(cells) + " |")
    ref = data.get("reference_pixels")
    if ref:
        cells = [fmt(*mean_std(list(ref[m].values()))[:2]) if m in ref else "-" for m in METRICS]
        lines.append(f"| reference, no network: {PIXEL_REFERENCE[bench]} | " + " | ".join(cells) + " |")
    lines += ["", "Did fine-tuning fit, and what did it do to the features: training top-1 in the last epoch "
              "(augmented) and on the clean training images after fine-tuning, the LP-FT probe it started from, "
              "and a linear probe of the fine-tuned backbone (same labels):", "",
              "| arm | 100: FT train (aug.) | 100: FT train (clean) | 100: LP-FT start | 100: re-probe after FT | "
              "1,300: FT train (aug.) | 1,300: FT train (clean) | 1,300: LP-FT start | 1,300: re-probe after FT |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in arms.items():
        lines.append(f"| {r['label']} | " + " | ".join(fmt(r["summary"].get(m, {}).get("mean"), r["summary"].get(m, {}).get("std"))
                                                      for m in FIT) + " |")
    lines += ["", f"Fine-tuning curves ({STEM[bench]}_curves.png): training loss (label smoothing 0.1, augmented images) in the "
              "first epoch and its peak over the run. A peak far above the start is the warm-up rewriting the features "
              "the LP-FT head was fitted to.", "",
              "| arm | 100: first epoch | 100: peak | 1,300: first epoch | 1,300: peak |", "|---|---|---|---|---|"]
    for name, r in arms.items():
        lines.append(f"| {r['label']} | " + " | ".join(fmt(r["summary"].get(m, {}).get("mean"), r["summary"].get(m, {}).get("std"), 2)
                                                      for m in SPIKE) + " |")
    if bench == "digits":  # diagnose.py measures the backbone on digits: it runs with the digits benchmark only
        lines += ["", "Diagnostics (diagnose.py, seed means): fragility = feature shift after one +-1e-3 step on every weight "
                  "in units of the between-image spread; last block's per-token std (the final LayerNorm divides by it); "
                  "mean attention entropy / log N; effective rank of the pooled features.", "",
                  "| arm | " + " | ".join(DIAG) + " |", "|---|" + "---|" * len(DIAG)]
        for name, r in arms.items():
            lines.append(f"| {r['label']} | " + " | ".join(fmt(r["summary"].get(m, {}).get("mean"), None) for m in DIAG) + " |")
    if data["checks"]:
        lines += ["", "Acceptance checks (means):", ""]
        lines += [f"- {_verdict(c)}: {c['check']}: {c['ours']:.3f} vs {c['theirs']:.3f}{_paired_text(c.get('paired'))}"
                  for c in data["checks"]]
        lines += ["", "within noise: the gap between the means is smaller than the larger of the two seed stds. "
                  "Paired: the difference seed by seed (seed s of every arm fine-tunes on the same batches), "
                  "mean ± std, and the seeds where ours is higher; it is narrower than the stds above only when "
                  "the two arms' seeds go up and down together."]
    lines += ["", f"FLOPs per training step (torch FlopCounterMode, batch 32 unless the arm sets --batch_size, forward + backward incl. the double backward): "
              f"fastebm defaults {data['flops']['fastebm_defaults_gflop_per_step']:.2f} G, MAE at {data['flops'].get('mae_img_size', 32)} px "
              f"{data['flops']['mae_gflop_per_step']:.2f} G (x{data['flops']['ratio']:.1f}); MAE at that size and equal FLOPs trains "
              f"{data['flops']['mae_equal_flops_epochs']:.2f} epochs (each arm's own cost is in the table).",
              "", f"Command: `{meta['argv']}`. Every job's commands are in {STEM[bench]}.json (`jobs`)."]
    return "\n".join(lines) + "\n"


def plot(data: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["arms"])
    fig, ax = plt.subplots(figsize=(11, 5.0), dpi=110)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        s = data["arms"][name]["summary"]
        have = [j for j, m in enumerate(METRICS) if (s.get(m) or {}).get("mean") is not None]  # an arm may run some parts only
        means = [s[METRICS[j]]["mean"] for j in have]
        errs = [s[METRICS[j]].get("std") or 0.0 for j in have]
        ax.bar(np.array(have, dtype=float) + (i - (len(names) - 1) / 2) * width, means, width, yerr=errs, capsize=2,
               label=data["arms"][name]["label"])
    ref = data.get("reference_pixels") or {}
    for i, m in enumerate(METRICS):
        if m in ref:  # the pixel model is a linear probe without a network: a line across its group
            ax.hlines(float(np.mean(list(ref[m].values()))), i - 0.45, i + 0.45, colors="k", linestyles="--", linewidth=1,
                      label="logistic regression on raw pixels" if m == "lp_all" else None)
    ax.set_xticks(np.arange(len(METRICS)), [TITLES[m] for m in METRICS], fontsize=8)
    ax.set_ylabel(f"top-1 on {HELD_OUT[data['meta'].get('benchmark', 'digits')]}", fontsize=8)
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.09))  # below: the bars and lines stay visible
    ax.set_title(f"fastebm quality benchmark, {data['meta'].get('benchmark', 'digits')} (mean ± std over seeds {data['meta']['seeds']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(data: Dict, path: str) -> None:
    """Fine-tuning curves, one line per arm (mean over the seeds that share its step grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = data["meta"].get("benchmark", "digits")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100, sharex="row")
    for row, part in enumerate(("ft_100", "ft_all")):
        for col, (x, y, title) in enumerate((("loss_step", "train_loss", "training loss (augmented, smoothing 0.1)"),
                                              ("val_step", "val_top1", f"top-1 on {HELD_OUT[bench]}"))):
            ax = axes[row, col]
            for name, arm in data["arms"].items():
                curves = [r["curves"][part] for r in arm["seeds"].values() if part in r.get("curves", {})]
                grids = [tuple(c[x]) for c in curves]
                if grids and grids[0]:  # the seeds on the most common step grid (all of them, unless a run stopped early)
                    grid = max(set(grids), key=grids.count)
                    same = [c[y] for c in curves if tuple(c[x]) == grid]
                    label = arm["label"] + (f" ({len(same)} of {len(curves)} seeds)" if len(same) < len(curves) else "")
                    ax.plot(grid, np.mean(same, axis=0), label=label, linewidth=1.2)
            labels = "100 labels" if part == "ft_100" else "1,300 labels"
            ax.set_title(f"fine-tuning, {labels}: {title}", fontsize=8)
            ax.set_xlabel("optimiser step", fontsize=8)
            ax.grid(alpha=0.3)
            if y == "val_top1":
                ax.set_ylim(0, 1)
    axes[1, 0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"fine-tuning curves ({bench}), mean over seeds {data['meta']['seeds']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _per_label_set(arms: Dict, suffix: str, show) -> str:
    """The distinct values of metric ``ft_*_<suffix>`` over every run, per label set ("a or b" when runs differ)."""
    def values(part):
        got = sorted({r["metrics"][f"{part}_{suffix}"] for a in arms.values() for r in a["seeds"].values()
                      if f"{part}_{suffix}" in r["metrics"]})
        return " or ".join(show(v) for v in got) or "-"
    return f"{values('ft_100')} (100 labels) / {values('ft_all')} (all labels)"


def steps_done(arms: Dict) -> str:
    """The fine-tuning runs' own optimiser-step counts (a reused work folder may hold runs of an older recipe)."""
    return _per_label_set(arms, "steps", lambda v: str(int(v)))


def lrs_used(arms: Dict) -> str:
    """The fine-tuning runs' own peak learning rates, per label set (an arm's flags or an older recipe in a
    reused work folder show up here as a second value)."""
    return _per_label_set(arms, "lr", lambda v: f"{v:g}")


def write(output_dir: str, meta: Dict, fl: Dict, jobs) -> List[str]:
    import arms as A
    from fastebm.eval.recipes import PROBE_UPDATE_BUDGET, RECIPES

    os.makedirs(output_dir, exist_ok=True)
    arms = collect(jobs, meta, fl)
    data = {"meta": meta, "env": environment(),
            "settings": {"pretrain_epochs": A.PRETRAIN_EPOCHS, "train_common_flags": A.TRAIN_COMMON,
                         "finetune_steps": steps_done(arms), "finetune_lr": lrs_used(arms), "probe_steps": None if meta["quick"] else PROBE_UPDATE_BUDGET,
                         "probe_extra_flags": A.Budget(quick=meta["quick"]).linprobe_extra(),
                         "head_init": RECIPES["small"]["finetune"]["head_init"], "reference_arm": A.REFERENCE},
            "flops": fl, "arms": arms, "jobs": [j.record() for j in jobs]}
    data["checks"] = acceptance(data["arms"], A.REFERENCE)
    bench = meta.get("benchmark", "digits")
    if bench == "digits":
        from pixels import pixel_logistic_regression
    else:
        from textures import pixel_logistic_regression
    data["reference_pixels"] = pixel_logistic_regression(meta["seeds"])
    stem = STEM[bench]
    paths = [os.path.join(output_dir, stem + ext) for ext in (".json", ".md", ".png", "_curves.png")]

    def text(content):
        def write_text(path):
            with open(path, "w") as fh:
                fh.write(content)
        return write_text

    writers = (text(json.dumps(data, indent=1)), text(markdown(data)), lambda p: plot(data, p), lambda p: plot_curves(data, p))
    for path, write_fn in zip(paths, writers):
        tmp = path + ".tmp" + os.path.splitext(path)[1]  # atomic: a crash never leaves a half-written output
        write_fn(tmp)
        os.replace(tmp, path)
    return paths

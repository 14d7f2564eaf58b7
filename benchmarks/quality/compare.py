"""One bar chart comparing arms from several quality reports (run.py's JSON files), seed by seed.

Each arm's per-seed metrics come from the first report that has the arm; only the seeds every
chosen arm has are used, so the bars compare the same seeds (the same 100 labels, batches and
heads). Bars: mean over those seeds; error bars: sample std.

    python benchmarks/quality/compare.py --reports R1.json R2.json --arms random_timm,fastebm \
        --out docs/images/round10.png [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

import numpy as np

METRICS = [("ft_100", "fine-tune, 100 labels"), ("lp_100", "linear probe, 100 labels"),
           ("ft_all", "fine-tune, 1,300 labels"), ("lp_all", "linear probe, 1,300 labels"),
           ("knn_all", "k-NN (k 20), 1,300 labels")]


def collect(reports: List[str], arms: List[str]) -> Dict[str, Dict]:
    """{arm: {"label": str, "seeds": {seed: metrics}}}, the first report holding an arm winning."""
    found: Dict[str, Dict] = {}
    for path in reports:
        with open(path) as fh:
            for name, arm in json.load(fh)["arms"].items():
                if name in arms and name not in found:
                    found[name] = {"label": arm["label"], "seeds": {int(s): v["metrics"] for s, v in arm["seeds"].items()}}
    missing = [a for a in arms if a not in found]
    if missing:
        raise SystemExit(f"compare.py: error: arm(s) {missing} are in none of the reports {reports}")
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reports", nargs="+", required=True, help="run.py quality JSON files")
    ap.add_argument("--arms", required=True, help="comma-separated arm names, in bar order")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: every seed all arms share")
    ap.add_argument("--title", default="fastebm quality benchmark")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args(argv)
    arms = args.arms.split(",")
    data = collect(args.reports, arms)
    shared = set.intersection(*(set(d["seeds"]) for d in data.values()))
    seeds = sorted(shared if args.seeds is None else shared & set(args.seeds))
    if not seeds:
        raise SystemExit("compare.py: error: the chosen arms share no seed; pick other reports or --seeds")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.4))
    width = 0.8 / len(arms)
    for i, name in enumerate(arms):
        vals = np.array([[data[name]["seeds"][s].get(m, np.nan) for s in seeds] for m, _ in METRICS])
        ax.bar(np.arange(len(METRICS)) + (i - (len(arms) - 1) / 2) * width, np.nanmean(vals, 1), width,
               yerr=np.nanstd(vals, 1, ddof=1) if len(seeds) > 1 else None, capsize=2, label=data[name]["label"])
    ax.set_xticks(np.arange(len(METRICS)), [label for _, label in METRICS], fontsize=9)
    ax.set_ylabel("top-1 on the 497 held-out digits")
    ax.set_ylim(0.4, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{args.title} (mean ± std over seeds {', '.join(map(str, seeds))})")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out} (seeds {seeds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

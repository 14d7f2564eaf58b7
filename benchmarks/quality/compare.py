"""Compare arms from several quality reports (run.py's JSON files), seed by seed: a bar chart, and
paired differences against one arm.

Each arm's per-seed metrics come from the reports in order, the first report holding a seed of an
arm winning (so reports of extra seeds add to an arm); only the seeds every chosen arm has are
used, so every number compares the same seeds (the same 100 labels, batches and heads). Bars: mean
over those seeds; error bars: sample std. ``--paired REF`` prints, for every other arm, the mean ±
sample std of its difference to REF seed by seed, the seeds where it is higher, and a two-sided
one-sample t-test of the differences (scipy).

    python benchmarks/quality/compare.py --reports R1.json R2.json --arms random_timm,fastebm \
        [--out docs/images/round10.png] [--paired random_timm] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import textwrap
import json
import sys
from typing import Dict, List

import numpy as np

METRICS = [("ft_100", "fine-tune, 100 labels"), ("lp_100", "linear probe, 100 labels"),
           ("ft_all", "fine-tune, 1,300 labels"), ("lp_all", "linear probe, 1,300 labels"),
           ("knn_all", "k-NN (k 20), 1,300 labels")]


# Reports written before round 12 do not record the evaluation size: every arm was evaluated at 32 px then.
EVAL_PX_BEFORE_ROUND12 = 32


def signature(report: Dict, name: str):
    """What an arm of ``report`` ran: its fastebm-train flags, its evaluation size, for a pretrained arm its
    GFLOP per step and epochs, the benchmark it was evaluated on (run.py --benchmark; digits before round
    14) and the data it was pretrained on (builtin before round 15). An arm's name can outlive what it runs (round 11 changed the defaults, and with them the arms
    ``fastebm``, ``mae_epochs`` and ``mae_flops``; round 12 the evaluation size of ``fastebm`` and the random
    inits), so reports are merged only where the signatures agree."""
    arm = report["arms"][name]
    cost = (report.get("flops") or {}).get("arms", {}).get(name)
    return (tuple(arm.get("flags") or ()), int(arm.get("eval_img_size", EVAL_PX_BEFORE_ROUND12)),
            None if cost is None else (round(float(cost["gflop_per_step"]), 2), round(float(cost["epochs"]), 3)),
            report.get("meta", {}).get("benchmark", "digits"), arm.get("pretrain_data", "builtin"))


def collect(reports: List[str], arms: List[str]) -> Dict[str, Dict]:
    """{arm: {"label": str, "seeds": {seed: {"metrics": {...}}}}} (run.py's layout, seeds as ints), the first
    report holding a seed of an arm winning. SystemExit when an arm ran differently in two reports."""
    found: Dict[str, Dict] = {}
    for path in reports:
        with open(path) as fh:
            report = json.load(fh)
        for name, arm in report["arms"].items():
            if name not in arms:
                continue
            sig = signature(report, name)
            entry = found.setdefault(name, {"label": arm["label"], "seeds": {}, "signature": sig, "from": path})
            if sig != entry["signature"]:
                raise SystemExit(f"compare.py: error: arm {name!r} ran differently in {entry['from']} and {path} "
                                 f"(flags, evaluation px, GFLOP/step and epochs, benchmark, pretraining data {entry['signature']} against {sig}): "
                                 f"its name outlived what it runs, or the reports are of different benchmarks; compare "
                                 f"reports of one kind")
            for s, v in arm["seeds"].items():
                entry["seeds"].setdefault(int(s), {"metrics": v["metrics"]})
    missing = [a for a in arms if a not in found]
    if missing:
        raise SystemExit(f"compare.py: error: arm(s) {missing} are in none of the reports {reports}")
    benchmarks = sorted({e["signature"][3] for e in found.values()})
    if len(benchmarks) > 1:
        raise SystemExit(f"compare.py: error: the arms come from reports of different benchmarks ({', '.join(benchmarks)}); "
                         f"compare the arms of one benchmark")
    if len({e["signature"][1] for e in found.values()}) > 1:  # arms evaluated at different sizes: say so
        for e in found.values():
            e["label"] += f" [evaluated at {e['signature'][1]} px]"
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--reports", nargs="+", required=True, help="run.py quality JSON files")
    ap.add_argument("--arms", required=True, help="comma-separated arm names, in bar order")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: every seed all arms share")
    ap.add_argument("--title", default="fastebm quality benchmark")
    ap.add_argument("--out", default=None, help="PNG path of the bar chart (none: no chart)")
    ap.add_argument("--paired", default=None, help="print every other arm's paired differences to this arm")
    args = ap.parse_args(argv)
    if args.out is None and args.paired is None:
        ap.error("nothing to do: give --out (a chart), --paired REF (a table), or both")
    arms = args.arms.split(",")
    data = collect(args.reports, arms)
    shared = set.intersection(*(set(d["seeds"]) for d in data.values()))
    seeds = sorted(shared if args.seeds is None else shared & set(args.seeds))
    if not seeds:
        raise SystemExit("compare.py: error: the chosen arms share no seed; pick other reports or --seeds")
    if args.paired is not None:
        if args.paired not in arms:
            raise SystemExit(f"compare.py: error: --paired {args.paired} is not one of --arms {arms}")
        if len(arms) < 2:
            raise SystemExit(f"compare.py: error: --paired {args.paired} compares the other --arms to it; "
                             f"name at least one more arm in --arms")
        print(paired_table(data, args.paired, [a for a in arms if a != args.paired], seeds))
    if args.out is not None:
        plot(data, arms, seeds, args.title, args.out)
    return 0


def paired_table(data: Dict[str, Dict], ref: str, others: List[str], seeds: List[int]) -> str:
    """Markdown: per arm and metric, mean ± sample std of (arm - ref) over ``seeds`` (report.paired), k of n
    higher, and the two-sided p of a one-sample t-test of the differences."""
    from scipy import stats

    import report

    on_seeds = {a: {"seeds": {s: data[a]["seeds"][s] for s in seeds}} for a in [ref, *others]}
    lines = [f"Paired differences to {data[ref]['label']}, seeds {', '.join(map(str, seeds))}:", "",
             "| arm | " + " | ".join(label for _, label in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name in others:
        cells = []
        for m, _ in METRICS:
            d = report.paired(on_seeds, name, m, ref, m)
            if d is None:
                cells.append("-")
                continue
            sd = d["std"] if d["std"] is not None else float("nan")
            p = 2 * stats.t.sf(abs(d["mean"]) / (sd / np.sqrt(d["n"])), d["n"] - 1) if d["n"] > 1 and sd > 0 else float("nan")
            cells.append(f"{d['mean']:+.3f} ± {sd:.3f}, {d['wins']} of {d['n']} (p {p:.3f})")
        lines.append(f"| {data[name]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(data: Dict[str, Dict], arms: List[str], seeds: List[int], title: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.4))
    width = 0.8 / len(arms)
    for i, name in enumerate(arms):
        vals = np.array([[data[name]["seeds"][s]["metrics"].get(m, np.nan) for s in seeds] for m, _ in METRICS])
        ax.bar(np.arange(len(METRICS)) + (i - (len(arms) - 1) / 2) * width, np.nanmean(vals, 1), width,
               yerr=np.nanstd(vals, 1, ddof=1) if len(seeds) > 1 else None, capsize=2, label=textwrap.fill(data[name]["label"], 70))
    # metric names on two lines, so that neighbouring names do not run into each other
    ax.set_xticks(np.arange(len(METRICS)), [label.replace(", ", ",\n", 1) for _, label in METRICS], fontsize=9)
    bench = next(iter(data.values()))["signature"][3]
    import report

    ax.set_ylabel(f"top-1 on {report.HELD_OUT[bench]}")
    ax.set_ylim(0.4 if bench == "digits" else 0.0, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{title} (mean ± std over seeds {', '.join(map(str, seeds))})")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=100, bbox_inches="tight")  # "tight": the legend below the axes is part of the picture
    print(f"wrote {out} (seeds {seeds})")


if __name__ == "__main__":
    sys.exit(main())

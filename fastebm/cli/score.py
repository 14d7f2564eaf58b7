"""``fastebm-score``: the energy of every image, and how well it separates in- from out-of-distribution sets.

    fastebm-score                                    # built-in case, ./fastebm_out/last.pt
    fastebm-score --ckpt last.pt --in val/ --ood other/ noise/ -o scores/ --restore_steps 2

With no data arguments the in-set is the held-out digits and the out-sets are the held-out photo
crops, uniform noise and Gaussian-blurred held-out digits, scored by the checkpoint and by a
random-initialised model of the same architecture (``--seed``). Writes into OUT: ``energies.csv``
(model, set, role, path, energy[, energy_after_k]), ``ood.json`` and ``ood.md`` (AUROC, AUPR-in,
AUPR-out, FPR at 95 % TPR per model, score and out-set; score = -energy, in-distribution positive)
and ``energy_hist.png``. An OUT that holds an earlier run's outputs is refused unless ``--overwrite``
(which deletes only those files); a folder scan never reads OUT; nothing is written (not even OUT
created) on bad input. ``ood.json`` records ``overlap`` null with ``--resize``. Exit codes (:mod:`fastebm.cli._run`):
0 done, 2 bad input (one line on stderr).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

from ..settings import ArgumentParser, DefaultsHelpFormatter, check_seed
from ._run import run
from ._tools_common import add_tiling_flags, check_tiling_flags, command_line, positive, skip_recorder

log = logging.getLogger(__name__)

PROG = "fastebm-score"
DEFAULT_CKPT = os.path.join("fastebm_out", "last.pt")  # where fastebm-train (no arguments) writes the demo
BUILTIN_IN = "builtin:digits"
BUILTIN_OUT = ("builtin:photos", "builtin:noise", "builtin:blurred_digits")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Energy of every image under a fastebm model, and OOD metrics of in- vs "
                       "out-of-distribution sets. With no data arguments: held-out digits vs photo crops, noise, "
                       "blurred digits.",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None, help=f"a fastebm-train checkpoint (default {DEFAULT_CKPT}, the demo's)")
    p.add_argument("--in", dest="in_specs", nargs="+", default=None, metavar="DIR",
                   help="the in-distribution set: folders, files or builtin:NAME (together one set)")
    p.add_argument("--ood", nargs="+", action="extend", default=None, metavar="DIR",
                   help="out-of-distribution sets, one per folder/file/builtin:NAME (repeatable)")
    p.add_argument("-o", "--output_dir", default="./fastebm_score_out", help="output folder")
    p.add_argument("--restore_steps", type=int, default=0,
                   help="also report the energy after this many descent steps from each image (0 = off)")
    p.add_argument("--random_init", action="store_true",
                   help="also score with a random-initialised model of the same architecture (always on in the built-in case)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-initialised model")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier fastebm-score run in -o (deletes only those files)")
    add_tiling_flags(p, batch_default=256)
    return p


def _set_name(spec: str, taken: set) -> str:
    name = spec.split(":", 1)[1] if spec.startswith("builtin:") else (os.path.basename(os.path.normpath(spec)) or spec)
    base, k = name, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def run_tool(args, argv: Optional[List[str]] = None) -> dict:
    """The command's work; raises ToolInputError (exit 2, one line) for bad input: --ood without --in,
    no checkpoint, --restore_steps < 0, an -o holding an earlier run's outputs without --overwrite,
    an empty or unreadable set, a bad --overlap or --overlap with --resize (-o is created only after
    every check); OutputError when -o cannot be written."""
    from ..tools.checkpoint import load_objective, random_init_objective
    from ..tools.descent import check_overlap, default_overlap, model_geometry
    from ..tools.errors import ToolInputError
    from ..tools.inputs import collect_images
    from ..tools.ood import metrics_table, score_sets
    from ..tools.output import (SCORE_OUTPUTS, atomic_write_text, check_earlier_outputs, check_output_dir,
                                ensure_output_dir,
                                remove_outputs, write_csv, write_json)
    from ..tools.pictures import energy_histograms
    from ..tools.restoration import resolve_device

    check_seed(args.seed)
    builtin = args.in_specs is None and args.ood is None
    if args.ood is not None and args.in_specs is None:
        raise ToolInputError("--ood needs an in-distribution set to compare with: add --in DIR")
    if args.restore_steps < 0:
        raise ToolInputError(f"--restore_steps must be >= 0, got {args.restore_steps}")
    positive("batch_size", args.batch_size, "tiles per model call")
    ckpt = args.ckpt
    if ckpt is None:
        if not os.path.isfile(DEFAULT_CKPT):
            raise ToolInputError(f"no checkpoint given and none at {DEFAULT_CKPT}: run fastebm-train first "
                                 "(it writes the demo checkpoint there) or pass --ckpt PATH")
        ckpt = DEFAULT_CKPT
    check_tiling_flags(args, "scores")
    # Every check reads only: -o is created after all of them have passed (nothing is written on bad input).
    out = check_output_dir(args.output_dir)
    earlier = check_earlier_outputs(out, SCORE_OUTPUTS, args.overwrite)
    device = resolve_device(args.device)
    objective, config = load_objective(ckpt, device)
    models = {"checkpoint": objective}
    if builtin or args.random_init:
        models["random init"] = random_init_objective(config, args.seed, device)
    tile, patch = model_geometry(objective)
    img_size = tile[0]
    overlap = default_overlap(tile, patch) if args.overlap is None else check_overlap(args.overlap, tile, patch)
    in_specs = [BUILTIN_IN] if builtin else args.in_specs
    ood_specs = list(BUILTIN_OUT) if builtin else (args.ood or [])
    taken: set = set()
    in_name = _set_name(in_specs[0], taken) if len(in_specs) == 1 else _set_name("in", taken)
    excluded: List[str] = []
    sets = {in_name: collect_images(in_specs, img_size, what="--in", exclude=out, excluded=excluded)}
    for spec in ood_specs:
        sets[_set_name(spec, taken)] = collect_images([spec], img_size, what="--ood", exclude=out, excluded=excluded)
    if excluded:
        log.warning(f"skipped {len(set(excluded))} image file(s) under the output folder {out} (it lies inside an "
                    f"input folder; earlier outputs are never read as input)")
    doomed = {os.path.realpath(p) for p in earlier}
    for item in (i for items in sets.values() for i in items):
        if not item.name.startswith("builtin:") and os.path.realpath(item.name) in doomed:
            raise ToolInputError(f"--overwrite would delete the input image {item.name} (an output of the earlier "
                                 f"run in -o): copy it elsewhere first, or give another -o")
    skipped: List[dict] = []
    on_skip = skip_recorder(skipped)

    rows, metrics, energies = score_sets(models, sets, in_name if ood_specs else None, steps=args.restore_steps,
                                         resize=args.resize, overlap=overlap, batch_size=args.batch_size,
                                         on_skip=on_skip, progress=True)
    out = ensure_output_dir(out)  # every set was scored: only now is -o created or changed
    remove_outputs(out, earlier, SCORE_OUTPUTS)
    columns = ["model", "set", "role", "path", "energy"] + ([f"energy_after_{args.restore_steps}"] if args.restore_steps else [])
    write_csv(os.path.join(out, "energies.csv"), rows, columns)
    table = metrics_table(metrics) if metrics else ""
    summary = {"command": command_line(PROG, argv), "checkpoint": os.path.abspath(ckpt),
               "model": config.get("model"), "builtin": builtin, "in_set": in_name, "sets": {k: len(v) for k, v in sets.items()},
               "restore_steps": args.restore_steps, "random_init_seed": args.seed if "random init" in models else None,
               "resize": args.resize, "overlap": None if args.resize else overlap, "excluded_outputs": len(set(excluded)),
               "device": str(device), "metrics": metrics, "skipped": skipped,
               "mean_energy": {m: {s: float(v.mean()) for s, v in per.items()} for m, per in energies.items()}}
    write_json(os.path.join(out, "ood.json"), summary)
    if table:
        atomic_write_text(os.path.join(out, "ood.md"), table)
    captions = {m: ", ".join(f"{x['out_set']} AUROC {x['auroc']:.2f}" for x in metrics
                             if x["model"] == m and x["score"] == "energy") for m in models}
    labelled = {m: {(f"{s} (in)" if s == in_name and ood_specs else s): v for s, v in per.items()}
                for m, per in energies.items()}
    energy_histograms(labelled, captions, os.path.join(out, "energy_hist.png"))
    print(table + f"{PROG}: {len(rows)} energies ({len(skipped)} unreadable skipped); results in {out}", flush=True)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    return run(PROG, lambda: run_tool(build_parser().parse_args(argv), argv))


if __name__ == "__main__":
    sys.exit(main())

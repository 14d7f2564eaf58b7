"""``fastebm-restore``: what a trained energy model restores on your own images.

    fastebm-restore --ckpt fastebm_out/last.pt photos/ -o restored/ --task denoise
    fastebm-restore --ckpt last.pt noisy.jpg --already_corrupted --steps 6 -o out/

Writes into OUT: ``strips/NNNN_name.png`` (clean | corrupted | after each step, with PSNR, SSIM and
energy), ``restored/NNNN_name.png`` (the final image at the input's size; with ``--resize`` at the
model's), ``metrics.csv`` and ``results.json`` (per image PSNR/SSIM of corrupted and restored, energy
after each step; settings incl. every task parameter and the overlap (null with ``--resize``), step sizes,
means, skipped files), ``index.html`` (contact sheet) and ``grid.png`` (the first strips). An OUT that holds an
earlier run's outputs is refused unless ``--overwrite`` (which deletes only those files: the strips
and restored images its results.json lists); a folder scan never reads OUT. Nothing is written (not
even OUT created) on bad input. Exit codes (:mod:`fastebm.cli._run`): 0 done (unreadable files are skipped
and listed), 2 bad input (one line on stderr).
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
from typing import List, Optional

from ..settings import ArgumentParser, DefaultsHelpFormatter, check_seed
from ._run import run
from ._tools_common import add_tiling_flags, check_tiling_flags, command_line, positive, skip_recorder

log = logging.getLogger(__name__)

PROG = "fastebm-restore"
TASKS = ("mim", "sort", "sr", "denoise", "colorize")
TASK_FLAGS = (("mask_ratio", "mim"), ("sr_factor", "sr"), ("sigma", "denoise"))  # flag -> the task it belongs to


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Corrupt images (or take corrupted ones), restore them by gradient "
                       "descent on a fastebm model's energy, and write strips, PSNR/SSIM and energies.",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_DIR",
                   help="image files, folders (searched recursively) or builtin:digits|photos|noise|blurred_digits")
    p.add_argument("--ckpt", required=True, help="a fastebm-train checkpoint (OUTPUT_DIR/last.pt)")
    p.add_argument("-o", "--output_dir", default="./fastebm_restore_out", help="output folder")
    p.add_argument("--task", choices=TASKS, default=None, help="corruption to apply and undo (default denoise)")
    p.add_argument("--already_corrupted", action="store_true",
                   help="restore the images as given (no corruption, no clean reference: strips and energies only)")
    p.add_argument("--steps", type=int, default=None,
                   help="descent steps (default: the checkpoint's T; steps beyond T reuse the last learned step size)")
    p.add_argument("--mask_ratio", type=float, default=None, help="mim: fraction of patches masked (default: the checkpoint's)")
    p.add_argument("--sr_factor", type=int, default=None, help="sr: down-sampling factor (default 4)")
    p.add_argument("--sigma", type=float, default=None, help="denoise: noise std in [0, 1] pixel units (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption (image i uses sample id i)")
    p.add_argument("--grid_rows", type=int, default=16, help="strips shown in grid.png (the first ones)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier fastebm-restore run in -o (deletes only those files)")
    add_tiling_flags(p, batch_default=64)
    return p


def _row(result, stem: str, strip_rel: str, restored_rel: str) -> dict:
    h, w = result.size
    row = {"index": result.index, "path": result.name, "width": w, "height": h,
           "source_width": result.source_size[1], "source_height": result.source_size[0], "tiles": result.tiles,
           "task": result.task or "already_corrupted", "psnr_corrupted": result.psnr_corrupted,
           "psnr_restored": result.psnr_restored, "psnr_gain": result.psnr_gain,
           "ssim_corrupted": result.ssim_corrupted, "ssim_restored": result.ssim_restored}
    row.update({f"energy_{t}": e for t, e in enumerate(result.energies)})
    row.update({f"psnr_{t}": v for t, v in enumerate(result.psnr_steps or [], start=1)})
    row.update({"strip": strip_rel, "restored": restored_rel})
    return row


def check_task_flags(args) -> None:
    """ToolInputError (one line) for a task parameter given for another task than the run's, or with
    ``--already_corrupted``, or ``--task`` together with ``--already_corrupted``."""
    from ..tools.errors import ToolInputError

    if args.already_corrupted and args.task is not None:
        raise ToolInputError("--task and --already_corrupted exclude each other: --already_corrupted restores "
                             "the images as given; drop one of them")
    task = args.task or "denoise"
    for flag, owner in TASK_FLAGS:
        if getattr(args, flag) is None:
            continue
        if args.already_corrupted:
            raise ToolInputError(f"--{flag} applies to --task {owner} only, and --already_corrupted applies no "
                                 f"corruption; drop --{flag}")
        if owner != task:
            raise ToolInputError(f"--{flag} applies to --task {owner} only, but the task is {task}"
                                 f"{'' if args.task else ' (the default)'}; drop --{flag} or add --task {owner}")


def run_tool(args, argv: Optional[List[str]] = None) -> dict:
    """The command's work; raises ToolInputError (exit 2, one line) for bad input: flags (a task
    parameter of another task, --task with --already_corrupted, --overlap with --resize,
    --steps/--batch_size/--grid_rows < 1),
    an -o holding an earlier run's outputs without --overwrite, a checkpoint, images or task that
    cannot be used; OutputError when -o cannot be written."""
    from ..tools.checkpoint import load_objective
    from ..tools.descent import model_geometry, step_sizes
    from ..tools.errors import ToolInputError
    from ..tools.inputs import collect_images
    from ..tools.output import (RESTORE_OUTPUTS, atomic_write_text, check_earlier_outputs, check_output_dir,
                                ensure_output_dir,
                                remove_outputs, safe_stem, save_pil, unique_columns, write_csv, write_json)
    from ..tools.pictures import contact_sheet, grid, strip, to_pil
    from ..tools.restoration import (effective_overlap, iter_restorations, left_out_reason, resolve_device, summarise,
                                     task_params)

    check_seed(args.seed)
    check_task_flags(args)
    if args.steps is not None:
        positive("steps", args.steps, "the number of descent steps")
    positive("batch_size", args.batch_size, "tiles per model call")
    positive("grid_rows", args.grid_rows, "strips in grid.png")
    check_tiling_flags(args, "restores")
    # Every check reads only: -o is created after all of them have passed (nothing is written on bad input).
    out = check_output_dir(args.output_dir)
    earlier = check_earlier_outputs(out, RESTORE_OUTPUTS, args.overwrite)
    device = resolve_device(args.device)
    objective, config = load_objective(args.ckpt, device)
    tile, _ = model_geometry(objective)
    excluded: List[str] = []
    items = collect_images(args.images, img_size=tile[0], exclude=out, excluded=excluded)
    _check_inputs_survive(items, earlier)
    task = None if args.already_corrupted else (args.task or "denoise")
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else config.get("mask_ratio")
    params = task_params(task, mask_ratio, args.sr_factor, args.sigma) if task else {}
    overlap = effective_overlap(objective, task, params, args.overlap)  # checks the task and the overlap
    steps = args.steps or objective.steps
    step_sizes(objective, steps)  # checks steps
    if excluded:
        log.warning(f"skipped {len(excluded)} image file(s) under the output folder {out} (it lies inside an input "
                    f"folder; earlier outputs are never read as input)")
    skipped: List[dict] = []
    on_skip = skip_recorder(skipped)

    results = iter_restorations(objective, items, task, steps=steps, params=params, seed=args.seed,
                                resize=args.resize, overlap=overlap, batch_size=args.batch_size,
                                on_skip=on_skip, progress=True)
    first = next(results, None)  # every check has passed and one image was restored: only now is -o changed
    if first is None:
        raise ToolInputError(f"none of the {len(items)} image(s) could be read (e.g. {skipped[0]['path']}: "
                             f"{skipped[0]['reason']})")
    out = ensure_output_dir(out)
    remove_outputs(out, earlier, RESTORE_OUTPUTS)
    rows, strips, used = [], [], set()
    for result in itertools.chain([first], results):
        stem = safe_stem(result.name, result.index, used)
        picture = strip(result)
        save_pil(picture, os.path.join(out, "strips", stem + ".png"))
        save_pil(to_pil(result.restored), os.path.join(out, "restored", stem + ".png"))
        rows.append(_row(result, stem, f"strips/{stem}.png", f"restored/{stem}.png"))
        if len(strips) < args.grid_rows:
            strips.append(picture)
    mean = summarise(rows)
    in_mean = [r for r in rows if left_out_reason(r) is None and r.get("psnr_1") is not None]
    if in_mean:  # the same images as the means: how PSNR evolves along the descent
        mean["psnr_per_step"] = [sum(r[f"psnr_{t}"] for r in in_mean) / len(in_mean) for t in range(1, steps + 1)]
    columns = unique_columns(rows, [])
    write_csv(os.path.join(out, "metrics.csv"), rows, columns)
    summary = {
        "command": command_line(PROG, argv),
        "checkpoint": os.path.abspath(args.ckpt), "model": config.get("model"), "model_input": list(tile),
        "trained_steps": objective.steps, "steps": steps,
        "step_sizes": [float(a) for a in step_sizes(objective, steps)],
        "task": task or "already_corrupted", "task_params": params.get(task, {}) if task else {},
        "seed": args.seed, "resize": args.resize, "overlap": None if args.resize else overlap, "batch_size": args.batch_size,
        "device": str(device), "mean": mean, "images": rows, "skipped": skipped,
        "excluded_outputs": len(excluded),
    }
    write_json(os.path.join(out, "results.json"), summary)
    save_pil(grid(strips, rows=args.grid_rows), os.path.join(out, "grid.png"))
    text = _mean_text(mean, task)
    atomic_write_text(os.path.join(out, "index.html"),
                      contact_sheet(f"{PROG}: {task or 'already corrupted'}, {steps} step(s), {args.ckpt}", rows,
                                    [c for c in columns if c not in ("index", "path", "strip", "restored")], text))
    print(f"{PROG}: {len(rows)} image(s) restored, {len(skipped)} skipped; {text}; results in {out}", flush=True)
    return summary


def _check_inputs_survive(items, earlier: List[str]) -> None:
    """ToolInputError when --overwrite would delete an input image (a file of the earlier run named as input)."""
    from ..tools.errors import ToolInputError

    doomed = {os.path.realpath(p) for p in earlier}
    for item in items:
        if not item.name.startswith("builtin:") and os.path.realpath(item.name) in doomed:
            raise ToolInputError(f"--overwrite would delete the input image {item.name} (an output of the earlier run "
                                 f"in -o): copy it elsewhere first, or give another -o")


def _mean_text(mean: dict, task: Optional[str]) -> str:
    from ..tools.restoration import left_out_text

    if task is None:
        return "no clean reference: energies only"
    left = left_out_text(mean.get("left_out", {}))
    if mean.get("psnr_gain") is None:
        return f"no image has the PSNR and SSIM to average ({left})" if left else "no image changed by the task"
    n, total = mean["images_in_mean"], mean["images"]
    over = f"over {n} of {total} images ({left})" if n < total else f"over {total} image{'s' if total > 1 else ''}"
    return (f"mean {over}: PSNR {mean['psnr_corrupted']:.2f} -> {mean['psnr_restored']:.2f} dB "
            f"({mean['psnr_gain']:+.2f} dB), SSIM {mean['ssim_corrupted']:.3f} -> {mean['ssim_restored']:.3f}")


def main(argv: Optional[List[str]] = None) -> int:
    return run(PROG, lambda: run_tool(build_parser().parse_args(argv), argv))


if __name__ == "__main__":
    sys.exit(main())

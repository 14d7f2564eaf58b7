"""The energy as a score: how typical an image is for the model, and in- vs out-of-distribution metrics.

``energy_scores`` gives ``E(x)`` per image (lower = more typical of the training data; EBM papers
use ``-E`` as the in-distribution score); images larger than the model are scored tile by tile
(mean of the tiles' energies) or resized (:mod:`fastebm.tools.descent`). ``energy_trajectories``
also follows ``k`` energy-descent steps from the image itself and reports the energy after each.

``ood_metrics`` compares an in-distribution set with an out-of-distribution set with scikit-learn,
the score being ``-E`` and in-distribution the positive class (the convention of e.g. Hendrycks &
Gimpel 2017, Liu et al. 2020 "Energy-based out-of-distribution detection"):

* AUROC (``roc_auc_score``): probability that a random in-image has a lower energy than a random
  out-image (ties count 1/2); 0.5 = chance, below 0.5 = the out-set looks *more* typical;
* AUPR-in / AUPR-out (``average_precision_score`` with in resp. out as the positive class);
* FPR at 95 % TPR (``roc_curve``): the fraction of out-images accepted at the lowest threshold that
  accepts at least 95 % of the in-images.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.folder import UnreadableImage
from .descent import check_overlap, default_overlap, descend, model_geometry
from .errors import ToolInputError
from .inputs import ImageItem
from .restoration import _objective, _prepare, _warn_skip, as_items

TPR_LEVEL = 0.95


def ood_metrics(in_energy, out_energy) -> Dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR at 95 % TPR of ``-E`` separating in- from out-images.

    Args:
        in_energy, out_energy: 1-D arrays of energies (any real values; non-finite ones are dropped
            and counted). Both sets must keep at least one value.
    Returns:
        dict with ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr_at_95_tpr`` (all in [0, 1]), ``n_in``,
        ``n_out`` and ``dropped_nonfinite``.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    a = np.asarray(in_energy, dtype=np.float64).ravel()
    b = np.asarray(out_energy, dtype=np.float64).ravel()
    dropped = int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum())
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        raise ToolInputError("OOD metrics need at least one finite energy in each set")
    labels = np.concatenate([np.ones(a.size), np.zeros(b.size)])
    score = -np.concatenate([a, b])
    fpr, tpr, _ = roc_curve(labels, score)
    return {
        "auroc": float(roc_auc_score(labels, score)),
        "aupr_in": float(average_precision_score(labels, score)),
        "aupr_out": float(average_precision_score(1 - labels, -score)),
        "fpr_at_95_tpr": float(fpr[np.argmax(tpr >= TPR_LEVEL)]),
        "n_in": int(a.size),
        "n_out": int(b.size),
        "dropped_nonfinite": dropped,
    }


def iter_energies(objective, items: Sequence[ImageItem], *, steps: int = 0, resize: bool = False,
                  overlap: Optional[int] = None, batch_size: int = 256,
                  on_skip: Callable[[str, str], None] = _warn_skip, progress: bool = False,
                  desc: str = "") -> Iterator[Tuple[int, str, List[float]]]:
    """Yields ``(index, name, [E(x_0), .., E(x_steps)])`` per readable image, in input order."""
    from tqdm.auto import tqdm

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ToolInputError(f"restore_steps must be an integer >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ToolInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    tile, patch = model_geometry(objective)
    overlap = default_overlap(tile, patch) if overlap is None else check_overlap(overlap, tile, patch)
    device = next(objective.parameters()).device
    was_training = objective.training
    objective.eval()
    bar = tqdm(total=len(items), unit="img", disable=None if progress else True, leave=False, desc=desc)
    try:
        group = []
        for index, item in enumerate(items):
            try:
                group.append(_prepare(index, item, objective, None, {}, patch, overlap, resize, 0, device))
            except UnreadableImage as exc:
                on_skip(item.name, exc.reason)
                bar.update(1)
            if group and (sum(p.layout.count for p in group) >= batch_size or index == len(items) - 1):
                trajectories = descend(objective, [p.corrupted for p in group], [p.layout for p in group], steps,
                                       batch_size=batch_size)
                for p, traj in zip(group, trajectories):
                    yield p.index, p.name, traj.energies
                bar.update(len(group))
                group = []
    finally:
        bar.close()
        objective.train(was_training)


def energy_trajectories(model, images, *, steps: int = 0, resize: bool = False, overlap: Optional[int] = None,
                        batch_size: int = 256, device=None, progress: bool = False) -> torch.Tensor:
    """Energies along ``steps`` descent steps started from each image itself (no corruption).

    Args:
        model: a :class:`~fastebm.RestorationObjective` or a ``fastebm-train`` checkpoint path.
        images: as for :func:`fastebm.restore_images` (uint8 tensors, PIL images, paths, folders, any size).
        steps: descent steps k >= 0 (step sizes as in :mod:`fastebm.tools.descent`).
        resize: resize to the model's resolution instead of tiling; overlap: tile overlap in px.
    Returns:
        float64 tensor (N, steps + 1): column t is the energy after t steps (the model's units, on
        normalised pixels; mean over tiles for larger images). A row is NaN for an unreadable file.
    """
    objective = _objective(model, device)
    items = as_items(images, model_geometry(objective)[0][0])
    out = torch.full((len(items), steps + 1), float("nan"), dtype=torch.float64)
    for index, _, energies in iter_energies(objective, items, steps=steps, resize=resize, overlap=overlap,
                                            batch_size=batch_size, progress=progress):
        out[index] = torch.tensor(energies, dtype=torch.float64)
    return out


def energy_scores(model, images, *, resize: bool = False, overlap: Optional[int] = None, batch_size: int = 256,
                  device=None, progress: bool = False) -> torch.Tensor:
    """The energy ``E(x)`` of each image: float64 tensor (N,), lower = more typical (NaN if unreadable).

    Same arguments as :func:`energy_trajectories` (with ``steps=0``). The energy is in the model's
    own units (``sqnorm`` head: mean over tokens of 1/2 ||h||^2 for ImageNet-normalised input).
    """
    return energy_trajectories(model, images, steps=0, resize=resize, overlap=overlap, batch_size=batch_size,
                               device=device, progress=progress)[:, 0]


def score_sets(models: Dict[str, object], sets: Dict[str, Sequence[ImageItem]], in_set: Optional[str], *,
               steps: int = 0, resize: bool = False, overlap: Optional[int] = None, batch_size: int = 256,
               on_skip: Callable[[str, str], None] = _warn_skip, progress: bool = False):
    """Energies of every set under every model, and OOD metrics of each other set against ``in_set``.

    Returns ``(rows, metrics, energies)``: one row per (model, image) with ``energy`` (and
    ``energy_after_{steps}``), one metrics dict per (model, score, out-set), and
    ``energies[model][set]`` as float64 arrays of the plain energy (for histograms). An unreadable
    file is reported through ``on_skip`` once per set, not once per model. Raises ToolInputError
    when a set has no readable image.
    """
    rows, metrics, energies = [], [], {}
    reported = set()

    def skip_once(set_name):
        def report(name, reason):
            if (set_name, name) not in reported:
                reported.add((set_name, name))
                on_skip(name, reason)
        return report

    after = f"energy_after_{steps}" if steps else None
    for model_name, objective in models.items():
        per_set: Dict[str, Dict[str, np.ndarray]] = {}
        for set_name, items in sets.items():
            values = []
            for _, name, traj in iter_energies(objective, items, steps=steps, resize=resize, overlap=overlap,
                                               batch_size=batch_size, on_skip=skip_once(set_name), progress=progress,
                                               desc=f"{model_name}: {set_name}"):
                row = {"model": model_name, "set": set_name,
                       "role": "in" if set_name == in_set else ("out" if in_set else ""),
                       "path": name, "energy": traj[0]}
                if after:
                    row[after] = traj[-1]
                rows.append(row)
                values.append(traj)
            if not values:
                raise ToolInputError(f"no readable image in set {set_name!r}")
            arr = np.asarray(values, dtype=np.float64)
            per_set[set_name] = {"energy": arr[:, 0], **({after: arr[:, -1]} if after else {})}
        energies[model_name] = {s: v["energy"] for s, v in per_set.items()}
        if in_set is None:
            continue
        for score in ["energy"] + ([after] if after else []):
            for set_name in sets:
                if set_name != in_set:
                    m = ood_metrics(per_set[in_set][score], per_set[set_name][score])
                    metrics.append({"model": model_name, "score": score, "in_set": in_set, "out_set": set_name, **m})
    return rows, metrics, energies


def metrics_table(metrics: Sequence[Dict]) -> str:
    """A Markdown table of ``score_sets`` metrics."""
    lines = ["| model | score | out-set | AUROC | AUPR-in | AUPR-out | FPR@95%TPR | n in / out |",
             "|---|---|---|---|---|---|---|---|"]
    for m in metrics:
        lines.append(f"| {m['model']} | {m['score']} | {m['out_set']} | {m['auroc']:.3f} | {m['aupr_in']:.3f} | "
                     f"{m['aupr_out']:.3f} | {m['fpr_at_95_tpr']:.3f} | {m['n_in']} / {m['n_out']} |")
    return "\n".join(lines) + "\n"

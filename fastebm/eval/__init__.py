"""Evaluation of pretrained energy models.

Downstream evaluation (``fastebm-eval``; docs/evaluation.md), callable in-process::

    import fastebm.eval as fe
    s = fe.finetune(ckpt="out/last.pt", few_shot=10, seed=1, output_dir="runs/ft")   # -> summary dict
    s = fe.finetune(init="random", output_dir="runs/ft_random")                     # the baseline
    s = fe.linprobe(ckpt="model.safetensors", layer=3, output_dir="runs/lp")
    s = fe.knn(ckpt="out/last.pt", k=20, output_dir="runs/knn")
    s["top1"], s["best_top1"], s["history"]

Each takes a config object (:class:`FinetuneConfig`, :class:`LinprobeConfig`,
:class:`KnnConfig`), a dict and/or keyword settings named like the command's flags; unset
hyper-parameters take a recipe (:mod:`fastebm.eval.recipes`: ``recipe="auto"`` gives the built-in
digits ``small`` and folders MAE's ``imagenet``). Bad settings raise
``UsageError`` (a ``ValueError``). A run reseeds the global RNGs (torch, numpy, random).

Also here: restoration PSNR gain (:mod:`.psnr`), the demo's logistic-regression probe
(:mod:`fastebm.eval.linprobe` module: ``linear_probe_accuracy``) and backbone export (:mod:`.export`).
"""
from .config import FinetuneConfig, KnnConfig, LinprobeConfig, make_config
from .export import export_backbone, export_checkpoint
from .linprobe import extract_features, linear_probe_accuracy
from .psnr import mean_gain, psnr_gain

__all__ = ["FinetuneConfig", "KnnConfig", "LinprobeConfig", "export_backbone", "export_checkpoint",
           "extract_features", "finetune", "knn", "linear_probe_accuracy", "linprobe", "make_config", "mean_gain",
           "psnr_gain", "run"]


def run(command: str, cfg=None, **overrides) -> dict:
    """Runs ``command`` (``finetune``, ``linprobe`` or ``knn``) and returns its summary (also summary.json)."""
    cfg = make_config(command, cfg, **overrides)
    if command == "finetune":
        from .tune import run_finetune as go
    elif command == "linprobe":
        from .probe import run_linprobe as go
    else:
        from .neighbors import run_knn as go
    return go(cfg)


def finetune(cfg=None, **overrides) -> dict:
    """End-to-end fine-tuning (MAE recipe on timm); see :mod:`fastebm.eval.tune`.

    Raises UsageError for bad settings or inputs, and when ``resume`` would continue a run whose
    results-changing settings differ from this one's (docs/evaluation.md, "Resume")."""
    return run("finetune", cfg, **overrides)


# Defined after the import above: importing the ``linprobe`` submodule bound this name to the
# module, and the function users call replaces it (``from fastebm.eval.linprobe import ...`` still
# finds the module through sys.modules).
def linprobe(cfg=None, **overrides) -> dict:  # noqa: F811
    """Linear probe on frozen features (MAE head, LARS); see :mod:`fastebm.eval.probe`."""
    return run("linprobe", cfg, **overrides)


def knn(cfg=None, **overrides) -> dict:
    """Weighted k-NN on frozen features (DINO); see :mod:`fastebm.eval.neighbors`."""
    return run("knn", cfg, **overrides)

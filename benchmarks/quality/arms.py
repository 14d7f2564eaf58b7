"""The arms of the quality benchmark and the exact commands of every job (pretraining, evaluation).

An arm is a backbone recipe: an untrained initialisation (timm's or fastebm's), a fastebm-train
run with some flags, or the MAE baseline (mae.py) at equal epochs or at equal training FLOPs.
Every arm is evaluated by the same fastebm-eval commands with their built-in recipes (nothing is
tuned per arm), at an input size every command names (``--img_size``, :func:`eval_px`): linear probe and fine-tuning on 100 labels (``--few_shot 10``) and on all 1,300,
k-NN on all labels, a re-probe of each fine-tuned backbone on its labels, and diagnose.py. The
``*_blr4e-3`` and ``*_blr32e-3`` arms (``--arms blr4e-3``, ``--arms blr32e-3``) repeat the compared arms'
all-label fine-tuning at the built-in lr used before round 6, and at the one round 7 tried and did not adopt
(docs/quality.md); the ``*_ft1000steps`` and ``*_ft400steps`` arms repeat it with a shorter fine-tuning budget.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from fastebm.eval.recipes import RAND_AUGMENT

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAIN_BATCH = 32  # fastebm-train's default batch, and the MAE baseline's
PRETRAIN_EPOCHS = 8  # the study's pretraining budget: fastebm-train's default (8 epochs at vit_demo's 16 px)
# Until round 11 the defaults were 2 epochs at 32 px (7.75 TFLOP, about the 7.44 of 8 at 16 px), and every
# variant below changed one thing of that configuration: they keep it, so their commands still run what
# their results in benchmarks/results/quality/ measured.
AT_32PX_2EP = ["--img_size", "32", "--epochs", "2"]

# What every fastebm-train run of the study adds to the arm's flags: the budget, one thread, and no
# built-in before/after evaluation or mid-run checkpoints (fastebm-eval does the evaluation).
TRAIN_COMMON = ["--epochs", str(PRETRAIN_EPOCHS), "--demo_eval", "false", "--threads", "1", "--save_every", "0"]


@dataclass
class Arm:
    name: str
    label: str
    kind: str  # "init", "fastebm", "mae"
    init: Optional[str] = None  # kind init: random (timm) or fastebm
    flags: List[str] = field(default_factory=list)  # kind fastebm: fastebm-train flags
    mae_budget: Optional[str] = None  # kind mae: "epochs" (same epochs) or "flops" (same training FLOPs)
    # --img_size of every fastebm-eval command: the size the backbone was pretrained at (fastebm-eval's default),
    # vit_demo's pretraining size for the untrained inits; 32 for the arms evaluated before round 12 (all at 32 px)
    eval_img_size: int = 0  # 0: the study's rule, eval_px (below)
    mae_img_size: int = 0  # kind mae: mae.py --img_size (0: vit_demo's 32 px)
    # an arm that only changes the evaluation: it reuses this arm's pretraining runs (same folder, no new job)
    pretrained_as: Optional[str] = None
    ft_flags: List[str] = field(default_factory=list)  # added to the fine-tuning commands only
    parts: Optional[List[str]] = None  # the evaluation parts it runs (frozen, ft_100, ft_all); None: all
    # what it pretrains on (photos_only.PRETRAIN_DATA): the built-in data, or since round 15 the same without the digits
    pretrain_data: str = "builtin"

    @property
    def pretrain_name(self) -> str:
        """The arm whose pretraining folder this arm's backbones come from."""
        return self.pretrained_as or self.name


ARMS: Dict[str, Arm] = {a.name: a for a in [
    Arm("random_timm", "random init (timm)", "init", init="random"),
    Arm("random_fastebm", "random init (fastebm)", "init", init="fastebm"),
    # the shipped defaults: 8 epochs at 16 px, evaluated at 16 px (fastebm-eval's default for it since round 12)
    Arm("fastebm", "fastebm defaults (16 px, 8 epochs, T 2, exact)", "fastebm"),
    # round 12: the untrained inits at 32 px, as every arm was evaluated until round 11 (the stronger size for
    # timm's init in one metric, the 1,300-label probe: docs/quality.md)
    Arm("random_timm_32px", "random init (timm), evaluated at 32 px", "init", init="random", eval_img_size=32),
    Arm("random_fastebm_32px", "random init (fastebm), evaluated at 32 px", "init", init="fastebm", eval_img_size=32),
    Arm("fastebm_32px_2ep", "fastebm at 32 px, 2 epochs (the study's reference before round 11)", "fastebm", flags=AT_32PX_2EP),
    Arm("fastebm_T1", "fastebm --steps 1 (32 px, 2 epochs)", "fastebm", flags=[*AT_32PX_2EP, "--steps", "1"]),
    Arm("fastebm_truncated", "fastebm --grad_mode truncated (32 px, 2 epochs)", "fastebm",
        flags=[*AT_32PX_2EP, "--grad_mode", "truncated"]),
    Arm("fastebm_linear", "fastebm --energy linear (32 px, 2 epochs)", "fastebm", flags=[*AT_32PX_2EP, "--energy", "linear"]),
    Arm("fastebm_mim", "fastebm --tasks mim (32 px, 2 epochs)", "fastebm", flags=[*AT_32PX_2EP, "--tasks", "mim"]),
    # the MAE baseline at 32 px (the default set's until round 12)
    Arm("mae_epochs", "MAE at 32 px, same epochs", "mae", mae_budget="epochs"),
    Arm("mae_flops", "MAE at 32 px, same training FLOPs", "mae", mae_budget="flops"),
    # round 12: MAE pretrained (and evaluated) at 16 px, the size fastebm's defaults pretrain at, with the lr
    # searched at 32 px. The cheap resolution that made fastebm's defaults pays for MAE too (k-NN 0.933 against
    # 0.854 at 32 px), so these are the default set's MAE arms since round 12.
    Arm("mae_epochs_16px", "MAE at 16 px, same epochs", "mae", mae_budget="epochs", mae_img_size=16),
    Arm("mae_flops_16px", "MAE at 16 px, same training FLOPs", "mae", mae_budget="flops", mae_img_size=16),
    # cheaper configurations (item 3)
    Arm("fastebm_1ep", "fastebm at 32 px, 1 epoch (the demo's recipe before round 11)", "fastebm",
        flags=["--img_size", "32", "--epochs", "1"]),
    Arm("fastebm_16px", "fastebm --img_size 16, 2 epochs (eval at 32 px)", "fastebm", flags=["--img_size", "16", "--epochs", "2"],
        eval_img_size=32),
    Arm("fastebm_T1_mim", "fastebm --steps 1 --tasks mim (32 px, 2 epochs)", "fastebm",
        flags=[*AT_32PX_2EP, "--steps", "1", "--tasks", "mim"]),
    # more pretraining (4x the 32 px defaults' FLOPs): does what fine-tuning keeps grow with the budget?
    Arm("fastebm_8ep", "fastebm at 32 px, 8 epochs (4x the FLOPs)", "fastebm", flags=["--img_size", "32", "--epochs", "8"]),
    # round 10: the pretraining batch at the same FLOPs (the lr scaled by fastebm-train's linear rule
    # lr = blr * batch / 256): more optimiser steps (is it the 8-epoch arm's 4x the steps or its 4x the images
    # that help?), or fewer and larger ones
    Arm("fastebm_bs64", "fastebm --batch_size 64 (32 px, 2 epochs: half the steps, same FLOPs)", "fastebm",
        flags=[*AT_32PX_2EP, "--batch_size", "64"]),
    Arm("fastebm_bs16", "fastebm --batch_size 16 (32 px, 2 epochs: 2x the steps, same FLOPs)", "fastebm",
        flags=[*AT_32PX_2EP, "--batch_size", "16"]),
    Arm("fastebm_bs8", "fastebm --batch_size 8 (32 px, 2 epochs: 4x the steps, same FLOPs)", "fastebm",
        flags=[*AT_32PX_2EP, "--batch_size", "8"]),
    # round 10: 16 px kept the quality at a quarter of the FLOPs (round 9) and 8 epochs led random init with all
    # labels (round 9): at 16 px, 8 epochs cost about what the 2-epoch 32 px defaults cost. Since round 11 this
    # is what the defaults run (the arm `fastebm`); the explicit flags keep round 10's commands as they were.
    Arm("fastebm_16px_8ep", "fastebm --img_size 16 --epochs 8 (round 10; the defaults since round 11)", "fastebm",
        flags=["--img_size", "16", "--epochs", "8"], eval_img_size=32),
    # round 12: the defaults' FLOPs as twice the epochs of T = 1 (a T 1 step costs half a T 2 step). Round 10
    # found that more images seen, not more steps, is what extra epochs buy; does that pay for a cheaper step?
    Arm("fastebm_T1_16ep", "fastebm --steps 1 --epochs 16 (16 px: the defaults' FLOPs)", "fastebm",
        flags=["--steps", "1", "--epochs", "16"]),
    # round 13: fastebm's pretraining lr chosen the way MAE's was (mae_lr.py: the best mean validation probe,
    # seeds 0 and 1, at 16 px and the study's budget) picked half the default blr 0.024
    Arm("fastebm_half_blr", "fastebm --blr 0.012 (16 px, 8 epochs)", "fastebm", flags=["--blr", "0.012"]),
    # round 15: the defaults and both MAE arms pretrained without the digits (photos_only.py: photo crops in the digits'
    # slots; the same steps and FLOPs). On the digits MAE's frozen features lead fastebm's by far, on photographs neither
    # was pretrained on they are close: is MAE's lead, and what its extra epochs buy, one on the distribution it was
    # pretrained on?
    Arm("fastebm_photos", "fastebm defaults, pretrained without the digits", "fastebm", pretrain_data="photos"),
    Arm("mae_epochs_16px_photos", "MAE at 16 px, same epochs, pretrained without the digits", "mae", mae_budget="epochs",
        mae_img_size=16, pretrain_data="photos"),
    Arm("mae_flops_16px_photos", "MAE at 16 px, same training FLOPs, pretrained without the digits", "mae", mae_budget="flops",
        mae_img_size=16, pretrain_data="photos"),
    # round 17: round 16 found that the textures' native 32 px raise every arm and let a random init fine-tune level
    # with (all labels) or above (100 labels) fastebm's backbones; MAE at equal FLOPs was not measured there. Its 16 px
    # backbones evaluated at 32 px (as the defaults were, position embedding resampled), beside `mae_flops` (MAE
    # pretrained at 32 px for the same FLOPs).
    Arm("mae_flops_16px_eval32px", "MAE at 16 px, same training FLOPs, evaluated at 32 px", "mae", mae_budget="flops",
        mae_img_size=16, pretrained_as="mae_flops_16px", eval_img_size=32),
]}
# Rounds 6 and 7 (docs/quality.md): the built-in fine-tuning recipe was chosen on timm's random init alone, which
# could favour random init. The three arms the fine-tuning checks compare then had their all-label lr and layer
# decay searched with one grid and one rule on the validation split of the training digits (recipe_pilot.py,
# one-axis stages; benchmarks/results/quality/recipe_pilot.json). Round 6: all three chose base lr 16e-3, four
# times the earlier 4e-3, now the built-in with all labels (fastebm/eval/recipes.py: BLR_MANY); round 7: one step further,
# 32e-3 tied 16e-3 on timm's init and the built-in stayed. These arms keep both comparisons reproducible: the same
# arms' all-label fine-tuning at another lr (`--arms blr4e-3` / `--arms blr32e-3` runs them beside the default arms).
OTHER_BLRS = {"blr4e-3": "0.004", "blr32e-3": "0.032"}  # arm suffix -> --blr


def ft_only_arm(base: Arm, suffix: str, label: str, ft_flags: List[str], part: str = "ft_all") -> Arm:
    """``base``'s fine-tuning on one label set (``part``: ft_all or ft_100) with ``ft_flags`` added; it reuses
    ``base``'s pretraining runs."""
    return Arm(f"{base.name}_{suffix}", f"{base.label}, {label}", base.kind, init=base.init,
               pretrained_as=None if base.kind == "init" else base.name, ft_flags=list(ft_flags), parts=[part],
               eval_img_size=base.eval_img_size)


# Round 9: is the all-label tie a property of the 2,000-step budget? The compared arms' all-label fine-tuning
# with a shorter budget (1,300 digits at batch 32 are 40 steps per epoch: 25 epochs = 1,000 steps, 10 = 400),
# everything else built-in (warm-up 10 % of it, cosine to the end). A backbone worth having should get further
# than a random init when the fine-tuning budget is short.
FT_BUDGETS = {"ft1000steps": "25", "ft400steps": "10"}  # arm suffix -> --epochs
ALL_LABEL_STEPS_PER_EPOCH = 40  # 1,300 training digits // the built-in batch 32 (the last partial batch is dropped)

COMPARED = ["random_timm", "random_fastebm", "fastebm"]
# arm suffix -> (label, fine-tuning flags) of every all-label-only repeat of the compared arms
OTHER_FT = {**{sfx: (f"all-label FT at blr {blr}", ["--blr", blr]) for sfx, blr in OTHER_BLRS.items()},
            **{sfx: (f"all-label FT for {int(ep) * ALL_LABEL_STEPS_PER_EPOCH} steps", ["--epochs", ep])
               for sfx, ep in FT_BUDGETS.items()}}
for _suffix, (_label, _flags) in OTHER_FT.items():
    for _base in COMPARED:
        ARMS[f"{_base}_{_suffix}"] = ft_only_arm(ARMS[_base], _suffix, _label, _flags)
# Round 13: the fine-tuning lr searched again at 16 px (recipe_pilot.py --img_size 16, grids round13_few and
# round13_many, seeds 0 and 1, on the validation split). With all labels every arm chose 32e-3 (the `*_blr32e-3`
# arms above); with 100 labels fastebm kept the built-in 32e-3 and timm's init chose 64e-3 (by 0.002): this arm.
ARMS["random_timm_ft100_blr64e-3"] = ft_only_arm(ARMS["random_timm"], "ft100_blr64e-3", "100-label FT at blr 0.064",
                                                 ["--blr", "0.064"], part="ft_100")
# Round 18: the 100-label fine-tuning lr searched on the textures at 32 px (texture_ft_lr.py, blr 8e-3 to 64e-3,
# seeds 0 and 1, a validation split of the texture training tiles). MAE at equal FLOPs kept the built-in 32e-3;
# timm's init chose 16e-3 and fastebm's defaults 64e-3: these arms fine-tune them at their picks on the test patches,
# and at the built-in 32e-3 beside them (the same backbones: pretraining is bit-identical only on the same CPU).
for _base, _blrs in (("random_timm_32px", {"16e-3": "0.016", "32e-3": "0.032"}),
                     ("fastebm_16px_8ep", {"64e-3": "0.064", "32e-3": "0.032"})):
    for _suffix, _value in _blrs.items():
        ARMS[f"{_base}_ft100_blr{_suffix}"] = ft_only_arm(ARMS[_base], f"ft100_blr{_suffix}",
                                                          f"100-label FT at blr {_value}", ["--blr", _value], part="ft_100")
# Round 19: the rest of the 100-label fine-tuning recipe on the textures at 32 px (texture_ft_recipe.py: each cell's
# flags added to the built-in recipe, seeds 0 and 1 on round 18's validation split). The digits' recipe has no flip
# (digits are not mirror-symmetric; textures are), no RandAugment and 1,000 steps; 100 labels at batch 32 are 3 steps
# per epoch (the last partial batch is dropped), so 667 epochs are 2,001 steps. The arms below fine-tune timm's init
# and fastebm's defaults with each cell on the test patches, beside the built-in (``*_ft100_blr32e-3``).
TEXTURE_FT_CELLS: Dict[str, List[str]] = {
    "builtin": [],
    "hflip": ["--hflip", "0.5"],
    "randaug": ["--aa", RAND_AUGMENT],
    "steps2000": ["--epochs", "667"],
    "hflip_randaug_steps2000": ["--hflip", "0.5", "--aa", RAND_AUGMENT, "--epochs", "667"],  # augmentation wants time
    # not a recipe choice but a cause check: LP-FT starts fastebm's head as a probe of its better frozen features, so
    # its loss starts low and its backbone moves less than a random init's (round 16: peak loss 1.29 against 2.10);
    # does a random head (MAE's) change the gap?
    "head_random": ["--head_init", "random"],
}
for _base in ("random_timm_32px", "fastebm_16px_8ep"):
    for _cell, _flags in TEXTURE_FT_CELLS.items():
        if _flags:
            ARMS[f"{_base}_ft100_{_cell}"] = ft_only_arm(ARMS[_base], f"ft100_{_cell}", f"100-label FT, {_cell.replace('_', ' + ')}",
                                                         _flags, part="ft_100")

# The default set: what the acceptance checks compare (both random inits, the shipped defaults, MAE at
# equal epochs and at equal FLOPs), every arm pretrained and evaluated at 16 px since round 12. An arm costs
# about 3 CPU minutes per seed of evaluation at 16 px, mostly its fine-tunings (a 1,000-step and a 2,000-step
# run: about 1 and 1.6 CPU minutes), plus its pretraining (fastebm's defaults: 2.2; MAE at equal FLOPs: 2.6),
# so the default set is about 55 CPU minutes (round 12 measured 55.4: 28 minutes wall on 2 cores; round 11,
# which fine-tuned every arm at 32 px, 128). The other variants are one flag away (--arms variants).
# Since round 13 the set also fine-tunes timm's init at the lr the validation split chose for it at 16 px where
# that is not the built-in (all labels 32e-3, 100 labels 64e-3; about 8 more CPU minutes: round 13 took 64.1):
# the random-init baseline is the stronger of its runs per column (report.RANDOM_ARMS), so the baseline gets its
# own best lr.
DEFAULT_ARMS = ["random_timm", "random_fastebm", "fastebm", "mae_epochs_16px", "mae_flops_16px",
                "random_timm_blr32e-3", "random_timm_ft100_blr64e-3"]
# the MAE baseline's pretraining size in the default set: the size fastebm's defaults pretrain at (round 12)
MAE_PX = 16
# the arms the stretch check compares with (the stronger of those in a report, per metric)
MAE_EQUAL_FLOPS = ["mae_flops_16px", "mae_flops"]
VARIANT_ARMS = ["fastebm_32px_2ep", "fastebm_1ep", "fastebm_T1", "fastebm_truncated", "fastebm_linear", "fastebm_mim",
                "fastebm_16px", "fastebm_T1_mim", "fastebm_8ep", "fastebm_bs64", "fastebm_bs16", "fastebm_bs8",
                "fastebm_16px_8ep", "fastebm_T1_16ep", "fastebm_half_blr"]
QUICK_ARMS = ["random_timm", "fastebm"]
# --arms NAME expands these groups; "blr4e-3" / "blr32e-3": the compared arms, and their all-label fine-tuning at
# the built-in lr before round 6 / at round 7's candidate; "ft1000steps" / "ft400steps": ... for a shorter budget
PHOTOS_ARMS = ["fastebm_photos", "mae_epochs_16px_photos", "mae_flops_16px_photos"]  # round 15 (``--arms photos``)
GROUPS = {"variants": VARIANT_ARMS, "photos": PHOTOS_ARMS,
          **{sfx: COMPARED + [f"{a}_{sfx}" for a in COMPARED] for sfx in OTHER_FT}}
REFERENCE = "fastebm"  # the arm the acceptance checks are about (the shipped defaults)


# The data every evaluation reads: the built-in digits (fastebm-eval's default), or since round 14 the texture
# patches of textures.py, a folder evaluated with the digits' recipe (``--recipe small``) so that every number
# of the two benchmarks comes from the same commands. diagnose.py measures the backbone on digits; it runs once,
# with the digits benchmark.
BENCHMARKS = ("digits", "textures")


@dataclass
class Budget:
    """Per-job sizes: the default study, or --quick's tiny ones (plumbing only); and the benchmark's data
    (``data_dir`` None: the built-in digits; else the texture folder textures.py wrote)."""

    quick: bool = False
    data_dir: Optional[str] = None

    @property
    def benchmark(self) -> str:
        return "digits" if self.data_dir is None else "textures"

    @property
    def eval_folder(self) -> str:
        """The work folder's sub-folder of the evaluations (``eval`` for the digits, as before round 14)."""
        return "eval" if self.data_dir is None else f"eval_{self.benchmark}"

    def eval_data_flags(self) -> List[str]:
        """What every fastebm-eval command adds to read the benchmark's data (the digits: nothing)."""
        if self.data_dir is None:
            return []
        return ["--data", self.data_dir, "--recipe", "small", "--num_workers", "0"]

    def pretrain_extra(self) -> List[str]:
        return ["--max_steps", "2", "--grid_every", "0"] if self.quick else []

    def mae_max_steps(self) -> Optional[int]:
        return 2 if self.quick else None

    def label_sets(self) -> Dict[str, List[str]]:
        # quick: "all" is a 30-per-class subset so that its fine-tuning is a few steps
        return {"100": ["--few_shot", "10"], "all": ["--few_shot", "30"] if self.quick else []}

    def finetune_extra(self) -> List[str]:
        return ["--epochs", "3"] if self.quick else []  # quick: 3 epochs, so the curves have 3 points

    def linprobe_extra(self) -> List[str]:
        return ["--epochs", "60", "--warmup_epochs", "5"] if self.quick else []


def _train_flag(arm: Arm, flag: str, default):
    """The value the arm's fastebm-train flags give ``flag``, else ``default``."""
    return arm.flags[arm.flags.index(flag) + 1] if flag in arm.flags else default


def train_epochs(arm: Arm) -> float:
    return float(_train_flag(arm, "--epochs", PRETRAIN_EPOCHS))


def train_batch_size(arm: Arm) -> int:
    """The arm's pretraining batch (fastebm-train's default 32 unless its flags say otherwise)."""
    return int(_train_flag(arm, "--batch_size", PRETRAIN_BATCH))


def pretrain_command(arm: Arm, seed: int, out: str, budget: Budget, mae_epochs: float = None) -> Optional[List[str]]:
    """argv of the arm's pretraining (None for an untrained init)."""
    if arm.kind == "init":
        return None
    if arm.kind == "fastebm":
        flags = list(TRAIN_COMMON)
        if "--epochs" in arm.flags:
            i = flags.index("--epochs")
            del flags[i:i + 2]
        train = ["-m", "fastebm", "train"] if arm.pretrain_data == "builtin" else [os.path.join(HERE, "photos_only.py")]
        return [sys.executable, *train, "--output_dir", out, "--seed", str(seed), *flags,
                *arm.flags, *budget.pretrain_extra()]
    cmd = [sys.executable, os.path.join(HERE, "mae.py"), "--output_dir", out, "--seed", str(seed), "--epochs", f"{mae_epochs:.4f}"]
    if arm.mae_img_size:
        cmd += ["--img_size", str(arm.mae_img_size)]
    if arm.pretrain_data != "builtin":
        cmd += ["--pretrain_data", arm.pretrain_data]
    if budget.mae_max_steps():
        cmd += ["--max_steps", str(budget.mae_max_steps())]
    return cmd


def pretrain_px(arm: Arm) -> int:
    """The size the arm's backbone is pretrained at (an untrained init: vit_demo's pretraining size, 16)."""
    from fastebm.models import PRESETS, pretrain_img_size

    if arm.kind == "mae":
        return arm.mae_img_size or PRESETS["vit_demo"]["img_size"]
    if arm.kind == "fastebm":
        return int(_train_flag(arm, "--img_size", pretrain_img_size("vit_demo")))
    return pretrain_img_size("vit_demo")


def eval_px(arm: Arm) -> int:
    """The input size every evaluation of the arm runs at (round 12's protocol): the size its backbone was
    pretrained at, which is fastebm-eval's default for it (an untrained init: the size a default fastebm
    backbone is pretrained and evaluated at), unless the arm names one (the arms measured at 32 px before)."""
    return arm.eval_img_size or pretrain_px(arm)


def source_flags(arm: Arm, seed: int, pretrain_dir: str) -> List[str]:
    """How fastebm-eval gets the arm's backbone, and at what size."""
    src = ["--init", arm.init] if arm.kind == "init" else ["--ckpt", os.path.join(pretrain_dir, "backbone.pth")]
    return [*src, "--img_size", str(eval_px(arm))]


def eval_commands(arm: Arm, seed: int, pretrain_dir: str, out: str, budget: Budget) -> Dict[str, List[List[str]]]:
    """{job part: [argv, ...]} for one (arm, seed): the frozen evaluations, and one fine-tuning per label set."""
    src = source_flags(arm, seed, pretrain_dir)
    ev = [sys.executable, "-m", "fastebm", "eval"]
    common = ["--seed", str(seed), *budget.eval_data_flags()]
    parts = {"frozen": []}
    for labels, few in budget.label_sets().items():
        parts["frozen"].append([*ev, "linprobe", *src, *common, *few, *budget.linprobe_extra(),
                                "--output_dir", os.path.join(out, f"lp_{labels}")])
    parts["frozen"].append([*ev, "knn", *src, *common, *budget.label_sets()["all"], "--output_dir", os.path.join(out, "knn_all")])
    if budget.data_dir is None:
        parts["frozen"].append([sys.executable, os.path.join(HERE, "diagnose.py"), *src, "--seed", str(seed),
                                "--out", os.path.join(out, "diag.json")])
    for labels, few in budget.label_sets().items():
        ft = os.path.join(out, f"ft_{labels}")
        # the re-probe reads the fine-tuned checkpoint, already at the evaluation size
        parts[f"ft_{labels}"] = [
            [*ev, "finetune", *src, *common, *few, *budget.finetune_extra(), *arm.ft_flags, "--output_dir", ft],
            [*ev, "linprobe", "--ckpt", os.path.join(ft, "checkpoint.pt"), *common, *few, *budget.linprobe_extra(),
             "--output_dir", ft + "_reprobe"],
            [sys.executable, os.path.join(HERE, "train_accuracy.py"), "--ckpt", os.path.join(ft, "checkpoint.pt"),
             "--out", ft + "_train.json"],
        ]
    return {k: v for k, v in parts.items() if arm.parts is None or k in arm.parts}

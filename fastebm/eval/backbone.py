"""What to evaluate: a backbone read from a checkpoint or export, or an untrained baseline.

Three inputs give a :class:`Backbone` (architecture + timm-named weights):

* a fastebm training checkpoint (``last.pt``): the ``model.*`` weights of the objective, the
  energy head and step sizes dropped; the architecture from the run's preset and the weights'
  shapes;
* an exported backbone (``.safetensors`` with its metadata, or ``.pth``; either with the JSON
  sidecar :func:`fastebm.eval.export.sidecar_path`): timm ``VisionTransformer`` names;
* ``--init random`` (timm's own initialisation of the same architecture) or ``--init fastebm``
  (:class:`fastebm.EnergyViT`'s initialisation), the baselines.

Every file is opened without running pickled code (``torch.load(weights_only=True)`` or
safetensors). Anything that is not one of these (a folder, a file that holds pickled Python objects
such as MAE's ``argparse.Namespace``), or whose tensors do not fit the architecture, raises
:class:`~fastebm.errors.UsageError` (the CLI's exit code 2) naming the file and what to give instead.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..corrupt import IMAGENET_MEAN, IMAGENET_STD
from ..models import PRESETS, TIMM_NAMES, pretrain_img_size
from ..checkpoint import FORMAT as TRAIN_CHECKPOINT_FORMAT
from ..checkpoint import REQUIRED_KEYS as TRAIN_CHECKPOINT_KEYS
from ..checkpoint import pickled_objects
from ..errors import UsageError

EXPORT_FORMAT = "fastebm-backbone"
ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
# Files in a folder given as --ckpt that --ckpt can read, in the order they are suggested.
_FOLDER_CANDIDATES = ("last.pt", "backbone.pth")


@dataclass
class Backbone:
    """A ViT backbone: ``arch`` = timm ``VisionTransformer`` keyword arguments (``ARCH_KEYS``)."""

    arch: Dict[str, Any]
    state: Optional[Dict[str, torch.Tensor]]  # timm names, no classifier; None: --init random
    source: str  # "checkpoint", "export", "random", "fastebm"
    preset: Optional[str] = None
    path: Optional[str] = None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    info: Dict[str, Any] = field(default_factory=dict)
    test_img_size: Optional[int] = None  # an export's pretrained_cfg test_input_size; None: its own img_size

    @property
    def eval_img_size(self) -> int:
        """Pixels fastebm-eval runs at without ``--img_size``: the export's timm ``test_input_size`` if it
        names one, else the size the backbone was pretrained at (``arch["img_size"]``), as MAE fine-tunes
        at its pretraining resolution. A vit_demo pretrained at its default 16 px is evaluated at 16 px."""
        if self.test_img_size:
            return int(self.test_img_size)
        return int(self.arch["img_size"])

    @property
    def timm_name(self) -> Optional[str]:
        return TIMM_NAMES.get(self.preset) if self.preset else None

    def describe(self) -> str:
        a = self.arch
        what = self.path if self.path else f"--init {self.source}"
        size = f"built at {a['img_size']} px, untrained" if self.source in ("random", "fastebm") else f"pretrained at {a['img_size']} px"
        return (f"{self.preset or 'ViT'} (patch {a['patch_size']}, width {a['embed_dim']}, depth {a['depth']}, "
                f"{a['num_heads']} heads, {size}) from {what}")


def preset_arch(name: str, img_size: Optional[int] = None) -> Dict[str, Any]:
    p = PRESETS[name]
    return {"img_size": int(img_size or p["img_size"]), "patch_size": p["patch_size"], "in_chans": 3,
            "embed_dim": p["embed_dim"], "depth": p["depth"], "num_heads": p["num_heads"], "mlp_ratio": 4.0}


def arch_from_state(state: Dict[str, torch.Tensor], num_heads: Optional[int], where: str) -> Dict[str, Any]:
    """Architecture read off the tensors' shapes (square images); ``num_heads`` cannot be, so it is given."""
    try:
        w = state["patch_embed.proj.weight"]
        dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
        tokens = int(state["pos_embed"].shape[1]) - 1
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    except (KeyError, ValueError, IndexError, AttributeError):
        raise UsageError(f"{where} is not a ViT backbone (no patch_embed/pos_embed/blocks tensors under timm's names); "
                         f"give a fastebm last.pt or a file written by fastebm-export") from None
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise UsageError(f"{where}: pos_embed has {tokens} patch positions, not a square grid; only square images are supported")
    if num_heads is None:
        same = [p for p in PRESETS.values() if p["embed_dim"] == dim]
        if not same:
            raise UsageError(f"{where}: width {dim} matches no fastebm preset and the file carries no num_heads; "
                             f"export it with fastebm-export, which records the architecture")
        num_heads = same[0]["num_heads"]
    return {"img_size": grid * patch, "patch_size": patch, "in_chans": in_chans, "embed_dim": dim, "depth": depth,
            "num_heads": int(num_heads), "mlp_ratio": hidden / dim}


def preset_of(arch: Dict[str, Any]) -> Optional[str]:
    for name in PRESETS:
        ref = preset_arch(name, arch["img_size"])
        if all(ref[k] == arch[k] for k in ARCH_KEYS if k != "img_size"):
            return name
    return None


def _reason(exc: BaseException) -> str:
    """First sentence of an exception's message, with its type (library messages can be pages long)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0][:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def ckpt_file_problem(path: str, flag: str = "--ckpt") -> Optional[str]:
    """Why ``path`` cannot be read as a checkpoint file (it does not exist, or it is a folder: the message
    names the checkpoint files in it), or None when it is a file."""
    if os.path.isfile(path):
        return None
    if not os.path.isdir(path):
        return f"{flag}: {path!r} does not exist (give last.pt, an exported .safetensors/.pth)"
    found = _checkpoints_in(path)
    if not found:
        return (f"{flag}: {path!r} is a folder and holds no checkpoint (no last.pt, backbone.pth or .safetensors); "
                f"give a checkpoint file: last.pt, an exported .safetensors/.pth")
    return f"{flag}: {path!r} is a folder; give a checkpoint file, e.g. {' or '.join(found)}"


def _checkpoints_in(folder: str) -> List[str]:
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        names = []
    ordered = [n for n in _FOLDER_CANDIDATES if n in names] + [n for n in names if n.endswith(".safetensors")]
    return [os.path.join(folder, n) for n in ordered if os.path.isfile(os.path.join(folder, n))][:3]


def _pickled(path: str, exc: BaseException) -> Optional[UsageError]:
    """The error for a file whose pickle refers to Python objects (MAE's checkpoints hold an
    ``argparse.Namespace``): ``weights_only`` loading refused it, and fastebm never unpickles code."""
    foreign = pickled_objects(path, exc)
    if not foreign:
        return None
    names = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    return UsageError(f"--ckpt {path} holds pickled Python objects ({names}), which fastebm does not load (unpickling "
                      f"can run code); if you trust the file, save its weights alone and give that file, e.g. in Python "
                      f"torch.save(torch.load({path!r}, weights_only=False)['model'], 'backbone.pth') "
                      f"(the key of its state_dict may differ)")


def _unreadable(path: str, exc: BaseException) -> UsageError:
    return UsageError(f"--ckpt {path} cannot be read (truncated, corrupt, or another tool's file: {_reason(exc)}); "
                      f"give a fastebm last.pt or a file written by fastebm-export")


def _read_sidecar(path: str) -> Dict[str, Any]:
    from .export import sidecar_path

    side = sidecar_path(path)
    if not os.path.isfile(side):
        return {}
    try:
        with open(side) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--ckpt {path}: its sidecar {side} is not valid JSON ({_reason(exc)})") from None
    return meta if isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT else {}


def _read_safetensors(path: str):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors reports a bad header/length through several exception types
        raise _unreadable(path, exc) from None
    info = {}
    if "fastebm" in meta:
        try:
            info = json.loads(meta["fastebm"])
        except ValueError:
            info = {}
    return state, info


def _tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_backbone(path: str) -> Backbone:
    """A :class:`Backbone` from ``last.pt``, ``.safetensors`` or ``.pth``.

    Raises UsageError (one line naming the file) when ``path`` does not exist, is a folder (naming the
    checkpoint files in it), holds pickled Python objects (naming their classes), is truncated or
    another tool's file, or its tensors are not a ViT backbone."""
    problem = ckpt_file_problem(path)
    if problem:
        raise UsageError(problem)
    if path.endswith(".safetensors"):
        state, meta = _read_safetensors(path)
        meta = meta or _read_sidecar(path)
        return _from_export(path, state, meta)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad magic, pickle that is not weights-only ...
        raise (_pickled(path, exc) or _unreadable(path, exc)) from None
    if isinstance(obj, dict) and obj.get("format") == TRAIN_CHECKPOINT_FORMAT:
        missing = [k for k in TRAIN_CHECKPOINT_KEYS if k not in obj]
        if missing:
            raise UsageError(f"--ckpt {path} is a fastebm training checkpoint without {missing}; it is incomplete")
        return _from_training_checkpoint(path, obj)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and _tensor_dict(obj.get(key)):
            obj = obj[key]
            break
    if not _tensor_dict(obj):
        raise UsageError(f"--ckpt {path} is neither a fastebm training checkpoint nor a backbone state dict "
                         f"(another tool's file?); give last.pt or a file written by fastebm-export")
    return _from_export(path, obj, _read_sidecar(path))


def _from_training_checkpoint(path: str, ckpt: Dict[str, Any]) -> Backbone:
    from .export import backbone_from_objective_state

    state = backbone_from_objective_state(ckpt["model"])
    config = ckpt.get("config") or {}
    preset = config.get("model")
    if preset not in PRESETS:
        raise UsageError(f"--ckpt {path}: its config names model {preset!r}, which this fastebm does not know")
    arch = arch_from_state(state, PRESETS[preset]["num_heads"], f"--ckpt {path}")
    expected = preset_arch(preset, config.get("img_size"))
    if arch != expected:
        diff = ", ".join(f"{k} {arch[k]} (config says {expected[k]})" for k in ARCH_KEYS if arch[k] != expected[k])
        raise UsageError(f"--ckpt {path}: its weights do not match its own config's {preset} ({diff}); the file is damaged")
    info = {"step": int(ckpt.get("step", 0)), "energy": config.get("energy")}
    return Backbone(arch, state, "checkpoint", preset, path, info=info)


def _from_export(path: str, state: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Backbone:
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    args = meta.get("model_args") or {}
    arch = arch_from_state(state, args.get("num_heads"), f"--ckpt {path}")
    preset = meta.get("fastebm_model") if meta.get("fastebm_model") in PRESETS else preset_of(arch)
    mean = tuple(meta.get("mean", IMAGENET_MEAN))
    std = tuple(meta.get("std", IMAGENET_STD))
    test = (meta.get("pretrained_cfg") or {}).get("test_input_size")
    test = int(test[-1]) if isinstance(test, (list, tuple)) and test and isinstance(test[-1], int) and test[-1] > 0 else None
    return Backbone(arch, state, "export", preset, path, mean, std, info={"meta": bool(meta)}, test_img_size=test)


def init_backbone(kind: str, preset: str, img_size: Optional[int], seed: int) -> Backbone:
    """The untrained baselines: ``random`` = timm's init (built later, seeded), ``fastebm`` = EnergyViT's.

    Built at ``img_size`` if given, else at the size fastebm-train pretrains ``preset`` at
    (:func:`fastebm.models.pretrain_img_size`: 16 px for vit_demo), so that ``--init random`` is evaluated
    like a default backbone of the same preset."""
    arch = preset_arch(preset, img_size or pretrain_img_size(preset))
    if kind == "random":
        return Backbone(arch, None, "random", preset)
    from ..models import EnergyViT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EnergyViT(**arch)
    return Backbone(arch, {k: v.clone() for k, v in model.backbone_state_dict().items()}, "fastebm", preset)


def weights_fingerprint(state: Optional[Dict[str, torch.Tensor]]) -> Optional[str]:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (None for None): the identity of a
    backbone's weights, whatever file format or path they were read from."""
    if state is None:
        return None
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def eval_size(cfg, bb: Backbone) -> int:
    """Pixels an evaluation runs at: ``--img_size`` if given, else the backbone's :attr:`Backbone.eval_img_size`."""
    return int(cfg.img_size or bb.eval_img_size)


def resolve_backbone(cfg) -> Backbone:
    """The backbone a run's config asks for; checks --model against the checkpoint."""
    if cfg.init is not None:
        return init_backbone(cfg.init, cfg.model or "vit_demo", cfg.img_size, cfg.seed)
    bb = read_backbone(cfg.ckpt)
    if cfg.model is not None:
        want = preset_arch(cfg.model, bb.arch["img_size"])
        if any(want[k] != bb.arch[k] for k in ARCH_KEYS):
            have = bb.preset or f"a ViT of width {bb.arch['embed_dim']}, depth {bb.arch['depth']}, patch {bb.arch['patch_size']}"
            raise UsageError(f"--model {cfg.model} but --ckpt {cfg.ckpt} holds {have}; drop --model "
                             f"(the checkpoint defines the model) or give a {cfg.model} checkpoint")
    return bb

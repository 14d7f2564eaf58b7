"""Checkpoint files: the training-checkpoint format, ``weights_only`` loading, resume discovery.

Used by training (writing ``last.pt``, ``--resume``) and by evaluation (exporting a backbone from a
checkpoint); it depends on neither. The format is docs/design.md §9.

Layout of ``OUTPUT_DIR``: ``last.pt`` is always the newest *complete* checkpoint; the one it
replaced is kept as ``last.prev.pt`` so that a damaged ``last.pt`` (disk full, node lost while
copying) still leaves a run to resume. Every write goes through :func:`fastebm.files.atomic_write`.
When a resume falls back to last.prev.pt, the damaged last.pt is renamed to ``last.pt.damaged``
(:func:`set_aside_damaged`) before the next save, whose rotation would otherwise move the damaged
file over the good last.prev.pt.

A checkpoint holds only tensors, numbers, strings, bools, None, lists and dicts, so loading it
never runs pickled code.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import torch

from .errors import CheckpointError, OutputError
from .files import fsync_dir, atomic_write

__all__ = ["FORMAT", "VERSION", "LAST", "PREVIOUS", "REQUIRED_KEYS", "atomic_torch_save",
           "save_checkpoint", "load_checkpoint", "find_resume_checkpoint", "folder_hint", "damaged_last",
           "set_aside_damaged"]

FORMAT = "fastebm-train-checkpoint"
VERSION = 1
LAST = "last.pt"
PREVIOUS = "last.prev.pt"
# fastebm-eval finetune's resumable state (its own format): named here so fastebm-train can refuse a folder holding one
FINETUNE_CHECKPOINT = "checkpoint.pt"
# fastebm-train's resolved flags, written before its first step: named here so fastebm-eval can recognise a
# training run that has not saved a checkpoint yet
TRAIN_CONFIG = "config.yaml"
REQUIRED_KEYS = ("format", "model", "optimizer", "step", "config", "rng")


def atomic_torch_save(obj: Any, path: str) -> str:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def save_checkpoint(state: Dict[str, Any], output_dir: str) -> str:
    """Writes ``state`` (plus the format marker) as OUTPUT_DIR/last.pt, keeping the previous one as last.prev.pt."""
    state = dict(state, format=FORMAT, version=VERSION)
    return atomic_write(os.path.join(output_dir, LAST), lambda fh: torch.save(state, fh),
                        keep_previous=os.path.join(output_dir, PREVIOUS))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Loads and sanity-checks a training checkpoint.

    Raises CheckpointError naming the file, the problem and the fix when ``path`` does not exist,
    is a folder (the message names the checkpoint file in it), is unreadable, truncated or corrupt,
    is another tool's PyTorch file, is an exported backbone (``backbone.pth``, ``.safetensors``:
    the ViT's weights only, no energy head or step sizes), or lacks required keys.
    """
    state, problem, fix = _read(path)
    if problem is not None:
        raise CheckpointError(f"{problem}; {fix}" if fix else problem)
    return state


def folder_hint(folder: str) -> str:
    """For a folder given where a checkpoint file belongs: ``"give the checkpoint file in it, e.g. F"``,
    F the first of last.pt, last.prev.pt, the newest checkpoint-E.pt that exists in it (or what to do
    when it holds none)."""
    for name in (LAST, PREVIOUS):
        if os.path.isfile(os.path.join(folder, name)):
            return f"give the checkpoint file in it, e.g. {os.path.join(folder, name)}"
    epochs = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(r"checkpoint-(\d+)\.pt", name)
        if m and os.path.isfile(os.path.join(folder, name)):
            epochs.append((int(m.group(1)), name))
    if epochs:
        return f"give the checkpoint file in it, e.g. {os.path.join(folder, max(epochs)[1])}"
    return (f"give a checkpoint file; it holds none ({LAST}, which fastebm-train writes in its --output_dir, "
            f"is not there)")


def _read(path: str) -> Tuple[Optional[Dict[str, Any]], Optional[str], str]:
    """(state, None, "") for a usable checkpoint, else (None, the problem, its fix) (one line together)."""
    if os.path.isdir(path):
        return None, f"checkpoint {path!r} is a folder", folder_hint(path)
    if not os.path.isfile(path):
        return None, f"checkpoint {path} does not exist", ""
    if _is_safetensors(path):
        return None, *_exported_backbone(path, "a .safetensors export")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad magic, unpickling refused ...
        foreign = pickled_objects(path, exc)
        if foreign:
            return None, (
                f"{path} is a PyTorch file that is not a fastebm training checkpoint (it holds pickled objects: "
                f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})"), (
                "give a last.pt written by fastebm-train, whose checkpoints hold only tensors and plain values")
        with open(path, "rb") as fh:
            head = fh.read(4)
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch.save's zip nor a legacy pickle
            return (None, f"{path} is not a PyTorch checkpoint at all (it starts with {head!r})",
                    "give a last.pt written by fastebm-train")
        return None, f"checkpoint {path} is {_unreadable(exc)}", _damaged_hint(path)
    if isinstance(state, dict) and state.get("format") != FORMAT and _looks_like_backbone(state):
        return None, *_exported_backbone(path, "an exported backbone")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None, f"checkpoint {path} is not a fastebm training checkpoint (no '{FORMAT}' marker)", ""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        return None, f"checkpoint {path} lacks {missing}; it is incomplete", ""
    return state, None, ""


def _unreadable(exc: Exception) -> str:
    """``"unreadable, truncated or corrupt (REASON...)"`` for a load error."""
    reason = " ".join(str(exc).split())[:90] if str(exc).strip() else type(exc).__name__
    return f"unreadable, truncated or corrupt ({reason}...)"


def _damaged_hint(path: str) -> str:
    """The fix for an unreadable checkpoint file: the previous checkpoint beside a damaged last.pt, else
    another readable file (never the file that failed)."""
    folder, name = os.path.split(path)
    previous = os.path.join(folder, PREVIOUS)
    if name == LAST and os.path.isfile(previous):
        return f"resume from the previous checkpoint {previous} instead (--resume auto falls back to it)"
    return "give a readable checkpoint file (e.g. a checkpoint-E.pt kept by --save_ckpt_freq)"


_BACKBONE_KEYS = ("patch_embed.proj.weight", "cls_token", "pos_embed")


def _looks_like_backbone(state: Dict[str, Any]) -> bool:
    """A plain ViT state dict (timm names, as backbone.pth and fastebm-export's .pth hold), possibly under 'model'."""
    for sd in (state, state.get("model"), state.get("state_dict")):
        if isinstance(sd, dict) and sd and all(torch.is_tensor(v) for v in sd.values()):
            keys = {str(k).replace("module.", "", 1) for k in sd}
            if any(k in keys for k in _BACKBONE_KEYS) and not any(k.startswith("model.") for k in keys):
                return True
    return False


def _is_safetensors(path: str) -> bool:
    """A safetensors file: 8 bytes of header length (little-endian), then the JSON header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _exported_backbone(path: str, what: str) -> Tuple[str, str]:
    folder = os.path.dirname(path) or "."
    beside = os.path.join(folder, LAST)
    where = f" ({beside} beside it)" if os.path.isfile(beside) else f" ({LAST} in the run's --output_dir)"
    return (f"{path} is {what} (the ViT's weights only), not a fastebm training checkpoint",
            f"this needs the training checkpoint{where}, which also holds the energy head and the restoration "
            f"step sizes")


def pickled_objects(path: str, exc: Exception) -> List[str]:
    """The classes/functions a file's pickle refers to, when ``weights_only`` loading refused them (else [])."""
    if not isinstance(exc, pickle.UnpicklingError):
        return []  # a damaged zip or a bad magic number: not another tool's complete file
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # older torch, or a pickle too damaged to scan: the error message names the first one
        return re.findall(r"GLOBAL ([\w.]+)", str(exc))[:1]


def find_resume_checkpoint(output_dir: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """For ``--resume auto``: the newest loadable checkpoint of OUTPUT_DIR, or (None, None).

    Falls back from last.pt to last.prev.pt with a warning when last.pt is damaged (the caller then
    sets the damaged file aside with :func:`set_aside_damaged` before it saves, so the next save's
    rotation keeps the good last.prev.pt). Reads only. Raises CheckpointError naming every file
    tried when checkpoints exist but none loads.
    """
    names = [n for n in (LAST, PREVIOUS) if os.path.lexists(os.path.join(output_dir, n))]
    problems = []
    for i, name in enumerate(names):
        path = os.path.join(output_dir, name)
        state, problem, _ = _read(path)
        if problem is None:
            if problems:
                warnings.warn(f"resuming from the fallback checkpoint {path} (step {state['step']}); the damaged "
                              f"{os.path.join(output_dir, names[0])} is moved aside before training continues",
                              stacklevel=2)
            return state, path
        problems.append(problem)
        following = (f"trying the previous checkpoint {os.path.join(output_dir, names[i + 1])}" if i + 1 < len(names)
                     else "no other checkpoint to try")
        warnings.warn(f"{problem}; {following}", stacklevel=2)
    if problems:
        raise CheckpointError(
            f"no usable checkpoint in {output_dir} (tried {' and '.join(names)}): {'; '.join(problems)}; start the "
            f"run over with --overwrite instead of --resume (deletes its checkpoints), or give --resume a checkpoint "
            f"file that is readable (e.g. a checkpoint-E.pt kept by --save_ckpt_freq)")
    return None, None


def damaged_last(output_dir: str, resumed_from: str) -> Optional[str]:
    """OUTPUT_DIR/last.pt when the run resumes from OUTPUT_DIR/last.prev.pt and last.pt exists but does
    not load (so that the next save must not rotate it over the good last.prev.pt), else None. Reads only."""
    last, previous = os.path.join(output_dir, LAST), os.path.join(output_dir, PREVIOUS)
    try:
        if not (os.path.lexists(last) and os.path.samefile(resumed_from, previous)):
            return None
    except OSError:
        return None
    return last if _read(last)[1] is not None else None


def set_aside_damaged(path: str) -> str:
    """Renames a damaged checkpoint ``path`` to ``PATH.damaged`` (``PATH.damaged-2`` ... when taken; an
    atomic rename, nothing is copied or deleted) and returns the new name; OutputError if that fails."""
    target, n = f"{path}.damaged", 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}.damaged-{n}"
    try:
        os.replace(path, target)
    except OSError as exc:
        raise OutputError(f"cannot move the damaged checkpoint {path} aside to {target}: {exc.strerror or exc}; "
                          f"move or delete it yourself, then resume again") from None
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return target

"""Output files of the tools, each written atomically (temp file in the same folder, then rename).

An output folder that holds a tool's earlier outputs is refused unless ``--overwrite`` (the
contract of ``fastebm-train --output_dir``): a second run into the same ``-o`` would otherwise
leave the first run's per-image files (or its ``ood.md``) beside summaries that describe only the
second. With ``--overwrite`` only the tool's own files are deleted (:class:`ToolOutputs`: the
per-image files the earlier run's results.json lists, or by name when it has none), after
every check has passed and just before the first new file is written; other files stay.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .. import files
from .errors import ToolInputError

log = logging.getLogger(__name__)

__all__ = ["ToolOutputs", "RESTORE_OUTPUTS", "SCORE_OUTPUTS", "check_earlier_outputs", "remove_outputs",
           "check_output_dir", "ensure_output_dir", "atomic_write_text", "write_json", "write_csv", "save_pil", "save_figure", "safe_stem",
           "unique_columns"]


def check_output_dir(path: str, flag: str = "-o") -> str:
    """ToolInputError (one line) when ``path`` cannot become a writable output folder; reads only.

    Run before the other checks that precede :func:`ensure_output_dir` so that bad input is
    refused without creating the folder; ``ensure_output_dir`` still proves the folder writable."""
    path = os.fspath(path)
    if not path:
        raise ToolInputError(f"{flag}: the output folder must not be empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ToolInputError(f"{flag}: {path!r} exists and is not a folder; choose a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ToolInputError(f"{flag}: cannot create the output folder {path!r} ({existing!r} is a file); "
                             "choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ToolInputError(f"{flag}: cannot write to the output folder {path!r} ({existing!r} is not writable); "
                             "choose a writable folder")
    return path


def ensure_output_dir(path: str, flag: str = "-o") -> str:
    """Creates ``path`` if needed and proves it writable; ToolInputError (one line) otherwise."""
    path = os.fspath(path)
    if not path:
        raise ToolInputError(f"{flag}: the output folder must not be empty")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ToolInputError(f"{flag}: cannot write to the output folder {path!r} ({exc.strerror or exc}); "
                             "choose a writable folder") from None
    return path


PER_IMAGE_FILE = re.compile(r"^\d{4,}_.*\.png$")  # safe_stem(...) + ".png"


@dataclass(frozen=True)
class ToolOutputs:
    """The files a tool writes into its output folder: ``files`` at the top, and ``folders`` of
    per-image files. Which per-image files are the tool's: those that the earlier run's ``record``
    (a top-level JSON file) lists in its ``images`` rows under ``record_keys`` (paths relative to the
    folder, e.g. ``strips/0000_cat.png``); only when there is no readable record, those named
    ``NNNN_name.png``. Other files in those folders are not the tool's."""

    prog: str
    files: Tuple[str, ...]
    folders: Tuple[str, ...] = ()
    record: Optional[str] = None
    record_keys: Tuple[str, ...] = ()

    def present(self, out: str) -> List[str]:
        """Paths of this tool's files in ``out`` (reads only; [] when ``out`` is not a folder)."""
        if not os.path.isdir(out):
            return []
        paths = [os.path.join(out, f) for f in self.files if os.path.isfile(os.path.join(out, f))]
        recorded = self.recorded(out)
        if recorded is not None:
            return paths + recorded
        for folder in self.folders:
            sub = os.path.join(out, folder)
            if os.path.isdir(sub):
                paths += [os.path.join(sub, f) for f in sorted(os.listdir(sub))
                          if PER_IMAGE_FILE.match(f) and os.path.isfile(os.path.join(sub, f))]
        return paths

    def recorded(self, out: str) -> Optional[List[str]]:
        """The per-image files the record in ``out`` lists and that exist (a listed path must be a
        file directly inside one of ``folders``; others are ignored); None when there is no record
        or it cannot be read as JSON with a list of ``images`` rows."""
        if self.record is None:
            return None
        try:
            with open(os.path.join(out, self.record), encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return None
        rows = data.get("images") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            return None
        paths: List[str] = []
        for row in rows:
            for key in self.record_keys:
                rel = row.get(key) if isinstance(row, dict) else None
                if not isinstance(rel, str):
                    continue
                parts = rel.replace("\\", "/").split("/")
                if len(parts) != 2 or parts[0] not in self.folders or parts[1] in ("", ".", ".."):
                    continue
                path = os.path.join(out, parts[0], parts[1])
                if os.path.isfile(path) and path not in paths:
                    paths.append(path)
        return paths


RESTORE_OUTPUTS = ToolOutputs("fastebm-restore", ("results.json", "metrics.csv", "index.html", "grid.png"),
                              ("strips", "restored"), record="results.json", record_keys=("strip", "restored"))
SCORE_OUTPUTS = ToolOutputs("fastebm-score", ("ood.json", "ood.md", "energies.csv", "energy_hist.png"))


def _listing(out: str, paths: List[str]) -> str:
    """``results.json, grid.png, strips/ (6 files)``: the files, per-image folders counted."""
    top, per_folder = [], {}
    for path in paths:
        rel = os.path.relpath(path, out)
        if os.sep in rel:
            folder = rel.split(os.sep)[0]
            per_folder[folder] = per_folder.get(folder, 0) + 1
        else:
            top.append(rel)
    return ", ".join(top + [f"{folder}/ ({n} file{'s' if n > 1 else ''})" for folder, n in per_folder.items()])


def check_earlier_outputs(out: str, outputs: ToolOutputs, overwrite: bool, flag: str = "-o") -> List[str]:
    """The earlier run's files in ``out`` that ``--overwrite`` will delete ([] if none). Reads only.

    Raises ToolInputError naming them when there are any and ``overwrite`` is False."""
    found = outputs.present(os.fspath(out))
    if found and not overwrite:
        raise ToolInputError(f"{flag} {os.fspath(out)!r} holds the outputs of an earlier {outputs.prog} run "
                             f"({_listing(out, found)}): add --overwrite to replace them (deletes only those files; "
                             f"other files stay), or give another {flag}")
    return found


def remove_outputs(out: str, paths: List[str], outputs: ToolOutputs) -> int:
    """Deletes ``paths`` (from :func:`check_earlier_outputs`) and the per-image folders left empty;
    logs and returns the count. Raises OutputError naming a file that cannot be deleted."""
    removed = files.remove_files(paths)
    for folder in outputs.folders:
        try:
            os.rmdir(os.path.join(out, folder))  # only when empty: other files stay
        except OSError:
            pass
    if removed:
        log.info(f"--overwrite: deleted {removed} file(s) of the earlier {outputs.prog} run in {out}")
    return removed


def _in_folder(path: str) -> str:
    """``path``, after creating its folder (per-image outputs go to sub-folders such as strips/)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def atomic_write_text(path: str, text: str) -> str:
    return files.atomic_write_text(_in_folder(path), text)


def write_json(path: str, obj: Any) -> str:
    return files.atomic_write_json(_in_folder(path), obj)


def write_csv(path: str, rows: Sequence[Dict[str, Any]], columns: Iterable[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())


def save_pil(image, path: str) -> str:
    return files.atomic_write(_in_folder(path), lambda fh: image.save(fh, format="PNG"))


def save_figure(fig, path: str) -> str:
    return files.atomic_write(_in_folder(path), lambda fh: fig.savefig(fh, format="png"))


def safe_stem(name: str, index: int, used: set) -> str:
    """``0007_cat`` from ``/some/dir/cat.jpg`` (index first: unique and in input order)."""
    base = os.path.splitext(os.path.basename(name.rstrip("/")))[0] or "image"
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:60]
    stem = f"{index:04d}_{keep}"
    while stem in used:
        stem += "_"
    used.add(stem)
    return stem


def unique_columns(rows: List[Dict[str, Any]], first: Sequence[str]) -> List[str]:
    cols = list(first)
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols

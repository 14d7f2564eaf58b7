"""Output files of the tools, each written atomically (temp file in the same folder, then rename)."""
from __future__ import annotations

import csv
import io
import os
import tempfile
from typing import Any, Dict, Iterable, List, Sequence

from .. import files
from .errors import ToolInputError

__all__ = ["ensure_output_dir", "atomic_write_text", "write_json", "write_csv", "save_pil", "save_figure", "safe_stem",
           "unique_columns"]


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

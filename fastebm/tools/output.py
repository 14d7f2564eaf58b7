"""Output files of the tools, each written atomically (temp file in the same folder, then rename)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from typing import Any, Dict, Iterable, List, Sequence

from .errors import ToolInputError


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


def _file_mode() -> int:
    """0o666 minus the process umask: what ``open(path, "w")`` would give (mkstemp makes 0o600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str, data: bytes) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _plain(value):
    """JSON-safe value: non-finite floats become None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json(path: str, obj: Any) -> str:
    return atomic_write_text(path, json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n")


def write_csv(path: str, rows: Sequence[Dict[str, Any]], columns: Iterable[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())


def save_pil(image, path: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_figure(fig, path: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


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

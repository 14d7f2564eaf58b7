"""The file index the DALI loader needs before its first batch: which files decode, their sizes, and
which ones DALI's decoder must not see.

DALI fails a whole batch on one corrupt file and decodes some files differently from the torch
loader (EXIF orientation, 16-bit PNG scaling) or not at all (GIF). So every file is checked once,
in parallel, with the torch loader's own decoder (``fastebm.data.folder.decode_image``), and sorted
into three kinds:

* ``native``: DALI decodes it to exactly the pixels ``decode_image`` gives (JPEG in L/RGB, 8-bit
  PNG in L/LA/RGB/RGBA, palette PNG of any depth, RGB BMP, PPM/PGM; tested pixel for pixel on CPU
  against DALI 2.4's CPU decoder);
* ``converted``: ``decode_image`` reads it but DALI would not, or not the same way (GIF, CMYK
  JPEG, 16-bit PNG, TIFF, WebP, EXIF-rotated, other modes): the RGB image ``decode_image`` returns
  is written once as an 8-bit PNG in the cache and DALI reads that copy, so these images go
  through the torch path's conversion and are never skipped;
* ``bad``: ``decode_image`` fails (truncated, corrupt, not an image): skipped and reported exactly
  like the torch loader does (the same replacement sample, the same "path (reason)" text).

Sizes are those of the decoded image (after any orientation), which is what the crop box is drawn
from. The index is cached as JSON in the cache folder, keyed by absolute path with the file's size
and modification time, so a rerun only re-checks new or changed files. Writes are atomic (temp file
+ rename), so ranks that build the index at the same time leave a consistent cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

from ..files import atomic_write
from .folder import UnreadableImage, decode_image

INDEX_VERSION = 1
INDEX_FILE = "dali_index.json"
CONVERTED_DIR = "converted"
CACHE_DIR_NAME = ".fastebm_dali"  # a dot-folder: scan_image_files never lists it as data

NATIVE, CONVERTED, BAD = "native", "converted", "bad"
EXIF_ORIENTATION = 0x0112

# (PIL format, PIL mode) pairs whose DALI decode equals decode_image's (tests/test_data_dali.py).
_NATIVE_MODES = {
    "JPEG": {"L", "RGB"},
    "PNG": {"L", "LA", "RGB", "RGBA", "P"},
    "BMP": {"RGB"},
    "PPM": {"L", "RGB"},
}


@dataclass(frozen=True)
class FileRecord:
    """One file: ``kind`` (native / converted / bad), decoded width and height in pixels (0 for bad
    files), ``reason`` (why converted or why unreadable; empty for native files) and ``read_path``
    (what DALI reads: the file itself, or its converted PNG copy)."""

    kind: str
    width: int
    height: int
    reason: str
    read_path: str


def _png_bit_depth(path: str) -> int:
    with open(path, "rb") as fh:
        head = fh.read(25)
    return head[24] if len(head) == 25 else 0  # IHDR's bit-depth byte


def why_not_native(path: str) -> Optional[str]:
    """Why DALI must not decode ``path`` itself (None when it may). Reads the header only."""
    try:
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as exc:  # decode_image will give the real reason
        return f"header unreadable ({type(exc).__name__})"
    if fmt not in _NATIVE_MODES:
        return f"{fmt} format"
    if mode not in _NATIVE_MODES[fmt]:
        return f"{fmt} in mode {mode}"
    if fmt == "PNG" and _png_bit_depth(path) != 8 and mode != "P":
        return f"PNG with {_png_bit_depth(path)}-bit samples"
    if orientation not in (0, 1):
        return f"EXIF orientation {orientation}"
    return None


def _converted_path(cache_dir: str, path: str, fingerprint: Tuple[int, int]) -> str:
    digest = hashlib.sha1(f"{os.path.abspath(path)}|{fingerprint[0]}|{fingerprint[1]}".encode()).hexdigest()
    return os.path.join(cache_dir, CONVERTED_DIR, digest[:2], digest + ".png")


def inspect_file(path: str, cache_dir: str) -> Tuple[Tuple[int, int], FileRecord]:
    """(fingerprint, record) of one file; writes the converted copy when one is needed."""
    try:
        st = os.stat(path)
        fingerprint = (st.st_size, st.st_mtime_ns)
    except OSError as exc:
        return (0, 0), FileRecord(BAD, 0, 0, exc.strerror or type(exc).__name__, path)
    try:
        image = decode_image(path)
    except UnreadableImage as exc:
        return fingerprint, FileRecord(BAD, 0, 0, exc.reason, path)
    reason = why_not_native(path)
    if reason is None:
        return fingerprint, FileRecord(NATIVE, image.width, image.height, "", path)
    target = _converted_path(cache_dir, path, fingerprint)
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        atomic_write(target, lambda fh: image.save(fh, format="PNG", compress_level=1))
    return fingerprint, FileRecord(CONVERTED, image.width, image.height, reason, target)


class FileIndex:
    """Records aligned with ``paths``; see the module docstring."""

    def __init__(self, paths: Sequence[str], records: Sequence[FileRecord], cache_dir: str):
        self.paths = list(paths)
        self.records = list(records)
        self.cache_dir = cache_dir

    def __len__(self) -> int:
        return len(self.records)

    def of_kind(self, kind: str) -> List[Tuple[str, str]]:
        """(path, reason) of every file of one kind, in index order."""
        return [(p, r.reason) for p, r in zip(self.paths, self.records) if r.kind == kind]

    def summary(self) -> str:
        bad, conv = self.of_kind(BAD), self.of_kind(CONVERTED)
        text = f"{len(self)} files: {len(self) - len(bad) - len(conv)} read by DALI directly"
        if conv:
            text += f", {len(conv)} converted to 8-bit PNG by the torch decoder first (e.g. {conv[0][0]}: {conv[0][1]})"
        if bad:
            text += f", {len(bad)} unreadable, skipped (e.g. {bad[0][0]}: {bad[0][1]})"
        return text + f"; cache {self.cache_dir}"


def default_cache_dir(data_root: str, fallback_dir: str) -> str:
    """``DATA/.fastebm_dali`` when the data folder is writable, else ``FALLBACK/dali_cache``."""
    here = os.path.join(data_root, CACHE_DIR_NAME)
    if os.path.isdir(here) and os.access(here, os.W_OK) or os.access(data_root, os.W_OK):
        return here
    return os.path.join(fallback_dir, "dali_cache")


def _load_cache(path: str) -> Dict[str, list]:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if isinstance(data, dict) and data.get("version") == INDEX_VERSION else {}


def _cached_record(path: str, entry: Optional[list]) -> Optional[FileRecord]:
    """The cached record if the file (and its converted copy) did not change since, else None."""
    if not entry:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    size, mtime, kind, width, height, reason, read_path = entry
    if (st.st_size, st.st_mtime_ns) != (size, mtime) or (kind == CONVERTED and not os.path.exists(read_path)):
        return None
    return FileRecord(kind, width, height, reason, read_path)


def build_index(paths: Sequence[str], cache_dir: str, workers: int = 1) -> FileIndex:
    """Checks every file once (``workers`` threads; PIL decodes without the GIL) and caches the result.

    Cost: one full decode per new or changed file (the torch loader pays that every epoch).
    """
    os.makedirs(cache_dir, exist_ok=True)
    index_path = os.path.join(cache_dir, INDEX_FILE)
    cache = _load_cache(index_path)
    keys = [os.path.abspath(p) for p in paths]

    def one(i: int):
        hit = _cached_record(paths[i], cache.get(keys[i]))
        return (None, hit) if hit is not None else inspect_file(paths[i], cache_dir)

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        results = list(pool.map(one, range(len(paths))))
    except BaseException:  # e.g. a stop signal during start-up: do not wait for the files still queued
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    changed = False
    for key, (fingerprint, record) in zip(keys, results):
        if fingerprint is not None:
            cache[key] = [*fingerprint, record.kind, record.width, record.height, record.reason, record.read_path]
            changed = True
    if changed:
        payload = json.dumps({"version": INDEX_VERSION, "entries": cache}, separators=(",", ":")).encode()
        os.makedirs(os.path.dirname(index_path), exist_ok=True)
        atomic_write(index_path, lambda fh: fh.write(payload))
    return FileIndex(paths, [r for _, r in results], cache_dir)

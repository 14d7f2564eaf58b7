"""The one image decoder of fastebm: file -> upright 8-bit RGB PIL image.

Every code path that reads an image file (the ``--data`` loader, restoration and scoring tools,
evaluation, the fallback of other loaders) calls :func:`decode_image`, so all of them see the same
pixels. What it does, in order:

1. decodes the whole file (a truncated file fails here, not later in a transform);
2. applies the EXIF (or XMP) orientation with ``PIL.ImageOps.exif_transpose``, so the image is
   the way viewers show it (all eight orientation values; a damaged EXIF block leaves the image
   as stored);
3. maps the pixel mode to 8-bit RGB (:func:`to_rgb8`) without clipping high-bit-depth data.

Mode mapping (``docs/training.md``, "Data: what happens to odd inputs", says the same):

* ``RGB``: as is. ``L``, ``1`` (0/255): grey replicated to three channels. ``P``: palette colours.
* Alpha (``LA``, ``PA``, ``RGBA``, ``P`` with transparency, premultiplied ``La``/``RGBa`` after
  un-premultiplying): dropped, the stored colour is kept. This is what torchvision's and timm's
  loaders (``convert("RGB")``) give, so a model sees the same pixels as with them; compositing
  would have to invent a background colour.
* ``CMYK``: R = (255 - C)(255 - K) / 255 (and likewise G, B), Pillow's conversion; ``YCbCr``:
  full-range ITU-R BT.601 (JPEG/TIFF default coefficients), Pillow's conversion; ``HSV``:
  Pillow's conversion. Embedded ICC profiles are not applied (as in torchvision/timm).
* ``LAB`` (TIFF CIELab): L* = byte * 100 / 255, a*, b* signed bytes, reference white D65 (TIFF 6.0
  section 23), converted to sRGB with ``skimage.color.lab2rgb`` (Pillow's own LAB -> RGB
  conversion is off by up to ~80 levels on in-gamut colours, measured against it).
* Unsigned integers wider than 8 bits (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, and ``I`` when
  the file states its depth: 16-bit PNG/PGM/PPM, TIFF with BitsPerSample b and unsigned
  SampleFormat): the format's nominal range [0, 2^b - 1] maps linearly onto [0, 255] with rounding,
  ``round(v * 255 / (2^b - 1))`` (for 16 bits ``round(v / 257)``, so 8-bit data stored as
  ``k * 257`` comes back as exactly ``k``). Pillow already reduces 16-bit RGB/RGBA/LA files to 8
  bits (high byte, within 1 of this rule).
* ``I`` without a known unsigned depth (signed TIFF, images built in memory): min-max of the
  image, because no nominal range exists and the 32-bit range would turn typical data black.
* ``F`` (32-bit float): values in [0, 1] (the usual convention of float image files) scale by
  255; anything else min-max of the finite values (no nominal range exists). Non-finite values
  become 0. A uniform image under min-max becomes 0.
* Any other mode raises :class:`UnreadableImage` naming it; the loader skips such a file and
  reports it like a damaged one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from .errors import UnreadableImage

__all__ = ["decode_image", "to_rgb8", "nominal_range", "UnreadableImage"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT = 258, 339
_ORIENTATION = 0x0112


def decode_image(path: str) -> Image.Image:
    """Decodes ``path`` completely -> upright RGB image (mode ``"RGB"``, 8 bits per channel).

    Raises :class:`UnreadableImage` (``.path``, ``.reason``) for anything that cannot be decoded
    and mapped: missing, truncated or corrupt files, unknown formats, unmappable pixel modes,
    decompression bombs. Never returns a partially decoded image (fastebm does not set
    ``ImageFile.LOAD_TRUNCATED_IMAGES``).
    """
    try:
        with Image.open(path) as im:
            im.load()  # full decode: a truncated file fails here
            value_range = nominal_range(im)  # needs the file's format/tags, which a transpose drops
            im = _upright(im)
            return to_rgb8(im, value_range)
    except UnreadableImage as exc:
        raise UnreadableImage(path, exc.reason) from None
    except Exception as exc:  # PIL reports damaged files through many types (OSError, SyntaxError, struct.error...)
        raise UnreadableImage(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _upright(im: Image.Image) -> Image.Image:
    """The image as viewers show it (EXIF/XMP orientation 2-8 applied); unchanged if none or unreadable."""
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block does not make the pixels unusable
        return im
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def nominal_range(im: Image.Image) -> Optional[Tuple[float, float]]:
    """(low, high) of the values an ``I``/``I;16*`` image's file format can hold, if stated; else None.

    16-bit modes -> (0, 65535); ``I`` from PNG (Pillow < 10 opens 16-bit grey as ``I``) or PGM/PPM
    (Pillow rescales any maxval > 255 to 16 bits) -> (0, 65535); ``I`` from TIFF with unsigned
    SampleFormat and BitsPerSample b -> (0, 2^b - 1). Signed or unknown -> None (min-max).
    """
    if im.mode in _SIXTEEN_BIT_MODES:
        return 0.0, 65535.0
    if im.mode != "I":
        return None
    if im.format in ("PNG", "PPM"):
        return 0.0, 65535.0
    tags = getattr(im, "tag_v2", None)
    if im.format == "TIFF" and tags is not None:
        bits = tags.get(_TIFF_BITS_PER_SAMPLE)
        sample_format = tags.get(_TIFF_SAMPLE_FORMAT, 1)
        bits = bits[0] if isinstance(bits, tuple) else bits
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
        if bits and sample_format == 1:
            return 0.0, float((1 << int(bits)) - 1)
    return None


def to_rgb8(im: Image.Image, value_range: Optional[Tuple[float, float]] = None) -> Image.Image:
    """Any PIL mode -> ``"RGB"`` (8-bit), per the mapping in this module's docstring.

    ``value_range`` (low, high) overrides the range of ``I``/``I;16*`` data (from
    :func:`nominal_range` of the opened file); None: 16-bit modes use (0, 65535), ``I`` min-max.
    Raises :class:`UnreadableImage` (path ``"<image>"``) for a mode with no mapping.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        grey = _wide_to_uint8(im, value_range)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "LAB":
        return _lab_to_rgb(im)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the palette colours; converting straight to RGB warns
    elif mode == "La":
        im = im.convert("LA")  # un-premultiplies; Pillow has no direct La -> RGB
    elif mode == "RGBa":
        im = im.convert("RGBA")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnreadableImage("<image>", f"pixel mode {mode!r} has no mapping to 8-bit RGB ({exc})") from None


def _wide_to_uint8(im: Image.Image, value_range: Optional[Tuple[float, float]]) -> np.ndarray:
    v = np.asarray(im).astype(np.float64)
    finite = np.isfinite(v)
    if value_range is None:
        value_range = (0.0, 65535.0) if im.mode in _SIXTEEN_BIT_MODES else _float_range(v, finite, im.mode)
    low, high = value_range
    if high <= low:  # uniform image under min-max: no contrast to keep
        return np.zeros(v.shape, dtype=np.uint8)
    # (v - low) * 255 / (high - low), not times 255 / (high - low): an exact half (127.5) stays exact and rounds up
    scaled = np.clip((np.where(finite, v, low) - low) * 255.0 / (high - low), 0.0, 255.0)
    return np.floor(scaled + 0.5).astype(np.uint8)  # round half up, the same for every platform


def _float_range(v: np.ndarray, finite: np.ndarray, mode: str) -> Tuple[float, float]:
    if not finite.any():
        return 0.0, 0.0
    low, high = float(v[finite].min()), float(v[finite].max())
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return 0.0, 1.0
    return low, high


def _lab_to_rgb(im: Image.Image) -> Image.Image:
    import warnings

    from skimage.color import lab2rgb

    raw = np.asarray(im)
    lab = np.empty(raw.shape, dtype=np.float64)
    lab[..., 0] = raw[..., 0] * (100.0 / 255.0)
    lab[..., 1:] = raw[..., 1:].view(np.int8)
    with warnings.catch_warnings():  # out-of-gamut colours are clipped below; no per-file warning
        warnings.simplefilter("ignore")
        rgb = np.clip(lab2rgb(lab, illuminant="D65"), 0.0, 1.0)
    return Image.fromarray(np.floor(rgb * 255.0 + 0.5).astype(np.uint8))

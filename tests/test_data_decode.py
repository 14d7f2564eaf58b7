"""decode_image: every pixel mode to 8-bit RGB without clipping, and the EXIF orientation applied.

Each expected value is computed here from the bytes written to the file, with float64 formulas
written independently of fastebm/data/decode.py (EXIF and TIFF specifications, CIE formulas,
colorsys), never by calling PIL's conversions.
"""
import colorsys
import io
import struct
import zlib

import numpy as np
import pytest
import tifffile  # a dependency of scikit-image
import torch
from PIL import Image

import fastebm.data.folder as folder
from fastebm.data.decode import UnreadableImage, decode_image, to_rgb8
from fastebm.data.folder import ImageFolderData


def _rng():
    return np.random.default_rng(int(torch.randint(0, 1 << 30, (1,))))


def _decoded(path):
    im = decode_image(str(path))
    assert im.mode == "RGB"
    return np.asarray(im).astype(np.int64)


def _grey3(v):
    return np.repeat(np.asarray(v)[..., None], 3, axis=2)


def _round(x):
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def _save(im, path, fmt, mode):
    im.save(path, fmt)
    with Image.open(path) as check:  # the file really holds the mode under test
        assert check.mode == mode
    return path


def _png16(arr, color_type):
    """A 16-bit PNG written from the specification (Pillow cannot write 16-bit colour PNGs)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- wide integer and float data

def test_16bit_grey_ramp_png_is_the_8bit_ramp(tmp_path):
    width = 2 * int(_rng().integers(200, 400)) + 1
    ramp = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    path = tmp_path / "ramp.png"
    (tmp_path / "ramp.png").write_bytes(_png16(np.repeat(ramp[None], 3, 0), color_type=0))
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # Pillow >= 10 / older
    got = _decoded(path)
    expected = _round(ramp.astype(np.float64) * 255.0 / 65535.0)
    assert np.array_equal(got, _grey3(np.repeat(expected[None], 3, 0)))
    quarters = got[0, [0, width // 4, width // 2, 3 * width // 4, width - 1], 0]
    assert np.abs(quarters - np.array([0, 64, 128, 191, 255])).max() <= 1
    assert (got == 255).mean() < 0.01  # not the old clipping to white


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I;16L", None), ("I;16N", None)])
def test_16bit_modes_scale_by_bit_depth(tmp_path, mode, fmt):
    rng = _rng()
    v = rng.integers(0, 65536, size=(13, 17)).astype(np.uint16)
    dtype = ">u2" if mode == "I;16B" else "<u2" if mode in ("I;16", "I;16L") else "=u2"
    im = Image.frombytes(mode, (17, 13), v.astype(dtype).tobytes())
    expected = _grey3(_round(v * 255.0 / 65535.0))
    if fmt is None:
        got = np.asarray(to_rgb8(im)).astype(np.int64)
    else:
        got = _decoded(_save(im, tmp_path / f"x.{fmt.lower()}", fmt, mode))
    assert np.array_equal(got, expected)


def test_16bit_pgm_uses_the_nominal_range(tmp_path):
    v = _rng().integers(0, 65536, size=(6, 11)).astype(np.uint16)
    path = tmp_path / "x.pgm"
    path.write_bytes(b"P5\n11 6\n65535\n" + v.astype(">u2").tobytes())
    assert np.array_equal(_decoded(path), _grey3(_round(v * 255.0 / 65535.0)))


def test_32bit_int_tiff_unsigned_uses_nominal_range_signed_uses_min_max(tmp_path):
    rng = _rng()
    u = rng.integers(0, 1 << 31, size=(5, 9)).astype(np.uint32)
    tifffile.imwrite(tmp_path / "u32.tif", u)
    assert np.array_equal(_decoded(tmp_path / "u32.tif"), _grey3(_round(u * 255.0 / 4294967295.0)))
    for dtype in (np.int32, np.int16):
        s = rng.integers(-3000, 9000, size=(5, 9)).astype(dtype)
        tifffile.imwrite(tmp_path / "s.tif", s)
        lo, hi = float(s.min()), float(s.max())
        assert np.array_equal(_decoded(tmp_path / "s.tif"), _grey3(_round((s - lo) * 255.0 / (hi - lo))))
    # an exact half of the range rounds up (scaling by a rounded 255 / range gave 127.4999... -> 127)
    half = np.array([[0, 25, 50]], dtype=np.int16)
    tifffile.imwrite(tmp_path / "half.tif", half)
    assert np.array_equal(_decoded(tmp_path / "half.tif"), _grey3(np.array([[0, 128, 255]])))


def test_in_memory_int_image_is_min_max():
    v = _rng().integers(-50000, 400000, size=(7, 5)).astype(np.int32)
    im = Image.frombytes("I", (5, 7), v.astype("=i4").tobytes())
    lo, hi = float(v.min()), float(v.max())
    assert np.array_equal(np.asarray(to_rgb8(im)).astype(np.int64), _grey3(_round((v - lo) * 255.0 / (hi - lo))))


def test_float_tiff_unit_range_scales_by_255_else_min_max(tmp_path):
    rng = _rng()
    unit = rng.random((6, 10)).astype(np.float32)
    _save(Image.frombytes("F", (10, 6), unit.astype("=f4").tobytes()), tmp_path / "u.tif", "TIFF", "F")
    assert np.array_equal(_decoded(tmp_path / "u.tif"), _grey3(_round(unit.astype(np.float64) * 255.0)))

    wide = (rng.random((6, 10)) * 10.0 - 3.0).astype(np.float32)
    wide[2, 3] = np.nan
    _save(Image.frombytes("F", (10, 6), wide.astype("=f4").tobytes()), tmp_path / "w.tif", "TIFF", "F")
    finite = wide[np.isfinite(wide)].astype(np.float64)
    expected = _round((np.nan_to_num(wide.astype(np.float64), nan=finite.min()) - finite.min()) * 255.0 / (finite.max() - finite.min()))
    got = _decoded(tmp_path / "w.tif")
    assert np.array_equal(got, _grey3(expected)) and got[2, 3, 0] == 0


@pytest.mark.parametrize("color_type,channels", [(2, 3), (6, 4), (4, 2)])
def test_16bit_colour_png_within_one_level(tmp_path, color_type, channels):
    v = _rng().integers(0, 65536, size=(9, 14, channels)).astype(np.uint16)
    (tmp_path / "x.png").write_bytes(_png16(v, color_type))
    colour = v[..., :3] if channels >= 3 else _grey3(v[..., 0])
    assert np.abs(_decoded(tmp_path / "x.png") - colour * 255.0 / 65535.0).max() <= 1.0


def test_16bit_rgb_tiff_within_one_level(tmp_path):
    v = _rng().integers(0, 65536, size=(9, 14, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "x.tif", v, photometric="rgb")
    assert np.abs(_decoded(tmp_path / "x.tif") - v * 255.0 / 65535.0).max() <= 1.0


# ---------------------------------------------------------------- 8-bit modes other than RGB

def _palette(rng):
    return rng.integers(0, 256, size=(256, 3)).astype(np.uint8)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "RGBA", "P", "P+tRNS", "PA"])
def test_grey_palette_and_alpha_modes(tmp_path, mode):
    rng = _rng()
    h, w = 11, 13
    if mode == "1":
        bits = rng.integers(0, 2, size=(h, w)).astype(bool)
        im, expected, fmt = Image.fromarray(bits), _grey3(bits * 255), "PNG"
    elif mode in ("L", "LA", "RGBA"):
        ch = {"L": 1, "LA": 2, "RGBA": 4}[mode]
        a = rng.integers(0, 256, size=(h, w, ch)).astype(np.uint8)
        im = Image.frombytes(mode, (w, h), a.tobytes())
        expected, fmt = (a[..., :3] if ch == 4 else _grey3(a[..., 0])), "PNG"  # alpha dropped, colour kept
    else:
        pal, idx = _palette(rng), rng.integers(0, 256, size=(h, w)).astype(np.uint8)
        base = "PA" if mode == "PA" else "P"
        data = np.stack([idx, rng.integers(0, 256, size=(h, w)).astype(np.uint8)], -1) if base == "PA" else idx
        im = Image.frombytes(base, (w, h), data.tobytes())
        im.putpalette(pal.tobytes())
        if mode == "P+tRNS":
            im.info["transparency"] = int(idx[0, 0])
        expected, fmt = pal[idx], ("TIFF" if base == "PA" else "PNG")
    path = _save(im, tmp_path / f"x.{fmt.lower()}", fmt, "P" if mode == "P+tRNS" else mode)
    if mode == "P+tRNS":
        with Image.open(path) as check:
            assert "transparency" in check.info
    assert np.array_equal(_decoded(path), expected.astype(np.int64))


def test_cmyk_tiff(tmp_path):
    c = _rng().integers(0, 256, size=(8, 9, 4)).astype(np.uint8)
    path = _save(Image.frombytes("CMYK", (9, 8), c.tobytes()), tmp_path / "x.tif", "TIFF", "CMYK")
    k = 255.0 - c[..., 3:].astype(np.float64)
    expected = (255.0 - c[..., :3]) * k / 255.0
    assert np.abs(_decoded(path) - expected).max() <= 1.0


def test_ycbcr_tiff(tmp_path):
    ycc = _rng().integers(0, 256, size=(8, 9, 3)).astype(np.uint8)
    path = _save(Image.frombytes("YCbCr", (9, 8), ycc.tobytes()), tmp_path / "x.tif", "TIFF", "YCbCr")
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    # ITU-R BT.601 full range (JFIF; TIFF's default YCbCrCoefficients and ReferenceBlackWhite)
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], -1)
    assert np.abs(_decoded(path) - np.clip(rgb, 0, 255)).max() <= 1.0


def _srgb_to_lab_d65(rgb):
    c = rgb / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _lab_d65_to_srgb(lab):
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * np.array([0.95047, 1.0, 1.08883])
    m_inv = np.linalg.inv(np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]))
    lin = np.clip(xyz @ m_inv.T, 0, 1)
    c = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return np.clip(c, 0, 1) * 255.0


def test_cielab_tiff(tmp_path):
    # in-gamut colours, quantised to TIFF CIELab bytes: L* * 255/100, a* and b* signed bytes
    lab = _srgb_to_lab_d65(_rng().integers(0, 256, size=(7, 12, 3)).astype(np.float64))
    q = np.empty(lab.shape, dtype=np.uint8)
    q[..., 0] = np.clip(np.round(lab[..., 0] * 255 / 100), 0, 255)
    q[..., 1:] = np.clip(np.round(lab[..., 1:]), -128, 127).astype(np.int8).view(np.uint8)
    path = _save(Image.frombytes("LAB", (12, 7), q.tobytes()), tmp_path / "x.tif", "TIFF", "LAB")
    lab_q = np.concatenate([q[..., :1] * (100 / 255), q[..., 1:].view(np.int8).astype(np.float64)], -1)
    assert np.abs(_decoded(path) - _lab_d65_to_srgb(lab_q)).max() <= 1.0


def test_hsv_in_memory():
    hsv = _rng().integers(0, 256, size=(6, 7, 3)).astype(np.uint8)
    got = np.asarray(to_rgb8(Image.frombytes("HSV", (7, 6), hsv.tobytes()))).astype(np.float64)
    expected = np.array([[colorsys.hsv_to_rgb(*(px / 255.0)) for px in row] for row in hsv.astype(np.float64)]) * 255.0
    assert np.abs(got - expected).max() <= 1.0


def test_every_pillow_mode_maps_or_is_reported():
    rng = _rng()
    for mode in ("1", "CMYK", "F", "HSV", "I", "I;16", "I;16B", "I;16L", "I;16N", "L", "LA", "La", "LAB", "P",
                 "PA", "RGB", "RGBA", "RGBa", "RGBX", "YCbCr"):
        im = Image.new(mode, (5, 3))
        im.frombytes(rng.integers(0, 256, size=len(im.tobytes())).astype(np.uint8).tobytes())
        try:
            out = to_rgb8(im)
        except UnreadableImage as exc:
            assert mode in exc.reason
            continue
        assert out.mode == "RGB" and out.size == (5, 3), mode


def test_unreadable_files_raise_unreadable_image(tmp_path):
    good = io.BytesIO()
    Image.fromarray(_rng().integers(0, 256, size=(30, 30, 3)).astype(np.uint8)).save(good, "JPEG")
    (tmp_path / "t.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "g.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    for name in ("t.jpg", "g.png", "missing.png"):
        with pytest.raises(UnreadableImage) as info:
            decode_image(str(tmp_path / name))
        assert info.value.path == str(tmp_path / name) and info.value.reason and "\n" not in info.value.reason


# ---------------------------------------------------------------- EXIF orientation

# What viewers show for each EXIF Orientation value (EXIF 2.3, tag 0x0112), written from the
# specification's "row 0 / column 0 is at the visual ..." table, not from PIL.
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_exif_orientation_is_applied(tmp_path, orientation, fmt):
    stored = _rng().integers(0, 256, size=(24, 48, 3)).astype(np.uint8)  # 48 wide, 24 tall
    path = tmp_path / f"x.{fmt.lower()}"
    if fmt == "TIFF":
        Image.fromarray(stored).save(path, fmt, tiffinfo={0x0112: orientation})
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(stored).save(path, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    with Image.open(path) as raw:
        assert raw.getexif().get(0x0112) == orientation  # read before loading: Pillow's TIFF load applies it
        if fmt == "JPEG":
            stored = np.asarray(raw.convert("RGB"))  # lossy: compare against the same decoded pixels
    got = _decoded(path)
    assert got.shape == ((48, 24, 3) if orientation >= 5 else (24, 48, 3))
    assert np.array_equal(got, DISPLAYED[orientation](stored).astype(np.int64))


def test_folder_loader_trains_on_the_upright_image(tmp_path):
    stored = np.zeros((24, 48, 3), dtype=np.uint8)
    stored[:, 24:] = 255  # left half black, right half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: top half black, bottom half white
    Image.fromarray(stored).save(tmp_path / "portrait.jpg", "JPEG", exif=exif, quality=95)
    data = ImageFolderData(str(tmp_path), img_size=16, seed=int(_rng().integers(1 << 30)), crop_scale=(1.0, 1.0))
    x = data.load(0, epoch=0)[0].float()
    assert x[:, :5].mean() < 30 and x[:, -5:].mean() > 225  # rows, not columns, are black then white
    assert folder.decode_image is decode_image and folder.UnreadableImage is UnreadableImage

"""The random stream and the fused corruption kernel.

CPU: Philox4x32-10 against a pure-Python implementation (itself checked on Random123's known-answer
vectors), Box-Muller against an independent numpy float32 evaluation and float64 math, the C++ core
of the kernel (csrc/corrupt_core.h, compiled for the host) against the PyTorch reference bit for
bit, the op's input validation and fake implementation.
GPU (@pytest.mark.cuda): the CUDA kernel against the reference, bitwise, on odd sizes.
"""
import ctypes
import logging
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fastebm.corrupt import IMAGENET_MEAN, IMAGENET_STD, _ext, make_plan, philox, prepare_batch
from fastebm.corrupt.api import _prepare_tasks, prepare_batch_reference

CSRC = Path(__file__).resolve().parents[1] / "csrc"
MASK = 0xFFFFFFFF


def fresh_seed() -> int:
    return int(torch.randint(0, 2**48, ()).item())


# ------------------------------------------------------------------------------ pure-Python Philox


def philox_py(ctr, key):
    """Philox4x32-10 on Python ints, written from the Random123 paper (Salmon et al., SC'11)."""
    c, k = list(ctr), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & MASK, (k[1] + 0xBB67AE85) & MASK]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK]
    return c


def test_pure_python_philox_reproduces_random123_known_answers():
    # kat_vectors of Random123 for philox4x32_10 (counter, key -> output)
    kat = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([MASK] * 4, [MASK] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, out in kat:
        assert philox_py(ctr, key) == out


def test_torch_philox_equals_pure_python():
    g = torch.Generator().manual_seed(fresh_seed())
    ctr = torch.randint(0, 2**32, (4, 257), generator=g, dtype=torch.int64)
    ctr[:, :2] = torch.tensor([[0, MASK]] * 4)  # edge words
    for key in ([0, 0], [MASK, MASK], [int(v) for v in torch.randint(0, 2**32, (2,), generator=g)]):
        got = torch.stack(philox.philox4x32_10(*ctr, *key))
        for j in range(ctr.shape[1]):
            assert got[:, j].tolist() == philox_py(ctr[:, j].tolist(), key)


def test_stream_layout_counter_and_key():
    seed = fresh_seed() | (1 << 40)  # a seed using both key words
    sids = torch.tensor([0, 5, 2**32 - 1])
    words = philox.philox_uint32(seed, 77, sids, 10, purpose=philox.PURPOSE_PATCH_KEYS)
    for r, sid in enumerate(sids.tolist()):
        for i in range(10):
            expect = philox_py([i // 4, sid, 77, philox.PURPOSE_PATCH_KEYS], [seed & MASK, seed >> 32])[i % 4]
            assert words[r, i].item() == expect


# ------------------------------------------------------------------------------------- Box-Muller


def box_muller_np(xa: int, xb: int):
    """The documented Box-Muller evaluation in numpy float32 scalars (every op rounds to float32)."""
    f = np.float32
    C = {k: f(float.fromhex(v)) for k, v in philox.FLOAT_CONSTANTS.items()}
    k = f((xa >> 8) + 1)
    e = int(math.floor(math.log2(int(k))))
    m = f(int(k) / 2.0**e)  # exact
    if m > C["SQRT2"]:
        m, e = f(m * f(0.5)), e + 1
    ef = f(e - 24)
    s = f(f(m - f(1)) / f(m + f(1)))
    s2 = f(s * s)
    p = C["L11"]
    for name in ("L9", "L7", "L5", "L3"):
        p = f(f(p * s2) + C[name])
    p = f(p * s2)
    log_m = f(f(s + f(s * p)) * f(2))
    log_u = f(f(ef * C["LN2_HI"]) + f(log_m + f(ef * C["LN2_LO"])))
    y = f(log_u * f(-2))
    r = np.frombuffer(((int(np.frombuffer(y.tobytes(), np.uint32)[0]) >> 1) + philox.SQRT_MAGIC).to_bytes(4, "little"),
                      np.float32)[0]  # first guess from the bits, then Heron steps
    for _ in range(3):
        r = f(f(r + f(y / r)) * f(0.5))
    r = r if y > 0 else f(0)
    j = xb >> 8
    turns = (j + (1 << 21)) >> 22
    a = f(f(j - (turns << 22)) * C["ANGLE"])
    a2 = f(a * a)
    sp = C["S9"]
    for name in ("S7", "S5", "S3"):
        sp = f(f(sp * a2) + C[name])
    sin_a = f(a + f(f(a * a2) * sp))
    cp = C["C10"]
    for name in ("C8", "C6", "C4", "C2"):
        cp = f(f(cp * a2) + C[name])
    cos_a = f(f(1) + f(a2 * cp))
    cos_t, sin_t = [(cos_a, sin_a), (-sin_a, cos_a), (-cos_a, -sin_a), (sin_a, -cos_a)][turns & 3]
    return f(r * cos_t), f(r * sin_t)


def test_box_muller_torch_equals_numpy_float32_bitwise():
    g = torch.Generator().manual_seed(fresh_seed())
    xa = torch.randint(0, 2**32, (400,), generator=g, dtype=torch.int64)
    xb = torch.randint(0, 2**32, (400,), generator=g, dtype=torch.int64)
    xa[:4] = torch.tensor([0, MASK, 255, 256])  # u = 2^-24 and u = 1
    xb[:4] = torch.tensor([0, MASK, (1 << 31), (3 << 30) + (1 << 29)])  # quadrant edges
    z0, z1 = philox.box_muller(xa, xb)
    for i in range(xa.numel()):
        e0, e1 = box_muller_np(int(xa[i]), int(xb[i]))
        assert np.float32(z0[i].item()).tobytes() == e0.tobytes()
        assert np.float32(z1[i].item()).tobytes() == e1.tobytes()


def test_box_muller_accuracy_against_float64():
    g = torch.Generator().manual_seed(fresh_seed())
    xa = torch.randint(0, 2**32, (50_000,), generator=g, dtype=torch.int64)
    xb = torch.randint(0, 2**32, (50_000,), generator=g, dtype=torch.int64)
    z0, z1 = philox.box_muller(xa, xb)
    u = ((xa >> 8) + 1).double() / 2**24
    theta = 2 * math.pi * (xb >> 8).double() / 2**24
    r = torch.sqrt(-2 * torch.log(u))
    torch.testing.assert_close(z0.double(), r * torch.cos(theta), rtol=0, atol=2e-6)
    torch.testing.assert_close(z1.double(), r * torch.sin(theta), rtol=0, atol=2e-6)


def test_philox_normal_is_standard_normal():
    from scipy import stats

    z = philox.philox_normal(fresh_seed(), 3, torch.arange(8), 25_000).flatten().double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-6
    assert abs(z.mean()) < 6 / math.sqrt(z.size) and abs(z.std() - 1) < 6 / math.sqrt(2 * z.size)


def test_float_constants_are_the_documented_values():
    philox._check_constants()


def test_header_constants_equal_python_constants():
    text = (CSRC / "corrupt_core.h").read_text()
    found = dict(re.findall(r"#define FEBM_C_(\w+) (\S+)f\b", text))
    assert set(found) == set(philox.FLOAT_CONSTANTS)
    for name, literal in found.items():
        assert float.fromhex(literal) == float.fromhex(philox.FLOAT_CONSTANTS[name]), name


# ------------------------------------------------------------------ the C++ core, compiled for CPU


@pytest.fixture(scope="module")
def host_core(tmp_path_factory):
    """csrc/corrupt_host.cpp as a shared library (g++, no FMA contraction), loaded with ctypes."""
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler (g++) is needed to test the kernel core on CPU"
    lib = tmp_path_factory.mktemp("corrupt_host") / "libcorrupt_host.so"
    subprocess.run([cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", f"-I{CSRC}",
                    str(CSRC / "corrupt_host.cpp"), "-o", str(lib)], check=True, capture_output=True, timeout=120)
    so = ctypes.CDLL(str(lib))
    fn = so.fastebm_fused_corrupt_host
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 7 + [ctypes.c_uint32] * 3
    words = so.fastebm_philox_words_host
    words.restype = None
    words.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_uint32] * 4 + [ctypes.c_void_p]
    fn.words = words
    return fn


def test_host_core_philox_words_equal_torch_stream(host_core):
    seed = fresh_seed() | (1 << 45)
    sids = torch.randint(0, 2**32, (5,))
    for n, purpose in ((1, philox.PURPOSE_TASK_CHOICE), (197, philox.PURPOSE_PATCH_KEYS)):
        out = torch.full((5, n), -1, dtype=torch.int64)
        host_core.words(sids.data_ptr(), 5, n, seed & MASK, seed >> 32, 123, purpose, out.data_ptr())
        assert torch.equal(out, philox.philox_uint32(seed, 123, sids, n, purpose))


def run_host_core(fn, images, plan, mean, std):
    b, c, h, w = images.shape
    images = images.contiguous()
    out = [torch.full((b, c, h, w), float("nan")), torch.full((b, c, h, w), float("nan")),
           torch.full((b, 1, h, w), float("nan"))]  # poisoned
    args = [images, plan.task_ids.to(torch.int32).contiguous(), plan.patch_src.contiguous(),
            plan.sample_ids.contiguous(), mean.contiguous(), std.contiguous(), plan.noise_scale.contiguous()]
    ptr = [t.data_ptr() for t in args]
    rc = fn(ptr[0], int(images.dtype == torch.uint8), out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(),
            *ptr[1:], b, c, h, w, plan.patch_size, plan.patch_src.shape[1], plan.sr_factor,
            plan.seed & MASK, plan.seed >> 32, plan.offset)
    assert rc == 0
    return out


def reference_and_plan(images, tasks, seed, offset, patch_size, params=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       sample_ids=None):
    names, checked = _prepare_tasks(tasks, params)
    c = images.shape[1]
    mean_t = torch.tensor(mean if mean is not None else [0.0] * c, dtype=torch.float32)
    std_t = torch.tensor(std if std is not None else [1.0] * c, dtype=torch.float32)
    sids = torch.arange(images.shape[0]) if sample_ids is None else sample_ids
    plan = make_plan(images.shape, images.device, names, checked, seed=seed, offset=offset, sample_ids=sids,
                     patch_size=patch_size, std=std_t if std is not None else None)
    return prepare_batch_reference(images, plan, mean_t, std_t), plan, mean_t, std_t


def bitwise_equal(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


CASES = [  # (shape, tasks, patch_size, params): every task alone on 5 x 3 x 197 x 211, then mixes
    ((5, 3, 197, 211), "sr", 16, {"sr": {"factor": 4}}),
    ((5, 3, 197, 211), "denoise", 16, {"denoise": {"sigma": 0.3}}),
    ((5, 3, 197, 211), "colorize", 16, None),
    ((5, 3, 197, 211), "mim", 1, {"mim": {"ratio": 0.6}}),  # 197 and 211 are prime: 1-pixel patches
    ((5, 3, 197, 211), "sort", 1, {"sort": {"ratio": 0.25}}),
    ((5, 3, 192, 208), ["mim", "sort"], 16, None),
    ((6, 3, 48, 40), "mix", 8, {"sr": {"factor": 3}, "denoise": {"sigma": 0.35}}),
    ((3, 1, 17, 13), ["sr", "denoise"], 16, {"sr": {"factor": 5}}),
    ((2, 4, 8, 12), ["mim", "sort", "denoise"], 4, {"sort": {"ratio": 0.5}}),
]


def case_inputs(case, dtype):
    """Fresh random images (uint8 or float in [0, 1]) and global sample ids for CASES[case]."""
    shape, tasks, ps, params = CASES[case]
    g = torch.Generator().manual_seed(fresh_seed())
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if dtype == torch.float32:
        images = torch.rand(shape, generator=g)
    mean = IMAGENET_MEAN if shape[1] == 3 else None
    std = IMAGENET_STD if shape[1] == 3 else None
    sids = torch.randint(0, 2**32, (shape[0],), generator=g)
    return tasks, ps, params, images, mean, std, sids, g


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_host_core_equals_reference_bitwise(host_core, case, dtype):
    tasks, ps, params, images, mean, std, sids, _ = case_inputs(case, dtype)
    (ref, plan, mean_t, std_t) = reference_and_plan(images, tasks, fresh_seed(), int(torch.randint(0, 2**32, ())),
                                                    ps, params, mean, std, sids)
    got = run_host_core(host_core, images, plan, mean_t, std_t)
    for name, r, k in zip(("clean", "corrupted", "weight"), ref, got):
        assert bitwise_equal(r, k), name


# ----------------------------------------------------------------------------- validation, fake op


def valid_args(device="meta", b=3, c=3, h=32, w=48, ps=8):
    p = (h // ps) * (w // ps)
    return dict(
        images=torch.empty((b, c, h, w), dtype=torch.uint8, device=device),
        task_ids=torch.zeros(b, dtype=torch.int32, device=device),
        patch_src=torch.zeros((b, p), dtype=torch.int32, device=device),
        sample_ids=torch.zeros(b, dtype=torch.int64, device=device),
        mean=torch.zeros(c, device=device), std=torch.ones(c, device=device), noise_scale=torch.ones(c, device=device),
    )


def test_validation_accepts_good_inputs_on_meta():
    _ext.validate_fused_inputs(**valid_args(), patch_size=8, sr_factor=4, require_cuda=False)


@pytest.mark.parametrize(
    "change,kw,match",
    [
        (dict(images=torch.empty((3, 3, 32, 48), dtype=torch.float64, device="meta")), {}, "uint8 .* or float32"),
        (dict(images=torch.empty((3, 32, 48), dtype=torch.uint8, device="meta")), {}, "4-D"),
        (dict(mean=torch.zeros(1, device="meta")), {}, "one entry per channel"),
        (dict(std=torch.ones(4, device="meta")), {}, "one entry per channel"),
        (dict(noise_scale=torch.ones(3, dtype=torch.float64, device="meta")), {}, "float32"),
        (dict(patch_src=torch.zeros((3, 23), dtype=torch.int32, device="meta")), {}, "24 patches"),
        (dict(patch_src=torch.zeros((2, 24), dtype=torch.int32, device="meta")), {}, r"\(B, P\)"),
        (dict(patch_src=torch.zeros((3, 24), dtype=torch.int64, device="meta")), {}, "int32"),
        (dict(task_ids=torch.zeros(3, dtype=torch.int64, device="meta")), {}, "torch.int32"),
        (dict(sample_ids=torch.zeros(4, dtype=torch.int64, device="meta")), {}, "one entry per sample"),
        (dict(images=torch.empty((3, 3, 48, 32), dtype=torch.uint8, device="meta").transpose(2, 3)), {}, "contiguous"),
        (dict(mean=torch.zeros(3)), {}, "same device|one device"),
        ({}, dict(sr_factor=1), "sr_factor"),
        ({}, dict(patch_size=7), "not divisible"),
        ({}, dict(offset=2**32), "offset"),
    ],
)
def test_validation_rejects_bad_inputs(change, kw, match):
    args = {**valid_args(), **change}
    opts = {**dict(patch_size=8, sr_factor=4, require_cuda=False), **kw}
    with pytest.raises(ValueError, match=match):
        _ext.validate_fused_inputs(**args, **opts)


def test_validation_requires_cuda_tensors():
    with pytest.raises(ValueError, match="CUDA tensor"):
        _ext.validate_fused_inputs(**valid_args("cpu"), patch_size=8, sr_factor=4)


def test_validation_checks_values_on_cpu():
    args = valid_args("cpu")
    args["patch_src"][1, 3] = 24  # out of range
    with pytest.raises(ValueError, match="patch_src values"):
        _ext.validate_fused_inputs(**args, patch_size=8, sr_factor=4, require_cuda=False, check_values=True)
    args = valid_args("cpu")
    args["task_ids"][0] = 7
    with pytest.raises(ValueError, match="task_ids"):
        _ext.validate_fused_inputs(**args, patch_size=8, sr_factor=4, require_cuda=False, check_values=True)


def test_fake_implementation_gives_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = valid_args("cpu", b=2, c=3, h=16, w=24)
        clean, corrupted, weight = torch.ops.fastebm.fused_corrupt(*a.values(), 1, 2, 3, 8, 4)
    assert clean.shape == corrupted.shape == (2, 3, 16, 24) and weight.shape == (2, 1, 16, 24)
    assert clean.dtype == corrupted.dtype == weight.dtype == torch.float32


def test_fake_philox_words_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.fastebm.philox_words(torch.zeros(6, dtype=torch.int64), 11, 1, 2, 3, 1)
    assert out.shape == (6, 11) and out.dtype == torch.int64


def test_philox_words_wrapper_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA tensor"):
        _ext.philox_words(1, 0, torch.arange(3), 4, philox.PURPOSE_PATCH_KEYS)


def test_auto_backend_on_cpu_uses_reference_and_says_so_once(caplog):
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    _ext._said_reference = False
    with caplog.at_level(logging.DEBUG, logger="fastebm.corrupt"):
        a = prepare_batch(images, "denoise", seed=5)
        b = prepare_batch(images, "denoise", seed=5, backend="reference")
    msgs = [r for r in caplog.records if "reference" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].levelno == logging.DEBUG
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ------------------------------------------------------------------------------------- GPU checks


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_kernel_equals_reference_bitwise(case, dtype):
    tasks, ps, params, images, mean, std, sids, g = case_inputs(case, dtype)
    seed, offset = fresh_seed(), int(torch.randint(0, 2**32, (), generator=g))
    kw = dict(seed=seed, offset=offset, sample_ids=sids, patch_size=ps, mean=mean, std=std, params=params)
    cpu = prepare_batch(images, tasks, backend="reference", **kw)
    torch.full((sum(images.shape) * 4096,), float("nan"), device="cuda")  # poison the caching allocator
    torch.cuda.empty_cache()
    gpu_ref = prepare_batch(images.cuda(), tasks, backend="reference", **{**kw, "sample_ids": sids.cuda()})
    gpu = prepare_batch(images.cuda(), tasks, backend="cuda", **{**kw, "sample_ids": sids.cuda()})
    torch.cuda.synchronize()
    for name, r, rg, k in zip(("clean", "corrupted", "weight", "task_ids"), cpu, gpu_ref, gpu):
        if name == "task_ids":
            assert torch.equal(r, k.cpu()) and torch.equal(r, rg.cpu())
            continue
        assert bitwise_equal(rg.cpu(), k.cpu()), f"{name}: kernel != reference on the GPU"
        assert bitwise_equal(r, k.cpu()), f"{name}: kernel != reference on the CPU"


@pytest.mark.cuda
def test_cuda_philox_words_equal_torch_stream():
    seed = fresh_seed() | (1 << 40)
    sids = torch.randint(0, 2**32, (7,), device="cuda")
    for n, purpose in ((1, philox.PURPOSE_TASK_CHOICE), (196, philox.PURPOSE_PATCH_KEYS), (1001, 5)):
        got = _ext.philox_words(seed, 99, sids, n, purpose)
        assert torch.equal(got.cpu(), philox.philox_uint32(seed, 99, sids.cpu(), n, purpose))


@pytest.mark.cuda
def test_cuda_auto_backend_uses_kernel():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, device="cuda")
    out = prepare_batch(images, "mix", seed=fresh_seed(), patch_size=8)
    assert _ext.load_extension(), _ext.extension_error()
    assert all(t.is_cuda for t in out)


@pytest.mark.cuda
def test_cuda_op_rejects_cpu_and_wrong_sizes():
    args = valid_args("cuda")
    with pytest.raises(ValueError, match="24 patches"):
        _ext.fused_corrupt(*{**args, "patch_src": args["patch_src"][:, :5].contiguous()}.values(), seed=1, offset=0,
                           patch_size=8, sr_factor=4)
    with pytest.raises(ValueError, match="CUDA tensor"):
        _ext.fused_corrupt(*valid_args("cpu").values(), seed=1, offset=0, patch_size=8, sr_factor=4)

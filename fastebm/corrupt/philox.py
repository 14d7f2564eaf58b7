"""Counter-based random stream (Philox4x32-10) in PyTorch, bit-exact with ``csrc/corrupt_core.h``.

Every random number used by the pretext tasks is a pure function of

    key     = (seed mod 2**32, seed >> 32)                       (two uint32 words)
    counter = (index, sample_id, offset, purpose)                (four uint32 words)

where ``index`` counts 4-word blocks inside one sample, ``sample_id`` is the *global* index of the
sample (so a batch split over processes corrupts each sample exactly as one big batch would),
``offset`` is e.g. the training step and ``purpose`` separates independent uses (noise, patch keys,
task choice). Nothing depends on the batch layout or the device.

uint32 arithmetic is emulated in int64 tensors (values kept in [0, 2**32)); the 32x32->64 bit
products are split in 16-bit halves so that no intermediate leaves int64 range.

Gaussian noise uses Box-Muller with ``log``/``sin``/``cos``/``sqrt`` replaced by fixed polynomial evaluations
made only of IEEE-754 float32 ``+ - * /`` in a fixed order. Those operations are
correctly rounded on every CPU and GPU, so the noise is bit-identical on CPU and CUDA, in the
vectorised and the scalar code paths of PyTorch, and in the fused CUDA kernel (which evaluates the
same sequence with ``__fmul_rn``/``__fadd_rn``/``__fdiv_rn``). Library ``logf``/``sinf`` differ
between CPU and GPU in the last bit, and torch's CPU ``sqrt`` is not always correctly rounded,
which is why none of them is used.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "PURPOSE_NOISE",
    "PURPOSE_PATCH_KEYS",
    "PURPOSE_TASK_CHOICE",
    "SQRT_MAGIC",
    "SQRT_STEPS",
    "FLOAT_CONSTANTS",
    "split_seed",
    "philox4x32_10",
    "philox_uint32",
    "box_muller",
    "philox_normal",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
_MASK32 = 0xFFFFFFFF

# Values of the 4th counter word: independent sub-streams of one (seed, offset, sample).
PURPOSE_NOISE = 0  # denoise: Gaussian noise, 4 values per counter, element order c, h, w
PURPOSE_PATCH_KEYS = 1  # mim / sort: one uint32 sort key per patch
PURPOSE_TASK_CHOICE = 2  # mix: the task of the sample (word 0 of counter index 0)

# float32 constants of the Box-Muller evaluation, as exact hexadecimal floats. csrc/corrupt_core.h
# carries the same literals (tests/test_corrupt_kernels.py checks that they agree).
FLOAT_CONSTANTS = {
    "ONE": "0x1p+0",
    "HALF": "0x1p-1",
    "TWO": "0x1p+1",
    "NEG_TWO": "-0x1p+1",
    "SQRT2": "0x1.6a09e6p+0",  # float32(sqrt(2))
    "LN2_HI": "0x1.62e4p-1",  # 0.693145751953125: 15 significant bits, so e * LN2_HI is exact
    "LN2_LO": "0x1.7f7d1cp-20",  # float32(ln 2 - LN2_HI)
    "L3": "0x1.555556p-2",  # 1/3   log(m) = 2s (1 + s^2/3 + s^4/5 + ...), s = (m-1)/(m+1)
    "L5": "0x1.99999ap-3",  # 1/5
    "L7": "0x1.24924ap-3",  # 1/7
    "L9": "0x1.c71c72p-4",  # 1/9
    "L11": "0x1.745d18p-4",  # 1/11
    "ANGLE": "0x1.921fb6p-22",  # float32(2 pi / 2^24): angle of one step of a 24-bit integer turn
    "S3": "-0x1.555556p-3",  # -1/3!
    "S5": "0x1.111112p-7",  # 1/5!
    "S7": "-0x1.a01a02p-13",  # -1/7!
    "S9": "0x1.71de3ap-19",  # 1/9!
    "C2": "-0x1p-1",  # -1/2!
    "C4": "0x1.555556p-5",  # 1/4!
    "C6": "-0x1.6c16c2p-10",  # -1/6!
    "C8": "0x1.a01a02p-16",  # 1/8!
    "C10": "-0x1.27e4fcp-22",  # -1/10!
}


def _f32(name: str) -> float:
    value = float.fromhex(FLOAT_CONSTANTS[name])
    assert float(np.float32(value)) == value, name  # exactly representable in float32
    return value


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key (two uint32 words) of a non-negative seed below 2**64."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    return seed & _MASK32, seed >> 32


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product m * x for uint32 m and x (int64 tensors)."""
    x_hi = x >> 16
    x_lo = x & 0xFFFF
    p_lo = x_lo * m  # < 2**48
    p_hi = x_hi * m  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32 with 10 rounds on int64 tensors holding uint32 values (broadcasting).

    Returns the four output words as int64 tensors in [0, 2**32).
    """
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _check_stream_args(offset: int, sample_ids: torch.Tensor) -> None:
    if not 0 <= int(offset) < 2**32:
        raise ValueError(f"offset must be an integer in [0, 2**32), got {offset}")
    if sample_ids.dtype != torch.int64:
        raise ValueError(f"sample_ids must be int64, got {sample_ids.dtype}")


def philox_uint32(seed: int, offset: int, sample_ids: torch.Tensor, n: int, purpose: int) -> torch.Tensor:
    """n uint32 words per sample, as an int64 tensor (len(sample_ids), n).

    Word i of a sample is word (i mod 4) of Philox(counter=(i // 4, sample_id, offset, purpose)).
    """
    _check_stream_args(offset, sample_ids)
    k0, k1 = split_seed(seed)
    blocks = (int(n) + 3) // 4
    idx = torch.arange(blocks, dtype=torch.int64, device=sample_ids.device).unsqueeze(0)
    sid = sample_ids.view(-1, 1)
    words = philox4x32_10(idx, sid, torch.full_like(sid, int(offset)), torch.full_like(sid, int(purpose)), k0, k1)
    return torch.stack(words, dim=-1).reshape(sample_ids.numel(), 4 * blocks)[:, :n]


SQRT_MAGIC = 0x1FBD1DF5  # (bits >> 1) + SQRT_MAGIC: a first guess of sqrt within 4 %
SQRT_STEPS = 3  # Heron steps: relative error 4e-2 -> 8e-4 -> 3e-7 -> float32 rounding


def _sqrt_heron(y: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """sqrt(y) for y >= 0 by a bit-trick guess and Heron steps g = (g + y / g) * 1/2.

    torch.sqrt on CPU is not always correctly rounded (1 ulp off for some inputs), so the stream
    defines its own square root from + and / only; it is within 1 ulp of the true value.
    """
    g = ((y.view(torch.int32).to(torch.int64) >> 1) + SQRT_MAGIC).to(torch.int32).view(torch.float32)
    for _ in range(SQRT_STEPS):
        g = (g + y / g) * half
    return torch.where(y > 0, g, torch.zeros_like(g))


def box_muller(xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two standard normal float32 tensors from two uint32 words (int64 tensors).

    radius = sqrt(-2 log u) with u = ((xa >> 8) + 1) / 2^24 in (0, 1];
    angle  = 2 pi j / 2^24 with j = xb >> 8;  returns (radius cos(angle), radius sin(angle)).
    Each line is one correctly rounded float32 operation; the CUDA core repeats them in order.
    Library functions (log, sin, cos and even sqrt) are replaced by fixed polynomial / Heron
    evaluations because their last bit differs between CPU, GPU and vectorised code paths.
    """
    dev = xa.device

    def c(name):  # constants as device tensors: never a CPU scalar, which CUDA division would invert
        return torch.tensor(_f32(name), dtype=torch.float32, device=dev)

    one, half, two, neg_two, sqrt2 = c("ONE"), c("HALF"), c("TWO"), c("NEG_TWO"), c("SQRT2")

    # --- log(u): u = m * 2^(e-24) with m in [sqrt(1/2), sqrt(2)), from the bits of k = u * 2^24 (exact).
    k = ((xa >> 8) + 1).to(torch.float32)  # integer in [1, 2^24]: exact
    bits = k.view(torch.int32).to(torch.int64)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32)  # in [1, 2)
    big = m > sqrt2
    m = torch.where(big, m * half, m)  # exact
    ef = (e + big.to(torch.int64) - 24).to(torch.float32)  # exact small integer
    s = (m - one) / (m + one)
    s2 = s * s
    p = c("L11")
    for name in ("L9", "L7", "L5", "L3"):
        p = p * s2
        p = p + c(name)
    p = p * s2
    log_m = s * p
    log_m = s + log_m
    log_m = log_m * two
    log_u = ef * c("LN2_LO")
    log_u = log_m + log_u
    log_u = ef * c("LN2_HI") + log_u  # ef * LN2_HI is exact
    radius = _sqrt_heron(log_u * neg_two, half)

    # --- sin/cos of 2 pi j / 2^24: exact quadrant reduction on the integer, polynomials on |a| <= pi/4.
    j = xb >> 8
    turns = (j + (1 << 21)) >> 22
    quadrant = turns & 3
    a = (j - (turns << 22)).to(torch.float32) * c("ANGLE")
    a2 = a * a
    sp = c("S9")
    for name in ("S7", "S5", "S3"):
        sp = sp * a2
        sp = sp + c(name)
    sin_a = a * a2
    sin_a = sin_a * sp
    sin_a = a + sin_a
    cp = c("C10")
    for name in ("C8", "C6", "C4", "C2"):
        cp = cp * a2
        cp = cp + c(name)
    cos_a = a2 * cp
    cos_a = one + cos_a
    # rotate by quadrant * pi/2 (negation is exact)
    cos_t = torch.where(quadrant == 0, cos_a, torch.where(quadrant == 1, -sin_a, torch.where(quadrant == 2, -cos_a, sin_a)))
    sin_t = torch.where(quadrant == 0, sin_a, torch.where(quadrant == 1, cos_a, torch.where(quadrant == 2, -sin_a, -cos_a)))
    return radius * cos_t, radius * sin_t


def philox_normal(seed: int, offset: int, sample_ids: torch.Tensor, n: int) -> torch.Tensor:
    """n standard normal float32 values per sample, shape (len(sample_ids), n).

    Value i of a sample comes from Philox(counter=(i // 4, sample_id, offset, PURPOSE_NOISE)):
    words (0, 1) give values 4b, 4b+1 and words (2, 3) values 4b+2, 4b+3 through ``box_muller``.
    """
    _check_stream_args(offset, sample_ids)
    k0, k1 = split_seed(seed)
    blocks = (int(n) + 3) // 4
    idx = torch.arange(blocks, dtype=torch.int64, device=sample_ids.device).unsqueeze(0)
    sid = sample_ids.view(-1, 1)
    w0, w1, w2, w3 = philox4x32_10(
        idx, sid, torch.full_like(sid, int(offset)), torch.full_like(sid, PURPOSE_NOISE), k0, k1
    )
    z0, z1 = box_muller(w0, w1)
    z2, z3 = box_muller(w2, w3)
    return torch.stack((z0, z1, z2, z3), dim=-1).reshape(sample_ids.numel(), 4 * blocks)[:, :n]


def _check_constants() -> None:
    """The hexadecimal constants are the float32 roundings of what their comments say."""
    expect = {
        "SQRT2": math.sqrt(2.0),
        "L3": 1 / 3, "L5": 1 / 5, "L7": 1 / 7, "L9": 1 / 9, "L11": 1 / 11,
        "ANGLE": 2 * math.pi / 2**24,
        "S3": -1 / 6, "S5": 1 / 120, "S7": -1 / 5040, "S9": 1 / 362880,
        "C2": -0.5, "C4": 1 / 24, "C6": -1 / 720, "C8": 1 / 40320, "C10": -1 / 3628800,
        "LN2_LO": math.log(2.0) - 0.693145751953125,
    }
    for name, value in expect.items():
        assert _f32(name) == float(np.float32(value)), (name, _f32(name), float(np.float32(value)))

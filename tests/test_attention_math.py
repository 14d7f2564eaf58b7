"""The stage references of ``fastebm.kernels.attention_ref`` (the specification of the fused kernels)
against torch.autograd on plain float64 math attention written here: forward, first backward and
double backward, on fresh random inputs with odd shapes and Nq != Nk. Also: fastebm and its math
attention work on a machine without triton."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastebm.kernels.attention_ref import attn_bwd_ref, attn_dbwd_ref, attn_fwd_ref, default_scale

SHAPES = [(1, 1, 1, 1, 16), (2, 3, 37, 29, 16), (1, 2, 5, 41, 24), (2, 1, 197, 150, 64), (1, 2, 37, 1, 8)]
TOL64 = 1e-12


def plain_attention(q, k, v, scale):
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v


def rel(a, b):
    # Norm-relative with a unit-RMS floor, so analytically zero results (Nk = 1) are checked absolutely.
    return ((a - b).norm() / max(b.norm().item(), b.numel() ** 0.5)).item()


def inputs(B, H, NQ, NK, D, dtype=torch.float64):
    r = lambda n: torch.randn(B, H, n, D, dtype=dtype)  # noqa: E731
    return r(NQ), r(NK), r(NK), r(NQ), r(NQ), r(NK), r(NK)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_references_match_autograd_float64(shape):
    q, k, v, do, gq, gk, gv = inputs(*shape)
    scale = default_scale(shape[-1]) * (0.5 + torch.rand(()).item())

    qa, ka, va, doa = (t.clone().requires_grad_(True) for t in (q, k, v, do))
    o_auto = plain_attention(qa, ka, va, scale)
    grads_auto = torch.autograd.grad(o_auto, (qa, ka, va), doa, create_graph=True)
    inner = (grads_auto[0] * gq).sum() + (grads_auto[1] * gk).sum() + (grads_auto[2] * gv).sum()
    bars_auto = torch.autograd.grad(inner, (qa, ka, va, doa))

    o, lse = attn_fwd_ref(q, k, v, scale)
    assert o.dtype == torch.float64 and lse.dtype == torch.float64 and lse.shape == q.shape[:3]
    assert rel(o, o_auto) < TOL64
    assert rel(lse, torch.logsumexp(scale * q @ k.transpose(-1, -2), dim=-1)) < TOL64

    for name, a, b in zip(("dq", "dk", "dv"), attn_bwd_ref(q, k, v, o, lse, do, scale), grads_auto):
        assert rel(a, b) < TOL64, name
    bars = attn_dbwd_ref(q, k, v, o, lse, do, gq, gk, gv, scale)
    for name, a, b in zip(("qbar", "kbar", "vbar", "gbar"), bars, bars_auto):
        assert rel(a, b) < TOL64, name


@pytest.mark.parametrize("present", ["gq", "gk", "gv", "gk+gv"])
def test_double_backward_reference_with_missing_cotangents(present):
    q, k, v, do, gq, gk, gv = inputs(2, 2, 13, 21, 16)
    scale = 0.31
    cot = {"gq": gq, "gk": gk, "gv": gv}
    given = {n: (t if n in present.split("+") else None) for n, t in cot.items()}

    qa, ka, va, doa = (t.clone().requires_grad_(True) for t in (q, k, v, do))
    grads = torch.autograd.grad(plain_attention(qa, ka, va, scale), (qa, ka, va), doa, create_graph=True)
    inner = sum((g * given[n]).sum() for g, n in zip(grads, ("gq", "gk", "gv")) if given[n] is not None)
    bars_auto = torch.autograd.grad(inner, (qa, ka, va, doa), allow_unused=True)

    o, lse = attn_fwd_ref(q, k, v, scale)
    bars = attn_dbwd_ref(q, k, v, o, lse, do, given["gq"], given["gk"], given["gv"], scale)
    for a, b in zip(bars, bars_auto):
        assert rel(a, torch.zeros_like(a) if b is None else b) < TOL64


def test_half_precision_reference_is_close_to_float64():
    q, k, v, do, gq, gk, gv = inputs(1, 2, 37, 29, 64, dtype=torch.bfloat16)
    scale = default_scale(64)
    d = [t.double() for t in (q, k, v, do, gq, gk, gv)]
    o, lse = attn_fwd_ref(q, k, v, scale)
    o64, lse64 = attn_fwd_ref(d[0], d[1], d[2], scale)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel(o.double(), o64) < 1e-2 and rel(lse.double(), lse64) < 1e-3
    bars = attn_dbwd_ref(q, k, v, o, lse, do, gq, gk, gv, scale)
    bars64 = attn_dbwd_ref(*d[:3], o64, lse64, *d[3:], scale)
    for a, b in zip(bars, bars64):
        assert a.dtype == torch.bfloat16 and rel(a.double(), b) < 2e-2


# Run in a fresh interpreter where ``import triton`` fails, as on a laptop without triton.
NO_TRITON_SCRIPT = r"""
import sys
sys.modules["triton"] = None  # any import of triton now raises ImportError
import torch
import fastebm
from fastebm.ops import attention, available_backends
from fastebm.kernels.attention_ref import attn_fwd_ref

assert available_backends() == ["math"], available_backends()
q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
o = attention(q, k, v)
(g,) = torch.autograd.grad(o.pow(2).sum(), q, create_graph=True)
g.sum().backward()
assert torch.allclose(o, attn_fwd_ref(q, k, v, 8 ** -0.5)[0])
model = fastebm.create_model("vit_demo", img_size=8, depth=1, embed_dim=16, num_heads=2).double()
x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
e, dx = model.energy_and_input_grad(x)  # the explicit engine's math custom ops
assert e.shape == (2,) and dx.shape == x.shape
assert not any(name == "triton" or name.startswith("triton.") for name in sys.modules if sys.modules[name])
try:
    attention(q, k, v, backend="triton")
except ValueError as exc:
    assert "unknown attention backend 'triton'" in str(exc)
else:
    raise AssertionError("backend='triton' without triton must be a ValueError")
print("ok")
"""


def test_fastebm_imports_and_runs_math_attention_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", NO_TRITON_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr

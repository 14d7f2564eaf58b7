"""The Triton attention stages on strided views, on even and ragged tile grids, and the backward's
``delta`` handed to the double backward (``fastebm.kernels.attention``).

Run in Triton's interpreter on CPU (tests/conftest.py). Results are compared with the float64
references of ``fastebm.kernels.attention_ref`` and, for strided inputs, with the same call on
contiguous copies (the same arithmetic, so equal bit for bit). What the kernels are launched with
(pointers, strides, the EVEN_* constexprs) is read from a spy around each kernel.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from fastebm.kernels import attention as K
from fastebm.kernels import attention_config
from fastebm.kernels.attention_ref import attn_bwd_ref, attn_dbwd_ref, attn_fwd_ref

from test_attention_triton import DEVICE, FP32_TOL, rel_err

KERNEL_ATTRS = ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                "_attn_dbwd_row_kernel", "_attn_dbwd_col_kernel")


class Spy:
    """Wraps a kernel: records the positional tensors and keyword constexprs of every launch."""

    def __init__(self, kernel, calls, name):
        self.kernel, self.calls, self.name = kernel, calls, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append((self.name, args, kwargs))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    calls = []
    for attr in KERNEL_ATTRS:
        monkeypatch.setattr(K, attr, Spy(getattr(K, attr), calls, attr))
    return calls


def qkv_views(B, N, H, D, dtype=torch.float32):
    """q, k, v as the ViT makes them: views of one (B, N, 3, H, d) projection, permuted."""
    qkv = torch.randn(B, N, 3, H, D, dtype=dtype, device=DEVICE).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def heads_view(B, N, H, D, dtype=torch.float32):
    """A (B, H, N, d) view of a (B, N, H, d) tensor (e.g. an upstream gradient from the projection)."""
    return torch.randn(B, N, H, D, dtype=dtype, device=DEVICE).transpose(1, 2)


def last_dim_strided(B, H, N, D, dtype=torch.float32):
    """A (B, H, N, d) tensor whose head-dim stride is not 1."""
    return torch.randn(B, H, D, N, dtype=dtype, device=DEVICE).transpose(-1, -2)


def all_stages(q, k, v, do, gq, gk, gv, scale):
    o, lse = K.attn_fwd(q, k, v, scale)
    dq, dk, dv, delta = K.attn_bwd(q, k, v, o, lse, do, scale, return_delta=True)
    bars = K.attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, scale, delta=delta)
    return (o, lse, dq, dk, dv, delta) + tuple(bars)


def test_every_stage_reads_strided_views_in_place(launches):
    B, N, H, D = 2, 37, 3, 16
    q, k, v = qkv_views(B, N, H, D)
    gq, gk, gv = qkv_views(B, N, H, D)  # cotangents as the qkv projection's backward hands them over
    do = heads_view(B, N, H, D)
    assert not any(t.is_contiguous() for t in (q, k, v, do, gq, gk, gv))
    scale = 0.29
    got = all_stages(q, k, v, do, gq, gk, gv, scale)

    # Every kernel got the views themselves: the same addresses and strides, no contiguous copies.
    views = {"Q": q, "K": k, "V": v, "DO": do, "GQ": gq, "GK": gk, "GV": gv}
    seen = set()
    for name, args, _ in launches:
        names = list(inspect.signature(getattr(K, name).kernel.fn).parameters)[:len(args)]
        bound = dict(zip(names, args))
        for arg, view in views.items():
            if arg in bound:
                t = bound[arg]
                assert t.data_ptr() == view.data_ptr() and t.stride() == view.stride(), (name, arg)
                low = arg.lower()
                assert [bound[f"stride_{low}{a}"] for a in "bhnd"] == list(view.stride()), (name, arg)
                seen.add(arg)
    assert seen == set(views)

    # Outputs are contiguous and equal (bit for bit) to the same call on contiguous copies.
    want = all_stages(*(t.contiguous() for t in (q, k, v, do, gq, gk, gv)), scale)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.is_contiguous() and torch.equal(a, b), i

    # And they match the float64 references.
    d = [t.double() for t in (q, k, v, do, gq, gk, gv)]
    o_ref, lse_ref = attn_fwd_ref(*d[:3], scale)
    grads_ref = attn_bwd_ref(*d[:3], o_ref, lse_ref, d[3], scale)
    bars_ref = attn_dbwd_ref(*d[:3], o_ref, lse_ref, d[3], *d[4:], scale)
    refs = (o_ref, lse_ref) + grads_ref + bars_ref
    for a, b in zip(got[:5] + got[6:], refs):
        assert rel_err(a, b) < FP32_TOL


def test_head_dim_stride_other_than_one():
    # Not what the ViT passes, but any strides are allowed: a transposed head dimension too.
    B, H, NQ, NK, D = 1, 2, 19, 23, 24
    q, do, gq = (last_dim_strided(B, H, NQ, D) for _ in range(3))
    k, v, gk, gv = (last_dim_strided(B, H, NK, D) for _ in range(4))
    got = all_stages(q, k, v, do, gq, gk, gv, 0.21)
    want = all_stages(*(t.contiguous() for t in (q, k, v, do, gq, gk, gv)), 0.21)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), i


# (Nq, Nk, d) with 16-row tiles: both lengths multiples of the tile (no row masks), one of them
# ragged, both ragged; d = 16 (no head-dim mask) and d = 24 (padded to 32).
EVEN_CASES = [(32, 48, 16), (32, 37, 24), (29, 32, 16), (29, 37, 24), (16, 16, 24)]


@pytest.mark.parametrize("nq,nk,d", EVEN_CASES, ids=lambda c: str(c))
def test_even_and_ragged_tiles(nq, nk, d, launches, monkeypatch):
    monkeypatch.setattr(attention_config, "INTERPRETER_BLOCK", 16)
    B, H = 1, 2
    x = {n: torch.randn(B, H, nq if n in ("q", "do", "gq") else nk, d, device=DEVICE)
         for n in ("q", "k", "v", "do", "gq", "gk", "gv")}
    scale = d ** -0.5 * 1.1
    got = all_stages(*x.values(), scale)
    for name, _, kwargs in launches:
        assert kwargs["HEAD_DIM"] == d and kwargs["BLOCK_D"] == max(16, 1 << (d - 1).bit_length()), name
        assert kwargs["EVEN_M"] == (nq % 16 == 0), name
        if "EVEN_N" in kwargs:
            assert kwargs["EVEN_N"] == (nk % 16 == 0), name
    assert {name for name, _, _ in launches} == set(KERNEL_ATTRS)
    d64 = {n: t.double() for n, t in x.items()}
    o_ref, lse_ref = attn_fwd_ref(d64["q"], d64["k"], d64["v"], scale)
    grads_ref = attn_bwd_ref(d64["q"], d64["k"], d64["v"], o_ref, lse_ref, d64["do"], scale)
    bars_ref = attn_dbwd_ref(d64["q"], d64["k"], d64["v"], o_ref, lse_ref, d64["do"], d64["gq"], d64["gk"], d64["gv"],
                             scale)
    for a, b in zip(got[:5] + got[6:], (o_ref, lse_ref) + grads_ref + bars_ref):
        assert rel_err(a, b) < FP32_TOL


def test_delta_reuse_equals_recompute(launches):
    B, H, NQ, NK, D = 2, 2, 23, 31, 16
    x = {n: torch.randn(B, H, NQ if n in ("q", "do", "gq") else NK, D, device=DEVICE)
         for n in ("q", "k", "v", "do", "gq", "gk", "gv")}
    q, k, v, do, gq, gk, gv = x.values()
    o, lse = K.attn_fwd(q, k, v, 0.3)
    dq, dk, dv, delta = K.attn_bwd(q, k, v, o, lse, do, 0.3, return_delta=True)
    assert delta.shape == (B, H, NQ) and delta.dtype == torch.float32
    assert rel_err(delta, (o.double() * do.double()).sum(-1)) < FP32_TOL
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), K.attn_bwd(q, k, v, o, lse, do, 0.3)))

    launches.clear()
    reused = K.attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, 0.3, delta=delta)
    assert "_attn_bwd_delta_kernel" not in {name for name, _, _ in launches}  # not recomputed
    recomputed = K.attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, 0.3)
    assert "_attn_bwd_delta_kernel" in {name for name, _, _ in launches}
    for a, b in zip(reused, recomputed):
        assert torch.equal(a, b)

    # The given delta is the one used: a wrong one changes the result.
    wrong = K.attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, 0.3, delta=delta + 0.5)
    assert not torch.allclose(wrong[0], reused[0], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="delta has shape"):
        K.attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, 0.3, delta=delta[:, :1])


def test_reference_delta_reuse_equals_recompute():
    x = {n: torch.randn(1, 2, 9 if n in ("q", "do", "gq") else 7, 8, dtype=torch.float64)
         for n in ("q", "k", "v", "do", "gq", "gk", "gv")}
    q, k, v, do, gq, gk, gv = x.values()
    o, lse = attn_fwd_ref(q, k, v, 0.4)
    *grads, delta = attn_bwd_ref(q, k, v, o, lse, do, 0.4, return_delta=True)
    assert torch.allclose(delta, (o * do).sum(-1), rtol=1e-14, atol=0)
    for a, b in zip(attn_dbwd_ref(q, k, v, o, lse, do, gq, gk, gv, 0.4, delta=delta),
                    attn_dbwd_ref(q, k, v, o, lse, do, gq, gk, gv, 0.4)):
        assert torch.equal(a, b)


def test_autograd_runs_the_delta_kernel_once(launches):
    # forward, backward with a graph, double backward: delta comes from the backward, not again.
    from fastebm.ops import attention

    q, k, v = (t.detach().requires_grad_(True) for t in qkv_views(1, 13, 2, 16))
    do = heads_view(1, 13, 2, 16).requires_grad_(True)
    o = attention(q, k, v, backend="triton")
    grads = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    torch.autograd.grad(sum((g * g).sum() for g in grads), (q, k, v, do))
    names = [name for name, _, _ in launches]
    assert names.count("_attn_bwd_delta_kernel") == 1 and names.count("_attn_dbwd_col_kernel") == 1, names

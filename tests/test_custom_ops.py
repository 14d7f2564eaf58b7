"""The attention custom ops fastebm::attn_fwd / attn_bwd / attn_dbwd (explicit engine).

Checked: torch.library.opcheck (schema, autograd registration, fake tensors and their strides,
AOT dispatch) for every op on both backends, and second-order derivatives through the ops' chained
autograd against torch.autograd of an independently written float64 softmax attention.
"""
import pytest
import torch

from fastebm.ops import attention_custom_ops as ops


def _ref_attention(q, k, v, scale):
    # Written here from the definition, not taken from fastebm.
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s, dim=-1) @ v


# The Triton kernels run on CUDA tensors when a GPU is present, else in the CPU interpreter
# (conftest sets TRITON_INTERPRET=1 on machines without an NVIDIA GPU).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _inputs(B, H, Nq, Nk, d, dtype=torch.float64, requires_grad=True, device="cpu"):
    q = torch.randn(B, H, Nq, d, dtype=dtype, device=device)
    k = torch.randn(B, H, Nk, d, dtype=dtype, device=device)
    # v non-contiguous on purpose: outputs (and the fake outputs) must still be contiguous
    v = torch.randn(B, Nk, H, d, dtype=dtype, device=device).transpose(1, 2)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


BACKENDS = ["math", "triton"]


# The Triton interpreter is slow: its opcheck runs in float32 only.
@pytest.mark.parametrize("backend, dtype", [("math", torch.float64), ("math", torch.float32),
                                            ("triton", torch.float32)])
def test_opcheck_every_op(backend, dtype):
    B, H, Nq, Nk, d = 2, 3, 5, 7, 16
    scale = 0.31
    q, k, v = _inputs(B, H, Nq, Nk, d, dtype, device=_device(backend))
    torch.library.opcheck(ops.attn_fwd, (q, k, v, scale, backend))
    with torch.no_grad():
        o, lse = ops.attn_fwd(q, k, v, scale, backend)
    do = torch.randn(B, H, Nq, d, dtype=dtype, device=q.device, requires_grad=True)
    torch.library.opcheck(ops.attn_bwd_op, (q, k, v, o, lse, do, scale, backend))
    gq, gk, gv = (torch.randn_like(t) for t in (q, k, v))
    # attn_dbwd has no derivative (third order): checked with inputs that do not require grad
    det = [t.detach() for t in (q, k, v, o, lse, do)]
    with torch.no_grad():
        delta = ops.attn_bwd_op(*det, scale, backend)[3]
    torch.library.opcheck(ops.attn_dbwd, (*det, gq, gk, gv, scale, backend))
    torch.library.opcheck(ops.attn_dbwd, (*det, None, gk, None, scale, backend))
    torch.library.opcheck(ops.attn_dbwd, (*det, gq, gk, gv, scale, backend, delta))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 2, 1, 5, 16), (2, 1, 9, 4, 32)])
def test_second_order_through_ops_matches_float64_autograd(backend, shape):
    B, H, Nq, Nk, d = shape
    scale = d ** -0.5 * 1.3
    q, k, v = _inputs(B, H, Nq, Nk, d, device=_device(backend))
    do = torch.randn(B, H, Nq, d, dtype=torch.float64, device=q.device, requires_grad=True)
    cot = [torch.randn_like(t) for t in (q, k, v)]

    def second_order(att):
        o = att(q, k, v)
        first = torch.autograd.grad((o * do).sum(), (q, k, v), create_graph=True)
        inner = sum((g * c).sum() for g, c in zip(first, cot))
        return (o,) + first + torch.autograd.grad(inner, (q, k, v, do))

    got = second_order(lambda a, b, c: ops.attn_fwd(a, b, c, scale, backend)[0])
    want = second_order(lambda a, b, c: _ref_attention(a, b, c, scale))
    for name, g, w in zip(["o", "dq", "dk", "dv", "qbar", "kbar", "vbar", "gbar"], got, want):
        rel = ((g - w).norm() / w.norm()).item()
        assert rel < 1e-10, (name, rel)


def test_double_backward_runs_each_stage_once(stage_calls):
    # o and lse are caches: a double backward must not walk back into attn_fwd's node and spend an
    # extra attn_bwd on a zero cotangent. (stage_calls, from conftest, counts the stages' real runs.)
    q, k, v = _inputs(1, 1, 3, 3, 16)
    o, _ = ops.attn_fwd(q, k, v, 0.25, "math")
    (g,) = torch.autograd.grad(o.sum(), q, create_graph=True)
    g.sum().backward()
    assert stage_calls["attn_fwd"] == 1
    assert stage_calls["attn_bwd"] == 1
    assert stage_calls["attn_dbwd"] == 1


def test_third_order_is_refused_clearly():
    q, k, v = _inputs(1, 1, 3, 4, 16)
    o, _ = ops.attn_fwd(q, k, v, 0.25, "math")
    (g,) = torch.autograd.grad(o.pow(2).sum(), q, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), k, create_graph=True)
    with pytest.raises(RuntimeError, match="third-order"):
        h.sum().backward()


def test_unknown_backend_is_a_value_error():
    q, k, v = _inputs(1, 1, 2, 2, 16, requires_grad=False)
    with pytest.raises(ValueError, match="backend"):
        ops.attn_fwd(q, k, v, 0.25, "cudnn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        ops.resolve_op_backend(q, "nonexistent")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_outputs_have_the_real_strides_for_strided_inputs(backend):
    # q, k, v as views of one (B, N, 3, H, d) projection, do and the cotangents non-contiguous too:
    # the fake implementations (what torch.compile plans with) must promise exactly what runs.
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, N, H, d = 2, 7, 3, 16
    device = _device(backend)
    q, k, v = torch.randn(B, N, 3, H, d, device=device).permute(2, 0, 3, 1, 4).unbind(0)
    do, gq, gk, gv = (torch.randn(B, N, H, d, device=device).transpose(1, 2) for _ in range(4))

    def run(q, k, v, do, gq, gk, gv):
        o, lse = ops.attn_fwd(q, k, v, 0.3, backend)
        dq, dk, dv, delta = ops.attn_bwd_op(q, k, v, o, lse, do, 0.3, backend)
        bars = ops.attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, 0.3, backend, delta)
        return (o, lse, dq, dk, dv, delta) + tuple(bars)

    real = run(q, k, v, do, gq, gk, gv)
    with FakeTensorMode() as mode:
        fake = run(*(mode.from_tensor(t) for t in (q, k, v, do, gq, gk, gv)))
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), i
        assert r.is_contiguous(), i


def test_ops_hand_the_backward_delta_to_the_double_backward(stage_calls, monkeypatch):
    # attn_bwd_op returns delta = rowsum(O * dO); its autograd passes that tensor to attn_dbwd.
    from fastebm.kernels import attention_ref

    seen = []
    dbwd = attention_ref.attn_dbwd_ref  # already wrapped by stage_calls

    def record(*args, **kwargs):
        seen.append(kwargs.get("delta"))
        return dbwd(*args, **kwargs)

    monkeypatch.setattr(attention_ref, "attn_dbwd_ref", record)
    q, k, v = _inputs(1, 2, 5, 6, 16)
    o, lse = ops.attn_fwd(q, k, v, 0.25, "math")
    do = torch.randn_like(o)
    dq, dk, dv, delta = ops.attn_bwd_op(q, k, v, o.detach(), lse.detach(), do, 0.25, "math")
    assert not delta.requires_grad and delta.shape == (1, 2, 5)
    torch.testing.assert_close(delta, (o * do).sum(-1).detach(), rtol=1e-13, atol=0)
    (dq.sum() + dk.pow(2).sum() + dv.sum()).backward()
    assert len(seen) == 1 and seen[0] is not None and torch.equal(seen[0], delta)
    assert stage_calls["attn_dbwd"] == 1

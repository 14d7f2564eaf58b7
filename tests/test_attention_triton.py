"""The fused Triton attention (``fastebm.kernels.attention`` + ``fastebm.ops.triton_attention``).

On machines without a GPU these run the real kernels in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1); nothing here falls back to the math path. Every comparison is against
float64 references on fresh random inputs: the stage references of ``fastebm.kernels.attention_ref``
and, independently, ``torch.autograd`` on plain float64 math attention written in this file.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastebm
from fastebm.kernels import attention as K
from fastebm.kernels import attention_config
from fastebm.ops import attention, resolve_backend
from fastebm.ops.attention import ENV_VAR
from fastebm.kernels.attention_ref import attn_bwd_ref, attn_dbwd_ref, attn_fwd_ref
from fastebm.ops.third_order import THIRD_ORDER_MESSAGE
from fastebm.ops.triton_attention import supports

# (B, H, Nq, Nk, d): single tokens, odd lengths, Nq != Nk both ways, a ViT-like N = 197, a
# non-power-of-two head dim; B*H*Nq*Nk kept small where N is large (the interpreter is slow).
SHAPES = [
    (2, 3, 37, 37, 16),
    (3, 1, 1, 37, 64),
    (1, 2, 37, 1, 16),
    (1, 2, 37, 29, 64),
    (2, 1, 29, 37, 24),
    (1, 1, 197, 197, 64),
    (1, 1, 197, 37, 16),
]
FP32_TOL = 1e-5
# The kernels run where Triton runs: compiled on a CUDA GPU, else in the interpreter on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-relative error ||a - e|| / max(||e||, sqrt(numel)) in float64.

    The floor (an RMS of 1, the natural magnitude for unit-normal inputs) only matters for results
    that vanish analytically, e.g. dq and dk when Nk = 1 (the softmax of one key has no score
    gradient): those are then checked in absolute terms instead of relative to rounding noise."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), "result has NaN/Inf (a kernel may have left outputs unwritten)"
    return ((a - e).norm() / max(e.norm().item(), math.sqrt(e.numel()) if e.numel() else 1.0)).item()


def make_inputs(B, H, NQ, NK, D, dtype=torch.float32, device=DEVICE):
    """Fresh inputs, including the upstream gradient and the three double-backward cotangents."""
    def r(n):
        return torch.randn(B, H, n, D, dtype=dtype, device=device)

    return dict(q=r(NQ), k=r(NK), v=r(NK), do=r(NQ), gq=r(NQ), gk=r(NK), gv=r(NK))


def random_scale(d: int) -> float:
    # Arbitrary scale around the usual d^-1/2 (not a power of two, so no exact rounding luck).
    return d ** -0.5 * (0.5 + torch.rand(()).item())


def math_attention64(q, k, v, scale):
    """Independent float64 attention from plain ops: torch.autograd differentiates it to any order."""
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v


def autograd_references(x, scale):
    """Forward, first and second derivatives of float64 math attention by torch.autograd.

    Returns (o, (dq, dk, dv), (qbar, kbar, vbar, gbar)) where the bars are the gradients of
    <gq,dq> + <gk,dk> + <gv,dv> with respect to (q, k, v, do)."""
    q, k, v, do = (x[n].double().requires_grad_(True) for n in ("q", "k", "v", "do"))
    o = math_attention64(q, k, v, scale)
    grads = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    inner = sum((g * x[n].double()).sum() for g, n in zip(grads, ("gq", "gk", "gv")))
    bars = torch.autograd.grad(inner, (q, k, v, do))
    return o.detach(), tuple(g.detach() for g in grads), bars


class AllocationRecorder(TorchDispatchMode):
    """Records the numel of every floating tensor any aten op produces (byte views of storages,
    which the interpreter makes to reach tensor memory, are not tensors of the computation) and
    fills each freshly allocated
    floating tensor (empty/empty_like/empty_strided/new_empty) with NaN, so an output a kernel
    forgets to write shows up as NaN instead of plausible leftover memory."""

    EMPTY_OPS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.numels.append(t.numel())
                if func.overloadpacket.__name__ in self.EMPTY_OPS:
                    t.fill_(float("nan"))
        return out


# ------------------------------------------------------------------------------------------------
# Kernels called directly, against the stage references on float64 copies
# ------------------------------------------------------------------------------------------------


def check_stages(x, scale, tol):
    q, k, v, do, gq, gk, gv = (x[n] for n in ("q", "k", "v", "do", "gq", "gk", "gv"))
    d64 = {n: t.double() for n, t in x.items()}
    with AllocationRecorder():  # poisons every output buffer and scratch buffer with NaN
        o, lse = K.attn_fwd(q, k, v, scale)
        grads = K.attn_bwd(q, k, v, o, lse, do, scale)
        bars = K.attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, scale)
    o_ref, lse_ref = attn_fwd_ref(d64["q"], d64["k"], d64["v"], scale)
    grads_ref = attn_bwd_ref(d64["q"], d64["k"], d64["v"], o_ref, lse_ref, d64["do"], scale)
    bars_ref = attn_dbwd_ref(
        d64["q"], d64["k"], d64["v"], o_ref, lse_ref, d64["do"], d64["gq"], d64["gk"], d64["gv"], scale
    )
    assert o.dtype == q.dtype and o.shape == q.shape and o.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    errors = {"o": rel_err(o, o_ref), "lse": rel_err(lse, lse_ref)}
    errors.update({n: rel_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, grads_ref)})
    errors.update({n: rel_err(a, b) for n, a, b in zip(("qbar", "kbar", "vbar", "gbar"), bars, bars_ref)})
    worst = max(errors, key=errors.get)
    assert errors[worst] < tol, f"{worst}: relative error {errors[worst]:.2e} >= {tol:.0e}; all: {errors}"
    return o, grads, bars


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_fp32_match_float64_references(shape):
    d = shape[-1]
    check_stages(make_inputs(*shape), random_scale(d), FP32_TOL)


def test_poisoned_outputs_catch_a_kernel_that_writes_nothing(monkeypatch):
    # The harness itself must fail when a kernel leaves its output unwritten.
    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(K, "_attn_bwd_dq_kernel", NoLaunch())
    with pytest.raises(AssertionError, match="NaN"):
        check_stages(make_inputs(1, 1, 5, 7, 16), 0.3, FP32_TOL)


@pytest.mark.parametrize("shape", [(2, 2, 37, 29, 16), (1, 1, 197, 150, 64)], ids=lambda s: "x".join(map(str, s)))
def test_kernels_fp64_match_float64_references(shape):
    # float64 inputs run in float64 throughout (this is what gradcheck relies on).
    check_stages(make_inputs(*shape, dtype=torch.float64), random_scale(shape[-1]), 1e-12)


@pytest.mark.parametrize("shape", [(2, 1, 37, 29, 16), (1, 2, 29, 37, 40)], ids=lambda s: "x".join(map(str, s)))
def test_kernels_multi_tile_loops(shape, monkeypatch):
    # 16-wide tiles: several loop iterations per program and a ragged last tile along both Nq and
    # Nk (the default interpreter tile covers these lengths in one or two tiles).
    monkeypatch.setattr(attention_config, "INTERPRETER_BLOCK", 16)
    check_stages(make_inputs(*shape), random_scale(shape[-1]), FP32_TOL)


def test_kernels_accept_strided_inputs():
    # q, k, v as the ViT produces them: views into one (B, N, 3, H, d) qkv projection.
    B, N, H, D = 2, 37, 3, 16
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    do = torch.randn(B, H, N, D, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous too
    scale = random_scale(D)
    o, lse = K.attn_fwd(q, k, v, scale)
    o_ref, lse_ref = attn_fwd_ref(q.double(), k.double(), v.double(), scale)
    assert rel_err(o, o_ref) < FP32_TOL
    grads = K.attn_bwd(q, k, v, o, lse, do, scale)
    grads_ref = attn_bwd_ref(q.double(), k.double(), v.double(), o_ref, lse_ref, do.double(), scale)
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < FP32_TOL


@pytest.mark.parametrize("missing", ["gq", "gk", "gv", "gq+gk"])
def test_double_backward_with_missing_cotangents(missing):
    x = make_inputs(1, 2, 37, 29, 16)
    scale = random_scale(16)
    cot = {n: (None if n in missing.split("+") else x[n]) for n in ("gq", "gk", "gv")}
    o, lse = K.attn_fwd(x["q"], x["k"], x["v"], scale)
    bars = K.attn_dbwd(x["q"], x["k"], x["v"], o, lse, x["do"], cot["gq"], cot["gk"], cot["gv"], scale)
    d = {n: t.double() for n, t in x.items()}
    d_cot = [None if cot[n] is None else d[n] for n in ("gq", "gk", "gv")]
    o_ref, lse_ref = attn_fwd_ref(d["q"], d["k"], d["v"], scale)
    refs = attn_dbwd_ref(d["q"], d["k"], d["v"], o_ref, lse_ref, d["do"], *d_cot, scale)
    for a, b in zip(bars, refs):
        assert rel_err(a, b) < FP32_TOL


def test_half_precision_inputs():
    # bfloat16 / float16 inputs with float32 accumulation (on CPU the interpreter computes bfloat16
    # in float32; GPU runs are covered by the cuda-marked tests).
    for dtype in (torch.bfloat16, torch.float16):
        x = make_inputs(1, 2, 37, 29, 64, dtype=dtype)
        o, grads, bars = check_stages(x, random_scale(64), 2e-2)
        assert o.dtype == dtype and all(g.dtype == dtype for g in (*grads, *bars))


# ------------------------------------------------------------------------------------------------
# The autograd.Function behind attention(..., backend="triton")
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(2, 3, 37, 37, 16), (1, 2, 29, 37, 64), (1, 1, 197, 197, 64)], ids=lambda s: "x".join(map(str, s))
)
def test_autograd_matches_math_autograd_to_second_order(shape):
    x = make_inputs(*shape)
    scale = random_scale(shape[-1])
    o_ref, grads_ref, bars_ref = autograd_references(x, scale)

    q, k, v, do = (x[n].clone().requires_grad_(True) for n in ("q", "k", "v", "do"))
    o = attention(q, k, v, scale=scale, backend="triton")
    assert o.grad_fn is not None and "TritonAttention" in type(o.grad_fn).__name__
    grads = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    inner = sum((g * x[n]).sum() for g, n in zip(grads, ("gq", "gk", "gv")))
    bars = torch.autograd.grad(inner, (q, k, v, do))

    assert rel_err(o, o_ref) < FP32_TOL
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert rel_err(a, b) < FP32_TOL, name
    for name, a, b in zip(("qbar", "kbar", "vbar", "gbar"), bars, bars_ref):
        assert rel_err(a, b) < FP32_TOL, name


def test_gradcheck_and_gradgradcheck_float64():
    q, k, v = (torch.randn(1, 2, n, 5, dtype=torch.float64, device=DEVICE, requires_grad=True) for n in (6, 9, 9))
    scale = random_scale(5)

    def fn(q, k, v):
        return attention(q, k, v, scale=scale, backend="triton")

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (q, k, v), fast_mode=True)


def test_third_order_request_raises():
    x = make_inputs(1, 2, 9, 7, 16, dtype=torch.float64)
    q, k, v = (x[n].requires_grad_(True) for n in ("q", "k", "v"))
    o = attention(q, k, v, backend="triton")
    grads = torch.autograd.grad(o, (q, k, v), x["do"], create_graph=True)
    second = torch.autograd.grad(sum((g * g).sum() for g in grads), (q, k, v), create_graph=True)
    with pytest.raises(RuntimeError, match="second order only") as info:
        torch.autograd.grad(sum(s.sum() for s in second), (q, k, v))
    assert "backend='math'" in str(info.value) and str(info.value) == THIRD_ORDER_MESSAGE


def test_no_tensor_of_attention_matrix_size_is_saved_or_allocated():
    B, H, NQ, NK, D = 1, 2, 41, 23, 16
    quadratic = B * H * NQ * NK  # 1886: no other tensor of this test has that many elements
    x = make_inputs(B, H, NQ, NK, D)
    assert quadratic not in {t.numel() for t in x.values()}

    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    q, k, v, do = (x[n].clone().requires_grad_(True) for n in ("q", "k", "v", "do"))
    recorder = AllocationRecorder()
    with recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = attention(q, k, v, backend="triton")
        grads = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
        inner = sum((g * x[n]).sum() for g, n in zip(grads, ("gq", "gk", "gv")))
        bars = torch.autograd.grad(inner, (q, k, v, do))
    assert all(torch.isfinite(b).all() for b in bars)
    assert saved and quadratic not in saved, f"saved tensor sizes {sorted(set(saved))}"
    assert recorder.numels and max(recorder.numels) < quadratic, f"largest allocation {max(recorder.numels)}"

    # The recorder does see attention-matrix-sized tensors when they exist (the math backend).
    recorder = AllocationRecorder()
    with recorder:
        attention(x["q"], x["k"], x["v"], backend="math")
    assert quadratic in recorder.numels


# ------------------------------------------------------------------------------------------------
# Backend selection
# ------------------------------------------------------------------------------------------------


def test_backend_env_var_is_honoured(monkeypatch):
    q = torch.randn(1, 1, 3, 16)  # CPU: resolve_backend only looks at the tensor, runs nothing
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(q, "auto") == "math"  # CPU tensors: auto never picks the interpreter
    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_backend(q, "auto") == "triton"
    monkeypatch.setenv(ENV_VAR, "math")
    assert resolve_backend(q, "auto") == "math"
    assert resolve_backend(q, "triton") == "triton"  # an explicit backend wins over the variable
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        resolve_backend(q, "auto")


def test_env_var_triton_runs_the_fused_kernels(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    q, k, v = (torch.randn(1, 2, 5, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    o = attention(q, k, v)
    assert "TritonAttention" in type(o.grad_fn).__name__
    assert rel_err(o, math_attention64(q.double(), k.double(), v.double(), 0.25)) < FP32_TOL


def test_supports_and_input_errors():
    assert supports(torch.randn(1, 1, 4, 16, device=DEVICE))  # CUDA, or CPU with TRITON_INTERPRET=1
    assert supports(torch.randn(1, 1, 4, 16, dtype=torch.float64, device=DEVICE))
    assert not supports(torch.randint(0, 3, (1, 1, 4, 16), device=DEVICE))
    assert not supports(torch.randn(1, 1, 4, 160, device=DEVICE))
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one dtype"):
        K.attn_fwd(q, q.double(), q, 0.25)
    with pytest.raises(ValueError, match="head dim 300"):
        K.attn_fwd(*(torch.randn(1, 1, 3, 300, device=DEVICE),) * 3, 0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        K.attn_fwd(q, torch.randn(1, 2, 5, 8, device=DEVICE), torch.randn(1, 2, 5, 8, device=DEVICE), 0.25)
    with pytest.raises(ValueError, match="gk has shape"):
        o, lse = K.attn_fwd(q, q, q, 0.25)
        K.attn_dbwd(q, q, q, o, lse, q, None, q[:, :1], None, 0.25)


# ------------------------------------------------------------------------------------------------
# A restoration step through a tiny EnergyViT: Triton and math give the same parameter gradients
# ------------------------------------------------------------------------------------------------


def test_restoration_step_energy_vit_triton_matches_math():
    model = fastebm.create_model("vit_demo", img_size=16, depth=2, attn_backend="math").double().to(DEVICE)
    objective = fastebm.RestorationObjective(model, steps=2, alpha_init=0.5)
    clean = torch.randn(2, 3, 16, 16, dtype=torch.float64, device=DEVICE)
    corrupted = clean + 0.5 * torch.randn_like(clean)
    weight = torch.ones(2, 1, 16, 16, dtype=torch.float64, device=DEVICE)

    def param_grads(backend):
        model.attn_backend = backend
        objective.zero_grad(set_to_none=True)
        loss, _ = objective(clean, corrupted, weight)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}

    loss_math, grads_math = param_grads("math")
    loss_triton, grads_triton = param_grads("triton")
    assert model.blocks[0].attn.backend == "triton"
    assert set(grads_math) == set(grads_triton) and any(".attn.qkv." in n for n in grads_math)
    assert torch.allclose(loss_triton, loss_math, rtol=1e-10, atol=0)
    for name, g in grads_math.items():
        assert rel_err(grads_triton[name], g) < 1e-9, name


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernels in fp32 and bf16 (skipped without CUDA)
# ------------------------------------------------------------------------------------------------

# d = 64 (ViT) in fp32 and bf16, plus one d = 128 bf16 case: each (dtype, head-dim bucket) costs six
# kernel compiles, and the GPU check's time budget is short. fp16 runs on CPU (interpreter) only.
CUDA_CASES = [
    ((2, 3, 37, 29, 64), torch.float32, FP32_TOL),
    ((2, 12, 197, 197, 64), torch.float32, FP32_TOL),
    ((1, 4, 1029, 333, 64), torch.float32, FP32_TOL),
    ((2, 3, 37, 29, 64), torch.bfloat16, 2e-2),
    ((2, 12, 197, 197, 64), torch.bfloat16, 2e-2),
    ((1, 4, 1029, 333, 64), torch.bfloat16, 2e-2),
    ((1, 2, 77, 1, 64), torch.bfloat16, 2e-2),
    ((2, 2, 300, 77, 128), torch.bfloat16, 2e-2),
]


@pytest.mark.cuda
@pytest.mark.parametrize("shape,dtype,tol", CUDA_CASES, ids=lambda c: str(c).replace("torch.", "").replace(" ", ""))
def test_cuda_kernels_match_float64_references(shape, dtype, tol):
    check_stages(make_inputs(*shape, dtype=dtype, device="cuda"), random_scale(shape[-1]), tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, 2e-2)])
def test_cuda_autograd_matches_math_autograd(dtype, tol):
    x = make_inputs(4, 12, 197, 197, 64, dtype=dtype, device="cuda")
    scale = random_scale(64)
    o_ref, grads_ref, bars_ref = autograd_references(x, scale)
    q, k, v, do = (x[n].clone().requires_grad_(True) for n in ("q", "k", "v", "do"))
    o = attention(q, k, v, scale=scale, backend="triton")
    grads = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    inner = sum((g.float() * x[n].float()).sum() for g, n in zip(grads, ("gq", "gk", "gv")))
    bars = torch.autograd.grad(inner, (q, k, v, do))
    assert rel_err(o, o_ref) < tol
    for a, b in zip((*grads, *bars), (*grads_ref, *bars_ref)):
        assert rel_err(a, b) < tol


@pytest.mark.cuda
def test_cuda_auto_backend_is_triton(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(torch.randn(1, 1, 4, 64, device="cuda"), "auto") == "triton"


@pytest.mark.cuda
def test_cuda_memory_is_linear_in_sequence_length():
    # Peak memory of fwd + bwd + double bwd at N and 4N: linear growth means the 4N peak stays well
    # under the 16x a quadratic (attention-matrix) path would need.
    def peak(n):
        x = make_inputs(1, 4, n, n, 64, dtype=torch.bfloat16, device="cuda")
        q, k, v = (x[m].requires_grad_(True) for m in ("q", "k", "v"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        o = attention(q, k, v, backend="triton")
        grads = torch.autograd.grad(o, (q, k, v), x["do"], create_graph=True)
        torch.autograd.grad(sum((g.float() * x[m].float()).sum() for g, m in zip(grads, ("gq", "gk", "gv"))), (q, k, v))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, large = peak(1024), peak(4096)
    assert large < 6 * small, f"peak {small} B at N=1024, {large} B at N=4096"


# ------------------------------------------------------------------------------------------------
# No GPU needed: the kernels compile for sm_90 (H100/H200) with their GPU launch configurations
# ------------------------------------------------------------------------------------------------


def test_gpu_launch_configs_cover_every_supported_input():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for d in (1, 16, 24, 64, 65, 100, 128):
            for n in (1, 197, 256, 257, 1024, 4096, 100_000):
                for kernel in K.KERNELS:
                    cfg = K.launch_config(dtype, d, kernel, on_gpu=True, seq_len=n)
                    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_D"):
                        b = cfg[key]
                        assert b >= 16 and b & (b - 1) == 0, (dtype, d, kernel, cfg)  # tl.dot needs >= 16
                    assert cfg["BLOCK_D"] >= d and cfg["num_warps"] in (4, 8), (dtype, d, kernel, cfg)
                    assert cfg["num_stages"] >= 1, (dtype, d, kernel, cfg)
    with pytest.raises(ValueError, match="unknown kernel"):
        K.launch_config(torch.float32, 64, "bwd", on_gpu=True, seq_len=197)


def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter never compiles anything, so this is the CPU machine's only check that the
    # kernels lower to PTX/cubin (and fit shared memory) as a GPU would run them.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastebm.kernels.compile_check", "--arch", "90", "--dtypes", "bfloat16",
           "--head-dims", "64"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("ok")]
    # every product a warpgroup MMA (not "mixed"), and no register spills in bf16 d=64 (the ViT case)
    assert len(lines) == 5 and all(" wgmma " in line and " spill=0 B " in line for line in lines), out.stdout

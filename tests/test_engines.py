"""Engines of RestorationObjective (eager | func | explicit) give the eager engine's gradients.

The reference is the eager engine with math attention (``autograd.grad(create_graph=True)``), itself
checked against finite differences and an independent torch.func reference in test_restore.py.
Compiled runs use ``torch.compile`` with the ``aot_eager`` backend: Dynamo + AOTAutograd (where the
constructions of docs/design.md §4 go right or silently wrong, and where the custom ops' fake
implementations are exercised) without Inductor's C++ build, which takes minutes on 2 CPU cores.
One Inductor run is marked ``slow``; benchmarks/gpu_check.sh runs the engines with Inductor on a GPU.
"""
import warnings

import pytest
import torch

import fastebm
from fastebm.engines import CompiledFunction
from fastebm.models import EnergyViT

DEPTH = 2
# Triton kernels: CUDA tensors on a GPU machine, else the CPU interpreter (set up by conftest).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model(energy="sqnorm", attn_backend="math"):
    # Odd sizes: 12x8 images, 6 patches of 4x4, width 12, 2 heads of 6 dims.
    return EnergyViT(img_size=(12, 8), patch_size=4, in_chans=3, embed_dim=12, depth=DEPTH, num_heads=2,
                     mlp_ratio=2.0, energy=energy, attn_backend=attn_backend)


def perturb_(module):
    # Away from the init (norm gammas != 1, biases != 0) so that no term of the gradient vanishes.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def make_objective(engine, steps, grad_mode, dtype=torch.float64, attn_backend="math", **kw):
    obj = fastebm.RestorationObjective(tiny_model(attn_backend=attn_backend), steps=steps, grad_mode=grad_mode,
                                       alpha_init=0.7, engine=engine, **kw)
    return obj.to(dtype)


def batch(B=3, dtype=torch.float64, device="cpu"):
    clean = torch.randn(B, 3, 12, 8, dtype=dtype, device=device)
    corrupted = clean + 0.5 * torch.randn_like(clean)
    weight = (torch.rand(B, 1, 12, 8, dtype=dtype, device=device) > 0.4).to(dtype)
    weight[:, :, 0, 0] = 1.0
    return clean, corrupted, weight


def grads_of(obj, clean, corrupted, weight):
    obj.zero_grad(set_to_none=True)
    loss, stats = obj(clean, corrupted, weight)
    loss.backward()
    return loss.detach(), stats, {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
                                  for n, p in obj.named_parameters()}


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same_grads(obj, ref, tol, data=None):
    """Runs both objectives (same parameters) and compares loss and every parameter gradient."""
    obj.load_state_dict(ref.state_dict())
    p0 = next(ref.parameters())
    clean, corrupted, weight = data if data is not None else batch(dtype=p0.dtype, device=p0.device)
    l_ref, s_ref, g_ref = grads_of(ref, clean, corrupted, weight)
    l_got, s_got, g_got = grads_of(obj, clean, corrupted, weight)
    assert abs(l_got - l_ref) <= tol * abs(l_ref)
    torch.testing.assert_close(s_got["loss_t"], s_ref["loss_t"], rtol=tol, atol=0)
    torch.testing.assert_close(s_got["energy"], s_ref["energy"], rtol=tol, atol=0)
    assert g_ref["model.blocks.0.attn.qkv.weight"].abs().max() > 0  # the second-order path is alive
    for name, g in g_ref.items():
        err = rel_err(g_got[name], g)
        assert err < tol, (name, err)


# ----------------------------------------------------------------------------- explicit backward
@pytest.mark.parametrize("energy", ["sqnorm", "sqnorm_post", "linear"])
def test_explicit_energy_and_input_grad_equals_autograd(energy):
    model = tiny_model(energy).double()
    perturb_(model)
    x = torch.randn(3, 3, 12, 8, dtype=torch.float64, requires_grad=True)
    e_ref = model(x)
    (g_ref,) = torch.autograd.grad(e_ref.sum(), x, create_graph=True)
    e, g = model.energy_and_input_grad(x)
    torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-12)
    assert rel_err(g, g_ref) < 1e-12
    # the hand-written gradient is itself differentiable, to the same second-order parameter grads
    probe = torch.randn_like(g)
    params = [p for p in model.parameters()]
    want = torch.autograd.grad((g_ref * probe).sum(), params + [x], allow_unused=True)
    got = torch.autograd.grad((g * probe).sum(), params + [x], allow_unused=True)
    for (name, _), w, h in zip(list(model.named_parameters()) + [("x", x)], want, got):
        assert (w is None) == (h is None), name
        if w is not None:
            assert rel_err(h, w) < 1e-10, name


def test_explicit_grad_under_cpu_bf16_autocast():
    model = tiny_model()
    perturb_(model)
    x = torch.randn(3, 3, 12, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (g_ref,) = torch.autograd.grad(model(x).sum(), x)
        _, g = model.energy_and_input_grad(x)
    assert g.dtype == x.dtype
    assert rel_err(g, g_ref) < 3e-2


# ----------------------------------------------------------------------------- engines, uncompiled
@pytest.mark.parametrize("engine", ["func", "explicit"])
@pytest.mark.parametrize("grad_mode", ["exact", "truncated"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_engine_equals_eager_uncompiled_float64(engine, grad_mode, steps):
    ref = make_objective("eager", steps, grad_mode)
    perturb_(ref)
    obj = make_objective(engine, steps, grad_mode, compile=False)
    assert not obj.is_compiled
    assert_same_grads(obj, ref, 1e-10)


@pytest.mark.parametrize("engine", ["func", "explicit"])
def test_engine_equals_eager_uncompiled_float32(engine):
    ref = make_objective("eager", 2, "exact", dtype=torch.float32)
    perturb_(ref)
    obj = make_objective(engine, 2, "exact", dtype=torch.float32, compile=False)
    assert_same_grads(obj, ref, 1e-5)


# ----------------------------------------------------------------------------- engines, compiled
COMPILED_CASES = [(1, "exact"), (1, "truncated"), (2, "exact"), (2, "truncated")]


@pytest.mark.parametrize("steps, grad_mode", COMPILED_CASES)
@pytest.mark.parametrize("engine", ["func", "explicit"])
def test_compiled_engine_equals_eager(engine, steps, grad_mode, stage_calls):
    ref = make_objective("eager", steps, grad_mode)
    perturb_(ref)
    obj = make_objective(engine, steps, grad_mode, compile=True, compile_backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile fallback would warn: fail instead
        assert_same_grads(obj, ref, 1e-10)
    assert obj.is_compiled
    calls = {k: stage_calls[k] for k in ("attn_fwd", "attn_bwd", "attn_dbwd")}
    if engine == "explicit":
        # the custom ops really ran inside the compiled step: every step's forward + hand-written
        # backward (attn_fwd, attn_bwd), and the loss backward through the steps that keep a graph
        # (attn_fwd's derivative attn_bwd, attn_bwd's derivative attn_dbwd)
        graph_steps = steps if grad_mode == "exact" else 1
        assert calls == {"attn_fwd": DEPTH * steps, "attn_bwd": DEPTH * (steps + graph_steps),
                         "attn_dbwd": DEPTH * graph_steps}
    else:
        assert calls == {"attn_fwd": 0, "attn_bwd": 0, "attn_dbwd": 0}


def test_compiled_explicit_with_triton_kernels_equals_eager_math():
    # The explicit engine's custom ops backed by the real Triton kernels (CPU interpreter), compiled.
    ref = make_objective("eager", 2, "exact").to(TRITON_DEVICE)
    perturb_(ref)
    obj = make_objective("explicit", 2, "exact", attn_backend="triton", compile=True, compile_backend="aot_eager")
    assert_same_grads(obj.to(TRITON_DEVICE), ref, 1e-10)
    assert obj.is_compiled


@pytest.mark.slow
def test_inductor_explicit_float32_equals_eager(stage_calls):
    # Inductor's CPU build takes minutes on 2 cores: marked slow (gpu_check.sh runs it on a GPU).
    ref = make_objective("eager", 1, "exact", dtype=torch.float32)
    perturb_(ref)
    obj = make_objective("explicit", 1, "exact", dtype=torch.float32, compile=True)
    before = stage_calls["attn_dbwd"]
    assert_same_grads(obj, ref, 1e-5)
    assert obj.is_compiled and stage_calls["attn_dbwd"] > before


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ["func", "explicit"])
@pytest.mark.parametrize("steps, grad_mode", [(1, "exact"), (2, "truncated")])
def test_cuda_inductor_engine_equals_eager_float32(engine, steps, grad_mode):
    # On a GPU: Inductor + (for explicit) the compiled Triton kernels inside the custom ops.
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = make_objective("eager", steps, grad_mode, dtype=torch.float32).cuda()
    perturb_(ref)
    obj = make_objective(engine, steps, grad_mode, dtype=torch.float32, compile=True,
                         attn_backend="auto" if engine == "explicit" else "math").cuda()
    assert_same_grads(obj, ref, 1e-4)
    assert obj.is_compiled


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ["eager", "explicit"])
def test_cuda_bf16_autocast_engine_close_to_fp32_eager(engine):
    ref = make_objective("eager", 1, "exact", dtype=torch.float32).cuda()
    perturb_(ref)
    obj = make_objective(engine, 1, "exact", dtype=torch.float32, compile=engine != "eager",
                         attn_backend="math" if engine == "func" else "auto").cuda()
    obj.load_state_dict(ref.state_dict())
    clean, corrupted, weight = batch(B=4, dtype=torch.float32, device="cuda")
    _, _, g_ref = grads_of(ref, clean, corrupted, weight)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = obj(clean, corrupted, weight)
    loss.backward()
    err = rel_err(obj.model.blocks[0].attn.qkv.weight.grad, g_ref["model.blocks.0.attn.qkv.weight"])
    assert err < 5e-2, err


# ----------------------------------------------------------------------------- refusals, fallbacks
def test_func_engine_refuses_fused_attention():
    with pytest.raises(ValueError, match="engine='explicit'.*attn_backend='math'"):
        fastebm.RestorationObjective(tiny_model(attn_backend="triton"), engine="func")


def test_func_engine_refuses_fused_attention_chosen_by_environment(monkeypatch, stage_calls):
    obj = make_objective("func", 1, "exact", attn_backend="auto", compile=False)
    clean, corrupted, weight = batch()
    obj(clean, corrupted, weight)  # auto -> math on CPU: allowed
    monkeypatch.setenv("FASTEBM_ATTENTION_BACKEND", "triton")
    with pytest.raises(ValueError, match="silently wrong"):
        obj(clean, corrupted, weight)
    # the explicit engine takes the fused kernels through its custom ops instead
    explicit = make_objective("explicit", 1, "exact", attn_backend="auto", compile=False).to(TRITON_DEVICE)
    before = stage_calls["attn_fwd"]
    explicit(*(t.to(TRITON_DEVICE) for t in (clean, corrupted, weight)))
    assert stage_calls["attn_fwd"] == before + DEPTH


def test_explicit_engine_needs_a_hand_written_gradient():
    class Quadratic(torch.nn.Module):
        def forward(self, x):
            return 0.5 * x.pow(2).flatten(1).sum(1)

    with pytest.raises(ValueError, match="energy_and_input_grad"):
        fastebm.RestorationObjective(Quadratic(), engine="explicit")


def test_compile_failure_falls_back_with_one_warning():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C compiler found (simulated)")

    ref = make_objective("eager", 1, "exact")
    perturb_(ref)
    obj = make_objective("explicit", 1, "exact", compile=True, compile_backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="running it uncompiled") as record:
        assert_same_grads(obj, ref, 1e-10)
    assert len([w for w in record if "uncompiled" in str(w.message)]) == 1
    assert "no C compiler" in obj._restoration.fallback_reason and not obj.is_compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj(*batch())  # later calls: no new warning


def test_genuine_errors_are_not_mistaken_for_compile_failures():
    obj = make_objective("explicit", 1, "exact", compile=True, compile_backend="aot_eager")
    clean, corrupted, weight = batch()
    with pytest.raises(ValueError, match="12x8 images"):
        obj(clean[..., :4], corrupted[..., :4], weight[..., :4])


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory (simulated)"),
    RuntimeError("an illegal memory access was encountered (simulated kernel error)"),
    ValueError("bad input found while the step runs (simulated)"),
], ids=["oom", "kernel-error", "value-error"])
def test_run_time_errors_of_a_compiled_step_propagate(error):
    # Raised while the compiled code runs (not while compiling): no fallback, no re-run, no warning,
    # even when running the step again would succeed (a transient OOM).
    runs = []

    @torch._dynamo.disable  # runs eagerly between the compiled graphs, i.e. at run time
    def fails_once(x):
        runs.append(1)
        if len(runs) == 1:
            raise error
        return x

    def step(x):
        return fails_once(x * 2) + 1

    fn = CompiledFunction(step, name="test step", backend="aot_eager")
    x = torch.randn(5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error)) as info:
            fn(x)
        assert info.value is error and len(runs) == 1
        assert fn.is_compiled and fn.fallback_reason is None
        torch.testing.assert_close(fn(x), 2 * x + 1, rtol=0, atol=0)  # still the compiled path
    assert len(runs) == 2


def test_compilation_failure_of_a_step_falls_back_with_one_warning():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("Inductor could not find a C++ compiler (simulated)")

    fn = CompiledFunction(lambda x: x.sin() * 3, name="test step", backend=broken_backend)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="running it uncompiled") as record:
        out = fn(x)
    assert len(record) == 1 and "C++ compiler" in str(record[0].message)
    torch.testing.assert_close(out, x.sin() * 3, rtol=0, atol=0)
    assert not fn.is_compiled and "BackendCompilerFailed" in fn.fallback_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fn(x), x.sin() * 3, rtol=0, atol=0)


def test_an_error_found_while_tracing_is_raised_as_the_step_own_error():
    # A shape bug surfaces first as Dynamo's TorchRuntimeError (a compile-time error type); the
    # uncompiled re-run then raises the step's own error, which is what the caller sees.
    fn = CompiledFunction(lambda x: x @ torch.ones(5, 2), name="test step", backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="cannot be multiplied") as info:
            fn(torch.randn(3, 4))
    assert not isinstance(info.value, torch._dynamo.exc.TorchDynamoException)
    assert fn.is_compiled


def test_compile_opt_out(monkeypatch):
    monkeypatch.setenv("FASTEBM_COMPILE", "0")
    assert not make_objective("explicit", 1, "exact").is_compiled
    assert make_objective("explicit", 1, "exact", compile=True).is_compiled
    monkeypatch.delenv("FASTEBM_COMPILE")
    assert make_objective("func", 1, "exact").is_compiled
    assert not make_objective("eager", 1, "exact", compile=True).is_compiled  # eager is never compiled


def test_explicit_restore_matches_eager_restore():
    ref = make_objective("eager", 3, "exact")
    perturb_(ref)
    obj = make_objective("explicit", 3, "exact", compile=False)
    obj.load_state_dict(ref.state_dict())
    _, corrupted, _ = batch()
    for a, b in zip(obj.restore(corrupted), ref.restore(corrupted)):
        assert not a.requires_grad
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in obj.parameters())


def test_deepcopy_of_compiled_objective_uses_its_own_parameters():
    import copy

    obj = make_objective("explicit", 1, "exact", compile=True, compile_backend="aot_eager")
    twin = copy.deepcopy(obj)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    data = batch()
    loss_obj, st_obj = obj(*data)
    loss_twin, st_twin = twin(*data)
    ref = make_objective("eager", 1, "exact")
    ref.load_state_dict(twin.state_dict())
    loss_ref, _ = ref(*data)
    torch.testing.assert_close(loss_twin, loss_ref, rtol=1e-10, atol=0)
    # the parameters matter: x1.5 moves the energy by >= 5 (the loss itself can land within 1e-6 ~1 run in 3,000)
    assert (st_obj["energy"] - st_twin["energy"]).abs().max() > 1e-3

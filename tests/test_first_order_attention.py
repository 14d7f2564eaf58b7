"""First-order attention (docs/design.md §4): where no double backward is needed, ``auto`` attention
runs a first-order kernel (PyTorch SDPA, xformers), and nowhere else.

Checked: a first-order-only backend refuses a ``create_graph=True`` backward and a declared order 2
with an error naming it; ``restore()``, the no-graph truncated steps, gradient-checkpoint
recomputation and feature extraction pick a first-order kernel and give the math path's numbers
(float64: SDPA runs float64 on CPU); exact steps and training never pick one; the xformers backend
is registered when installed and chosen only where it can run. Which backend ran is observed by
wrapping the registry's backend functions (the ``backend_calls`` fixture), not by counters in
fastebm.
"""
import dataclasses
import importlib

import numpy as np
import pytest
import torch

import fastebm
from fastebm.models import EnergyViT
from fastebm.ops import attention, attention_order, available_backends, first_order_attention, resolve_backend
from fastebm.ops import attention_first_order as fo
from fastebm.ops import attention_registry as registry

attention_module = importlib.import_module("fastebm.ops.attention")  # the name alone is the function
DEPTH = 2


@pytest.fixture
def backend_calls(monkeypatch):
    """The names of the attention backends whose ``fn`` ran, in call order (forward calls, and the
    recomputations of gradient checkpointing)."""
    available_backends(order=1)  # registers the lazy backends first, so they are wrapped too
    calls = []
    for name, backend in list(registry._BACKENDS.items()):
        def spy(q, k, v, scale, _fn=backend.fn, _name=name):
            calls.append(_name)
            return _fn(q, k, v, scale)

        monkeypatch.setitem(registry._BACKENDS, name, dataclasses.replace(backend, fn=spy))
    return calls


def ref_attention(q, k, v, scale):
    # Written here from the definition, not taken from fastebm.
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def qkv(dtype=torch.float64, requires_grad=True):
    B, H, Nq, Nk, d = 2, 3, 5, 7, 6  # odd sizes, Nq != Nk
    shapes = ((B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, d))
    return [torch.randn(*s, dtype=dtype).requires_grad_(requires_grad) for s in shapes]


def tiny_objective(engine="eager", steps=2, grad_mode="exact", attn_backend="auto", checkpointing=False):
    # Non-square image, 6 patches, 2 heads of 6 dims; parameters moved off their init.
    model = EnergyViT(img_size=(12, 8), patch_size=4, in_chans=3, embed_dim=12, depth=DEPTH, num_heads=2,
                      mlp_ratio=2.0, attn_backend=attn_backend)
    model.set_grad_checkpointing(checkpointing)
    kw = {} if engine == "eager" else {"compile": False}
    obj = fastebm.RestorationObjective(model, steps=steps, grad_mode=grad_mode, alpha_init=0.7, engine=engine, **kw)
    obj = obj.double()
    with torch.no_grad():
        for p in obj.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return obj


def twin(obj, attn_backend):
    """``obj`` with the same parameters and another attention backend."""
    other = tiny_objective(obj.engine, obj.steps, obj.grad_mode, attn_backend, obj.model.grad_checkpointing)
    other.load_state_dict(obj.state_dict())
    return other


def batch(B=3):
    clean = torch.randn(B, 3, 12, 8, dtype=torch.float64)
    corrupted = clean + 0.5 * torch.randn_like(clean)
    weight = (torch.rand(B, 1, 12, 8, dtype=torch.float64) > 0.4).double()
    weight[:, :, 0, 0] = 1.0
    return clean, corrupted, weight


def loss_and_grads(obj, data):
    obj.zero_grad(set_to_none=True)
    loss, stats = obj(*data)
    loss.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in obj.named_parameters()}
    return loss.detach(), stats, grads


def assert_close(a, b, tol=1e-11):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# (1) A first-order-only backend never gives a second derivative
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_sdpa_first_order_matches_reference_and_refuses_create_graph():
    q, k, v = qkv()
    o = attention(q, k, v, backend="sdpa")
    ref = ref_attention(q, k, v, 6 ** -0.5)
    assert_close(o, ref)
    upstream = torch.randn_like(o)
    for g, g_ref in zip(torch.autograd.grad(o, (q, k, v), upstream),
                        torch.autograd.grad(ref, (q, k, v), upstream)):
        assert_close(g, g_ref)

    with pytest.raises(RuntimeError, match="attention backend 'sdpa' is first-order only"):
        torch.autograd.grad(attention(q, k, v, backend="sdpa").pow(2).sum(), q, create_graph=True)
    o = attention(q, k, v, backend="sdpa")
    with pytest.raises(RuntimeError, match="'sdpa'.*Use backend/attn_backend 'auto', 'triton' or 'math'"):
        torch.autograd.grad(o, (q, k, v), upstream, create_graph=True)  # the output itself as the root
    with pytest.raises(RuntimeError, match="'sdpa' is first-order only"):
        attention(q, k, v, backend="sdpa").sum().backward(create_graph=True)


def test_every_max_order_1_registration_is_guarded(monkeypatch):
    # The math function itself is twice differentiable: the refusal comes from the registration.
    monkeypatch.setitem(registry._BACKENDS, "probe", None)  # so that monkeypatch removes it afterwards
    registry.register_backend("probe", attention_module.math_attention, max_order=1)
    q, k, v = qkv()
    (g,) = torch.autograd.grad(attention(q, k, v, backend="probe").sum(), q)
    (g_ref,) = torch.autograd.grad(ref_attention(q, k, v, 6 ** -0.5).sum(), q)
    assert_close(g, g_ref)
    with pytest.raises(RuntimeError, match="attention backend 'probe' is first-order only"):
        torch.autograd.grad(attention(q, k, v, backend="probe").sum(), q, create_graph=True)
    assert "probe" in available_backends(order=1) and "probe" not in available_backends()
    with pytest.raises(ValueError, match="max_order must be 1"):
        registry.register_backend("probe", attention_module.math_attention, max_order=3)


def test_declared_order_2_refuses_a_first_order_backend_before_running(backend_calls, monkeypatch):
    q, k, v = qkv()
    with attention_order(2), pytest.raises(ValueError, match="attention backend 'sdpa' is first-order only"):
        attention(q, k, v, backend="sdpa")
    with pytest.raises(ValueError, match="'sdpa' is first-order only"):
        attention(q, k, v, backend="sdpa", order=2)
    monkeypatch.setenv(registry.ENV_VAR, "sdpa")
    with attention_order(2), pytest.raises(ValueError, match="unset FASTEBM_ATTENTION_BACKEND if it names 'sdpa'"):
        attention(q, k, v)
    assert backend_calls == []
    with pytest.raises(ValueError, match="attention order must be 1"):
        with attention_order(3):
            pass


def test_auto_resolution_by_declared_order(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    q = torch.randn(1, 2, 3, 16)
    assert resolve_backend(q) == "math"  # undeclared: today's choice (CPU: math)
    with first_order_attention():
        assert resolve_backend(q) == "sdpa"
        assert resolve_backend(q, "math") == "math"  # a named backend is honoured
        with attention_order(2):
            assert resolve_backend(q) == "math"  # the innermost declaration wins
        with attention_order(None):
            assert resolve_backend(q) == "math"
        assert resolve_backend(q) == "sdpa"
        assert resolve_backend(q, order=2) == "math"  # an explicit order beats the context
    assert resolve_backend(q) == "math" and resolve_backend(q, order=1) == "sdpa"
    assert resolve_backend(q.int(), order=1) == "math"  # SDPA needs floats: the fallback
    monkeypatch.setenv(registry.ENV_VAR, "math")
    with first_order_attention():
        assert resolve_backend(q) == "math"  # the environment variable forces auto in every order


# ------------------------------------------------------------------------------------------------
# (2) restore(), no-graph truncated steps, checkpoint recomputation, features: first order, same numbers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["eager", "func", "explicit"])
def test_restore_runs_first_order_kernels_and_matches_math(engine, backend_calls):
    obj = tiny_objective(engine, steps=3)
    ref = twin(obj, "math")
    _, corrupted, _ = batch()
    expected = ref.restore(corrupted)
    assert set(backend_calls) == {"math"}
    backend_calls.clear()
    got = obj.restore(corrupted)
    assert backend_calls == ["sdpa"] * (3 * DEPTH)
    assert len(got) == 4 and all(not x.requires_grad for x in got)
    for a, b in zip(got, expected):
        assert_close(a, b)
    assert (got[-1] - got[0]).abs().max() > 1e-3  # the steps really moved the images
    assert all(p.grad is None for p in obj.parameters())


def test_restore_with_a_model_named_first_order(backend_calls):
    obj = tiny_objective(attn_backend="sdpa")
    _, corrupted, _ = batch()
    got = obj.restore(corrupted)
    assert set(backend_calls) == {"sdpa"}
    for a, b in zip(got, twin(obj, "math").restore(corrupted)):
        assert_close(a, b)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_truncated_no_graph_steps_run_first_order_and_match_math(checkpointing, backend_calls):
    steps = 3
    obj = tiny_objective(steps=steps, grad_mode="truncated", checkpointing=checkpointing)
    data = batch()
    loss_ref, stats_ref, grads_ref = loss_and_grads(twin(obj, "math"), data)
    backend_calls.clear()
    loss, stats, grads = loss_and_grads(obj, data)
    # Steps 0..T-2: SDPA in the forward (and, checkpointed, in its recomputation by the no-graph
    # backward); the last step keeps its graph: math (recomputed by both backwards when checkpointed).
    first = DEPTH * (2 if checkpointing else 1) * (steps - 1)
    assert backend_calls[:first] == ["sdpa"] * first
    last = backend_calls[first:]
    assert set(last) == {"math"} and len(last) == DEPTH * (3 if checkpointing else 1)
    assert_close(loss, loss_ref)
    for key in stats_ref:
        assert_close(stats[key], stats_ref[key])
    for name, g in grads_ref.items():
        assert_close(grads[name], g, tol=1e-10)
    assert grads["alpha_logits"].abs().min() > 0  # every step's size is learned


def test_checkpoint_recomputation_keeps_the_forward_backend(backend_calls):
    # The backward runs after the first-order context has closed (as on a CUDA autograd thread, where
    # it was never open): the recomputed blocks must still use SDPA, not auto's second-order choice.
    obj = tiny_objective(checkpointing=True)
    x = batch()[1].requires_grad_(True)
    with first_order_attention():
        energy = obj.model(x)
    assert backend_calls == ["sdpa"] * DEPTH
    (grad,) = torch.autograd.grad(energy.sum(), x)
    assert backend_calls == ["sdpa"] * (2 * DEPTH)
    ref_energy, ref_grad = twin(obj, "math").energy_and_grad(x.detach(), create_graph=False)
    assert_close(energy.detach(), ref_energy.detach())
    assert_close(grad, ref_grad)


def test_feature_extraction_runs_first_order(backend_calls):
    from fastebm.eval.linprobe import extract_features

    obj = tiny_objective()
    model, math_model = obj.model.float(), twin(obj, "math").model.float()  # features are float32
    images = torch.randint(0, 256, (5, 3, 12, 8), dtype=torch.uint8)
    feats = extract_features(model, images, batch_size=2)
    assert backend_calls == ["sdpa"] * (3 * DEPTH)  # 3 batches
    expected = extract_features(math_model, images, batch_size=2)
    assert set(backend_calls[3 * DEPTH:]) == {"math"}
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# (3) Exact steps and training never pick a first-order backend
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_mode", ["exact", "truncated"])
def test_training_steps_never_pick_first_order_even_inside_a_first_order_context(grad_mode, backend_calls):
    obj = tiny_objective(steps=2, grad_mode=grad_mode)
    opt = torch.optim.SGD(obj.parameters(), lr=1e-2)
    data = batch()
    with first_order_attention():  # e.g. a training step called from evaluation code by mistake
        loss, _, grads = loss_and_grads(obj, data)
    graph_steps = 2 if grad_mode == "exact" else 1
    assert backend_calls[-graph_steps * DEPTH:] == ["math"] * (graph_steps * DEPTH)
    assert backend_calls.count("sdpa") == (2 - graph_steps) * DEPTH
    opt.step()
    _, _, grads_ref = loss_and_grads(twin(obj, "math"), data)  # parameters after the step: fresh check
    _, _, grads_now = loss_and_grads(obj, data)
    for name, g in grads_ref.items():
        assert_close(grads_now[name], g, tol=1e-10)


@pytest.mark.parametrize("engine", ["func", "explicit"])
def test_compiled_engines_keep_their_attention_inside_a_first_order_context(engine, backend_calls):
    obj = tiny_objective(engine, steps=2, grad_mode="truncated")
    ref = tiny_objective("eager", steps=2, grad_mode="truncated", attn_backend="math")
    ref.load_state_dict(obj.state_dict())
    data = batch()
    loss_ref, _, grads_ref = loss_and_grads(ref, data)
    backend_calls.clear()
    with first_order_attention():
        loss, _, grads = loss_and_grads(obj, data)
    # func traces math attention; explicit runs the fastebm::attn_* custom ops, not the registry's fns
    assert backend_calls == (["math"] * (2 * DEPTH) if engine == "func" else [])
    assert_close(loss, loss_ref)
    for name, g in grads_ref.items():
        assert_close(grads[name], g, tol=1e-10)


@pytest.mark.parametrize("grad_mode", ["exact", "truncated"])
@pytest.mark.parametrize("engine", ["eager", "explicit"])
def test_a_model_named_first_order_is_refused_before_any_step(engine, grad_mode, backend_calls, stage_calls):
    obj = tiny_objective(engine, grad_mode=grad_mode, attn_backend="sdpa")
    with pytest.raises(ValueError, match="attention backend 'sdpa' is first-order only"):
        obj(*batch())
    assert backend_calls == [] and sum(stage_calls.values()) == 0


def test_env_var_forcing_a_first_order_backend_is_refused_for_training(monkeypatch, backend_calls):
    monkeypatch.setenv(registry.ENV_VAR, "sdpa")
    obj = tiny_objective()
    with pytest.raises(ValueError, match="unset FASTEBM_ATTENTION_BACKEND"):
        obj(*batch())
    assert backend_calls == []
    obj.restore(batch()[1])  # restoration needs no double backward: the forced backend is fine there
    assert set(backend_calls) == {"sdpa"}


# ------------------------------------------------------------------------------------------------
# (4) xformers: registered when installed, chosen only where it runs
# ------------------------------------------------------------------------------------------------


def test_xformers_is_registered_exactly_when_installed(monkeypatch):
    names = available_backends(order=1)
    assert ("xformers" in names) == fo.xformers_installed()
    assert "xformers" not in available_backends(order=2)
    monkeypatch.setattr(attention_module, "xformers_installed", lambda: False)
    with pytest.raises(ImportError, match="pip install 'fastebm\\[xformers\\]'"):
        attention_module._load_xformers_backend()
    monkeypatch.setattr(attention_module, "xformers_installed", lambda: True)
    assert attention_module._load_xformers_backend() == (fo.xformers_attention, fo.xformers_supports)


def test_xformers_supports_only_cuda_half_and_single_precision():
    assert fo.xformers_fits("cuda", torch.float16, 64)
    assert fo.xformers_fits("cuda", torch.bfloat16, 1)
    assert fo.xformers_fits("cuda", torch.float32, 256)
    assert not fo.xformers_fits("cuda", torch.float64, 64)
    assert not fo.xformers_fits("cuda", torch.float32, 257)
    assert not fo.xformers_fits("cpu", torch.float32, 64)  # no CPU kernel in xformers
    assert not fo.xformers_supports(torch.randn(1, 2, 3, 64))
    with first_order_attention():
        assert resolve_backend(torch.randn(1, 2, 3, 64)) == "sdpa"  # installed or not: never on CPU
    installed = "xformers" in available_backends(order=1)
    message = "xformers needs CUDA" if installed else "unknown attention backend 'xformers'"
    with pytest.raises(ValueError, match=message):
        resolve_backend(torch.randn(1, 2, 3, 64), "xformers")


def test_first_order_preference_puts_xformers_first_where_it_runs(monkeypatch):
    math_fn = registry._BACKENDS["math"].fn
    for runs in (True, False):
        monkeypatch.setitem(registry._BACKENDS, "xformers",
                            registry.AttentionBackend("xformers", math_fn, lambda q, r=runs: r, max_order=1))
        with first_order_attention():
            assert resolve_backend(torch.randn(1, 2, 3, 8)) == ("xformers" if runs else "sdpa")
        assert resolve_backend(torch.randn(1, 2, 3, 8)) == "math"  # never outside first order


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_cuda_first_order_backends_match_float64_math(dtype, tol):
    q, k, v = (torch.randn(2, 3, n, 64, device="cuda", dtype=dtype, requires_grad=True) for n in (197, 131, 131))
    names = [n for n in available_backends(order=1) if registry._BACKENDS[n].max_order == 1]
    with first_order_attention():
        assert resolve_backend(q) == ("xformers" if fo.xformers_installed() else "sdpa")
    upstream = torch.randn(2, 3, 197, 64, device="cuda", dtype=torch.float64)
    ref = ref_attention(q.double(), k.double(), v.double(), 0.125)
    ref_grads = torch.autograd.grad(ref, (q, k, v), upstream)
    for name in names:
        o = attention(q, k, v, backend=name)
        assert ((o.double() - ref).norm() / ref.norm()) < tol, name
        for g, r in zip(torch.autograd.grad(o, (q, k, v), upstream.to(dtype)), ref_grads):
            assert ((g.double() - r).norm() / r.norm()) < tol, name
        with pytest.raises(RuntimeError, match=f"'{name}' is first-order only"):
            torch.autograd.grad(attention(q, k, v, backend=name).float().sum(), q, create_graph=True)

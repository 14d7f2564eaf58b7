"""EnergyViT: presets, timm compatibility, energy heads, input validation, and each layer's
hand-written input gradient against autograd."""
import pytest
import torch

import fastebm
from fastebm.energy import build_energy_head
from fastebm.models import PRESETS, TIMM_NAMES
from fastebm.models.layers import Attention, Block, Mlp, PatchEmbed


def test_presets_build_with_expected_sizes():
    expected = {  # timm's widths / depths / heads
        "vit_tiny_patch16": (192, 12, 3), "vit_small_patch16": (384, 12, 6),
        "vit_base_patch16": (768, 12, 12), "vit_large_patch16": (1024, 24, 16),
    }
    for name, (dim, depth, heads) in expected.items():
        cfg = PRESETS[name]
        assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["patch_size"]) == (dim, depth, heads, 16)
    m = fastebm.create_model("vit_demo")
    assert m.img_size == (32, 32) and m.patch_size == 4


@pytest.mark.parametrize("size", [(48, 80), 64])
def test_any_image_size_divisible_by_patch(size):
    m = fastebm.create_model("vit_tiny_patch16", img_size=size, depth=1)
    hw = size if isinstance(size, tuple) else (size, size)
    x = torch.randn(3, 3, *hw)
    e = m(x)
    assert e.shape == (3,) and torch.isfinite(e).all()
    assert m.forward_features(x).shape == (3, 1 + (hw[0] // 16) * (hw[1] // 16), 192)


def test_backbone_loads_into_timm_strictly_and_gives_same_features():
    timm = pytest.importorskip("timm")  # timm is a declared test dependency: present in CI
    m = fastebm.create_model("vit_tiny_patch16").eval()
    with torch.no_grad():  # move every weight away from init so the comparison is meaningful
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref = timm.create_model(TIMM_NAMES["vit_tiny_patch16"], num_classes=0, pretrained=False).eval()
    sd = m.backbone_state_dict()
    assert not any(k.startswith("energy_head") for k in sd)
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(m.forward_features(x), ref.forward_features(x), rtol=1e-4, atol=1e-4)


def test_linear_energy_head_is_training_only():
    m = fastebm.create_model("vit_demo", depth=1, energy="linear")
    assert any(k.startswith("energy_head.") for k in m.state_dict())
    assert not any(k.startswith("energy_head.") for k in m.backbone_state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2,)


@pytest.mark.parametrize("energy", ["sqnorm", "sqnorm_post", "linear"])
def test_energy_definitions(energy):
    m = fastebm.create_model("vit_demo", depth=1, energy=energy).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    h = m.forward_tokens(x)
    if energy == "sqnorm":
        expected = 0.5 * (h ** 2).sum(-1).mean(-1)
    elif energy == "sqnorm_post":
        expected = 0.5 * (m.norm(h) ** 2).sum(-1).mean(-1)
    else:
        w, b = m.energy_head.proj.weight, m.energy_head.proj.bias
        expected = (m.norm(h).mean(1) @ w.T + b).squeeze(-1)
    torch.testing.assert_close(m(x), expected)


def test_grad_checkpointing_keeps_second_order_gradients():
    def grads(checkpointing):
        torch.manual_seed(3)
        m = fastebm.create_model("vit_demo", depth=2, embed_dim=32, num_heads=2).double()
        m.set_grad_checkpointing(checkpointing)
        obj = fastebm.RestorationObjective(m, steps=2)
        torch.manual_seed(4)
        clean = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        loss, _ = obj(clean, clean + torch.randn_like(clean), torch.ones(2, 1, 32, 32, dtype=torch.float64))
        loss.backward()
        return {n: p.grad for n, p in obj.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("build, match", [
    (lambda: fastebm.create_model("vit_demo", img_size=30), "divisible by patch_size"),
    (lambda: fastebm.create_model("vit_gigantic"), "unknown model"),
    (lambda: fastebm.create_model("vit_demo", energy="cosine"), "unknown energy"),
    (lambda: fastebm.create_model("vit_demo", embed_dim=130, num_heads=4), "divisible by num_heads"),
])
def test_bad_configuration_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("shape, match", [
    ((3, 32, 32), "4-D"),
    ((2, 1, 32, 32), "channels"),
    ((2, 3, 64, 64), "built for 32x32"),
])
def test_bad_input_errors(shape, match):
    m = fastebm.create_model("vit_demo", depth=1)
    with pytest.raises(ValueError, match=match):
        m(torch.randn(*shape))


def test_fused_backend_on_unsupported_tensors_is_a_clear_error():
    # head dim 160 is beyond the fused kernels' limit (128) on any machine
    q = torch.randn(1, 1, 5, 160)
    with pytest.raises(ValueError, match="backend='math'"):
        fastebm.ops.attention(q, q, q, backend="triton")
    assert fastebm.ops.attention(q, q, q, backend="auto").shape == q.shape


# ---------------------------------------------------------------------------------------------------
# Each layer's hand-written input gradient (forward_with_cache / input_grad, the explicit engine's
# pieces) against torch.autograd of the same layer's forward, in float64 with random weights
# ---------------------------------------------------------------------------------------------------
def _perturbed(module):
    with torch.no_grad():  # away from the init (gammas != 1, biases != 0): no term of the gradient vanishes
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.double()


# Odd sizes: 7 tokens of width 10, 2 heads of 5 dims, MLP hidden 17, 12x8 images of 4x4 patches.
LAYERS = {
    "patch_embed": (lambda: PatchEmbed((12, 8), 4, 3, 10), (2, 3, 12, 8)),
    "attention": (lambda: Attention(10, 2, backend="math"), (2, 7, 10)),
    "mlp": (lambda: Mlp(10, 17), (2, 7, 10)),
    "block": (lambda: Block(10, 2, 1.7, backend="math"), (2, 7, 10)),
}


def _explicit(name, layer, x, g):
    """(output, dE/dx) of ``layer`` by its hand-written pair, for upstream gradient ``g``."""
    if name == "patch_embed":
        return layer(x), layer.input_grad(g)
    if name == "mlp":
        out, u = layer.forward_with_cache(x)
        return out, layer.input_grad(g, u)
    out, cache = layer.forward_with_cache(x, "math")
    return out, layer.input_grad(g, cache, "math")


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_input_grad_equals_autograd_float64(name):
    build, shape = LAYERS[name]
    layer = _perturbed(build())
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out_ref = layer(x)
    g = torch.randn_like(out_ref)
    (want,) = torch.autograd.grad(out_ref, x, g, create_graph=True)
    out, got = _explicit(name, layer, x, g)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    assert _rel(got, want) < 1e-12
    # the hand-written gradient is differentiable, to autograd's second-order gradients
    probe = torch.randn_like(got)
    wrt = list(layer.parameters()) + [x]
    second_want = torch.autograd.grad((want * probe).sum(), wrt, allow_unused=True)
    second_got = torch.autograd.grad((got * probe).sum(), wrt, allow_unused=True)
    for i, (w, h) in enumerate(zip(second_want, second_got)):
        assert (w is None) == (h is None), i
        if w is not None:
            assert _rel(h, w) < 1e-10, i


@pytest.mark.parametrize("energy", ["sqnorm", "sqnorm_post", "linear"])
def test_energy_head_grad_equals_autograd_float64(energy):
    head = _perturbed(build_energy_head(energy, 10))
    norm = _perturbed(torch.nn.LayerNorm(10, eps=1e-6))
    h = torch.randn(3, 7, 10, dtype=torch.float64, requires_grad=True)
    e_ref = head(h, norm)
    (want,) = torch.autograd.grad(e_ref.sum(), h)
    e, got = head.energy_and_grad(h, norm)
    torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-12)
    assert _rel(got, want) < 1e-12


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()

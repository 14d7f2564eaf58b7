"""RestorationObjective: second-order parameter gradients checked three independent ways."""
import pytest
import torch

import fastebm
from fastebm.models import EnergyViT
from reference_vit import energy as ref_energy, reference_grads


def tiny_objective(steps, grad_mode, dtype=torch.float64, **kw):
    # Odd sizes on purpose: non-square image, 6 patches, 2 heads of 6 dims.
    model = EnergyViT(img_size=(12, 8), patch_size=4, in_chans=3, embed_dim=12, depth=2, num_heads=2,
                      mlp_ratio=2.0, attn_backend="math")
    obj = fastebm.RestorationObjective(model, steps=steps, grad_mode=grad_mode, alpha_init=0.7, **kw)
    obj = obj.to(dtype)
    # Perturb every parameter away from its init (norm gammas != 1, biases != 0) so no term vanishes.
    with torch.no_grad():
        for p in obj.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return obj


def batch(B=3, dtype=torch.float64):
    clean = torch.randn(B, 3, 12, 8, dtype=dtype)
    corrupted = clean + 0.5 * torch.randn_like(clean)
    weight = (torch.rand(B, 1, 12, 8, dtype=dtype) > 0.4).to(dtype)
    weight[:, :, 0, 0] = 1.0  # never an all-zero weight
    return clean, corrupted, weight


def param_grads(obj, clean, corrupted, weight):
    obj.zero_grad(set_to_none=True)
    loss, _ = obj(clean, corrupted, weight)
    loss.backward()
    # Parameters the energy does not use (the final norm, for the pre-norm energy) get no gradient.
    return loss.detach(), {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
                           for n, p in obj.named_parameters()}


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("steps", [1, 2])
def test_exact_grads_match_finite_difference(steps):
    obj = tiny_objective(steps, "exact")
    clean, corrupted, weight = batch()
    _, grads = param_grads(obj, clean, corrupted, weight)
    params = dict(obj.named_parameters())
    for trial in range(2):
        direction = {n: torch.randn_like(p) for n, p in params.items()}
        analytic = sum((grads[n] * direction[n]).sum() for n in params)
        eps = 1e-6
        with torch.no_grad():
            for n, p in params.items():
                p.add_(eps * direction[n])
        lp, _ = obj(clean, corrupted, weight)
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(2 * eps * direction[n])
        lm, _ = obj(clean, corrupted, weight)
        with torch.no_grad():
            for n, p in params.items():
                p.add_(eps * direction[n])
        numeric = (lp.detach() - lm.detach()) / (2 * eps)
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (trial, numeric, analytic)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("grad_mode", ["exact", "truncated"])
def test_grads_match_independent_torch_func_reference(steps, grad_mode):
    obj = tiny_objective(steps, grad_mode)
    clean, corrupted, weight = batch()
    _, grads = param_grads(obj, clean, corrupted, weight)
    ref_p, ref_alpha = reference_grads(obj, clean, corrupted, weight)
    for name, g in ref_p.items():
        assert rel_err(grads["model." + name], g) < 1e-10, name
    assert rel_err(grads["alpha_logits"], ref_alpha) < 1e-10
    # step sizes really learn: every step's logit gets a non-zero gradient
    assert (grads["alpha_logits"].abs() > 0).all()


def test_reference_energy_equals_model_energy():
    obj = tiny_objective(1, "exact")
    x = torch.randn(4, 3, 12, 8, dtype=torch.float64)
    p = obj.model.backbone_state_dict()
    torch.testing.assert_close(obj.model(x), ref_energy(p, x, 2, 2, 4), rtol=1e-12, atol=1e-12)


def test_truncated_differs_from_exact_for_two_steps():
    exact = tiny_objective(2, "exact")
    trunc = tiny_objective(2, "truncated")
    trunc.load_state_dict(exact.state_dict())
    clean, corrupted, weight = batch()
    le, ge = param_grads(exact, clean, corrupted, weight)
    lt, gt = param_grads(trunc, clean, corrupted, weight)
    torch.testing.assert_close(le, lt)  # same forward value
    diff = rel_err(gt["model.blocks.0.attn.qkv.weight"], ge["model.blocks.0.attn.qkv.weight"])
    assert diff > 1e-4


def backbone_gets_restoration_gradient(obj, clean, corrupted, weight) -> bool:
    """True when the restoration loss reaches the backbone weights (needs dE/dx with a graph)."""
    _, grads = param_grads(obj, clean, corrupted, weight)
    return all(grads[n].abs().max() > 0 for n in grads if n.startswith("model.blocks.0."))


class _NoGraphObjective(fastebm.RestorationObjective):
    """The classic bug: the input gradient is taken without create_graph."""

    def energy_and_grad(self, x, create_graph):
        return super().energy_and_grad(x, create_graph=False)


def test_classic_no_graph_bug_is_caught():
    clean, corrupted, weight = batch()
    good = tiny_objective(1, "exact")
    assert backbone_gets_restoration_gradient(good, clean, corrupted, weight)
    bad = _NoGraphObjective(good.model, steps=1).double()
    # Without a graph the backbone weights get no gradient at all from the restoration loss.
    assert not backbone_gets_restoration_gradient(bad, clean, corrupted, weight)
    # while the independent reference says the backbone gradient is far from zero
    ref_p, _ = reference_grads(good, clean, corrupted, weight)
    assert ref_p["blocks.0.attn.qkv.weight"].abs().max() > 1e-8


def test_restore_matches_forward_trajectory():
    obj = tiny_objective(3, "exact")
    clean, corrupted, weight = batch()
    loss, stats = obj(clean, corrupted, weight)
    xs = obj.restore(corrupted)
    assert len(xs) == 4 and all(not x.requires_grad for x in xs)
    torch.testing.assert_close(xs[0], corrupted)
    for t in range(3):
        w = weight.expand_as(clean)
        mse = ((w * (xs[t + 1] - clean) ** 2).sum((1, 2, 3)) / w.sum((1, 2, 3))).mean()
        torch.testing.assert_close(mse, stats["loss_t"][t], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.detach(), stats["loss_t"].sum())
    # restore builds no graph and leaves parameter gradients untouched
    assert all(p.grad is None for p in obj.parameters())


def test_langevin_noise_has_requested_scale():
    obj = tiny_objective(1, "exact", noise_sigma=0.3)
    clean, corrupted, _ = batch(B=64)
    torch.manual_seed(1)
    noisy = obj.restore(corrupted)[1]
    quiet = fastebm.RestorationObjective(obj.model, steps=1, alpha_init=0.7)
    quiet.load_state_dict(obj.state_dict())
    deterministic = quiet.restore(corrupted)[1]
    std = (noisy - deterministic).std().item()
    assert abs(std - 0.3) < 0.02


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"),
    (dict(grad_mode="approx"), "grad_mode"),
    (dict(alpha_init=0.0), "alpha_init"),
    (dict(noise_sigma=-1.0), "noise_sigma"),
    (dict(engine="jit"), "engine"),
])
def test_objective_rejects_bad_arguments(kwargs, match):
    model = fastebm.create_model("vit_demo", depth=1)
    with pytest.raises(ValueError, match=match):
        fastebm.RestorationObjective(model, **kwargs)


@pytest.mark.parametrize("steps,grad_mode", [(1, "exact"), (2, "exact"), (3, "truncated")])
def test_forward_under_no_grad_equals_the_loss_with_grad(steps, grad_mode):
    """Evaluating the restoration loss without a parameter graph: the same loss and statistics as
    with grad enabled (dE/dx still comes from a local backward), and nothing left attached."""
    obj = tiny_objective(steps, grad_mode)
    clean, corrupted, weight = batch(B=5)
    loss, stats = obj(clean, corrupted, weight)
    assert loss.requires_grad
    with torch.no_grad():
        loss_ng, stats_ng = obj(clean, corrupted, weight)
    assert not loss_ng.requires_grad and all(not v.requires_grad for v in stats_ng.values())
    assert all(p.grad is None for p in obj.parameters())
    torch.testing.assert_close(loss_ng, loss.detach(), rtol=1e-12, atol=1e-14)
    for key in ("loss_t", "loss_corrupted", "energy", "alphas"):
        torch.testing.assert_close(stats_ng[key], stats[key], rtol=1e-12, atol=1e-14)
    # the loss is far from trivial: restoration moved the images and the loss depends on the parameters
    # (max, not min: a step's loss can cross the corrupted loss; a restoration that does nothing gives exactly 0)
    assert (stats["loss_t"] - stats["loss_corrupted"]).abs().max() > 1e-9

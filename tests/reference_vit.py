"""An independent float64 reference of the EnergyViT energy and of the restoration loss.

Written from the method's definition (docs/design.md §2) with plain tensor math on a dict of weights
under timm's names, not with fastebm's modules; derivatives come from ``torch.func``, not from
``torch.autograd.grad(create_graph=True)`` as in fastebm's eager engine.
"""
import torch
import torch.nn.functional as F


def _layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / 2.0 ** 0.5))


def energy(p, x, depth, num_heads, patch, post_norm=False):
    B, C, H, W = x.shape
    gh, gw = H // patch, W // patch
    # patches in row-major order, each flattened as (C, ph, pw): the order a strided conv uses
    pt = x.reshape(B, C, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * patch * patch)
    wpe = p["patch_embed.proj.weight"].reshape(p["patch_embed.proj.weight"].shape[0], -1)
    t = pt @ wpe.T + p["patch_embed.proj.bias"]
    D = t.shape[-1]
    t = torch.cat([p["cls_token"].expand(B, 1, D), t], 1) + p["pos_embed"]
    hd = D // num_heads
    for i in range(depth):
        k = f"blocks.{i}."
        y = _layer_norm(t, p[k + "norm1.weight"], p[k + "norm1.bias"])
        qkv = y @ p[k + "attn.qkv.weight"].T + p[k + "attn.qkv.bias"]
        q, kk, v = qkv.split(D, -1)
        heads = lambda z: z.reshape(B, -1, num_heads, hd).transpose(1, 2)  # noqa: E731
        q, kk, v = heads(q), heads(kk), heads(v)
        a = torch.softmax(q @ kk.transpose(-1, -2) / hd ** 0.5, -1) @ v
        a = a.transpose(1, 2).reshape(B, -1, D)
        t = t + a @ p[k + "attn.proj.weight"].T + p[k + "attn.proj.bias"]
        y = _layer_norm(t, p[k + "norm2.weight"], p[k + "norm2.bias"])
        hmid = _gelu(y @ p[k + "mlp.fc1.weight"].T + p[k + "mlp.fc1.bias"])
        t = t + hmid @ p[k + "mlp.fc2.weight"].T + p[k + "mlp.fc2.bias"]
    if post_norm:
        t = _layer_norm(t, p["norm.weight"], p["norm.bias"])
    return 0.5 * (t ** 2).sum(-1).mean(-1)


def restoration_loss(p, alpha_logits, clean, corrupted, weight, *, steps, grad_mode, depth, num_heads, patch):
    alphas = F.softplus(alpha_logits)
    x = corrupted
    w = weight.expand_as(clean)
    total = 0.0
    for t in range(steps):
        g = torch.func.grad(lambda z: energy(p, z, depth, num_heads, patch).sum())(x)
        if grad_mode == "truncated" and t < steps - 1:
            g = g.detach()  # stop-gradient: earlier steps' energy gradients are constants
        x = x - alphas[t] * g
        total = total + ((w * (x - clean) ** 2).sum((1, 2, 3)) / w.sum((1, 2, 3))).mean()
    return total


def reference_grads(objective, clean, corrupted, weight):
    """Gradients of the restoration loss w.r.t. the objective's backbone parameters and step sizes."""
    model = objective.model
    p = {k: v.detach().clone() for k, v in model.backbone_state_dict().items()}
    kw = dict(steps=objective.steps, grad_mode=objective.grad_mode, depth=model.depth,
              num_heads=model.num_heads, patch=model.patch_size)
    gp, ga = torch.func.grad(restoration_loss, argnums=(0, 1))(
        p, objective.alpha_logits.detach().clone(), clean, corrupted, weight, **kw
    )
    return gp, ga

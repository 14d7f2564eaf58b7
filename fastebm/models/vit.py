"""EnergyViT: a Vision Transformer whose forward pass is a scalar energy per image.

The backbone is a plain ViT with parameter names identical to timm's ``VisionTransformer``
(class token, learned position embedding, pre-norm blocks, final norm), so a pretrained backbone
loads into ``timm.create_model(...)`` strictly. Attention goes through ``fastebm.ops.attention``:
a backend exact under a double backward, or, inside ``fastebm.ops.first_order_attention()``
(restoration, evaluation), the fastest first-order kernel. The layers (:mod:`fastebm.models.layers`)
keep their forward and their hand-written input gradient side by side;
:meth:`EnergyViT.energy_and_input_grad` composes the latter (the explicit engine).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..energy import build_energy_head
from ..ops.attention_custom_ops import resolve_op_backend
from ..ops.attention_order import checkpoint_context_fn, current_attention_order
from .layers import Block, BlockCache, PatchEmbed

Size2 = Union[int, Tuple[int, int]]


def _pair(v: Size2) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"img_size must be an int or an (H, W) pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


class EnergyViT(nn.Module):
    """ViT energy function ``E(x)``, one scalar per image.

    Args:
        img_size: input size (int or (H, W)); each side divisible by ``patch_size``.
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the usual ViT sizes.
        energy: ``"sqnorm"`` (default: ``mean_i 1/2 ||h_i||^2`` over the last block's tokens before
            the final norm), ``"sqnorm_post"`` (the same after the final norm) or ``"linear"`` (a
            learned projection of the mean normed token). See docs/design.md §2 for why pre-norm.
        attn_backend: passed to ``fastebm.ops.attention`` (``"auto"``, ``"math"``, ``"triton"``; the
            first-order-only ``"sdpa"``/``"xformers"`` serve restoration and evaluation but not
            training, which needs a double backward). ``"auto"`` is first-order-fast where that suffices.
    """

    def __init__(
        self,
        img_size: Size2 = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        energy: str = "sqnorm",
        attn_backend: str = "auto",
    ):
        super().__init__()
        img_hw = _pair(img_size)
        if patch_size < 1 or img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(
                f"img_size {img_hw[0]}x{img_hw[1]} is not divisible by patch_size {patch_size}; "
                f"use a size that is a multiple of {patch_size} (e.g. {max(1, img_hw[0] // max(patch_size, 1)) * max(patch_size, 1)})"
            )
        if in_chans < 1 or depth < 1 or embed_dim < 1 or num_heads < 1:
            raise ValueError("in_chans, embed_dim, depth and num_heads must all be >= 1")
        self.img_size = img_hw
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_hw, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, attn_backend) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.energy_type = energy
        self.energy_head = build_energy_head(energy, embed_dim)
        self._init_weights()

    # ------------------------------------------------------------------ set-up
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def attn_backend(self) -> str:
        return self.blocks[0].attn.backend

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        for blk in self.blocks:
            blk.attn.backend = name

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (non-reentrant: supports double backward)."""
        self.grad_checkpointing = bool(enable)

    # ------------------------------------------------------------------ forward
    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"EnergyViT expects a 4-D batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"EnergyViT was built for {self.in_chans} channels but got {x.shape[1]}; "
                f"convert the images (e.g. grey -> RGB) or create the model with in_chans={x.shape[1]}"
            )
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"EnergyViT was built for {self.img_size[0]}x{self.img_size[1]} images but got "
                f"{x.shape[-2]}x{x.shape[-1]}; resize the input or create the model with img_size={tuple(x.shape[-2:])}"
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens of the last block, before the final norm: (B, 1 + N, D)."""
        self.check_input(x)
        h = self.embed(x)
        # Under first_order_attention() the recomputation must pick the forward's attention backend,
        # though the backward (on CUDA, an autograd worker thread) may run where no order is declared.
        ckpt_kw = {"context_fn": checkpoint_context_fn} if current_attention_order() == 1 else {}
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(blk, h, use_reentrant=False, **ckpt_kw)
            else:
                h = blk(h)
        return h

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed tokens (B, 1 + N, D), as timm's ``forward_features``."""
        return self.norm(self.forward_tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample energy, shape (B,)."""
        h = self.forward_tokens(x)
        return self.energy_head(h, self.norm)

    def energy_and_input_grad(
        self, x: torch.Tensor, attn_backend: Optional[str] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(E(x), dE/dx)`` from a hand-written backward made of forward ops (the explicit engine,
        docs/design.md §4): each block's ``forward_with_cache``, the energy head's
        ``energy_and_grad``, then each block's ``input_grad`` in reverse and the patch embedding's.

        ``E`` is (B,); ``dE/dx`` has ``x``'s shape and dtype and is the gradient of ``E.sum()`` (each
        sample's energy depends on its own image only, so this is every ``dE_b/dx_b``). It is
        differentiable: one ``.backward()`` of a loss on it gives the exact second-order parameter
        gradients (attention through the ``fastebm::attn_*`` custom ops, ``attn_bwd`` -> ``attn_dbwd``).
        ``attn_backend`` is the custom ops' kernel family (``"math"`` or ``"triton"``), resolved from
        the model's ``attn_backend`` and ``x``'s device by default. Gradient checkpointing is not
        applied here. Raises ValueError for a bad input or an energy head without a hand-written
        gradient.
        """
        self.check_input(x)
        if attn_backend is None:
            probe = x.new_empty((1, 1, 1, self.blocks[0].attn.head_dim))
            attn_backend = resolve_op_backend(probe, self.attn_backend)
        head_grad = getattr(self.energy_head, "energy_and_grad", None)
        if head_grad is None:
            raise ValueError(f"the explicit engine has no hand-written gradient for energy {self.energy_type!r}")
        h = self.embed(x)
        caches: List[BlockCache] = []
        for blk in self.blocks:
            h, cache = blk.forward_with_cache(h, attn_backend)
            caches.append(cache)
        energy, g = head_grad(h, self.norm)
        g = g.to(h.dtype)
        for blk, cache in zip(reversed(self.blocks), reversed(caches)):
            g = blk.input_grad(g, cache, attn_backend)
        # tokens = cat(cls, patch tokens) + pos_embed: the patch tokens' gradient goes to the pixels
        return energy, self.patch_embed.input_grad(g[:, 1:]).to(x.dtype)

    # ------------------------------------------------------------------ export
    def backbone_state_dict(self) -> Dict[str, torch.Tensor]:
        """Backbone weights under timm ``VisionTransformer`` names, nothing training-only."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("energy_head.")}

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, patch_size={self.patch_size}, energy={self.energy_type!r}"

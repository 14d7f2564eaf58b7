"""The restoration objective: corrupted images repaired by gradient descent on the energy.

``x_{t+1} = x_t - alpha_t * dE/dx(x_t) [+ sigma * noise]`` for ``t = 0 .. T-1`` starting from the
corrupted batch; the loss is the weighted MSE between every ``x_t`` (t >= 1) and the clean batch
(normalised per sample, averaged over the batch), summed over steps. The whole restoration and the
loss are one ``forward`` so that ``DistributedDataParallel`` can wrap this module (docs/design.md §8).

Gradient modes:
- ``exact``: every step keeps its graph (``create_graph=True``), so the loss is differentiated
  through all Hessian-vector products;
- ``truncated``: the energy gradients of steps ``0 .. T-2`` are treated as constants (computed
  without a graph); only the last step is differentiated through. Step sizes still get gradients
  from every step.

Engines (how ``dE/dx`` with a graph is obtained; docs/design.md §4, ``fastebm.engines``):
- ``eager`` (default): ``torch.autograd.grad(create_graph=True)`` then a double backward. Works with
  every second-order attention backend, the fused Triton ``autograd.Function`` included. Never compiled.
- ``func``: ``torch.func.grad`` of the energy; the whole forward (all steps + loss) runs under
  ``torch.compile`` and the loss gets a first-order ``.backward()``. Math attention only: a model
  whose attention resolves to the Triton backend is refused with a ValueError.
- ``explicit``: ``EnergyViT.energy_and_input_grad`` (hand-written backward from forward ops, attention
  through the ``fastebm::attn_*`` custom ops backed by the Triton kernels or the math reference);
  the whole forward under ``torch.compile``.
All engines give the same parameter gradients (tests/test_engines.py). When compilation fails the
compiled engines run uncompiled after one warning; ``compile=False`` or ``FASTEBM_COMPILE=0`` opts out.

Attention order (``fastebm.ops.attention_order``, docs/design.md §4): ``forward`` declares order 2
(double backward) around the restoration, and the eager engine declares it per step: 2 for the
steps that keep their graph, 1 for the others (``truncated`` steps ``0 .. T-2``, every step when
grad is disabled), where ``backend="auto"`` picks the fastest first-order attention kernel (SDPA,
xformers). ``restore`` is first order throughout, whatever the engine. A model whose attention is
named first-order only (``attn_backend="sdpa"``) is refused by ``forward`` when grad is enabled.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .engines import (
    COMPILED_ENGINES,
    ENGINES,
    CompiledFunction,
    check_explicit_model,
    check_func_attention,
    check_second_order_attention,
    compile_requested,
    explicit_energy_and_grad,
    explicit_op_backend,
    func_energy_and_grad,
)
from .ops.attention_order import attention_order

GRAD_MODES = ("exact", "truncated")


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def weighted_mse(x: torch.Tensor, clean: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``sum(w * (x - clean)^2) / sum(w)`` (``w`` broadcast to the image shape).

    Normalising per sample makes every sample count equally whatever its task's weight area, and
    makes the loss of a batch the mean of the losses of any split of it (so 2 processes x B equals
    1 process x 2B under DDP's gradient averaging).
    """
    w = weight.expand_as(x) if weight.shape != x.shape else weight
    if x.dtype in (torch.float16, torch.bfloat16):
        x, clean = x.float(), clean.float()
    err = (x - clean).pow(2)
    per_sample = (w * err).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1.0)
    return per_sample.mean()


class RestorationObjective(nn.Module):
    """Energy-based restoration loss around an energy model (e.g. :class:`~fastebm.EnergyViT`).

    Args:
        model: maps a batch ``(B, C, H, W)`` to energies ``(B,)``.
        steps: number of gradient steps ``T`` (>= 1).
        grad_mode: ``"exact"`` or ``"truncated"`` (see the module docstring).
        alpha_init: initial step size of every step; each step learns its own
            ``alpha_t = softplus(a_t)``. Default 10: with AdamW the logits move ~lr per step, so over a
            short run the step sizes stay near their start and this is effectively a hyper-parameter.
            Measured on vit_demo (2 epochs, built-in data, 3 seeds): linear probe 0.893 +- 0.004 at 10
            vs 0.867 at 3 and 0.838 +- 0.011 at 1 (0.1: 0.64, 30: 0.87, one seed); k-NN, 100-label probe
            and fine-tuning improve too (issue 12).
        learn_alpha: if False the step sizes stay fixed.
        noise_sigma: standard deviation of optional Langevin noise added after each step (0 = off).
        engine: how ``dE/dx`` with a graph is computed: ``"eager"`` (default),
            ``"func"`` or ``"explicit"`` (see the module docstring). Why ``eager`` is the default:
            it works with every model and attention backend and has no compile time. Measured on
            2 quiet CPU cores (vit_demo, batch 64, fp32, same run;
            benchmarks/results/train_step_cpu_demo_inductor.md): func is 1.59x the baseline's
            images/s at T=1 and 1.28x at T=2, explicit 1.05x / 1.27x, eager 1.00x / 1.16x, but the
            first compiled step costs 7 s to 2 min, more than a short run such as the demo gains.
            No GPU measurement exists yet; on a GPU, ``explicit`` (fused attention kernels inside a
            compiled step) is the candidate fast path: check ``benchmarks/bench_train_step.py``
            there before switching.
        compile: for ``func``/``explicit``: ``True``/``False`` forces compilation on/off; ``None``
            (default) compiles unless ``FASTEBM_COMPILE=0``. Ignored by ``eager``.
        compile_backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` builds faster).
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int = 2,
        grad_mode: str = "exact",
        alpha_init: float = 10.0,
        learn_alpha: bool = True,
        noise_sigma: float = 0.0,
        engine: str = "eager",
        compile: bool = None,
        compile_backend: str = "inductor",
    ):
        super().__init__()
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"unknown grad_mode {grad_mode!r}; choose one of {', '.join(GRAD_MODES)}")
        if not alpha_init > 0:
            raise ValueError(f"alpha_init must be > 0 (it is a step size), got {alpha_init!r}")
        if noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma!r}")
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if engine == "explicit":
            check_explicit_model(model)
        if engine == "func" and getattr(model, "attn_backend", None) == "triton":
            check_func_attention(model, torch.empty(0))  # raises: refused before any step runs
        self.model = model
        self.steps = steps
        self.grad_mode = grad_mode
        self.noise_sigma = float(noise_sigma)
        self.engine = engine
        self.alpha_logits = nn.Parameter(
            torch.full((steps,), _inverse_softplus(float(alpha_init))), requires_grad=learn_alpha
        )
        # A plain attribute (state_dict/DDP see only the parameters). It wraps a module-level function
        # that takes the objective as an argument, not a bound method, so that copy.deepcopy of the
        # objective does not keep calling the original's method.
        self._restoration = CompiledFunction(
            _restoration_loss,
            enabled=engine in COMPILED_ENGINES and compile_requested(compile),
            name=f"{engine} restoration step",
            backend=compile_backend,
        )

    @property
    def is_compiled(self) -> bool:
        """Whether ``forward`` runs under ``torch.compile`` (False for eager, after a fallback, or opt-out)."""
        return self._restoration.is_compiled

    @property
    def alphas(self) -> torch.Tensor:
        """Current step sizes ``softplus(a_t)``, shape (T,)."""
        return F.softplus(self.alpha_logits)

    def energy_and_grad(self, x: torch.Tensor, create_graph: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(E(x), dE/dx)`` by autograd; with ``create_graph`` the gradient is itself differentiable.

        Declares the attention order: 2 with ``create_graph`` (a first-order-only backend named by
        the model is then a ValueError), else 1 (``auto`` attention picks a first-order kernel).
        Under ``torch.no_grad()`` (evaluating the loss without a parameter graph) dE/dx still needs a
        local backward: grad is enabled for this call only, and both results come back detached."""
        outer_grad = torch.is_grad_enabled()
        with attention_order(2 if create_graph else 1), torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            energy = self.model(x)
            (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph and outer_grad)
        return (energy, grad) if outer_grad else (energy.detach(), grad.detach())

    def _engine_grad(self, x: torch.Tensor, keep_graph: bool, op_backend: str):
        """``(E, dE/dx)`` by the configured engine; without ``keep_graph`` the gradient is a constant."""
        if self.engine == "eager":
            return self.energy_and_grad(x, create_graph=keep_graph)
        if self.engine == "func":
            energy, grad = func_energy_and_grad(self.model, x)
            return (energy, grad) if keep_graph else (energy.detach(), grad.detach())
        if keep_graph:
            return explicit_energy_and_grad(self.model, x, op_backend)
        with torch.no_grad():
            return explicit_energy_and_grad(self.model, x, op_backend)

    def _step(self, x: torch.Tensor, t: int, alphas: torch.Tensor, create_graph: bool, op_backend: str = "math"):
        energy, grad = self._engine_grad(x, create_graph, op_backend)
        x_next = x - alphas[t].to(grad.dtype) * grad
        if self.noise_sigma > 0:
            x_next = x_next + self.noise_sigma * torch.randn_like(x_next)
        return x_next, energy

    def forward(
        self, clean: torch.Tensor, corrupted: torch.Tensor, weight: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Restores ``corrupted`` in ``T`` steps and returns ``(loss, stats)``.

        ``weight`` is the per-pixel loss weight (broadcastable to the images, e.g. (B, 1, H, W)).
        ``stats`` holds detached tensors: ``loss_t`` (T,) the weighted MSE after each step,
        ``loss_corrupted`` the weighted MSE before restoration, ``energy`` (T,) the mean energy at each
        step's input, ``alphas`` (T,).
        """
        if clean.shape != corrupted.shape:
            raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} shapes differ")
        # Checks and backend choice happen here, outside the compiled region: the compiled graph sees
        # the custom ops' kernel family as a constant string. Order 2 is declared so that an enclosing
        # first_order_attention() cannot reach the graph-keeping steps (the eager engine declares
        # order 1 itself for the steps without a graph).
        with attention_order(2):
            op_backend = "math"
            if self.engine == "func":
                check_func_attention(self.model, corrupted)
            elif self.engine == "explicit":
                if hasattr(self.model, "check_input"):
                    self.model.check_input(corrupted)
                op_backend = explicit_op_backend(self.model, corrupted)
            elif torch.is_grad_enabled():  # the last step keeps its graph: attention is differentiated twice
                check_second_order_attention(self.model, corrupted)
            return self._restoration(self, clean, corrupted, weight, op_backend, torch.is_grad_enabled())

    def _restoration_loss(self, clean, corrupted, weight, op_backend: str, grad_enabled: bool):
        """All ``T`` steps and the loss (the function the compiled engines hand to ``torch.compile``)."""
        alphas = self.alphas
        # The restored image must depend on the parameters through dE/dx: the eager engine needs a
        # graph from the very first step, hence an input that requires grad.
        x = corrupted.detach()
        if self.engine == "eager":
            x = x.requires_grad_(True)
        losses: List[torch.Tensor] = []
        energies: List[torch.Tensor] = []
        for t in range(self.steps):
            keep_graph = self.grad_mode == "exact" or t == self.steps - 1
            x, energy = self._step(x, t, alphas, create_graph=keep_graph and grad_enabled, op_backend=op_backend)
            losses.append(weighted_mse(x, clean, weight))
            energies.append(energy.detach().float().mean())
        loss = torch.stack(losses).sum()
        with torch.no_grad():
            stats = {
                "loss_t": torch.stack(losses).detach(),
                "loss_corrupted": weighted_mse(corrupted, clean, weight).detach(),
                "energy": torch.stack(energies),
                "alphas": alphas.detach(),
            }
        return loss, stats

    @torch.no_grad()
    def restore(self, corrupted: torch.Tensor) -> List[torch.Tensor]:
        """Inference: ``[x_0, x_1, ..., x_T]`` (detached, each ``corrupted``'s shape and dtype), without
        building any graph for the parameters.

        Every engine restores the same way here: ``dE/dx`` by a first-order autograd backward (never
        compiled) under ``first_order_attention()``, so ``auto`` attention runs the fastest
        first-order kernel (SDPA, xformers); a model built with ``attn_backend="sdpa"`` works too."""
        alphas = self.alphas.detach()
        xs = [corrupted.detach()]
        x = corrupted.detach()
        for t in range(self.steps):
            with torch.enable_grad():
                _, grad = self.energy_and_grad(x.detach().requires_grad_(True), create_graph=False)
            x = x - alphas[t].to(grad.dtype) * grad
            if self.noise_sigma > 0:
                x = x + self.noise_sigma * torch.randn_like(x)
            xs.append(x.detach())
        return xs

    def extra_repr(self) -> str:
        return f"steps={self.steps}, grad_mode={self.grad_mode!r}, engine={self.engine!r}, noise_sigma={self.noise_sigma}"


def _restoration_loss(objective: RestorationObjective, clean, corrupted, weight, op_backend: str, grad_enabled: bool):
    """The compiled engines' entry point (see ``RestorationObjective._restoration``)."""
    return objective._restoration_loss(clean, corrupted, weight, op_backend, grad_enabled)

"""How the restoration step gets ``dE/dx`` with a graph (docs/design.md §4).

- ``eager``: ``torch.autograd.grad(create_graph=True)``; any second-order attention backend (the
  Triton ``autograd.Function`` included; :func:`fastebm.engines.eager.check_second_order_attention`
  refuses first-order-only ones); never compiled (``torch.compile`` refuses double backward).
- ``func``: ``torch.func.grad`` of the energy inside ``torch.compile``; math attention only
  (:func:`fastebm.engines.func.check_func_attention` refuses the fused attention).
- ``explicit``: the model's hand-written backward (``EnergyViT.energy_and_input_grad``) with the
  attention custom ops, inside ``torch.compile``.

:class:`CompiledFunction` wraps a step in ``torch.compile`` and falls back to running it uncompiled,
with one warning, when compilation fails (compilation errors only: run-time errors propagate).
"""
from .compile import COMPILE_ENV_VAR, CompiledFunction, compile_error_types, compile_requested
from .eager import check_second_order_attention
from .explicit import check_explicit_model, explicit_energy_and_grad, explicit_op_backend
from .func import check_func_attention, func_energy_and_grad

ENGINES = ("eager", "func", "explicit")
COMPILED_ENGINES = ("func", "explicit")

__all__ = [
    "ENGINES",
    "COMPILED_ENGINES",
    "COMPILE_ENV_VAR",
    "CompiledFunction",
    "compile_error_types",
    "compile_requested",
    "check_explicit_model",
    "check_func_attention",
    "check_second_order_attention",
    "explicit_energy_and_grad",
    "explicit_op_backend",
    "func_energy_and_grad",
]

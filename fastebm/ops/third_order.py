"""The refusal of a third derivative through attention.

Both wirings of the fused attention stages end with the double backward: the ``autograd.Function``
chain of :mod:`fastebm.ops.triton_attention` (eager engine) and the ``fastebm::attn_*`` custom ops
of :mod:`fastebm.ops.attention_custom_ops` (explicit engine). The double backward's own backward
raises :data:`THIRD_ORDER_MESSAGE` in both.
"""
from __future__ import annotations

THIRD_ORDER_MESSAGE = (
    "fastebm's fused attention is differentiable to second order only (forward, backward and double "
    "backward: the Triton autograd.Function and the fastebm::attn_* custom ops alike); a third-order "
    "derivative through attention was requested. The restoration objective never needs one; for higher "
    "orders use attention(..., backend='math') (or FASTEBM_ATTENTION_BACKEND=math / the model's "
    "attn_backend='math' with the eager engine)."
)


def refuse_third_order(*_args) -> None:
    """The backward of the double-backward node: always raises RuntimeError(THIRD_ORDER_MESSAGE)."""
    raise RuntimeError(THIRD_ORDER_MESSAGE)

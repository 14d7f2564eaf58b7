"""``torch.compile`` with a graceful fallback for the compiled engines.

Compilation can fail for reasons that have nothing to do with the user's model: no C/C++ compiler
for Inductor's CPU code, an unsupported Python/platform, a Triton too old for the GPU. The step is
then run uncompiled (same numbers, slower) after ONE warning that says why and how to silence it.
``compile=False`` on the objective, or ``FASTEBM_COMPILE=0`` in the environment, opts out.

Only compilation errors fall back (:func:`compile_error_types`: Dynamo's exceptions, which wrap the
backend compiler's, and Inductor's compiler errors). Anything the compiled step raises while it
runs (an out-of-memory error, a kernel error, a ValueError for bad input) propagates unchanged.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Callable, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

COMPILE_ENV_VAR = "FASTEBM_COMPILE"
# Each (steps, grad_mode, engine, shape, dtype) combination is one compiled graph of the same code
# object; the default limit (8) would silently send a hyper-parameter sweep back to eager.
MIN_RECOMPILE_LIMIT = 64


def compile_requested(flag: Optional[bool]) -> bool:
    """``flag`` if given, else True unless ``FASTEBM_COMPILE`` is 0/false/no/off."""
    env = os.environ.get(COMPILE_ENV_VAR, "").strip().lower()
    if flag is not None:
        return bool(flag)
    return env not in ("0", "false", "no", "off")


def _raise_recompile_limit() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < MIN_RECOMPILE_LIMIT:
            setattr(cfg, name, MIN_RECOMPILE_LIMIT)
            break


def compile_error_types() -> Tuple[type, ...]:
    """The exception types that mean "torch.compile could not compile this", not "the step failed".

    ``TorchDynamoException`` covers ``BackendCompilerFailed`` (any backend compiler's error, Inductor's
    ``InductorError`` included), ``Unsupported``, ``InternalTorchDynamoError``, ``TorchRuntimeError``
    (an op failing on fake tensors while tracing), ``TritonMissing`` and ``GPUTooOldForTriton``.
    Inductor's C++/CUDA compiler and lowering errors are listed too in case one escapes unwrapped.
    A run-time error of compiled code is none of these (it is raised as itself).
    """
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    return (
        dynamo_exc.TorchDynamoException,
        inductor_exc.CppCompileError,
        inductor_exc.InvalidCxxCompiler,
        inductor_exc.OperatorIssue,
    )


def _first_line(exc: BaseException) -> str:
    lines = [l for l in str(exc).strip().splitlines() if l.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _describe(exc: BaseException) -> str:
    """The error and its root cause (Dynamo wraps a backend's error in BackendCompilerFailed)."""
    root = exc
    for _ in range(10):
        nxt = getattr(root, "inner_exception", None) or root.__cause__
        if nxt is None or nxt is root:
            break
        root = nxt
    return _first_line(exc) if root is exc else f"{_first_line(exc)} caused by {_first_line(root)}"


class CompiledFunction:
    """Calls ``torch.compile(fn)``; if compiling fails, warns once and calls ``fn`` from then on.

    Only the errors of :func:`compile_error_types` count as compilation failures, and only when ``fn``
    itself then succeeds on the same arguments; if it fails too, its own error is raised (a genuine
    error caught while tracing, e.g. a shape mismatch). Errors raised while the compiled code runs
    propagate as they are, without re-running ``fn``.

    Args:
        fn: the function to compile (pure with respect to its arguments; re-running it is harmless).
        enabled: False runs ``fn`` directly.
        name: used in the warning.
        backend, mode, dynamic: passed to ``torch.compile`` (``backend="aot_eager"`` compiles the
            graph without Inductor: faster to build, useful in tests).
    """

    def __init__(self, fn: Callable, enabled: bool = True, name: str = "step", backend: str = "inductor",
                 mode: Optional[str] = None, dynamic: Optional[bool] = False):
        self.fn = fn
        self.name = name
        self.backend = backend
        self.fallback_reason: Optional[str] = None
        self._compiled = None
        if enabled:
            try:
                _raise_recompile_limit()
                self._compiled = torch.compile(fn, backend=backend, mode=mode, dynamic=dynamic)
            except RuntimeError as exc:  # torch.compile unsupported on this platform / unknown backend
                self._fall_back(exc)

    @property
    def is_compiled(self) -> bool:
        """True while calls go through ``torch.compile`` (False after a fallback or when disabled)."""
        return self._compiled is not None

    def _fall_back(self, exc: BaseException) -> None:
        self._compiled = None
        self.fallback_reason = _describe(exc)
        warnings.warn(
            f"fastebm: torch.compile failed for the {self.name} ({self.fallback_reason}); running it "
            f"uncompiled instead (same results, slower). Pass compile=False or set "
            f"{COMPILE_ENV_VAR}=0 to skip compilation and silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        logger.debug("compile failure of %s", self.name, exc_info=exc)

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            return self.fn(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except compile_error_types() as exc:
            out = self.fn(*args, **kwargs)  # raises the genuine error if there is one
            self._fall_back(exc)
            return out

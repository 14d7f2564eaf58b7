"""Loading the CUDA implementation of the corruption ops (``csrc/``).

``load_extension()`` first tries the ahead-of-time build ``fastebm._C``
(``FASTEBM_CUDA_EXT=1 pip install ...``), then JIT-builds ``csrc/`` with
``torch.utils.cpp_extension.load`` (cached in torch's extension directory). It is tried once per
process; a failure is reported once with a warning, and callers then fall back to the PyTorch
reference.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

# nvcc flags that keep the kernel bit-exact with the reference: no fast-math, no FMA contraction,
# IEEE division and square root, no flush-to-zero. setup.py's ahead-of-time build uses the same.
NVCC_FLAGS = ["-O3", "--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false"]
CXX_FLAGS = ["-O3", "-ffp-contract=off"]  # the C++ standard is the one torch.utils.cpp_extension picks
SOURCES = ("corrupt_op.cpp", "corrupt_kernel.cu")

_state = {"tried": False, "ok": False, "error": None}
_lock = threading.Lock()


def csrc_dir() -> Path | None:
    """Where the CUDA sources are: $FASTEBM_CSRC, the source checkout, or a copy inside the package."""
    candidates = []
    if os.environ.get("FASTEBM_CSRC"):
        candidates.append(Path(os.environ["FASTEBM_CSRC"]))
    here = Path(__file__).resolve()
    candidates += [here.parents[2] / "csrc", here.parents[1] / "csrc"]
    for cand in candidates:
        if all((cand / s).is_file() for s in SOURCES):
            return cand
    return None


def load_extension(verbose: bool = False) -> bool:
    """Make the CUDA implementation of the ops available; True on success. Tried once per process."""
    with _lock:
        if _state["tried"]:
            return _state["ok"]
        _state["tried"] = True
        try:
            _load(verbose)
            _state["ok"] = True
        except Exception as exc:  # any build/load failure means: use the reference
            _state["error"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                "fastebm: the fused CUDA corruption kernel is unavailable "
                f"({_state['error'][:2000]}); using the PyTorch reference instead. To build it ahead of "
                "time run `FASTEBM_CUDA_EXT=1 pip install --no-build-isolation -e .`, or set "
                "FASTEBM_CSRC to the csrc/ folder of a fastebm checkout.",
                RuntimeWarning,
                stacklevel=3,
            )
        return _state["ok"]


def extension_error() -> str | None:
    """Why the last load attempt failed (None if it did not fail or was not tried)."""
    return _state["error"]


def _load(verbose: bool) -> None:
    spec = importlib.util.find_spec("fastebm._C")
    if spec is not None and spec.origin:
        torch.ops.load_library(spec.origin)  # ahead-of-time build from setup.py
        return
    src = csrc_dir()
    if src is None:
        raise FileNotFoundError("csrc/ sources not found (set FASTEBM_CSRC to the csrc/ folder)")
    from torch.utils.cpp_extension import load

    includes, ldflags = [str(src)], []
    toolkit = _cuda_toolkit_of_nvcc()
    if toolkit is not None:  # torch looks in $CUDA_HOME only; nvcc on PATH may live elsewhere
        includes.append(str(toolkit / "include"))
        ldflags += [f"-L{toolkit / d}" for d in ("lib64", "lib") if (toolkit / d).is_dir()]
    load(
        name="fastebm_corrupt_ext",
        sources=[str(src / s) for s in SOURCES],
        extra_include_paths=includes,
        extra_ldflags=ldflags,
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        is_python_module=False,
        verbose=verbose,
    )


def _cuda_toolkit_of_nvcc() -> Path | None:
    """The CUDA toolkit root that has the runtime headers ($CUDA_HOME, nvcc's, /usr/local/cuda)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        roots.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    roots.append("/usr/local/cuda")
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root)
    return None

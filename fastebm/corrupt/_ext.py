"""The fused CUDA corruption kernel as the torch op ``torch.ops.fastebm.fused_corrupt``.

* The op's schema and its fake (meta) implementation are registered here in Python, so the op
  exists - and traces under ``torch.compile`` / fake tensors - on every machine. The CUDA
  implementation comes from ``csrc/corrupt_op.cpp`` (``TORCH_LIBRARY_IMPL(fastebm, CUDA, ...)``).
* ``load_extension()`` makes that implementation available: it first tries the ahead-of-time build
  ``fastebm._C`` (``FASTEBM_CUDA_EXT=1 pip install ...``), then JIT-builds ``csrc/`` with
  ``torch.utils.cpp_extension.load`` (cached in torch's extension directory). A failure is reported
  once with a warning; callers then fall back to the PyTorch reference.
* ``validate_fused_inputs`` checks every argument (dtype, device, rank, channel count, permutation
  size, contiguity) and raises ``ValueError`` naming the fix. It runs on CPU and meta tensors too
  (``require_cuda=False``), which is how it is tested on machines without a GPU.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

_log = logging.getLogger("fastebm.corrupt")

OP_NAME = "fastebm::fused_corrupt"
_SCHEMA = (
    "fused_corrupt(Tensor images, Tensor task_ids, Tensor patch_src, Tensor sample_ids, Tensor mean, "
    "Tensor std, Tensor noise_scale, int key0, int key1, int offset, int patch_size, int sr_factor) "
    "-> (Tensor, Tensor, Tensor)"
)
# nvcc flags that keep the kernel bit-exact with the reference: no fast-math, no FMA contraction,
# IEEE division and square root, no flush-to-zero.
NVCC_FLAGS = ["-O3", "--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false"]
CXX_FLAGS = ["-O3", "-ffp-contract=off"]  # the C++ standard is the one torch.utils.cpp_extension picks
SOURCES = ("corrupt_op.cpp", "corrupt_kernel.cu")
MAX_BATCH = 65535 * 64  # far above any real batch; keeps the grid arithmetic in range

_lib = torch.library.Library("fastebm", "FRAGMENT")  # noqa: the lead's ops may share the namespace
_lib.define(_SCHEMA)
_lib.define("philox_words(Tensor sample_ids, int n, int key0, int key1, int offset, int purpose) -> Tensor")


@torch.library.register_fake(OP_NAME)
def _fused_corrupt_fake(images, task_ids, patch_src, sample_ids, mean, std, noise_scale, key0, key1, offset, patch_size, sr_factor):
    b, c, h, w = images.shape
    clean = images.new_empty((b, c, h, w), dtype=torch.float32)
    return clean, torch.empty_like(clean), images.new_empty((b, 1, h, w), dtype=torch.float32)


@torch.library.register_fake("fastebm::philox_words")
def _philox_words_fake(sample_ids, n, key0, key1, offset, purpose):
    return sample_ids.new_empty((sample_ids.shape[0], n), dtype=torch.int64)


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


_state = {"tried": False, "ok": False, "error": None}
_lock = threading.Lock()
_said_reference = False


def load_extension(verbose: bool = False) -> bool:
    """Make the CUDA implementation of the op available; True on success. Tried once per process."""
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


def extension_error() -> str | None:
    """Why the last load attempt failed (None if it did not fail or was not tried)."""
    return _state["error"]


def note_reference_fallback(reason: str) -> None:
    """Say once, at DEBUG level, that the PyTorch reference does the corruption."""
    global _said_reference
    if not _said_reference:
        _said_reference = True
        _log.debug("fastebm.corrupt: using the PyTorch reference (%s)", reason)


def _fail(msg: str) -> None:
    raise ValueError(f"fused_corrupt: {msg}")


def validate_fused_inputs(images, task_ids, patch_src, sample_ids, mean, std, noise_scale, *, patch_size, sr_factor,
                          key0=0, key1=0, offset=0, require_cuda=True, check_values=False) -> None:
    """Raise ValueError (naming the fix) unless the arguments are valid for the fused kernel.

    ``check_values`` also checks task ids and patch indices element-wise (synchronises the device).
    """
    tensors = dict(images=images, task_ids=task_ids, patch_src=patch_src, sample_ids=sample_ids, mean=mean, std=std,
                   noise_scale=noise_scale)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if images.dim() != 4:
        _fail(f"images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}; add a batch dimension with x[None]")
    if images.dtype not in (torch.uint8, torch.float32):
        _fail(f"images must be uint8 (0..255) or float32 ([0, 1]), got {images.dtype}; convert with .float()")
    b, c, h, w = images.shape
    if b < 1 or c < 1 or h < 1 or w < 1:
        _fail(f"images must be non-empty, got shape {tuple(images.shape)}")
    if b > MAX_BATCH:
        _fail(f"batch {b} exceeds {MAX_BATCH}; split it (pass sample_ids to keep the random stream)")
    if c * h * w >= 2**32 // 2:
        _fail(f"one image has {c * h * w} elements; the random stream supports fewer than 2**31")
    device = images.device
    if require_cuda and device.type != "cuda":
        _fail(f"images must be a CUDA tensor for the fused kernel (got {device}); use backend='reference' on CPU")
    for name, t in tensors.items():
        if t.device != device:
            _fail(f"{name} is on {t.device} but images are on {device}; move every input to one device")
        if not t.is_contiguous():
            _fail(f"{name} must be contiguous; call .contiguous() first")
    expect = dict(task_ids=(torch.int32, (b,), "sample"), sample_ids=(torch.int64, (b,), "sample"),
                  mean=(torch.float32, (c,), "channel"), std=(torch.float32, (c,), "channel"),
                  noise_scale=(torch.float32, (c,), "channel"))
    for name, (dtype, shape, per) in expect.items():
        t = tensors[name]
        if t.dtype != dtype:
            _fail(f"{name} must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            _fail(f"{name} must have shape {shape} (one entry per {per}), "
                  f"got {tuple(t.shape)}; the images have B={b}, C={c}")
    if patch_src.dtype != torch.int32 or patch_src.dim() != 2 or patch_src.shape[0] != b:
        _fail(f"patch_src must be int32 of shape (B, P) = ({b}, P), got {patch_src.dtype} {tuple(patch_src.shape)}")
    if patch_size < 1:
        _fail(f"patch_size must be >= 1, got {patch_size}")
    n_patches = patch_src.shape[1]
    if n_patches:
        if h % patch_size or w % patch_size:
            _fail(f"image size {h}x{w} is not divisible by patch_size {patch_size}; crop or resize the images")
        expected = (h // patch_size) * (w // patch_size)
        if n_patches != expected:
            _fail(f"patch_src has {n_patches} entries per sample but a {h}x{w} image has {expected} patches of "
                  f"{patch_size}x{patch_size}; build it for this patch size")
    if sr_factor < 2:
        _fail(f"sr_factor must be >= 2, got {sr_factor}")
    for name, v in dict(key0=key0, key1=key1, offset=offset).items():
        if not 0 <= int(v) < 2**32:
            _fail(f"{name} must be in [0, 2**32), got {v}")
    if check_values and device.type != "meta":
        ids = task_ids.to("cpu")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > 4):
            _fail("task_ids must be in 0..4 (mim, sort, sr, denoise, colorize)")
        uses_patches = bool(((ids == 0) | (ids == 1)).any())
        if uses_patches and n_patches == 0:
            _fail("a mim/sort sample needs patch_src of shape (B, P); got P = 0")
        if n_patches:
            src = patch_src.to("cpu")
            if int(src.min()) < -1 or int(src.max()) >= n_patches:
                _fail(f"patch_src values must be in [-1, {n_patches}) (-1 = masked patch)")
        sid = sample_ids.to("cpu")
        if int(sid.min()) < 0 or int(sid.max()) >= 2**32:
            _fail("sample_ids must be in [0, 2**32)")


def fused_corrupt(images, task_ids, patch_src, sample_ids, mean, std, noise_scale, *, seed, offset, patch_size,
                  sr_factor, check_values=True):
    """Validate, then run the fused kernel: returns (clean, corrupted, weight)."""
    key0, key1 = int(seed) & 0xFFFFFFFF, int(seed) >> 32
    validate_fused_inputs(images, task_ids, patch_src, sample_ids, mean, std, noise_scale, patch_size=patch_size,
                          sr_factor=sr_factor, key0=key0, key1=key1, offset=offset, check_values=check_values)
    if not load_extension():
        raise RuntimeError(f"the fused CUDA corruption kernel could not be built: {extension_error()}")
    return torch.ops.fastebm.fused_corrupt(images, task_ids, patch_src, sample_ids, mean, std, noise_scale, key0, key1,
                                           int(offset), int(patch_size), int(sr_factor))


def philox_words(seed: int, offset: int, sample_ids: torch.Tensor, n: int, purpose: int) -> torch.Tensor:
    """``philox.philox_uint32`` computed by one CUDA kernel (same words, bit for bit)."""
    if not isinstance(sample_ids, torch.Tensor) or sample_ids.dtype != torch.int64 or sample_ids.dim() != 1:
        raise ValueError("philox_words: sample_ids must be a 1-D int64 tensor")
    if sample_ids.device.type != "cuda":
        raise ValueError(f"philox_words: sample_ids must be a CUDA tensor (got {sample_ids.device}); "
                         "use fastebm.corrupt.philox.philox_uint32 on CPU")
    for name, v in dict(offset=offset, purpose=purpose).items():
        if not 0 <= int(v) < 2**32:
            raise ValueError(f"philox_words: {name} must be in [0, 2**32), got {v}")
    if not 0 <= int(n) < 2**34:
        raise ValueError(f"philox_words: n must be in [0, 2**34), got {n}")
    if not load_extension():
        raise RuntimeError(f"the fused CUDA corruption kernel could not be built: {extension_error()}")
    return torch.ops.fastebm.philox_words(sample_ids.contiguous(), int(n), int(seed) & 0xFFFFFFFF, int(seed) >> 32,
                                          int(offset), int(purpose))

"""Build script for fastebm.

Metadata lives in pyproject.toml. This file exists for the optional CUDA extension
(csrc/): set FASTEBM_CUDA_EXT=1 to build it ahead of time; otherwise it is JIT-built on
first CUDA use, and machines without CUDA use the PyTorch reference.
"""
import os

from setuptools import find_packages, setup


def _packages():
    # kernels/ is installed as fastebm.kernels: a top-level package named `kernels` exists on PyPI.
    pkgs = find_packages(include=["fastebm", "fastebm.*"])
    pkgs += ["fastebm.kernels"] + ["fastebm.kernels." + p for p in find_packages(where="kernels")]
    return pkgs, {"fastebm.kernels": "kernels"}


def _ext_modules():
    if os.environ.get("FASTEBM_CUDA_EXT", "0") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: WPS433

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc")) if f.endswith((".cu", ".cpp"))
    )
    ext = CUDAExtension(
        name="fastebm._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


_exts, _cmdclass = _ext_modules()
_pkgs, _pkg_dir = _packages()
setup(packages=_pkgs, package_dir=_pkg_dir, ext_modules=_exts, cmdclass=_cmdclass)

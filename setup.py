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
    # csrc/ ships inside the package as fastebm/csrc so an installed (non-editable) fastebm can still
    # JIT-build the CUDA extension on first use.
    pkgs += ["fastebm.csrc"]
    return pkgs, {"fastebm.kernels": "kernels", "fastebm.csrc": "csrc"}


def _ext_modules():
    """The fused corruption CUDA kernel as fastebm._C, only when FASTEBM_CUDA_EXT=1.

    The library holds torch op registrations only (no Python module init): fastebm.corrupt loads it
    with torch.ops.load_library. Flags keep it bit-exact with the PyTorch reference: no fast-math,
    no FMA contraction, IEEE division and square root (fastebm/corrupt/_ext.py uses the same).
    """
    if os.environ.get("FASTEBM_CUDA_EXT", "0") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: WPS433

    ext = CUDAExtension(
        name="fastebm._C",
        sources=["csrc/corrupt_op.cpp", "csrc/corrupt_kernel.cu"],
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-ffp-contract=off"],
            "nvcc": ["-O3", "--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


_exts, _cmdclass = _ext_modules()
_pkgs, _pkg_dir = _packages()
setup(
    packages=_pkgs,
    package_dir=_pkg_dir,
    package_data={"fastebm.csrc": ["*.h", "*.cu", "*.cpp", "*.md", "tests/*.cu"],
                  "fastebm.kernels": ["attention_configs.json"]},  # the kernels' launch table
    include_package_data=False,
    ext_modules=_exts,
    cmdclass=_cmdclass,
)

"""Build of the ``headq_torch._C`` extension (CPU ops always, CUDA ops when available).

Environment:
  HEADQ_BUILD_CUDA=0      build the CPU ops only, even when nvcc and a CUDA torch are present.
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "9.0", Hopper).
  DEBUG=1                 -O0 -g instead of -O3.
  MAX_JOBS                parallel compile jobs (default 2).
  HEADQ_NVCC_FLAGS        extra nvcc flags, space-separated (kernel experiments, e.g.
                          "-DHEADQ_MMA_KEY_CHAINS=4"; see the macros in csrc/cuda/*.cu).

Bit-exactness: host code is compiled with -ffp-contract=off (no FMA contraction of the
quantiser arithmetic); nvcc never gets --use_fast_math (it changes division and rounding).
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

os.environ.setdefault("MAX_JOBS", "2")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _build_cuda(cuda_sources: list[str]) -> bool:
    if os.environ.get("HEADQ_BUILD_CUDA", "1") == "0":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return bool(cuda_sources) and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cpp_sources = (
        _sources("csrc/torch_bindings.cpp")
        + _sources("csrc/validate.cpp")
        + _sources("csrc/cpu/*.cpp")
    )
    cuda_sources = _sources("csrc/cuda/*.cu")
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    cxx_flags = opt + ["-ffp-contract=off", "-fopenmp"]
    if _build_cuda(cuda_sources):
        nvcc_flags = opt + ["-lineinfo"] + (["-G"] if debug else [])
        nvcc_flags += os.environ.get("HEADQ_NVCC_FLAGS", "").split()
        return CUDAExtension(
            name="headq_torch._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("HEADQ_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        name="headq_torch._C",
        sources=cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

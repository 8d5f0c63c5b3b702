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
import re
import shlex
import subprocess

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


def _shared_libstdcxx() -> list[str]:
    """Link arguments that keep the C++ runtime shared.

    A C++ compiler whose installation has only the static ``libstdc++.a`` (e.g. a relocated
    toolchain) links a private copy of the C++ runtime into the extension. Errors raised by
    torch's checks (``TORCH_CHECK`` throws from libc10, which uses the process's shared
    ``libstdc++.so.6``) then unwind through frames of the other runtime and crash the process
    (a segmentation fault instead of the error message; seen on a GPU image with such a g++).
    When the compiler cannot find ``libstdc++.so``, the ``libstdc++.so.6`` this process (and so
    torch) has loaded is named on the link line: the linker binds the C++ runtime to it before
    the implicit ``-lstdc++`` could pull archive members in."""
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    try:
        found = subprocess.run(cxx + ["-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []
    try:
        with open("/proc/self/maps") as f:
            # mapped under the file's real name, e.g. .../libstdc++.so.6.0.33
            loaded = sorted({ln.split()[-1] for ln in f
                             if re.search(r"/libstdc\+\+\.so\.6(\.\d+)*$", ln.rstrip())})
    except OSError:
        loaded = []
    if not loaded:
        raise RuntimeError(f"setup.py: the C++ compiler {' '.join(cxx)!r} has no shared "
                           "libstdc++ and none is loaded in this process; a static C++ runtime "
                           "in the extension would turn every error into a crash. Set CXX/CC "
                           "to a compiler with a shared libstdc++ (e.g. CXX=/usr/bin/g++).")
    print(f"setup.py: {' '.join(cxx)} has no shared libstdc++; linking {loaded[0]}")
    return [loaded[0]]


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
    link_flags = ["-fopenmp"] + _shared_libstdcxx()
    if _build_cuda(cuda_sources):
        nvcc_flags = opt + ["-lineinfo"] + (["-G"] if debug else [])
        nvcc_flags += os.environ.get("HEADQ_NVCC_FLAGS", "").split()
        return CUDAExtension(
            name="headq_torch._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("HEADQ_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return CppExtension(
        name="headq_torch._C",
        sources=cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

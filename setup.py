"""Builds the C++ (always) and CUDA (when possible or forced) extensions of echo_kernels.

Sources are globbed: a new ``csrc/cpu/*.cpp`` or ``csrc/cuda/*.{cu,cpp}`` file is
compiled with no change here. Environment:

* ``ECHO_KERNELS_CUDA=1`` forces the CUDA extension (compile-only on a machine
  without a GPU, as CI does); ``=0`` skips it. Default: build it when torch has
  CUDA and nvcc is found.
* ``CUTLASS_INCLUDE_DIR``: the CUTLASS/CuTe headers the CUDA kernels use (default: those of
  the pinned ``nvidia-cutlass`` wheel).
* ``ECHO_KERNELS_MARCH`` sets ``-march`` for the CPU kernels (default ``native``:
  the extension is built on the machine that runs it).
"""

import glob
import os
import shutil

from setuptools import setup

# torch guesses CUDA_HOME from nvcc's folder (/usr/local/bin -> /usr/local), which
# has no lib64/libcudart; the toolkit's own folder is the right default.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/lib64"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda() -> bool:
    forced = os.environ.get("ECHO_KERNELS_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and shutil.which("nvcc") is not None


def cuda_include_dirs() -> list[str]:
    # torch's CUDA wheels ship the toolkit headers (cuda_runtime.h, ...) under nvidia/cu13.
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return [d for d in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(d)]


def cutlass_include_dir() -> str:
    """CUTLASS/CuTe headers: $CUTLASS_INCLUDE_DIR, else the pinned nvidia-cutlass wheel's copy."""
    import importlib.util

    candidates = [os.environ.get("CUTLASS_INCLUDE_DIR", "")]
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(os.path.join(spec.submodule_search_locations[0], "source", "include"))
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "cute", "tensor.hpp")):
            return path
    raise RuntimeError(
        "the CUDA extension needs the CUTLASS/CuTe headers: pip install nvidia-cutlass==4.2.0.0, "
        "or set CUTLASS_INCLUDE_DIR to a folder holding cute/tensor.hpp (or build without CUDA: ECHO_KERNELS_CUDA=0)"
    )


def cpu_extension():
    march = os.environ.get("ECHO_KERNELS_MARCH", "native")
    flags = ["-O3", "-fopenmp", "-std=c++17", f"-march={march}", "-ffp-contract=off"]
    return cpp_extension.CppExtension(
        "echo_kernels._C_cpu",
        sources("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
    )


def cuda_extension():
    # With a GPU, torch compiles for that GPU's architecture alone; without one to query
    # (CI) it would guess, so name the supported ones: Ampere + Hopper.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return cpp_extension.CUDAExtension(
        "echo_kernels._C_cuda",
        sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc"), cutlass_include_dir()] + cuda_include_dirs(),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )


extensions = [cpu_extension()]
if want_cuda():
    extensions.append(cuda_extension())

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

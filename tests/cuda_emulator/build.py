"""Builds csrc/cuda as a CPU extension that runs its kernels on the emulator (emu_cuda.h).

    python -m tests.cuda_emulator.build        # build (or reuse) and print the module's path

``load()`` returns a module with the CUDA extension's ``forward``, ``backward`` and
``build_info``, taking CPU tensors, and the emulator's self-checks and counters (``emu_*``,
selftest.cpp). It holds the real host glue (vrope_api.cpp) and the real kernels (vrope_rotate,
the WMMA and the CuTe mma kernels), compiled by the host compiler after four mechanical
rewrites of copies of the sources, under build/cuda_emulator/:

* every kernel file starts with ``#include "emu_cuda.h"``;
* ``kernel<<<grid, block, bytes, stream>>>(args)`` becomes ``echo_emu::launch(kernel, grid,
  block, bytes, stream)(args)``, and ``extern __shared__ ... name[];`` a pointer to the block's
  shared memory;
* vrope_api.cpp asks for CPU tensors where it asks for CUDA ones (``is_cuda()`` -> ``is_cpu()``),
  and c10/cuda's guard and stream are stubs;
* CuTe's sm80 mma, sm75 ldmatrix and sm80 cp.async atoms call the emulator instead of their
  PTX (patched copies of three CuTe headers, found first on the include path).

The first build takes a few minutes (CuTe templates, two cores); torch's extension cache
reuses it while no source changes.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
OUT = ROOT / "build" / "cuda_emulator"
KERNEL_FILES = ("vrope_rotate.cu", "vrope_fwd.cu", "vrope_bwd.cu", "vrope_fwd_mma.cu", "vrope_bwd_mma.cu")

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<([^;]*?)>>>\(")
_SHARED = re.compile(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];")

# The CuTe atoms the kernels use: (header, struct or function, its PTX instruction, replacement).
_ATOMS = (
    ("mma_sm80.hpp", "struct SM80_16x8x16_F32F16F16F32_TN\n", "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
     "::echo_emu::mma_m16n8k16(false, d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);"),
    ("mma_sm80.hpp", "struct SM80_16x8x16_F32BF16BF16F32_TN\n", "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
     "::echo_emu::mma_m16n8k16(true, d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);"),
    ("copy_sm75.hpp", "struct SM75_U32x4_LDSM_N\n", "ldmatrix.sync.aligned.x4.m8n8.shared.b16",
     "::echo_emu::ldmatrix_x4(&smem_src, dst0, dst1, dst2, dst3, false);"),
    ("copy_sm75.hpp", "struct SM75_U16x8_LDSM_T\n", "ldmatrix.sync.aligned.x4.trans.m8n8.shared.b16",
     "::echo_emu::ldmatrix_x4(&smem_src, dst0, dst1, dst2, dst3, true);"),
    ("copy_sm80.hpp", "struct SM80_CP_ASYNC_CACHEGLOBAL\n", "cp.async.cg.shared.global",
     "::echo_emu::cp_async(&smem_dst, &gmem_src, sizeof(TS));"),
    ("copy_sm80.hpp", "cp_async_fence()\n", "cp.async.commit_group", "::echo_emu::cp_async_fence();"),
    ("copy_sm80.hpp", "cp_async_wait()\n", "cp.async.wait_all", "::echo_emu::cp_async_wait(N);"),
)
_PTX_PATH = re.compile(r"#if defined\(CUTE_ARCH_\w+\)\n.*?#endif\n", re.DOTALL)


# Headers the build needs from the CUDA toolkit (or torch's CUDA wheels) and libcu++.
_CUDA_HEADERS = ("cuda_fp16.h", "cuda_bf16.h", "cuda_runtime_api.h", "vector_functions.h", "cuda/std/utility")


def cutlass_include_dir() -> Path | None:
    """The CuTe headers of the pinned nvidia-cutlass wheel, or None."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "source" / "include"
    return path if (path / "cute" / "tensor.hpp").is_file() else None


def missing_prerequisites() -> str | None:
    """Why the emulator cannot be built here (None when it can)."""
    from torch.utils import cpp_extension

    if cutlass_include_dir() is None:
        return "the CuTe headers are not installed (pip install nvidia-cutlass==4.2.0.0)"
    dirs = cuda_include_dirs()
    absent = [h for h in _CUDA_HEADERS if not any((Path(d) / h).is_file() for d in dirs)]
    if absent:
        return f"CUDA toolkit headers not found ({', '.join(absent)}; set CUDA_HOME)"
    _put_venv_tools_on_path()
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _put_venv_tools_on_path() -> None:
    """ninja from pip lives beside this interpreter, which `make test` runs without activating its venv."""
    tools = str(Path(sys.executable).parent)
    if tools not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = tools + os.pathsep + os.environ.get("PATH", "")


def cuda_include_dirs() -> list[str]:
    """Headers for cuda_fp16.h / cuda_runtime_api.h and libcu++: the toolkit's, then torch's wheels'."""
    import torch

    site = Path(torch.__file__).resolve().parents[1]
    toolkit = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    dirs = [toolkit, *glob.glob(str(site / "nvidia" / "cu*" / "include"))]
    found = [d for d in dirs if os.path.isfile(os.path.join(d, "cuda_fp16.h"))]
    # libcu++ (cuda/std/...), which CUTLASS includes and nvcc finds by itself.
    return found + [c for d in found if os.path.isdir(c := os.path.join(d, "cccl"))]


def patch_cute(include: Path) -> None:
    """Copies of the three CuTe headers whose atoms call the emulator, under include/cute/arch."""
    arch = include / "cute" / "arch"
    arch.mkdir(parents=True, exist_ok=True)
    texts: dict[str, str] = {}
    for header, anchor, instruction, call in _ATOMS:
        text = texts.get(header) or (cutlass_include_dir() / "cute" / "arch" / header).read_text()
        if text.count(anchor) != 1:
            raise RuntimeError(f"{anchor!r} is not in cute/arch/{header} exactly once: another CuTe version?")
        match = _PTX_PATH.search(text, text.index(anchor))
        if match is None or instruction not in match.group(0):
            raise RuntimeError(f"no PTX path with {instruction!r} after {anchor!r} in cute/arch/{header}")
        text = text[:match.start()] + call + "\n" + text[match.end():]
        texts[header] = text
    for header, text in texts.items():
        write_if_changed(arch / header, '#include "emu_hooks.h"\n' + text)


def write_stubs(include: Path) -> None:
    """c10/cuda headers the host glue and the kernels include, reduced to what they use."""
    c10 = include / "c10" / "cuda"
    c10.mkdir(parents=True, exist_ok=True)
    write_if_changed(c10 / "CUDAException.h", "#pragma once\n#define C10_CUDA_CHECK(x) (void)(x)\n"
                     "#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0\n")
    write_if_changed(c10 / "CUDAGuard.h", "#pragma once\n#include <c10/core/Device.h>\nnamespace c10::cuda {\n"
                     "struct CUDAGuard { explicit CUDAGuard(c10::Device) {} };\n}\n")
    write_if_changed(c10 / "CUDAStream.h", "#pragma once\n#include <cuda_runtime_api.h>\nnamespace c10::cuda {\n"
                     "struct EmulatedStream { cudaStream_t stream() const { return nullptr; } };\n"
                     "inline EmulatedStream getCurrentCUDAStream() { return {}; }\n}\n")


def rewrite_kernel_file(name: str, text: str) -> str:
    text = _LAUNCH.sub(r"::echo_emu::launch(\1, \2)(", text)
    text = _SHARED.sub(r"unsigned char* \1 = ::echo_emu::shared_memory();", text)
    for number, line in enumerate(text.splitlines(), 1):
        if re.search(r"<<<|__shared__|__constant__", line.split("//")[0]):
            raise RuntimeError(f"csrc/cuda/{name}:{number}: a launch or shared / constant memory declaration the "
                               f"emulator's rewrite does not know: {line.strip()}")
    return '#include "emu_cuda.h"\n' + text


def write_sources(src: Path) -> list[str]:
    src.mkdir(parents=True, exist_ok=True)
    cuda = ROOT / "csrc" / "cuda"
    sources = []
    for name in KERNEL_FILES:
        path = src / (Path(name).stem + ".cpp")
        write_if_changed(path, rewrite_kernel_file(name, (cuda / name).read_text()))
        sources.append(str(path))
    api = (cuda / "vrope_api.cpp").read_text().replace("is_cuda()", "is_cpu()")
    write_if_changed(src / "vrope_api.cpp", api)
    module = (cuda / "module.cpp").read_text()
    anchor = "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {"
    if anchor not in module:
        raise RuntimeError(f"csrc/cuda/module.cpp no longer has {anchor!r}")
    module = module.replace(anchor, "void echo_emu_bind_selftests(pybind11::module_& m);\n" + anchor +
                            "\n  echo_emu_bind_selftests(m);")
    write_if_changed(src / "module.cpp", module)
    sources += [str(src / "vrope_api.cpp"), str(src / "module.cpp")]
    sources += [str(HERE / name) for name in ("runtime.cpp", "build_facts.cpp", "selftest.cpp")]
    return sources


def write_if_changed(path: Path, text: str) -> None:
    """Leaves unchanged files alone, so torch's extension cache keeps the build."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def load(verbose: bool = False):
    """The emulated CUDA extension (built on first use)."""
    from torch.utils import cpp_extension

    reason = missing_prerequisites()  # also puts the venv's ninja on PATH
    if reason is not None:
        raise RuntimeError(f"cannot build the CUDA emulator: {reason}")
    include, src = OUT / "include", OUT / "src"
    patch_cute(include)
    write_stubs(include)
    sources = write_sources(src)
    (OUT / "obj").mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="echo_cuda_emulated",
        sources=sources,
        extra_include_paths=[str(include), str(HERE), str(ROOT / "csrc"), str(cutlass_include_dir()),
                             *cuda_include_dirs()],
        # -w: CuTe and the CUDA headers warn by the hundred under a host compiler.
        extra_cflags=["-O1", "-std=c++17", "-fno-strict-aliasing", "-w"],
        build_directory=str(OUT / "obj"),
        verbose=verbose,
    )


if __name__ == "__main__":
    module = load(verbose="-v" in sys.argv)
    print(module.__file__)

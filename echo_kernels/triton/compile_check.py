"""Compile the Triton kernels for a GPU architecture without a GPU; print registers and spills.

    python -m echo_kernels.triton.compile_check [--arch 90] [--dtype fp16] [--dim 64]

Uses Triton's ahead-of-time path (``triton.compile`` on an ``ASTSource`` with a
``GPUTarget``) and the ``cuobjdump`` bundled with Triton, so it runs on a CPU-only
machine. It catches what the interpreter cannot (non-constexpr globals, loop-carried type
changes, unsupported layouts) and shows per-thread register / stack (spill) use of each
launch configuration. Run it with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .backward_kernels import delta_kernel, dkdv_kernel, dq_kernel
from .configs import ROTATE_BLOCK, backward_config
from .forward_kernel import attention_fwd_kernel, rotate_kernel

_TENSORS = {"X", "XR", "Q", "QR", "K", "KR", "V", "Out", "DOut", "DQ", "DK", "DV"}
_INTS = {"H", "GROUPS", "Tq", "Tk", "TQ_BUCKET", "TK_BUCKET", "heads", "T"}
_LENGTH_INTS = _INTS - {"GROUPS"}  # hinted divisible by 16, as at T = 2048 (GROUPS is often 1)


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _TENSORS:
            sig[name] = "*" + dtype
        elif name in ("QLengths", "KLengths", "Lengths"):
            sig[name] = "*i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name in _INTS:
            sig[name] = "i32"
        else:  # features, alpha, beta, lse, delta and the float32 partials
            sig[name] = "*fp32"
    return sig


def _jit_attrs(fn, signature: dict) -> dict:
    """The hints a launch gives Triton's JIT: 16-byte aligned pointers and lengths divisible by 16.

    Without them the compiler cannot prove the tiles' loads aligned, does not pipeline
    them into asynchronous copies, and the register counts printed would not be the
    ones a real launch gets (one on torch tensors at lengths like 2048).
    """
    aligned = [["tt.divisibility", 16]]
    return {(i,): aligned for i, name in enumerate(fn.arg_names)
            if signature[name].startswith("*") or name in _LENGTH_INTS}


def compile_kernel(kernel, arch: int, dtype: str, dim: int, bias: int, causal: bool,
                   block_m: int, block_n: int, warps: int, stages: int) -> str:
    """Compile one kernel configuration; return a one-line resource summary."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    constexprs = {"HEAD_DIM": dim, "BIAS": bias, "CAUSAL": causal, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK": block_m,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature = _signature(fn, dtype, constexprs)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, _jit_attrs(fn, signature)),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    # The kernel's own line (cuobjdump also lists libdevice helpers).
    lines = [line for line in usage.splitlines() if "REG" in line]
    name_lines = usage.splitlines()
    for i, line in enumerate(name_lines[:-1]):
        if fn.__name__ in line and "REG" in name_lines[i + 1]:
            lines = [name_lines[i + 1]]
            break
    what = f"{fn.__name__} sm_{arch} {dtype} D={dim} bias={bias} causal={causal} {block_m}x{block_n} w{warps} s{stages}"
    return f"{what}: {lines[0].strip() if lines else usage.strip()[-200:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--bias", type=int, default=1, choices=[0, 1, 2])
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    # One representative of each kernel: the forward's Hopper config and the backward's table.
    small = args.dim >= 256
    table = backward_config(args.dim, args.arch)
    jobs = [
        (rotate_kernel, ROTATE_BLOCK, 0, 4, 1),
        (attention_fwd_kernel, 64 if small else 128, 64, 4 if small else 8, 2 if small else 3),
        *[(kernel, c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"])
          for kernel, c in ((dkdv_kernel, table["dkdv"]), (dq_kernel, table["dq"]))],
        (delta_kernel, 64, 64, 4, 1),
    ]
    for kernel, block_m, block_n, warps, stages in jobs:
        print(compile_kernel(kernel, args.arch, args.dtype, args.dim, args.bias, args.causal,
                             block_m, block_n, warps, stages), flush=True)


if __name__ == "__main__":
    main()

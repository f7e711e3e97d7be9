"""Time the Triton backward under candidate tile tables (GPU only), to choose ``configs.backward_config``.

    python -m benchmarks.tune_triton_backward [--length 4096] [--dims 64 128]

The backward's tiles are a fixed table, not autotuned (a timed choice could change the
gradients' last bits between runs); this script is how that table is chosen: it times
forward+backward of bf16, B=4, H=16, exp bias, non-causal and causal, for each
candidate, and prints one line per (dim, causal, candidate) with the median in ms.
"""

from __future__ import annotations

import argparse

import torch
from triton.runtime.errors import OutOfResources

from benchmarks.shapes import Shape, make_inputs
from benchmarks.time_triton import median_ms, steps
from echo_kernels.triton import configs

# (dK/dV BLOCK_M x BLOCK_N, dQ BLOCK_M x BLOCK_N, warps, stages); stages None = the table's.
CANDIDATES = {
    64: [((32, 64), (64, 32), 4, None), ((32, 64), (64, 32), 4, 2), ((32, 64), (64, 32), 4, 4),
         ((32, 128), (128, 32), 4, None), ((64, 64), (64, 64), 4, None), ((32, 128), (128, 32), 8, None)],
    128: [((32, 32), (64, 32), 8, None), ((32, 64), (64, 32), 8, None), ((32, 64), (64, 32), 4, None),
          ((32, 32), (32, 32), 4, None), ((64, 64), (64, 64), 8, None)],
}


def table(dkdv, dq, warps, stages):
    def config(head_dim, arch):
        return {"dkdv": {"BLOCK_M": dkdv[0], "BLOCK_N": dkdv[1], "num_warps": warps, "num_stages": stages},
                "dq": {"BLOCK_M": dq[0], "BLOCK_N": dq[1], "num_warps": warps, "num_stages": stages}}
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128], choices=sorted(CANDIDATES))
    parser.add_argument("--causal", choices=["both", "no", "yes"], default="both")
    args = parser.parse_args()
    default = configs.backward_config
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    for dim in args.dims:
        for causal in {"both": (False, True), "no": (False,), "yes": (True,)}[args.causal]:
            shape = Shape("tune", 4, 16, 16, args.length, args.length, dim, causal)
            _, step = steps(make_inputs(shape, torch.bfloat16, requires_grad=True), "triton")
            table_stages = default(dim, arch)["dq"]["num_stages"]
            try:
                for dkdv, dq, warps, stages in CANDIDATES[dim]:
                    stages = stages or table_stages
                    configs.backward_config = table(dkdv, dq, warps, stages)
                    try:
                        ms = f"{median_ms(step, repeats=7):8.2f} ms"
                    except (OutOfResources, RuntimeError) as exc:  # a tile too big for shared memory or registers
                        ms = f"failed ({type(exc).__name__})"
                    print(f"D={dim} causal={causal} dkdv={dkdv} dq={dq} warps={warps} stages={stages}: {ms}", flush=True)
            finally:
                configs.backward_config = default
            print(f"D={dim} causal={causal} table now {default(dim, arch)}", flush=True)


if __name__ == "__main__":
    main()

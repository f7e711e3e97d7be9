"""``python -m benchmarks.memory JSON``: peak RSS growth (bytes) of one benchmark call, in its own process."""

import json
import sys

import torch

from .shapes import Shape, make_inputs
from .test_attention import method_fn


def main() -> None:
    spec = json.loads(sys.argv[1])
    shape = Shape(**spec["shape"])
    dtype = getattr(torch, spec["dtype"].replace("torch.", ""))
    inp = make_inputs(shape, dtype, requires_grad=spec["backward"])
    attention = method_fn(spec["method"], inp)
    # The peak so far covers imports and inputs: that is the baseline.
    before = peak_rss_bytes()
    if spec["backward"]:
        attention().sum().backward()
    else:
        with torch.no_grad():
            attention()
    print(peak_rss_bytes() - before)


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from
    the parent across fork + exec, so a child of a large pytest process would start at its peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak memory is measured on Linux only)")


if __name__ == "__main__":
    main()

"""``python -m benchmarks.memory JSON``: peak RSS growth (bytes) of one benchmark call, in its own process."""

import json
import resource
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
    # ru_maxrss is the peak so far (KiB): what the inputs cost is the baseline.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if spec["backward"]:
        attention().sum().backward()
    else:
        with torch.no_grad():
            attention()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)


if __name__ == "__main__":
    main()

"""Test configuration: the Triton interpreter must be chosen before triton is imported."""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter (slow, but exact enough to test).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every kernel output buffer starts as NaN, so an element a kernel forgets to write fails a test.
os.environ.setdefault("ECHO_KERNELS_POISON", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

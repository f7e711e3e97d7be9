"""torch.compile(fullgraph=True, dynamic=True) traces RopeAttention and rope_attention on CPU.

Run in a fresh interpreter, so that the first call of the package is the compiled one (an
import or another untraceable step on first use would break the graph there and only there).
The GPU twin (Triton, inductor) is tests/test_triton.py::test_torch_compile_fullgraph_matches_eager.
"""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch
    import torch._dynamo
    import echo_kernels as ek

    torch._dynamo.config.error_on_recompile = True  # the second length must reuse the dynamic graph

    def check(backend, with_layer):
        torch._dynamo.reset()  # each backend compiles afresh; within one, no recompilation is allowed
        torch.manual_seed(0)
        layer = ek.RopeAttention(32, 4, num_kv_heads=2, bias="exp", backend=backend).double()

        def functional(q, k, v, f0, lengths):
            return ek.rope_attention(q, k, v, f0, alpha=layer.alpha, causal=True,
                                     q_lengths=lengths, k_lengths=lengths, backend=backend)

        cases = [(functional, lambda x, qkv, f0, lengths: ((*qkv, f0, lengths), {}))]
        if with_layer:
            cases.append((layer, lambda x, qkv, f0, lengths: ((x, f0), {"lengths": lengths})))
        for eager, arguments in cases:
            compiled = torch.compile(eager, fullgraph=True, dynamic=True, backend="aot_eager")
            for length in (23, 41):  # two lengths: one dynamic graph serves both
                x = torch.randn(3, length, 32, dtype=torch.float64, requires_grad=True)
                qkv = [torch.randn(3, h, length, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2)]
                f0 = torch.where(torch.rand(3, length) < 0.7, 90 + 150 * torch.rand(3, length),
                                 torch.zeros(3, length))
                inputs, params = arguments(x, qkv, f0, torch.tensor([length, length - 5, 1]))
                compare(compiled, eager, inputs, params, list(layer.parameters()))
        print("compiled ok", backend, flush=True)

    def compare(fn, eager, inputs, params, parameters):
        leaves = [t for t in inputs if t.requires_grad] + parameters
        got = fn(*inputs, **params)
        want = eager(*inputs, **params)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(want)
        for a, b in zip(torch.autograd.grad(got, leaves, g, allow_unused=True),
                        torch.autograd.grad(want, leaves, g, allow_unused=True)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    # The fused CPU kernel also as the layer (features computed inside the graph); the PyTorch
    # paths through the functional API only (their ops are plain aten ops).
    check("cpu", with_layer=True)
    check("chunked", with_layer=False)
    check("reference", with_layer=False)
    """
)


def test_compiled_fullgraph_dynamic_matches_eager_on_first_use():
    result = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for backend in ("cpu", "chunked", "reference"):
        assert f"compiled ok {backend}" in result.stdout

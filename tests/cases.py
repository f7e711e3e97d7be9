"""Random inputs and the golden comparison shared by every backend's tests.

``make_case`` draws q/k/v, f0 with unvoiced stretches, lengths with padding and the
per-head alpha; ``run`` evaluates one backend on a case and returns its output and
every gradient; ``assert_close_to_golden`` applies FlashAttention's rule: the fused
result's max error against the float64 golden is at most ``factor`` times the
same-precision reference's error, plus ``atol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import echo_kernels as ek

LEARNED_FEATURES = ("log_theta", "radius", "pitch")  # the per-token features that get a gradient
# The CUDA backend's kernel generation per pass ("wmma" default, or "mma"), read at every call.
CUDA_KERNEL_VARIABLES = {"forward": "ECHO_KERNELS_CUDA_FORWARD", "backward": "ECHO_KERNELS_CUDA_BACKWARD"}


def use_cuda_kernels(monkeypatch, kernels: str, passes=tuple(CUDA_KERNEL_VARIABLES)) -> None:
    """Run ``passes`` of the cuda backend with kernel generation ``kernels`` for this test."""
    for name in passes:
        monkeypatch.setenv(CUDA_KERNEL_VARIABLES[name], kernels)


def learnable(features: ek.PitchFeatures, requires_grad: bool = True) -> ek.PitchFeatures:
    """``features`` detached, the LEARNED_FEATURES made leaves that (optionally) take a gradient."""
    return features._replace(**{n: getattr(features, n).detach().requires_grad_(requires_grad)
                                for n in LEARNED_FEATURES})
GRAD_NAMES = (
    "q", "k", "v", "log_theta_q", "radius_q", "pitch_q", "log_theta_k", "radius_k", "pitch_k", "alpha", "beta",
)


@dataclass
class Case:
    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    tq: int = 97
    tk: int = 113
    dim: int = 32
    bias: str | None = "exp"
    causal: bool = False
    padded: bool = True
    voiced_fraction: float = 0.7
    theta_mode: str = "f0"
    radius_mode: str = "f0"
    empty_row: bool = False  # one batch entry with k_length 0: every row fully masked
    beta: float = 0.8
    pitch_scale: float = 1.0  # multiplies the pitch features (wide pitch ranges stress the exp bias)
    seed: int = 0


def random_f0(batch: int, length: int, voiced_fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Speech-like f0 [B, T] in Hz: a smooth contour around 90-250 Hz with unvoiced gaps."""
    base = 90 + 160 * torch.rand(batch, 1, generator=gen, dtype=torch.float64)
    wobble = 1 + 0.2 * torch.sin(torch.linspace(0, 6, length, dtype=torch.float64))[None] * torch.rand(
        batch, 1, generator=gen, dtype=torch.float64
    )
    f0 = base * wobble
    voiced = torch.rand(batch, length, generator=gen, dtype=torch.float64) < voiced_fraction
    return torch.where(voiced, f0, torch.zeros_like(f0))


def case_lengths(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_lengths, k_lengths)`` of a case, int64 ``[B]``: full but for the last entry when padded
    (2/3 of the queries, 3/5 of the keys) and entry 0 without keys when ``empty_row``."""
    b, tq, tk = case.batch, case.tq, case.tk
    q_lengths = torch.full((b,), tq, dtype=torch.int64)
    k_lengths = torch.full((b,), tk, dtype=torch.int64)
    if case.padded and b > 1:
        q_lengths[-1] = max(1, tq * 2 // 3)
        k_lengths[-1] = max(1, tk * 3 // 5)
    if case.empty_row:
        k_lengths[0] = 0
    return q_lengths, k_lengths


def make_case(case: Case, dtype: torch.dtype, device: str = "cpu"):
    """Inputs of one case as a dict of float64 leaf tensors (cast per run)."""
    gen = torch.Generator().manual_seed(case.seed)
    b, h, hk, tq, tk, d = case.batch, case.heads, case.kv_heads, case.tq, case.tk, case.dim
    q = torch.randn(b, h, tq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hk, tk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hk, tk, d, generator=gen, dtype=torch.float64)
    f0q = random_f0(b, tq, case.voiced_fraction, gen)
    f0k = random_f0(b, tk, case.voiced_fraction, gen)
    q_lengths, k_lengths = case_lengths(case)
    alpha = 0.5 + torch.rand(h, generator=gen, dtype=torch.float64)
    dout = torch.randn(b, h, tq, d, generator=gen, dtype=torch.float64)
    return {"q": q, "k": k, "v": v, "f0q": f0q, "f0k": f0k, "q_lengths": q_lengths, "k_lengths": k_lengths, "alpha": alpha,
                "beta": torch.tensor(case.beta, dtype=torch.float64), "dout": dout, "dtype": dtype, "device": device}


def run(case: Case, inputs: dict, backend: str, dtype: torch.dtype | None = None, grads: bool = True):
    """Output and gradients (dict name -> float64 tensor on CPU) of ``backend`` in ``dtype``."""
    dtype = dtype or inputs["dtype"]
    device = inputs["device"]
    stat = torch.float64 if dtype == torch.float64 else torch.float32

    def leaf(t, dt):
        return t.to(device=device, dtype=dt).detach().requires_grad_(grads)

    q, k, v = (leaf(inputs[n], dtype) for n in ("q", "k", "v"))
    ql, kl = inputs["q_lengths"].to(device), inputs["k_lengths"].to(device)
    mode = {"theta_mode": case.theta_mode, "radius_mode": case.radius_mode, "dtype": stat}
    fq = ek.pitch_features(inputs["f0q"].to(device), lengths=ql, **mode)
    fk = ek.pitch_features(inputs["f0k"].to(device), lengths=kl, **mode)
    fq, fk = (f._replace(pitch=f.pitch * case.pitch_scale) for f in (fq, fk))
    fq, fk = learnable(fq, grads), learnable(fk, grads)
    alpha, beta = leaf(inputs["alpha"], stat), leaf(inputs["beta"], stat)
    out = ek.rope_attention(
        q, k, v, features=fq, features_k=fk, bias=case.bias, alpha=alpha, beta=beta, causal=case.causal,
        q_lengths=ql, k_lengths=kl, backend=backend,
    )
    result = {"out": out.detach()}
    if grads:
        wrt = [q, k, v, fq.log_theta, fq.radius, fq.pitch, fk.log_theta, fk.radius, fk.pitch, alpha, beta]
        got = torch.autograd.grad(out, wrt, inputs["dout"].to(device=device, dtype=dtype), materialize_grads=True)
        result.update(dict(zip(GRAD_NAMES, got)))
    return {name: t.to("cpu", torch.float64) for name, t in result.items()}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


# A gradient with this few elements (alpha [H], beta []) is one sum over every (i, j)
# pair of the batch; its max error is a single draw, and the reference's draw can land
# near 0 by chance (measured: 3.5e-5 for one seed, 4.7e-4 and 9.8e-4 for the next two).
FEW = 16


def assert_close_to_golden(fused: dict, reference: dict, golden: dict, factor: float = 2.0,
                           grad_factor: float = 3.0, atol: float = 1e-5, dtype: torch.dtype | None = None) -> None:
    """FlashAttention's rule on the output and every gradient present in ``fused``.

    For the few-element gradients the reference's error is floored at one unit roundoff
    of ``dtype`` (the inputs' precision) times the gradient's magnitude.
    """
    for name, value in fused.items():
        assert torch.isfinite(value).all(), f"{name}: non-finite values"
        f = factor if name == "out" else grad_factor
        scale = golden[name].abs().max().item() if golden[name].numel() else 0.0
        yardstick = max_err(reference[name], golden[name])
        if dtype is not None and value.numel() <= FEW and name != "out":
            yardstick = max(yardstick, torch.finfo(dtype).eps / 2 * scale)
        # Gradients of sums over many tokens grow with their size: scale atol by the magnitude.
        tol = f * yardstick + atol * max(1.0, scale)
        err = max_err(value, golden[name])
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (reference error x{f} + atol)"


def constant_pitch(inputs: dict) -> dict:
    """Every voiced frame at 150 Hz: pitch is 0 everywhere, so |dp| = 0 for every pair (ties)."""
    for side in ("f0q", "f0k"):
        inputs[side] = torch.where(inputs[side] > 0, torch.full_like(inputs[side], 150.0), inputs[side])
    return inputs


def assert_keyless_rows_are_zero(fused: dict, case: Case) -> None:
    """Every query row that sees no key has output exactly 0 (not NaN, not merely small): all rows of
    an entry with k_length 0, padded rows i >= q_length and, under the causal mask (aligned at the
    ends of the valid lengths), rows i < q_length - k_length. An entry with k_length 0 also has
    exactly zero q and k gradients."""
    out = fused["out"]
    q_lengths, k_lengths = case_lengths(case)
    for b, (lq, lk) in enumerate(zip(q_lengths.tolist(), k_lengths.tolist(), strict=True)):
        if lk == 0:
            first_seeing = lq
        else:
            first_seeing = max(0, lq - lk) if case.causal else 0
        keyless = torch.cat([out[b, :, :first_seeing], out[b, :, lq:]], dim=1)
        assert torch.equal(keyless, torch.zeros_like(keyless)), f"batch {b}: a row without keys is not 0"
        if lk == 0:
            assert fused["q"][b].abs().max() == 0 and fused["k"][b].abs().max() == 0, f"batch {b}: gradients"


def check_backend(backend: str, case: Case, dtype: torch.dtype, device: str, ties: bool = False) -> dict:
    """Run ``backend``, the same-precision reference and the float64 golden on one case; assert
    FlashAttention's rule; return the backend's result (see ``run``)."""
    inputs = make_case(case, dtype, device)
    if ties:
        inputs = constant_pitch(inputs)
    fused = run(case, inputs, backend)
    golden = run(case, inputs, "reference", torch.float64)
    reference = run(case, inputs, "reference")
    assert_close_to_golden(fused, reference, golden, dtype=dtype)
    return fused

"""RopeAttention: a drop-in layer that trains and routes gradients to its pitch parameters."""

import pytest
import torch

import echo_kernels as ek


def toy_batch(gen, batch=8, length=24, dim=32):
    x = torch.randn(batch, length, dim, generator=gen)
    f0 = 100 + 100 * torch.rand(batch, length, generator=gen)
    f0[:, ::5] = 0
    # Target: each token should copy the mean of the tokens with a similar pitch.
    weights = torch.exp(-((f0[:, :, None] - f0[:, None, :]) / 20) ** 2)
    target = (weights / weights.sum(-1, keepdim=True)) @ x
    return x, f0, target


def test_training_reduces_loss_and_reaches_every_pitch_parameter():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = ek.RopeAttention(32, 4, num_kv_heads=2)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    lengths = torch.tensor([24, 24, 20, 24, 17, 24, 24, 24])
    losses = []
    for step in range(60):
        x, f0, target = toy_batch(gen)
        out = layer(x, f0, lengths=lengths)
        mask = torch.arange(24)[None, :, None] < lengths[:, None, None]
        loss = (((out - target) ** 2) * mask).mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name in ("alpha", "beta_raw", "log_theta_offset"):
                grad = getattr(layer, name).grad
                assert grad is not None and grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_cross_attention_and_padding_do_not_leak():
    torch.manual_seed(1)
    layer = ek.RopeAttention(16, 2, cross=True, backend="reference").double()
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    ctx = torch.randn(2, 7, 16, dtype=torch.float64)
    f0c = 120 + 30 * torch.rand(2, 7, dtype=torch.float64)
    lengths = torch.tensor([7, 5])
    out = layer(x, context=ctx, f0_context=f0c, context_lengths=lengths)
    ctx2 = ctx.clone()
    ctx2[1, 5:] = 99.0  # padding content must not matter
    out2 = layer(x, context=ctx2, f0_context=f0c, context_lengths=lengths)
    assert torch.allclose(out, out2, atol=1e-12, rtol=0)
    alone = layer(x[1:], context=ctx[1:, :5], f0_context=f0c[1:, :5])
    assert torch.allclose(out[1:], alone, atol=1e-12, rtol=0)


def test_learnable_theta_off_is_a_buffer():
    layer = ek.RopeAttention(16, 2, learnable_theta=False)
    assert "log_theta_offset" not in dict(layer.named_parameters())
    assert torch.allclose(layer.beta, torch.tensor(1.0))


def test_repr_names_the_configuration():
    text = repr(ek.RopeAttention(64, 4, num_kv_heads=2, bias="l1", theta_mode="mean_f0", cross=True))
    for part in ("dim=64", "num_heads=4", "num_kv_heads=2", "bias='l1'", "theta_mode='mean_f0'", "cross=True"):
        assert part in text
    assert "num_kv_heads" not in repr(ek.RopeAttention(64, 4))


def test_meta_device_runs_shapes_only():
    # Deferred initialisation and shape inference build and run layers on the meta device,
    # where the value checks (lengths in range, f0 finite) have nothing to read.
    with torch.device("meta"):
        layer = ek.RopeAttention(64, 4, num_kv_heads=2)
        x, f0, lengths = torch.randn(2, 10, 64), torch.rand(2, 10), torch.tensor([10, 7])
        out = layer(x, f0, lengths=lengths, causal=True)
        out.sum().backward()
    assert out.shape == (2, 10, 64) and out.device.type == "meta"
    assert layer.q_proj.weight.grad.shape == (64, 64)


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
@pytest.mark.parametrize("with_f0", [True, False])
def test_cached_decoding_gives_the_last_rows_of_a_causal_pass_over_the_prefix(backend, with_f0):
    # The pitch statistics (mean, spread) are those of the tokens so far, as a causal pass over
    # the prefix computes them: decoding cannot know the rest.
    torch.manual_seed(6)
    layer = ek.RopeAttention(32, 4, num_kv_heads=2, backend=backend).double()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    f0 = (80 + 150 * torch.rand(3, 11, dtype=torch.float64)) * (torch.rand(3, 11) > 0.3) if with_f0 else None

    def upto(t, end):
        return None if t is None else t[:, :end]

    cache = layer.new_cache()
    with torch.no_grad():
        for a, b in [(0, 4)] + [(t, t + 1) for t in range(4, 11)]:  # a prompt, then one token at a time
            step = layer(x[:, a:b], None if f0 is None else f0[:, a:b], causal=True, cache=cache)
            prefix = layer(x[:, :b], upto(f0, b), causal=True)
            torch.testing.assert_close(step, prefix[:, a:b], rtol=0, atol=1e-12)
    assert len(cache) == 11
    # A beam search hands each row its parent's cache: rows 2, 0, 0 continue as three sequences.
    index = torch.tensor([2, 0, 0])
    cache.reorder(index)
    extra = torch.randn(3, 1, 32, dtype=torch.float64)
    extra_f0 = None if f0 is None else torch.full((3, 1), 120.0, dtype=torch.float64)
    with torch.no_grad():
        step = layer(extra, extra_f0, causal=True, cache=cache)
        whole = layer(torch.cat([x[index], extra], 1), None if f0 is None else torch.cat([f0[index], extra_f0], 1),
                      causal=True)
    torch.testing.assert_close(step, whole[:, -1:], rtol=0, atol=1e-12)


def test_cache_misuse_is_named():
    layer, cache = ek.RopeAttention(16, 2), ek.RopeAttention(16, 2).new_cache()
    x, f0 = torch.randn(2, 3, 16), torch.rand(2, 3) * 200
    with pytest.raises(ValueError, match="empty cache has no rows"):
        cache.reorder(torch.tensor([0]))
    layer(x, f0, causal=True, cache=cache)
    with pytest.raises(ValueError, match="holds 2 sequences with f0; got x for 1 with f0"):
        layer(x[:1], f0[:1], cache=cache)
    with pytest.raises(ValueError, match="holds 2 sequences with f0; got x for 2 without f0"):
        layer(x, cache=cache)
    with pytest.raises(ValueError, match="lengths cannot be combined with cache"):
        layer(x, f0, lengths=torch.tensor([3, 2]), cache=cache)
    with pytest.raises(ValueError, match="cache is for self-attention"):
        ek.RopeAttention(16, 2, cross=True)(x, context=x, cache=cache)
    with pytest.raises(TypeError, match="cache must come from RopeAttention.new_cache"):
        layer(x, f0, cache={"k": None})


def test_a_cached_step_reads_only_the_new_tokens_f0(monkeypatch):
    # The cached f0 was checked when its tokens were new; a step reads (a host sync on GPU) the
    # new tokens' values once.
    torch.manual_seed(0)
    layer, cache = ek.RopeAttention(16, 2), ek.RopeAttention(16, 2).new_cache()
    x, f0 = torch.randn(2, 5, 16), 100 + 100 * torch.rand(2, 5)
    layer(x[:, :4], f0[:, :4], causal=True, cache=cache)
    checked = []
    original = ek.features.check_f0

    def counted(t, name="f0"):
        checked.append(t.shape[1])
        return original(t, name)

    monkeypatch.setattr(ek.features, "check_f0", counted)
    monkeypatch.setattr(ek.modules, "check_f0", counted)
    layer(x[:, 4:], f0[:, 4:], causal=True, cache=cache)
    assert checked == [1]
    # Checked in the cache's dtype: 70000 Hz fits float32 but is inf in a float16 cache.
    half = ek.RopeAttention(16, 2).new_cache()
    layer(x[:, :1], f0[:, :1].half(), causal=True, cache=half)
    with pytest.raises(ValueError, match="f0 must be finite"):
        layer(x[:, 1:2], torch.full((2, 1), 7e4), causal=True, cache=half)

"""Echo model: shapes, padding invariance, causality, the pitch-off switch, config validation."""

import pytest
import torch

from echo.model import Dropout, Echo, EchoConfig, _heads, conv_over_time, dense_attention_weights

TINY = {"d_model": 32, "n_heads": 4, "enc_layers": 2, "dec_layers": 2, "ffn_dim": 64, "dropout": 0.0, "backend": "chunked"}


def _model(seed: int = 0, **kw) -> Echo:
    torch.manual_seed(seed)
    return Echo(EchoConfig(**{**TINY, **kw})).eval()


def _batch(lengths=(40, 27, 13), token_lengths=(9, 6, 4), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, t, u = len(lengths), max(lengths), max(token_lengths)
    mel = torch.randn(b, t, 80, generator=g)
    f0 = 100 + 150 * torch.rand(b, t, generator=g)
    f0[:, ::4] = 0  # some unvoiced frames
    tokens = torch.randint(4, 42, (b, u), generator=g)
    tokens[:, 0] = 1
    tf0 = 100 + 150 * torch.rand(b, u, generator=g)
    for i, (lt, lu) in enumerate(zip(lengths, token_lengths)):
        mel[i, lt:] = 0
        f0[i, lt:] = 0
        tokens[i, lu - 1] = 2
        tokens[i, lu:] = 0
        tf0[i, lu:] = 0
    return mel, torch.tensor(lengths), f0, tokens, torch.tensor(token_lengths), tf0


def test_shapes_and_loss():
    m = _model()
    mel, ml, f0, tok, tl, tf0 = _batch()
    enc = m.encode(mel, ml, f0)
    assert enc.states.shape == (3, 20, 32)
    assert enc.lengths.tolist() == [20, 14, 7]
    assert enc.f0.shape == (3, 20)
    logits, _ = m.decode(tok[:, :-1], tl - 1, enc, tf0[:, :-1])
    assert logits.shape == (3, 8, 42)
    out = m.train()(mel, ml, f0, tok, tl, tf0)
    assert set(out) >= {"loss", "att_loss", "ctc_loss"}
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.conv1.weight.grad is not None and torch.isfinite(m.conv1.weight.grad).all()


def test_intermediate_ctc_mixes_the_middle_block_into_the_ctc_loss():
    batch = _batch()
    plain, inter = _model(enc_layers=4), _model(enc_layers=4, inter_ctc=0.4)
    assert inter.encode(*batch[:3]).middle is not None and plain.encode(*batch[:3]).middle is None
    out_plain, out = plain.train()(*batch), inter.train()(*batch)
    # Same weights (same seed, no extra parameters): the final CTC term is unchanged, and the
    # middle block's own CTC loss (a different, larger one this early) takes a 0.4 share.
    final = out_plain["ctc_loss"]
    assert not torch.allclose(out["inter_ctc_loss"], final)
    torch.testing.assert_close(out["ctc_loss"], 0.6 * final + 0.4 * out["inter_ctc_loss"])
    torch.testing.assert_close(out["att_loss"], out_plain["att_loss"])
    # The extra term trains the blocks below the middle: their gradients must change.
    out["loss"].backward()
    out_plain["loss"].backward()
    lower = inter.encoder[0].mlp.fc1.weight.grad, plain.encoder[0].mlp.fc1.weight.grad
    assert not torch.allclose(*lower)


@pytest.mark.parametrize(("subsample", "frames", "lengths"), [(3, 14, [14, 9, 5]), (4, 10, [10, 7, 4])])
def test_subsample_sets_the_encoder_frame_rate(subsample, frames, lengths):
    m = _model(subsample=subsample)
    mel, ml, f0, tok, tl, tf0 = _batch()  # mel lengths 40, 27, 13
    enc = m.encode(mel, ml, f0)
    assert enc.states.shape == (3, frames, 32) and enc.lengths.tolist() == lengths and enc.f0.shape == (3, frames)
    assert torch.isfinite(m.train()(mel, ml, f0, tok, tl, tf0)["loss"])


@pytest.mark.parametrize(("pitch", "subsample"), [(True, 2), (False, 2), (True, 3)])
def test_padding_does_not_change_outputs(pitch, subsample):
    m = _model(pitch=pitch, subsample=subsample)
    mel, ml, f0, tok, tl, tf0 = _batch()
    with torch.no_grad():
        enc = m.encode(mel, ml, f0)
        logits, _ = m.decode(tok[:, :-1], tl - 1, enc, tf0[:, :-1])
        for i in range(3):
            lt, lu = int(ml[i]), int(tl[i]) - 1
            e1 = m.encode(mel[i:i + 1, :lt], ml[i:i + 1], f0[i:i + 1, :lt])
            torch.testing.assert_close(e1.states[0], enc.states[i, : e1.states.shape[1]], atol=1e-5, rtol=1e-4)
            l1, _ = m.decode(tok[i:i + 1, :lu], tl[i:i + 1] - 1, e1, tf0[i:i + 1, :lu])
            torch.testing.assert_close(l1[0], logits[i, :lu], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("groups, kernel, stride, dilation, padding, mode, c_out, bias, length", [
    (6, 5, 1, 1, 2, "zeros", 6, True, 23), (3, 15, 1, 1, 7, "zeros", 6, True, 23),
    (6, 3, 1, 2, 2, "zeros", 6, True, 23), (6, 5, 1, 1, "same", "zeros", 6, True, 23),
    (6, 5, 1, 1, 2, "reflect", 6, True, 23),
    # Full convolutions (the front end's): windows copied (stride < kernel); windows tiling the
    # padded frames (stride = kernel) with right padding 1, 0 and -2 (frames the stride skips);
    # stride > kernel; wider output; no bias; dilated (the conv2d path).
    (1, 3, 2, 1, 1, "zeros", 6, True, 23), (1, 3, 1, 1, 1, "zeros", 9, True, 23),
    (1, 3, 3, 1, 1, "zeros", 9, True, 22), (1, 3, 3, 1, 1, "zeros", 9, True, 23),
    (1, 3, 3, 1, 0, "zeros", 4, False, 23), (1, 2, 5, 1, 0, "zeros", 6, True, 23),
    (1, 3, 2, 2, 1, "zeros", 6, True, 23),
])
def test_conv_over_time_matches_conv1d_values_and_gradients(groups, kernel, stride, dilation, padding, mode,
                                                            c_out, bias, length):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, c_out, kernel, stride=stride, dilation=dilation, padding=padding, groups=groups,
                           padding_mode=mode, bias=bias).double()
    x = torch.randn(3, length, 6, dtype=torch.float64, requires_grad=True)
    out = conv_over_time(conv, x)
    ref = conv(x.transpose(1, 2)).transpose(1, 2)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    params = (x, conv.weight) + ((conv.bias,) if bias else ())
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel, stride, padding, shape", [
    (2, 2, 0, (2, 10, 5)),  # windows tiling an input that is not contiguous
    (3, 1, 1, (2, 10, 5)),
    (1, 5, 2, (2, 1, 5)),   # the stride skips more frames than there are
    (3, 3, 1, (0, 10, 5)),  # empty batch
])
def test_conv_over_time_full_convolution_edge_cases(kernel, stride, padding, shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(5, 3, kernel, stride=stride, padding=padding)
    x = torch.randn(shape[0], shape[2], shape[1]).transpose(1, 2)  # [B, T, c], not contiguous for T > 1
    torch.testing.assert_close(conv_over_time(conv, x), conv(x.transpose(1, 2)).transpose(1, 2))


def test_encoder_convolution_starts_as_the_plain_mlp_and_ignores_padding():
    plain, conv = _model(), _model(conv_kernel=5)
    missing, unexpected = conv.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".mlp.conv." in name for name in missing)
    mel, ml, f0, _, _, _ = _batch()
    with torch.no_grad():
        start, ref = conv.encode(mel, ml, f0), plain.encode(mel, ml, f0)
        for i, n in enumerate(ref.lengths.tolist()):  # padding frames differ: the convolution zeroes them
            torch.testing.assert_close(start.states[i, :n], ref.states[i, :n])
        for block in conv.encoder:  # a trained convolution: every tap matters
            block.mlp.conv.weight.normal_()
            block.mlp.conv.bias.normal_()
        enc = conv.encode(mel, ml, f0)
        assert not torch.allclose(enc.states, plain.encode(mel, ml, f0).states, atol=1e-3)
        for i in range(3):
            lt = int(ml[i])
            e1 = conv.encode(mel[i:i + 1, :lt], ml[i:i + 1], f0[i:i + 1, :lt])
            torch.testing.assert_close(e1.states[0], enc.states[i, : e1.states.shape[1]], atol=1e-5, rtol=1e-4)


def test_decoder_is_causal():
    m = _model()
    mel, ml, f0, tok, _tl, tf0 = _batch(lengths=(30,), token_lengths=(10,))
    with torch.no_grad():
        enc = m.encode(mel, ml, f0)
        base, _ = m.decode(tok, None, enc, tf0)
        tok2, tf02 = tok.clone(), tf0.clone()
        tok2[:, 6:] = torch.randint(4, 42, (1, 4))
        tf02[:, 6:] = 0.0  # future pitch must not leak either (features use utterance statistics)
        changed, _ = m.decode(tok2, None, enc, tf02)
    torch.testing.assert_close(changed[:, :6], base[:, :6], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(changed[:, 6:], base[:, 6:])


def test_pitch_off_ignores_f0():
    m = _model(pitch=False)
    mel, ml, f0, tok, tl, tf0 = _batch()
    with torch.no_grad():
        a = m(mel, ml, f0, tok, tl, tf0)["loss"]
        b = m(mel, ml, 2.5 * f0 + 30 * (f0 == 0), tok, tl, torch.rand_like(tf0) * 300)["loss"]
        c = m(mel, ml, None, tok, tl, None)["loss"]
    assert torch.equal(a, b) and torch.equal(a, c)
    for block in m.encoder:
        assert block.attn.bias is None and block.attn.theta_mode == "fixed" and block.attn.radius_mode == "unit"


def test_pitch_on_uses_f0():
    m = _model()
    mel, ml, f0, tok, tl, tf0 = _batch()
    with torch.no_grad():
        a = m(mel, ml, f0, tok, tl, tf0)["loss"]
        b = m(mel, ml, 1.5 * f0, tok, tl, tf0)["loss"]
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="f0"):
        m.encode(mel, ml, None)


def test_attended_token_f0_is_what_decoding_estimates():
    """Training's "attended" token f0 equals decoding's own estimates for the same tokens: token u's
    f0 comes from the cross-attention of the query at u - 1 that predicted it, on its prefix only."""
    m = _model(decoder_f0="attended")
    mel, ml, f0, tok, tl, _ = _batch()
    with torch.no_grad():
        enc = m.encode(mel, ml, f0)
        decoded = torch.zeros(tok.shape)
        for u in range(1, tok.shape[1]):  # what greedy decoding (no cache) computes, token by token
            _, cross = m.decode(tok[:, :u], None, enc, decoded[:, :u], return_cross=True)
            decoded[:, u] = m.estimate_token_f0(cross[:, -1], enc)
    valid = torch.arange(tok.shape[1])[None, :] < tl[:, None]
    decoded = decoded * valid
    assert (decoded[:, 1:][valid[:, 1:]] > 0).any() and decoded[0, 0] == 0
    attended = m.attended_token_f0(tok, tl, enc, decoded)
    torch.testing.assert_close(attended, decoded, atol=1e-3, rtol=1e-5)
    # From other first-pass values the estimate moves (one step of the fixed point), padding stays 0.
    other = m.attended_token_f0(tok, tl, enc, None)
    assert not torch.allclose(other, decoded) and (other[~valid] == 0).all()


def test_decode_with_given_cross_kv_and_weights_only_matches_the_full_pass():
    """The training shortcuts (keys/values projected once, the f0 pass cut after the last
    layer's weights) change no value."""
    m = _model(decoder_f0="attended")
    mel, ml, f0, tok, tl, tf0 = _batch()
    with torch.no_grad():
        enc = m.encode(mel, ml, f0)
        logits, cross = m.decode(tok, tl, enc, tf0, return_cross=True)
        given, cross_given = m.decode(tok, tl, enc, tf0, return_cross=True, cross_kv=m.cross_kv(enc))
        none, cross_only = m.decode(tok, tl, enc, tf0, weights_only=True)
    assert none is None and cross.shape == (3, tok.shape[1], enc.states.shape[1])
    torch.testing.assert_close(given, logits, rtol=0, atol=0)
    torch.testing.assert_close(cross_given, cross, rtol=0, atol=0)
    torch.testing.assert_close(cross_only, cross, rtol=0, atol=0)
    # Given keys/values are the ones used: other values change the logits.
    other = [(k, 2 * v) for k, v in m.cross_kv(enc)]
    assert not torch.allclose(m.decode(tok, tl, enc, tf0, cross_kv=other)[0], logits)


def test_attended_token_f0_changes_the_loss_and_trains():
    mel, ml, f0, tok, tl, tf0 = _batch()
    attended, aligned = _model(decoder_f0="attended").train(), _model(decoder_f0="aligned").train()
    out = attended(mel, ml, f0, tok, tl, tf0)
    assert not torch.allclose(out["att_loss"], aligned(mel, ml, f0, tok, tl, tf0)["att_loss"])
    # The given (equal-span) token f0 only seeds the first pass; the loss stays finite and trains.
    out["loss"].backward()
    grads = [p.grad for p in attended.decoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # The loss pass's cross-attention keys/values stay in the graph (the f0 pass gets detached copies).
    for block in attended.decoder:
        for proj in (block.cross_attn.k_proj, block.cross_attn.v_proj):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_dense_weights_match_the_layer():
    """The display formula reproduces the kernel's attention (weights @ V == layer output)."""
    m = _model()
    attn = m.encoder[0].attn
    x = torch.randn(2, 11, 32)
    f0 = 100 + 100 * torch.rand(2, 11)
    f0[:, ::3] = 0
    lengths = torch.tensor([11, 7])
    with torch.no_grad():
        out = attn(x, f0, lengths=lengths)
        q, k, v = _heads(attn.q_proj(x), 4), _heads(attn.k_proj(x), 4), _heads(attn.v_proj(x), 4)
        feats = attn.features(f0, 2, 11, lengths, torch.float32, x.device)
        w = dense_attention_weights(attn, q, k, feats, feats, q_lengths=lengths, k_lengths=lengths)
        ref = attn.out_proj((w @ v).transpose(1, 2).reshape(2, 11, 32))
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, :7], ref[1, :7], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w[1, :, :7].sum(-1), torch.ones(4, 7))


def test_encoder_attention_maps():
    m = _model()
    maps = m.encoder_attention_maps(torch.randn(25, 80), 120 + 10 * torch.rand(25))
    assert len(maps) == 2 and maps[0].shape == (4, 13, 13)
    assert abs(maps[1].sum(-1) - 1).max() < 1e-4


@pytest.mark.parametrize("bad", [
    {"d_model": 30}, {"n_heads": 3}, {"theta_mode": "log"}, {"radius_mode": "x"}, {"bias": "l2"},
    {"ctc_weight": 1.0}, {"decoder_f0": "token"}, {"enc_layers": 0}, {"n_kv_heads": 3}, {"subsample": 5},
    {"conv_kernel": 4}, {"conv_kernel": -3}, {"conv_kernel": True},
    {"inter_ctc": 1.0}, {"inter_ctc": -0.1}, {"inter_ctc": 0.3, "ctc_weight": 0.0}, {"inter_ctc": 0.3, "enc_layers": 1},
])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        EchoConfig(**{**TINY, **bad})


def test_unknown_config_key_raises():
    with pytest.raises(ValueError, match="unknown"):
        EchoConfig.from_dict({"d_modle": 64})
    with pytest.raises(TypeError):
        Echo({"d_model": 64})


def test_plain_cross_attention_fast_path_matches_rope_attention():
    """Cross-attention goes through SDPA (no rotation/radius/bias); it must equal the kernel's result."""
    from echo.model import attend, plain_features, project_kv, project_q

    m = _model(n_kv_heads=2)
    attn = m.decoder[0].cross_attn
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    ql, kl = torch.tensor([5, 3]), torch.tensor([9, 4])
    with torch.no_grad():
        ref = attn(x, context=ctx, lengths=ql, context_lengths=kl)
        k, v = project_kv(attn, ctx)
        fast = attend(attn, project_q(attn, x), k, v, plain_features(2, 5, 1e4, x.device), plain_features(2, 9, 1e4, x.device),
                      causal=False, q_lengths=ql, k_lengths=kl)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast[1, :3], ref[1, :3], atol=1e-5, rtol=1e-4)


def test_cpu_dropout_drops_k_over_256_and_keeps_the_expectation():
    drop = Dropout(0.1)  # k = round(25.6) = 26 of 256
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 26 / 256) < 0.002
    assert torch.allclose(y[kept], torch.full_like(y[kept], 256 / 230))
    assert abs(y.mean().item() - 1.0) < 0.003
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the same scaled mask
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the global generator decides (exact resume)
    drop.eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(Dropout(0.001).train()(x), x)  # rounds to k = 0: nothing dropped

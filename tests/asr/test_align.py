"""Token-aligned and downsampled f0 on hand-made cases."""

import torch

from echo.align import downsample_f0, lengths_to_mask, token_f0


def _tok(b: int, u: int) -> torch.Tensor:
    return torch.zeros(b, u, dtype=torch.long)


def test_token_f0_exact_values_with_padding() -> None:
    f0 = torch.tensor([[100.0, 0, 200, 300, 0, 0, 400, 500],
                       [120.0, 120, 0, 0, 0, 0, 0, 0]])
    out = token_f0(f0, torch.tensor([8, 3]), _tok(2, 5), torch.tensor([5, 3]))
    # row 0: 4 spans of 2 frames: (100, 0) (200, 300) (0, 0) (400, 500); BOS copies span 0
    # row 1: 3 valid frames, 2 spans: frames {0, 1} -> 120, {2} unvoiced -> 0; tokens
    # 3, 4 are padding -> 0 (and the padded frames 3..7 are ignored)
    expected = torch.tensor([[100.0, 100, 250, 0, 450], [120.0, 120, 0, 0, 0]])
    assert torch.equal(out, expected)
    assert out.dtype == torch.float32


def test_token_f0_no_voiced_frames() -> None:
    f0 = torch.zeros(1, 10)
    out = token_f0(f0, torch.tensor([10]), _tok(1, 4), torch.tensor([4]))
    assert torch.equal(out, torch.zeros(1, 4))


def test_token_f0_one_token_after_bos_and_bos_only() -> None:
    f0 = torch.tensor([[100.0, 200, 0, 300], [150.0, 150, 150, 150]])
    out = token_f0(f0, torch.tensor([4, 4]), _tok(2, 2), torch.tensor([2, 1]))
    # one span covering all valid frames -> mean of voiced = 200; BOS-only row -> 0
    assert torch.equal(out, torch.tensor([[200.0, 200.0], [0.0, 0.0]]))


def test_token_f0_more_tokens_than_frames_and_no_bos() -> None:
    f0 = torch.tensor([[100.0, 200.0]])
    out = token_f0(f0, torch.tensor([2]), _tok(1, 4), torch.tensor([4]), has_bos=False)
    # 4 spans over 2 frames: span = floor(t * 4 / 2) -> frames land in spans 0 and 2
    assert torch.equal(out, torch.tensor([[100.0, 0.0, 200.0, 0.0]]))


def test_token_f0_uneven_spans() -> None:
    # 7 frames, 3 spans: floor(t * 3 / 7) = 0 0 0 1 1 2 2
    f0 = torch.tensor([[10.0, 20, 30, 40, 0, 60, 80]])
    out = token_f0(f0, torch.tensor([7]), _tok(1, 4), torch.tensor([4]))
    assert torch.allclose(out, torch.tensor([[20.0, 20.0, 40.0, 70.0]]))


def test_token_f0_batch_matches_single() -> None:
    g = torch.Generator().manual_seed(0)
    f0 = torch.rand(3, 50, generator=g) * 200
    f0[f0 < 60] = 0
    fl, tl = torch.tensor([50, 31, 7]), torch.tensor([9, 12, 3])
    batch = token_f0(f0, fl, _tok(3, 12), tl)
    for b in range(3):
        single = token_f0(f0[b:b + 1, : fl[b]], fl[b:b + 1], _tok(1, int(tl[b])), tl[b:b + 1])
        assert torch.allclose(batch[b, : tl[b]], single[0])
        assert torch.all(batch[b, tl[b]:] == 0)


def test_downsample_f0() -> None:
    f0 = torch.tensor([[100.0, 0, 0, 0, 200, 300, 50], [80.0, 90, 100, 0, 0, 0, 0]])
    out, lengths = downsample_f0(f0, torch.tensor([7, 3]))
    assert out.shape == (2, 4)  # (7 + 1) // 2
    assert torch.equal(lengths, torch.tensor([4, 2]))
    # Windows {0}, {1, 2}, {3, 4}, {5, 6}: centred on frames 0, 2, 4, 6 up to half a frame.
    assert torch.equal(out, torch.tensor([[100.0, 0, 200, 175], [80.0, 95, 0, 0]]))


def test_downsample_f0_window_is_centred_on_the_conv_receptive_field() -> None:
    # Stride 3: encoder frame k sees mel frames 3k - 2 .. 3k + 2 (two kernel-3 convolutions),
    # so its f0 is the mean over 3k - 1 .. 3k + 1, not 3k .. 3k + 2 (10 ms late at 10 ms hops).
    f0 = torch.tensor([[0.0, 0, 120, 150, 180, 200, 0, 0, 0]])
    out, lengths = downsample_f0(f0, torch.tensor([9]), stride=3)
    assert torch.equal(lengths, torch.tensor([3]))
    assert torch.equal(out, torch.tensor([[0.0, 150, 200]]))


def test_downsample_even_length_and_mask() -> None:
    out, lengths = downsample_f0(torch.full((1, 6), 120.0), torch.tensor([6]))
    assert out.shape == (1, 3) and torch.equal(lengths, torch.tensor([3]))
    assert torch.equal(lengths_to_mask(torch.tensor([1, 3]), 3),
                       torch.tensor([[True, False, False], [True, True, True]]))

"""Moving frame-level f0 onto other time axes: decoder tokens and encoder frames.

All functions are batched over padded tensors with explicit lengths and contain no
Python loop over tokens or frames. Convention everywhere: f0 in Hz, float32, 0 means
unvoiced; padding sits at the end; lengths are integer tensors ``[B]``.
"""

from __future__ import annotations

import torch


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B]`` lengths -> ``[B, max_len]`` bool mask, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _voiced_mean(values: torch.Tensor, voiced: torch.Tensor, index: torch.Tensor,
                 size: int) -> torch.Tensor:
    """Mean of ``values`` over voiced entries grouped by ``index`` (all ``[B, T]``).

    Returns ``[B, size]``; a group with no voiced entry gets 0. One scatter_add for the
    sums and one for the counts replace a loop over groups.
    """
    w = voiced.to(values.dtype)
    sums = values.new_zeros(values.shape[0], size).scatter_add_(1, index, values * w)
    counts = values.new_zeros(values.shape[0], size).scatter_add_(1, index, w)
    return torch.where(counts > 0, sums / counts.clamp(min=1.0), torch.zeros_like(sums))


def token_f0(f0: torch.Tensor, f0_lengths: torch.Tensor, tokens: torch.Tensor,
             token_lengths: torch.Tensor, *, has_bos: bool = True) -> torch.Tensor:
    """Per-token f0 for the decoder, ``[B, U]`` float32.

    Args:
        f0: ``[B, T]`` frame f0 (Hz, 0 = unvoiced, any float dtype).
        f0_lengths: ``[B]`` valid frame counts L_b.
        tokens: ``[B, U]`` token ids; only its shape and device are used.
        token_lengths: ``[B]`` valid token counts (including BOS/EOS if present).
        has_bos: token 0 is a BOS with no audio of its own.

    Each utterance's valid frames are cut into ``n_b`` spans of uniform duration, one per
    token after BOS (``n_b = token_lengths[b] - 1`` with BOS): frame ``t < L_b`` goes to
    span ``floor(t * n_b / L_b)``. A token's value is the mean f0 of the *voiced* frames
    of its span, 0 if it has none (silence, or more tokens than frames). The BOS token
    copies the first span's value. Padding tokens (``u >= token_lengths[b]``) are 0.
    """
    t_max = f0.shape[1]
    u_max = tokens.shape[1]
    offset = 1 if has_bos else 0
    f0 = f0.float()
    f0_lengths = f0_lengths.to(f0.device).long()
    n_spans = (token_lengths.to(f0.device).long() - offset).clamp(min=0)
    t = torch.arange(t_max, device=f0.device)[None, :]
    valid = lengths_to_mask(f0_lengths, t_max) & (n_spans[:, None] > 0)
    # Integer arithmetic for the span index: exact, no float boundary jitter.
    span = (t * n_spans[:, None]) // f0_lengths.clamp(min=1)[:, None]
    index = torch.where(valid, span + offset, torch.zeros_like(span)).clamp(max=u_max - 1)
    out = _voiced_mean(f0, valid & (f0 > 0), index, u_max)
    if has_bos and u_max > 1:
        out[:, 0] = out[:, 1]
    return out


def downsample_f0(f0: torch.Tensor, lengths: torch.Tensor, stride: int = 2
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """f0 at the encoder frame rate after a conv front end of stride ``stride``.

    ``[B, T]`` -> (``[B, ceil(T / stride)]`` float32, lengths ``ceil(L / stride)``): the
    output length of a kernel-3, padding-1 convolution of that stride (for stride 2,
    ``(T + 1) // 2``). Output frame k averages the voiced, valid input frames of the window
    ``k*stride - stride//2 .. k*stride - stride//2 + stride - 1`` (an utterance's last frame also
    takes its tail); 0 if none of them is voiced. The window is centred where the convolutions' receptive
    field is, on input frame ``k*stride`` (half a frame early for even strides): a window starting
    there would pair each encoder frame with the f0 (stride - 1) / 2 frames later.
    """
    t_max = f0.shape[1]
    t_out = (t_max + stride - 1) // stride
    lengths = lengths.to(f0.device).long()
    f0 = f0.float()
    voiced = lengths_to_mask(lengths, t_max) & (f0 > 0)
    out_lengths = (lengths + stride - 1) // stride
    index = (torch.arange(t_max, device=f0.device) + stride // 2) // stride
    # Per utterance, so that its padding (and so the batch it sits in) never moves a frame.
    index = torch.minimum(index[None, :], (out_lengths[:, None] - 1).clamp(min=0))
    out = _voiced_mean(f0, voiced, index, t_out)
    return out, out_lengths

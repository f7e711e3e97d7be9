"""Pictures of Echo's pitch-aware attention.

    python -m echo.viz rope --wav FILE --out PNG
    python -m echo.viz attention --checkpoint CKPT --wav FILE --out PNG
    python -m echo.viz curves RUN_DIR [RUN_DIR ...] --out PNG [--labels A B ...]

``rope`` draws (a) the f0 contour, (b) the position-similarity matrices
``<rot(u, i), rot(u, j)>`` for one fixed vector u under plain RoPE (theta 10000, unit
radius) and under f0-driven theta with the f0 radius, and (c) the pitch-bias matrix
``exp(-|pitch_i - pitch_j|) * voiced_i * voiced_j``. ``attention`` draws per-layer,
per-head attention maps returned by ``echo.model.attention_maps``. ``curves`` compares
training runs from their TensorBoard logs (``RUN_DIR/tb``): dev CER and the attention
decoder's training loss against the step.

Figures have fixed pixel sizes (no tight bounding box): see :data:`ROPE_FIGSIZE`,
:data:`ATTN_CELL_INCHES` and :data:`DPI`.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    import matplotlib.figure

DPI = 100
ROPE_FIGSIZE = (15.0, 10.0)  # inches -> 1500 x 1000 px
ATTN_CELL_INCHES = 2.5  # each head/layer panel; grid of H x L panels -> 250*H x 250*L px
CURVES_FIGSIZE = (12.0, 4.5)  # inches -> 1200 x 450 px
CURVE_TAGS = ("dev/cer", "train/att_loss")  # what ``curves`` draws, one panel each
ABLATION_FIGSIZE = (10.0, 4.5)  # inches -> 1000 x 450 px


class Features(NamedTuple):
    """Per-token features of one sequence, each ``[T]`` float32 (spec field order)."""

    pos: torch.Tensor
    log_theta: torch.Tensor
    radius: torch.Tensor
    pitch: torch.Tensor
    voiced: torch.Tensor


def _pyplot():
    """pyplot on the Agg backend (headless: never needs a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fallback_pitch_features(f0: torch.Tensor, theta: float = 10000.0,
                             theta_mode: str = "f0", radius_mode: str = "f0") -> Features:
    """The spec's ``pitch_features`` for one unpadded ``[T]`` sequence (used only when
    ``echo_kernels`` cannot be imported)."""
    f0 = f0.float()
    if not bool(torch.isfinite(f0).all()) or bool((f0 < 0).any()):
        raise ValueError("f0 must be finite and non-negative")
    voiced = (f0 > 0).float()
    n = int(voiced.sum())
    mu = f0[f0 > 0].mean() if n else None
    sigma = f0[f0 > 0].std(unbiased=False) if n >= 2 else torch.tensor(1.0)
    pitch = ((f0 - mu) / (sigma + 1e-6)) * voiced if mu is not None else torch.zeros_like(f0)
    log_base = torch.full_like(f0, math.log(theta))
    if theta_mode == "fixed":
        log_theta = log_base
    elif theta_mode == "f0":
        fill = torch.log(mu).expand_as(f0) if mu is not None else log_base
        log_theta = torch.where(voiced > 0, torch.log(f0.clamp(min=1e-6)), fill)
    elif theta_mode == "mean_f0":
        log_theta = torch.log(mu).expand_as(f0).clone() if mu is not None else log_base
    elif theta_mode == "f0_offset":
        log_theta = torch.log(f0 + theta)
    else:
        raise ValueError(f"unknown theta_mode {theta_mode!r}")
    if radius_mode == "unit":
        radius = torch.ones_like(f0)
    elif radius_mode == "f0":
        radius = f0.clamp(40.0, 600.0) / 600.0
    else:
        raise ValueError(f"unknown radius_mode {radius_mode!r}")
    pos = torch.arange(f0.shape[0], dtype=torch.float32)
    return Features(pos, log_theta, radius, pitch, voiced)


def pitch_features_1d(f0: torch.Tensor, *, theta: float = 10000.0, theta_mode: str = "f0",
                      radius_mode: str = "f0") -> Features:
    """Features for one ``[T]`` f0 contour: ``echo_kernels.pitch_features`` if importable,
    else the local fallback written from the spec."""
    try:
        from echo_kernels import pitch_features
    except (ImportError, AttributeError, OSError, RuntimeError):
        return _fallback_pitch_features(f0, theta, theta_mode, radius_mode)
    feats = pitch_features(f0.float()[None], theta=theta, theta_mode=theta_mode,
                           radius_mode=radius_mode)
    return Features(*(x[0].float() for x in feats))


def rotate(u: torch.Tensor, pos: torch.Tensor, log_theta: torch.Tensor,
           radius: torch.Tensor) -> torch.Tensor:
    """``rot(u, t)`` for every t: u ``[D]`` (D even), features ``[T]`` -> complex ``[T, D/2]``.

    omega_{t,m} = exp(-(2m / D) * log_theta_t), phi = pos_t * omega_{t,m}; the pair
    (u_{2m}, u_{2m+1}) is multiplied by ``polar(r_t, phi_{t,m})`` (the spec's form).
    """
    d = u.shape[-1]
    p = d // 2
    m = torch.arange(p, dtype=torch.float64)
    omega = torch.exp(-(2.0 * m / d)[None, :] * log_theta.double()[:, None])
    phi = pos.double()[:, None] * omega
    z = torch.view_as_complex(u.double().reshape(p, 2).contiguous())
    return z[None, :] * torch.polar(radius.double()[:, None].expand_as(phi), phi)


def rotation_similarity(u: torch.Tensor, pos: torch.Tensor, log_theta: torch.Tensor,
                        radius: torch.Tensor) -> np.ndarray:
    """``S[i, j] = <rot(u, i), rot(u, j)>`` (real dot product), ``[T, T]`` float64."""
    z = rotate(u, pos, log_theta, radius)
    return (z @ z.conj().transpose(0, 1)).real.numpy()


def pitch_bias_matrix(pitch: torch.Tensor, voiced: torch.Tensor, beta: float = 1.0
                      ) -> np.ndarray:
    """``exp(-beta * |pitch_i - pitch_j|) * voiced_i * voiced_j``, ``[T, T]`` float64."""
    p, v = pitch.double(), voiced.double()
    return (torch.exp(-beta * (p[:, None] - p[None, :]).abs()) * v[:, None] * v[None, :]).numpy()


def plot_rope(f0: torch.Tensor, out_path: str | Path, *, dim: int = 64,
              theta: float = 10000.0, title: str = "", frame_s: float = 0.01) -> None:
    """Write the three-part vRoPE picture for an f0 contour ``[T]`` (Hz, 0 = unvoiced)."""
    t_len = f0.shape[0]
    u = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = u / u.norm()  # unit vector: plain RoPE then has S[i, i] = 1
    pos = torch.arange(t_len, dtype=torch.float32)
    plain = rotation_similarity(u, pos, torch.full((t_len,), math.log(theta)),
                                torch.ones(t_len))
    feats = pitch_features_1d(f0, theta=theta, theta_mode="f0", radius_mode="f0")
    vrope = rotation_similarity(u, feats.pos, feats.log_theta, feats.radius)
    bias = pitch_bias_matrix(feats.pitch, feats.voiced)

    plt = _pyplot()
    fig = plt.figure(figsize=ROPE_FIGSIZE, dpi=DPI)
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 2.2], hspace=0.3, wspace=0.45)
    ax = fig.add_subplot(grid[0, :])
    t = np.arange(t_len) * frame_s
    f0n = f0.numpy().astype(float)
    ax.plot(t, np.where(f0n > 0, f0n, np.nan), color="tab:blue", lw=1.5)
    ax.set_xlim(0, max(t_len - 1, 1) * frame_s)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("f0 (Hz)")
    ax.set_title(f"(a) f0 contour {title}".strip())
    panels = [
        (plain, f"(b) plain RoPE, theta={theta:g}, r=1", "RdBu_r", True),
        (vrope, "(b) f0-driven theta + f0 radius", "RdBu_r", True),
        (bias, "(c) pitch bias exp(-|p_i - p_j|) v_i v_j", "viridis", False),
    ]
    for k, (mat, name, cmap, symmetric) in enumerate(panels):
        ax = fig.add_subplot(grid[1, k])
        lim = float(np.abs(mat).max()) or 1.0
        kw = {"vmin": -lim, "vmax": lim} if symmetric else {"vmin": 0.0, "vmax": 1.0}
        im = ax.imshow(mat, cmap=cmap, origin="upper", interpolation="nearest", **kw)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("key frame j")
        ax.set_ylabel("query frame i")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"<rot(u,i), rot(u,j)> for a fixed unit u, D={dim}")
    _save(fig, out_path)


def plot_attention_maps(maps: Sequence[np.ndarray], titles: Sequence[str],
                        out_path: str | Path) -> None:
    """Grid PNG of attention maps: one row per layer, one column per head.

    ``maps[l]`` is ``[H, Tq, Tk]`` (rows: queries); ``titles[l]`` labels layer l. Layers
    with fewer heads leave blank cells. Size: ``ATTN_CELL_INCHES * DPI`` pixels per cell.
    """
    if len(maps) == 0 or len(maps) != len(titles):
        raise ValueError("need one title per attention map and at least one map")
    maps = [np.asarray(m) for m in maps]
    for m in maps:
        if m.ndim != 3:
            raise ValueError(f"each map must be [H, Tq, Tk], got shape {m.shape}")
    n_layers, n_heads = len(maps), max(m.shape[0] for m in maps)
    plt = _pyplot()
    fig, axes = plt.subplots(n_layers, n_heads, squeeze=False, dpi=DPI,
                             figsize=(ATTN_CELL_INCHES * n_heads, ATTN_CELL_INCHES * n_layers))
    for row, (m, name) in enumerate(zip(maps, titles, strict=True)):
        for h in range(n_heads):
            ax = axes[row][h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= m.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(m[h], aspect="auto", origin="upper", cmap="magma", interpolation="nearest")
            ax.set_title(f"{name} h{h}", fontsize=8)
    fig.tight_layout()
    _save(fig, out_path)


def read_scalars(run_dir: str | Path, tags: Sequence[str] = CURVE_TAGS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tag: (steps, values)}`` from the TensorBoard log of a training run (``run_dir/tb``, or
    ``run_dir`` itself when it holds the event files); tags the log lacks are left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(run_dir)
    log = path / "tb" if (path / "tb").is_dir() else path
    if not any(log.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"no TensorBoard events under {log}")
    acc = EventAccumulator(str(log), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    found = set(acc.Tags()["scalars"])
    out = {}
    for tag in tags:
        if tag in found:
            events = acc.Scalars(tag)
            out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return out


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (the first points average what there is so far)."""
    if window <= 1 or values.size == 0:
        return values.astype(float)
    csum = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_curves(runs: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], out_path: str | Path,
                *, smooth_window: int = 20) -> None:
    """Side-by-side panels of :data:`CURVE_TAGS` for several runs (``{label: read_scalars(...)}``);
    losses (logged every few steps) are smoothed over ``smooth_window`` points."""
    if not runs:
        raise ValueError("plot_curves needs at least one run")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVE_TAGS), dpi=DPI, figsize=CURVES_FIGSIZE, squeeze=False)
    for ax, tag in zip(axes[0], CURVE_TAGS, strict=True):
        for label, scalars in runs.items():
            if tag not in scalars:
                continue
            steps, values = scalars[tag]
            if tag == "dev/cer":
                ax.plot(steps, 100 * values, marker="o", label=label)
            else:
                ax.plot(steps, smooth(values, smooth_window), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("dev CER (%)" if tag == "dev/cer" else f"{tag} (mean of {smooth_window} logs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_path)


def plot_ablation(runs: dict[str, list[dict[str, float]]], metrics: Sequence[tuple[str, str]],
                  out_path: str | Path) -> None:
    """Grouped bars: for each variant (``{label: [row per seed]}``), the seed mean of every
    ``(key, name)`` metric (fractions, drawn in %), each seed's value as a dot on its bar."""
    if not runs:
        raise ValueError("plot_ablation needs at least one variant")
    plt = _pyplot()
    fig, ax = plt.subplots(dpi=DPI, figsize=ABLATION_FIGSIZE)
    width = 0.8 / len(metrics)
    centers = np.arange(len(runs))
    for m, (key, name) in enumerate(metrics):
        x = centers + (m - (len(metrics) - 1) / 2) * width
        seeds = [[100 * r[key] for r in rows if key in r] for rows in runs.values()]
        ax.bar(x, [np.mean(v) if v else np.nan for v in seeds], width, label=name, alpha=0.8)
        for xi, values in zip(x, seeds, strict=True):
            ax.plot([xi] * len(values), values, "k.", markersize=4)
    ax.set_xticks(centers, [textwrap.fill(label, 20) for label in runs], fontsize=8)
    ax.set_ylabel("%")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_path)


def _save(fig: matplotlib.figure.Figure, out_path: str | Path) -> None:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": the pixel size must stay figsize * DPI.
    fig.savefig(out, dpi=DPI)
    _pyplot().close(fig)


def _cmd_rope(args: argparse.Namespace) -> int:
    from echo.audio import extract_f0, load_audio

    f0 = extract_f0(load_audio(args.wav))
    if args.max_frames and f0.shape[0] > args.max_frames:
        f0 = f0[: args.max_frames]  # a [T, T] picture beyond ~500 frames is unreadable
    plot_rope(f0, args.out, dim=args.dim, theta=args.theta, title=f"({Path(args.wav).name})")
    print(f"wrote {args.out}")
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    try:
        from echo.model import attention_maps
    except ImportError as e:
        print(f"error: 'attention' needs echo.model.attention_maps, which is not available "
              f"({e})", file=sys.stderr)
        return 2
    maps = attention_maps(args.checkpoint, args.wav)
    plot_attention_maps(maps, [f"layer {i}" for i in range(len(maps))], args.out)
    print(f"wrote {args.out}")
    return 0


def _cmd_curves(args: argparse.Namespace) -> int:
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        print(f"error: {len(labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    plot_curves({label: read_scalars(run) for label, run in zip(labels, args.runs, strict=True)}, args.out,
                smooth_window=args.smooth)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m echo.viz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rope", help="f0 contour, RoPE/vRoPE similarity and pitch bias")
    r.add_argument("--wav", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--dim", type=int, default=64, help="head dimension D (even)")
    r.add_argument("--theta", type=float, default=10000.0, help="plain RoPE base")
    r.add_argument("--max-frames", type=int, default=500, help="crop longer files (0: no)")
    r.set_defaults(func=_cmd_rope)
    a = sub.add_parser("attention", help="per-layer attention maps of a trained model")
    a.add_argument("--checkpoint", required=True)
    a.add_argument("--wav", required=True)
    a.add_argument("--out", default="attention.png")
    a.set_defaults(func=_cmd_attention)
    c = sub.add_parser("curves", help="dev CER and training loss of several runs (TensorBoard logs)")
    c.add_argument("runs", nargs="+", help="run folders (out_dir of python -m echo train)")
    c.add_argument("--out", default="curves.png")
    c.add_argument("--labels", nargs="+", default=None, help="legend names (default: folder names)")
    c.add_argument("--smooth", type=int, default=20, help="trailing mean over this many loss logs")
    c.set_defaults(func=_cmd_curves)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

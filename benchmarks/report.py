"""``python -m benchmarks.report RESULTS.json [MORE.json ...] [--out STEM]``: a table of ratios and two plots.

Prints, per case and mode, each method's mean time and its ratio to plain SDPA (no
rotation, no bias), and writes ``<results>-time.png`` (time vs T per method, for the
sweep) and ``<results>-memory.png`` (peak memory vs T) beside the JSON, plus
``<results>.md`` holding the table with the device and versions it came from. Several
JSON files (say a forward run and a forward+backward run) make one table; ``--out``
names the stem (default: the first file's).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> tuple[list[dict], dict]:
    data = json.loads(path.read_text())
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if "method" in info:
            rows.append({**info, "mean_ms": bench["stats"]["mean"] * 1e3})
    return rows, data.get("machine_info", {})


def header(rows: list[dict], machine: dict, date: str) -> str:
    first = rows[0]
    where = first.get("card") or f"CPU {machine.get('cpu', {}).get('brand_raw', machine.get('machine', '?'))}"
    return (f"Device: {where}; dtype {first['dtype'].replace('torch.', '')}; torch {first['torch']}, "
            f"triton {first['triton']}; {date}.")


def table(rows: list[dict]) -> str:
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["label"], r["mode"])][r["method"]] = r
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "sdpa", m))
    lines = ["| case | mode | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for (label, mode), by_method in groups.items():
        base = by_method.get("sdpa")
        cells = []
        for m in methods:
            r = by_method.get(m)
            if r is None:
                cells.append("–")
                continue
            cell = f"{r['mean_ms']:.2f} ms"
            if base and m != "sdpa":
                cell += f" ({r['mean_ms'] / base['mean_ms']:.2f}x)"
            if "tflops" in r:
                cell += f", {r['tflops']:.0f} TF/s"
            cells.append(cell)
        lines.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], key: str, ylabel: str, out: Path) -> None:
    sweep = [r for r in rows if r["name"] == "sweep" and key in r]
    if not sweep:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a bare GPU machine may lack it: the table still comes out
        print(f"matplotlib is not installed: {out.name} not drawn")
        return
    panels = sorted({(r["mode"], r["causal"], r["dim"]) for r in sweep})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (mode, causal, dim) in zip(axes[0], panels):
        by_method = defaultdict(list)
        for r in sweep:
            if (r["mode"], r["causal"], r["dim"]) == (mode, causal, dim):
                by_method[r["method"]].append((r["tq"], r[key] / (2**20 if key == "peak_bytes" else 1)))
        for method, points in sorted(by_method.items()):
            points.sort()
            ax.plot(*zip(*points), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel=ylabel,
               title=f"{mode}, D={dim}, {'causal' if causal else 'full'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, help="stem of the .md and .png files (default: the first JSON's)")
    args = parser.parse_args()
    rows, machine = [], {}
    for path in args.results:
        if not path.exists():  # a run whose time budget was spent before its first case writes none
            print(f"{path}: missing, skipped")
            continue
        more, machine = load(path)
        rows += more
    if not rows:
        raise SystemExit(f"{', '.join(map(str, args.results))}: no echo_kernels benchmark rows")
    date = json.loads(next(p for p in args.results if p.exists()).read_text()).get("datetime", "")[:10]
    text = header(rows, machine, date) + "\n\n" + table(rows) + "\n"
    print(text)
    stem = args.out or args.results[0].with_suffix("")
    Path(f"{stem}.md").write_text(text)
    plot(rows, "mean_ms", "time (ms)", Path(f"{stem}-time.png"))
    plot(rows, "peak_bytes", "peak extra memory (MiB)", Path(f"{stem}-memory.png"))


if __name__ == "__main__":
    main()

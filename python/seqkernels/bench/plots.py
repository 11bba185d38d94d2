"""PNG plots from the long-format CSV: one per suite, and the RNN-vs-attention figure.

Every panel has one numeric x axis shared by all its providers (sequence length, context length,
tokens appended or hidden size, read from the shape), the median drawn with p20-p80 error bars, and
a title naming the fixed shape parameters, the dtype and the device. Each PNG also carries the data
it draws (x, median, p20, p80, labels per panel) as JSON in its "seqkernels-axes" text chunk, so a
figure can be checked without reading pixels (`read_axes_data`).
Usable on its own: python -m seqkernels.bench.plots results.csv."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections import defaultdict

HEADLINE = {
    "attention": ("tflops", "TFLOP/s"),
    "decode": ("gbps", "GB/s"),
    "kv_append": ("gbps", "GB/s"),
    "lstm": ("time", "ms (lower is better)"),
}
# The shape parameter each suite's panels put on the x axis, with its axis label.
X_PARAM = {
    "attention": ("L", "sequence length L"),
    "decode": ("S", "context length S (cached tokens)"),
    "kv_append": ("T", "tokens appended per call T"),
    "lstm": ("H", "hidden size H"),
}
AXES_KEY = "seqkernels-axes"


def shape_params(shape: str) -> dict:
    """'B4 H8 L512 D64 causal' -> {'B': 4, 'H': 8, 'L': 512, 'D': 64}."""
    return {k: int(v) for k, v in re.findall(r"([A-Za-z]+)(\d+)", shape)}


def shape_variant(shape: str) -> str:
    """The words of a shape that are not parameters ('causal', 'sinks', ...)."""
    return " ".join(w for w in shape.split() if not re.fullmatch(r"[A-Za-z]+\d+", w))


def _device_label(device: str) -> str:
    # CSV device names: "AMD EPYC ... (2 cores, 2 threads)" on CPU, the GPU's name on CUDA.
    return device if "cores" not in device else "CPU " + device


def _panel_groups(suite, sel):
    """Panels of one suite: rows sharing op, variant and every shape parameter but the x one. For
    rates (FLOP/s, GB/s) the batch is not part of the key (the rate normalizes it; GPU shapes
    keep B*L fixed), and each point is labelled with its B when B varies within a panel."""
    xp = X_PARAM[suite][0]
    rate = HEADLINE[suite][0] != "time"
    groups = defaultdict(list)
    for r in sel:
        p = shape_params(r["shape"])
        fixed = tuple((k, v) for k, v in p.items() if k != xp and not (rate and k == "B"))
        groups[(r["op"], shape_variant(r["shape"]), fixed)].append(r)
    return groups


def _errorbar(ax, pts, label, **kw):
    """pts: (x, p50, p20, p80) sorted by x. Draws the median with p20-p80 error bars."""
    xs = [p[0] for p in pts]
    mid = [p[1] for p in pts]
    lo = [max(0.0, p[1] - min(p[2], p[3])) for p in pts]
    hi = [max(0.0, max(p[2], p[3]) - p[1]) for p in pts]
    ax.errorbar(xs, mid, yerr=[lo, hi], marker="o", capsize=3, label=label, **kw)
    return {"label": label, "x": xs, "p50": mid, "p20": [p[2] for p in pts], "p80": [p[3] for p in pts]}


def _save(fig, path, panels):
    fig.savefig(path, dpi=110, metadata={AXES_KEY: json.dumps(panels)})


def read_axes_data(png_path: str) -> list:
    """The panels a saved figure draws: [{title, xlabel, ylabel, xscale, lines: [{label, x, p50,
    p20, p80}]}], from the PNG's text chunk."""
    from PIL import Image

    with Image.open(png_path) as im:
        return json.loads(im.text[AXES_KEY])


def plot_all(csv_path: str, out_dir: str, stem: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install seqkernels[bench])", file=sys.stderr)
        return []
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] != "status"]
    written = []
    device = _device_label(rows[0]["device"]) if rows else ""
    for suite, (metric, unit) in HEADLINE.items():
        sel = [r for r in rows if r["suite"] == suite and r["metric"] == metric]
        if not sel:
            continue
        xp, xlabel = X_PARAM[suite]
        groups = _panel_groups(suite, sel)
        ncols = min(4, len(groups))
        nrows = -(-len(groups) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 4.3 * nrows), squeeze=False)
        panels = []
        for ax, ((op, variant, fixed), rs) in zip(axes.flat, sorted(groups.items())):
            by_prov = defaultdict(list)
            batches = set()
            for r in rs:
                p = shape_params(r["shape"])
                batches.add(p.get("B"))
                by_prov[r["provider"]].append((p.get(xp, 0), float(r["p50"]), float(r["p20"]), float(r["p80"]), p))
            lines = []
            for prov, pts in sorted(by_prov.items()):
                pts.sort(key=lambda t: t[0])
                lines.append(
                    _errorbar(ax, [t[:4] for t in pts], prov, linewidth=2.5 if prov.startswith("seqkernels") else 1.2)
                )
            if len(batches) > 1:  # the batch differs between x positions: say which point is which
                seen = {}
                for pts in by_prov.values():
                    for t in pts:
                        seen.setdefault(t[0], (t[1], t[4].get("B")))
                for x, (y, b) in seen.items():
                    ax.annotate(f"B{b}", (x, y), textcoords="offset points", xytext=(0, 8), fontsize=7, ha="center")
            xs = sorted({x for line in lines for x in line["x"]})
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
            fixed_s = " ".join(f"{k}{v}" for k, v in fixed)
            if "B" not in dict(fixed) and None not in batches:
                # The batch left the panel key (rates): one batch is named, several are per point.
                fixed_s = (f"B{next(iter(batches))} " if len(batches) == 1 else "B per point, ") + fixed_s
            title = f"{suite} {op} {variant}".strip() + f"\n{fixed_s}, {rs[0]['dtype']}, {device}"
            ax.set_title(title, fontsize=8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{unit}, median, bars p20-p80")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            panels.append(
                {"title": title, "xlabel": xlabel, "ylabel": unit, "xscale": "log2", "xparam": xp, "lines": lines}
            )
        for ax in list(axes.flat)[len(groups) :]:
            ax.set_visible(False)
        fig.suptitle(f"{suite} on {device} ({sel[0]['dtype']})", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}_{suite}.png")
        _save(fig, path, panels)
        plt.close(fig)
        written.append(path)
    rv = [r for r in rows if r["suite"] == "rnn_vs_attention"]
    if rv:
        written.append(_plot_rnn_vs_attention(plt, rv, out_dir, stem, device))
    return written


def _plot_rnn_vs_attention(plt, rv, out_dir, stem, device):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels_spec = [
        ("sequence", "time", "L", "sequence length L", "sequence forward time (ms)"),
        ("sequence", "us_per_token", "L", "sequence length L", "time per token (us)"),
        ("generate_token", "time", "context", "context length", "per-token generation latency (ms)"),
    ]
    dtype = rv[0]["dtype"]
    panels, seq_batch, width = [], None, None
    for ax, (op, metric, xp, xlabel, what) in zip(axes, panels_spec):
        by_prov = defaultdict(list)
        batch = None
        for r in rv:
            if r["op"] == op and r["metric"] == metric:
                p = shape_params(r["shape"])
                batch, width = p.get("B"), p.get("d", width)
                by_prov[r["provider"]].append((p.get(xp, 0), float(r["p50"]), float(r["p20"]), float(r["p80"])))
        if op == "sequence" and batch is not None:
            seq_batch = batch
        lines = [_errorbar(ax, sorted(pts), prov) for prov, pts in sorted(by_prov.items())]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        title = f"{what}\nbatch {batch}, width {width}, {dtype}"
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if lines:
            ax.legend(fontsize=7)
        panels.append(
            {"title": title, "xlabel": xlabel, "ylabel": what, "xscale": "log2", "xparam": xp, "lines": lines}
        )
    fig.suptitle(
        f"RNN vs attention on {device}: batch {seq_batch} (generation: batch 1), width {width}, {dtype}; "
        "median, bars p20-p80",
        fontsize=9,
    )
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}_rnn_vs_attention.png")
    _save(fig, path, panels)
    plt.close(fig)
    return path


if __name__ == "__main__":
    src = sys.argv[1]
    print(plot_all(src, os.path.dirname(os.path.abspath(src)), os.path.basename(src)[:-4]))

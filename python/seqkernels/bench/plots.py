"""PNG plots from the long-format CSV: one per suite (throughput vs size per provider), the
rnn_vs_attention ones on log axes. Usable on its own: python -m seqkernels.bench.plots results.csv."""

from __future__ import annotations

import csv
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


def _size(shape: str) -> float:
    nums = [int(x) for x in re.findall(r"[A-Za-z]+(\d+)", shape)]
    m = re.search(r"(?:L|S|context|H)(\d+)", shape)
    return float(m.group(1)) if m else float(nums[0] if nums else 0)


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
    device = rows[0]["device"] if rows else ""
    for suite, (metric, unit) in HEADLINE.items():
        sel = [r for r in rows if r["suite"] == suite and r["metric"] == metric]
        if not sel:
            continue
        groups = defaultdict(list)
        for r in sel:
            variant = "causal" if "causal" in r["shape"] else ""
            groups[(r["op"], variant)].append(r)
        fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
        for ax, ((op, variant), rs) in zip(axes[0], sorted(groups.items())):
            by_prov = defaultdict(list)
            for r in rs:
                by_prov[r["provider"]].append(r)
            for prov, pr in sorted(by_prov.items()):
                pr.sort(key=lambda r: (_size(r["shape"]), r["shape"]))
                labels = [r["shape"].replace(" causal", "") for r in pr]
                ax.plot(
                    range(len(pr)),
                    [float(r["p50"]) for r in pr],
                    marker="o",
                    label=prov,
                    linewidth=2.5 if prov.startswith("seqkernels") else 1.2,
                )
                ax.set_xticks(range(len(pr)), labels, rotation=30, ha="right", fontsize=7)
            ax.set_title(f"{suite} {op} {variant}".strip())
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{device} ({rs[0]['dtype']})", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}_{suite}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    rv = [r for r in rows if r["suite"] == "rnn_vs_attention"]
    if rv:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        panels = [
            ("sequence", "time", "sequence forward time (ms)"),
            ("sequence", "us_per_token", "time per token (us)"),
            ("generate_token", "time", "per-token generation latency (ms), batch 1"),
        ]
        for ax, (op, metric, title) in zip(axes, panels):
            by_prov = defaultdict(list)
            for r in rv:
                if r["op"] == op and r["metric"] == metric:
                    by_prov[r["provider"]].append((_size(r["shape"]), float(r["p50"])))
            for prov, pts in sorted(by_prov.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length" if op == "generate_token" else "sequence length")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        fig.suptitle(f"RNN vs attention on {device}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}_rnn_vs_attention.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    src = sys.argv[1]
    print(plot_all(src, os.path.dirname(os.path.abspath(src)), os.path.basename(src)[:-4]))

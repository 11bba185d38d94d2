"""`seqkernels bench`: run the suites, show progress, print a table, write CSV, JSON and plots."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

import torch

from .harness import Recorder, Settings, copy_bandwidth, gemm_ceiling
from .suites import SUITES

CSV_FIELDS = [
    "suite",
    "op",
    "provider",
    "shape",
    "dtype",
    "device",
    "metric",
    "unit",
    "p20",
    "p50",
    "p80",
    "note",
    "torch",
    "triton",
    "git",
    "date",
]


class Progress:
    """A one-line progress bar on a terminal, plain lines otherwise (CI logs)."""

    def __init__(self, total_suites):
        self.total, self.done, self.t0 = total_suites, 0, time.time()
        self.tty = sys.stderr.isatty()

    def __call__(self, msg):
        line = f"[{self.done}/{self.total} suites, {time.time() - self.t0:5.0f}s] {msg}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def suite_done(self):
        self.done += 1
        if self.tty:
            sys.stderr.write("\n")


def write_outputs(rec: Recorder, out_dir: str, stem: str):
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rec.rows:
            d = dataclasses.asdict(r)
            d.update(
                device=rec.meta["device"],
                torch=rec.meta["torch"],
                triton=rec.meta["triton"],
                git=rec.meta["git"],
                date=rec.meta["date"],
            )
            w.writerow(d)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump({"meta": rec.meta, "rows": [dataclasses.asdict(r) for r in rec.rows]}, f, indent=1, default=str)
    from .plots import plot_all

    pngs = plot_all(csv_path, out_dir, stem)
    return csv_path, pngs


def format_table(rec: Recorder) -> str:
    """The readable summary: time and the headline throughput per (suite, op, shape, provider), plus
    each provider's ratio to the fastest peer measured in the same run."""
    head = {"attention": "tflops", "decode": "gbps", "kv_append": "gbps", "lstm": "time", "rnn_vs_attention": "time"}
    lines = []
    keys = []
    for r in rec.rows:
        k = (r.suite, r.op, r.shape)
        if k not in keys:
            keys.append(k)
    for suite, op, shape in keys:
        rows = [r for r in rec.rows if (r.suite, r.op, r.shape) == (suite, op, shape)]
        times = {r.provider: r.p50 for r in rows if r.metric == "time"}
        peers = {p: t for p, t in times.items() if not p.startswith("seqkernels")}
        best_peer = min(peers.items(), key=lambda kv: kv[1]) if peers else None
        lines.append(f"{suite} / {op} / {shape}")
        for r in rows:
            if r.metric == "status":
                lines.append(f"    {r.provider:28s} {r.note}")
            elif r.metric == "time":
                extra = [
                    x for x in rows if x.provider == r.provider and x.metric == head[suite] and head[suite] != "time"
                ]
                thr = f"{extra[0].p50:9.4g} {extra[0].unit:9s}" if extra else " " * 19
                ratio = ""
                if best_peer and r.provider.startswith("seqkernels"):
                    ratio = f"{best_peer[1] / r.p50:5.2f}x vs {best_peer[0]}"
                lines.append(f"    {r.provider:28s} {r.p50:10.3f} ms [{r.p20:.3f}-{r.p80:.3f}] {thr} {ratio}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="seqkernels bench", description=__doc__)
    ap.add_argument("--suite", action="append", choices=sorted(SUITES), help="suite to run (repeatable; default all)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument(
        "--dtype", default=None, help="bfloat16, float16 or float32 (default: bfloat16 on GPU, float32 on CPU)"
    )
    ap.add_argument("--quick", action="store_true", help="small sizes: every suite in a few minutes on a 2-core CPU")
    ap.add_argument("--backend", default=None, help="only this seqkernels backend, no peers")
    ap.add_argument(
        "--out", default="bench_out", help="output folder for CSV, JSON and PNG plots (default ./bench_out)"
    )
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "0")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        ap.error(f"--dtype: unknown dtype {dtype_name!r}")
    s = Settings(device=device, dtype=dtype, quick=args.quick, backend=args.backend)
    suites = args.suite or list(SUITES)
    rec = Recorder(s)
    progress = Progress(len(suites))
    progress("measuring the GEMM and copy-bandwidth ceilings")
    rec.meta["gemm_tflops"] = gemm_ceiling(s)
    rec.meta["copy_gbps"] = copy_bandwidth(s)
    rec.add("ceiling", "gemm", "torch.matmul", "-", "tflops", "TFLOP/s", *[rec.meta["gemm_tflops"]] * 3)
    rec.add("ceiling", "copy", "torch.copy_", "-", "gbps", "GB/s", *[rec.meta["copy_gbps"]] * 3)
    stem = f"{'gpu' if s.is_cuda else 'cpu'}_{dtype_name}{'_quick' if s.quick else ''}"
    for name in suites:
        SUITES[name](rec, s, progress)
        progress.suite_done()
        # Written after every suite, so an interrupted run still leaves what it measured.
        csv_path, pngs = write_outputs(rec, args.out, stem)
    print(
        f"\nseqkernels bench on {rec.meta['device']} ({dtype_name}), torch {rec.meta['torch']}, git {rec.meta['git']}"
    )
    print(f"ceilings: GEMM {rec.meta['gemm_tflops']:.2f} TFLOP/s, copy {rec.meta['copy_gbps']:.1f} GB/s\n")
    print(format_table(rec))
    if rec.meta.get("findings"):
        print("\nrnn_vs_attention findings (this machine):")
        for line in rec.meta["findings"]:
            print("  - " + line)
    print(f"\nwrote {csv_path}, {csv_path[:-4]}.json and {len(pngs)} plots under {args.out}/")
    failed = [r for r in rec.rows if r.metric == "status" and r.note.startswith("parity FAILED")]
    return 1 if failed else 0

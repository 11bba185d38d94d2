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

from .harness import (
    NOISY_ADVICE,
    Recorder,
    Settings,
    copy_bandwidth,
    format_ratio,
    gemm_ceiling,
    is_noisy,
    rnn_vs_attention_findings,
    speedup,
    spread,
)
from .suites import SUITES
from .varlen import varlen_findings

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


def write_outputs(rec: Recorder, out_dir: str, stem: str, plots: bool = True):
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
    if not plots:
        return csv_path, []
    from .plots import plot_all

    pngs = plot_all(csv_path, out_dir, stem)
    return csv_path, pngs


# The throughput printed next to each time, per suite ("time": none).
HEADLINE = {
    "attention": "tflops",
    "decode": "gbps",
    "kv_append": "gbps",
    "lstm": "time",
    "rnn_vs_attention": "time",
    "varlen": "tflops",
}


def _flag(rec: Recorder, *rows) -> str:
    """The table's noise marker: the row's own spread, or the machine's load during the run."""
    if any(is_noisy(r.p20, r.p50, r.p80) for r in rows):
        return "  NOISY"
    return "  NOISY (load)" if rec.overloaded else ""


def _spread(r) -> str:
    s = spread(r.p20, r.p50, r.p80)
    return f"{100 * s:4.0f}%" if s != float("inf") else "    -"


def format_table(rec: Recorder) -> str:
    """The readable summary: per (suite, op, shape, provider) the median time with its p20-p80 range
    and spread, the headline throughput with its range, each seqkernels provider's speedup over the
    fastest peer of the same run with the range the two spreads allow, and NOISY where a spread
    exceeds 10% of its median or the machine was loaded beyond its core count. Rows without a time
    (the ceilings) print their own value and range; a line with nothing measured says so."""
    lines = []
    if rec.overloaded:
        lines.append(
            f"NOISY RUN: the load average reached {rec.meta['load_max']:.2f} on {rec.meta['cores']} cores "
            f"while measuring, so every figure below competes with other processes ({NOISY_ADVICE})."
        )
        lines.append("")
    lines.append("median [p20-p80] spread (p80-p20)/median; NOISY: spread > 10% or a loaded machine")
    keys = []
    for r in rec.rows:
        k = (r.suite, r.op, r.shape)
        if k not in keys:
            keys.append(k)
    for suite, op, shape in keys:
        rows = [r for r in rec.rows if (r.suite, r.op, r.shape) == (suite, op, shape)]
        times = {r.provider: r for r in rows if r.metric == "time"}
        peers = [r for p, r in times.items() if not p.startswith("seqkernels")]
        best_peer = min(peers, key=lambda r: r.p50) if peers else None
        head = HEADLINE.get(suite, "time")
        out = []
        for r in rows:
            if r.metric == "status":
                out.append(f"    {r.provider:28s} {r.note}")
            elif r.metric == "time":
                extra = [x for x in rows if x.provider == r.provider and x.metric == head != "time"]
                thr = f"{extra[0].p50:8.4g} {extra[0].unit} [{extra[0].p20:.4g}-{extra[0].p80:.4g}]" if extra else ""
                ratio = ""
                if best_peer is not None and r.provider.startswith("seqkernels"):
                    ratio = f"  {format_ratio(*speedup(best_peer, r))} vs {best_peer.provider}"
                    flag = _flag(rec, r, best_peer)
                else:
                    flag = _flag(rec, r)
                out.append(
                    f"    {r.provider:28s} {r.p50:10.3f} ms [{r.p20:.3f}-{r.p80:.3f}] {_spread(r)}  {thr}{ratio}{flag}"
                )
            elif r.provider not in times:
                # A figure with no time row (the ceilings): its own value and range.
                note = f"  ({r.note})" if r.note else ""
                out.append(
                    f"    {r.provider:28s} {r.p50:10.4g} {r.unit} [{r.p20:.4g}-{r.p80:.4g}] {_spread(r)}"
                    f"{note}{_flag(rec, r)}"
                )
        lines.append(f"{suite} / {op} / {shape}")
        lines += out or ["    nothing measured for this line"]
    return "\n".join(lines)


def _ceilings(rec: Recorder, s: Settings):
    """Measure the GEMM and copy ceilings as rows with their spreads; one that cannot be measured
    here becomes one line saying why (its meta value NaN, so the % columns read nan, not a guess)."""
    for op, provider, key, metric, unit, fn in (
        ("gemm", "torch.matmul", "gemm_tflops", "tflops", "TFLOP/s", gemm_ceiling),
        ("copy", "torch.copy_", "copy_gbps", "gbps", "GB/s", copy_bandwidth),
    ):
        try:
            (p20, p50, p80), note = fn(s)
        except Exception as e:  # e.g. out of memory for the copy buffers, a dtype with no matmul here
            rec.meta[key] = float("nan")
            rec.add_failure("ceiling", op, provider, "-", f"not measured here: {type(e).__name__}: {str(e)[:100]}")
            continue
        rec.meta[key] = p50
        rec.add("ceiling", op, provider, "-", metric, unit, p20, p50, p80, note)


# The devices each --backend measures on (the bench turns the Triton interpreter off on the CPU: its
# timings would say nothing).
_BACKEND_DEVICES = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",), "reference": ("cpu", "cuda")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="seqkernels bench", description=__doc__)
    ap.add_argument("--suite", action="append", choices=sorted(SUITES), help="suite to run (repeatable; default all)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when present)")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float16", "float32", "float64"),
        help="float64 on CPU only (default: bfloat16 on GPU, float32 on CPU)",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes: every suite in a few minutes on a 2-core CPU")
    ap.add_argument("--backend", default=None, choices=_BACKEND_DEVICES, help="only this seqkernels backend, no peers")
    ap.add_argument(
        "--repeat",
        type=float,
        default=1.0,
        help="multiply the repetitions and minimum timed duration of every measurement (default 1; "
        "use 4 or more when figures are flagged NOISY)",
    )
    ap.add_argument(
        "--out", default="bench_out", help="output folder for CSV, JSON and PNG plots (default ./bench_out)"
    )
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda") or (parsed.type == "cpu" and parsed.index is not None):
        ap.error(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    kind = parsed.type
    if kind == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {device}: torch sees no CUDA device on this machine (use --device cpu)")
    if args.backend is not None and kind not in _BACKEND_DEVICES[args.backend]:
        ap.error(f"--backend {args.backend} runs on --device {' or '.join(_BACKEND_DEVICES[args.backend])}, not {kind}")
    if kind != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "0")
    dtype_name = args.dtype or ("bfloat16" if kind == "cuda" else "float32")
    if kind == "cuda" and dtype_name == "float64":
        ap.error("--dtype float64: the GPU kernels take float16, bfloat16 and float32 (float64 runs on --device cpu)")
    dtype = getattr(torch, dtype_name)
    if args.repeat <= 0:
        ap.error("--repeat must be positive")
    s = Settings(device=device, dtype=dtype, quick=args.quick, backend=args.backend, repeat=args.repeat)
    suites = args.suite or list(SUITES)
    rec = Recorder(s)
    progress = Progress(len(suites))
    progress("measuring the GEMM and copy-bandwidth ceilings")
    _ceilings(rec, s)
    stem = f"{'gpu' if s.is_cuda else 'cpu'}_{dtype_name}{'_quick' if s.quick else ''}"
    for name in suites:
        SUITES[name](rec, s, progress)
        rec.sample_load()
        progress.suite_done()
        # Written after every suite, so an interrupted run still leaves what it measured.
        csv_path, pngs = write_outputs(rec, args.out, stem)
    print(
        f"\nseqkernels bench on {rec.meta['device']} ({dtype_name}), torch {rec.meta['torch']}, git {rec.meta['git']}"
    )
    load = rec.meta.get("load_max")
    print(
        f"machine: {rec.meta['machine']}; highest 1-minute load average during the run "
        + (f"{load:.2f} on {rec.meta['cores']} cores" if load is not None else "unknown")
        + (" (overloaded: timings are noisy)" if rec.overloaded else "")
        + "\n"
    )
    print(format_table(rec))
    # The suites' own notes quote medians only; the findings printed (and kept as "findings" in the
    # JSON) are recomputed from the rows with their spreads, the machine and the noise flag.
    rec.meta["suite_notes"] = rec.meta.pop("findings", [])
    rec.meta["findings"] = rnn_vs_attention_findings(rec) + varlen_findings(rec)
    write_outputs(rec, args.out, stem, plots=False)
    if rec.meta["findings"]:
        print("\nfindings:")
        for line in rec.meta["findings"]:
            print("  - " + line)
    print(f"\nwrote {csv_path}, {csv_path[:-4]}.json and {len(pngs)} plots under {args.out}/")
    failed = [r for r in rec.rows if r.metric == "status" and r.note.startswith("parity FAILED")]
    return 1 if failed else 0

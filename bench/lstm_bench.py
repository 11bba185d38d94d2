"""LSTM benchmarks (DESIGN §7, §8): the fused cell against torch.nn.LSTMCell and seqkernels.nn.LSTM
against torch.nn.LSTM (oneDNN on CPU, cuDNN on GPU), forward and forward+backward.

`run(device, dtype, quick)` returns long-format rows (dicts). Providers are timed interleaved
(one call of each in turn per repeat) so that load from other processes hits all of them alike;
medians and the p20/p80 spread are reported, and `speedup_vs_torch` = torch median / ours.
Every provider is parity-checked against float64 before it is timed. With one CPU thread the
timings are CPU time of this process (robust on a shared machine), otherwise wall time.

    python bench/lstm_bench.py [--device cpu] [--dtype float32] [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

import seqkernels
from seqkernels import backends
from seqkernels.nn.lstm import LSTM as SkLSTM
from seqkernels.ops import lstm as lstm_ops


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _clock(device: str):
    # One CPU thread: the process's CPU time, which a busy shared machine does not inflate (time
    # spent preempted is not counted). Otherwise wall time, the only fair clock for several threads.
    if not device.startswith("cuda") and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def _interleaved(fns: Dict[str, Callable[[], object]], device: str, reps: int, warmup: int = 2):
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    clock = _clock(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            _sync(device)
            times[name].append((clock() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        out[name] = (ts[int(0.2 * (len(ts) - 1))], statistics.median(ts), ts[int(0.8 * (len(ts) - 1))])
    return out


def _kernel_backends(device: str, call) -> List[str]:
    order = ("cuda", "triton") if device.startswith("cuda") else ("cpu",)
    return [b for b in order if backends.why_not(lstm_ops.OP, b, torch.device(device), call) is None]


def _max_err(a, b) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def _rows(op, shape, dtype, device, stats, metric="ms"):
    base = stats.get("torch")
    rows = []
    for name, (p20, p50, p80) in stats.items():
        rows.append({"op": op, "provider": name, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
                     "device": device, "metric": metric, "median": p50, "p20": p20, "p80": p80,
                     "speedup_vs_torch": (base[1] / p50) if base and name != "torch" else None})
    return rows


def bench_cell(device, dtype, quick) -> List[dict]:
    rows = []
    cells = [(32, 512), (64, 1024)] if quick else [(32, 512), (64, 512), (32, 1024), (64, 1024)]
    reps = 15 if quick else 60
    for B, H in cells:
        cell = torch.nn.LSTMCell(H, H, device=device, dtype=dtype)
        x, h, c = (torch.randn(B, H, device=device, dtype=dtype) for _ in range(3))
        args = (x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        call = lstm_ops.prepare_lstm_cell(*args)
        with torch.no_grad():
            ref = seqkernels.reference.lstm_cell_ref(*(a.double() for a in args))
            base_err = _max_err(cell(x, (h, c)), ref)
            fns = {"torch": lambda: cell(x, (h, c))}
            for b in _kernel_backends(device, call):
                fn = (lambda b_: lambda: seqkernels.lstm_cell(*args, backend=b_))(b)
                err = _max_err(fn(), ref)
                if err > 2 * base_err + torch.finfo(dtype).eps:
                    raise AssertionError(f"lstm_cell {b} B{B} H{H}: error {err:.3g} vs torch's {base_err:.3g}")
                fns[b] = fn
            rows += _rows("lstm_cell_fwd", f"B{B} H{H}", dtype, device, _interleaved(fns, device, reps))
    return rows


def bench_sequence(device, dtype, quick) -> List[dict]:
    rows = []
    layers, H, L = 2, 256, 128
    batches = [32] if quick else [32, 64]
    reps = 5 if quick else 15
    for B in batches:
        shape = f"layers{layers} H{H} L{L} B{B}"
        tl = torch.nn.LSTM(H, H, num_layers=layers, device=device, dtype=dtype)
        x = torch.randn(L, B, H, device=device, dtype=dtype)
        with torch.no_grad():
            ref = tl.double()(x.double())[0]
            tl.to(dtype)
            base_err = float((tl(x)[0].double() - ref).abs().max())
        mods = {}
        for b in ("cuda", "triton") if device.startswith("cuda") else ("cpu",):
            try:
                m = SkLSTM(H, H, num_layers=layers, device=device, dtype=dtype, backend=b)
                m.load_state_dict(tl.state_dict())
                with torch.no_grad():
                    err = float((m(x)[0].double() - ref).abs().max())
            except backends.BackendError:
                continue
            if err > 2 * base_err + torch.finfo(dtype).eps:
                raise AssertionError(f"LSTM {b} {shape}: error {err:.3g} vs torch's {base_err:.3g}")
            mods[b] = m

        def fwd(m):
            def f():
                with torch.no_grad():
                    m(x)
            return f

        stats = _interleaved({"torch": fwd(tl), **{b: fwd(m) for b, m in mods.items()}}, device, reps, warmup=1)
        rows += _rows("lstm_sequence_fwd", shape, dtype, device, stats)

        xg = x.clone().requires_grad_(True)
        gout = torch.randn_like(x)

        def train(m):
            def f():
                out = m(xg)[0]
                out.backward(gout)
            return f

        stats = _interleaved({"torch": train(tl), **{b: train(m) for b, m in mods.items()}}, device,
                             max(3, reps // 2), warmup=1)
        rows += _rows("lstm_sequence_fwd_bwd", shape, dtype, device, stats)
    return rows


def run(device: str = "cpu", dtype=torch.float32, quick: bool = False) -> List[dict]:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return bench_cell(device, dtype, quick) + bench_sequence(device, dtype, quick)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: timed in CPU time)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    for r in run(a.device, a.dtype, a.quick):
        sp = r["speedup_vs_torch"]
        print(f"{r['op']:<24} {r['shape']:<28} {r['provider']:<8} median {r['median']:9.3f} ms "
              f"[{r['p20']:.3f}, {r['p80']:.3f}]" + (f"  speedup vs torch {sp:.2f}x" if sp else ""))


if __name__ == "__main__":
    main()

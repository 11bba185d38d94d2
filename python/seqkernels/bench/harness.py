"""Timing, ceilings, parity gates and result rows for the benchmark suites.

GPU: CUDA events through triton.testing.do_bench when Triton is there (else events by hand);
CPU: wall-clock medians after warm-up. Both report p20/p50/p80. Inputs rotate among several
copies so repeated calls do not run out of a warm cache. A provider's result is checked against
the float64 reference with the DESIGN §5 rule before it is timed; a wrong result is recorded as
such and never timed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, List, Optional, Sequence

import torch


@dataclasses.dataclass
class Settings:
    device: str
    dtype: torch.dtype
    quick: bool
    backend: Optional[str] = None

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    proc = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    proc = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{proc} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def git_revision() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fns: Sequence[Callable[[], object]], s: Settings, *, min_time: float = None, max_reps: int = None):
    """Time calling fns[i % len(fns)] (the rotated input sets); returns (p20, p50, p80) in ms."""
    n = len(fns)
    if s.is_cuda:
        try:
            from triton.testing import do_bench

            counter = iter(range(1 << 62))

            def call():
                return fns[next(counter) % n]()

            q = do_bench(call, warmup=25 if s.quick else 100, rep=50 if s.quick else 200, quantiles=[0.2, 0.5, 0.8])
            return tuple(float(x) for x in q)
        except ImportError:
            pass
    min_time = min_time if min_time is not None else (0.25 if s.quick else 1.0)
    max_reps = max_reps if max_reps is not None else (15 if s.quick else 50)
    for i in range(max(1 if s.quick else 2, n)):  # warm-up: first-call allocation, thread pools, lazy init
        fns[i % n]()
    _sync(s.device)
    times, start, i = [], time.perf_counter(), 0
    min_reps = 3 if s.quick else 5
    while (len(times) < min_reps or time.perf_counter() - start < min_time) and len(times) < max_reps:
        if s.is_cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fns[i % n]()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fns[i % n]()
            times.append((time.perf_counter() - t0) * 1e3)
        i += 1
    qs = statistics.quantiles(times, n=10, method="inclusive")
    return qs[1], statistics.median(times), qs[7]


def rotations(s: Settings, nbytes: int) -> int:
    """How many input copies to rotate through so they do not all sit in the last-level cache."""
    cache = 64 << 20 if s.is_cuda else 32 << 20
    return max(1, min(4, -(-2 * cache // max(nbytes, 1))))


@dataclasses.dataclass
class Row:
    suite: str
    op: str
    provider: str
    shape: str
    dtype: str
    metric: str
    unit: str
    p20: float
    p50: float
    p80: float
    note: str = ""


class Recorder:
    def __init__(self, s: Settings):
        self.s = s
        self.rows: List[Row] = []
        self.meta = {
            "device": device_name(s.device),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "git": git_revision(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def add(self, suite, op, provider, shape, metric, unit, p20, p50, p80, note="", dtype=None):
        self.rows.append(
            Row(
                suite,
                op,
                provider,
                shape,
                dtype or str(self.s.dtype).replace("torch.", ""),
                metric,
                unit,
                p20,
                p50,
                p80,
                note,
            )
        )

    def add_time(self, suite, op, provider, shape, ms, *, per=None, note="", dtype=None):
        """The time row, plus derived throughput rows from `per` = [(metric, unit, amount_per_ms_fn)]."""
        p20, p50, p80 = ms
        self.add(suite, op, provider, shape, "time", "ms", p20, p50, p80, note, dtype)
        for metric, unit, f in per or ():
            # Faster times give higher throughput: p20 of the time is p80 of the rate.
            self.add(suite, op, provider, shape, metric, unit, f(p80), f(p50), f(p20), note, dtype)

    def add_failure(self, suite, op, provider, shape, why, dtype=None):
        nan = float("nan")
        self.add(suite, op, provider, shape, "status", "", nan, nan, nan, why, dtype)

    def value(self, suite, op, provider, shape, metric="time"):
        for r in self.rows:
            if (r.suite, r.op, r.provider, r.shape, r.metric) == (suite, op, provider, shape, metric):
                return r.p50
        return None


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def gemm_ceiling(s: Settings) -> float:
    """The device's own matrix-product rate in TFLOP/s for the bench dtype (median)."""
    n = 4096 if s.is_cuda else (768 if s.quick else 1024)
    dtype = s.dtype if s.is_cuda or s.dtype == torch.float32 else torch.float32
    a = [torch.randn(n, n, device=s.device, dtype=dtype) for _ in range(2)]
    b = torch.randn(n, n, device=s.device, dtype=dtype)
    ms = measure([lambda x=x: x @ b for x in a], s)
    return 2 * n**3 / (ms[1] * 1e-3) / 1e12


def copy_bandwidth(s: Settings) -> float:
    """Device-memory copy bandwidth in GB/s counting bytes read plus written (median)."""
    nbytes = (1 << 30) if s.is_cuda else (128 << 20 if s.quick else 256 << 20)
    src = torch.empty(nbytes // 4, device=s.device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = measure([lambda: dst.copy_(src)], s)
    return 2 * nbytes / (ms[1] * 1e-3) / 1e9

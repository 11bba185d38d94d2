"""Timing, ceilings, parity gates and result rows for the benchmark suites.

GPU: CUDA events through triton.testing.do_bench when Triton is there (else events by hand);
CPU: wall-clock medians after warm-up, the providers of one comparison timed in alternating
rounds (`measure_rounds`, `Rounds`) so that a same-run ratio is not skewed by the host's drift.
Both report p20/p50/p80. Inputs rotate among several
copies so repeated calls do not run out of a warm cache. A provider's result is checked against
the float64 reference with the DESIGN §5 rule before it is timed; a wrong result is recorded as
such and never timed.

Noise: a figure whose p20-p80 spread exceeds NOISY_SPREAD of its median, or any figure of a run
during which the load average exceeded the core count, is flagged (NOISY) wherever it is printed;
ratios carry the range their operands' spreads allow (`speedup`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
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
    # Multiplies the repetitions and the minimum timed duration of every CPU measurement (and the
    # rep budget of do_bench on a GPU): --repeat N, the answer to a figure flagged as noisy.
    repeat: float = 1.0

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

            rep = (50 if s.quick else 200) * s.repeat
            q = do_bench(call, warmup=25 if s.quick else 100, rep=rep, quantiles=[0.2, 0.5, 0.8])
            return tuple(float(x) for x in q)
        except ImportError:
            pass
    return measure_rounds([fns], s, min_time=min_time, max_reps=max_reps)[0]


def measure_rounds(groups: Sequence[Sequence[Callable[[], object]]], s: Settings, *, min_time=None, max_reps=None):
    """Time several providers of one comparison (each a list of rotated calls, as `measure` takes) in
    rounds, one call of each per round, the order reversed every other round; returns (p20, p50,
    p80) in ms per provider. A CPU shared with other tenants drifts by 10-30% over seconds (the 2-core
    CI machine did): timed one after the other, two providers' medians came from different phases of
    that drift and a same-run ratio moved by as much; in rounds, both sample every phase alike."""
    ng = len(groups)
    min_time = (min_time if min_time is not None else (0.25 if s.quick else 1.0)) * s.repeat
    max_reps = round((max_reps if max_reps is not None else (15 if s.quick else 50)) * s.repeat)
    min_reps = max(3, round((3 if s.quick else 5) * s.repeat))
    for fns in groups:  # warm-up: first-call allocation, thread pools, lazy init
        for i in range(max(1 if s.quick else 2, len(fns))):
            fns[i % len(fns)]()
    _sync(s.device)
    times = [[] for _ in groups]
    spent = [0.0] * ng  # each provider's own timed seconds: min_time applies to each
    rnd = 0
    while any(len(t) < min_reps or sp < min_time for t, sp in zip(times, spent)) and rnd < max_reps:
        for g in range(ng) if rnd % 2 == 0 else range(ng - 1, -1, -1):
            fns = groups[g]
            if s.is_cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fns[rnd % len(fns)]()
                b.record()
                b.synchronize()
                ms = a.elapsed_time(b)
            else:
                t0 = time.perf_counter()
                fns[rnd % len(fns)]()
                ms = (time.perf_counter() - t0) * 1e3
            times[g].append(ms)
            spent[g] += ms * 1e-3
        rnd += 1
    out = []
    for t in times:
        qs = statistics.quantiles(t, n=10, method="inclusive")
        out.append((qs[1], statistics.median(t), qs[7]))
    return out


class Rounds:
    """Collects the providers of one comparison (a shape) and times them together by
    `measure_rounds` on a CPU: `add(fns, done)` registers a provider, `run()` measures every one
    registered and calls `done((p20, p50, p80))` for each. On a GPU each is timed at `add` (CUDA
    events through do_bench do not see the host's drift, and a retained backward graph per provider
    would hold device memory until then)."""

    def __init__(self, s: Settings, **kw):
        self.s, self.kw, self.pending = s, kw, []

    def add(self, fns: Sequence[Callable[[], object]], done: Callable[[tuple], None]) -> None:
        if self.s.is_cuda:
            done(measure(fns, self.s, **self.kw))
        else:
            self.pending.append((list(fns), done))

    def run(self) -> None:
        pending, self.pending = self.pending, []
        if pending:
            for (_, done), ms in zip(pending, measure_rounds([f for f, _ in pending], self.s, **self.kw)):
                done(ms)


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
            "machine": machine_phrase(s.device),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "git": git_revision(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_max": None,
        }
        self.sample_load()

    def sample_load(self):
        """Record the 1-minute load average (the run keeps the highest it saw)."""
        load = load_average()
        if load is not None:
            self.meta["load_max"] = max(load, self.meta["load_max"] or 0.0)

    @property
    def overloaded(self) -> bool:
        """Whether the machine was busier than its core count at some point of the run: every
        CPU timing taken then competes with other processes for the cores."""
        return machine_overloaded(self.meta.get("load_max"), self.meta.get("cores"))

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
        r = self.row(suite, op, provider, shape, metric)
        return r.p50 if r else None

    def row(self, suite, op, provider, shape, metric="time") -> Optional[Row]:
        for r in self.rows:
            if (r.suite, r.op, r.provider, r.shape, r.metric) == (suite, op, provider, shape, metric):
                return r
        return None


# ---------------------------------------------------------------------------------------------
# noise and spreads

NOISY_SPREAD = 0.10  # p20-p80 width above this fraction of the median: the figure is not trustworthy
NOISY_ADVICE = "noisy: rerun with more repeats (--repeat 4) on a quiet machine"


def spread(p20: float, p50: float, p80: float) -> float:
    """The p20-p80 width relative to the median (0.08 = 8%); 0 for a figure with no spread (a derived
    constant, e.g. an overlap fraction), inf for a spread around a zero or missing median."""
    if p80 == p20:
        return 0.0
    if not p50 or p50 != p50:
        return float("inf")
    return abs(p80 - p20) / abs(p50)


def is_noisy(p20: float, p50: float, p80: float) -> bool:
    return spread(p20, p50, p80) > NOISY_SPREAD


def machine_overloaded(load: Optional[float], cores: Optional[int]) -> bool:
    """The load average past the core count, as printed (two decimals): the bench's own threads keep
    a 2-core machine at about 2.00 by themselves, and 2.004 printed "2.00 on 2 cores (overloaded)"."""
    return load is not None and bool(cores) and round(load, 2) > cores


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def speedup(slow: Row, fast: Row):
    """How many times faster `fast` is than `slow` (time rows): (median ratio, low, high), where
    low/high pair the opposite ends of the two p20-p80 ranges, the spread a rerun could show."""
    mid = slow.p50 / fast.p50
    low = slow.p20 / fast.p80
    high = slow.p80 / fast.p20
    return mid, min(low, high), max(low, high)


def format_ratio(mid: float, low: float, high: float) -> str:
    return f"{mid:.2f}x, p20-p80 {low:.2f}-{high:.2f}x"


def _cpu_isa() -> str:
    """The CPU kernels' instruction-set path as the extension reports it (SEQKERNELS_CPU_ISA
    honoured), else what /proc/cpuinfo offers."""
    from .. import cli

    rep = cli.cpu_isa_report()
    if rep is not None:
        names = {
            "amx_bf16": "AMX-BF16",
            "avx512_bf16": "AVX-512 BF16",
            "avx512": "AVX-512",
            "avx2": "AVX2",
            "portable": "portable-SIMD",
        }
        return names.get(rep["active"], rep["active"])
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return ""


def machine_phrase(device: str) -> str:
    """How findings name the machine: 'this 2-core AVX-512 CPU', 'this NVIDIA H100 80GB HBM3'."""
    if device.startswith("cuda"):
        return "this " + torch.cuda.get_device_name(torch.device(device))
    isa = _cpu_isa()
    return f"this {os.cpu_count()}-core {isa + ' ' if isa else ''}CPU"


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def _cpu_bf16_native(dtype) -> bool:
    from .. import cli

    rep = cli.cpu_isa_report()
    return dtype == torch.bfloat16 and rep is not None and rep["avx512_bf16"]


def gemm_calls(s: Settings):
    """The matrix product the GEMM ceiling times: (calls on two rotated inputs, TFLOP per call, the
    dtype it runs in)."""
    n = 4096 if s.is_cuda else (768 if s.quick else 1024)
    # On a CPU, bf16 is the peak only where the CPU multiplies bf16 natively (AVX512_BF16, AMX:
    # oneDNN's bf16 GEMM is 2.7x / 6x float32 there); elsewhere torch widens it and float32 is.
    # float64 kernels compute in float64, whose own GEMM is their ceiling.
    native = s.dtype in (torch.float32, torch.float64) or _cpu_bf16_native(s.dtype)
    dtype = s.dtype if s.is_cuda or native else torch.float32
    a = [torch.randn(n, n, device=s.device, dtype=dtype) for _ in range(2)]
    b = torch.randn(n, n, device=s.device, dtype=dtype)
    return [lambda x=x: x @ b for x in a], 2 * n**3 / 1e12, dtype


def gemm_ceiling(s: Settings):
    """The device's own matrix-product rate in TFLOP/s: (p20, p50, p80) of the rate, and a note
    (what was measured when it is not the bench dtype)."""
    fns, tflop, dtype = gemm_calls(s)
    ms = measure(fns, s)
    rate = lambda t: tflop / (t * 1e-3)  # noqa: E731
    note = (
        ""
        if dtype == s.dtype
        else f"measured in {str(dtype).replace('torch.', '')} (CPU {s.dtype} GEMM is not the peak)"
    )
    return (rate(ms[2]), rate(ms[1]), rate(ms[0])), note


def add_gemm_to_rounds(rounds: "Rounds", s: Settings) -> dict:
    """Registers the GEMM ceiling's product as the first provider of `rounds`; the returned dict
    gets its median rate under "tflops" before any other provider's result is reported, so their
    "% of GEMM" rows divide by the rate measured in the same rounds (on a drifting CPU, the
    run-start ceiling is not the rate the machine had while the kernels ran)."""
    fns, tflop, _ = gemm_calls(s)
    box: dict = {}
    rounds.add(fns, lambda ms: box.update(tflops=tflop / (ms[1] * 1e-3)))
    return box


def copy_bandwidth(s: Settings):
    """Device-memory copy bandwidth in GB/s counting bytes read plus written: (p20, p50, p80)."""
    nbytes = (1 << 30) if s.is_cuda else (128 << 20 if s.quick else 256 << 20)
    src = torch.empty(nbytes // 4, device=s.device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = measure([lambda: dst.copy_(src)], s)
    rate = lambda t: 2 * nbytes / (t * 1e-3) / 1e9  # noqa: E731
    return (rate(ms[2]), rate(ms[1]), rate(ms[0])), ""


# ---------------------------------------------------------------------------------------------
# findings: what the rnn_vs_attention rows say, each ratio with the range its spreads allow, the
# machine named, and flagged when the figures behind it are noisy


def shape_params(shape: str) -> dict:
    """'B8 d512 L1024' -> {'B': 8, 'd': 512, 'L': 1024}."""
    return {k: int(v) for k, v in re.findall(r"([A-Za-z]+)(\d+)", shape)}


def _noisy(rec: "Recorder", *rows: Row) -> bool:
    return rec.overloaded or any(is_noisy(r.p20, r.p50, r.p80) for r in rows)


def _ranges(values: List[int]) -> str:
    return ", ".join(str(v) for v in values) if values else "none"


def rnn_vs_attention_findings(rec: "Recorder") -> List[str]:
    rows = [r for r in rec.rows if r.suite == "rnn_vs_attention" and r.metric == "time"]
    if not rows:
        return []
    where = rec.meta.get("machine") or "this machine"
    out = []
    seq = {(r.provider, shape_params(r.shape).get("L")): r for r in rows if r.op == "sequence"}
    lstm = {L: r for (p, L), r in seq.items() if p == "lstm_1layer"}
    for other in ("attention_layer", "transformer_encoder_6layer"):
        pairs = [(L, lstm[L], seq[(other, L)]) for L in sorted(lstm) if (other, L) in seq]
        if not pairs:
            continue
        p = shape_params(pairs[0][1].shape)
        faster, slower, unclear, per_len, noisy = [], [], [], [], False
        for L, slow, fast in pairs:
            mid, low, high = speedup(slow, fast)
            (faster if low > 1 else slower if high < 1 else unclear).append(L)
            per_len.append(f"L={L} {format_ratio(mid, low, high)}")
            noisy |= _noisy(rec, slow, fast)
        line = (
            f"{other} vs lstm_1layer (batch {p.get('B')}, width {p.get('d')}, {pairs[0][1].dtype}) on {where}: "
            f"faster at L = {_ranges(faster)}; slower at L = {_ranges(slower)}; "
            f"within the p20-p80 spread at L = {_ranges(unclear)}. Times faster than the LSTM: " + "; ".join(per_len)
        )
        if other == "transformer_encoder_6layer":
            line += " (the claim under test: encoder 3.7x faster at 200 tokens, 1.9x at 1000, on a GPU)"
        out.append(line + (f" [{NOISY_ADVICE}]" if noisy else ""))
    gen = {}
    for r in rows:
        if r.op == "generate_token":
            gen.setdefault(shape_params(r.shape).get("context"), {})[r.provider] = r
    for n in sorted(k for k in gen if k is not None):
        g = gen[n]
        lstm_r, full, cache = g.get("lstm_step"), g.get("attention_full_recompute"), g.get("attention_kv_cache")
        if not (lstm_r and full):
            continue
        p = shape_params(full.shape)
        line = (
            f"per-token generation at context {n} (batch {p.get('B')}, width {p.get('d')}, {full.dtype}) on {where}: "
            f"LSTM step {lstm_r.p50:.3f} ms [{lstm_r.p20:.3f}-{lstm_r.p80:.3f}], "
            f"full recompute {full.p50:.3f} ms [{full.p20:.3f}-{full.p80:.3f}]"
        )
        used = [lstm_r, full]
        if cache:
            used.append(cache)
            line += (
                f", KV-cached decode {cache.p50:.3f} ms [{cache.p20:.3f}-{cache.p80:.3f}]: "
                f"the cache {format_ratio(*speedup(full, cache))} faster than recomputing; "
                f"the LSTM step {format_ratio(*speedup(cache, lstm_r))} faster than the cached decode"
            )
        out.append(line + (f" [{NOISY_ADVICE}]" if _noisy(rec, *used) else ""))
    return out

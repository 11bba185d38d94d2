"""The varlen suite: packed variable-length batches through `seqkernels.attention_varlen`.

One packed batch with a long-tailed length distribution (N sequences, lengths drawn log-uniformly
between lo and hi with a fixed seed; default N=64, 16..4096; --quick N=16, 16..512), causal
self-attention per sequence, Hq=8 query heads over Hkv=2 key/value heads (GQA), D=64, the bench
dtype (float32 on CPU, bfloat16 on a GPU), forward and forward+backward, against the ways a user
without packed-sequence support runs the same function:

  seqkernels_<b>          the packed batch: attention_varlen (cu_seqlens), the row under test
  seqkernels_<b>_padded   (a) the batch padded to the longest sequence, seqkernels.attention with
                          kv_lengths. Bottom-right causal in the padded form lets query row r see
                          key j <= r + kv_lengths[b] - Lmax, so the queries are padded at the FRONT
                          (rows Lmax-L_b..Lmax-1) and the keys/values at the BACK (0..L_b-1): row
                          Lmax-L_b+i then sees exactly keys j <= i of its own sequence, the packed
                          function; the padding rows see no key (output 0, no gradient).
  torch_sdpa_padded       (b) the same padded tensors through torch's scaled_dot_product_attention
                          with a boolean (N, 1, Lmax, Lmax) mask spelling out that pattern; the
                          padding rows are given key 0 (SDPA returns NaN for a row that sees
                          nothing) and a zero upstream gradient, so they change no result.
  seqkernels_<b>_loop     (c) each sequence alone through seqkernels.attention, a Python loop over
                          (1, H, L_b, D) tensors (one autograd.grad over all outputs).

The padded forms are timed on tensors padded beforehand (the kernel, not the copy into padding).
Rates count the useful (query, key) pairs only, exactly (`visible_pairs`): 4 * D * Hq FLOPs per
pair forward, 3.5x that forward+backward (the attention suite's 2.5x for the backward). The dense
comparison (`dense_shape`) is seqkernels.attention, causal, on a (B, Hq, L, D) batch whose L is the
packing's pair-weighted mean length (2 * pairs / tokens) and whose B gives about as many visible
pairs: the kernel's rate on regular work of the same size, which the packed rate should match.

Every provider's output (and gradients) for one sequence (the median length) is checked against the
float64 reference before it is timed, as in the other suites. Findings (`varlen_findings`): packed
rate vs dense rate (target >= 0.9x) and packed time vs each padded alternative (target >= 2x
faster), each with the range the p20-p80 spreads allow, the machine named, noise flagged.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .harness import NOISY_ADVICE, Recorder, Settings, format_ratio, is_noisy, measure, rotations, speedup

SUITE = "varlen"
HQ, HKV, HEAD_DIM = 8, 2, 64
SEED = 0
# Tests set a tiny packing here: {"n": .., "lo": .., "hi": .., "hq": .., "hkv": .., "d": ..}.
_TEST_SHAPE: Optional[dict] = None
# A row whose one call (the parity call) takes longer than this many seconds is timed with one
# warm-up call and 3 repetitions (the padded batches of the default distribution: minutes each).
ONE_CALL_S = 20.0
SLOW_CALL_S = 2.0
PACKED_TARGET = 0.9  # packed FLOP rate / dense FLOP rate
PADDED_TARGET = 2.0  # padded time / packed time


def sequence_lengths(n: int, lo: int, hi: int, seed: int = SEED) -> List[int]:
    """n lengths drawn log-uniformly in [lo, hi] (a long tail of short sequences), fixed seed."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64).tolist()
    a, b = math.log(lo), math.log(hi)
    return [min(hi, max(lo, round(math.exp(a + x * (b - a))))) for x in u]


def visible_pairs(lens_q: Sequence[int], lens_k: Optional[Sequence[int]] = None, causal: bool = True) -> int:
    """The (query, key) pairs attention computes over packed sequences, exactly: sequence b's query
    i sees key j < Lk_b, and with `causal` (bottom-right, as attention_varlen) j <= i + Lk_b - Lq_b."""
    lens_k = lens_q if lens_k is None else lens_k
    total = 0
    for lq, lk in zip(lens_q, lens_k):
        if not causal:
            total += lq * lk
            continue
        off = lk - lq
        # row i sees min(max(i + off + 1, 0), lk) keys: zero rows, a ramp, then full rows
        for i in range(lq):
            total += min(max(i + off + 1, 0), lk)
    return total


def dense_shape(lens: Sequence[int]):
    """(B, L) of the dense causal batch with about the packing's visible pairs: L = the pair-weighted
    mean length 2 * pairs / tokens (rounded to a multiple of 16), B = pairs / (L (L + 1) / 2)."""
    pairs, tokens = visible_pairs(lens), sum(lens)
    L = max(16, 16 * round(2 * pairs / tokens / 16))
    B = max(1, round(pairs / (L * (L + 1) / 2)))
    return B, L


def _distribution(s: Settings):
    if _TEST_SHAPE:
        t = _TEST_SHAPE
        return t["n"], t["lo"], t["hi"], t.get("hq", HQ), t.get("hkv", HKV), t.get("d", HEAD_DIM)
    return (16, 16, 512, HQ, HKV, HEAD_DIM) if s.quick else (64, 16, 4096, HQ, HKV, HEAD_DIM)


def _backend_order(s: Settings):
    if s.backend:
        return (s.backend,)
    return ("cuda", "triton") if s.is_cuda else ("cpu",)


def _rate_per(rec: Recorder, flops: float):
    per = [("tflops", "TFLOP/s", lambda t: flops / (t * 1e-3) / 1e12)]
    gemm = rec.meta.get("gemm_tflops")
    if gemm and gemm == gemm:
        per.append(("pct_gemm", "% of GEMM", lambda t: 100 * flops / (t * 1e-3) / 1e12 / gemm))
    return per


class _Packing:
    """The packed batch and its padded and per-sequence forms (built on first use, dropped after)."""

    def __init__(self, s: Settings, lens: List[int], hq: int, hkv: int, d: int):
        self.s, self.lens, self.hq, self.hkv, self.d = s, lens, hq, hkv, d
        self.n, self.total, self.lmax = len(lens), sum(lens), max(lens)
        starts = [0]
        for L in lens:
            starts.append(starts[-1] + L)
        self.starts = starts
        dev, dt = s.device, s.dtype
        self.cu = torch.tensor(starts, dtype=torch.int32, device=dev)
        nbytes = self.total * (hq + 2 * hkv) * d * dt.itemsize
        g = torch.Generator(device=dev).manual_seed(SEED + 1)
        rnd = lambda *shape: torch.randn(*shape, generator=g, device=dev, dtype=dt)  # noqa: E731
        # Rotated copies of the packed inputs (the other forms are too large to keep several of).
        self.packed = [
            (rnd(self.total, hq, d), rnd(self.total, hkv, d), rnd(self.total, hkv, d))
            for _ in range(rotations(s, nbytes))
        ]
        self.grad = rnd(self.total, hq, d)
        # The parity sequence: the median length (cheap in float64 at any distribution).
        self.check = sorted(range(self.n), key=lambda b: lens[b])[self.n // 2]

    def seq(self, t: torch.Tensor, b: int) -> torch.Tensor:
        """Sequence b of a packed (T, H, D) tensor as (1, H, L_b, D)."""
        return t[self.starts[b] : self.starts[b + 1]].transpose(0, 1).unsqueeze(0)

    def padded(self, t: torch.Tensor, front: bool) -> torch.Tensor:
        """(N, H, Lmax, D), sequence b at rows Lmax-L_b.. (front) or 0..L_b-1 (back), zeros elsewhere."""
        out = t.new_zeros(self.n, t.shape[1], self.lmax, t.shape[2])
        for b, L in enumerate(self.lens):
            r0 = self.lmax - L if front else 0
            out[b, :, r0 : r0 + L] = t[self.starts[b] : self.starts[b + 1]].transpose(0, 1)
        return out

    def sdpa_mask(self) -> torch.Tensor:
        """(N, 1, Lmax, Lmax) bool for the front-padded queries / back-padded keys: row r of sequence
        b sees key j iff j <= r - (Lmax - L_b) (so j < L_b), and a padding row sees key 0 only."""
        dev, Lm = self.s.device, self.lmax
        r = torch.arange(Lm, device=dev).view(1, Lm, 1)
        j = torch.arange(Lm, device=dev).view(1, 1, Lm)
        pad = torch.tensor([Lm - L for L in self.lens], device=dev).view(-1, 1, 1)
        m = (j <= r - pad) | ((r < pad) & (j == 0))
        return m.unsqueeze(1)


def _ref_check(p: _Packing, q, k, v, dtype, grad: bool):
    """Reference output (and q, k, v gradients) of the parity sequence, computed in `dtype`."""
    from .. import reference

    b = p.check
    xs = [p.seq(t, b).to(dtype).detach().requires_grad_(grad) for t in (q, k, v)]
    out = reference.attention_ref(*xs, window_left=-1, window_right=0)[0]
    if not grad:
        return out.detach()
    return torch.autograd.grad(out, xs, p.seq(p.grad, b).to(dtype))


def _providers(p: _Packing, s: Settings, b: Optional[str], kind: str):
    """One provider's callables: setup() builds the inputs it needs (a handle h), fwd(h, i) runs the
    forward on input rotation i, leaves(h) gives the inputs as autograd leaves, fwdbwd(h, xs) runs
    forward + backward and returns (out, grads), pick(h, out) / pick_grads(h, grads) extract the
    parity sequence as (1, H, L, D)."""
    import seqkernels

    c = p.check
    L = p.lens[c]

    if kind == "packed":

        def setup():
            return {"in": p.packed, "g": p.grad}

        def fwd(h, i):
            q, k, v = h["in"][i]
            return seqkernels.attention_varlen(q, k, v, p.cu, p.cu, p.lmax, p.lmax, causal=True, backend=b)

        def leaves(h):
            return [t.detach().requires_grad_() for t in h["in"][0]]

        def fwdbwd(h, xs):
            out = seqkernels.attention_varlen(*xs, p.cu, p.cu, p.lmax, p.lmax, causal=True, backend=b)
            return out, torch.autograd.grad(out, xs, h["g"])

        def pick(h, out):
            return p.seq(out, c)

        def pick_grads(h, grads):
            return tuple(p.seq(t, c) for t in grads)

    elif kind == "loop":

        def setup():
            per = [[p.seq(t, bb).contiguous() for t in p.packed[0]] for bb in range(p.n)]
            return {"in": per, "g": [p.seq(p.grad, bb).contiguous() for bb in range(p.n)]}

        def fwd(h, i):
            return [seqkernels.attention(q, k, v, causal=True, backend=b) for q, k, v in h["in"]]

        def leaves(h):
            return [[t.detach().requires_grad_() for t in x] for x in h["in"]]

        def fwdbwd(h, xs):
            outs = [seqkernels.attention(q, k, v, causal=True, backend=b) for q, k, v in xs]
            return outs, torch.autograd.grad(outs, [t for x in xs for t in x], h["g"])

        def pick(h, out):
            return out[c]

        def pick_grads(h, grads):
            return tuple(grads[3 * c : 3 * c + 3])

    else:  # padded: seqkernels kv_lengths, or torch SDPA with a mask, on the same padded tensors

        def setup():
            q, k, v = p.packed[0]
            h = {
                "in": [(p.padded(q, True), p.padded(k, False), p.padded(v, False))],
                "g": p.padded(p.grad, True),
                "kvl": torch.tensor(p.lens, dtype=torch.int32, device=p.s.device),
            }
            if kind == "sdpa":
                h["mask"] = p.sdpa_mask()
            return h

        def call(h, q, k, v):
            if kind == "sdpa":
                return F.scaled_dot_product_attention(q, k, v, attn_mask=h["mask"], enable_gqa=True)
            return seqkernels.attention(q, k, v, causal=True, kv_lengths=h["kvl"], backend=b)

        def fwd(h, i):
            return call(h, *h["in"][0])

        def leaves(h):
            return [t.detach().requires_grad_() for t in h["in"][0]]

        def fwdbwd(h, xs):
            out = call(h, *xs)
            return out, torch.autograd.grad(out, xs, h["g"])

        def pick(h, out):
            return out[c : c + 1, :, p.lmax - L :]

        def pick_grads(h, grads):
            dq, dk, dv = grads
            return dq[c : c + 1, :, p.lmax - L :], dk[c : c + 1, :, :L], dv[c : c + 1, :, :L]

    return setup, fwd, leaves, fwdbwd, pick, pick_grads


def _timed(rec: Recorder, s: Settings, op: str, name: str, shape: str, fns, first_s: float, flops: float):
    """Measure fns with the harness; a row whose first call took over SLOW_CALL_S seconds gets one
    warm-up call and 3 repetitions (the padded default batches: minutes per call on 2 cores)."""
    note = ""
    if first_s > ONE_CALL_S:
        # Torch SDPA on the padded default batch: ~40 s forward, ~2 min with the backward on 2
        # cores. Repeating it would double the whole `seqkernels bench`; its first call is the figure.
        ms = (first_s * 1e3,) * 3
        note = f"one call ({first_s:.1f} s): too slow to repeat, no spread"
    elif first_s > SLOW_CALL_S:
        ms = measure(fns, dataclasses.replace(s, quick=True), min_time=0.0, max_reps=3)
        note = f"3 repetitions (one call took {first_s:.1f} s)"
    else:
        ms = measure(fns, s)
    rec.add_time(SUITE, op, name, shape, ms, per=_rate_per(rec, flops), note=note)


def _run_provider(rec, s, p: _Packing, b, kind, name, shape, flops, refs, progress):
    from .suites import _gate

    setup, fwd, leaves, fwdbwd, pick, pick_grads = _providers(p, s, b, kind)
    progress(f"varlen {name} {shape}")
    try:
        h = setup()
        with torch.no_grad():
            t0 = time.perf_counter()
            out = fwd(h, 0)
            first = time.perf_counter() - t0
    except Exception as e:  # a provider that cannot run this packing is reported, not fatal
        rec.add_failure(SUITE, "fwd", name, shape, f"unsupported: {type(e).__name__}: {str(e)[:160]}")
        return
    bad = _gate(pick(h, out), refs["out64"], refs["out"])
    del out
    if bad:
        rec.add_failure(SUITE, "fwd", name, shape, bad)
    else:
        nrot = len(h["in"]) if kind == "packed" else 1  # the loop's "in" is per sequence, not rotations
        with torch.no_grad():
            _timed(rec, s, "fwd", name, shape, [lambda i=i: fwd(h, i) for i in range(nrot)], first, flops)
    progress(f"varlen {name} fwd+bwd {shape}")
    try:
        xs = leaves(h)
        t0 = time.perf_counter()
        out, grads = fwdbwd(h, xs)
        first = time.perf_counter() - t0
    except Exception as e:
        rec.add_failure(SUITE, "fwd+bwd", name, shape, f"unsupported: {type(e).__name__}: {str(e)[:160]}")
        return
    bad = _gate(pick_grads(h, grads), refs["grads64"], refs["grads"], grad=True)
    del out, grads
    if bad:
        rec.add_failure(SUITE, "fwd+bwd", name, shape, bad)
        return
    _timed(rec, s, "fwd+bwd", name, shape, [lambda: fwdbwd(h, xs)], first, 3.5 * flops)


def _dense_rows(rec, s, b, B, L, hq, hkv, d, progress):
    import seqkernels

    from .. import reference
    from .suites import _gate

    shape = f"B{B} Hq{hq} Hkv{hkv} L{L} D{d} causal dense"
    flops = 4 * d * hq * B * L * (L + 1) / 2
    q = torch.randn(B, hq, L, d, device=s.device, dtype=s.dtype)
    k, v = (torch.randn(B, hkv, L, d, device=s.device, dtype=s.dtype) for _ in range(2))
    g = torch.randn_like(q)
    name = f"seqkernels_{b}"
    progress(f"varlen dense {name} {shape}")

    def fwd():
        return seqkernels.attention(q, k, v, causal=True, backend=b)

    # Parity as for the packed rows: batch 0, the query heads of kv head 0, against float64.
    grp = hq // hkv
    sl = [t[:1, :grp] for t in (q, g)] + [t[:1, :1] for t in (k, v)]

    def ref(dtype):
        xs_ = [x.to(dtype).detach().requires_grad_() for x in (sl[0], sl[2], sl[3])]
        out_ = reference.attention_ref(*xs_, window_left=-1, window_right=0)[0]
        return out_.detach(), torch.autograd.grad(out_, xs_, sl[1].to(dtype))

    try:
        (o64, g64), (o_, g_) = ref(torch.float64), ref(s.dtype)
        with torch.no_grad():
            t0 = time.perf_counter()
            bad = _gate(fwd()[:1, :grp], o64, o_)
            first = time.perf_counter() - t0
            if bad:
                rec.add_failure(SUITE, "fwd", name, shape, bad)
            else:
                _timed(rec, s, "fwd", name, shape, [fwd], first, flops)
        xs = [t.detach().requires_grad_() for t in (q, k, v)]

        def fwdbwd():
            return torch.autograd.grad(seqkernels.attention(*xs, causal=True, backend=b), xs, g)

        t0 = time.perf_counter()
        dq, dk, dv = fwdbwd()
        first = time.perf_counter() - t0
        # dk, dv of kv head 0 sum over its grp query heads, all of which the reference slice holds.
        bad = _gate((dq[:1, :grp], dk[:1, :1], dv[:1, :1]), g64, g_, grad=True)
        if bad:
            rec.add_failure(SUITE, "fwd+bwd", name, shape, bad)
            return
        _timed(rec, s, "fwd+bwd", name, shape, [fwdbwd], first, 3.5 * flops)
    except Exception as e:
        rec.add_failure(SUITE, "fwd", name, shape, f"unsupported: {type(e).__name__}: {str(e)[:160]}")


def suite_varlen(rec: Recorder, s: Settings, progress):
    import seqkernels
    from seqkernels import backends

    n, lo, hi, hq, hkv, d = _distribution(s)
    lens = sequence_lengths(n, lo, hi)
    p = _Packing(s, lens, hq, hkv, d)
    pairs = visible_pairs(lens)
    flops = 4 * d * hq * pairs
    med = sorted(lens)[n // 2]
    shape = f"N{n} T{p.total} Lmin{min(lens)} Lmed{med} Lmax{p.lmax} Hq{hq} Hkv{hkv} D{d} causal"
    padded_pairs = n * p.lmax * (p.lmax + 1) // 2
    rec.meta.setdefault("varlen", {})[shape] = {
        "lengths": lens,
        "distribution": f"{n} lengths log-uniform in [{lo}, {hi}], seed {SEED}",
        "visible_pairs": pairs,
        "padded_causal_pairs": padded_pairs,
        "padded_dense_pairs": n * p.lmax * p.lmax,
    }
    q0, k0, v0 = p.packed[0]
    refs = {"out64": _ref_check(p, q0, k0, v0, torch.float64, False), "out": _ref_check(p, q0, k0, v0, s.dtype, False)}
    refs["grads64"] = _ref_check(p, q0, k0, v0, torch.float64, True)
    refs["grads"] = _ref_check(p, q0, k0, v0, s.dtype, True)
    dev = torch.device(s.device)
    call_varlen = seqkernels.ops.attention.prepare_attention_varlen(q0, k0, v0, p.cu, p.cu, p.lmax, p.lmax, causal=True)
    call_4d = seqkernels.ops.attention.prepare_attention(p.seq(q0, 0), p.seq(k0, 0), p.seq(v0, 0), causal=True)
    B, L = dense_shape(lens)
    for b in _backend_order(s):
        why = backends.why_not(seqkernels.ops.attention.VARLEN_OP, b, dev, call_varlen)
        if why is None:
            _run_provider(rec, s, p, b, "packed", f"seqkernels_{b}", shape, flops, refs, progress)
        else:
            for op in ("fwd", "fwd+bwd"):
                rec.add_failure(SUITE, op, f"seqkernels_{b}", shape, f"unsupported: {why}")
        if backends.why_not(seqkernels.ops.attention.OP, b, dev, call_4d) is not None:
            continue
        _dense_rows(rec, s, b, B, L, hq, hkv, d, progress)
        _run_provider(rec, s, p, b, "loop", f"seqkernels_{b}_loop", shape, flops, refs, progress)
        _run_provider(rec, s, p, b, "padded", f"seqkernels_{b}_padded", shape, flops, refs, progress)
    if not s.backend:
        _run_provider(rec, s, p, None, "sdpa", "torch_sdpa_padded", shape, flops, refs, progress)
    # The suite's notes (kept in the JSON): the findings, recomputed from the rows with their spreads.
    lines = varlen_findings(rec)
    rec.meta.setdefault("findings", []).extend(lines)
    for line in lines:
        progress("varlen finding: " + line)


# ---------------------------------------------------------------------------------------------
# findings


def _verdict(low: float, high: float, target: float) -> str:
    if low >= target:
        return f"meets the >= {target:g}x target across the p20-p80 spread"
    if high < target:
        return f"misses the >= {target:g}x target across the p20-p80 spread"
    return f"the >= {target:g}x target lies within the p20-p80 spread (not established either way)"


def _noisy(rec: Recorder, *rows) -> bool:
    return rec.overloaded or any(is_noisy(r.p20, r.p50, r.p80) for r in rows)


def varlen_findings(rec: Recorder) -> List[str]:
    """The suite's claims, from its rows: packed rate vs the dense kernel's (>= 0.9x) and packed
    time vs each padded alternative (>= 2x faster), with the ranges the spreads allow."""
    where = rec.meta.get("machine") or "this machine"
    rows = [r for r in rec.rows if r.suite == SUITE]
    out = []
    packed_shapes = [r.shape for r in rows if not r.shape.endswith(" dense")]
    for shape in dict.fromkeys(packed_shapes):
        for op in ("fwd", "fwd+bwd"):
            here = {r.provider: r for r in rows if r.shape == shape and r.op == op and r.metric in ("time", "status")}
            packed = [
                pr
                for pr in here
                if pr.startswith("seqkernels_") and not pr.endswith(("_padded", "_loop")) and here[pr].metric == "time"
            ]
            if not packed:
                first = next(
                    (r for r in here.values() if r.metric == "status" and r.provider.startswith("seqkernels_")
                     and not r.provider.endswith(("_padded", "_loop"))),
                    None,
                )  # fmt: skip
                out.append(
                    f"varlen {op} ({shape}) on {where}: packed attention not measured"
                    + (f" ({first.provider}: {first.note})" if first else "")
                    + "; no packed-vs-padded or packed-vs-dense figure"
                )
                continue
            for name in packed:
                out += _findings_for(rec, rows, shape, op, name, where)
    return out


def _findings_for(rec, rows, shape, op, name, where) -> List[str]:
    def row(provider, metric, shp=shape):
        return next((r for r in rows if (r.provider, r.metric, r.shape, r.op) == (provider, metric, shp, op)), None)

    t_packed, r_packed = row(name, "time"), row(name, "tflops")
    dtype = t_packed.dtype
    out = []
    dense_t = next((r for r in rows if r.op == op and r.provider == name and r.metric == "tflops"
                    and r.shape.endswith(" dense")), None)  # fmt: skip
    if dense_t and r_packed:
        mid = r_packed.p50 / dense_t.p50
        low, high = r_packed.p20 / dense_t.p80, r_packed.p80 / dense_t.p20
        low, high = min(low, high), max(low, high)
        line = (
            f"varlen {op} ({shape}, {dtype}) on {where}: {name} packed runs {r_packed.p50:.4g} TFLOP/s "
            f"[{r_packed.p20:.4g}-{r_packed.p80:.4g}] on the useful pairs vs the dense kernel's {dense_t.p50:.4g} "
            f"[{dense_t.p20:.4g}-{dense_t.p80:.4g}] on {dense_t.shape}: {format_ratio(mid, low, high)} the dense "
            f"rate; {_verdict(low, high, PACKED_TARGET)}"
        )
        dense_time = row(name, "time", dense_t.shape)
        out.append(line + (f" [{NOISY_ADVICE}]" if _noisy(rec, t_packed, dense_time or t_packed) else ""))
    parts, used = [], [t_packed]
    for alt in (f"{name}_padded", "torch_sdpa_padded", f"{name}_loop"):
        t_alt = row(alt, "time")
        if t_alt is None:
            st = row(alt, "status")
            if st is not None:
                parts.append(f"{alt}: not timed ({st.note})")
            continue
        used.append(t_alt)
        mid, low, high = speedup(t_alt, t_packed)
        # The >= 2x bar is against the padded alternatives; the per-sequence loop is reported as is.
        verdict = _verdict(low, high, PADDED_TARGET) if not alt.endswith("_loop") else "(no target)"
        parts.append(
            f"vs {alt} {t_alt.p50:.4g} ms [{t_alt.p20:.4g}-{t_alt.p80:.4g}]: {format_ratio(mid, low, high)} faster, "
            + verdict
        )
    if parts:
        line = (
            f"varlen {op} ({shape}, {dtype}) on {where}: {name} packed {t_packed.p50:.4g} ms "
            f"[{t_packed.p20:.4g}-{t_packed.p80:.4g}] " + "; ".join(parts)
        )
        out.append(line + (f" [{NOISY_ADVICE}]" if _noisy(rec, *used) else ""))
    return out

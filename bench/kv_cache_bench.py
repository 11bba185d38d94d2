"""KV cache microbenchmarks: append GB/s against the same-run copy bandwidth, decode GB/s of K/V read
against torch SDPA on the sliced cache (DESIGN §7, §8).

    python bench/kv_cache_bench.py [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--quick]

`run(device, dtype, quick)` returns long-format rows (dicts) for the benchmark harness. Every provider is
checked against the float64 reference (decode, DESIGN §5 rule) or the exact expected cache contents
(append) before it is timed; a wrong result is reported, never timed. Times are medians (p20/p80 too) of
repeated calls; ratios are taken against peers measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import seqkernels  # noqa: E402
from seqkernels import backends, reference, testing  # noqa: E402
from seqkernels.bench.harness import Settings, copy_bandwidth, measure  # noqa: E402
from seqkernels.ops import kv_cache as kv_ops  # noqa: E402


def _backends(s: Settings, op, call) -> List[str]:
    order = ("cuda", "triton") if s.is_cuda else ("cpu",)
    return [b for b in order if backends.why_not(op, b, torch.device(s.device), call) is None]


def _row(rows, op, provider, shape, s, metric, unit, ms_or_rate):
    p20, p50, p80 = ms_or_rate
    rows.append(dict(op=op, provider=provider, shape=shape, dtype=str(s.dtype).replace("torch.", ""), device=s.device,
                     metric=metric, unit=unit, median=p50, p20=p20, p80=p80))


def _timed(rows, op, provider, shape, s, ms, nbytes, copy_gbps):
    _row(rows, op, provider, shape, s, "time", "ms", ms)
    rate = tuple(nbytes / (t * 1e-3) / 1e9 for t in (ms[2], ms[1], ms[0]))  # p80 time -> p20 rate
    _row(rows, op, provider, shape, s, "gbps", "GB/s", rate)
    _row(rows, op, provider, shape, s, "pct_copy", "% of copy", tuple(100 * r / copy_gbps for r in rate))


def _paged_copy(kc, vc, block_size):
    """The same cache contents as a paged cache whose block table is a random permutation."""
    B, H, S, D = kc.shape
    nb = S // block_size
    perm = torch.randperm(B * nb, device=kc.device)
    table = perm.view(B, nb).to(torch.int32)
    pk = torch.empty(B * nb, H, block_size, D, device=kc.device, dtype=kc.dtype)
    pv = torch.empty(B * nb, H, block_size, vc.shape[-1], device=kc.device, dtype=kc.dtype)
    pk[perm] = kc.view(B, H, nb, block_size, D).permute(0, 2, 1, 3, 4).reshape(B * nb, H, block_size, D)
    pv[perm] = vc.view(B, H, nb, block_size, -1).permute(0, 2, 1, 3, 4).reshape(B * nb, H, block_size, -1)
    return pk, pv, table


def bench_decode(s: Settings, rows, copy_gbps):
    if s.is_cuda:
        shapes = [(64, 32, 8, S, 128) for S in ([4096] if s.quick else [1024, 4096, 16384])]
    else:
        shapes = [(4, 32, 8, S, 128) for S in ([2048] if s.quick else [1024, 4096])] + [(8, 8, 8, 1024, 64)]
    for (B, Hq, Hkv, S, D) in shapes:
        shape = f"B{B} Hq{Hq} Hkv{Hkv} S{S} D{D}"
        kc = torch.randn(B, Hkv, S, D, device=s.device, dtype=s.dtype)
        vc = torch.randn_like(kc)
        q = torch.randn(B, Hq, 1, D, device=s.device, dtype=s.dtype)
        lens = torch.full((B,), S, dtype=torch.int32, device=s.device)
        pk, pv, table = _paged_copy(kc, vc, 16)
        nbytes = 2 * kc.numel() * kc.element_size()
        ref = reference.decode_attention_ref(q[:1].cpu().double(), kc[:1].cpu().double(), vc[:1].cpu().double(),
                                             lens[:1].cpu())[0]
        base = reference.decode_attention_ref(q[:1], kc[:1], vc[:1], lens[:1])[0].cpu()
        call = kv_ops.prepare_decode(q, kc, vc, lens)
        provs: Dict[str, object] = {}
        for b in _backends(s, kv_ops.DECODE_OP, call):
            provs[f"seqkernels_{b}"] = (lambda b_: lambda: seqkernels.decode_attention(q, kc, vc, lens, backend=b_))(b)
            provs[f"seqkernels_{b}_paged"] = (lambda b_: lambda: seqkernels.decode_attention(
                q, pk, pv, lens, block_table=table, backend=b_))(b)
        provs["torch_sdpa_slice"] = lambda: F.scaled_dot_product_attention(q, kc[:, :, :S], vc[:, :, :S],
                                                                         enable_gqa=True)
        for name, fn in provs.items():
            report = testing.compare(fn()[:1].cpu(), ref, base)
            if not report.passed:
                _row(rows, "decode", name, shape, s, "status", f"parity FAILED: {report}", (float("nan"),) * 3)
                continue
            _timed(rows, "decode", name, shape, s, measure([fn], s), nbytes, copy_gbps)


def bench_append(s: Settings, rows, copy_gbps):
    if s.is_cuda:
        shapes = [(64, 8, 4096, 1, 128), (8, 8, 4096, 512, 128)]
    else:
        shapes = [(16, 8, 2048, 1, 128), (4, 8, 2048, 256, 128)]
    if s.quick:
        shapes = shapes[1:]
    for (B, H, S, T, D) in shapes:
        shape = f"B{B} H{H} S{S} T{T} D{D}"
        kc = torch.randn(B, H, S, D, device=s.device, dtype=s.dtype)
        vc = torch.randn_like(kc)
        kn = torch.randn(B, H, T, D, device=s.device, dtype=s.dtype)
        vn = torch.randn_like(kn)
        p0 = S // 2
        lens = torch.full((B,), p0, dtype=torch.int32, device=s.device)
        pk, pv, table = _paged_copy(kc, vc, 16)
        nbytes = 4 * kn.numel() * kn.element_size()  # read k_new, v_new; write as much into the caches

        def slice_copy():
            kc[:, :, p0:p0 + T] = kn
            vc[:, :, p0:p0 + T] = vn

        call = kv_ops.prepare_append(kc, vc, kn, vn, lens)
        provs = {"torch_slice_copy": (slice_copy, False)}
        for b in _backends(s, kv_ops.APPEND_OP, call):
            provs[f"seqkernels_{b}"] = ((lambda b_: lambda: seqkernels.kv_cache_append(
                kc, vc, kn, vn, lens, check=False, backend=b_))(b), False)
            provs[f"seqkernels_{b}_paged"] = ((lambda b_: lambda: seqkernels.kv_cache_append(
                pk, pv, kn, vn, lens, block_table=table, check=False, backend=b_))(b), True)
        for name, (fn, paged) in provs.items():
            kc.uniform_(), vc.uniform_(), pk.uniform_(), pv.uniform_()
            fn()
            if paged:
                ends = [(b, p) for b in range(B) for p in (p0, p0 + T - 1)]
                got_k = torch.stack([pk[table[b, p // 16].long(), :, p % 16] for b, p in ends])
                want_k = torch.stack([kn[b, :, t] for b in range(B) for t in (0, T - 1)])
                ok = torch.equal(got_k, want_k)
            else:
                ok = torch.equal(kc[:, :, p0:p0 + T], kn) and torch.equal(vc[:, :, p0:p0 + T], vn)
            if not ok:
                _row(rows, "append", name, shape, s, "status", "parity FAILED: appended tokens differ",
                     (float("nan"),) * 3)
                continue
            _timed(rows, "append", name, shape, s, measure([fn], s), nbytes, copy_gbps)


def run(device: str = "cpu", dtype: torch.dtype = torch.float32, quick: bool = False) -> List[dict]:
    """Rows of dicts: op, provider, shape, dtype, device, metric, unit, median, p20, p80."""
    s = Settings(device=device, dtype=dtype, quick=quick)
    rows: List[dict] = []
    copy_gbps = copy_bandwidth(s)
    _row(rows, "ceiling", "torch.copy_", "-", s, "gbps", "GB/s", (copy_gbps,) * 3)
    bench_append(s, rows, copy_gbps)
    bench_decode(s, rows, copy_gbps)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    rows = run(args.device, getattr(torch, args.dtype), args.quick)
    peers = {(r["op"], r["shape"]): r["median"] for r in rows
             if r["metric"] == "time" and r["provider"] in ("torch_sdpa_slice", "torch_slice_copy")}
    print(f"{'op':8} {'provider':26} {'shape':28} {'ms':>9} {'GB/s':>8} {'% copy':>7} {'vs torch':>8}")
    for r in rows:
        if r["metric"] == "status":
            print(f"{r['op']:8} {r['provider']:26} {r['shape']:28} {r['unit']}")
        if r["metric"] != "time":
            continue
        rate = next(x["median"] for x in rows if x["metric"] == "gbps" and x["provider"] == r["provider"]
                    and x["shape"] == r["shape"] and x["op"] == r["op"])
        pct = next(x["median"] for x in rows if x["metric"] == "pct_copy" and x["provider"] == r["provider"]
                   and x["shape"] == r["shape"] and x["op"] == r["op"])
        peer = peers.get((r["op"], r["shape"]))
        ratio = f"{peer / r['median']:.2f}x" if peer else "-"
        print(f"{r['op']:8} {r['provider']:26} {r['shape']:28} {r['median']:9.3f} {rate:8.1f} {pct:6.0f}% {ratio:>8}")
    print(f"copy bandwidth (read + write, same run): {rows[0]['median']:.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

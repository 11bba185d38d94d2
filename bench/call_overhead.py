"""Per-call time of small seqkernels calls on the CPU next to torch's, where the host work around the
kernel (argument checks, backend choice, the op dispatch) is most of the call.

    python bench/call_overhead.py [--rounds 30] [--calls 500]

Each line is the fastest of `rounds` averages over `calls` back-to-back calls (the minimum: host
work is what is measured here, and on a shared machine anything above it is other tenants). Cases:
a decode step of one sequence with 100 cached tokens (B1 Hq8 Hkv8 D64), the one-token append that
precedes it (with and without the host check), and a small attention (2,8,5,64) through
`scaled_dot_product_attention` and `attention`; torch's line for each is the same work its own way
(SDPA on the cache slice, two slice copies, SDPA).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import seqkernels


def best_us(fn, rounds: int, calls: int) -> float:
    for _ in range(min(100, calls)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=500)
    a = ap.parse_args()
    torch.manual_seed(0)
    B, Hq, Hkv, S, D, n = 1, 8, 8, 2048, 64, 100
    q = torch.randn(B, Hq, 1, D)
    kc, vc = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kn, vn = torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D)
    lens = torch.full((B,), n, dtype=torch.int32)
    x = torch.randn(2, 8, 5, 64)
    cases = [
        (
            "decode step, 100 cached",
            lambda: seqkernels.decode_attention(q, kc, vc, lens),
            lambda: F.scaled_dot_product_attention(q, kc[:, :, :n], vc[:, :, :n]),
        ),
        (
            "append 1 token, checked",
            lambda: seqkernels.kv_cache_append(kc, vc, kn, vn, lens),
            lambda: (kc[:, :, n : n + 1].copy_(kn), vc[:, :, n : n + 1].copy_(vn)),
        ),
        (
            "append 1 token, check=False",
            lambda: seqkernels.kv_cache_append(kc, vc, kn, vn, lens, check=False),
            lambda: (kc[:, :, n : n + 1].copy_(kn), vc[:, :, n : n + 1].copy_(vn)),
        ),
        (
            "sdpa (2,8,5,64)",
            lambda: seqkernels.scaled_dot_product_attention(x, x, x),
            lambda: F.scaled_dot_product_attention(x, x, x),
        ),
        (
            "attention (2,8,5,64)",
            lambda: seqkernels.attention(x, x, x),
            lambda: F.scaled_dot_product_attention(x, x, x),
        ),
    ]
    with torch.no_grad():
        for name, ours, theirs in cases:
            t_ours, t_torch = best_us(ours, a.rounds, a.calls), best_us(theirs, a.rounds, a.calls)
            print(f"{name:30s} seqkernels {t_ours:7.1f} us   torch {t_torch:7.1f} us", flush=True)


if __name__ == "__main__":
    main()

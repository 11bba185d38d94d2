"""Same-run ratios to torch on the CPU for the dtypes and arguments the bench's suites do not time:
float64 attention (forward, causal, forward + backward, softcap) and decode, a random bool mask in
float32, and float16 `seqkernels.nn.LSTM` (bench/NOTES.md entry 19).

    python bench/dtype_paths.py [--rounds 9]

Each line times torch and seqkernels in alternating rounds (one call each per round, the order
reversed every other round, so the host's drift moves both alike) and prints the median of the
per-round ratios torch time / seqkernels time (> 1: seqkernels faster) with both medians in ms.
The softcap line's peer is torch's eager formulation (SDPA has no softcap); decode's is SDPA on the
whole cache (GQA).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import seqkernels


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rounds(torch_fn, sk_fn, n: int):
    torch_fn(), sk_fn()
    ratios, tt, ts = [], [], []
    for r in range(n):
        if r % 2:
            a, b = _once(torch_fn), _once(sk_fn)
        else:
            b, a = _once(sk_fn), _once(torch_fn)
        ratios.append(a / b)
        tt.append(a)
        ts.append(b)
    return statistics.median(ratios), 1e3 * statistics.median(tt), 1e3 * statistics.median(ts)


def _eager_softcap(q, k, v, cap):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(cap * torch.tanh(s / cap), -1) @ v


def cases(n: int):
    d = torch.float64
    for shape in [(1, 8, 1024, 64), (4, 8, 512, 64)]:
        q, k, v = (torch.randn(shape, dtype=d) for _ in range(3))
        for causal in (False, True):
            yield (
                f"float64 forward {shape} {'causal' if causal else 'full'}",
                rounds(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                    lambda: seqkernels.attention(q, k, v, causal=causal),
                    n,
                ),
            )
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        go = torch.randn(shape, dtype=d)
        yield (
            f"float64 forward+backward {shape} full",
            rounds(
                lambda: F.scaled_dot_product_attention(qg, kg, vg).backward(go),
                lambda: seqkernels.attention(qg, kg, vg).backward(go),
                max(3, n // 2),
            ),
        )
    q, k, v = (torch.randn(4, 8, 512, 64, dtype=d) for _ in range(3))
    yield (
        "float64 forward (4, 8, 512, 64) softcap 30 (peer: eager)",
        rounds(lambda: _eager_softcap(q, k, v, 30.0), lambda: seqkernels.attention(q, k, v, softcap=30.0), n),
    )
    for S in (1024, 4096):
        qd = torch.randn(1, 32, 1, 128, dtype=d)
        kc, vc = (torch.randn(1, 8, S, 128, dtype=d) for _ in range(2))
        lens = torch.full((1,), S, dtype=torch.int32)
        yield (
            f"float64 decode B1 Hq32 Hkv8 S{S} D128",
            rounds(
                lambda: F.scaled_dot_product_attention(qd, kc, vc, enable_gqa=True),
                lambda: seqkernels.decode_attention(qd, kc, vc, lens),
                2 * n,
            ),
        )
    q, k, v = (torch.randn(1, 8, 1024, 64) for _ in range(3))
    mask = torch.rand(1, 1, 1024, 1024) > 0.3
    yield (
        "float32 forward (1, 8, 1024, 64) random bool mask",
        rounds(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            lambda: seqkernels.attention(q, k, v, attn_mask=mask),
            n,
        ),
    )
    for T, B, H, layers in [(64, 16, 256, 2), (64, 8, 512, 1)]:
        ref = torch.nn.LSTM(H, H, layers).half()
        ours = seqkernels.nn.LSTM(H, H, layers).half()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(T, B, H, dtype=torch.float16)
        with torch.no_grad():
            yield (
                f"float16 nn.LSTM inference (T{T}, B{B}, H{H}, {layers} layers)",
                rounds(lambda: ref(x), lambda: ours(x), max(3, n // 2)),
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.manual_seed(0)
    for name, (ratio, t_ms, s_ms) in cases(args.rounds):
        print(f"{name:58s} {ratio:5.2f}x   torch {t_ms:9.2f} ms   seqkernels {s_ms:9.2f} ms", flush=True)


if __name__ == "__main__":
    main()

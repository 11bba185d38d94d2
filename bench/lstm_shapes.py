"""seqkernels.nn.LSTM against torch.nn.LSTM (oneDNN) at the four shapes of DESIGN §8's LSTM bar.

    python bench/lstm_shapes.py [--mode inf|train] [--dtype float32|bfloat16|float16] [--reps 11]

inf: a forward without gradients (the C++ sequence kernel); train: forward and backward of
out.sum() (the fused training forward and the one-call recurrence backward). Shapes (T, B, H,
layers): (128, 16, 256, 2), (128, 64, 256, 2), (64, 8, 512, 1), (100, 32, 512, 2), input size H.
Prints the median time of each and torch / seqkernels (above 1: seqkernels is faster), the two
timed in alternating rounds (the bench's measure_rounds: a shared host's drift moves both alike).
Same weights for both (in --dtype, float32 by default), the default thread count.
"""

from __future__ import annotations

import argparse

import torch

from seqkernels.bench.harness import Settings, measure_rounds
from seqkernels.nn import LSTM

SHAPES = [(128, 16, 256, 2), (128, 64, 256, 2), (64, 8, 512, 1), (100, 32, 512, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["inf", "train"], default="inf")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    ap.add_argument("--reps", type=int, default=11, help="at most this many rounds (at least 5, and 1 s of each)")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    for T, B, H, layers in SHAPES:
        ref = torch.nn.LSTM(H, H, num_layers=layers, dtype=dtype)
        ours = LSTM(H, H, num_layers=layers, backend="cpu", dtype=dtype)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(T, B, H, dtype=dtype, requires_grad=a.mode == "train")

        def run(m):
            if a.mode == "inf":
                with torch.no_grad():
                    m(x)
            else:
                m(x)[0].sum().backward()

        s = Settings("cpu", dtype, quick=False)
        (_, t_ref, _), (_, t_ours, _) = measure_rounds([[lambda: run(ref)], [lambda: run(ours)]], s, max_reps=a.reps)
        print(
            f"{a.mode} {a.dtype} T{T} B{B} H{H} layers{layers}: torch {t_ref:.2f} ms, seqkernels {t_ours:.2f} ms, "
            f"ratio {t_ref / t_ours:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()

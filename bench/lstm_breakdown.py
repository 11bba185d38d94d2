"""Where the time of seqkernels.nn.LSTM goes on a CPU, next to torch's oneDNN nn.LSTM.

    python bench/lstm_breakdown.py [--layers 2] [--hidden 256] [--length 128] [--batch 32] [--reps 12]

Times, interleaved round by round so that a noisy shared machine affects every entry alike (medians):
torch's nn.LSTM; seqkernels.nn.LSTM (cpu backend, inference: the C++ sequence kernel
seqkernels::lstm_layer_fwd); and the pieces of the per-step path (what a forward with gradients
runs), each alone: the input projection GEMMs of all layers, the per-step recurrent GEMMs through the
BLAS (threaded by it), and the per-step fused cell calls. bench/NOTES.md entries 5 and 6 read these.
"""

from __future__ import annotations

import argparse
import time

import torch

import seqkernels  # noqa: F401  (registers the ops)
from seqkernels.nn import LSTM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=12)
    a = ap.parse_args()
    L, B, H, layers = a.length, a.batch, a.hidden, a.layers

    torch.manual_seed(0)
    ref = torch.nn.LSTM(H, H, num_layers=layers)
    ours = LSTM(H, H, num_layers=layers, backend="cpu")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(L, B, H)

    rows = torch.randn(L * B, H)
    w_t = torch.randn(H, 4 * H)
    proj_out = torch.empty(L * B, 4 * H)
    h = torch.randn(B, H)
    c = torch.randn(B, H)
    gates_x = torch.randn(B, 4 * H)
    gates_h = torch.empty(B, 4 * H)
    cell = torch.ops.seqkernels.lstm_cell_fwd.default

    def projections():
        for _ in range(layers):
            torch.mm(rows, w_t, out=proj_out)

    def recurrent_gemms():
        for _ in range(layers * L):
            torch.mm(h, w_t, out=gates_h)

    def cells():
        with torch._C._AutoDispatchBelowAutograd():
            for _ in range(layers * L):
                cell(gates_x, gates_h, c, None, None)

    entries = {
        "torch nn.LSTM (oneDNN)": lambda: ref(x),
        "seqkernels nn.LSTM (cpu)": lambda: ours(x),
        "  input projections": projections,
        "  recurrent GEMMs": recurrent_gemms,
        "  fused cells": cells,
    }
    times = {k: [] for k in entries}
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)
        for f in entries.values():
            f()
        for _ in range(a.reps):
            for k, f in entries.items():
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    base = med["torch nn.LSTM (oneDNN)"]
    print(f"{layers} layers, hidden {H}, length {L}, batch {B}, {torch.get_num_threads()} threads; medians of {a.reps}")
    for k, v in med.items():
        print(f"  {k:28s} {v:8.1f} ms   ({v / base:.2f}x torch's time)")
    parts = sum(med[k] for k in entries if k.startswith("  "))
    print(f"  {'pieces summed':28s} {parts:8.1f} ms   ({parts / base:.2f}x torch's time)")


if __name__ == "__main__":
    main()

"""Quick timing of the C++ CPU attention kernels against torch's CPU SDPA (flash) kernel.

    PYTHONPATH=python python bench/attention_cpu_quick.py [--reps 15] [--threads 2]

For each shape of DESIGN §8 and causal on/off it times seqkernels::attention_fwd against
torch.nn.functional.scaled_dot_product_attention, and seqkernels::attention_bwd against
aten::_scaled_dot_product_flash_attention_for_cpu_backward (the backward torch's SDPA runs),
on the same fp32 inputs with top-left causal alignment as torch uses. The two are run
alternately, so load from other processes hits both alike; the reported ratio is
median(torch) / median(seqkernels) (> 1: seqkernels is faster), plus the median of the
per-pair ratios. Outputs are compared before timing. This is a development check; the
benchmark harness with CSV output is `seqkernels bench`.
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import seqkernels._C  # noqa: F401  (registers torch.ops.seqkernels)

SHAPES = [(1, 8, 1024, 64), (1, 8, 2048, 128), (4, 8, 512, 64)]


CLOCK = time.perf_counter


def _time(fn):
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def _compare(name, fns, reps):
    """Alternate the callables of `fns` (name -> fn) reps times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(reps):
        order = keys if r % 2 == 0 else keys[::-1]
        for k in order:
            times[k].append(_time(fns[k]))
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=None, help="e.g. 1,8,1024,64;4,8,512,64")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process CPU clock instead of the wall clock: steadier on a "
        "loaded machine, but counts all threads (use with --threads 1)",
    )
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    clock = "process CPU time" if args.cpu_time else "wall time"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, reps {args.reps}, {clock}")
    print(f"{'shape':>18} {'causal':>6} {'pass':>4} {'torch ms':>9} {'sk ms':>8} {'ratio':>6} {'pair':>6}")
    gen = torch.Generator().manual_seed(0)
    for B, H, L, D in shapes:
        q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
        go = torch.randn(B, H, L, D, generator=gen)
        scale = 1.0 / math.sqrt(D)
        for causal in causals:
            wr = 0 if causal else -1

            def sk_fwd():
                return torch.ops.seqkernels.attention_fwd(q, k, v, None, None, scale, -1, wr, False, 0.0, 0, 0)

            def th_fwd():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            out, lse = sk_fwd()
            ref = th_fwd()
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            rows = [("fwd", {"torch": th_fwd, "sk": sk_fwd})]
            if not args.no_bwd:
                t_out, t_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, causal, scale=scale
                )

                def sk_bwd():
                    return torch.ops.seqkernels.attention_bwd(
                        go, q, k, v, out, lse, None, None, scale, -1, wr, False, 0.0, 0, 0, False
                    )[:3]

                def th_bwd():
                    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                        go, q, k, v, t_out, t_lse, 0.0, causal, scale=scale
                    )

                for a, b in zip(sk_bwd(), th_bwd()):
                    torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
                rows.append(("bwd", {"torch": th_bwd, "sk": sk_bwd}))
            for what, fns in rows:
                t = _compare(what, fns, args.reps)
                mt, ms = statistics.median(t["torch"]), statistics.median(t["sk"])
                pair = statistics.median(a / b for a, b in zip(t["torch"], t["sk"]))
                shape = f"{what} {B},{H},{L},{D}"
                print(
                    f"{shape:>18} {str(causal):>6} {'ok':>4} {mt * 1e3:9.2f} {ms * 1e3:8.2f} "
                    f"{mt / ms:6.2f} {pair:6.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

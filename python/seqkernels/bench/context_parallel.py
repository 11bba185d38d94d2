"""The context_parallel suite: ring attention (seqkernels.distributed) on CPU process groups.

W = 1 and 2 ranks (gloo, one thread per rank, spawned processes), forward + backward of one
attention layer over a sequence sharded across the ranks, against the same work on one rank
(`seqkernels.attention` on the whole sequence, one thread). Per rank it also times the ring's
communication alone (the same bytes, the same hops, no compute) and reports how much of it the
ring hides behind compute: overlap = (compute + comm - ring) / comm, clipped to [0, 1], with
compute the ring's block work run without communication, each the slowest rank's. From the schedule it counts each rank's
causal attention FLOPs (zigzag balances them: max/min = 1; contiguous: 2W - 1).
"""

from __future__ import annotations

import datetime
import os
import statistics
import tempfile
import time

import torch

from .harness import Recorder, Settings

_TEST_SHAPE = None  # tests set a small shape here


def flop_balance(world: int, layout: str) -> float:
    """max/min over ranks of the causal attention work the schedule gives, in block units (a whole
    block 1, a diagonal block, causal inside, 1/2)."""
    from ..distributed import _blocks, chunk_ids

    n = 2 * world if layout == "zigzag" else world
    work = []
    for r in range(world):
        q_ids = chunk_ids(r, world, layout)
        units = 0.0
        for c in range(n):
            units += sum(1.0 if blk.right < 0 else 0.5 for _, _, blk in _blocks(q_ids, [c], 2, -1, 0))
        work.append(units)
    return max(work) / min(work)


def _timeit(fn, reps: int):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t0))
    ts.sort()
    return ts


def _worker(rank, world, init_file, shape, layout, causal, reps, out):
    import torch.distributed as dist

    from .. import distributed as skd
    from ..ops import attention as attn_ops

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    try:
        torch.set_num_threads(1)
        B, H, L, D = shape
        g = torch.Generator().manual_seed(0)
        q, k, v, go = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
        ql, kl, vl, gol = (skd.shard_sequence(t, layout=layout) for t in (q, k, v, go))
        ql, kl, vl = (t.requires_grad_() for t in (ql, kl, vl))

        def ring():
            out_ = skd.ring_attention(ql, kl, vl, causal=causal, layout=layout, backend="cpu")
            torch.autograd.grad(out_, (ql, kl, vl), gol)

        # The same block calls without communication: every rank computes against blocks of its own size.
        fwd, bwd = attn_ops.FAMILIES["cpu"]
        q_ids = skd.chunk_ids(rank, world, layout)
        cq = ql.shape[2] // len(q_ids)
        scale = D**-0.5

        def compute_only():
            with torch.no_grad():
                for step in range(world):
                    kv_ids = skd.chunk_ids((rank - step) % world, world, layout)
                    for a, b, blk in skd._blocks(q_ids, kv_ids, cq, -1, 0 if causal else -1):
                        rows = slice(a * cq + blk.qa, a * cq + blk.qb)
                        keys = slice(b * cq + blk.ka, b * cq + blk.kb)
                        qs, ks, vs = ql[:, :, rows], kl[:, :, keys], vl[:, :, keys]
                        win = (blk.left, blk.right, False)
                        o, lse = fwd(qs, ks, vs, None, None, scale, *win, 0.0, 0, 0)
                        bwd(gol[:, :, rows].contiguous(), qs, ks, vs, o, lse,
                            None, None, scale, *win, 0.0, 0, 0, False)  # fmt: skip

        ring_ = skd._Ring(None)
        kv = torch.cat([kl.detach().reshape(-1), vl.detach().reshape(-1)])

        def comm_only():
            # forward: W-1 K/V hops; backward: W-1 K/V hops and W dK/dV hops
            for _ in range(3 * world - 2):
                _, reqs = ring_.start(kv)
                skd._Ring.wait(reqs)

        res = {"ring": _timeit(ring, reps), "compute": _timeit(compute_only, reps)}
        res["comm"] = _timeit(comm_only, reps) if world > 1 else [0.0] * reps
        out.append((rank, res))
    finally:
        dist.destroy_process_group()


def _single(shape, causal, reps):
    import seqkernels

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v, go = (torch.randn(*shape, generator=g) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def run():
            out = seqkernels.attention(q, k, v, causal=causal, backend="cpu")
            torch.autograd.grad(out, (q, k, v), go)

        return _timeit(run, reps)
    finally:
        torch.set_num_threads(n)


def _p(ts):
    n = len(ts)
    return ts[int(0.2 * (n - 1))], statistics.median(ts), ts[int(0.8 * (n - 1))]


def suite_context_parallel(rec: Recorder, s: Settings, progress):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        rec.add_failure("context_parallel", "fwd+bwd", "ring", "-", "torch.distributed with gloo is not available")
        return
    from .. import _ext

    if not _ext.extension_available():
        rec.add_failure("context_parallel", "fwd+bwd", "ring", "-", "needs the C++ CPU kernels (seqkernels._C)")
        return
    shape = _TEST_SHAPE or (1, 8, 1024 if s.quick else 4096, 64)
    reps = 3 if s.quick else 7
    for causal in (True, False):
        tag = f"B{shape[0]} H{shape[1]} L{shape[2]} D{shape[3]}{' causal' if causal else ''}"
        progress(f"context_parallel single {tag}")
        rec.add_time("context_parallel", "fwd+bwd", "one_rank", tag, _p(_single(shape, causal, reps)), dtype="float32")
        for world in (1, 2):
            for layout in ("zigzag", "contiguous") if world > 1 else ("zigzag",):
                name = f"ring_W{world}_{layout}"
                progress(f"context_parallel {name} {tag}")
                with tempfile.TemporaryDirectory() as d:
                    out = mp.Manager().list()
                    mp.spawn(
                        _worker,
                        args=(world, os.path.join(d, "init"), shape, layout, causal, reps, out),
                        nprocs=world,
                        join=True,
                    )
                    results = dict(out)
                # Each figure is its slowest rank's: the ring waits for the most loaded rank (with
                # contiguous causal, the last one computes 2W - 1 times the first one's blocks), and
                # a rank that waits shows a long ring time but a short compute time.
                res = {
                    key: max((results[r][key] for r in results), key=statistics.median)
                    for key in ("ring", "compute", "comm")
                }
                rec.add_time("context_parallel", "fwd+bwd", name, tag, _p(res["ring"]), dtype="float32")
                rec.add_time("context_parallel", "compute_only", name, tag, _p(res["compute"]), dtype="float32")
                if world > 1:
                    comm = statistics.median(res["comm"])
                    rec.add_time("context_parallel", "comm_only", name, tag, _p(res["comm"]), dtype="float32")
                    # Negative (clipped to 0) when the ring costs more than its compute and its
                    # communication run apart: on a CPU whose cores all compute, gloo's transfers
                    # and the ring's own work (merges, accumulators) take cores from the compute.
                    hidden = statistics.median(res["compute"]) + comm - statistics.median(res["ring"])
                    frac = min(1.0, max(0.0, hidden / comm)) if comm > 0 else 1.0
                    rec.add("context_parallel", "overlap", name, tag, "overlap", "fraction", frac, frac, frac,
                            dtype="float32")  # fmt: skip
                if causal:
                    bal = flop_balance(world, layout)
                    rec.add("context_parallel", "flop_balance", name, tag, "max/min", "ratio", bal, bal, bal,
                            dtype="float32")  # fmt: skip

"""Context parallelism (seqkernels.distributed) on real CPU process groups: ranks spawned with
torch.multiprocessing on gloo, each running ring attention on its shard; forward and backward
against the single-device float64 reference by the parity rule (docs/DESIGN.md §5), zigzag and
contiguous layouts, causal and not, GQA, softcap, sinks, sliding windows (either side, inside
and across chunk edges) and ALiBi, the Triton backend under its interpreter;
merge_attention_states on its own; the not-yet-supported arguments refused by name;
seqkernels.nn.MultiheadAttention in ring mode (use_context_parallel) against the single-process
model, forward and parameter gradients."""

import copy
import datetime
import math
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqkernels
from seqkernels import _ext, testing
from seqkernels import distributed as skd

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
needs_ext = pytest.mark.skipif(not _ext.extension_available(), reason="seqkernels._C is not built")


def _inputs(B, Hq, Hkv, L, D, dtype, mods):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    go = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    gl = torch.randn(B, Hq, L, generator=g)
    kw = {}
    if "softcap" in mods:
        kw["softcap"] = 3.0
    if "sinks" in mods:
        kw["sinks"] = torch.randn(Hq, generator=g)
    if "alibi" in mods:  # per head, steep enough that the distance matters across chunks
        kw["alibi_slopes"] = torch.rand(Hq, generator=g) * 0.5 + 0.05
    if "alibi_b" in mods:  # per (batch, head)
        kw["alibi_slopes"] = torch.rand(B, Hq, generator=g) * 0.5 + 0.05
    if "dropout" in mods:
        kw["dropout_p"] = 0.3
    return q, k, v, go, gl, kw


def _grads(q, k, v, go, gl, kw, backend, causal):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    kw = dict(kw)
    leaves = [q, k, v]
    if "sinks" in kw:
        kw["sinks"] = kw["sinks"].detach().clone().to(q.dtype if q.dtype == torch.float64 else torch.float32)
        kw["sinks"].requires_grad_()
        leaves.append(kw["sinks"])
    out, lse = seqkernels.attention(q, k, v, causal=causal, return_lse=True, backend=backend, **kw)
    loss = (out.double() * go.double()).sum() + (torch.where(lse.isfinite(), lse, 0).double() * gl.double()).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, leaves)


def _init_group(rank, world, init_file, timeout_s=120):
    """A gloo group over a file store, with a timeout so that a rank that never arrives fails the
    others instead of hanging them."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip


def _ring_parity(rank, case, errors):
    """One case through the ring on this rank's shard against the whole sequence in one process."""
    layout, causal, (B, Hq, Hkv, L, D), dtype, mods, window, backend = case
    q, k, v, go, gl, kw = _inputs(B, Hq, Hkv, L, D, dtype, mods)
    if window is not None:
        kw["window"] = window
    sh = lambda t: skd.shard_sequence(t, layout=layout, seq_dim=2)  # noqa: E731
    # The float64 reference and plain torch in the inputs' dtype, on the whole sequence.
    kw64 = {n: x.double() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    # Each call draws its dropout seed from torch's generator (the ring: rank 0's, broadcast), so
    # the same manual_seed before each gives every run the same keep mask of the global positions.
    torch.manual_seed(123)
    ref = _grads(q.double(), k.double(), v.double(), go, gl, kw64, "reference", causal)
    torch.manual_seed(123)
    base = _grads(q, k, v, go, gl, kw, "reference", causal)
    torch.manual_seed(123 + rank)  # the other ranks' own draws must not matter
    if rank == 0:
        torch.manual_seed(123)
    # This rank's shard through the ring.
    ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
    kwl = dict(kw)
    leaves = [ql, kl, vl]
    if "sinks" in kwl:
        kwl["sinks"] = kwl["sinks"].clone().requires_grad_()
        leaves.append(kwl["sinks"])
    out, lse = skd.ring_attention(ql, kl, vl, causal=causal, layout=layout, return_lse=True, backend=backend, **kwl)
    loss = (out.double() * sh(go).double()).sum()
    loss = loss + (torch.where(lse.isfinite(), lse, 0).double() * sh(gl.unsqueeze(-1)).squeeze(-1).double()).sum()
    grads = list(torch.autograd.grad(loss, leaves))
    if "sinks" in kwl:  # the local share, summed over ranks like any replicated weight
        dist.all_reduce(grads[3])
    got = (out, lse, *grads[:3]) + tuple(grads[3:])

    def shard_of(res):
        o, l_, gs = res
        return (sh(o), sh(l_.unsqueeze(-1)).squeeze(-1), *(sh(x) for x in gs[:3])) + tuple(gs[3:])

    if "det" in mods:  # deterministic=True, two threads per rank: bitwise the same gradients again
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            again = skd.ring_attention(ql, kl, vl, causal=causal, layout=layout, backend=backend,
                                       deterministic=True, **kwl)  # fmt: skip
            grads2 = torch.autograd.grad((again.double() * sh(go).double()).sum(), leaves)
            first = skd.ring_attention(ql, kl, vl, causal=causal, layout=layout, backend=backend,
                                       deterministic=True, **kwl)  # fmt: skip
            grads1 = torch.autograd.grad((first.double() * sh(go).double()).sum(), leaves)
        finally:
            torch.set_num_threads(threads)
        if not all(torch.equal(a, b) for a, b in zip(grads1, grads2)) or not torch.equal(first, again):
            errors.append(f"rank {rank}, {case}: deterministic=True gave different results in two runs")
    r_ref, r_base = shard_of(ref), shard_of(base)
    fwd = testing.compare(got[:2], r_ref[:2], r_base[:2])
    bwd = testing.compare(got[2:], r_ref[2:], r_base[2:], grad=True)
    # The whole output, gathered back, is the single-device result.
    full = skd.unshard_sequence(out.detach(), layout=layout, seq_dim=2)
    whole = testing.compare((full,), (ref[0],), (base[0],))
    for rep in (fwd, bwd, whole):
        if not rep.passed:
            errors.append(f"rank {rank}, {case}: {rep}")


def _jobs_worker(rank, world, init_file, run, jobs, errors):
    """One rank of a spawned group: `run(rank, world, job, errors)` for each job; a job that raises
    is recorded with its traceback and the others still run (every rank takes part in every job's
    collectives, so one failing job must not leave the others waiting)."""
    try:
        _init_group(rank, world, init_file, timeout_s=120)
        torch.set_num_threads(1)
        for job in jobs:
            try:
                run(rank, world, job, errors)
            except Exception:
                errors.append(f"rank {rank}, {job}: {traceback.format_exc()}")
        # Every rank past its last transfer before any tears its group down. Without this barrier
        # one CI run saw rank 1 abort (SIGABRT, "terminate called without an active exception");
        # a group destroyed while a peer may still use the pair between them is the likely cause
        # (not reproduced in 22 runs here; the refusal test below needed the same barrier).
        dist.barrier()
    except Exception:
        errors.append(f"rank {rank}: {traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world, run, jobs):
    """`world` ranks on a gloo group, each running `jobs` through `run` (module-level, so it pickles);
    fails with every rank's errors."""
    with tempfile.TemporaryDirectory() as d:
        errors = mp.Manager().list()
        mp.spawn(_jobs_worker, args=(world, os.path.join(d, "init"), run, jobs, errors), nprocs=world, join=True)
        assert not list(errors), "\n".join(errors)


def _ring_job(rank, world, case, errors):
    _ring_parity(rank, case, errors)


F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
# Per world, one process group (a spawn costs seconds of imports): (layout, causal, (B, Hq, Hkv, L, D),
# dtype, modifiers, window, backend). Windows are sized against the chunk length c = L / (2W zigzag,
# W contiguous): inside one chunk, across one chunk edge (c - 1, c, c + 1) and across several, on the
# left, the right and both; ALiBi per head and per (batch, head), with windows, softcap and sinks.
CASES = {
    1: [("zigzag", True, (1, 2, 2, 8, 8), F32, ("sinks",), None, "cpu")],
    2: [
        ("zigzag", True, (1, 4, 2, 16, 16), F32, (), None, "cpu"),
        ("zigzag", True, (1, 2, 1, 24, 8), F32, (), (3, 0), "cpu"),  # c = 6
        ("zigzag", True, (1, 2, 1, 24, 8), F32, ("det",), (6, 0), "cpu"),  # exactly one chunk back
        ("contiguous", True, (1, 2, 2, 24, 8), F32, ("alibi",), (13, 0), "cpu"),  # c = 12, past one edge
        ("zigzag", False, (2, 2, 2, 16, 8), F32, ("alibi_b", "softcap"), (5, 2), "cpu"),
        ("zigzag", True, (2, 4, 2, 24, 8), F32, ("dropout", "sinks"), None, "cpu"),  # exact dropout
        ("contiguous", False, (1, 2, 1, 20, 8), F32, ("dropout",), (7, 3), "cpu"),
        ("zigzag", True, (1, 2, 1, 8, 16), F32, ("alibi", "sinks"), (2, 0), "triton"),  # interpreter, tiny
        ("zigzag", False, (1, 2, 1, 8, 16), F32, ("dropout",), None, "triton"),  # exact dropout, interpreter
    ],
    3: [
        ("zigzag", True, (1, 2, 1, 18, 16), BF16, ("softcap", "sinks"), None, "cpu"),
        ("zigzag", False, (1, 2, 1, 18, 8), F32, (), (4, 3), "cpu"),  # c = 3: both sides cross chunks
        ("contiguous", True, (1, 2, 2, 18, 8), F32, ("alibi", "sinks"), None, "cpu"),
        ("zigzag", True, (1, 2, 2, 24, 8), F64, ("alibi",), (9, 0), "cpu"),  # c = 4: 2c + 1 back
        ("zigzag", True, (1, 2, 1, 18, 8), BF16, ("dropout", "softcap"), (4, 0), "cpu"),
    ],
    4: [
        ("zigzag", False, (1, 2, 2, 16, 8), F32, ("sinks",), None, "cpu"),
        ("contiguous", True, (1, 4, 2, 20, 16), F32, ("softcap",), None, "cpu"),
        ("zigzag", False, (1, 2, 2, 16, 8), F32, ("alibi",), (-1, 3), "cpu"),  # c = 2, right side only
        ("contiguous", False, (1, 2, 2, 20, 8), BF16, (), (6, -1), "cpu"),  # c = 5, left side only
    ],
}


@needs_ext
@pytest.mark.parametrize("world", sorted(CASES))
def test_ring_attention_matches_single_device(world):
    """Forward, lse and the gradients of q, k, v (and sinks) of every rank's shard against the float64
    single-device reference by the parity rule, for each case of this world size."""
    _spawn(world, _ring_job, CASES[world])


def _varlen_grads(q, k, v, go, cu, kw, backend):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = seqkernels.attention_varlen(q, k, v, cu, cu, backend=backend, **kw)
    return out.detach(), torch.autograd.grad((out.double() * go.double()).sum(), (q, k, v))


def _varlen_parity(rank, case, errors):
    """allgather_attention_varlen on this rank's shard of a packed batch against attention_varlen on
    the whole batch (float64 reference, plain torch in the inputs' dtype)."""
    layout, lens, (Hq, Hkv, D), dtype, kw, backend = case
    T = sum(lens)
    g = torch.Generator().manual_seed(5)
    q, go = (torch.randn(T, Hq, D, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(T, Hkv, D, generator=g).to(dtype) for _ in range(2))
    cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(Hq, generator=g) * 0.5 + 0.05
    kw64 = {n: x.double() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    # Dropout: one seed per call from torch's generator (the all-gather: rank 0's, broadcast).
    torch.manual_seed(321)
    ref = _varlen_grads(q.double(), k.double(), v.double(), go, cu, kw64, "reference")
    torch.manual_seed(321)
    base = _varlen_grads(q, k, v, go, cu, kw, "reference")
    torch.manual_seed(321 if rank == 0 else 99 + rank)  # the other ranks' own draws must not matter
    sh = lambda t: skd.shard_sequence(t, layout=layout, seq_dim=0)  # noqa: E731
    ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
    out = skd.allgather_attention_varlen(ql, kl, vl, cu, layout=layout, backend=backend, **kw)
    grads = torch.autograd.grad((out.double() * sh(go).double()).sum(), (ql, kl, vl))
    got = (out, *grads)
    r_ref = (sh(ref[0]), *(sh(x) for x in ref[1]))
    r_base = (sh(base[0]), *(sh(x) for x in base[1]))
    for rep in (
        testing.compare(got[:1], r_ref[:1], r_base[:1]),
        testing.compare(got[1:], r_ref[1:], r_base[1:], grad=True),
    ):
        if not rep.passed:
            errors.append(f"rank {rank}, {case}: {rep}")


def _varlen_refusals(errors):
    q = torch.randn(8, 2, 4)
    cu = torch.tensor([0, 3, 16], dtype=torch.int32)
    for kw, match in (
        (dict(dropout_p=1.5), "dropout_p"),
        (dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),  # without causal
        (dict(layout="diagonal"), "layout"),
    ):
        try:
            skd.allgather_attention_varlen(q, q, q, cu, **kw)
            errors.append(f"{kw}: no error")
        except (NotImplementedError, ValueError) as e:
            if match not in str(e):
                errors.append(f"{kw}: {e}")
    for bad, match in ((torch.tensor([0, 3, 15], dtype=torch.int32), "T = 16"), (torch.tensor([0.0, 16.0]), "int32"),
                       (torch.tensor([0, 9, 4, 16]), "c_0 <= c_1")):  # fmt: skip
        try:
            skd.allgather_attention_varlen(q, q, q, bad, causal=True)
            errors.append(f"cu_seqlens {bad}: no error")
        except ValueError as e:
            if match not in str(e):
                errors.append(f"cu_seqlens {bad}: {e}")
    dist.barrier()  # every call above raised before communicating


def _varlen_job(rank, world, case, errors):
    _varlen_refusals(errors) if case == "refusals" else _varlen_parity(rank, case, errors)


# (layout, document lengths, (Hq, Hkv, D), dtype, keyword arguments, backend) per world. Documents
# start and end inside chunks, on chunk edges, span several chunks, and are empty; chunk length c =
# T / (2W zigzag, W contiguous).
VARLEN_CASES = {
    2: [
        ("zigzag", [5, 1, 0, 10, 8], (4, 2, 8), F32, dict(causal=True), "cpu"),  # T 24, c 6
        ("zigzag", [5, 1, 0, 10, 8], (2, 2, 8), F32, dict(causal=True, window=(4, 0), alibi=True), "cpu"),
        ("contiguous", [7, 6, 3], (2, 1, 8), F32, dict(sinks=torch.randn(2), softcap=2.0), "cpu"),
        ("zigzag", [9, 7], (2, 2, 8), F32, dict(window=(3, 2)), "cpu"),  # non-causal, both sides
        ("zigzag", [9, 7], (2, 2, 8), BF16, dict(window=(5, -1)), "cpu"),  # left side only
        ("zigzag", [3, 5], (2, 1, 16), F32, dict(causal=True, window=(2, 0)), "triton"),  # interpreter, tiny
        ("zigzag", [3, 5], (2, 1, 16), F32, dict(window=(1, 2), dropout_p=0.3), "triton"),  # grid offsets, packed
        # Exact dropout: pieces cut mid-document (rows and, with a window, keys), a document on both
        # of a rank's chunks, an empty one; with sinks; with ALiBi and a window (keys cut too).
        ("zigzag", [5, 1, 0, 14, 4], (4, 2, 8), F32, dict(causal=True, dropout_p=0.3, sinks=torch.randn(4)), "cpu"),
        ("zigzag", [9, 7], (2, 2, 8), F32, dict(window=(3, 2), dropout_p=0.4), "cpu"),
        "refusals",
    ],
    3: [
        ("zigzag", [4, 13, 1, 6], (2, 2, 8), F32, dict(causal=True, window=(7, 0)), "cpu"),  # T 24, c 4
        ("contiguous", [11, 13], (4, 2, 8), F64, dict(causal=True, alibi=True), "cpu"),
        ("zigzag", [2, 19, 3], (2, 1, 8), BF16, dict(causal=True, window=(5, 0), dropout_p=0.25, alibi=True), "cpu"),
    ],
}


@needs_ext
@pytest.mark.parametrize("world", sorted(VARLEN_CASES))
def test_allgather_attention_varlen_matches_single_device(world):
    """Packed batches sharded over ranks (all-gather variant): outputs and q/k/v gradients of every
    rank's rows equal attention_varlen on the whole batch by the parity rule; bad arguments refused."""
    _spawn(world, _varlen_job, VARLEN_CASES[world])


@pytest.mark.parametrize("left,right", [(-1, -1), (-1, 0), (3, 0), (0, 0), (2, 3), (4, -1), (-1, 2), (0, 1)])
def test_varlen_pieces_cover_exactly_each_documents_keys(left, right):
    """_pieces' key ranges and bottom-right windows, read the way the kernels read them, give exactly
    the keys of each row's document inside the global window."""
    starts = [0, 5, 6, 6, 16, 24]
    for q_range in [(0, 6), (6, 12), (12, 18), (18, 24), (3, 17)]:
        for p in skd._pieces(starts, [q_range], left, right):
            nq, nk = p.qe - p.qs, p.kb - p.ka
            off = nk - nq
            for li in range(nq):
                gi = p.qs + li
                got = {
                    p.ka + lj
                    for lj in range(nk)
                    if (p.left < 0 or lj >= li + off - p.left) and (p.right < 0 or lj <= li + off + p.right)
                }
                ds, de = starts[p.doc], starts[p.doc + 1]
                want = {j for j in range(ds, de) if (left < 0 or j >= gi - left) and (right < 0 or j <= gi + right)}
                assert got == want, (q_range, p, gi)  # fmt: skip
        covered = sorted(r for p in skd._pieces(starts, [q_range], left, right) for r in range(p.qs, p.qe))
        assert covered == list(range(*q_range))


@pytest.mark.parametrize("c", [1, 2, 3, 5])
def test_block_plan_covers_exactly_the_visible_pairs(c):
    """_block's sub-block and top-left window, read the way the kernels read them (visible_keys of
    docs/INTERNALS.md), give exactly the (query, key) pairs of the global window, for windows inside,
    at and across chunk edges, on both sides, and chunk pairs before, on and after the diagonal."""
    n = 4
    sides = [-1, 0, 1, c - 1, c, c + 1, 2 * c + 1, 5 * c]
    for left in sides:
        for right in sides:
            for x in range(n):
                for y in range(n):
                    qo, ko = x * c, y * c
                    want = {
                        (i, j)
                        for i in range(qo, qo + c)
                        for j in range(ko, ko + c)
                        if (left < 0 or j >= i - left) and (right < 0 or j <= i + right)
                    }
                    blk = skd._block(qo, ko, c, left, right)
                    got = set()
                    if blk is not None:
                        assert 0 <= blk.qa < blk.qb <= c and 0 <= blk.ka < blk.kb <= c, blk
                        assert blk.left >= -1 and blk.right >= -1, blk
                        for li in range(blk.qb - blk.qa):
                            for lj in range(blk.kb - blk.ka):
                                if (blk.left < 0 or lj >= li - blk.left) and (blk.right < 0 or lj <= li + blk.right):
                                    got.add((qo + blk.qa + li, ko + blk.ka + lj))
                        assert blk.shift == (qo + blk.qa) - (ko + blk.ka)
                    assert got == want, (c, left, right, x, y, blk)
                    if blk is not None:  # no empty rows or columns are handed to the kernels
                        assert {i for i, _ in want} == set(range(qo + blk.qa, qo + blk.qb))


def test_merge_attention_states_is_attention_over_the_union():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64)
    full = seqkernels.attention(q, k, v, return_lse=True, backend="reference")
    a = seqkernels.attention(q, k[:, :, :4], v[:, :, :4], return_lse=True, backend="reference")
    b = seqkernels.attention(q, k[:, :, 4:], v[:, :, 4:], return_lse=True, backend="reference")
    out, lse = skd.merge_attention_states(*a, *b)
    torch.testing.assert_close(out, full[0])
    torch.testing.assert_close(lse, full[1])


def test_merge_attention_states_rows_that_saw_nothing():
    out_a, out_b = torch.randn(1, 1, 3, 4), torch.zeros(1, 1, 3, 4)
    lse_a = torch.tensor([[[0.5, -math.inf, -math.inf]]])
    lse_b = torch.tensor([[[-math.inf, 1.0, -math.inf]]])
    out_b[0, 0, 1] = 2.0
    out, lse = skd.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 0], out_a[0, 0, 0])
    torch.testing.assert_close(out[0, 0, 1], out_b[0, 0, 1])
    assert torch.equal(out[0, 0, 2], torch.zeros(4)) and lse[0, 0, 2] == -math.inf
    torch.testing.assert_close(lse[0, 0, :2], torch.tensor([0.5, 1.0]))


def test_shard_and_unshard_are_inverse_and_balanced():
    """Chunk bookkeeping without a process group: zigzag gives every rank the same causal work."""
    W = 4
    for layout in ("zigzag", "contiguous"):
        ids = [c for r in range(W) for c in skd.chunk_ids(r, W, layout)]
        assert sorted(ids) == list(range(len(ids)))
    work = [
        sum(len(list(skd._blocks(skd.chunk_ids(r, W, "zigzag"), [c], 2, -1, 0))) for c in range(2 * W))
        for r in range(W)
    ]
    assert max(work) == min(work)


def _refusal_worker(rank, world, init_file, errors):
    try:
        _init_group(rank, world, init_file, timeout_s=120)
        q = torch.randn(1, 2, 4, 8)
        for kw, match in (
            (dict(window=(-2, 0)), "window"),  # bad values are refused as in attention()
            (dict(alibi_slopes=torch.ones(3)), "alibi_slopes"),  # 2 query heads
            (dict(layout="diagonal"), "layout"),
        ):
            try:
                skd.ring_attention(q, q, q, causal=True, **kw)
                errors.append(f"{kw}: no error")
            except (NotImplementedError, ValueError) as e:
                if match not in str(e):
                    errors.append(f"{kw}: {e}")
        try:
            skd.ring_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
            errors.append("odd length: no error")
        except ValueError as e:
            if "divisible by 4" not in str(e):
                errors.append(str(e))
        # Every call above raises before any communication: without this, a fast rank tears its
        # group down while a slow one (a loaded machine) is still connecting, and gloo fails there
        # with "Connection closed by peer".
        dist.barrier()
    except Exception:
        errors.append(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_unsupported_arguments_are_refused_by_name():
    with tempfile.TemporaryDirectory() as d:
        errors = mp.Manager().list()
        mp.spawn(_refusal_worker, args=(2, os.path.join(d, "init"), errors), nprocs=2, join=True)
        assert not list(errors), "\n".join(errors)


def test_needs_an_initialized_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        skd.ring_attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))


@needs_ext
@pytest.mark.parametrize("window", [None, 6])
def test_context_parallel_example_trains_like_one_process(capsys, window):
    """A tiny Llama (transformers) trained 2 steps with its sequence sharded over 2 ranks through
    use_context_parallel: the same losses as one process; with a sliding window of 6 keys (a
    Mistral), wider than the 4-token chunks, so the window crosses chunk edges in the ring."""
    pytest.importorskip("transformers")
    from seqkernels.examples import context_parallel

    extra = [] if window is None else ["--sliding-window", str(window)]
    res = context_parallel.main(["--world", "2", "--steps", "2", "--length", "16", *extra])
    assert len(res["sharded"]) == 2
    for a, b in zip(res["single"], res["sharded"]):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert "2 ranks" in capsys.readouterr().out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_zigzag_balances_causal_work(world):
    from seqkernels.bench.context_parallel import flop_balance

    assert flop_balance(world, "zigzag") == 1.0
    assert flop_balance(world, "contiguous") == 2 * world - 1


@pytest.mark.slow  # six process groups spawned: over a minute on 2 cores
@needs_ext
def test_context_parallel_bench_suite_runs(monkeypatch):
    from seqkernels.bench import context_parallel as cp
    from seqkernels.bench.harness import Recorder, Settings

    s = Settings(device="cpu", dtype=torch.float32, quick=True)
    rec = Recorder(s)
    # a small shape: the suite's own (L = 1024 in quick mode) takes minutes on 2 loaded cores
    monkeypatch.setattr(cp, "_TEST_SHAPE", (1, 2, 64, 16))
    cp.suite_context_parallel(rec, s, lambda m: None)
    rows = {(r.op, r.provider, r.shape) for r in rec.rows}
    assert ("fwd+bwd", "ring_W2_zigzag", "B1 H2 L64 D16 causal") in rows
    assert ("overlap", "ring_W2_contiguous", "B1 H2 L64 D16") in rows
    fails = [r for r in rec.rows if r.metric == "status"]
    assert not fails, fails


def _one_rank_fails_worker(rank, world, init_file, errors):
    t0 = datetime.datetime.now()
    try:
        _init_group(rank, world, init_file, timeout_s=8)
        q = torch.randn(1, 2, 4, 8)
        # Rank 1 passes a bad window, refused before any communication; rank 0 enters the ring.
        skd.ring_attention(q, q, q, causal=True, window=(-2, 0) if rank == 1 else None, backend="cpu")
        errors.append(f"rank {rank}: no error")
    except Exception as e:  # rank 1: the refusal; rank 0: the group's timeout, not a hang
        errors.append(f"rank {rank}: {type(e).__name__} after {(datetime.datetime.now() - t0).seconds} s")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@needs_ext
def test_a_rank_that_raises_does_not_hang_the_others():
    with tempfile.TemporaryDirectory() as d:
        errors = mp.Manager().list()
        mp.spawn(_one_rank_fails_worker, args=(2, os.path.join(d, "init"), errors), nprocs=2, join=True)
        got = sorted(errors)
    assert len(got) == 2 and "ValueError" in got[1] and "RuntimeError" in got[0], got


# ---------------------------------------------------------------------------------------------
# seqkernels.nn.MultiheadAttention in ring mode (use_context_parallel)


class _TwoAttentionLayers(torch.nn.Module):
    """Two torch MultiheadAttention layers (batch_first True, then False) with a per-token layer
    between them; swap_attention turns them into seqkernels' modules."""

    def __init__(self, E, H):
        super().__init__()
        self.first = torch.nn.MultiheadAttention(E, H, batch_first=True)
        self.mid = torch.nn.Linear(E, E)
        self.second = torch.nn.MultiheadAttention(E, H, batch_first=False)

    def forward(self, x, masks, causal):  # x (N, L, E); masks / causal: one per layer
        h = x + self.first(x, x, x, need_weights=False, attn_mask=masks[0], is_causal=causal[0])[0]
        h = torch.tanh(self.mid(h)).transpose(0, 1)  # (L, N, E) for the sequence-first layer
        return self.second(h, h, h, need_weights=False, attn_mask=masks[1], is_causal=causal[1])[0].transpose(0, 1)


def _mha_run(model, x, go, masks, causal):
    """Output and the gradients of sum(out * go) with respect to x and the parameters (name order)."""
    x = x.detach().clone().requires_grad_()
    names, params = zip(*model.named_parameters())
    out = model(x, masks, causal)
    grads = torch.autograd.grad((out.double() * go.double()).sum(), (x, *params))
    return out.detach(), grads[0], dict(zip(names, grads[1:]))


def _mha_parity(rank, world, layout, causal):
    """One model through the ring on this rank's shard against the whole sequence in one process."""
    N, L, E, H = 2, 12, 16, 2
    torch.manual_seed(11)  # the same weights and data on every rank
    base_model = _TwoAttentionLayers(E, H)
    x, go = torch.randn(N, L, E), torch.randn(N, L, E)
    full_mask = torch.nn.Transformer.generate_square_subsequent_mask(L)
    masks = [full_mask if c else None for c in causal]
    # The float64 reference and plain torch in float32, on the whole sequence in one process.
    ref_model = copy.deepcopy(base_model).double()
    ref = _mha_run(ref_model, x.double(), go, [None if m is None else m.double() for m in masks], causal)
    base = _mha_run(base_model, x, go, masks, causal)
    model = copy.deepcopy(base_model)
    assert seqkernels.swap_attention(model) == 2
    local = _mha_run(model, x, go, masks, causal)  # seqkernels, local attention, whole sequence

    sh = lambda t: skd.shard_sequence(t, layout=layout, seq_dim=1)  # noqa: E731
    # Ring mode: the first layer gets no mask (is_causal alone), the second the causal mask of its
    # shard's length (generate_square_subsequent_mask), the way nn.Transformer* layers pass it.
    ring_masks = [None, torch.nn.Transformer.generate_square_subsequent_mask(L // world) if causal[1] else None]
    with skd.use_context_parallel(model, layout=layout) as handle:
        assert len(handle.modules) == 2 and all(m.context_parallel is handle.spec for m in handle.modules)
        out, gx, gp = _mha_run(model, sh(x), sh(go), ring_masks, causal)
        for g in gp.values():  # per-rank shares of replicated weights: summed, as DDP does
            dist.all_reduce(g)
    names = list(gp)
    got = (out, gx, *gp.values())

    def shard_of(res):
        return (sh(res[0]), sh(res[1]), *(res[2][n] for n in names))

    r_ref, r_base = shard_of(ref), shard_of(base)
    # Parity rule (DESIGN §5) with its float32 assert_close check (rtol 1.3e-6, atol 1e-5). Each
    # output row is a merge of at most 2W = 6 block results (a few float32 roundings of unit-size
    # values, ~1e-7 each), and each weight gradient a sum of W per-rank shares: both far inside the
    # bound, so no widened tolerance is needed.
    reports = [
        testing.compare(got[:1], r_ref[:1], r_base[:1], name="out"),
        testing.compare(got[1:], r_ref[1:], r_base[1:], grad=True, name="grad"),
    ]
    full = skd.unshard_sequence(out, layout=layout, seq_dim=1)
    reports.append(testing.compare((full,), (ref[0],), (base[0],), name="unsharded"))
    failed = [str(rep) for rep in reports if not rep.passed]
    assert not failed, "\n".join(failed)
    # The ring and seqkernels' own local run of the same float32 model agree as closely.
    torch.testing.assert_close(full, local[0])
    # Undone: local attention again, exactly as before.
    assert all(m.context_parallel is None for m in (model.first, model.second))
    again = _mha_run(model, x, go, masks, causal)
    assert torch.equal(again[0], local[0]) and torch.equal(again[1], local[1])


def _mha_dropout_parity(rank, world, layout):
    """Training mode with attention dropout: the ring draws the unsharded module's keep mask, so after
    the same manual_seed the sharded model's output and gradients are seqkernels' own single-process
    ones (torch's module draws another mask, so the comparison is with the swapped model run whole)."""
    N, L, E, H = 2, 12, 16, 2
    torch.manual_seed(11)
    model = _TwoAttentionLayers(E, H)
    x, go = torch.randn(N, L, E), torch.randn(N, L, E)
    assert seqkernels.swap_attention(model) == 2
    for m in (model.first, model.second):
        m.dropout = 0.25
    model.train()
    causal = (True, False)
    local_masks = [torch.nn.Transformer.generate_square_subsequent_mask(L), None]
    torch.manual_seed(5)
    local = _mha_run(model, x, go, local_masks, causal)
    sh = lambda t: skd.shard_sequence(t, layout=layout, seq_dim=1)  # noqa: E731
    with skd.use_context_parallel(model, layout=layout):
        torch.manual_seed(5)
        out, gx, gp = _mha_run(model, sh(x), sh(go), [None, None], causal)
        for g in gp.values():
            dist.all_reduce(g)
    torch.testing.assert_close(skd.unshard_sequence(out, layout=layout, seq_dim=1), local[0])
    torch.testing.assert_close(gx, sh(local[1]))
    for name, g in gp.items():
        torch.testing.assert_close(g, local[2][name], msg=lambda m: f"{name}: {m}")  # noqa: B023
    # Dropout is really on: another seed gives another output.
    torch.manual_seed(6)
    assert not torch.equal(_mha_run(model, x, go, local_masks, causal)[0], local[0])


def _mha_refusals(errors):
    """Every argument the ring cannot honour raises, naming it; the handle undoes the mode."""
    from seqkernels.nn import MultiheadAttention

    def expect(match, f):
        try:
            f()
            errors.append(f"{match}: no error")
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
            if match not in str(e):
                errors.append(f"{match}: {type(e).__name__}: {e}")

    torch.manual_seed(0)
    E, H, Lloc = 16, 2, 4
    expect("swap_attention", lambda: skd.use_context_parallel(_TwoAttentionLayers(E, H)))
    expect("no seqkernels.nn.MultiheadAttention", lambda: skd.use_context_parallel(torch.nn.Linear(E, E)))
    m = MultiheadAttention(E, H, dropout=0.1, batch_first=True)
    expect("layout", lambda: skd.use_context_parallel(m, layout="diagonal"))
    expect("backend", lambda: skd.use_context_parallel(m, backend="reference"))
    x = torch.randn(1, Lloc, E)
    handle = skd.use_context_parallel(m)
    m.eval()  # the dropout check is its own below
    calls = [
        ("need_weights", dict()),  # torch's default need_weights=True
        ("key_padding_mask", dict(key_padding_mask=torch.zeros(1, Lloc, dtype=torch.bool))),
        ("attn_mask", dict(attn_mask=torch.eye(Lloc, dtype=torch.bool))),
        ("attn_mask", dict(attn_mask=torch.zeros(Lloc, Lloc), is_causal=True)),  # the hint, a wrong mask
    ]
    for match, kw in calls:
        expect(match, lambda: m(x, x, x, **{"need_weights": match == "need_weights", **kw}))
    expect("key, value", lambda: m(x, torch.randn(1, 2 * Lloc, E), torch.randn(1, 2 * Lloc, E), need_weights=False))
    expect("context_parallel", m.to_torch)
    for kw, match in ((dict(kdim=8, vdim=8), "kdim"), (dict(add_bias_kv=True), "add_bias_kv"),
                      (dict(add_zero_attn=True), "add_zero_attn")):  # fmt: skip
        other = MultiheadAttention(E, H, batch_first=True, **kw)
        with skd.use_context_parallel(other):
            kv = torch.randn(1, Lloc, 8) if "kdim" in kw else x
            expect(match, lambda: other(x, kv, kv, need_weights=False))
    # in eval mode (dropout off) and unmasked, it runs (a collective, on both ranks)
    assert m(x, x, x, need_weights=False, is_causal=True)[0].shape == x.shape
    handle.remove()
    handle.remove()  # twice: nothing more to undo
    assert m.context_parallel is None and "context_parallel" not in vars(m)
    assert m(x, x, x)[1].shape == (1, Lloc, Lloc)  # local attention, weights and all
    m.to_torch()


def _mha_job(rank, world, job, errors):
    if job == "refusals":
        _mha_refusals(errors)
    elif job[0] == "dropout":
        _mha_dropout_parity(rank, world, job[1])
    else:
        _mha_parity(rank, world, *job)


# (layout, (first layer causal, second layer causal)) per world; one process group per world (each
# spawn costs seconds of imports), the refusals on the world-2 one.
MHA_JOBS = {
    2: [("zigzag", (True, False)), "refusals"],
    3: [("zigzag", (True, True)), ("contiguous", (False, True)), ("dropout", "zigzag")],
}


@needs_ext
@pytest.mark.parametrize("world", sorted(MHA_JOBS))
def test_multihead_attention_context_parallel(world):
    """seqkernels.nn.MultiheadAttention under use_context_parallel: a two-layer model (batch_first
    True and False, causal and not) on sharded sequences gives the single-process outputs and, summed
    over ranks, its parameter gradients; undoing the mode restores local attention; refused arguments
    raise with their names."""
    _spawn(world, _mha_job, MHA_JOBS[world])


def test_use_context_parallel_needs_an_initialized_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    model = torch.nn.Sequential(seqkernels.nn.MultiheadAttention(8, 2))
    with pytest.raises(RuntimeError, match="not initialized"):
        skd.use_context_parallel(model)

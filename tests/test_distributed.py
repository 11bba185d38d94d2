"""Context parallelism (seqkernels.distributed) on real CPU process groups: ranks spawned with
torch.multiprocessing on gloo, each running ring attention on its shard; forward and backward
against the single-device float64 reference by the parity rule (docs/DESIGN.md §5), zigzag and
contiguous layouts, causal and not, GQA, softcap and sinks; merge_attention_states on its own;
the not-yet-supported arguments refused by name."""

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


def _worker(rank, world, init_file, case, errors):
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )  # fmt: skip
        torch.set_num_threads(1)
        layout, causal, (B, Hq, Hkv, L, D), dtype, mods = case
        q, k, v, go, gl, kw = _inputs(B, Hq, Hkv, L, D, dtype, mods)
        sh = lambda t: skd.shard_sequence(t, layout=layout, seq_dim=2)  # noqa: E731
        # The float64 reference and plain torch in the inputs' dtype, on the whole sequence.
        kw64 = {n: x.double() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
        ref = _grads(q.double(), k.double(), v.double(), go, gl, kw64, "reference", causal)
        base = _grads(q, k, v, go, gl, kw, "reference", causal)
        # This rank's shard through the ring.
        ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
        kwl = dict(kw)
        leaves = [ql, kl, vl]
        if "sinks" in kwl:
            kwl["sinks"] = kwl["sinks"].clone().requires_grad_()
            leaves.append(kwl["sinks"])
        out, lse = skd.ring_attention(ql, kl, vl, causal=causal, layout=layout, return_lse=True, backend="cpu", **kwl)
        loss = (out.double() * sh(go).double()).sum()
        loss = loss + (torch.where(lse.isfinite(), lse, 0).double() * sh(gl.unsqueeze(-1)).squeeze(-1).double()).sum()
        grads = list(torch.autograd.grad(loss, leaves))
        if "sinks" in kwl:  # the local share, summed over ranks like any replicated weight
            dist.all_reduce(grads[3])
        got = (out, lse, *grads[:3]) + tuple(grads[3:])

        def shard_of(res):
            o, l_, gs = res
            return (sh(o), sh(l_.unsqueeze(-1)).squeeze(-1), *(sh(x) for x in gs[:3])) + tuple(gs[3:])

        r_ref, r_base = shard_of(ref), shard_of(base)
        fwd = testing.compare(got[:2], r_ref[:2], r_base[:2])
        bwd = testing.compare(got[2:], r_ref[2:], r_base[2:], grad=True)
        # The whole output, gathered back, is the single-device result.
        full = skd.unshard_sequence(out.detach(), layout=layout, seq_dim=2)
        whole = testing.compare((full,), (ref[0],), (base[0],))
        for rep in (fwd, bwd, whole):
            if not rep.passed:
                errors.append(f"rank {rank}: {rep}")
    except Exception:
        errors.append(f"rank {rank}: {traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world, case):
    with tempfile.TemporaryDirectory() as d:
        init = os.path.join(d, "init")
        errors = mp.Manager().list()
        mp.spawn(_worker, args=(world, init, case, errors), nprocs=world, join=True)
        assert not list(errors), "\n".join(errors)


CASES = [
    (1, "zigzag", True, (1, 2, 2, 8, 8), torch.float32, ("sinks",)),
    (2, "zigzag", True, (1, 4, 2, 16, 16), torch.float32, ()),
    (3, "zigzag", True, (1, 2, 1, 18, 16), torch.bfloat16, ("softcap", "sinks")),
    (4, "zigzag", False, (1, 2, 2, 16, 8), torch.float32, ("sinks",)),
    (4, "contiguous", True, (1, 4, 2, 20, 16), torch.float32, ("softcap",)),
]


@needs_ext
@pytest.mark.parametrize("world,layout,causal,shape,dtype,mods", CASES, ids=lambda x: str(x).replace(" ", ""))
def test_ring_attention_matches_single_device(world, layout, causal, shape, dtype, mods):
    _spawn(world, (layout, causal, shape, dtype, mods))


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
        sum(len(list(skd._pairs(skd.chunk_ids(r, W, "zigzag"), [c], True))) for c in range(2 * W)) for r in range(W)
    ]
    assert max(work) == min(work)


def _refusal_worker(rank, world, init_file, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        q = torch.randn(1, 2, 4, 8)
        for kw, match in (
            (dict(dropout_p=0.1), "dropout_p"),
            (dict(window=(2, 0)), "window"),
            (dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
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
def test_context_parallel_example_trains_like_one_process(capsys):
    """A tiny Llama (transformers) trained 2 steps with its sequence sharded over 2 ranks through
    use_context_parallel: the same losses as one process."""
    pytest.importorskip("transformers")
    from seqkernels.examples import context_parallel

    res = context_parallel.main(["--world", "2", "--steps", "2", "--length", "16"])
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
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=8),
        )  # fmt: skip
        q = torch.randn(1, 2, 4, 8)
        skd.ring_attention(q, q, q, causal=True, dropout_p=0.5 if rank == 1 else 0.0, backend="cpu")
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
    assert len(got) == 2 and "NotImplementedError" in got[1] and "no error" not in got[0], got

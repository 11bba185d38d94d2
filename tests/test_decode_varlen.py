"""Packed query batches against the KV cache (chunked prefill, speculative verification, continuous
batching): decode_attention with cu_seqlens_q and kv_cache_append with cu_seqlens, on every backend
whose capability has varlen, against the padded form per sequence and the float64 reference (DESIGN
§5 rule); contiguous and paged caches, empty sequences, chunks longer than a row tile and a split,
GQA, windows, modifiers, split-K; validation (errors name the argument, nothing written); check=False
never writes out of bounds; the KVCache packed step."""

import importlib.util

import pytest
import torch
from conftest import HAS_CUDA
from decode_cases import cu_of, make_kv_cache, seq_cache

import seqkernels
from seqkernels import capabilities, reference, testing
from seqkernels.nn import KVCache

BACKENDS = ["reference", "cpu", "triton"] + (["cuda"] if HAS_CUDA else [])


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def _need(op, backend):
    if not capabilities.TABLE[op][backend].varlen:
        pytest.skip(f"{backend}: no packed form (capabilities varlen=False)")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton: not installed")


def make_packed(chunks, Hq, Hkv, D, Dv, S, dtype, *, paged=False, block_size=8, lens=None, device="cpu"):
    """q (total, Hq, D), k_cache, v_cache, cache_seqlens (lengths in [Tq_b, S], the first S), block_table
    (a permutation of blocks, -1 past a sequence's length), cu_seqlens_q. NaN in every unused slot."""
    if lens is None:
        lens = [S] + [int(torch.randint(n, S + 1, ())) for n in chunks[1:]]
    q = torch.randn(sum(chunks), Hq, D, dtype=dtype)
    kc, vc, lens, table = make_kv_cache(
        lens, Hkv, D, Dv, S, dtype, paged=paged, block_size=block_size, extra_blocks=2, device=device
    )
    return q.to(device), kc, vc, lens, table, cu_of(chunks, device)


# (chunks, Hq, Hkv, D, Dv, S, paged, window, num_splits, modifiers)
CASES = [
    ([1, 0, 3, 1], 2, 2, 64, 64, 97, False, None, 1, False),  # decode steps and an empty sequence
    ([130, 1, 0, 17], 8, 2, 64, 64, 300, True, None, 3, False),  # GQA, a chunk > row tile and > a split
    ([5, 2, 9], 4, 1, 40, 24, 60, False, 5, 2, False),  # MQA, Dv != D, a window
    ([3, 1, 6], 4, 2, 32, 32, 80, True, (7, 0), None, True),  # softcap, ALiBi (B, Hq), sinks
    ([1, 64, 3], 4, 2, 64, 64, 2048, False, None, 4, False),  # long caches, split-K
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-H{c[1]}/{c[2]}-S{c[5]}-p{int(c[6])}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_decode(backend, case, dtype):
    _need("decode_attention", backend)
    chunks, Hq, Hkv, D, Dv, S, paged, window, splits, mods = case
    if dtype != torch.float32 and S > 1000:
        pytest.skip("one dtype is enough for the long case")
    if backend == "triton" and not HAS_CUDA and (S > 1000 or sum(chunks) > 64 or dtype != torch.float32):
        pytest.skip("kept short under the Triton interpreter")
    device = _device(backend)
    q, kc, vc, lens, table, cu = make_packed(chunks, Hq, Hkv, D, Dv, S, dtype, paged=paged, device=device)
    B = len(chunks)
    kw = dict(window=window, num_splits=splits)
    if mods:
        kw.update(
            softcap=4.0,
            alibi_slopes=torch.rand(B, Hq, device=device) * 0.3,
            sinks=torch.randn(Hq, device=device),
        )
    out, lse = seqkernels.decode_attention(
        q, kc, vc, lens, block_table=table, cu_seqlens_q=cu, return_lse=True, backend=backend, **kw
    )
    total = q.shape[0]
    assert out.shape == (total, Hq, Dv) and out.dtype == dtype
    assert lse.shape == (Hq, total) and lse.dtype == torch.float32

    left = -1 if window is None else (window if isinstance(window, int) else window[0])
    c = cu.tolist()
    for b in range(B):
        t0, t1 = c[b], c[b + 1]
        if t0 == t1:
            continue
        qb = q[t0:t1].transpose(0, 1).unsqueeze(0)  # (1, Hq, Tq_b, D)
        kb, vb, lb, tb = seq_cache(kc, vc, lens, table, b)
        skw = dict(kw)
        if mods:
            skw["alibi_slopes"] = kw["alibi_slopes"][b : b + 1]
        # The padded form on the same backend, one sequence at a time.
        po, pl = seqkernels.decode_attention(qb, kb, vb, lb, block_table=tb, return_lse=True, backend=backend, **skw)
        got = (out[t0:t1].transpose(0, 1).unsqueeze(0), lse[:, t0:t1].unsqueeze(0))
        if backend in ("reference", "cpu"):
            # Same kernel, same row tiles and splits: bitwise equal.
            assert torch.equal(got[0], po) and torch.equal(got[1], pl), f"sequence {b} differs from the padded form"
        else:
            rep = testing.compare((got[0].cpu(), got[1].cpu()), (po.cpu().double(), pl.cpu().double()), (po, pl))
            assert rep.passed, str(rep)

        # The float64 reference.
        def ref(dt):
            cast = (lambda t: t.cpu().to(dt)) if dt else (lambda t: t.cpu())
            return reference.decode_attention_ref(
                cast(qb),
                cast(kb),
                cast(vb),
                lb.cpu(),
                block_table=None if tb is None else tb.cpu(),
                window_left=left,
                window_right=0,
                softcap=kw.get("softcap"),
                alibi_slopes=None if not mods else skw["alibi_slopes"].cpu().double(),
                sinks=None if not mods else kw["sinks"].cpu().double(),
            )

        rep = testing.compare((got[0].cpu(), got[1].cpu()), ref(torch.float64), ref(dtype))
        assert rep.passed, f"sequence {b}: {rep}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_decode_no_rows(backend):
    """Every sequence empty (a batch where nobody adds a token): empty outputs."""
    _need("decode_attention", backend)
    device = _device(backend)
    q, kc, vc, lens, table, cu = make_packed([0, 0], 2, 1, 16, 16, 12, torch.float32, device=device)
    out, lse = seqkernels.decode_attention(q, kc, vc, lens, cu_seqlens_q=cu, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_append(backend, paged):
    _need("kv_cache_append", backend)
    device = _device(backend)
    chunks = [2, 0, 5, 1]
    B, Hkv, D, Dv, S = len(chunks), 2, 16, 8, 20
    # Lengths such that the appends end at, near and far from the capacity.
    _, kc, vc, lens, table, cu = make_packed(
        chunks, 2, Hkv, D, Dv, S, torch.float32, paged=paged, block_size=4, lens=[3, 7, 15, 19], device=device
    )
    if paged:  # the appended positions need blocks: give every column one
        free = [i for i in range(kc.shape[0]) if i not in set(table[table >= 0].tolist())]
        t = table.cpu()
        for b in range(B):
            for col in range(t.shape[1]):
                if t[b, col] < 0:
                    t[b, col] = free.pop()
        table = t.to(device)
    kn = torch.randn(sum(chunks), Hkv, D, device=device)
    vn = torch.randn(sum(chunks), Hkv, Dv, device=device)
    k1, v1 = kc.clone(), vc.clone()
    lens0 = lens.clone()
    seqkernels.kv_cache_append(k1, v1, kn, vn, lens, block_table=table, cu_seqlens=cu, backend=backend)
    assert torch.equal(lens, lens0), "cache_seqlens must not change"
    k2, v2 = kc.clone(), vc.clone()
    c = cu.tolist()
    for b in range(B):
        if c[b] == c[b + 1]:
            continue
        kb = kn[c[b] : c[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = vn[c[b] : c[b + 1]].transpose(0, 1).unsqueeze(0)
        if paged:
            seqkernels.kv_cache_append(k2, v2, kb, vb, lens[b : b + 1], block_table=table[b : b + 1], backend=backend)
        else:
            seqkernels.kv_cache_append(k2[b : b + 1], v2[b : b + 1], kb, vb, lens[b : b + 1], backend=backend)
    assert torch.equal(k1.nan_to_num(7.0), k2.nan_to_num(7.0)) and torch.equal(v1.nan_to_num(7.0), v2.nan_to_num(7.0))
    # ... and each token landed where the padded form puts it (spot check through the decode reference).
    b, t = 2, 4
    assert torch.equal(reference._gather_cache(k1, table)[b, :, int(lens[b]) + t].cpu(), kn[c[b] + t].cpu())


def _cache(paged, device="cpu"):
    """B=3 sequences, Hkv=1, D=4, capacity 8 (paged: 2 columns of 4, 7 blocks)."""
    if paged:
        kc = torch.zeros(7, 1, 4, 4, device=device)
        table = torch.tensor([[0, 1], [2, 3], [4, -1]], dtype=torch.int32, device=device)
    else:
        kc = torch.zeros(3, 1, 8, 4, device=device)
        table = None
    return kc, kc.clone(), table


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_packed_append_errors(paged):
    kc, vc, table = _cache(paged)
    lens = torch.tensor([0, 2, 1], dtype=torch.int32)
    kn = torch.ones(6, 1, 4)

    def call(cu, lens=lens, kn=kn, table=table, **kw):
        seqkernels.kv_cache_append(kc, vc, kn, kn.clone(), lens, block_table=table, cu_seqlens=cu, **kw)

    bad = [
        (torch.tensor([0, 2, 4, 6]), "cu_seqlens"),  # int64
        (torch.tensor([0, 4, 2, 6], dtype=torch.int32), "cu_seqlens"),  # decreasing
        (torch.tensor([0, 2, 4, 5], dtype=torch.int32), "cu_seqlens"),  # does not end at total
        (torch.tensor([0, 3, 6], dtype=torch.int32), "cu_seqlens"),  # 2 sequences, cache_seqlens has 3
        (torch.tensor([1, 2, 4, 6], dtype=torch.int32), "cu_seqlens"),  # does not start at 0
    ]
    for cu, name in bad:
        with pytest.raises((ValueError, TypeError), match=name):
            call(cu)
    # Capacity: sequence 2 (length 7 of 8 in a contiguous cache, or its table's 1 block) would overflow.
    long_lens = torch.tensor([0, 2, 7 if not paged else 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="sequence 2"):
        call(torch.tensor([0, 1, 2, 6], dtype=torch.int32), lens=long_lens)
    if paged:
        # A block table too short for a sequence (2 columns of 4: positions up to 7).
        with pytest.raises(ValueError, match="sequence 0.*max_blocks"):
            call(torch.tensor([0, 6, 6, 6], dtype=torch.int32), lens=torch.tensor([3, 0, 0], dtype=torch.int32))
        # A block id out of range.
        t = table.clone()
        t[1, 0] = 9
        with pytest.raises(ValueError, match="block_table"):
            call(torch.tensor([0, 0, 6, 6], dtype=torch.int32), table=t)
    with pytest.raises(ValueError, match="k_new"):
        call(torch.tensor([0, 2, 4, 6], dtype=torch.int32), kn=torch.ones(1, 6, 1, 4))
    assert not kc.any() and not vc.any(), "nothing may be written on error"
    # The op called directly (no public layer) still checks the packed arguments.
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.seqkernels.kv_cache_append(
            kc, vc, kn.transpose(0, 1).unsqueeze(0), kn.transpose(0, 1).unsqueeze(0), lens, table,
            torch.tensor([0, 4, 2, 6], dtype=torch.int32),
        )  # fmt: skip
    assert not kc.any()


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_append_unchecked_in_bounds(backend, paged):
    """check=False with positions past the capacity and bad block ids: the kernels skip those tokens,
    write the rest as the reference does, and touch nothing outside the caches."""
    _need("kv_cache_append", backend)
    device = _device(backend)
    if paged:
        buf = torch.zeros(9, 1, 4, 4, device=device)
        table = torch.tensor([[1, 2], [3, 9], [5, -1]], dtype=torch.int32, device=device)
    else:
        buf = torch.zeros(5, 1, 8, 4, device=device)
        table = None
    kc, vc = buf[1:-1], buf.clone()[1:-1]  # guard rows on both sides
    lens = torch.tensor([6, 3, 2], dtype=torch.int32, device=device)
    cu = cu_of([4, 4, 5], device)
    kn = torch.arange(1, 13 * 4 + 1, dtype=torch.float32, device=device).view(13, 1, 4)
    seqkernels.kv_cache_append(
        kc, vc, kn, kn.clone(), lens, block_table=table, cu_seqlens=cu, check=False, backend=backend
    )
    assert not buf[0].any() and not buf[-1].any(), "wrote outside the cache"
    rk, rv = torch.zeros_like(kc), torch.zeros_like(vc)
    seqkernels.kv_cache_append(
        rk, rv, kn, kn.clone(), lens, block_table=table, cu_seqlens=cu, check=False, backend="reference"
    )
    assert torch.equal(kc, rk)
    assert kc.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_decode_errors(backend):
    _need("decode_attention", backend)
    device = _device(backend)
    q, kc, vc, lens, table, cu = make_packed([2, 1, 3], 2, 1, 8, 8, 10, torch.float32, device=device)

    def call(q=q, cu=cu, lens=lens, **kw):
        return seqkernels.decode_attention(q, kc, vc, lens, cu_seqlens_q=cu, backend=backend, **kw)

    for bad, name in [
        (cu.long(), "cu_seqlens_q"),
        (torch.tensor([0, 3, 2, 6], dtype=torch.int32, device=device), "cu_seqlens_q"),
        (torch.tensor([0, 2, 3, 5], dtype=torch.int32, device=device), "cu_seqlens_q"),
        (torch.tensor([0, 3, 6], dtype=torch.int32, device=device), "cu_seqlens_q"),
    ]:
        with pytest.raises((ValueError, TypeError), match=name):
            call(cu=bad)
    with pytest.raises(ValueError, match="cache_seqlens: sequence 2"):  # 3 queries, 2 keys in the cache
        call(lens=torch.tensor([5, 5, 2], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="max_seqlen_q"):
        call(max_seqlen_q=2)
    with pytest.raises(ValueError, match="q"):
        call(q=q.unsqueeze(0))
    with pytest.raises(ValueError, match="alibi_slopes"):
        call(alibi_slopes=torch.ones(2, 2, device=device))


def test_packed_decode_op_checks():
    """The CPU op called directly validates the packed arguments."""
    q, kc, vc, lens, _, cu = make_packed([2, 1], 2, 1, 8, 8, 10, torch.float32)
    qv = q.transpose(0, 1).unsqueeze(0)
    op = torch.ops.seqkernels.decode_attention
    out, lse = op(qv, kc, vc, lens, None, 0.5, -1, 0, 1, None, None, 0.0, cu, 2)
    assert out.shape == (1, 2, 3, 8) and lse.shape == (1, 2, 3)
    assert out.transpose(1, 2).is_contiguous()  # token-major storage
    with pytest.raises(RuntimeError, match="max_seqlen"):
        op(qv, kc, vc, lens, None, 0.5, -1, 0, 1, None, None, 0.0, cu, 1)
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        op(qv, kc, vc, lens, None, 0.5, -1, 0, 1, None, None, 0.0, cu[:2].contiguous(), 2)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_packed_step(paged):
    """KVCache: a prefill step of different prompt lengths, then a mixed step (a chunk, a decode
    token, an idle sequence), equal to the padded steps of the same tokens one sequence at a time."""
    torch.manual_seed(0)
    L, B, Hq, Hkv, D = 2, 3, 4, 2, 16
    cache = KVCache(L, B, Hkv, D, 64, dtype=torch.float32, paged=paged, block_size=4)
    steps = [[5, 2, 9], [3, 1, 0]]
    for counts in steps:
        cu = cu_of(counts)
        total = sum(counts)
        before = cache.host_lengths
        for layer in range(L):
            k, v, q = torch.randn(total, Hkv, D), torch.randn(total, Hkv, D), torch.randn(total, Hq, D)
            cache.append(layer, k, v, cu_seqlens=cu)
            out = cache.attend(layer, q, cu_seqlens_q=cu)
            assert out.shape == (total, Hq, D)
            view = cache.views(layer)
            for b in range(B):
                n = counts[b]
                if n == 0:
                    continue
                s = slice(int(cu[b]), int(cu[b + 1]))
                # The appended rows sit at the sequence's old length onwards.
                got_k = reference._gather_cache(view.k_cache, view.block_table)[b, :, before[b] : before[b] + n]
                assert torch.equal(got_k, k[s].transpose(0, 1))
                kb, vb, lb, tb = seq_cache(view.k_cache, view.v_cache, view.cache_seqlens, view.block_table, b)
                ref = seqkernels.decode_attention(q[s].transpose(0, 1).unsqueeze(0), kb, vb, lb, block_table=tb)
                torch.testing.assert_close(out[s].transpose(0, 1).unsqueeze(0), ref)
        assert cache.host_lengths == [a + c for a, c in zip(before, counts)]
        assert cache.lengths.tolist() == cache.host_lengths
    with pytest.raises(ValueError, match="cu_seqlens"):
        cache.append(0, torch.randn(3, Hkv, D), torch.randn(3, Hkv, D), cu_seqlens=cu_of([1, 1]))
    cache.append(0, torch.randn(2, Hkv, D), torch.randn(2, Hkv, D), cu_seqlens=cu_of([1, 1, 0]))
    with pytest.raises(ValueError, match="cu_seqlens"):  # layer 1 must append the same counts
        cache.append(1, torch.randn(2, Hkv, D), torch.randn(2, Hkv, D), cu_seqlens=cu_of([2, 0, 0]))


def test_opcheck_packed():
    """The packed forms of the C++ ops against their fakes (token-major out storage) and schemas."""
    from seqkernels.ops import kv_cache as kv_ops

    q, kc, vc, lens, table, cu = make_packed([3, 0, 2], 4, 2, 16, 16, 20, torch.float32, paged=True, block_size=4)
    c = kv_ops.prepare_decode(q, kc, vc, lens, block_table=table, cu_seqlens_q=cu, num_splits=2)
    torch.library.opcheck(torch.ops.seqkernels.decode_attention.default, c.args())
    kc2, vc2, table2 = _cache(False)
    kn = torch.randn(4, 1, 4)
    a = kv_ops.prepare_append(
        kc2, vc2, kn, kn.clone(), torch.tensor([1, 0, 2], dtype=torch.int32), cu_seqlens=cu_of([1, 2, 1])
    )
    torch.library.opcheck(torch.ops.seqkernels.kv_cache_append.default, a.args())

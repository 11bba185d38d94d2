"""kv_cache_append on every backend (reference, cpu, triton under the interpreter, cuda through the
CUDA-on-CPU harness, cuda on a GPU): contiguous and paged caches (permuted block tables), lengths
including 0 and S_max - T, non-contiguous and misaligned new rows, host validation that raises before
anything is written, out-of-range tokens skipped with check=False, validation messages, opcheck."""

import pytest
import torch
from conftest import HAS_CUDA
from decode_cases import random_caches as make_caches

import seqkernels
from seqkernels import backends
from seqkernels.ops import kv_cache as kv_ops

BACKENDS = ["reference", "cpu", "triton", "cuda_emu"] + (["cuda"] if HAS_CUDA else [])
SOURCES = ["csrc/cuda/kv_cache.cu"]


@pytest.fixture(scope="module")
def emu():
    from emulation import load_emulated

    return load_emulated("kv_cache", SOURCES)


def expected(kc, vc, kn, vn, lens, table):
    """The append written out position by position (independent of every backend)."""
    kc, vc = kc.clone(), vc.clone()
    B, H, T, _ = kn.shape
    for b in range(B):
        for t in range(T):
            p = int(lens[b]) + t
            if table is None:
                if 0 <= p < kc.shape[2]:
                    kc[b, :, p], vc[b, :, p] = kn[b, :, t], vn[b, :, t]
            else:
                bs = kc.shape[2]
                if p < 0 or p // bs >= table.shape[1]:
                    continue
                blk = int(table[b, p // bs])
                if 0 <= blk < kc.shape[0]:
                    kc[blk, :, p % bs], vc[blk, :, p % bs] = kn[b, :, t], vn[b, :, t]
    return kc, vc


def run_append(backend, kc, vc, kn, vn, lens, table, *, check=True, emu=None):
    if backend == "cuda_emu":
        c = kv_ops.prepare_append(kc, vc, kn, vn, lens, block_table=table, check=check)
        emu.kv_cache_append(*c.args())
        return kc, vc
    dev = "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"
    moved = [None if t is None else t.to(dev) for t in (kc, vc, kn, vn, lens, table)]
    c = kv_ops.prepare_append(*moved[:5], block_table=moved[5], check=check)
    reason = backends.why_not(kv_ops.APPEND_OP, backend, c.device, c)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    seqkernels.kv_cache_append(*moved[:5], block_table=moved[5], check=check, backend=backend)
    return moved[0].cpu(), moved[1].cpu()


# (B, H, T, D, Dv, S, dtype, paged, new-row layout)
CASES = [
    (3, 2, 1, 64, 64, 37, torch.float16, False, "contiguous"),
    (3, 2, 5, 40, 24, 37, torch.bfloat16, True, "transposed"),
    (2, 1, 17, 128, 128, 40, torch.float32, True, "contiguous"),
    (3, 3, 4, 17, 33, 20, torch.float16, False, "offset"),
    (2, 2, 3, 6, 6, 11, torch.bfloat16, True, "offset"),
    (2, 2, 2, 20, 20, 9, torch.float32, False, "transposed"),
    (2, 2, 3, 6, 4, 11, torch.float16, True, "contiguous"),  # 12- and 8-byte rows: 4-byte CUDA copies
    (2, 1, 2, 4, 4, 7, torch.float16, False, "contiguous"),  # 8-byte rows: 8-byte CUDA copies
]


def _new_rows(B, H, T, D, dtype, layout):
    if layout == "transposed":
        return torch.randn(B, H, D, T, dtype=dtype).transpose(2, 3)
    if layout == "offset":  # a view one element into its storage: only narrow vector copies line up
        return torch.randn(B, H, T, D + 1, dtype=dtype)[..., 1:]
    return torch.randn(B, H, T, D, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: f"B{c[0]}H{c[1]}T{c[2]}D{c[3]}-{c[4]}S{c[5]}-{c[6]}-{'paged' if c[7] else 'contig'}-{c[8]}".replace(
        "torch.", ""
    ),
)
def test_append_matches_expected(backend, case, request):
    B, H, T, D, Dv, S, dtype, paged, layout = case
    emu = request.getfixturevalue("emu") if backend == "cuda_emu" else None
    kc, vc, table = make_caches(B, H, S, D, Dv, dtype, paged=paged)
    kn, vn = _new_rows(B, H, T, D, dtype, layout), _new_rows(B, H, T, Dv, dtype, layout)
    lens = torch.randint(0, S - T + 1, (B,), dtype=torch.int32)
    lens[0], lens[1] = 0, S - T  # the first and the last positions a T-token append can start at
    want_k, want_v = expected(kc, vc, kn, vn, lens, table)
    before = kc.clone()
    got_k, got_v = run_append(backend, kc, vc, kn, vn, lens, table, emu=emu)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert not torch.equal(got_k, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_false_skips_out_of_range_tokens(backend, request):
    """Without the host check, tokens past the cache or in a block with a bad id are skipped and
    nothing outside the written slots changes."""
    emu = request.getfixturevalue("emu") if backend == "cuda_emu" else None
    for paged in (False, True):
        kc, vc, table = make_caches(3, 2, 16, 8, 8, torch.float32, paged=paged, block_size=4)
        kn, vn = torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)
        lens = torch.tensor([13, 2, 5], dtype=torch.int32)  # sequence 0 runs 3 tokens past S_max = 16
        if paged:
            table[1, 1] = -1  # positions 4..7 of sequence 1: invalid block id
            table[2, 2] = kc.shape[0]  # positions 8..11 of sequence 2: one past the last block
        want_k, want_v = expected(kc, vc, kn, vn, lens, table)
        got_k, got_v = run_append(backend, kc, vc, kn, vn, lens, table, check=False, emu=emu)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_check_false_negative_int64_starts(backend, paged, request):
    """int64 cache_seqlens below int32's range, or negative: a start of -5 with 6 tokens writes
    positions 0 (its 6th token) only, -2**40 nothing; the int32 conversion once clamped both to
    -1, which wrote tokens 1.. of either at positions 0.."""
    emu = request.getfixturevalue("emu") if backend == "cuda_emu" else None
    kc, vc, table = make_caches(3, 2, 16, 8, 8, torch.float32, paged=paged, block_size=4)
    kn, vn = torch.randn(3, 2, 6, 8), torch.randn(3, 2, 6, 8)
    lens = torch.tensor([-5, -(2**40), 3], dtype=torch.int64)
    want_k, want_v = expected(kc, vc, kn, vn, lens, table)
    got_k, got_v = run_append(backend, kc, vc, kn, vn, lens, table, check=False, emu=emu)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("problem", ["overflow", "table_columns", "bad_block", "negative_length"])
def test_host_check_rejects_before_writing(paged, problem):
    kc, vc, table = make_caches(3, 2, 16, 8, 8, torch.float32, paged=paged, block_size=4)
    kn, vn = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8)
    lens = torch.tensor([0, 12, 3], dtype=torch.int32)
    if problem == "overflow" or problem == "table_columns":
        lens[1] = 13  # positions 13..16: past S_max (contiguous) / past the last table column (paged)
        match = "sequence 1"
    elif problem == "bad_block":
        if not paged:
            pytest.skip("block ids exist only in paged caches")
        table[2, 1] = 10_000  # sequence 2 writes positions 3..6, i.e. columns 0 and 1
        match = "sequence 2.*block id 10000"
    else:
        lens[2] = -1
        match = "sequence 2.*negative"
    before = (kc.clone(), vc.clone())
    with pytest.raises(ValueError, match=match):
        seqkernels.kv_cache_append(kc, vc, kn, vn, lens, block_table=table)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_unused_table_entries_are_not_checked():
    """Columns a step does not write may hold anything (-1 marks unallocated blocks in KVCache)."""
    kc, vc, table = make_caches(2, 1, 16, 8, 8, torch.float32, paged=True, block_size=4)
    table[:, 2:] = -1
    kn, vn = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8)
    lens = torch.tensor([0, 5], dtype=torch.int32)
    want = expected(kc, vc, kn, vn, lens, table)
    seqkernels.kv_cache_append(kc, vc, kn, vn, lens, block_table=table, backend="cpu")
    assert torch.equal(kc, want[0]) and torch.equal(vc, want[1])


def test_float64_and_empty_appends():
    kc, vc, table = make_caches(2, 2, 10, 5, 7, torch.float64, paged=True, block_size=3)
    kn, vn = torch.randn(2, 2, 4, 5, dtype=torch.float64), torch.randn(2, 2, 4, 7, dtype=torch.float64)
    lens = torch.tensor([6, 1], dtype=torch.int64)
    want = expected(kc, vc, kn, vn, lens, table)
    seqkernels.kv_cache_append(kc, vc, kn, vn, lens, block_table=table.long())
    assert torch.equal(kc, want[0]) and torch.equal(vc, want[1])
    kc32, vc32 = kc.float(), vc.float()
    before = kc32.clone(), vc32.clone()
    for backend in ("cpu", "triton", "reference"):
        seqkernels.kv_cache_append(
            kc32, vc32, kn[:, :, :0].float(), vn[:, :, :0].float(), lens, block_table=table, backend=backend
        )
    assert torch.equal(kc32, before[0]) and torch.equal(vc32, before[1])
    ex = seqkernels.explain("kv_cache_append", kc, vc, kn, vn, lens, block_table=table)
    assert ex.chosen == "cpu" and "float64" in ex.reasons["triton"]


def _bad(mutate):
    kc, vc, table = make_caches(2, 2, 16, 8, 8, torch.float32, paged=False)
    kw = dict(
        k_cache=kc,
        v_cache=vc,
        k_new=torch.randn(2, 2, 3, 8),
        v_new=torch.randn(2, 2, 3, 8),
        cache_seqlens=torch.tensor([0, 4], dtype=torch.int32),
    )
    mutate(kw)
    return kw


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda kw: kw.update(k_new=kw["k_new"].half()), TypeError, "k_new.*dtype"),
        (lambda kw: kw.update(v_cache=kw["v_cache"].double()), TypeError, "v_cache.*dtype"),
        (lambda kw: kw.update(k_new=kw["k_new"][:, :1]), ValueError, "v_new: expected shape"),
        (lambda kw: kw.update(k_new=kw["k_new"][..., :4], v_new=kw["v_new"]), ValueError, "k_new"),
        (lambda kw: kw.update(k_cache=kw["k_cache"][:1], v_cache=kw["v_cache"][:1]), ValueError, "contiguous cache"),
        (lambda kw: kw.update(k_cache=kw["k_cache"].transpose(2, 3)), ValueError, "v_cache: shape"),
        (lambda kw: kw.update(k_cache=torch.randn(2, 2, 8, 16).transpose(2, 3)), ValueError, "stride 1"),
        (lambda kw: kw.update(cache_seqlens=kw["cache_seqlens"].float()), TypeError, "cache_seqlens"),
        (lambda kw: kw.update(cache_seqlens=torch.zeros(3, dtype=torch.int32)), ValueError, "cache_seqlens"),
        (lambda kw: kw.update(block_table=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "block_table"),
        (lambda kw: kw.update(k_new=kw["k_new"].numpy()), TypeError, "k_new"),
    ],
)
def test_bad_inputs_are_named(mutate, exc, match):
    kw = _bad(mutate)
    with pytest.raises(exc, match=match):
        seqkernels.kv_cache_append(
            kw.pop("k_cache"), kw.pop("v_cache"), kw.pop("k_new"), kw.pop("v_new"), kw.pop("cache_seqlens"), **kw
        )


@pytest.mark.parametrize("op", ["cpp", "triton"])
def test_opcheck(op):
    kc, vc, table = make_caches(2, 2, 12, 8, 8, torch.float32, paged=True, block_size=4)
    args = (kc, vc, torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), torch.tensor([1, 6], dtype=torch.int32), table)
    fn = torch.ops.seqkernels.kv_cache_append if op == "cpp" else torch.ops.seqkernels.triton_kv_cache_append
    torch.library.opcheck(fn.default, args)


@pytest.mark.cuda
def test_cuda_vector_widths_on_gpu():
    """16-, 8-, 4- and 2-byte copies: head dims and alignments that allow each."""
    for D, dtype, layout in (
        (64, torch.bfloat16, "contiguous"),
        (4, torch.float16, "contiguous"),
        (3, torch.float32, "contiguous"),
        (17, torch.float16, "offset"),
    ):
        kc, vc, table = make_caches(2, 2, 30, D, D, dtype, paged=True)
        kn, vn = _new_rows(2, 2, 7, D, dtype, layout), _new_rows(2, 2, 7, D, dtype, layout)
        lens = torch.tensor([0, 23], dtype=torch.int32)
        want = expected(kc, vc, kn, vn, lens, table)
        got = run_append("cuda", kc, vc, kn, vn, lens, table)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------------------------------------------
# Triton decode attention: scores near FLT_MAX and empty inputs (issue 15)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def triton_decode(monkeypatch):
    """The Triton kv_cache module with a NaN-filled allocator, so an element a kernel forgets to
    write (output, lse, or a split's partial) shows as NaN."""
    tkv = pytest.importorskip("seqkernels.triton_kernels.kv_cache")
    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    reason = tkv.decode_unsupported_reason(
        torch.empty(1, 1, 1, 16, device=dev), torch.empty(1, 1, 1, 16, device=dev), torch.empty(1, 1, 1, 16, device=dev)
    )
    if reason is not None:
        pytest.skip(reason)

    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tkv, "_alloc", alloc)
    return tkv, dev


def _lse_rel(lse, ref_lse):
    """lse / max(1, |reference lse|) per row, so an lse near FLT_MAX does not set the floor of the others."""
    r = ref_lse.detach().cpu().double()
    norm = torch.where(torch.isfinite(r), r.abs().clamp(min=1.0), torch.ones_like(r))
    return lse.detach().cpu().double() / norm


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's inf - inf in discarded lanes
@pytest.mark.parametrize("paged, num_splits", [(False, 1), (True, 3)], ids=["contiguous", "paged-split3"])
@pytest.mark.parametrize("magnitude", [1e20, 3e38], ids=lambda m: f"{m:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_decode_huge_scores(triton_decode, dtype, magnitude, paged, num_splits):
    """max |q.k * scale| = magnitude (carried by the scale, so every dtype gets there), GQA, two query
    tokens, split-K: with log2(e) folded into the scale the scores beyond FLT_MAX / log2(e) ~ 2.36e38
    overflowed. Output and lse (relative to its magnitude) against the float64 reference by the parity
    rule, and close to torch in the same dtype."""
    from seqkernels import reference, testing

    _, dev = triton_decode
    gen = torch.Generator().manual_seed(21)
    B, Hq, Hkv, Tq, D, S = 2, 4, 2, 2, 16, 45
    q = torch.randn(B, Hq, Tq, D, generator=gen).to(dtype)
    kc, vc, table = make_caches(B, Hkv, S, D, D, dtype, paged=paged)
    lens = torch.tensor([S, 29], dtype=torch.int32)
    k_all = reference._gather_cache(kc, table).double()
    qk = torch.einsum("bhtd,bgsd->bhgts", q.double(), k_all).abs().max().item()
    scale = magnitude / qk
    moved = [None if t is None else t.to(dev) for t in (q, kc, vc, lens, table)]
    out, lse = seqkernels.decode_attention(
        *moved[:4], block_table=moved[4], scale=scale, num_splits=num_splits, return_lse=True, backend="triton"
    )
    out, lse = out.cpu(), lse.cpu()

    def ref(dt):
        return reference.decode_attention_ref(q.to(dt), kc.to(dt), vc.to(dt), lens, block_table=table, scale=scale)

    (ref_out, ref_lse), (base_out, base_lse) = ref(torch.float64), ref(dtype)
    report = testing.compare(out, ref_out, base_out, name="out")
    report.extend(
        testing.compare(
            _lse_rel(lse, ref_lse),
            _lse_rel(ref_lse, ref_lse),
            _lse_rel(base_lse, ref_lse),
            name="lse/max(1,|lse_ref|)",
            dtype=dtype,
        )
    )
    assert report.passed, str(report)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}[dtype]
    torch.testing.assert_close(out.double(), base_out.double(), atol=tol, rtol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_decode_zero_size(triton_decode):
    """Empty batch, no query heads (with a kv head), an empty cache and zero lengths: right shapes, and
    every element written (rows that see no key: 0 and lse -inf), with one split and several."""
    tkv, dev = triton_decode
    for B, Hq, Hkv, S in ((0, 2, 1, 8), (2, 0, 1, 8)):
        q = torch.randn(B, Hq, 1, 16, device=dev)
        kc, vc = torch.randn(B, Hkv, S, 16, device=dev), torch.randn(B, Hkv, S, 8, device=dev)
        lens = torch.full((B,), 3, dtype=torch.int32, device=dev)
        out, lse = seqkernels.decode_attention(q, kc, vc, lens, return_lse=True, backend="triton")
        assert out.shape == (B, Hq, 1, 8) and lse.shape == (B, Hq, 1)
    for S, splits in ((0, 1), (0, 3), (8, 1), (8, 4)):
        q = torch.randn(2, 4, 3, 16, device=dev)
        kc, vc = torch.randn(2, 2, S, 16, device=dev), torch.randn(2, 2, S, 8, device=dev)
        lens = torch.zeros(2, dtype=torch.int32, device=dev)
        out, lse = tkv.decode_attention(q, kc, vc, lens, None, 0.25, -1, 0, splits)
        assert out.shape == (2, 4, 3, 8) and lse.shape == (2, 4, 3)
        assert torch.all(out == 0) and torch.all(lse == float("-inf")), (S, splits)

"""Packed (variable-length) kv_cache_append and decode_attention kernels: Triton (under the
interpreter without a GPU) and CUDA (through the CUDA-on-CPU harness; on a GPU with the `cuda`
marker). The kernels are called directly with the normalized arguments (docs/INTERNALS.md
"Packed sequences", "## KV cache"): packed rows are (1, H, total, D) views of token-major
tensors, cu_seqlens int32 (B+1,). Each packed result is checked against the float64 reference
run on every sequence's rows in padded form (parity rule); the packed append against the padded
append of each sequence, bitwise; unchecked offsets never write outside the expected slots."""

import math

import pytest
import torch
from decode_cases import cu_of, make_kv_cache, seq_cache

from seqkernels import reference, testing

SOURCES = ["csrc/cuda/kv_cache.cu"]


@pytest.fixture(scope="module")
def emu():
    from emulation import load_emulated

    return load_emulated("kv_cache", SOURCES)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def packed_view(tok_major):
    """(total, H, D) -> the (1, H, total, D) view the kernels take."""
    return tok_major.transpose(0, 1).unsqueeze(0)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------

BACKENDS = ["triton", "cuda_emu"]


def _backend_params():
    params = [pytest.param("triton"), pytest.param("cuda_emu", marks=pytest.mark.emulation)]
    return params


def _tk():
    # Imported on use: the sanitized child process that imports this file must not load Triton.
    from seqkernels.triton_kernels import kv_cache

    return kv_cache


def decode_call(backend, emu, q, kc, vc, lens, bt, *, scale, wl, splits, mods, cu=None, max_q=0):
    softcap, slopes, sinks = mods
    args = (q, kc, vc, lens, bt, scale, wl, 0, splits, slopes, sinks, softcap)
    if backend == "cuda_emu":
        return emu.decode_attention(*args, cu, max_q)
    return _tk().decode_attention(*args, cu_seqlens_q=cu, max_seqlen_q=max_q)


def append_call(backend, emu, kc, vc, kn, vn, lens, bt, cu=None):
    if backend == "cuda_emu":
        emu.kv_cache_append(kc, vc, kn, vn, lens, bt, cu)
    elif backend == "cuda":
        torch.ops.seqkernels.kv_cache_append(kc, vc, kn, vn, lens, bt, cu)
    else:
        _tk().kv_cache_append(kc, vc, kn, vn, lens, bt, cu)


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------


def make_mods(B, Hq, kind):
    if kind is None:
        return 0.0, None, None
    return 2.0, torch.rand(B, Hq) * 0.3 + 0.02, torch.randn(Hq) * 2


def reference_packed(q_tok, kc, vc, lens, bt, counts, *, scale, wl, mods, dtype):
    """The packed result assembled from decode_attention_ref on each sequence (padded form) run in
    `dtype`: out (1, Hq, total, Dv), lse (1, Hq, total)."""
    softcap, slopes, sinks = mods
    total, Hq, _ = q_tok.shape
    Dv = vc.shape[-1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.zeros(total, Hq, Dv, dtype=dtype)
    lse = torch.full((Hq, total), float("-inf"), dtype=acc)
    start = 0
    for b, n in enumerate(counts):
        if n:
            k1, v1, l1, t1 = seq_cache(kc.cpu(), vc.cpu(), lens.cpu(), None if bt is None else bt.cpu(), b)
            qb = q_tok[start : start + n].cpu().transpose(0, 1).unsqueeze(0)
            o, s = reference.decode_attention_ref(
                qb.to(dtype),
                k1.to(dtype),
                v1.to(dtype),
                l1,
                block_table=t1,
                scale=scale,
                window_left=wl,
                window_right=0,
                softcap=softcap or None,
                alibi_slopes=None if slopes is None else slopes[b : b + 1].to(acc),
                sinks=None if sinks is None else sinks.to(acc),
            )
            out[start : start + n] = o[0].transpose(0, 1).to(dtype)
            lse[:, start : start + n] = s[0].to(acc)
        start += n
    return out.permute(1, 0, 2).unsqueeze(0), lse.unsqueeze(0)


# (counts Tq_b, lens extra (cache length - Tq_b), Hq, Hkv, D, Dv, S, paged, window_left, splits, dtype, mods)
DECODE_CASES = [
    # single-token decode, some empty sequences, contiguous
    ((1, 0, 1, 1), 40, 4, 2, 32, 32, 48, False, -1, 1, torch.float32, None),
    # chunked prefill: one sequence much longer than the row tile, empty first/last, paged, splits
    ((0, 1, 37, 2, 0), 20, 4, 2, 64, 64, 64, True, -1, 3, torch.float16, None),
    # GQA (G = 4), window, Dv != D, modifiers, splits
    ((3, 0, 9, 1), 25, 8, 2, 40, 24, 40, True, 6, 2, torch.bfloat16, "all"),
    # modifiers with one split (the sink merged in the decode kernel), contiguous, MQA
    ((5, 2, 0, 12), 10, 4, 1, 16, 16, 32, False, -1, 1, torch.float32, "all"),
]


def _case_id(c):
    counts, _, Hq, Hkv, D, Dv, _, paged, wl, splits, dtype, mods = c
    return (
        f"T{'-'.join(map(str, counts))}-G{Hq // Hkv}-D{D}x{Dv}-{'paged' if paged else 'contig'}-w{wl}-s{splits}-"
        f"{str(dtype).split('.')[-1]}{'-mods' if mods else ''}"
    )


def _decode_case(case, device="cpu"):
    counts, extra, Hq, Hkv, D, Dv, S, paged, wl, splits, dtype, mods_kind = case
    B = len(counts)
    lens = [min(S, n + extra + 3 * b) for b, n in enumerate(counts)]
    kc, vc, lens_t, bt = make_kv_cache(lens, Hkv, D, Dv, S, dtype, paged=paged, device=device)
    total = sum(counts)
    q_tok = torch.randn(total, Hq, D, dtype=dtype, device=device)
    mods = make_mods(B, Hq, mods_kind)
    if device != "cpu":
        mods = tuple(m.to(device) if isinstance(m, torch.Tensor) else m for m in mods)
    return counts, q_tok, kc, vc, lens_t, bt, mods, dict(scale=1 / math.sqrt(D), wl=wl, splits=splits)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("case", DECODE_CASES, ids=[_case_id(c) for c in DECODE_CASES])
def test_packed_decode_matches_reference(backend, case, emu_if, request):
    emu = emu_if(backend)
    counts, q_tok, kc, vc, lens, bt, mods, kw = _decode_case(case)
    dtype = q_tok.dtype
    cu = cu_of(counts)
    out, lse = decode_call(
        backend, emu, packed_view(q_tok), kc, vc, lens, bt, cu=cu, max_q=max(counts), mods=mods, **kw
    )
    total, Hq = q_tok.shape[:2]
    assert out.shape == (1, Hq, total, vc.shape[-1]) and lse.shape == (1, Hq, total)
    # Token-major storage: out[0].transpose(0, 1) is the (total, Hq, Dv) tensor, without a copy.
    assert out[0].transpose(0, 1).is_contiguous()
    ref = reference_packed(
        q_tok, kc, vc, lens, bt, counts, scale=kw["scale"], wl=kw["wl"], mods=mods, dtype=torch.float64
    )
    base = reference_packed(q_tok, kc, vc, lens, bt, counts, scale=kw["scale"], wl=kw["wl"], mods=mods, dtype=dtype)
    report = testing.compare((out, lse), ref, base)
    assert report.passed, str(report)


@pytest.fixture
def emu_if(request):
    def get(backend):
        return request.getfixturevalue("emu") if backend == "cuda_emu" else None

    return get


@pytest.mark.parametrize("backend", _backend_params())
def test_packed_decode_equals_padded_rows(backend, emu_if):
    """Equal-length sequences: the packed result is the padded result, row for row, and a missing
    max_seqlen_q (0) only changes the tiling."""
    emu = emu_if(backend)
    B, Hq, Hkv, Tq, D = 3, 4, 2, 3, 32
    kc, vc, lens, bt = make_kv_cache([9, 14, 3], Hkv, D, D, 16, torch.float32, paged=True)
    q = torch.randn(B, Hq, Tq, D)
    kw = dict(scale=0.2, wl=-1, splits=2, mods=(0.0, None, None))
    pad_out, pad_lse = decode_call(backend, emu, q, kc, vc, lens, bt, **kw)
    q_tok = q.transpose(1, 2).reshape(B * Tq, Hq, D)
    for max_q in (Tq, 0):
        out, lse = decode_call(
            backend, emu, packed_view(q_tok), kc, vc, lens, bt, cu=cu_of([Tq] * B), max_q=max_q, **kw
        )
        torch.testing.assert_close(out[0].transpose(0, 1), pad_out.transpose(1, 2).reshape(B * Tq, Hq, D))
        torch.testing.assert_close(lse[0], pad_lse.transpose(0, 1).reshape(Hq, B * Tq))


@pytest.mark.parametrize("backend", _backend_params())
def test_packed_decode_bad_offsets_stay_in_bounds(backend, emu_if):
    """Unchecked offsets (decreasing, past the total): the kernels only touch rows inside the
    tensors, rows in no clamped span hold 0 / -inf, and nothing crashes."""
    emu = emu_if(backend)
    Hq, Hkv, D = 2, 1, 16
    kc, vc, lens, bt = make_kv_cache([7, 5, 9], Hkv, D, D, 12, torch.float32, paged=True)
    total = 6
    q_tok = torch.randn(total, Hq, D)
    mods = make_mods(3, Hq, "all")
    # spans clamped: [2, 2), [1, 3), [3, 3): rows 0, 3, 4, 5 are in no sequence
    for cu_vals, uncovered in (([2, 1, 3, 3], [0, 3, 4, 5]), ([0, 9, 4, 100], []), ([-5, 3, 2, 1], [3, 4, 5])):
        cu = torch.tensor(cu_vals, dtype=torch.int32)
        for splits in (1, 3):
            out, lse = decode_call(
                backend, emu, packed_view(q_tok), kc, vc, lens, bt, cu=cu, scale=0.25, wl=-1, splits=splits, mods=mods
            )
            assert out.shape == (1, Hq, total, D) and lse.shape == (1, Hq, total)
            if uncovered:
                assert torch.all(out[0][:, uncovered] == 0)
                assert torch.all(lse[0][:, uncovered] == float("-inf"))


# --------------------------------------------------------------------------------------------
# Append
# --------------------------------------------------------------------------------------------


def _append_inputs(counts, paged, dtype=torch.float16, Hkv=2, D=24, Dv=16, S=40):
    B = len(counts)
    lens = [3 + 5 * b for b in range(B)]
    kc, vc, lens_t, bt = make_kv_cache([S] * B, Hkv, D, Dv, S, dtype, paged=paged)
    total = sum(counts)
    k_tok = torch.randn(total, Hkv, D, dtype=dtype)
    v_tok = torch.randn(total, Hkv, Dv, dtype=dtype)
    return kc, vc, torch.tensor(lens, dtype=torch.int32), bt, k_tok, v_tok


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged"])
def test_packed_append_equals_padded_append(backend, paged, emu_if):
    emu = emu_if(backend)
    counts = (2, 0, 19, 1, 0)
    kc, vc, lens, bt, k_tok, v_tok = _append_inputs(counts, paged)
    # A token past the capacity of a sequence is skipped (as the padded kernel does).
    lens[3] = kc.shape[2] * (1 if bt is None else bt.shape[1]) - 0
    kp, vp = kc.clone(), vc.clone()
    append_call(backend, emu, kp, vp, packed_view(k_tok), packed_view(v_tok), lens, bt, cu_of(counts))
    kq, vq = kc.clone(), vc.clone()
    start = 0
    for b, n in enumerate(counts):
        if n:
            kn = k_tok[start : start + n].transpose(0, 1).unsqueeze(0)
            vn = v_tok[start : start + n].transpose(0, 1).unsqueeze(0)
            if bt is None:
                append_call(backend, emu, kq[b : b + 1], vq[b : b + 1], kn, vn, lens[b : b + 1], None)
            else:
                append_call(backend, emu, kq, vq, kn, vn, lens[b : b + 1], bt[b : b + 1])
        start += n
    assert torch.equal(kp.view(torch.int16), kq.view(torch.int16))
    assert torch.equal(vp.view(torch.int16), vq.view(torch.int16))
    assert not torch.equal(kp.view(torch.int16), kc.view(torch.int16))


def _allowed_slots(kc, lens, bt, cu, total):
    """Boolean (outer, slot) mask of every cache slot a clamped span can address."""
    allowed = torch.zeros(kc.shape[0], kc.shape[2], dtype=torch.bool)
    bs = kc.shape[2]
    for b in range(lens.numel()):
        q0 = min(max(int(cu[b]), 0), total)
        q1 = min(max(int(cu[b + 1]), q0), total)
        for t in range(q1 - q0):
            p = int(lens[b]) + t
            if bt is None:
                if 0 <= p < bs:
                    allowed[b, p] = True
            elif 0 <= p < bt.shape[1] * bs:
                blk = int(bt[b, p // bs])
                if 0 <= blk < kc.shape[0]:
                    allowed[blk, p % bs] = True
    return allowed


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged"])
def test_packed_append_bad_offsets_stay_in_bounds(backend, paged, emu_if):
    """Unchecked cu_seqlens (decreasing, past the total, negative) and positions past the cache:
    nothing outside the slots of the clamped spans changes, and the caches are views into larger
    buffers whose guard regions stay intact."""
    emu = emu_if(backend)
    Hkv, D, Dv, B = 2, 8, 8, 3
    total = 10
    for cu_vals in ([0, 7, 3, 100], [4, 2, 12, 1], [-3, 0, 5, 5]):
        cu = torch.tensor(cu_vals, dtype=torch.int32)
        if paged:
            big_k = torch.zeros(9 + 2, Hkv, 4, D, dtype=torch.float32)
            big_v = torch.zeros(9 + 2, Hkv, 4, Dv, dtype=torch.float32)
            bt = torch.tensor([[0, 5, -1], [2, 8, 1], [3, 99, 4]], dtype=torch.int32)
        else:
            big_k = torch.zeros(B + 2, Hkv, 6, D, dtype=torch.float32)
            big_v = torch.zeros(B + 2, Hkv, 6, Dv, dtype=torch.float32)
            bt = None
        kc, vc = big_k[1:-1], big_v[1:-1]
        lens = torch.tensor([2, 3, 1], dtype=torch.int32)
        k_tok = torch.rand(total, Hkv, D) + 1
        v_tok = torch.rand(total, Hkv, Dv) + 1
        append_call(backend, emu, kc, vc, packed_view(k_tok), packed_view(v_tok), lens, bt, cu)
        assert torch.all(big_k[0] == 0) and torch.all(big_k[-1] == 0)
        assert torch.all(big_v[0] == 0) and torch.all(big_v[-1] == 0)
        allowed = _allowed_slots(kc, lens, bt, cu, total)
        outside = ~allowed[:, None, :].expand(-1, Hkv, -1)
        assert torch.all(kc[outside] == 0) and torch.all(vc[outside] == 0)


def _sanitized_packed_case(emu):
    """Packed append and decode with valid and unchecked offsets: every access stays inside the
    tensors (AddressSanitizer) and the threads of a CTA do not race (ThreadSanitizer)."""
    torch.manual_seed(0)
    total = 7
    for paged, splits in ((False, 1), (True, 3)):
        for cu_vals in ([0, 2, 2, 7], [-2, 9, 4, 100]):  # valid; negative, past total, decreasing
            kc, vc, lens, bt = make_kv_cache([9, 4, 12], 2, 40, 24, 16, torch.bfloat16, paged=paged, block_size=4)
            cu = torch.tensor(cu_vals, dtype=torch.int32)
            q_tok = torch.randn(total, 4, 40, dtype=torch.bfloat16)
            emu.decode_attention(packed_view(q_tok), kc, vc, lens, bt, 0.2, -1, 0, splits, None, None, 0.0, cu, 0)
            k_tok = torch.randn(total, 2, 40, dtype=torch.bfloat16)
            v_tok = torch.randn(total, 2, 24, dtype=torch.bfloat16)
            emu.kv_cache_append(kc, vc, packed_view(k_tok), packed_view(v_tok), lens, bt, cu)


@pytest.mark.emulation
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_packed_kernels_sanitized(sanitizer):
    from emulation import run_sanitized

    run_sanitized(sanitizer, "kv_cache", SOURCES, _sanitized_packed_case).assert_clean()


# --------------------------------------------------------------------------------------------
# On a GPU
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[_case_id(c) for c in DECODE_CASES])
def test_packed_decode_gpu(backend, case):
    counts, q_tok, kc, vc, lens, bt, mods, kw = _decode_case(case, device="cuda")
    cu = cu_of(counts, device="cuda")
    softcap, slopes, sinks = mods
    args = (packed_view(q_tok), kc, vc, lens, bt, kw["scale"], kw["wl"], 0, kw["splits"], slopes, sinks, softcap)
    if backend == "cuda":
        out, lse = torch.ops.seqkernels.decode_attention(*args, cu, max(counts))
    else:
        out, lse = _tk().decode_attention(*args, cu_seqlens_q=cu, max_seqlen_q=max(counts))
    ref = reference_packed(
        q_tok, kc, vc, lens, bt, counts, scale=kw["scale"], wl=kw["wl"], mods=mods, dtype=torch.float64
    )
    base = reference_packed(
        q_tok, kc, vc, lens, bt, counts, scale=kw["scale"], wl=kw["wl"], mods=mods, dtype=q_tok.dtype
    )
    report = testing.compare((out.cpu(), lse.cpu()), ref, base)
    assert report.passed, str(report)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged"])
def test_packed_append_gpu(backend, paged):
    counts = (2, 0, 19, 1)
    kc, vc, lens, bt, k_tok, v_tok = _append_inputs(counts, paged)
    kc, vc, lens, k_tok, v_tok = (t.cuda() for t in (kc, vc, lens, k_tok, v_tok))
    bt = None if bt is None else bt.cuda()
    kp, vp = kc.clone(), vc.clone()
    append_call(backend, None, kp, vp, packed_view(k_tok), packed_view(v_tok), lens, bt, cu_of(counts, "cuda"))
    kq, vq = kc.cpu(), vc.cpu()
    start = 0
    for b, n in enumerate(counts):
        kn = k_tok[start : start + n].cpu().transpose(0, 1).unsqueeze(0)
        vn = v_tok[start : start + n].cpu().transpose(0, 1).unsqueeze(0)
        if bt is None:
            reference.kv_cache_append_ref(kq[b : b + 1], vq[b : b + 1], kn, vn, lens[b : b + 1].cpu())
        else:
            reference.kv_cache_append_ref(kq, vq, kn, vn, lens[b : b + 1].cpu(), bt[b : b + 1].cpu())
        start += n
    assert torch.equal(kp.cpu().view(torch.int16), kq.view(torch.int16))
    assert torch.equal(vp.cpu().view(torch.int16), vq.view(torch.int16))

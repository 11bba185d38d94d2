"""NaN and Inf planted in every position a kernel must not read, on every backend, forward and backward.

- Keys past `kv_lengths[b]`, with the lengths at each backend's own key tiles (t - 1, t, t + 1,
  2t - 1, 2t + 1 and one spanning three tiles), all in one batch: the CPU panel (16 keys for float32)
  and its 64-key backward blocks, the Triton interpreter configuration's key blocks, the CUDA
  kernels' 64-key tiles through the CUDA-on-CPU harness.
- Tail lanes: q, k, v and the output gradient as views of a wider buffer whose unused columns hold
  NaN (row stride > head dim), so a kernel that reads a vector past the head dim picks up NaN.
- Decode against caches whose rows are such views; append into them, which must leave the unused
  columns untouched (bitwise).

The answers are compared with the float64 reference on clean inputs (zeros in the planted places)
by the parity rule; key gradients past a sequence's length must be exactly zero.
"""

import math

import pytest
import torch

import seqkernels
from seqkernels import reference
from seqkernels.ops import kv_cache as kv_ops
from seqkernels.testing import compare

ATT_SOURCES = ["csrc/cuda/attention.cu"]
KV_SOURCES = ["csrc/cuda/kv_cache.cu"]


@pytest.fixture(scope="module")
def emu_attention():
    from emulation import load_emulated

    return load_emulated("attention", ATT_SOURCES)


@pytest.fixture(scope="module")
def emu_kv():
    from emulation import load_emulated

    return load_emulated("kv_cache", KV_SOURCES)


def _key_tiles(backend):
    """The key-tile widths the backend's kernels step by."""
    if backend.startswith("cpu"):
        return (16, 64)  # the float32 key panel (2 x 8 lanes); the backward's 64-key blocks
    if backend == "triton":
        from seqkernels.triton_kernels import attention as tk

        return tuple(sorted({c[1] for c in tk._INTERPRET_CONFIGS.values()} | {tk._INTERPRET_CONFIGS["dkdv"][0]}))
    return (64,)  # CUDA: FwdConfig / BwdConfig / DqConfig key tiles at head-dim tile 64


def _lengths(tiles):
    out = {1}
    for t in tiles:
        out |= {t - 1, t, t + 1, 2 * t - 1, 2 * t + 1}
    out.add(3 * max(tiles) + 2)
    return sorted(out)


# backend -> (dtype, head dim)
ATT_BACKENDS = {
    "cpu": (torch.float32, 8),
    "cpu_portable": (torch.float32, 8),
    "triton": (torch.float32, 16),
    "cuda_emu": (torch.float16, 64),
}


def _set_backend_env(backend, monkeypatch):
    if backend == "cpu_portable":
        monkeypatch.setenv("SEQKERNELS_CPU_ISA", "portable")
    else:
        monkeypatch.delenv("SEQKERNELS_CPU_ISA", raising=False)


def _attention(backend, request, q, k, v, go, lengths, causal):
    """(out, lse, dq, dk, dv) of `backend`."""
    if backend == "cuda_emu":
        emu = request.getfixturevalue("emu_attention")
        args = (None, lengths, q.shape[-1] ** -0.5, -1, 0 if causal else -1, True, 0.0, 0, 0)
        out, lse = emu.attention_fwd(q, k, v, *args)
        dq, dk, dv, _ = emu.attention_bwd(go, q, k, v, out, lse, *args, False)
        return out, lse, dq, dk, dv
    name = "cpu" if backend.startswith("cpu") else backend
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = seqkernels.attention(qq, kk, vv, kv_lengths=lengths, causal=causal, return_lse=True, backend=name)
    out.backward(go)
    return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", list(ATT_BACKENDS))
def test_keys_past_lengths_at_tile_residues(backend, causal, request, monkeypatch):
    _set_backend_env(backend, monkeypatch)
    dtype, D = ATT_BACKENDS[backend]
    lens = _lengths(_key_tiles(backend))
    B, H, Lq, Lk = len(lens), 1, 9, max(lens) + 3
    q = torch.randn(B, H, Lq, D).to(dtype)
    k = torch.randn(B, H, Lk, D).to(dtype)
    v = torch.randn(B, H, Lk, D).to(dtype)
    go = torch.randn(B, H, Lq, D).to(dtype)
    clean_k, clean_v = k.clone(), v.clone()
    for b, n in enumerate(lens):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("inf")
        clean_k[b, :, n:], clean_v[b, :, n:] = 0, 0
    lengths = torch.tensor(lens, dtype=torch.int32)
    out, lse, dq, dk, dv = _attention(backend, request, q, k, v, go, lengths, causal)

    kw = dict(kv_lengths=lengths, window_left=-1, window_right=0 if causal else -1, bottom_right=True, scale=D**-0.5)
    ref = reference.attention_ref(q.double(), clean_k.double(), clean_v.double(), **kw)
    base = reference.attention_ref(q, clean_k, clean_v, **kw)
    report = compare((out, lse), ref, base)
    assert report.passed, str(report)
    ref_g = reference.attention_bwd_ref(go.double(), q.double(), clean_k.double(), clean_v.double(), **kw)
    base_g = reference.attention_bwd_ref(go, q, clean_k, clean_v, **kw)
    report = compare((dq, dk, dv), ref_g, base_g, grad=True)
    assert report.passed, str(report)
    for b, n in enumerate(lens):
        assert torch.all(dk[b, :, n:] == 0) and torch.all(dv[b, :, n:] == 0), f"sequence {b} (length {n})"
    assert torch.isfinite(dq).all()


def _gapped(x, pad=5):
    """`x` as a view of a wider buffer whose extra columns (the tail lanes) hold NaN."""
    wide = torch.full((*x.shape[:-1], x.shape[-1] + pad), float("nan"), dtype=x.dtype)
    wide[..., : x.shape[-1]] = x
    return wide[..., : x.shape[-1]], wide


@pytest.mark.parametrize("backend", list(ATT_BACKENDS))
def test_tail_lanes_of_strided_rows(backend, request, monkeypatch):
    # Head dims that end inside a vector (odd D, Dv) and row strides with NaN past them.
    _set_backend_env(backend, monkeypatch)
    dtype, D = ATT_BACKENDS[backend]
    D, Dv = D + 3, D - 3
    B, Hq, Hkv, Lq, Lk = 2, 2, 1, 11, 37
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    k = torch.randn(B, Hkv, Lk, D).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv).to(dtype)
    go = torch.randn(B, Hq, Lq, Dv).to(dtype)
    views = [_gapped(t)[0] for t in (q, k, v, go)]
    lengths = torch.tensor([Lk, 20], dtype=torch.int32)
    got = _attention(backend, request, *views, lengths, causal=True)
    want = _attention(backend, request, q, k, v, go, lengths, causal=True)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() or torch.equal(torch.isnan(g), torch.isnan(w))
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _decode(backend, request, q, kc, vc, lens):
    if backend == "cuda_emu":
        c = kv_ops.prepare_decode(q, kc, vc, lens, num_splits=3)
        return request.getfixturevalue("emu_kv").decode_attention(*c.args())
    return seqkernels.decode_attention(q, kc, vc, lens, num_splits=3, return_lse=True, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "cpu_portable", "triton", "cuda_emu"])
def test_decode_cache_rows_with_nan_tail_lanes(backend, request, monkeypatch):
    _set_backend_env(backend, monkeypatch)
    name = "cpu" if backend.startswith("cpu") else backend
    B, Hq, Hkv, Tq, D, Dv, S = 3, 4, 2, 2, 19, 13, 70
    q = torch.randn(B, Hq, Tq, D)
    kc, vc = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, Dv)
    lens = torch.tensor([S, 33, Tq], dtype=torch.int32)
    for b, n in enumerate(lens.tolist()):
        kc[b, :, n:], vc[b, :, n:] = float("nan"), float("nan")  # past the length too
    kv, _ = _gapped(kc)
    vv, _ = _gapped(vc)
    got = _decode(name, request, q, kv, vv, lens)
    want = _decode(name, request, q, kc, vc, lens)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ref = reference.decode_attention_ref(q.double(), torch.nan_to_num(kc.double()), torch.nan_to_num(vc.double()), lens)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda_emu"])
def test_append_leaves_tail_lanes_and_other_slots_untouched(backend, paged, request):
    B, H, T, D, Dv, S, bs = 3, 2, 5, 19, 13, 24, 8
    if paged:
        nblk = B * (S // bs) + 2
        kc, vc = torch.randn(nblk, H, bs, D), torch.randn(nblk, H, bs, Dv)
        table = torch.randperm(nblk)[: B * (S // bs)].view(B, S // bs).to(torch.int32)
    else:
        kc, vc, table = torch.randn(B, H, S, D), torch.randn(B, H, S, Dv), None
    kv, kwide = _gapped(kc)
    vv, vwide = _gapped(vc)
    kn, vn = torch.randn(B, H, T, D), torch.randn(B, H, T, Dv)
    lens = torch.tensor([0, 7, S - T], dtype=torch.int32)
    before_k, before_v = kwide.clone(), vwide.clone()
    if backend == "cuda_emu":
        c = kv_ops.prepare_append(kv, vv, kn, vn, lens, block_table=table)
        request.getfixturevalue("emu_kv").kv_cache_append(*c.args())
    else:
        seqkernels.kv_cache_append(kv, vv, kn, vn, lens, block_table=table, backend=backend)
    # The unused columns are bitwise what they were (NaN), and so is every slot not appended to.
    for wide, before, new, Dw in ((kwide, before_k, kn, D), (vwide, before_v, vn, Dv)):
        assert torch.isnan(wide[..., Dw:]).all()
        want = before.clone()
        for b in range(B):
            for t in range(T):
                p = int(lens[b]) + t
                if table is None:
                    want[b, :, p, :Dw] = new[b, :, t]
                else:
                    want[int(table[b, p // bs]), :, p % bs, :Dw] = new[b, :, t]
        assert torch.equal(wide[..., :Dw], want[..., :Dw])
    assert math.isnan(float(kwide[0, 0, 0, -1]))

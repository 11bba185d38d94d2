"""The reference backend against torch (where the semantics overlap) and against hand-built
cases (where they do not): visibility rule, lse, fully masked rows, dropout's Philox mask, KV
cache append / decode, LSTM cell."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from seqkernels.reference import (
    attention_bwd_ref,
    attention_ref,
    decode_attention_ref,
    dropout_keep_mask_ref,
    dropout_threshold_ref,
    kv_cache_append_ref,
    lstm_cell_bwd_ref,
    lstm_cell_fwd_ref,
    lstm_cell_ref,
    philox_keep_word_ref,
    sdpa_ref,
)

F64 = torch.float64
M32 = 0xFFFFFFFF


def rand(*shape, gen, dtype=F64, requires_grad=False):
    t = torch.randn(*shape, generator=gen, dtype=F64).to(dtype)
    return t.requires_grad_(requires_grad)


def philox_py(seed: int, offset: int, n: int) -> int:
    """Philox4x32-10 with Python ints, written from docs/INTERNALS.md independently of the
    tensor version."""
    k0, k1 = seed & M32, (seed >> 32) & M32
    c0, c1, c2, c3 = n & M32, (n >> 32) & M32, offset & M32, (offset >> 32) & M32
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c0


def assert_grads_equal(outs, ins, ref_outs, ref_ins, cot, atol=1e-10):
    g = torch.autograd.grad(outs, ins, cot)
    gr = torch.autograd.grad(ref_outs, ref_ins, cot)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=atol)
    return g


def torch_sdpa(*args, **kwargs):
    """torch's SDPA through its math backend, the definition of its semantics. (torch 2.14's CPU
    flash path misreads a float32 mask given with float64 q/k/v once L >= 16.)"""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def clones(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


# ------------------------------------------------------------------------------------------------
# Philox and the keep mask
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed,offset", [(0, 0), (1, 0), (0x1234_5678_9ABC_DEF0, 7), (2**64 - 1, 2**64 - 1), (987654321, 2**33 + 5)]
)
def test_philox_word_matches_python(seed, offset):
    gen = torch.Generator().manual_seed(seed % 1000)
    ns = torch.cat(
        [
            torch.tensor([0, 1, 2, 3, M32 - 1, M32, M32 + 1, 2**40 + 7, 2**62 + 3, 2**63 - 1]),
            torch.randint(0, 2**62, (40,), generator=gen),
        ]
    )
    words = philox_keep_word_ref(seed, offset, ns)
    assert words.dtype == torch.int64
    assert words.tolist() == [philox_py(seed, offset, int(n)) for n in ns]
    assert int(words.min()) >= 0 and int(words.max()) <= M32


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.1, 0.5, 0.999, 1.0, 1.5])
def test_dropout_threshold(p):
    expected = 0 if p <= 0 else (2**32 if p >= 1 else math.floor(p * 2**32))
    assert dropout_threshold_ref(p) == expected


@pytest.mark.parametrize("seed,offset,p", [(3, 0, 0.3), (2**40 + 11, 5, 0.77)])
def test_dropout_mask_matches_python(seed, offset, p):
    B, H, Lq, Lk = 2, 3, 5, 7
    keep = dropout_keep_mask_ref(seed, offset, B, H, Lq, Lk, p)
    assert keep.shape == (B, H, Lq, Lk) and keep.dtype == torch.bool
    thr = math.floor(p * 2**32)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    n = ((b * H + h) * Lq + i) * Lk + j
                    assert bool(keep[b, h, i, j]) == (philox_py(seed, offset, n) >= thr)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction_and_determinism(p):
    shape = (1, 2, 64, 129)
    keep = dropout_keep_mask_ref(42, 0, *shape, p)
    n = keep.numel()
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(keep, dropout_keep_mask_ref(42, 0, *shape, p))
    assert not torch.equal(keep, dropout_keep_mask_ref(43, 0, *shape, p))
    assert not torch.equal(keep, dropout_keep_mask_ref(42, 1, *shape, p))


def test_dropout_mask_extremes():
    assert dropout_keep_mask_ref(1, 2, 2, 2, 3, 5, 0.0).all()
    assert not dropout_keep_mask_ref(1, 2, 2, 2, 3, 5, 1.0).any()


# ------------------------------------------------------------------------------------------------
# attention vs torch SDPA (float64)
# ------------------------------------------------------------------------------------------------

SHAPES = [  # B, Hq, Hkv, Lq, Lk, D, Dv
    (1, 1, 1, 1, 1, 16, 16),
    (2, 3, 3, 17, 17, 40, 40),
    (1, 4, 2, 17, 97, 16, 24),
    (2, 2, 1, 97, 17, 16, 16),
    (1, 2, 2, 1, 257, 80, 40),
]


def _qkv(B, Hq, Hkv, Lq, Lk, D, Dv, gen, dtype=F64):
    q = rand(B, Hq, Lq, D, gen=gen, dtype=dtype, requires_grad=True)
    k = rand(B, Hkv, Lk, D, gen=gen, dtype=dtype, requires_grad=True)
    v = rand(B, Hkv, Lk, Dv, gen=gen, dtype=dtype, requires_grad=True)
    return q, k, v


def _mask(kind, B, Hq, Lq, Lk, gen):
    if kind is None:
        return None
    if kind == "bool_b1":
        m = torch.rand(B, 1, Lq, Lk, generator=gen) > 0.3
    elif kind == "bool_2d":
        m = torch.rand(Lq, Lk, generator=gen) > 0.5
    elif kind == "float_h":
        m = torch.randn(1, Hq, Lq, Lk, generator=gen, dtype=F64)
    elif kind == "float_ninf":
        m = torch.randn(B, 1, 1, Lk, generator=gen, dtype=F64)
        m[..., ::3] = -math.inf
    elif kind == "float32_2d":
        m = torch.randn(Lq, Lk, generator=gen, dtype=torch.float32)
    return m


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", [None, "bool_b1", "bool_2d", "float_h", "float_ninf", "float32_2d"])
def test_attention_matches_torch_sdpa(shape, mask):
    B, Hq, Hkv, Lq, Lk, _, Dv = shape
    gen = torch.Generator().manual_seed(hash((shape, mask)) % 2**31)
    q, k, v = _qkv(*shape, gen)
    m = _mask(mask, B, Hq, Lq, Lk, gen)
    scale = 0.37
    out, lse = attention_ref(q, k, v, attn_mask=m, scale=scale)
    q2, k2, v2 = clones(q, k, v)
    expected = torch_sdpa(q2, k2, v2, attn_mask=m, scale=scale, enable_gqa=Hq != Hkv)
    assert out.shape == (B, Hq, Lq, Dv) and out.dtype == F64
    assert lse.shape == (B, Hq, Lq) and lse.dtype == F64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    cot = rand(*out.shape, gen=gen)
    assert_grads_equal(out, (q, k, v), expected, (q2, k2, v2), cot)


@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_top_left_causal_matches_torch(shape):
    Hq, Hkv = shape[1], shape[2]
    gen = torch.Generator().manual_seed(11)
    q, k, v = _qkv(*shape, gen)
    out, _ = attention_ref(q, k, v, window_right=0, bottom_right=False)
    q2, k2, v2 = clones(q, k, v)
    expected = torch_sdpa(q2, k2, v2, is_causal=True, enable_gqa=Hq != Hkv)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    cot = rand(*out.shape, gen=gen)
    assert_grads_equal(out, (q, k, v), expected, (q2, k2, v2), cot)


@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_fully_masked_rows_match_torch_and_have_zero_grads(shape):
    B, Hq, Hkv, Lq, Lk = shape[:5]
    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(*shape, gen)
    m = torch.rand(B, Hq, Lq, Lk, generator=gen) > 0.4
    dead_rows = torch.zeros(B, Hq, Lq, dtype=torch.bool)
    dead_rows[:, :, ::3] = True
    m[dead_rows] = False
    out, lse = attention_ref(q, k, v, attn_mask=m)
    q2, k2, v2 = clones(q, k, v)
    expected = torch_sdpa(q2, k2, v2, attn_mask=m, enable_gqa=Hq != Hkv)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert (out[dead_rows] == 0).all()
    assert torch.isneginf(lse[dead_rows]).all() and torch.isfinite(lse[~dead_rows]).all()
    cot = rand(*out.shape, gen=gen)
    dq, dk, dv = assert_grads_equal(out, (q, k, v), expected, (q2, k2, v2), cot)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (dq[dead_rows] == 0).all()


def test_everything_masked_gives_zero_grads_not_nan():
    gen = torch.Generator().manual_seed(2)
    q, k, v = _qkv(2, 2, 1, 5, 7, 16, 8, gen)
    out, lse = attention_ref(q, k, v, kv_lengths=torch.tensor([0, 0], dtype=torch.int32))
    assert (out == 0).all() and torch.isneginf(lse).all()
    loss = (out * rand(*out.shape, gen=gen)).sum() + lse.masked_fill(lse.isinf(), 0).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    assert all((g == 0).all() for g in grads)
    # Lk == 0: nothing to attend to at all.
    q, k, v = _qkv(1, 2, 2, 3, 0, 8, 8, gen)
    out, lse = attention_ref(q, k, v)
    assert out.shape == (1, 2, 3, 8) and (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = attention_bwd_ref(torch.ones_like(out), q, k, v)
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


# ------------------------------------------------------------------------------------------------
# the visibility rule against hand-built cases
# ------------------------------------------------------------------------------------------------


def hand_visible(b, i, j, Lq, Lk, kv_lengths, wl, wr, bottom_right):
    lk_b = Lk if kv_lengths is None else kv_lengths[b]
    off = lk_b - Lq if bottom_right else 0
    if j >= lk_b:
        return False
    if wl >= 0 and j < i + off - wl:
        return False
    return not (wr >= 0 and j > i + off + wr)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (2, 0), (1, 1), (0, -1), (3, 2), (0, 0)])
@pytest.mark.parametrize("bottom_right", [True, False])
@pytest.mark.parametrize("kv_lengths", [None, [7, 3], [0, 5]])
@pytest.mark.parametrize("Lq", [1, 5, 9])
def test_visibility_rule_by_hand(window, bottom_right, kv_lengths, Lq):
    B, Hq, Hkv, Lk, D, Dv = 2, 2, 1, 7, 4, 3
    wl, wr = window
    gen = torch.Generator().manual_seed(Lq * 31 + wl * 7 + wr)
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, Dv, gen)
    extra = torch.rand(Lq, Lk, generator=gen) > 0.2  # a bool mask combined with the rule
    lens = None if kv_lengths is None else torch.tensor(kv_lengths, dtype=torch.int32)
    scale = 0.61
    out, lse = attention_ref(
        q,
        k,
        v,
        attn_mask=extra,
        kv_lengths=lens,
        scale=scale,
        window_left=wl,
        window_right=wr,
        bottom_right=bottom_right,
    )
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    for b in range(B):
        for h in range(Hq):
            for i in range(Lq):
                js = [
                    j
                    for j in range(Lk)
                    if hand_visible(b, i, j, Lq, Lk, kv_lengths, wl, wr, bottom_right) and extra[i, j]
                ]
                if not js:
                    assert (out[b, h, i] == 0).all() and lse[b, h, i] == -math.inf
                    continue
                s = torch.stack([(qd[b, h, i] * kd[b, h // 2, j]).sum() * scale for j in js])
                w = torch.softmax(s, 0)
                o = sum(w[n] * vd[b, h // 2, j] for n, j in enumerate(js))
                torch.testing.assert_close(out[b, h, i], o, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(lse[b, h, i], torch.logsumexp(s, 0), rtol=1e-12, atol=1e-12)


def test_bottom_right_causal_draws_the_documented_picture():
    # Lq=3, Lk=5 causal, bottom-right: row i sees j <= i + 2 (module docstring).
    q = torch.randn(1, 1, 3, 4, dtype=F64)
    k = torch.randn(1, 1, 5, 4, dtype=F64)
    v = torch.eye(5, dtype=F64).view(1, 1, 5, 5)  # out row = attention weights
    w, _ = attention_ref(q, k, v, window_right=0)
    seen = (w[0, 0] > 0).int().tolist()
    assert seen == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    w, _ = attention_ref(q, k, v, window_right=0, bottom_right=False)
    assert (w[0, 0] > 0).int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]


@pytest.mark.parametrize("mask", [None, "float_h", "float_ninf"])
def test_lse_is_logsumexp_of_masked_scaled_scores(mask):
    B, Hq, Lq, Lk, D = 2, 3, 17, 33, 16
    gen = torch.Generator().manual_seed(9)
    q, k, v = _qkv(B, Hq, Hq, Lq, Lk, D, 8, gen)
    m = _mask(mask, B, Hq, Lq, Lk, gen)
    _, lse = attention_ref(q, k, v, attn_mask=m, scale=0.25)
    s = (q @ k.transpose(-1, -2)) * 0.25
    if m is not None:
        s = s + m
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    gen = torch.Generator().manual_seed(4)
    q, k, v = _qkv(2, 4, 2, 17, 23, 16, 24, gen, dtype=dtype)
    out, lse = attention_ref(q, k, v, window_right=0, bottom_right=False)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), window_right=0, bottom_right=False)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)
    # Half types compute like torch's math SDPA (upcast to float32), so they are its baseline.
    q2, k2, v2 = clones(q, k, v)
    expected = torch_sdpa(q2, k2, v2, is_causal=True, enable_gqa=True)
    ours = sdpa_ref(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ours, expected)
    cot = rand(*ours.shape, gen=gen, dtype=dtype)
    grads = torch.autograd.grad(ours, (q, k, v), cot)
    expected_grads = torch.autograd.grad(expected, (q2, k2, v2), cot)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)


def test_nan_propagates_from_visible_inputs_only():
    gen = torch.Generator().manual_seed(8)
    B, H, Lq, Lk, D = 2, 2, 5, 9, 8
    q, k, v = (t.detach() for t in _qkv(B, H, H, Lq, Lk, D, D, gen))
    lens = torch.tensor([6, 9], dtype=torch.int32)
    clean, clean_lse = attention_ref(q, k, v, kv_lengths=lens)
    # NaN in a query row: that row only, as torch.
    qn = q.clone()
    qn[0, 1, 2, 3] = math.nan
    out, _ = attention_ref(qn, k, v)
    torch_out = torch_sdpa(qn, k, v)
    assert torch.equal(out.isnan(), torch_out.isnan())
    assert out[0, 1, 2].isnan().all() and out.isnan().sum() == D
    # NaN in padded keys/values (j >= kv_lengths[b]) must not leak, forward or backward.
    kn, vn = k.clone(), v.clone()
    kn[0, :, 6:] = math.nan
    vn[0, :, 6:] = math.nan
    kn, vn, qg = kn.requires_grad_(), vn.requires_grad_(), q.clone().requires_grad_()
    out, lse = attention_ref(qg, kn, vn, kv_lengths=lens)
    assert torch.equal(out, clean) and torch.equal(lse, clean_lse)
    dq, dk, dv = torch.autograd.grad(out, (qg, kn, vn), torch.ones_like(out))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    # A NaN in a visible key reaches exactly the rows that see it.
    kn = k.clone()
    kn[1, 0, 4, 0] = math.nan
    out, _ = attention_ref(q, kn, v, window_right=0)  # bottom-right: row i sees j <= i + 4
    assert out[1, 0].isnan().all() and not out[1, 1].isnan().any() and not out[0].isnan().any()


def test_dropout_output_equals_manual_computation():
    gen = torch.Generator().manual_seed(12)
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 17, 23, 16, 8
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, Dv, gen)
    p, seed, offset = 0.3, 1234567, 3
    out, lse = attention_ref(q, k, v, dropout_p=p, seed=seed, offset=offset, window_right=0)
    nodrop, lse0 = attention_ref(q, k, v, window_right=0)
    assert torch.equal(lse, lse0)  # lse is that of the undropped scores
    keep = dropout_keep_mask_ref(seed, offset, B, Hq, Lq, Lk, p)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kr.transpose(-1, -2)) / math.sqrt(D)
    causal = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    probs = torch.softmax(s.masked_fill(~causal, -math.inf), -1)
    manual = (probs * keep / (1 - p)) @ vr
    torch.testing.assert_close(out, manual, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, nodrop)
    again, _ = attention_ref(q, k, v, dropout_p=p, seed=seed, offset=offset, window_right=0)
    assert torch.equal(out, again)
    q2, k2, v2 = clones(q, k, v)
    s2 = (q2 @ k2.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(D)
    probs2 = torch.softmax(s2.masked_fill(~causal, -math.inf), -1)
    manual2 = (probs2 * keep / (1 - p)) @ v2.repeat_interleave(2, 1)
    assert_grads_equal(out, (q, k, v), manual2, (q2, k2, v2), rand(*out.shape, gen=gen))


def test_dropout_p_one_gives_zeros_and_zero_grads():
    gen = torch.Generator().manual_seed(13)
    q, k, v = _qkv(1, 2, 2, 5, 6, 8, 8, gen)
    out, lse = attention_ref(q, k, v, dropout_p=1.0, seed=1)
    assert (out == 0).all() and torch.isfinite(lse).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all((g == 0).all() for g in grads)


def test_attention_bwd_ref_matches_torch():
    gen = torch.Generator().manual_seed(14)
    q, k, v = _qkv(2, 4, 2, 17, 19, 16, 8, gen)
    m = torch.rand(2, 1, 17, 19, generator=gen) > 0.3
    go = rand(2, 4, 17, 8, gen=gen)
    dq, dk, dv = attention_bwd_ref(go, q, k, v, attn_mask=m, scale=0.3, window_right=0, bottom_right=False)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    q2, k2, v2 = clones(q, k, v)
    expected = torch_sdpa(
        q2, k2, v2, attn_mask=m & torch.ones(17, 19, dtype=torch.bool).tril(), scale=0.3, enable_gqa=True
    )
    for a, b in zip((dq, dk, dv), torch.autograd.grad(expected, (q2, k2, v2), go)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(15)
    q, k, v = _qkv(1, 2, 1, 3, 5, 4, 3, gen)
    lens = torch.tensor([4])
    m = torch.randn(3, 5, generator=gen, dtype=F64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention_ref(q, k, v, attn_mask=m, kv_lengths=lens, window_left=2, window_right=0)[0],
        (q, k, v),
    )


def test_attention_argument_errors():
    q = torch.randn(1, 3, 4, 8)
    k = v = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        attention_ref(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="head dims"):
        attention_ref(q, torch.randn(1, 3, 4, 7), torch.randn(1, 3, 4, 8))
    with pytest.raises(ValueError, match="attn_mask"):
        attention_ref(q, k, v, attn_mask=torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="kv_lengths"):
        attention_ref(q, k, v, kv_lengths=torch.ones(2, dtype=torch.int32))


# ------------------------------------------------------------------------------------------------
# sdpa_ref: torch.nn.functional.scaled_dot_product_attention semantics
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["5d_bcast", "3d", "2d", "head_bcast", "gqa", "gqa_kv_heads_differ", "causal_gqa", "mask_bcast", "float_mask_5d"],
)
def test_sdpa_ref_matches_torch(case):
    gen = torch.Generator().manual_seed(len(case))
    kw = {}
    L, S, E, Ev = 7, 11, 8, 5
    if case == "5d_bcast":
        shapes = [(2, 3, 2, L, E), (1, 3, 2, S, E), (2, 1, 2, S, Ev)]
    elif case == "3d":
        shapes = [(3, L, E), (3, S, E), (3, S, Ev)]
    elif case == "2d":
        shapes = [(L, E), (S, E), (S, Ev)]
    elif case == "head_bcast":
        shapes = [(2, 4, L, E), (2, 1, S, E), (2, 1, S, Ev)]
    elif case == "gqa":
        shapes, kw = [(2, 6, L, E), (2, 2, S, E), (2, 2, S, Ev)], {"enable_gqa": True}
    elif case == "gqa_kv_heads_differ":
        shapes, kw = [(2, 4, L, E), (2, 2, S, E), (2, 1, S, Ev)], {"enable_gqa": True}
    elif case == "causal_gqa":
        shapes, kw = [(2, 4, S, E), (2, 2, L, E), (2, 2, L, Ev)], {"enable_gqa": True, "is_causal": True}
        L, S = S, L
    elif case == "mask_bcast":
        shapes = [(2, 3, L, E), (2, 3, S, E), (2, 3, S, Ev)]
        kw = {"attn_mask": torch.rand(3, 1, S, generator=gen) > 0.3, "scale": 0.2}
    elif case == "float_mask_5d":
        shapes = [(2, 2, 3, L, E), (2, 2, 3, S, E), (2, 2, 3, S, Ev)]
        kw = {"attn_mask": torch.randn(2, 1, 1, L, S, generator=gen, dtype=F64)}
    q, k, v = (rand(*s, gen=gen, requires_grad=True) for s in shapes)
    out = sdpa_ref(q, k, v, **kw)
    q2, k2, v2 = clones(q, k, v)
    expected = torch_sdpa(q2, k2, v2, **kw)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert_grads_equal(out, (q, k, v), expected, (q2, k2, v2), rand(*out.shape, gen=gen))


def test_sdpa_ref_errors_like_torch():
    q = torch.randn(1, 2, 3, 4, dtype=F64)
    with pytest.raises(RuntimeError, match="is_causal"):
        sdpa_ref(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True)
    with pytest.raises(RuntimeError, match="same dtype"):
        sdpa_ref(q, q.float(), q)
    with pytest.raises(RuntimeError, match="divide"):
        sdpa_ref(torch.randn(1, 3, 3, 4, dtype=F64), q, q, enable_gqa=True)


def test_sdpa_ref_dropout_uses_philox():
    gen = torch.Generator().manual_seed(21)
    q, k, v = (rand(2, 2, 5, 8, gen=gen) for _ in range(3))
    out = sdpa_ref(q, k, v, dropout_p=0.4, is_causal=True, seed=99, offset=2)
    ref, _ = attention_ref(q, k, v, dropout_p=0.4, window_right=0, bottom_right=False, seed=99, offset=2)
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------


def _append_expected(k_cache, k_new, seqlens, block_table):
    exp = k_cache.clone()
    B, _, T, _ = k_new.shape
    for b in range(B):
        for t in range(T):
            p = int(seqlens[b]) + t
            if block_table is None:
                if 0 <= p < exp.shape[2]:
                    exp[b, :, p] = k_new[b, :, t]
            else:
                bs = exp.shape[2]
                if p // bs < block_table.shape[1]:
                    blk = int(block_table[b, p // bs])
                    if 0 <= blk < exp.shape[0]:
                        exp[blk, :, p % bs] = k_new[b, :, t]
    return exp


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_kv_cache_append_contiguous(T, dtype):
    gen = torch.Generator().manual_seed(T)
    B, Hkv, S, D = 3, 2, 17, 8
    k_cache, v_cache = rand(B, Hkv, S, D, gen=gen, dtype=dtype), rand(B, Hkv, S, D + 3, gen=gen, dtype=dtype)
    k_new, v_new = rand(B, Hkv, T, D, gen=gen, dtype=dtype), rand(B, Hkv, T, D + 3, gen=gen, dtype=dtype)
    seqlens = torch.tensor([0, 9, S - 2], dtype=torch.int32)  # the last one runs past S_max when T > 2
    ek, ev = _append_expected(k_cache, k_new, seqlens, None), _append_expected(v_cache, v_new, seqlens, None)
    kv_cache_append_ref(k_cache, v_cache, k_new, v_new, seqlens)
    assert torch.equal(k_cache, ek) and torch.equal(v_cache, ev)


@pytest.mark.parametrize("T", [1, 7])
def test_kv_cache_append_paged(T):
    gen = torch.Generator().manual_seed(100 + T)
    B, Hkv, bs, D, max_blocks = 3, 2, 4, 8, 3
    num_blocks = B * max_blocks + 2
    perm = torch.randperm(num_blocks, generator=gen)[: B * max_blocks]
    table = perm.view(B, max_blocks).to(torch.int32)
    table[1, 2] = -1  # unallocated block: tokens landing there are skipped
    table[2, 1] = num_blocks  # out-of-range block id: skipped
    k_cache, v_cache = rand(num_blocks, Hkv, bs, D, gen=gen), rand(num_blocks, Hkv, bs, D, gen=gen)
    k_new, v_new = rand(B, Hkv, T, D, gen=gen), rand(B, Hkv, T, D, gen=gen)
    seqlens = torch.tensor([1, 6, 10], dtype=torch.int32)  # 10 + 7 > max_blocks * bs: tail skipped
    ek = _append_expected(k_cache, k_new, seqlens, table)
    ev = _append_expected(v_cache, v_new, seqlens, table)
    kv_cache_append_ref(k_cache, v_cache, k_new, v_new, seqlens, block_table=table)
    assert torch.equal(k_cache, ek) and torch.equal(v_cache, ev)
    assert not torch.equal(k_cache, k_cache.new_zeros(k_cache.shape))


# ------------------------------------------------------------------------------------------------
# decode attention
# ------------------------------------------------------------------------------------------------


def _paged_from_contiguous(k, bs, gen, spare=2):
    B, H, S, D = k.shape
    nb = S // bs
    perm = torch.randperm(B * nb + spare, generator=gen)[: B * nb]
    table = perm.view(B, nb).to(torch.int32)
    cache = torch.full((B * nb + spare, H, bs, D), math.nan, dtype=k.dtype)
    for b in range(B):
        for j in range(nb):
            cache[table[b, j]] = k[b, :, j * bs : (j + 1) * bs]
    return cache, table


@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (4, -1)])
def test_decode_attention_matches_attention_on_valid_prefix(Tq, paged, window):
    gen = torch.Generator().manual_seed(Tq * 10 + paged)
    B, Hq, Hkv, S, D, Dv, bs = 3, 4, 2, 24, 16, 8, 8
    q = rand(B, Hq, Tq, D, gen=gen)
    k_cache, v_cache = rand(B, Hkv, S, D, gen=gen), rand(B, Hkv, S, Dv, gen=gen)
    seqlens = torch.tensor([Tq, 13, S], dtype=torch.int32)
    for b in range(B):  # poison the unused slots: they must not leak
        k_cache[b, :, seqlens[b] :] = math.nan
        v_cache[b, :, seqlens[b] :] = math.inf
    table = None
    kc, vc = k_cache, v_cache
    if paged:
        kc, table = _paged_from_contiguous(k_cache, bs, gen)
        vc = torch.full((kc.shape[0], Hkv, bs, Dv), math.nan, dtype=F64)
        for b in range(B):
            for j in range(S // bs):
                vc[table[b, j]] = v_cache[b, :, j * bs : (j + 1) * bs]
    out, lse = decode_attention_ref(
        q, kc, vc, seqlens, block_table=table, scale=0.3, window_left=window[0], window_right=window[1]
    )
    assert out.shape == (B, Hq, Tq, Dv) and torch.isfinite(out).all() and torch.isfinite(lse).all()
    for b in range(B):
        n = int(seqlens[b])
        o, l = attention_ref(
            q[b : b + 1],
            k_cache[b : b + 1, :, :n],
            v_cache[b : b + 1, :, :n],
            scale=0.3,
            window_left=window[0],
            window_right=0,
            bottom_right=True,
        )
        torch.testing.assert_close(out[b : b + 1], o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[b : b + 1], l, rtol=1e-12, atol=1e-12)


def test_decode_query_sees_up_to_its_own_position():
    # Tq = 3 newest tokens of a length-5 cache: queries sit at positions 2, 3, 4.
    q = torch.randn(1, 1, 3, 4, dtype=F64)
    k = torch.randn(1, 1, 8, 4, dtype=F64)
    v = torch.eye(8, dtype=F64).view(1, 1, 8, 8)
    w, _ = decode_attention_ref(q, k, v, torch.tensor([5], dtype=torch.int32))
    assert (w[0, 0] > 0).int().tolist() == [
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
    ]


def test_decode_rejects_bad_lengths():
    q = torch.randn(1, 1, 1, 4, dtype=F64)
    k = torch.randn(1, 1, 8, 4, dtype=F64)
    with pytest.raises(ValueError, match="cache_seqlens"):
        decode_attention_ref(q, k, k, torch.tensor([9], dtype=torch.int32))


# ------------------------------------------------------------------------------------------------
# LSTM cell
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,I,H", [(1, 5, 7), (6, 17, 13)])
def test_lstm_cell_matches_torch(bias, B, I, H):
    torch.manual_seed(B * 100 + I)
    cell = torch.nn.LSTMCell(I, H, bias=bias, dtype=F64)
    gen = torch.Generator().manual_seed(3)
    x, hx, cx = (
        rand(B, I, gen=gen, requires_grad=True),
        rand(B, H, gen=gen, requires_grad=True),
        rand(B, H, gen=gen, requires_grad=True),
    )
    hy, cy = lstm_cell_ref(x, hx, cx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    x2, hx2, cx2 = clones(x, hx, cx)
    ehy, ecy = cell(x2, (hx2, cx2))
    torch.testing.assert_close(hy, ehy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cy, ecy, rtol=1e-12, atol=1e-12)
    ghy, gcy = rand(B, H, gen=gen), rand(B, H, gen=gen)
    params = [p for p in cell.parameters()]
    g = torch.autograd.grad((hy, cy), [x, hx, cx] + params, (ghy, gcy))
    eg = torch.autograd.grad((ehy, ecy), [x2, hx2, cx2] + params, (ghy, gcy))
    for a, b in zip(g, eg):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lstm_cell_unbatched_and_default_state():
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(5, 3, dtype=F64)
    x = torch.randn(5, dtype=F64)
    hy, cy = lstm_cell_ref(x, None, None, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    ehy, ecy = cell(x)
    torch.testing.assert_close(hy, ehy)
    torch.testing.assert_close(cy, ecy)


@pytest.mark.parametrize("which", ["both", "hy", "cy", "none"])
def test_lstm_cell_fwd_bwd_pieces_match_autograd(which):
    gen = torch.Generator().manual_seed(7)
    B, H = 5, 11
    ig, hg = rand(B, 4 * H, gen=gen, requires_grad=True), rand(B, 4 * H, gen=gen, requires_grad=True)
    cx = rand(B, H, gen=gen, requires_grad=True)
    b_ih, b_hh = rand(4 * H, gen=gen), rand(4 * H, gen=gen)
    hy, cy, ws = lstm_cell_fwd_ref(ig, hg, cx, b_ih, b_hh)
    gates = ig.detach() + hg.detach() + b_ih + b_hh
    i, f, g, o = gates.chunk(4, 1)
    expected_ws = torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], 1)
    torch.testing.assert_close(ws, expected_ws, rtol=1e-14, atol=1e-14)
    ghy = rand(B, H, gen=gen) if which in ("both", "hy") else None
    gcy = rand(B, H, gen=gen) if which in ("both", "cy") else None
    grad_gates, grad_cx = lstm_cell_bwd_ref(ghy, gcy, cx.detach(), cy.detach(), ws.detach())
    assert grad_gates.shape == (B, 4 * H) and grad_cx.shape == (B, H)
    outs = [(t, gt) for t, gt in ((hy, ghy), (cy, gcy)) if gt is not None]
    if not outs:
        assert (grad_gates == 0).all() and (grad_cx == 0).all()
        return
    d_ig, d_hg, d_cx = torch.autograd.grad([t for t, _ in outs], (ig, hg, cx), [gt for _, gt in outs])
    torch.testing.assert_close(grad_gates, d_ig, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_gates, d_hg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_cx, d_cx, rtol=1e-12, atol=1e-12)

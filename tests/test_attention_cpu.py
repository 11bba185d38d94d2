"""The C++ CPU attention kernels (torch.ops.seqkernels.attention_fwd / attention_bwd, CPU key)
against the float64 reference, with the normalized arguments of docs/INTERNALS.md.

Parity rule (DESIGN §5): err(kernel) <= 2 * err(plain torch in the same dtype) + floor for out
and lse, 3x for gradients, NaN/inf positions equal; float32/float64 also assert_close.
"""

import math
import zlib

import pytest
import torch

try:
    import seqkernels._C  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    pytest.skip(f"seqkernels._C is not built: {e}", allow_module_level=True)

from seqkernels.reference import attention_bwd_ref, attention_ref, dropout_keep_mask_ref
from seqkernels.testing import compare

fwd_op = torch.ops.seqkernels.attention_fwd
bwd_op = torch.ops.seqkernels.attention_bwd

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _kw(scale, attn_mask=None, kv_lengths=None, window=(-1, -1), bottom_right=True, dropout_p=0.0,
        seed=0, offset=0):
    return dict(attn_mask=attn_mask, kv_lengths=kv_lengths, scale=scale, window_left=window[0],
                window_right=window[1], bottom_right=bottom_right, dropout_p=dropout_p, seed=seed,
                offset=offset)


def _poison_heap(*shapes):
    # Outputs are allocated by the op; freeing NaN-filled blocks of the same sizes first makes it
    # likely that the allocator hands the op that memory, so an element the kernel forgets to
    # write shows up as NaN.
    bufs = [torch.full(s, float("nan"), dtype=torch.float64) for s in shapes]
    del bufs


def sk_forward(q, k, v, kw):
    B, Hq, Lq, _ = q.shape
    _poison_heap((B, Hq, Lq, v.shape[-1]), (B, Hq, Lq))
    return fwd_op(q, k, v, kw["attn_mask"], kw["kv_lengths"], kw["scale"], kw["window_left"],
                  kw["window_right"], kw["bottom_right"], kw["dropout_p"], kw["seed"], kw["offset"])


def sk_backward(g, q, k, v, out, lse, kw, deterministic=False):
    _poison_heap(q.shape, k.shape, v.shape)
    return bwd_op(g, q, k, v, out, lse, kw["attn_mask"], kw["kv_lengths"], kw["scale"], kw["window_left"],
                  kw["window_right"], kw["bottom_right"], kw["dropout_p"], kw["seed"], kw["offset"],
                  deterministic)


def _d(t):
    return None if t is None else (t.double() if t.is_floating_point() else t)


def check_parity(q, k, v, kw, grads=True):
    """Runs the kernel on (q, k, v) in their dtype and applies the parity rule to out, lse and
    (when grads) dq, dk, dv."""
    dtype = q.dtype
    out, lse = sk_forward(q, k, v, kw)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == dtype and out.is_contiguous()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    kw64 = dict(kw, attn_mask=_d(kw["attn_mask"]))
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), **kw64)
    base_out, base_lse = attention_ref(q, k, v, **kw)
    report = compare([out, lse], [ref_out, ref_lse], [base_out, base_lse], name="fwd")
    assert report.passed, str(report)
    if not grads:
        return out, lse
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    dq, dk, dv = sk_backward(g, q, k, v, out, lse, kw)
    ref = attention_bwd_ref(g.double(), q.double(), k.double(), v.double(), **kw64)
    base = attention_bwd_ref(g, q, k, v, **kw)
    report = compare([dq, dk, dv], list(ref), list(base), grad=True, name="grad")
    assert report.passed, str(report)
    return out, lse


def rand(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


# (B, Hq, Hkv, Lq, Lk, D, Dv, window, bottom_right, kv_lengths)
CASES = {
    "plain-17": (2, 2, 2, 17, 17, 16, 16, (-1, -1), True, None),
    "gqa-causal-br": (1, 4, 2, 97, 128, 40, 64, (-1, 0), True, None),
    "mqa-causal-tl": (1, 4, 1, 128, 97, 80, 40, (-1, 0), False, None),
    "window-257": (2, 2, 2, 257, 257, 64, 64, (37, 5), True, None),
    "lengths-causal": (3, 2, 1, 33, 130, 128, 48, (-1, 0), True, [97, 0, 130]),
    "decode-1": (2, 2, 2, 1, 257, 256, 256, (-1, -1), True, None),
    "window-left-only": (1, 2, 2, 128, 257, 16, 80, (20, -1), False, [257]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_parity(case, dtype):
    torch.manual_seed(zlib.crc32(case.encode()) % 1000)
    B, Hq, Hkv, Lq, Lk, D, Dv, window, br, lens = CASES[case]
    q, k, v = rand(B, Hq, Lq, D, dtype=dtype), rand(B, Hkv, Lk, D, dtype=dtype), rand(B, Hkv, Lk, Dv, dtype=dtype)
    kv_lengths = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    kw = _kw(1.0 / math.sqrt(D), kv_lengths=kv_lengths, window=window, bottom_right=br)
    check_parity(q, k, v, kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
@pytest.mark.parametrize("kind", ["bool-keys", "bool-rows", "float-q-dtype", "float32"])
def test_masks(kind, dtype):
    torch.manual_seed(1)
    B, H, Lq, Lk, D = 2, 3, 97, 70, 40
    q, k, v = rand(B, H, Lq, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype), rand(B, H, Lk, D, dtype=dtype)
    if kind == "bool-keys":  # padding-style (B, 1, 1, Lk), one batch entirely masked out
        m = torch.rand(B, 1, 1, Lk) > 0.3
        m[1] = False
    elif kind == "bool-rows":  # (1, H, Lq, Lk) with some rows fully masked
        m = torch.rand(1, H, Lq, Lk) > 0.5
        m[0, :, ::7] = False
    else:
        mdtype = dtype if kind == "float-q-dtype" else torch.float32
        m = torch.randn(1, 1, Lq, Lk, dtype=torch.float64).to(mdtype)
        m[..., ::5, :] = -math.inf  # fully masked rows through the float mask
        m[..., 3::4] = -math.inf
    mask = m.expand(B, H, Lq, Lk)
    kw = _kw(0.3, attn_mask=mask, window=(-1, 20), bottom_right=False)
    out, lse = check_parity(q, k, v, kw)
    if kind == "bool-rows":
        assert torch.all(out[:, :, ::7] == 0) and torch.all(lse[:, :, ::7] == -math.inf)


def test_noncontiguous_inputs():
    torch.manual_seed(2)
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 97, 128, 64, 40
    q = rand(B, Lq, Hq, D, dtype=torch.float32).transpose(1, 2)  # (B, L, H, D) storage
    k = rand(B, Lk, Hkv, D, dtype=torch.float32).transpose(1, 2)
    v = rand(B, Hkv, Dv, Lk, dtype=torch.float32).transpose(2, 3)  # last dim not contiguous
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    kw = _kw(0.125, window=(-1, 0))
    out, lse = check_parity(q, k, v, kw)
    out_c, lse_c = sk_forward(q.contiguous(), k.contiguous(), v.contiguous(), kw)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("p", [0.3, 1.0])
def test_dropout_matches_reference_mask(p, dtype):
    # The reference draws the same Philox keep mask; any element that differs moves out and the
    # gradients by far more than the parity bound.
    torch.manual_seed(3)
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 33, 57, 16
    q, k, v = rand(B, Hq, Lq, D, dtype=dtype), rand(B, Hkv, Lk, D, dtype=dtype), rand(B, Hkv, Lk, D, dtype=dtype)
    kw = _kw(0.25, window=(-1, 3), dropout_p=p, seed=0x1234_5678_9ABC, offset=77)
    out, lse = check_parity(q, k, v, kw)
    if p == 1.0:
        assert torch.all(out == 0)
    else:
        # The dropout is not a no-op: different seeds give different outputs.
        other, _ = sk_forward(q, k, v, dict(kw, seed=5))
        assert not torch.allclose(out, other)


def test_dropout_keep_rate():
    keep = dropout_keep_mask_ref(7, 0, 2, 2, 64, 64, 0.25)
    assert abs(keep.double().mean().item() - 0.75) < 0.02


def test_nan_propagation():
    torch.manual_seed(4)
    B, H, Lq, Lk, D = 2, 2, 17, 40, 16
    q, k, v = rand(B, H, Lq, D, dtype=torch.float32), rand(B, H, Lk, D, dtype=torch.float32), rand(B, H, Lk, D, dtype=torch.float32)
    lens = torch.tensor([30, 40], dtype=torch.int32)
    q[0, 1, 5] = float("nan")            # one query row: that row is NaN
    k[1, 0, 12, 3] = float("nan")        # a visible key: every row seeing it is NaN
    v[0, :, 35] = float("nan")           # padding past kv_lengths[0]: must not leak
    k[0, :, 33] = float("nan")
    kw = _kw(0.25, kv_lengths=lens)
    out, lse = check_parity(q, k, v, kw)
    assert torch.isnan(out[0, 1, 5]).all() and torch.isnan(lse[0, 1, 5])
    assert torch.isnan(out[1, 0]).all()
    assert not torch.isnan(out[0, 0]).any() and not torch.isnan(out[1, 1]).any()


def test_fully_masked_rows_zero_grads():
    torch.manual_seed(5)
    B, H, Lq, Lk, D = 1, 2, 20, 16, 16
    q, k, v = rand(B, H, Lq, D, dtype=torch.float32), rand(B, H, Lk, D, dtype=torch.float32), rand(B, H, Lk, D, dtype=torch.float32)
    # Bottom-right causal with Lq > Lk: the first Lq - Lk rows see no key.
    kw = _kw(0.25, window=(-1, 0), bottom_right=True)
    out, lse = sk_forward(q, k, v, kw)
    dead = Lq - Lk
    assert torch.all(out[:, :, :dead] == 0) and torch.all(lse[:, :, :dead] == -math.inf)
    assert torch.isfinite(lse[:, :, dead:]).all()
    g = torch.randn_like(out)
    dq, dk, dv = sk_backward(g, q, k, v, out, lse, kw)
    assert torch.all(dq[:, :, :dead] == 0)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    # No key at all (Lk_b = 0 for every batch).
    kw0 = _kw(0.25, kv_lengths=torch.zeros(B, dtype=torch.int32))
    out0, lse0 = sk_forward(q, k, v, kw0)
    assert torch.all(out0 == 0) and torch.all(lse0 == -math.inf)
    grads0 = sk_backward(g, q, k, v, out0, lse0, kw0)
    assert all(torch.all(t == 0) for t in grads0)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kw):
        out, lse = sk_forward(q, k, v, kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kw = kw
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = sk_backward(g.contiguous(), q, k, v, out, lse, ctx.kw)
        return dq, dk, dv, None


@pytest.mark.parametrize("feature", ["causal-gqa", "mask-dropout"])
def test_gradcheck_float64(feature):
    torch.manual_seed(6)
    B, Hq, Hkv, Lq, Lk, D, Dv = 1, 2, 1, 5, 7, 3, 4
    if feature == "mask-dropout":
        Hkv = 2
    q, k, v = (rand(*s, dtype=torch.float64).requires_grad_() for s in
               ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)))
    if feature == "causal-gqa":
        kw = _kw(0.7, window=(-1, 0), kv_lengths=torch.tensor([6], dtype=torch.int32))
    else:
        mask = (torch.randn(1, Hq, Lq, Lk, dtype=torch.float64)).expand(B, Hq, Lq, Lk)
        kw = _kw(0.7, attn_mask=mask, dropout_p=0.2, seed=11)
    assert torch.autograd.gradcheck(lambda a, b, c: _Attention.apply(a, b, c, kw), (q, k, v))


def test_backward_deterministic_with_splits():
    # One (batch, kv head) group and two threads: the backward splits the key blocks and sums
    # the dQ partials; the result must be bitwise reproducible.
    torch.manual_seed(7)
    q, k, v = rand(1, 2, 200, 32, dtype=torch.float32), rand(1, 1, 300, 32, dtype=torch.float32), rand(1, 1, 300, 32, dtype=torch.float32)
    kw = _kw(0.2, window=(-1, 0))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, lse = sk_forward(q, k, v, kw)
        g = torch.randn_like(out)
        first = sk_backward(g, q, k, v, out, lse, kw, deterministic=True)
        for _ in range(2):
            again = sk_backward(g, q, k, v, out, lse, kw, deterministic=True)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(old)
    ref = attention_bwd_ref(g.double(), q.double(), k.double(), v.double(), **kw)
    for a, b in zip(first, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=["bfloat16", "float32", "float64"])
def test_portable_kernels(dtype, monkeypatch):
    # The at::vec path (what non-x86 machines run) on the same contract.
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", "portable")
    torch.manual_seed(8)
    q, k, v = rand(2, 4, 45, 40, dtype=dtype), rand(2, 2, 61, 40, dtype=dtype), rand(2, 2, 61, 24, dtype=dtype)
    mask = (torch.rand(2, 1, 45, 61) > 0.2).expand(2, 4, 45, 61)
    kw = _kw(0.2, attn_mask=mask, window=(10, 0), kv_lengths=torch.tensor([61, 30], dtype=torch.int32),
             dropout_p=0.1, seed=3)
    check_parity(q, k, v, kw)


def test_argument_errors():
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 3, 8, 16)
    v = torch.randn(1, 3, 8, 16)
    kw = _kw(0.25)
    with pytest.raises(RuntimeError, match="multiple of the number of kv heads"):
        sk_forward(q, k, v, kw)
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="kv_lengths must be int32"):
        sk_forward(q, k, v, dict(kw, kv_lengths=torch.tensor([3])))
    with pytest.raises(RuntimeError, match="attn_mask must be expanded"):
        sk_forward(q, k, v, dict(kw, attn_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool)))
    with pytest.raises(RuntimeError, match="k and v must have q's dtype"):
        sk_forward(q, k.double(), v, kw)
    with pytest.raises(RuntimeError, match="dropout_p"):
        sk_forward(q, k, v, dict(kw, dropout_p=1.5))
    with pytest.raises(RuntimeError, match="window_left"):
        sk_forward(q, k, v, dict(kw, window_left=-3))

"""Hostile inputs through the public API, on every backend that runs here: huge finite scores, masks
built from large constants and finfo.min, empty head/batch/length dims, int64 indices past the int32
range, double backward, autograd through the in-place cache append, argument errors that name the
argument, and torch's broadcasting in the SDPA drop-in. Each case is a regression test of a silent
wrong result once found (NaN, zeros, uninitialized memory, a truncated index); the answer is the
float64 reference's by the parity rule (docs/DESIGN.md §5) or a clear error, never a silent value.
"""

import pytest
import torch
from conftest import HAS_CUDA
from parity_rules import assert_rule
from torch.autograd import gradcheck, gradgradcheck

import seqkernels
from seqkernels import backends, reference, testing
from seqkernels.ops import attention as attn_ops
from seqkernels.ops import kv_cache as kv_ops

BACKENDS = ["reference", "cpu", "triton"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _dev(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def _skip_unless(op, backend, call):
    reason = backends.why_not(op, backend, call.device, call)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _attention_case(backend, q, k, v, *, grads=True, **kw):
    """(out, lse) and the gradients of (out, lse) on `backend`, the same in float64 on the reference,
    and plain torch in q's dtype (the reference backend run in that dtype) as the parity baseline."""
    call = attn_ops.prepare_attention(q, k, v, **{k_: v_ for k_, v_ in kw.items() if k_ != "return_lse"})
    _skip_unless(attn_ops.OP, backend, call)

    def run(b, dtype):
        xs = [t.detach().to(dtype).requires_grad_(grads) for t in (q, k, v)]
        mask = kw.get("attn_mask")
        kw2 = dict(kw)
        if mask is not None and mask.is_floating_point() and dtype == torch.float64:
            kw2["attn_mask"] = mask.double()
        out, lse = seqkernels.attention(*xs, return_lse=True, backend=b, **kw2)
        res = [out.detach(), lse.detach()]
        if grads:
            go = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
            gl = torch.linspace(0.5, -0.5, lse.numel(), dtype=torch.float64).reshape(lse.shape).to(lse.dtype)
            fin = torch.isfinite(lse)
            loss = (out * go).sum() + (lse.where(fin, 0) * gl).sum()
            res += list(torch.autograd.grad(loss, xs))
        return res

    got = run(backend, q.dtype)
    ref = run("reference", torch.float64)
    base = run("reference", q.dtype)
    return got, ref, base


def _assert_parity(got, ref, base, dtype):
    names = ["out", "lse", "dq", "dk", "dv"]
    for i, (g, r, b) in enumerate(zip(got, ref, base)):
        assert not torch.isnan(g).any() or torch.isnan(r).any(), f"{names[i]}: NaN where the reference has none"
        assert_rule(g, r, b, i >= 2, names[i], dtype)


# ---------------------------------------------------------------------------------------------
# 1. Large finite scores and masks built from large constants


def _huge_score_qkv(dtype, score, D=3, Lk=7):
    """Scores q.k * scale equal to score * c_j with c_j in {1, 1, 0.5, -1, ...}: the rows' max is a
    huge finite value, reached twice, so the answer is the mean of those two values."""
    a = score**0.5
    c = torch.tensor([1.0, 0.5, 1.0, -1.0, 0.25, -0.5, 0.75][:Lk], dtype=torch.float64)
    q = torch.full((1, 2, 3, D), a, dtype=torch.float64)
    q[:, :, 1] *= -1  # the second row's max sits at c_j = -1
    k = (a * c).view(1, 1, Lk, 1).expand(1, 2, Lk, D).contiguous()
    v = torch.randn(1, 2, Lk, 5, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), 1.0 / D


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", [1e4, 2e9, 1e20, 1e38])
def test_huge_finite_scores(backend, dtype, score):
    if score**0.5 > torch.finfo(dtype).max:
        pytest.skip(f"sqrt({score:g}) is not finite in {dtype}")
    q, k, v, scale = _huge_score_qkv(dtype, score)
    q, k, v = (t.to(_dev(backend)) for t in (q, k, v))
    got, ref, base = _attention_case(backend, q, k, v, scale=scale, grads=False)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    _assert_parity(got, ref, base, dtype)


def test_issue_reproducer_one_dim_1e5():
    q = torch.full((1, 1, 1, 1), 1e5)
    k = torch.full((1, 1, 2, 1), 1e5)
    v = torch.ones(1, 1, 2, 1)
    for b in ("cpu", "reference") + (("triton",) if _dev("triton") == "cpu" else ()):
        assert seqkernels.attention(q, k, v, backend=b).item() == pytest.approx(1.0), b


def _mask_constants(dtype):
    consts = [-1e9, -1e12, -1e30, -3e38, torch.finfo(torch.float32).min]
    return [(c, torch.float32) for c in consts] + [(torch.finfo(dtype).min, dtype)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", range(6))
def test_masks_from_large_constants(backend, dtype, which):
    """Row 0 is unmasked, row 1 masked everywhere with the constant (it sees keys with finite scores:
    torch gives the mean of v and a finite lse, not 0 / -inf), row 2 partly masked, row 3 masked
    everywhere but one key."""
    const, mdtype = _mask_constants(dtype)[which]
    dev = _dev(backend)
    B, H, Lq, Lk, D = 2, 2, 4, 21, 8
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype, device=dev) for L in (Lq, Lk, Lk))
    m = torch.zeros(B, 1, Lq, Lk, dtype=mdtype, device=dev)
    m[:, :, 1] = const
    m[:, :, 2, ::2] = const
    m[:, :, 3, :] = const
    m[:, :, 3, 5] = 0
    got, ref, base = _attention_case(backend, q, k, v, attn_mask=m)
    assert torch.isfinite(got[1]).all(), "lse must be finite: every row sees keys with finite scores"
    _assert_parity(got, ref, base, dtype)


# ---------------------------------------------------------------------------------------------
# 2. Double backward: correct second derivatives, or a clear error, never zeros


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kw", [{}, {"causal": True, "return_lse": True}, {"window": (2, 1)}])
def test_attention_gradgradcheck_float64(backend, kw):
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 5, 3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return seqkernels.attention(q, k, v, backend=backend, **kw)

    assert gradcheck(f, (q, k, v))
    assert gradgradcheck(f, (q, k, v))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_attention_second_derivative_matches_reference(backend):
    """float32 backends (Triton has no float64): d/dx of <dq, w> (a gradient penalty) equals the
    float64 reference's and is not zero."""
    dev = _dev(backend)
    dtype = torch.float32 if backend != "cuda" else torch.float16
    base = [torch.randn(1, 2, 5, 8, dtype=torch.float64, device=dev) for _ in range(3)]
    w = torch.randn(1, 2, 5, 8, dtype=torch.float64, device=dev)

    def second(b, dt):
        q, k, v = (t.to(dt).requires_grad_() for t in base)
        call = attn_ops.prepare_attention(q, k, v, causal=True)
        if b != "reference":
            _skip_unless(attn_ops.OP, b, call)
        out = seqkernels.attention(q, k, v, causal=True, backend=b)
        (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        return torch.autograd.grad((dq * w.to(dt)).sum(), (q, k, v))

    got = second(backend, dtype)
    ref = second("reference", torch.float64)
    baseline = second("reference", dtype)
    for g, r, b in zip(got, ref, baseline):
        assert r.abs().max() > 0
        rep = testing.compare(g, r, b, grad=True)
        assert rep.passed, str(rep)


def _lstm_inputs(dtype=torch.float64):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in ((2, 3), (2, 4), (2, 4), (16, 3), (16, 4))]


def test_lstm_cell_gradgradcheck_reference():
    assert gradgradcheck(lambda *a: seqkernels.lstm_cell(*a, backend="reference"), tuple(_lstm_inputs()))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_lstm_cell_double_backward_is_refused(backend):
    xs = _lstm_inputs(torch.float64 if backend == "cpu" else torch.float32)
    hy, cy = seqkernels.lstm_cell(*xs, backend=backend)
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        torch.autograd.grad((hy + cy).sum(), xs[0], create_graph=True)


# ---------------------------------------------------------------------------------------------
# 3. Empty dims: zeros, never uninitialized memory


def _poison(*shapes):
    bufs = [torch.full(s, float("nan")) for s in shapes]
    del bufs


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("shape", [(2, 0, 2, 5, 4), (0, 2, 2, 5, 4), (2, 2, 2, 0, 4), (2, 2, 2, 5, 0)])
def test_empty_dims_give_zero_gradients(backend, shape):
    """shape = (B, Hq, Hkv, Lq, Lk); with Hq = 0 or Lq = 0 nothing attends to the keys: dK = dV = 0."""
    B, Hq, Hkv, Lq, Lk = shape
    if Hq == 0:
        Hkv = 1
    dev = _dev(backend)
    q = torch.randn(B, Hq, Lq, 8, device=dev, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, 8, device=dev, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, 8, device=dev, requires_grad=True)
    _poison(k.shape, v.shape, (64, 64))
    out, lse = seqkernels.attention(q, k, v, backend=backend, return_lse=True)
    assert out.shape == (B, Hq, Lq, 8) and lse.shape == (B, Hq, Lq)
    assert (out == 0).all()
    if out.numel():
        out.sum().backward()
        dk, dv = k.grad, v.grad
    else:  # autograd skips a backward whose output is empty: call the backward op itself
        dk, dv = _kernel_bwd_zero_size(backend, q, k, v, out, lse)
    assert dk.shape == k.shape and dv.shape == v.shape
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


def _kernel_bwd_zero_size(backend, q, k, v, out, lse):
    """The backward op itself on an empty problem (autograd skips it when the output is empty)."""
    call = attn_ops.prepare_attention(q.detach(), k.detach(), v.detach())
    args = (
        torch.zeros_like(out),
        call.q,
        call.k,
        call.v,
        out.detach(),
        lse.detach(),
        None,
        None,
        call.scale,
        -1,
        -1,
        True,
        0.0,
        0,
        0,
        False,
    )
    if backend == "reference":
        _, dk, dv = reference.attention_bwd_ref(args[0], call.q, call.k, call.v, scale=call.scale)
    elif backend == "cpu":
        _, dk, dv, _ = torch.ops.seqkernels.attention_bwd(*args)
    else:
        _, dk, dv, _ = torch.ops.seqkernels.triton_attention_bwd(*args)
    return dk, dv


# ---------------------------------------------------------------------------------------------
# 4. int64 indices are validated as given, never truncated to int32 first


APPEND_BACKENDS = ["reference", "cpu", "triton"]


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
@pytest.mark.parametrize("length", [2**32 + 2, 2**31, -(2**32) + 1])
def test_append_int64_seqlens_out_of_range_is_refused(backend, length):
    kc, vc = torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4)
    kn, vn = torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4)
    with pytest.raises(ValueError, match=f"cache_seqlens|{length}"):
        seqkernels.kv_cache_append(kc, vc, kn, vn, torch.tensor([length]), backend=backend)
    assert (kc == 0).all() and (vc == 0).all()
    # Without the host check the kernels must still see an out-of-range value and skip the token.
    seqkernels.kv_cache_append(kc, vc, kn, vn, torch.tensor([length]), check=False, backend=backend)
    assert (kc == 0).all() and (vc == 0).all()


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
def test_append_int64_block_id_out_of_range_is_refused(backend):
    kc, vc = torch.zeros(5, 2, 4, 4), torch.zeros(5, 2, 4, 4)
    kn, vn = torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4)
    table = torch.tensor([[2**32 + 3, 1]])
    with pytest.raises(ValueError, match="block_table.*4294967299"):
        seqkernels.kv_cache_append(kc, vc, kn, vn, torch.tensor([0]), block_table=table, backend=backend)
    seqkernels.kv_cache_append(kc, vc, kn, vn, torch.tensor([0]), block_table=table, check=False, backend=backend)
    assert (kc == 0).all(), "block 2**32 + 3 must not be written as block 3"


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
def test_decode_int64_lengths_are_judged_as_given(backend):
    q = torch.randn(1, 2, 1, 4)
    kc, vc = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    for length in (2**32 + 3, 2**31):
        with pytest.raises(ValueError, match=f"cache_seqlens: sequence 0 has length {length}"):
            seqkernels.decode_attention(q, kc, vc, torch.tensor([length]), backend=backend)
    pk, pv = torch.randn(6, 2, 4, 4), torch.randn(6, 2, 4, 4)
    with pytest.raises(ValueError, match="block_table.*4294967301"):
        seqkernels.decode_attention(
            q, pk, pv, torch.tensor([3]), block_table=torch.tensor([[2**32 + 5]]), backend=backend
        )


def test_attention_int64_kv_lengths_are_judged_as_given():
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="kv_lengths.*4294967298"):
        seqkernels.attention(q, k, v, kv_lengths=torch.tensor([2**32 + 2]))


# ---------------------------------------------------------------------------------------------
# 5. kv_cache_append and autograd


def test_append_gradients_flow_to_new_values_not_to_overwritten_slots():
    base_k = torch.randn(2, 2, 8, 4, dtype=torch.float64, requires_grad=True)
    base_v = torch.randn(2, 2, 8, 4, dtype=torch.float64, requires_grad=True)
    kn = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    vn = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    lens = torch.tensor([1, 4])
    kc, vc = base_k * 1, base_v * 1  # non-leaf caches in the graph
    seqkernels.kv_cache_append(kc, vc, kn, vn, lens)  # automatic choice: a backend that tracks gradients
    wk, wv = torch.randn_like(kc), torch.randn_like(vc)
    ((kc * wk).sum() + (vc * wv).sum()).backward()
    for b in range(2):
        p = slice(int(lens[b]), int(lens[b]) + 3)
        assert torch.equal(kn.grad[b], wk[b, :, p]) and torch.equal(vn.grad[b], wv[b, :, p])
        assert (base_k.grad[b, :, p] == 0).all() and (base_v.grad[b, :, p] == 0).all()
        keep = torch.ones(8, dtype=torch.bool)
        keep[p] = False
        assert torch.equal(base_k.grad[b, :, keep], wk[b, :, keep])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_append_kernel_backends_refuse_inputs_that_require_grad(backend):
    kc, vc = torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4)
    kn = torch.ones(1, 2, 1, 4, requires_grad=True)
    vn = torch.ones(1, 2, 1, 4)
    with pytest.raises(backends.BackendError, match="gradients"):
        seqkernels.kv_cache_append(kc, vc, kn, vn, torch.tensor([0]), backend=backend)
    assert (kc == 0).all()
    with torch.no_grad():
        seqkernels.kv_cache_append(kc, vc, kn, vn, torch.tensor([0]), backend=backend)
    assert (kc[0, :, 0] == 1).all()


def test_append_into_a_leaf_cache_that_requires_grad_raises_like_torch():
    kc = torch.zeros(1, 2, 8, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        seqkernels.kv_cache_append(
            kc, torch.zeros(1, 2, 8, 4), torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), torch.tensor([0])
        )


# ---------------------------------------------------------------------------------------------
# 6. Every argument error names its argument


@pytest.mark.parametrize("scale", ["x", None, [1.0], True, float("nan"), torch.ones(2)])
def test_bad_scale_is_named(scale):
    q = torch.randn(1, 1, 2, 4)
    if scale is None:
        seqkernels.attention(q, q, q, scale=scale)  # None is the default 1/sqrt(D)
        return
    with pytest.raises((TypeError, ValueError), match="^scale: "):
        seqkernels.attention(q, q, q, scale=scale)
    with pytest.raises((TypeError, ValueError), match="^scale: "):
        seqkernels.decode_attention(q[:, :, :1], q, q, torch.tensor([2]), scale=scale)


def test_scale_accepts_numbers_and_scalar_tensors():
    q = torch.randn(1, 1, 2, 4)
    a = seqkernels.attention(q, q, q, scale=0.3)
    b = seqkernels.attention(q, q, q, scale=torch.tensor(0.3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [{"dropout_p": True}, {"dropout_p": "0.1"}, {"window": 3}, {"window": (1, -2)}])
def test_other_bad_arguments_are_named(bad):
    q = torch.randn(1, 1, 2, 4)
    name = next(iter(bad))
    with pytest.raises((TypeError, ValueError), match=f"^{name}: "):
        seqkernels.attention(q, q, q, **bad)


def test_zero_heads_are_refused_by_name():
    """torch's SDPA returns an empty result for zero heads; here every entry point refuses it with
    the argument named (never a ZeroDivisionError from the head-group arithmetic)."""
    q, k = torch.randn(2, 0, 4, 8), torch.randn(2, 0, 6, 8)
    with pytest.raises(ValueError, match=r"^k: expected at least one key/value head"):
        seqkernels.attention(q, k, k)
    with pytest.raises(ValueError, match=r"^k: expected at least one key/value head"):
        seqkernels.scaled_dot_product_attention(q, k, k)


# ---------------------------------------------------------------------------------------------
# Decided and documented behaviour


@pytest.mark.parametrize(
    "shapes",
    [
        ((3, 2, 5, 4), (1, 2, 6, 4)),
        ((1, 2, 5, 4), (3, 2, 6, 4)),
        ((2, 3, 2, 5, 4), (1, 3, 2, 6, 4)),
        ((4, 5, 4), (1, 6, 4)),
    ],
)
def test_sdpa_broadcasts_batch_dims_like_torch(shapes):
    qs, ks = shapes
    q = torch.randn(*qs, requires_grad=True)
    k = torch.randn(*ks, requires_grad=True)
    v = torch.randn(*ks[:-1], 3, requires_grad=True)
    out = seqkernels.scaled_dot_product_attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_module_batch_zero_matches_torch(batch_first, bidirectional):
    kw = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    ours, theirs = seqkernels.nn.LSTM(**kw), torch.nn.LSTM(**kw)
    x = torch.randn(0, 5, 3) if batch_first else torch.randn(5, 0, 3)
    o, (h, c) = ours(x)
    o2, (h2, c2) = theirs(x)
    assert o.shape == o2.shape and h.shape == h2.shape and c.shape == c2.shape
    with pytest.raises(ValueError, match="time step"):
        ours(torch.randn(5, 0, 3) if batch_first else torch.randn(0, 2, 3))


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
def test_append_refuses_aliased_blocks(backend):
    kc, vc = torch.zeros(4, 1, 2, 2), torch.zeros(4, 1, 2, 2)
    kn, vn = torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2)
    with pytest.raises(ValueError, match="block_table: sequence 0 writes into block 1"):
        seqkernels.kv_cache_append(
            kc, vc, kn, vn, torch.tensor([0, 0]), block_table=torch.tensor([[1], [1]]), backend=backend
        )
    # A block another sequence reads (sequence 1's column 0) must not be written either.
    with pytest.raises(ValueError, match="also used by"):
        seqkernels.kv_cache_append(
            kc, vc, kn, vn, torch.tensor([0, 2]), block_table=torch.tensor([[2, 3], [2, 1]]), backend=backend
        )
    assert (kc == 0).all()
    # Sharing a read-only prefix block is fine.
    seqkernels.kv_cache_append(
        kc, vc, kn, vn, torch.tensor([2, 2]), block_table=torch.tensor([[0, 1], [0, 2]]), backend=backend
    )
    assert (kc[1, :, 0] == 1).all() and (kc[2, :, 0] == 1).all() and (kc[0] == 0).all()
    assert kv_ops  # the op module is the one under test


# ---------------------------------------------------------------------------------------------
# The CUDA decode kernel (through the CUDA-on-CPU harness) on scores at the float limit


@pytest.fixture(scope="module")
def kv_emu():
    from emulation import load_emulated

    return load_emulated("kv_cache", ["csrc/cuda/kv_cache.cu"])


@pytest.mark.emulation
@pytest.mark.parametrize("num_splits", [1, 3])
def test_cuda_decode_huge_scores_emulated(kv_emu, num_splits):
    """bfloat16 q = 1.95e18, k = 1.95e18 * c_j over D = 64, scale 1: scores up to 2.4e38, finite in
    float32 but beyond FLT_MAX / log2(e), where a max kept in log2 units overflows."""
    B, Hq, Hkv, Tq, D, S = 2, 4, 2, 2, 64, 70
    big = 1.95e18
    q = torch.full((B, Hq, Tq, D), big).to(torch.bfloat16)
    c = torch.linspace(0.5, 1.0, S)[torch.randperm(S)]
    kc = (big * c).view(1, 1, S, 1).expand(B, Hkv, S, D).contiguous().to(torch.bfloat16)
    vc = torch.randn(B, Hkv, S, 32).to(torch.bfloat16)
    lens = torch.tensor([S, 41], dtype=torch.int32)
    call = kv_ops.prepare_decode(q, kc, vc, lens, num_splits=num_splits, scale=1.0)
    out, lse = kv_emu.decode_attention(*call.args())
    ref = reference.decode_attention_ref(q.double(), kc.double(), vc.double(), lens, scale=1.0)
    base = reference.decode_attention_ref(q, kc, vc, lens, scale=1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    rep = testing.compare((out, lse), ref, base)
    assert rep.passed, str(rep)


# ---------------------------------------------------------------------------------------------
# Witnesses outside the reference backend: the parity tests build their oracle through the public
# layer too, so a slip in the argument normalization would change both sides alike. These compare
# with torch (or plain arithmetic) instead.


def _torch_band_mask(Lq, Lk, left, right, off):
    i = torch.arange(Lq).unsqueeze(1) + off
    j = torch.arange(Lk).unsqueeze(0)
    keep = torch.ones(Lq, Lk, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("window", [(3, 2), (-1, 5), (2, 0)])
def test_causal_folds_the_right_window_side(backend, window):
    """causal=True with window=(l, r > 0): the right side is folded to 0 (causal wins)."""
    q, k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    out = seqkernels.attention(q, k, v, causal=True, window=window, backend=backend)
    keep = _torch_band_mask(7, 11, window[0], 0, 11 - 7)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_default_scale_is_one_over_sqrt_of_the_query_head_dim(backend):
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 40)
    out = seqkernels.attention(q, k, v, backend=backend)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dropout_one_drops_everything(backend):
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    out = seqkernels.attention(q, q, q, dropout_p=1.0, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_decode_num_splits_bounds():
    q, kc = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 8, 4)
    lens = torch.tensor([8])
    a = seqkernels.decode_attention(q, kc, kc, lens, num_splits=1024)
    torch.testing.assert_close(a, seqkernels.decode_attention(q, kc, kc, lens, num_splits=1))
    for bad in (0, 1025, True, 2.0):
        with pytest.raises(ValueError, match="^num_splits: "):
            seqkernels.decode_attention(q, kc, kc, lens, num_splits=bad)


@pytest.mark.parametrize("which", ["b_ih", "b_hh", "both"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_lstm_layer_with_one_bias(which, backend):
    """The sequence driver sums the two biases; either may be absent alone."""
    from seqkernels.ops import lstm as lstm_ops

    T, B, I, H = 5, 3, 4, 6
    x = torch.randn(T * B, I, dtype=torch.float64)
    h0, c0 = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    w_ih, w_hh = torch.randn(4 * H, I, dtype=torch.float64), torch.randn(4 * H, H, dtype=torch.float64)
    b_ih = torch.randn(4 * H, dtype=torch.float64) if which != "b_hh" else None
    b_hh = torch.randn(4 * H, dtype=torch.float64) if which != "b_ih" else None
    out, h, c = lstm_ops.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, [B] * T, False, backend)
    cell = torch.nn.LSTMCell(I, H, dtype=torch.float64)
    with torch.no_grad():
        cell.weight_ih.copy_(w_ih)
        cell.weight_hh.copy_(w_hh)
        cell.bias_ih.copy_(b_ih if b_ih is not None else torch.zeros(4 * H))
        cell.bias_hh.copy_(b_hh if b_hh is not None else torch.zeros(4 * H))
        hh, cc, outs = h0, c0, []
        for t in range(T):
            hh, cc = cell(x[t * B : (t + 1) * B], (hh, cc))
            outs.append(hh)
    torch.testing.assert_close(out, torch.cat(outs))
    torch.testing.assert_close((h, c), (hh, cc))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_nan_query_row_leaves_padded_key_gradients_zero(backend):
    """A NaN query row spreads NaN into the gradients of the keys it sees, never into keys at or
    past kv_lengths[b] (which take no part): those get exactly 0."""
    B, H, Lq, Lk, D = 2, 1, 4, 20, 8
    q = torch.randn(B, H, Lq, D)
    q[0, 0, 1] = float("nan")
    k, v = torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
    lens = torch.tensor([13, 20])
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = seqkernels.attention(*xs, kv_lengths=lens, backend=backend)
    out.backward(torch.ones_like(out))
    for g in (xs[1].grad, xs[2].grad):
        assert torch.equal(g[0, :, 13:], torch.zeros_like(g[0, :, 13:])), "keys >= kv_lengths must get exactly 0"
        assert torch.isnan(g[0, :, :13]).any()
        assert torch.isfinite(g[1]).all()

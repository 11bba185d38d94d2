"""attention_varlen's public layer (docs/DESIGN.md §2, docs/INTERNALS.md "Packed sequences"):
argument errors, the reference's per-sequence semantics against an independent eager formulation,
the dropout keep mask shared with the padded form, the lse layout and its gradient, empty
packings, and double backward. The kernels' parity sweeps live in tests/test_varlen.py and the
per-backend files."""

import math

import pytest
import torch
from test_modifiers import eager_attention

import seqkernels
from seqkernels import capabilities, testing

KERNEL_BACKENDS = ["cpu"]


def _needs_varlen(backend):
    if backend != "reference" and not capabilities.TABLE["attention"][backend].varlen:
        pytest.skip(f"{backend}: packed sequences not implemented on this backend yet")


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


def _packed(lens_q, lens_k, Hq=4, Hkv=2, D=8, Dv=None, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(sum(lens_q), Hq, D, generator=g, dtype=dtype)
    k = torch.randn(sum(lens_k), Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(sum(lens_k), Hkv, Dv, generator=g, dtype=dtype)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, _cu(lens_q), _cu(lens_k)


def _seq(t, cu, b):
    """Sequence b of a packed (total, H, D) tensor as a (1, H, L, D) batch."""
    return t[int(cu[b]) : int(cu[b + 1])].transpose(0, 1).unsqueeze(0)


LENS = [
    ([3, 0, 5, 1], [4, 2, 5, 7]),  # an empty query sequence, a length-1 one, lq != lk
    ([7], [7]),
    ([1, 1, 1], [1, 9, 0]),  # a sequence with no key
]
OPTIONS = [
    dict(),
    dict(causal=True),
    dict(window=(2, 1)),
    dict(causal=True, softcap=2.0, alibi_slopes="per_seq", sinks=True),
]


def _options(opts, n, Hq):
    kw = dict(opts)
    if kw.get("alibi_slopes") == "per_seq":
        kw["alibi_slopes"] = torch.rand(n, Hq, dtype=torch.float64) * 0.5
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(Hq, dtype=torch.float64)
    return kw


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("lens", LENS, ids=str)
def test_reference_is_each_sequence_alone(lens, opts):
    """Every sequence is `attention` on that sequence alone (bottom-right per sequence), checked
    against the independent eager formulation of tests/test_modifiers.py."""
    q, k, v, cq, ck = _packed(*lens)
    n, Hq = cq.numel() - 1, q.shape[1]
    kw = _options(opts, n, Hq)
    out, lse = seqkernels.attention_varlen(q, k, v, cq, ck, return_lse=True, backend="reference", **kw)
    assert out.shape == (q.shape[0], Hq, v.shape[-1]) and lse.shape == (Hq, q.shape[0])
    for b in range(n):
        if int(cq[b + 1]) == int(cq[b]):
            continue
        rows = slice(int(cq[b]), int(cq[b + 1]))
        if int(ck[b + 1]) == int(ck[b]):  # no key: output 0, lse = the sink (or -inf)
            assert torch.equal(out[rows], torch.zeros_like(out[rows]))
            sink = kw["sinks"].view(Hq, 1) if "sinks" in kw else torch.tensor(-math.inf, dtype=lse.dtype)
            assert torch.equal(lse[:, rows], sink.expand_as(lse[:, rows]))
            continue
        kb = dict(kw)
        if "alibi_slopes" in kb:
            kb["alibi_slopes"] = kb["alibi_slopes"][b]
        o_b, lse_b = eager_attention(_seq(q, cq, b), _seq(k, ck, b), _seq(v, ck, b), **kb)
        torch.testing.assert_close(out[rows], o_b[0].transpose(0, 1))
        torch.testing.assert_close(lse[:, rows], lse_b[0])


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_dropout_mask_is_the_padded_forms(backend):
    """The keep mask is the padded form's: the sequences padded to (N, Hq, max_seqlen_q,
    max_seqlen_k) and run with kv_lengths (non-causal, so the diagonal offset plays no part) drop
    exactly the same elements for the same seed."""
    _needs_varlen(backend)
    lens_q, lens_k = [3, 6, 1, 4], [5, 2, 6, 6]
    q, k, v, cq, ck = _packed(lens_q, lens_k, dtype=torch.float32)
    n, Lq, Lk = len(lens_q), max(lens_q), max(lens_k)
    qp = torch.zeros(n, q.shape[1], Lq, q.shape[2])
    kp = torch.zeros(n, k.shape[1], Lk, k.shape[2])
    vp = torch.zeros(n, v.shape[1], Lk, v.shape[2])
    for b in range(n):
        qp[b, :, : lens_q[b]] = _seq(q, cq, b)[0]
        kp[b, :, : lens_k[b]] = _seq(k, ck, b)[0]
        vp[b, :, : lens_k[b]] = _seq(v, ck, b)[0]
    torch.manual_seed(5)
    out = seqkernels.attention_varlen(q, k, v, cq, ck, dropout_p=0.4, backend=backend)
    torch.manual_seed(5)
    kv_lengths = torch.tensor(lens_k, dtype=torch.int32)
    padded = seqkernels.attention(qp, kp, vp, kv_lengths=kv_lengths, dropout_p=0.4, backend=backend)
    for b in range(n):
        torch.testing.assert_close(out[int(cq[b]) : int(cq[b + 1])], padded[b, :, : lens_q[b]].transpose(0, 1))
    torch.manual_seed(6)
    other = seqkernels.attention_varlen(q, k, v, cq, ck, dropout_p=0.4, backend=backend)
    assert not torch.equal(out, other)  # the seed matters: the comparison above is not vacuous


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_lse_gradient_and_double_backward(backend):
    """The returned lse (Hq, total_q) is differentiable (its gradient is the softmax), and a
    backward that is itself differentiated goes through the reference math, packed arguments
    included (gradgradcheck)."""
    _needs_varlen(backend)
    q, k, v, cq, ck = _packed([2, 0, 3], [3, 1, 3], Hq=2, Hkv=1, D=3, grad=True)

    def f(q, k, v):
        out, lse = seqkernels.attention_varlen(q, k, v, cq, ck, causal=True, return_lse=True, backend=backend)
        return out, lse

    torch.autograd.gradcheck(f, (q, k, v))
    torch.autograd.gradgradcheck(f, (q, k, v))


def test_sinks_gradient_matches_reference():
    q, k, v, cq, ck = _packed([2, 4, 1], [3, 4, 2], grad=True)
    sinks = torch.randn(q.shape[1], dtype=torch.float64, requires_grad=True)
    for backend in ["reference", *KERNEL_BACKENDS]:
        if backend != "reference" and not capabilities.TABLE["attention"][backend].varlen:
            continue
        out, lse = seqkernels.attention_varlen(q, k, v, cq, ck, sinks=sinks, return_lse=True, backend=backend)
        grads = torch.autograd.grad((out.square().sum() + lse.sum()), (q, k, v, sinks))
        if backend == "reference":
            want = grads
        else:
            for g, w in zip(grads, want):
                torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_empty_packings(backend):
    """No sequence at all, and sequences that are all empty: empty outputs, zero gradients."""
    _needs_varlen(backend)
    for lens_q, lens_k in (([], []), ([0, 0], [0, 3])):
        q, k, v, cq, ck = _packed(lens_q, lens_k, grad=True)
        out, lse = seqkernels.attention_varlen(q, k, v, cq, ck, return_lse=True, backend=backend)
        assert out.shape == (0, q.shape[1], v.shape[-1]) and lse.shape == (q.shape[1], 0)
        if k.shape[0]:
            (gk,) = torch.autograd.grad(out.sum(), (k,), allow_unused=True, materialize_grads=True)
            assert torch.equal(gk, torch.zeros_like(k))


def test_matches_torch_sdpa_per_sequence():
    """Against torch itself: each sequence of the packed batch is torch's SDPA with a bottom-right
    causal mask (float64)."""
    lens_q, lens_k = [4, 1, 6], [6, 3, 6]
    q, k, v, cq, ck = _packed(lens_q, lens_k, Hq=2, Hkv=2)
    out = seqkernels.attention_varlen(q, k, v, cq, ck, causal=True, backend="reference")
    for b in range(3):
        lq, lk = lens_q[b], lens_k[b]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        want = torch.nn.functional.scaled_dot_product_attention(
            _seq(q, cq, b), _seq(k, ck, b), _seq(v, ck, b), attn_mask=mask
        )
        torch.testing.assert_close(out[int(cq[b]) : int(cq[b + 1])], want[0].transpose(0, 1))


# ---------------------------------------------------------------------------------------------
# Argument errors: each names the argument.


def _bad(q, k, v, cq, ck, **kw):
    return lambda: seqkernels.attention_varlen(q, k, v, cq, ck, backend="reference", **kw)


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (lambda a: a.update(cq=a["cq"].long()), TypeError, "cu_seqlens_q: expected dtype in (int32)"),
        (lambda a: a.update(ck=a["ck"].float()), TypeError, "cu_seqlens_k: expected dtype"),
        (lambda a: a.update(cq=a["cq"].view(1, -1)), ValueError, "cu_seqlens_q: expected a 1-D tensor"),
        (lambda a: a.update(cq=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "must start at 0"),
        (lambda a: a.update(cq=torch.tensor([0, 6, 5, 8], dtype=torch.int32)), ValueError, "non-decreasing"),
        (lambda a: a.update(ck=torch.tensor([0, 3, 8], dtype=torch.int32)), ValueError, "cu_seqlens_k: must end"),
        (lambda a: a.update(ck=torch.tensor([0, 9], dtype=torch.int32)), ValueError, "cu_seqlens_k: 1 sequences"),
        (lambda a: a.update(cq=torch.empty(0, dtype=torch.int32)), ValueError, "cu_seqlens_q: expected (N+1,)"),
        (lambda a: a["kw"].update(max_seqlen_q=3), ValueError, "above max_seqlen_q=3"),
        (lambda a: a["kw"].update(max_seqlen_k=-1), ValueError, "max_seqlen_k: expected an int >= 0"),
        (lambda a: a.update(q=a["q"].unsqueeze(0)), ValueError, "q: expected a 3-D tensor"),
        (lambda a: a.update(v=a["v"][:, :1]), ValueError, "v: expected shape"),
        (lambda a: a.update(k=a["k"][:, :, :4]), ValueError, "head dim"),
        (lambda a: a["kw"].update(alibi_slopes=torch.rand(3, 4)), ValueError, "alibi_slopes: expected shape"),
        (lambda a: a["kw"].update(deterministic=1), TypeError, "deterministic: expected a bool"),
        (lambda a: a["kw"].update(window=(1,)), ValueError, "window: expected a pair"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_argument_errors(change, exc, words):
    q, k, v, cq, ck = _packed([4, 4], [5, 4])
    a = dict(q=q, k=k, v=v, cq=cq, ck=ck, kw={})
    change(a)
    with pytest.raises(exc, match=None) as info:
        _bad(a["q"], a["k"], a["v"], a["cq"], a["ck"], **a["kw"])()
    assert words in str(info.value), str(info.value)


def test_kernel_op_checks_direct_calls():
    """The C++ op repeats the checks for direct calls (host::check_varlen): the packed form is
    (1, H, total, D) views, no mask, values checked on CPU tensors."""
    pytest.importorskip("seqkernels._C")
    q = torch.randn(1, 2, 5, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    fwd = torch.ops.seqkernels.attention_fwd
    common = (1.0, -1, -1, True, 0.0, 0, 0, None, None, 0.0)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must start at 0|must be non-decreasing"):
        fwd(q, q, q, None, None, *common, torch.tensor([1, 2, 5], dtype=torch.int32), cu, 5, 5)
    with pytest.raises(RuntimeError, match="must end at the total length"):
        fwd(q, q, q, None, None, *common, cu, torch.tensor([0, 2, 4], dtype=torch.int32), 5, 5)
    with pytest.raises(RuntimeError, match="batch 2"):
        q2 = torch.randn(2, 2, 5, 8)
        fwd(q2, q2, q2, None, None, *common, cu, cu, 5, 5)
    with pytest.raises(RuntimeError, match="cu_seqlens_q and cu_seqlens_k must be given together"):
        fwd(q, q, q, None, None, *common, cu, None, 5, 5)


def test_explain_names_the_missing_capability():
    """A backend without packed kernels is skipped by the automatic choice, and an explicit request
    says why."""
    q, k, v, cq, ck = _packed([2, 3], [2, 3], dtype=torch.float32)
    missing = [b for b in ("cpu",) if not capabilities.TABLE["attention"][b].varlen]
    for b in missing:
        with pytest.raises(Exception, match="packed sequences"):
            seqkernels.attention_varlen(q, k, v, cq, ck, backend=b)
    out = seqkernels.attention_varlen(q, k, v, cq, ck)
    ref = seqkernels.attention_varlen(q.double(), k.double(), v.double(), cq, ck, backend="reference")
    rep = testing.compare(out, ref, ref.float(), name="out", dtype=torch.float32)
    assert rep.passed, str(rep)
    assert math.isfinite(float(out.abs().max()))

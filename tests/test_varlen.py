"""attention_varlen (packed sequences, cu_seqlens; docs/INTERNALS.md "Packed sequences") on every
backend this machine runs, against the float64 reference by the parity rule (docs/DESIGN.md §5):
out, lse and the gradients of q, k, v and the sinks, through the lse's gradient too. Each packed
result also equals running `seqkernels.attention` on each sequence alone on the same backend, and
with dropout the keep mask is the padded form's ((N, Hq, max_seqlen_q, max_seqlen_k)).

Triton runs in the interpreter without a GPU (TRITON_INTERPRET=1, ~10 s a call here): there it
takes the one tiny case, and the reference backend (the float64 reference's own code in the test
dtype) the cases marked light.
"""

import pytest
import torch
from conftest import HAS_CUDA

import seqkernels
from seqkernels import capabilities, testing

BACKENDS = ["reference", "cpu", "triton"] + (["cuda"] if HAS_CUDA else [])

# The CPU kernel's tiles (csrc/cpu/attention.cpp): forward query block kFwdBM = 96 (key block 256),
# backward blocks kBwdBM = kBwdBN = 64; lengths t - 1, t, t + 1 around them.
FWD_BM, BWD_BM = 96, 64

# (name, query lengths, key lengths, Hq, Hkv, D, kwargs, weight): sequences with no rows, no keys,
# one token, lq != lk, GQA. weight 0: tiny (every backend), 1: light (not triton in the
# interpreter), 2: the CPU kernel's tile edges (kernel backends only).
CASES = [
    ("tiny", [3, 0, 2, 1], [4, 2, 0, 3], 2, 1, 8, {"causal": True}, 0),
    ("mixed_causal", [5, 0, 17, 1, 9], [7, 3, 17, 1, 0], 4, 2, 16, {"causal": True}, 1),
    ("plain", [3, 12, 0, 1], [3, 12, 0, 2], 2, 2, 8, {}, 1),
    ("window", [9, 4, 13], [11, 4, 20], 2, 1, 16, {"window": (3, 1)}, 1),
    ("window_causal_long", [40, 2, 33], [70, 1, 33], 2, 1, 16, {"window": (8, -1), "causal": True}, 2),
    (
        "tiles_causal",
        [FWD_BM - 1, FWD_BM + 1, BWD_BM, BWD_BM - 1],
        [BWD_BM + 1, FWD_BM, BWD_BM - 1, FWD_BM + 1],
        2,
        1,
        16,
        {"causal": True},
        2,
    ),  # fmt: skip
    ("tiles", [FWD_BM, BWD_BM + 1, 0], [BWD_BM, FWD_BM - 1, BWD_BM], 2, 2, 8, {}, 2),
]
CASE = {c[0]: c for c in CASES}
MODS = {
    "softcap": dict(softcap=2.5),
    "alibi_heads": dict(alibi="heads"),
    "alibi_seqs": dict(alibi="seqs"),
    "sinks": dict(sinks=True),
    "all": dict(softcap=3.0, alibi="seqs", sinks=True),
}


def _device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def _skip_unless_varlen(backend, dtype=None, weight=0):
    """Skips a backend without varlen kernels or the dtype, and cases too heavy for it here:
    triton in the interpreter takes weight 0 only, the reference weight <= 1."""
    cap = capabilities.TABLE["attention"][backend]
    if not cap.varlen:
        pytest.skip(f"{backend}: no packed-sequence (varlen) kernels yet")
    if dtype is not None and dtype not in cap.dtypes:
        pytest.skip(f"{backend}: no {dtype} kernels")
    if backend == "triton" and not HAS_CUDA and weight > 0:
        pytest.skip("triton runs in the interpreter here: the tiny case only")
    if backend == "reference" and weight > 1:
        pytest.skip("the reference is the float64 reference's code: light cases only")


def _cu(lengths, device):
    c = [0]
    for n in lengths:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=device)


def _build(case, dtype, device, seed=0):
    _, lq, lk, Hq, Hkv, D, kw, _ = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), Hq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(sum(lk), Hkv, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(sum(lk), Hkv, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v, _cu(lq, device), _cu(lk, device), dict(kw), g


def _modifiers(N, Hq, mods, device, gen):
    kw = {}
    if "softcap" in mods:
        kw["softcap"] = mods["softcap"]
    if mods.get("alibi") == "heads":
        kw["alibi_slopes"] = (torch.rand(Hq, generator=gen) * 0.5).to(device)
    elif mods.get("alibi") == "seqs":
        kw["alibi_slopes"] = (torch.rand(N, Hq, generator=gen) * 0.5).to(device)
    if mods.get("sinks"):
        kw["sinks"] = (torch.randn(Hq, generator=gen) * 2).to(device)
    return kw


def _to(kw, dtype=None):
    """kwargs on the CPU, floating tensors in float64 when dtype is None (the reference run)."""
    out = {}
    for n, x in kw.items():
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.is_floating_point() and dtype is None:
                x = x.double()
        out[n] = x
    return out


def _run(backend, q, k, v, cq, ck, go, w, kw, seed=None):
    """out, lse and the gradients (q, k, v, sinks) of sum(out * go) + sum(lse * w) (finite lse)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    kw = dict(kw)
    if "sinks" in kw:
        kw["sinks"] = kw["sinks"].detach().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    out, lse = seqkernels.attention_varlen(q, k, v, cq, ck, return_lse=True, backend=backend, **kw)
    loss = (out.float() * go.float()).sum()
    if w is not None:
        loss = loss + (torch.where(lse.isfinite(), lse, 0).float() * w.float()).sum()
    leaves = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])
    grads = torch.autograd.grad(loss, leaves)
    return (out.detach().cpu(), lse.detach().cpu()), tuple(x.cpu() for x in grads)


def _check_parity(backend, case, dtype, kw, seed=None, lse_grad=True):
    """The backend against the float64 reference (base: the reference in the test dtype)."""
    device = _device_for(backend)
    q, k, v, cq, ck, kw0, g = _build(case, dtype, device)
    kw = {**kw0, **kw}
    go = torch.randn(q.shape[:2] + (v.shape[-1],), generator=g).to(device=device, dtype=dtype)
    w = torch.randn(q.shape[1], q.shape[0], generator=g).to(device) if lse_grad else None
    got = _run(backend, q, k, v, cq, ck, go, w, kw, seed)
    c64 = (cq.cpu(), ck.cpu())
    w64 = None if w is None else w.cpu().double()
    ref = _run("reference", q.cpu().double(), k.cpu().double(), v.cpu().double(), *c64, go.cpu().double(), w64,
               _to(kw), seed)  # fmt: skip
    base = _run("reference", q.cpu(), k.cpu(), v.cpu(), *c64, go.cpu(), None if w is None else w.cpu(),
                _to(kw, dtype), seed)  # fmt: skip
    fwd = testing.compare(got[0], ref[0], base[0], name=f"{backend} out/lse")
    assert fwd.passed, str(fwd)
    bwd = testing.compare(got[1], ref[1], base[1], grad=True, name=f"{backend} dq/dk/dv/dsinks", dtype=dtype)
    assert bwd.passed, str(bwd)
    return got


def _case_id(c):
    return c[0]


# ---------------------------------------------------------------------------------------------
# Parity with the float64 reference.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parity(backend, dtype, case):
    # float64 and bfloat16 on triton in the interpreter: one dtype there is enough
    _skip_unless_varlen(backend, dtype, weight=case[-1] + (dtype != torch.float32))
    _check_parity(backend, case, dtype, {})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mods", list(MODS), ids=str)
@pytest.mark.parametrize("case", [CASE["tiny"], CASE["window_causal_long"]], ids=_case_id)
def test_modifiers_parity(backend, mods, case):
    _skip_unless_varlen(backend, torch.float32, weight=case[-1] + (mods != "all"))
    gen = torch.Generator().manual_seed(1)
    kw = _modifiers(len(case[1]), case[3], MODS[mods], _device_for(backend), gen)
    _check_parity(backend, case, torch.float32, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASE["tiny"], CASE["window"], CASE["tiles_causal"]], ids=_case_id)
def test_dropout_parity(backend, dtype, case):
    """The same seed drops the same elements as the reference, whose keep mask is the padded
    form's; out, lse and the gradients through both (lse's is the undropped softmax) by the
    parity rule."""
    _skip_unless_varlen(backend, dtype, weight=case[-1] + (dtype != torch.float32))
    _check_parity(backend, case, dtype, {"dropout_p": 0.3}, seed=1234)


# ---------------------------------------------------------------------------------------------
# The packed batch is its sequences, one by one.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mods", ["none", "all"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_equals_each_sequence_alone(backend, mods, case):
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    _skip_unless_varlen(backend, dtype, weight=case[-1] + (mods != "all"))
    device = _device_for(backend)
    q, k, v, cq, ck, kw, g = _build(case, dtype, device)
    N, Hq = len(case[1]), case[3]
    mk = {} if mods == "none" else _modifiers(N, Hq, MODS["all"], device, g)
    mk = {n: (x.to(dtype) if isinstance(x, torch.Tensor) else x) for n, x in mk.items()}
    go = torch.randn(q.shape[:2] + (v.shape[-1],), generator=g).to(device=device, dtype=dtype)
    got = _run(backend, q, k, v, cq, ck, go, None, {**kw, **mk})
    cq_, ck_ = cq.tolist(), ck.tolist()
    outs, lses, dqs, dks, dvs, dss = [], [], [], [], [], []
    for b in range(N):
        qs, ks, vs = (t[c[b] : c[b + 1]].transpose(0, 1).unsqueeze(0) for t, c in ((q, cq_), (k, ck_), (v, ck_)))
        qs, ks, vs = (t.detach().requires_grad_() for t in (qs, ks, vs))
        mb = dict(mk)
        if "alibi_slopes" in mb:
            mb["alibi_slopes"] = mb["alibi_slopes"][b]
        if "sinks" in mb:
            mb["sinks"] = mb["sinks"].detach().requires_grad_()
        if qs.shape[2] == 0:  # no query rows: no output, zero key gradients
            outs.append(qs.new_zeros(0, Hq, v.shape[-1]))
            lses.append(torch.zeros(Hq, 0, dtype=got[0][1].dtype))
            dqs.append(qs.new_zeros(0, Hq, q.shape[-1]))
            dks.append(torch.zeros_like(ks[0].transpose(0, 1)))
            dvs.append(torch.zeros_like(vs[0].transpose(0, 1)))
            continue
        o, lse = seqkernels.attention(qs, ks, vs, return_lse=True, backend=backend, **kw, **mb)
        gob = go[cq_[b] : cq_[b + 1]].transpose(0, 1).unsqueeze(0)
        leaves = [qs, ks, vs] + ([mb["sinks"]] if "sinks" in mb else [])
        gr = torch.autograd.grad((o * gob).sum(), leaves, allow_unused=True)
        gr = [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, gr)]
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
        dqs.append(gr[0][0].transpose(0, 1))
        dks.append(gr[1][0].transpose(0, 1))
        dvs.append(gr[2][0].transpose(0, 1))
        if "sinks" in mb:
            dss.append(gr[3])
    want = [torch.cat(outs).cpu(), torch.cat(lses, dim=1).cpu()]
    want_g = [torch.cat(x).cpu() for x in (dqs, dks, dvs)] + ([sum(dss).cpu()] if dss else [])
    tol = {} if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got[0][0], want[0], **tol)
    torch.testing.assert_close(got[0][1], want[1], **tol)
    for a, b_, name in zip(got[1], want_g, ["dq", "dk", "dv", "dsinks"]):
        torch.testing.assert_close(a, b_, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_equals_padded_form_with_kv_lengths(backend, dropout):
    """Sequences of equal query length and different key lengths: the packed batch equals the
    padded batch with kv_lengths, bottom-right causal; with dropout the same seed drops the same
    elements, the padded batch being (N, Hq, max_seqlen_q, max_seqlen_k)."""
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    _skip_unless_varlen(backend, dtype, weight=1)
    device = _device_for(backend)
    lq, lk, Hq, Hkv, D = 6, [9, 6, 13, 7], 4, 2, 8
    N, mk = len(lk), max(lk)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(N, Hq, lq, D, generator=g, dtype=dtype).to(device)
    k = torch.randn(N, Hkv, mk, D, generator=g, dtype=dtype).to(device)
    v = torch.randn(N, Hkv, mk, D, generator=g, dtype=dtype).to(device)
    lengths = torch.tensor(lk, dtype=torch.int32, device=device)
    torch.manual_seed(7)
    want = seqkernels.attention(q, k, v, kv_lengths=lengths, causal=True, dropout_p=dropout, backend=backend)
    qp = q.transpose(1, 2).reshape(N * lq, Hq, D)
    kp = torch.cat([k[b, :, : lk[b]].transpose(0, 1) for b in range(N)])
    vp = torch.cat([v[b, :, : lk[b]].transpose(0, 1) for b in range(N)])
    torch.manual_seed(7)
    got = seqkernels.attention_varlen(qp, kp, vp, _cu([lq] * N, device), _cu(lk, device), causal=True,
                                      dropout_p=dropout, backend=backend)  # fmt: skip
    tol = {} if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(N * lq, Hq, D), **tol)


# ---------------------------------------------------------------------------------------------
# Layouts, repeatability, errors.


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    """q, k, v as slices of bigger tensors (strided along tokens, heads and the head dim)."""
    _skip_unless_varlen(backend, torch.float32, weight=1)
    device = _device_for(backend)
    case = CASE["mixed_causal"]
    q, k, v, cq, ck, kw, g = _build(case, torch.float32, device)
    go = torch.randn(q.shape[:2] + (v.shape[-1],), generator=g).to(device)
    want = _run(backend, q, k, v, cq, ck, go, None, kw)

    def strided(t):
        big = torch.zeros(t.shape[0] + 3, t.shape[1] + 1, 2 * t.shape[2], device=device)
        big[2 : 2 + t.shape[0], 1:, : t.shape[2]] = t
        return big[2 : 2 + t.shape[0], 1:, : t.shape[2]]

    qs, ks, vs = strided(q), strided(k), strided(v)
    assert not qs.is_contiguous()
    got = _run(backend, qs, ks, vs, cq, ck, go, None, kw)
    exact = dict(atol=0, rtol=0) if backend in ("reference", "cpu") else {}
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b, **exact)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_backward_is_repeatable(backend):
    _skip_unless_varlen(backend, torch.float32, weight=1)
    device = _device_for(backend)
    case = CASE["mixed_causal"]
    q, k, v, cq, ck, kw, g = _build(case, torch.float32, device)
    go = torch.randn(q.shape[:2] + (v.shape[-1],), generator=g).to(device)
    w = torch.randn(q.shape[1], q.shape[0], generator=g).to(device)
    sinks = torch.randn(case[3], generator=g).to(device)
    kw = {**kw, "deterministic": True, "sinks": sinks}
    a = _run(backend, q, k, v, cq, ck, go, w, kw)
    b = _run(backend, q, k, v, cq, ck, go, w, kw)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)


def test_outputs_layout_cpu():
    """The op's packed outputs: out (1, Hq, total_q, Dv) over token-major storage (as the fake
    kernel promises), lse (1, Hq, total_q) contiguous; gradients laid out like q, k, v."""
    _skip_unless_varlen("cpu")
    q, k, v, cq, ck, _, _ = _build(CASE["mixed_causal"], torch.float32, "cpu")
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out, lse = torch.ops.seqkernels.attention_fwd(q4, k4, v4, None, None, 0.25, -1, 0, True, 0.0, 0, 0,
                                                  cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=17,
                                                  max_seqlen_k=17)  # fmt: skip
    assert out.shape == (1, q.shape[1], q.shape[0], v.shape[2]) and out[0].transpose(0, 1).is_contiguous()
    assert lse.shape == (1, q.shape[1], q.shape[0]) and lse.is_contiguous()
    go = torch.randn_like(out)
    dq, dk, dv, _ = torch.ops.seqkernels.attention_bwd(go, q4, k4, v4, out, lse, None, None, 0.25, -1, 0, True, 0.0, 0,
                                                       0, False, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=17,
                                                       max_seqlen_k=17)  # fmt: skip
    assert dq.stride() == q4.stride() and dk.stride() == k4.stride() and dv.stride() == v4.stride()
    # keys of the sequence without query rows (sequence 1: keys 7..9) get exact zeros
    assert torch.equal(dk[0, :, 7:10], torch.zeros_like(dk[0, :, 7:10]))
    # grad_out in out's own layout reads the same as a contiguous one
    dq2, dk2, dv2, _ = torch.ops.seqkernels.attention_bwd(go.contiguous(), q4, k4, v4, out, lse, None, None, 0.25, -1,
                                                          0, True, 0.0, 0, 0, False, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                                          max_seqlen_q=17, max_seqlen_k=17)  # fmt: skip
    for a, b in zip((dq, dk, dv), (dq2, dk2, dv2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "cu_q, match",
    [([0, 5, 3, 8], "non-decreasing"), ([0, 4, 6, 7], "must end at the total"), ([1, 4, 6, 8], "must start at 0")],
)
def test_bad_cu_seqlens_direct_call(cu_q, match):
    """The op, called directly (no public-layer validation), refuses bad cu_seqlens on CPU."""
    _skip_unless_varlen("cpu")
    q = torch.randn(1, 2, 8, 8)
    k = torch.randn(1, 2, 8, 8)
    cq = torch.tensor(cu_q, dtype=torch.int32)
    ck = torch.tensor([0, 2, 5, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.seqkernels.attention_fwd(q, k, k, None, None, 0.35, -1, -1, True, 0.0, 0, 0, cu_seqlens_q=cq,
                                           cu_seqlens_k=ck, max_seqlen_q=8, max_seqlen_k=8)  # fmt: skip
    lse = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.seqkernels.attention_bwd(q, q, k, k, q, lse, None, None, 0.35, -1, -1, True, 0.0, 0, 0, False,
                                           cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=8,
                                           max_seqlen_k=8)  # fmt: skip

"""Score modifiers (softcap, ALiBi, attention sinks; docs/DESIGN.md §2) through the public API on
every backend this machine runs: the reference against an independent eager formulation (explicit
scores, a softmax with the sink as an extra column, as gpt-oss and Gemma 2 write it), then each
kernel backend against the float64 reference by the parity rule (§5): outputs, lse and every
gradient including the sinks'. Backend-specific tile sweeps live in test_attention_<backend>.py."""

import math

import pytest
import torch
from conftest import HAS_CUDA

import seqkernels
from seqkernels import _ext, backends, capabilities, testing
from seqkernels.ops import attention as attn_ops
from seqkernels.ops import kv_cache as kv_ops

BACKENDS = ["reference", "cpu", "triton"] + (["cuda"] if HAS_CUDA else [])
MODS = {
    "softcap": dict(softcap=2.5),
    "alibi": dict(alibi="heads"),
    "alibi_batch": dict(alibi="batch"),
    "sinks": dict(sinks=True),
    "all": dict(softcap=3.0, alibi="batch", sinks=True),
}


def _device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def _modifiers(B, Hq, mods, device, dtype=torch.float32, gen=None):
    """Keyword arguments of the modifiers; sinks a leaf that requires grad."""
    kw = {}
    if "softcap" in mods:
        kw["softcap"] = mods["softcap"]
    if mods.get("alibi") == "heads":
        kw["alibi_slopes"] = torch.rand(Hq, generator=gen).to(device) * 0.5
    elif mods.get("alibi") == "batch":
        kw["alibi_slopes"] = torch.rand(B, Hq, generator=gen).to(device) * 0.5
    if mods.get("sinks"):
        kw["sinks"] = (torch.randn(Hq, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_()
    return kw


def eager_attention(q, k, v, *, causal=False, window=None, kv_lengths=None, attn_mask=None, scale=None,
                    softcap=None, alibi_slopes=None, sinks=None, bottom_right=True):  # fmt: skip
    """The textbook formulation, float64, written independently of seqkernels.reference."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    lk = torch.full((B,), Lk) if kv_lengths is None else kv_lengths.cpu().long()
    i = torch.arange(Lq).view(1, 1, Lq, 1)
    j = torch.arange(Lk).view(1, 1, 1, Lk)
    diag = i + ((lk - Lq) if bottom_right else torch.zeros(B, dtype=torch.long)).view(B, 1, 1, 1)
    if alibi_slopes is not None:
        s = s - alibi_slopes.double().cpu().expand(B, Hq).reshape(B, Hq, 1, 1) * (diag - j).abs()
    keep = j < lk.view(B, 1, 1, 1)
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        keep = keep & (j >= diag - left)
    if right >= 0:
        keep = keep & (j <= diag + right)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask.cpu()
        else:
            s = s + attn_mask.cpu().double()
    s = s.masked_fill(~keep, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, Hq, 1, 1).expand(B, Hq, Lq, 1)], dim=-1)
    # A row with nothing to attend to (no key, no finite sink) has output 0 and lse -inf; it gets
    # finite logits here only so that autograd does not produce 0 * NaN through it.
    dead = (s == -math.inf).all(dim=-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    # The shift-by-max log-sum-exp with the max detached: torch.logsumexp's backward divides by
    # exp(lse), whose rounding at scores of finfo.min (lse -3.4e38 + log(n) == -3.4e38) would
    # turn every weight into 1.
    m = s.amax(dim=-1, keepdim=True).detach()
    lse = (m + torch.log(torch.exp(s - m).sum(-1, keepdim=True))).squeeze(-1).masked_fill(dead.squeeze(-1), -math.inf)
    p = torch.softmax(s, dim=-1).masked_fill(dead, 0.0)
    if sinks is not None:
        p = p[..., :-1]
    return p @ v, lse


# (B, Hq, Hkv, Lq, Lk, D, kwargs)
CASES = [
    (2, 4, 2, 9, 13, 16, {"causal": True}),
    (1, 2, 1, 17, 17, 32, {}),
    (2, 2, 2, 7, 23, 16, {"window": (5, 2)}),
    (2, 4, 4, 11, 19, 16, {"kv_lengths": [0, 14], "causal": True}),
    (1, 2, 2, 1, 1, 8, {}),
    (2, 2, 1, 13, 9, 24, {"mask": "bool"}),
    (1, 2, 2, 9, 9, 16, {"mask": "float_dead_row"}),
]


def _case_id(c):
    return f"B{c[0]}H{c[1]}-{c[2]}L{c[3]}x{c[4]}D{c[5]}" + "".join(f"-{k}" for k in c[6])


def _build(case, dtype, device, seed=0):
    B, Hq, Hkv, Lq, Lk, D, kw = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(device=device, dtype=dtype)
    kwargs = {n: x for n, x in kw.items() if n != "mask"}
    if "kv_lengths" in kwargs:
        kwargs["kv_lengths"] = torch.tensor(kwargs["kv_lengths"], dtype=torch.int32, device=device)
    if kw.get("mask") == "bool":
        m = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
        m[0, 0, 2] = False  # a row that sees nothing
        kwargs["attn_mask"] = m.to(device)
    elif kw.get("mask") == "float_dead_row":
        m = torch.randn(B, Hq, Lq, Lk, generator=g)
        m[:, :, 3] = -math.inf
        m[:, :, 5] = torch.finfo(torch.float32).min  # finfo.min is a (very negative) finite bias
        kwargs["attn_mask"] = m.to(device=device, dtype=dtype if dtype != torch.float64 else torch.float32)
    return q, k, v, kwargs, g


def _to64(kwargs):
    out = {}
    for name, x in kwargs.items():
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.is_floating_point():
                x = x.double()
        out[name] = x
    return out


def _skip_unless_runs(backend, q, k, v, kwargs):
    call = attn_ops.prepare_attention(q, k, v, **kwargs)
    reason = backends.why_not(attn_ops.OP, backend, call.device, call)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


# ---------------------------------------------------------------------------------------------
# The reference is the textbook math.


@pytest.mark.parametrize("mods", list(MODS), ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_is_the_eager_formulation(case, mods):
    q, k, v, kwargs, g = _build(case, torch.float64, "cpu")
    mk = _modifiers(q.shape[0], q.shape[1], MODS[mods], "cpu", torch.float64, g)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = seqkernels.attention(q, k, v, return_lse=True, backend="reference", **kwargs, **mk)
    w = torch.randn(lse.shape, dtype=torch.float64, generator=g)
    go = torch.randn(out.shape, dtype=torch.float64, generator=g)
    leaves = [q, k, v] + ([mk["sinks"]] if "sinks" in mk else [])
    got = torch.autograd.grad((out * go).sum() + (torch.where(lse.isfinite(), lse, 0) * w).sum(), leaves)
    e_out, e_lse = eager_attention(q, k, v, **kwargs, **mk)
    want = torch.autograd.grad((e_out * go).sum() + (torch.where(e_lse.isfinite(), e_lse, 0) * w).sum(), leaves)
    torch.testing.assert_close(out, e_out)
    torch.testing.assert_close(lse, e_lse)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Every backend against the float64 reference.


def _run(backend, q, k, v, go, w, kwargs, mk):
    """out, lse and the gradients of sum(out * go) + sum(lse * w) (lse's finite entries) with respect
    to q, k, v and the sinks."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    mk = dict(mk)
    if "sinks" in mk:
        mk["sinks"] = mk["sinks"].detach().requires_grad_()
    out, lse = seqkernels.attention(q, k, v, return_lse=True, backend=backend, **kwargs, **mk)
    loss = (out.float() * go.float()).sum()
    if w is not None:
        loss = loss + (torch.where(lse.isfinite(), lse, 0).float() * w.float()).sum()
    leaves = [q, k, v] + ([mk["sinks"]] if "sinks" in mk else [])
    grads = torch.autograd.grad(loss, leaves)
    return (out.detach().cpu(), lse.detach().cpu()), tuple(x.cpu() for x in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mods", list(MODS), ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_backward_parity(backend, dtype, mods, case):
    device = _device_for(backend)
    q, k, v, kwargs, g = _build(case, dtype, device)
    mk = _modifiers(q.shape[0], q.shape[1], MODS[mods], device, torch.float32, g)
    _skip_unless_runs(backend, q, k, v, {**kwargs, **mk})
    go = torch.randn(q.shape[:3] + (v.shape[-1],), generator=g).to(device=device, dtype=dtype)
    w = torch.randn(q.shape[:3], generator=g).to(device)
    got = _run(backend, q, k, v, go, w, kwargs, mk)
    mk64 = _to64(mk)
    ref = _run("reference", q.cpu().double(), k.cpu().double(), v.cpu().double(), go.cpu().double(), w.cpu().double(),
               _to64(kwargs), mk64)  # fmt: skip
    base = _run("reference", q, k, v, go, w, kwargs, mk)
    fwd = testing.compare(got[0], ref[0], (base[0][0], base[0][1]))
    assert fwd.passed, str(fwd)
    bwd = testing.compare(got[1], ref[1], base[1], grad=True)
    assert bwd.passed, str(bwd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_sinks_are_no_sinks(backend):
    device = _device_for(backend)
    q, k, v, kwargs, g = _build(CASES[3], torch.float32, device)
    sinks = torch.full((q.shape[1],), -math.inf, device=device)
    _skip_unless_runs(backend, q, k, v, {**kwargs, "sinks": sinks})
    with_, lse_with = seqkernels.attention(q, k, v, return_lse=True, backend=backend, sinks=sinks, **kwargs)
    without, lse_without = seqkernels.attention(q, k, v, return_lse=True, backend=backend, **kwargs)
    torch.testing.assert_close(with_, without)
    torch.testing.assert_close(lse_with, lse_without)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_that_sees_no_key_with_a_sink(backend):
    """Output 0, lse = the sink, finite gradients; the sink's gradient is that of a softmax over the
    sink alone (no contribution from such rows)."""
    device = _device_for(backend)
    B, Hq, Lq, Lk, D = 2, 2, 5, 6, 16
    q, k, v = (torch.randn(B, h, n, D, device=device) for h, n in ((Hq, Lq), (Hq, Lk), (Hq, Lk)))
    lengths = torch.tensor([0, 6], dtype=torch.int32, device=device)  # batch 0 has no key at all
    sinks = torch.tensor([0.5, -1.0], device=device, requires_grad=True)
    _skip_unless_runs(backend, q, k, v, {"kv_lengths": lengths, "sinks": sinks})
    q.requires_grad_()
    out, lse = seqkernels.attention(q, k, v, kv_lengths=lengths, sinks=sinks, return_lse=True, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(lse[0], sinks.detach().view(Hq, 1).expand(Hq, Lq))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(sinks.grad).all()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    # Only batch 1 contributes: -sum_i p_sink * (dO . O) with dO = 1.
    p_sink = torch.exp(sinks.detach().view(Hq, 1) - lse[1].detach())
    want = -(p_sink * out[1].detach().sum(-1)).sum(-1)
    torch.testing.assert_close(sinks.grad, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["cpu"])  # gradgradcheck needs float64, which only the C++ kernels take
def test_double_backward_through_sinks(backend):
    """create_graph=True recomputes through the reference math, sinks included (gradgradcheck)."""
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (4, 5, 5))
    sinks = torch.randn(2, dtype=torch.float64)
    slopes = torch.rand(2, dtype=torch.float64)
    call = attn_ops.prepare_attention(q, k, v, causal=True, sinks=sinks, alibi_slopes=slopes, softcap=4.0)
    if backends.why_not(attn_ops.OP, backend, call.device, call) is not None:
        pytest.skip(f"{backend} does not take this call here")

    def f(q_, k_, v_, s_):
        return seqkernels.attention(q_, k_, v_, causal=True, sinks=s_, alibi_slopes=slopes, softcap=4.0,
                                    backend=backend)  # fmt: skip

    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v, sinks))
    assert torch.autograd.gradgradcheck(f, inputs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_drop_in_takes_the_modifiers(backend):
    device = _device_for(backend)
    q, k, v = (torch.randn(2, 4, n, 16, device=device) for n in (7, 11, 11))
    mk = dict(softcap=5.0, alibi_slopes=torch.rand(4, device=device), sinks=torch.randn(4, device=device))
    _skip_unless_runs(backend, q, k, v, mk)
    got = seqkernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend, **mk)
    want, _ = eager_attention(q.double(), k.double(), v.double(), causal=True, bottom_right=False,
                              **_to64(mk))  # fmt: skip
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# Decode against the cache.


def _cache(B, Hkv, S, D, paged, device, g):
    k = torch.randn(B, Hkv, S, D, generator=g).to(device)
    v = torch.randn(B, Hkv, S, D, generator=g).to(device)
    if not paged:
        return k, v, None
    bs = 4
    nb = S // bs
    perm = torch.randperm(B * nb, generator=g)
    table = perm.view(B, nb).to(device=device, dtype=torch.int32)
    kc = torch.empty(B * nb, Hkv, bs, D, device=device)
    vc = torch.empty_like(kc)
    for b in range(B):
        for c in range(nb):
            kc[table[b, c]] = k[b, :, c * bs : (c + 1) * bs]
            vc[table[b, c]] = v[b, :, c * bs : (c + 1) * bs]
    return kc, vc, table


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mods", ["softcap", "alibi", "sinks", "all"], ids=str)
@pytest.mark.parametrize("Tq,paged,splits", [(1, False, 1), (3, True, 1), (1, True, 3), (4, False, 2)])
def test_decode_parity(backend, mods, Tq, paged, splits):
    device = _device_for(backend)
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, S, D = 2, 4, 2, 24, 16
    kc, vc, table = _cache(B, Hkv, S, D, paged, device, g)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(device)
    lens = torch.tensor([Tq + 2, 21], dtype=torch.int32, device=device)
    mk = _modifiers(B, Hq, MODS[mods], device, torch.float32, g)
    if "sinks" in mk:
        mk["sinks"] = mk["sinks"].detach()
    call = kv_ops.prepare_decode(q, kc, vc, lens, block_table=table, num_splits=splits, **mk)
    reason = backends.why_not(kv_ops.DECODE_OP, backend, call.device, call)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    out, lse = seqkernels.decode_attention(q, kc, vc, lens, block_table=table, num_splits=splits, return_lse=True,
                                           backend=backend, **mk)  # fmt: skip
    ref = seqkernels.decode_attention(q.double().cpu(), kc.double().cpu(), vc.double().cpu(), lens.cpu(),
                                      block_table=None if table is None else table.cpu(), return_lse=True,
                                      backend="reference", **_to64(mk))  # fmt: skip
    base = seqkernels.decode_attention(q, kc, vc, lens, block_table=table, return_lse=True, backend="reference", **mk)
    rep = testing.compare((out.cpu(), lse.cpu()), ref, tuple(t.cpu() for t in base))
    assert rep.passed, str(rep)


def test_decode_reference_is_attention_over_the_cache():
    """Decode's queries sit at the end of the sequence: the same numbers as `attention` (bottom-right)
    over the valid prefix, modifiers included."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64)
    kc = torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float64)
    vc = torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float64)
    mk = dict(softcap=2.0, alibi_slopes=torch.tensor([0.25, 0.5], dtype=torch.float64),
              sinks=torch.tensor([0.1, -0.3], dtype=torch.float64))  # fmt: skip
    got = seqkernels.decode_attention(q, kc, vc, torch.tensor([7]), backend="reference", **mk)
    want, _ = eager_attention(q, kc[:, :, :7], vc[:, :, :7], causal=True, **mk)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(sinks=torch.zeros(2)), ValueError, r"sinks: expected shape \(Hq,\) = \(4,\)"),
        (dict(sinks=torch.zeros(1, 4)), ValueError, "sinks: expected shape"),
        (dict(sinks=torch.zeros(4, dtype=torch.int64)), TypeError, "sinks: expected dtype"),
        (dict(sinks=torch.tensor([0.0, math.nan, 0.0, 0.0])), ValueError, "sinks: .*NaN"),
        (dict(sinks=torch.tensor([0.0, math.inf, 0.0, 0.0])), ValueError, r"sinks: .*\+inf"),
        (dict(alibi_slopes=torch.zeros(2)), ValueError, "alibi_slopes: expected shape"),
        (dict(alibi_slopes=torch.zeros(3, 4)), ValueError, "alibi_slopes: expected shape"),
        (dict(alibi_slopes=torch.zeros(4, dtype=torch.bfloat16)), TypeError, "alibi_slopes: expected dtype"),
        (dict(alibi_slopes=torch.tensor([0.1, math.nan, 0.1, 0.1])), ValueError, "alibi_slopes: contains NaN"),
        (dict(softcap=0.0), ValueError, "softcap: expected a finite float > 0"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap=math.nan), ValueError, "softcap"),
        (dict(softcap=math.inf), ValueError, "softcap"),
        (dict(softcap=True), TypeError, "softcap"),
        # Finite, but outside float32, where float32 inputs' kernels apply the cap (inf * 0 there).
        (dict(softcap=1e39), ValueError, r"softcap: expected a value in \[.*\] for float32 inputs"),
        (dict(softcap=1e-300), ValueError, r"softcap: expected a value in \[.*\] for float32 inputs"),
        (dict(softcap="50"), TypeError, "softcap"),
    ],
)
def test_bad_modifiers_are_named(kw, exc, match):
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    with pytest.raises(exc, match=match):
        seqkernels.attention(q, k, v, **kw)
    kc, vc = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    with pytest.raises(exc, match=match):
        seqkernels.decode_attention(q[:, :, :1], kc, vc, torch.tensor([3, 4]), **kw)


def test_cpp_ops_check_modifiers_themselves():
    """A direct call of the C++ op (no public layer) still names the argument."""
    if not _ext.extension_available():
        pytest.skip("seqkernels._C is not built")
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    args = (q, k, v, None, None, 0.3, -1, -1, True, 0.0, 0, 0)
    fwd = torch.ops.seqkernels.attention_fwd
    with pytest.raises(RuntimeError, match="sinks must have shape"):
        fwd(*args, None, torch.zeros(2), 0.0)
    with pytest.raises(RuntimeError, match="alibi_slopes must be Float"):
        fwd(*args, torch.zeros(1, 4, dtype=torch.float64), None, 0.0)
    with pytest.raises(RuntimeError, match="softcap must be a finite number"):
        fwd(*args, None, None, -2.0)
    with pytest.raises(RuntimeError, match=r"softcap must lie in \["):
        fwd(*args, None, None, 1e39)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_float64_takes_caps_past_float32(backend):
    """float64 inputs compute the cap in float64: a cap of 1e300 is in range there and leaves the
    scores as they are (c * tanh(s / c) = s to float64 rounding)."""
    if backend == "cpu" and not _ext.extension_available():
        pytest.skip("seqkernels._C is not built")
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    got = seqkernels.attention(q, k, v, softcap=1e300, backend=backend)
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_unsupported_modifier_refuses_explicitly_and_auto_falls_through(monkeypatch):
    """A backend whose row of the capability table lacks a modifier: an explicit request raises
    naming it, the automatic choice takes the next backend that has it (never wrong numbers)."""
    row = capabilities.TABLE["attention"]["cpu"]
    import dataclasses

    monkeypatch.setitem(capabilities.TABLE["attention"], "cpu", dataclasses.replace(row, modifiers=("softcap",)))
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    sinks = torch.zeros(2)
    with pytest.raises(Exception, match="sinks: not supported by the C\\+\\+ CPU kernels"):
        seqkernels.attention(q, k, v, sinks=sinks, backend="cpu")
    assert "sinks: not supported" in str(seqkernels.explain("attention", q, k, v, sinks=sinks))
    out = seqkernels.attention(q, k, v, sinks=sinks)
    want, _ = eager_attention(q.double(), k.double(), v.double(), sinks=sinks.double())
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-5)

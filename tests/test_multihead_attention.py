"""seqkernels.nn.MultiheadAttention against torch.nn.MultiheadAttention: the argument grid, masks,
unbatched and nested inputs, is_causal semantics, dropout, gradients, state_dict (DESIGN §2, §5)."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn

import seqkernels
import seqkernels.ops.attention as attention_ops
from seqkernels.nn.multihead_attention import MultiheadAttention

E, H = 24, 3  # head_dim 8
FLOOR = {torch.float32: 2.0**-23, torch.float64: 2.0**-36}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These shapes are tiny: on a small shared machine the intra-op thread pool costs ~100x the math.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_parity(out, out_torch, out_ref, factor=2.0):
    """DESIGN §5: err(ours) <= factor * err(torch in the same dtype) + floor, both against torch in
    float64; NaN positions agree; float32/float64 also pass assert_close against torch."""
    if out is None:
        assert out_torch is None
        return
    assert out.shape == out_torch.shape and out.dtype == out_torch.dtype
    assert torch.equal(torch.isnan(out), torch.isnan(out_ref.to(out.dtype))), "NaN positions differ"
    torch.testing.assert_close(out, out_torch, equal_nan=True)
    ok = ~torch.isnan(out_ref)
    ref = out_ref.double()[ok]
    err_k = (out.double()[ok] - ref).abs().max().item() if ref.numel() else 0.0
    err_t = (out_torch.double()[ok] - ref).abs().max().item() if ref.numel() else 0.0
    assert err_k <= factor * err_t + FLOOR[out.dtype], f"err {err_k:.3e} > {factor} * torch err {err_t:.3e} + floor"


def make_pair(dtype=torch.float64, heads=H, **kw):
    """A torch module with random (non-default) parameters, our module sharing them, and a float64
    copy of the torch module as the reference."""
    t = nn.MultiheadAttention(E, heads, **kw).to(dtype)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = MultiheadAttention.from_torch(t)
    ref = copy.deepcopy(t).double()
    return t, ours, ref


def rand_inputs(N, L, S, kdim, vdim, batch_first, dtype, unbatched=False, grad=False):
    def mk(n, length, e):
        shape = (length, e) if unbatched else ((n, length, e) if batch_first else (length, n, e))
        return torch.randn(shape, dtype=dtype, requires_grad=grad)

    return mk(N, L, E), mk(N, S, kdim), mk(N, S, vdim)


def rand_mask(kind, N, L, S, dtype, unbatched=False):
    """Masks with torch-MHA polarity where no query row is fully blocked (column 0 always open)."""
    if kind is None:
        return None
    what, form = kind
    if what == "kpm":
        shape = (S,) if unbatched else (N, S)
    else:
        shape = (L, S) if form.endswith("2d") else (H if unbatched else N * H, L, S)
    blocked = torch.rand(shape) < 0.35
    blocked[..., 0] = False
    if form.startswith("bool"):
        return blocked
    return torch.randn(shape, dtype=dtype).masked_fill(blocked, float("-inf"))


def run_both(t, ours, ref, inputs, kwargs):
    dtype = inputs[0].dtype
    out_t = t(*inputs, **kwargs)
    out_o = ours(*inputs, **kwargs)
    ref_kwargs = {
        k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()
    }
    out_r = ref(*[x.detach().double() for x in inputs], **ref_kwargs)
    assert out_o[0].dtype == dtype
    return out_o, out_t, out_r


MODULE_GRID = [
    dict(batch_first=bf, kdim=kd, vdim=vd, bias=b, add_bias_kv=bkv, add_zero_attn=z)
    for bf, (kd, vd), b, bkv, z in itertools.product(
        (False, True), ((None, None), (11, 7)), (True, False), (False, True), (False, True)
    )
]
MASK_GRID = [
    (None, None),
    (("attn", "bool2d"), None),
    (("attn", "float2d"), None),
    (("attn", "bool3d"), None),
    (("attn", "float3d"), None),
    (None, ("kpm", "bool")),
    (None, ("kpm", "float")),
    (("attn", "bool2d"), ("kpm", "bool")),
    (("attn", "float3d"), ("kpm", "bool")),  # mixed types: torch warns, adds them as floats
]


def _ids(kw):
    return "-".join(f"{k}={v}" for k, v in kw.items() if v not in (None, False)) or "default"


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("masks", MASK_GRID, ids=lambda m: "+".join(f"{x[0]}-{x[1]}" for x in m if x) or "nomask")
@pytest.mark.parametrize("kw", MODULE_GRID, ids=_ids)
def test_forward_grid_float64(kw, masks):
    t, ours, ref = make_pair(torch.float64, **kw)
    N, L, S = 2, 5, 7
    kdim, vdim = kw["kdim"] or E, kw["vdim"] or E
    q, k, v = rand_inputs(N, L, S, kdim, vdim, kw["batch_first"], torch.float64)
    am = rand_mask(masks[0], N, L, S, torch.float64)
    kpm = rand_mask(masks[1], N, L, S, torch.float64)
    for need_weights, average in ((True, True), (True, False), (False, True)):
        args = dict(attn_mask=am, key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=average)
        (o, w), (ot, wt), (orf, wrf) = run_both(t, ours, ref, (q, k, v), args)
        assert_parity(o, ot, orf)
        assert_parity(w, wt, wrf)


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L,S", [(1, 1), (1, 17), (17, 1), (17, 17), (97, 40)])
@pytest.mark.parametrize("self_attention", [True, False])
def test_forward_sizes_dtypes(L, S, dtype, self_attention):
    t, ours, ref = make_pair(dtype, batch_first=True)
    N = 3
    if self_attention:
        S = L
        x = torch.randn(N, L, E, dtype=dtype)
        q = k = v = x
    else:
        q, k, v = rand_inputs(N, L, S, E, E, True, dtype)
    kpm = rand_mask(("kpm", "bool"), N, L, S, dtype)
    am = rand_mask(("attn", "float2d"), N, L, S, dtype)
    for need_weights in (True, False):
        for masks in (dict(), dict(key_padding_mask=kpm), dict(key_padding_mask=kpm, attn_mask=am)):
            (o, w), (ot, wt), (orf, wrf) = run_both(t, ours, ref, (q, k, v), dict(need_weights=need_weights, **masks))
            assert_parity(o, ot, orf)
            assert_parity(w, wt, wrf)


@pytest.mark.parametrize(
    "masks",
    [(None, None), (("attn", "bool2d"), ("kpm", "bool")), (("attn", "float3d"), None), (None, ("kpm", "float"))],
    ids=str,
)
@pytest.mark.parametrize(
    "kw", [dict(), dict(kdim=11, vdim=7, add_bias_kv=True), dict(add_zero_attn=True, batch_first=True)], ids=_ids
)
def test_unbatched(kw, masks):
    t, ours, ref = make_pair(torch.float64, **kw)
    L, S = 6, 9
    q, k, v = rand_inputs(1, L, S, kw.get("kdim", E), kw.get("vdim", E), False, torch.float64, unbatched=True)
    am = rand_mask(masks[0], 1, L, S, torch.float64, unbatched=True)
    kpm = rand_mask(masks[1], 1, L, S, torch.float64, unbatched=True)
    for need_weights, average in ((True, True), (True, False), (False, True)):
        args = dict(attn_mask=am, key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=average)
        (o, w), (ot, wt), (orf, wrf) = run_both(t, ours, ref, (q, k, v), args)
        assert o.shape == (L, E)
        assert_parity(o, ot, orf)
        assert_parity(w, wt, wrf)


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize(
    "kw,masks",
    [
        (dict(batch_first=True), (("attn", "float2d"), ("kpm", "bool"))),
        (dict(kdim=11, vdim=7, add_bias_kv=True, add_zero_attn=True), (("attn", "bool3d"), None)),
        (dict(bias=False), (None, ("kpm", "float"))),
    ],
    ids=["packed", "separate-biaskv-zero", "nobias"],
)
def test_gradients(kw, masks, need_weights, dtype):
    t, ours, ref = make_pair(dtype, **kw)
    N, L, S = 2, 5, 7
    inputs = rand_inputs(N, L, S, kw.get("kdim", E), kw.get("vdim", E), kw.get("batch_first", False), dtype, grad=True)
    am = rand_mask(masks[0], N, L, S, dtype)
    kpm = rand_mask(masks[1], N, L, S, dtype)
    args = dict(attn_mask=am, key_padding_mask=kpm, need_weights=need_weights)
    cot = torch.randn(N, L, E, dtype=dtype) if kw.get("batch_first") else torch.randn(L, N, E, dtype=dtype)

    def grads(module, xs):
        module.zero_grad()
        out, w = module(
            *xs,
            **{
                k: (v.to(xs[0].dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in args.items()
            },
        )
        loss = (out * cot.to(out.dtype)).sum() + (w.square().sum() if w is not None else 0)
        gx = torch.autograd.grad(loss, list(xs) + list(module.parameters()))
        return gx

    g_o = grads(ours, inputs)
    # ours shares t's parameters; run torch second on fresh leaves of the same values
    g_t = grads(t, [x.detach().clone().requires_grad_() for x in inputs])
    g_r = grads(ref, [x.detach().double().requires_grad_() for x in inputs])
    assert len(g_o) == len(g_t) == len(g_r)
    for a, b, c in zip(g_o, g_t, g_r):
        assert_parity(a, b, c, factor=3.0)


def test_gradcheck_float64():
    _, ours, _ = make_pair(torch.float64, batch_first=True, add_bias_kv=True)
    q, k, v = rand_inputs(2, 3, 4, E, E, True, torch.float64, grad=True)
    kpm = torch.tensor([[False, False, True, False], [False, True, False, False]])
    for need_weights in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, b, c, nw=need_weights: ours(a, b, c, key_padding_mask=kpm, need_weights=nw)[0], (q, k, v)
        )


# ---------------------------------------------------------------------------------------------
# is_causal: a hint that requires attn_mask (torch's F.multi_head_attention_forward rule).


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("kw", [dict(batch_first=True), dict(add_bias_kv=True, add_zero_attn=True)], ids=_ids)
def test_is_causal_semantics(kw):
    # torch's module takes an inference fast path that ignores the hint; training mode with dropout 0
    # is torch's documented (slow) path, the one the hint rules are written for.
    t, ours, ref = make_pair(torch.float64, **kw)
    t.train(), ours.train(), ref.train()
    N, L = 2, 6
    x = (
        torch.randn(N, L, E, dtype=torch.float64)
        if kw.get("batch_first")
        else torch.randn(L, N, E, dtype=torch.float64)
    )
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    not_causal = rand_mask(("attn", "bool2d"), N, L, L, torch.float64)
    kpm = rand_mask(("kpm", "bool"), N, L, L, torch.float64)
    with pytest.raises(RuntimeError, match="attn_mask"):
        ours(x, x, x, is_causal=True, need_weights=False)
    with pytest.raises(RuntimeError):
        t(x, x, x, is_causal=True, need_weights=False)
    for am, pad, need_weights in itertools.product((causal, not_causal), (None, kpm), (True, False)):
        args = dict(attn_mask=am, key_padding_mask=pad, need_weights=need_weights, is_causal=True)
        (o, w), (ot, wt), (orf, wrf) = run_both(t, ours, ref, (x, x, x), args)
        assert_parity(o, ot, orf)
        assert_parity(w, wt, wrf)


def test_is_causal_uses_causal_kernel_without_reading_mask(monkeypatch):
    _, ours, _ = make_pair(torch.float64, batch_first=True)
    calls = []
    real = attention_ops.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append((a[3], a[5]))
        return real(*a, **k)

    monkeypatch.setattr(attention_ops, "scaled_dot_product_attention", spy)
    x = torch.randn(2, 5, E, dtype=torch.float64)
    ours(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(5), is_causal=True, need_weights=False)
    assert calls == [(None, True)]


# ---------------------------------------------------------------------------------------------


def test_fully_masked_rows():
    """Fused path: a row that sees no key gives 0, as torch's SDPA path; need_weights path: NaN, as
    torch's softmax."""
    t, ours, _ = make_pair(torch.float64, batch_first=True)
    t.train(), ours.train()
    x = torch.randn(2, 4, E, dtype=torch.float64)
    am = torch.zeros(4, 4, dtype=torch.bool)
    am[1] = True
    for need_weights in (True, False):
        o, _ = ours(x, x, x, attn_mask=am, need_weights=need_weights)
        ot, _ = t(x, x, x, attn_mask=am, need_weights=need_weights)
        torch.testing.assert_close(o, ot, equal_nan=True)
        assert torch.isnan(o[:, 1]).all() == need_weights


@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch_with_masks(batch_first):
    """N = 0 with a key_padding_mask or a 3-D attn_mask: torch's shapes (the masks' key dim was once
    inferred with -1, which an empty batch cannot give)."""
    t, ours, _ = make_pair(torch.float64, batch_first=batch_first)
    x = torch.randn((0, 5, E) if batch_first else (5, 0, E), dtype=torch.float64, requires_grad=True)
    for kw in (
        dict(key_padding_mask=torch.zeros(0, 5, dtype=torch.bool)),
        dict(attn_mask=torch.zeros(0, 5, 5, dtype=torch.bool)),
    ):
        o, w = ours(x, x, x, **kw)
        ot, wt = t(x, x, x, **kw)
        assert o.shape == ot.shape and w.shape == wt.shape
        (g,) = torch.autograd.grad(o.sum(), x)
        assert g.shape == x.shape


def test_dropout_need_weights_matches_torch_draws():
    """need_weights=True draws its dropout mask from torch's RNG in torch's order: same result."""
    t, ours, _ = make_pair(torch.float64, dropout=0.4, batch_first=True)
    t.train(), ours.train()
    q, k, v = rand_inputs(2, 5, 7, E, E, True, torch.float64)
    torch.manual_seed(123)
    ot, wt = t(q, k, v, average_attn_weights=False)
    torch.manual_seed(123)
    o, w = ours(q, k, v, average_attn_weights=False)
    torch.testing.assert_close(o, ot)
    torch.testing.assert_close(w, wt)
    assert (w == 0).any()


def test_dropout_fused_path():
    _, ours, _ = make_pair(torch.float32, dropout=0.5, batch_first=True)
    q, k, v = rand_inputs(2, 9, 9, E, E, True, torch.float32, grad=True)
    ours.eval()
    o_eval, _ = ours(q, k, v, need_weights=False)
    ours.train()
    o1, w = ours(q, k, v, need_weights=False)
    o2, _ = ours(q, k, v, need_weights=False)
    assert w is None and o1.shape == (2, 9, E) and torch.isfinite(o1).all()
    assert not torch.allclose(o1, o_eval) and not torch.allclose(o1, o2)
    o1.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_need_weights_false_goes_through_seqkernels(monkeypatch):
    _, ours, _ = make_pair(torch.float32, batch_first=True)
    calls = []
    real = attention_ops.attention

    def spy(*a, **k):
        calls.append(k.get("backend"))
        return real(*a, **k)

    monkeypatch.setattr(attention_ops, "attention", spy)
    x = torch.randn(2, 5, E)
    ours(x, x, x, need_weights=True)
    assert calls == []
    ours(x, x, x, need_weights=False)
    ours.backend = "reference"
    ours(x, x, x, need_weights=False)
    assert calls == [None, "reference"]


def test_backend_argument():
    m = MultiheadAttention(E, H, backend="reference", batch_first=True)
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        t = m.to_torch()
        torch.testing.assert_close(m(x, x, x, need_weights=False)[0], t(x, x, x, need_weights=False)[0])
    with pytest.raises(ValueError, match="backend"):
        MultiheadAttention(E, H, backend="nope")
    assert "backend='reference'" in repr(m)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_input_matches_torch_fast_path():
    t, ours, _ = make_pair(torch.float32, heads=4, batch_first=True)  # torch's fast path needs even heads
    t.eval(), ours.eval()
    parts = [torch.randn(n, E) for n in (5, 2, 7)]
    x = torch.nested.nested_tensor(parts)
    with torch.no_grad():
        ot, _ = t(x, x, x, need_weights=False)
        o, _ = ours(x, x, x, need_weights=False)
    assert o.is_nested
    for a, b in zip(o.unbind(), ot.unbind()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="need_weights"):
        ours(x, x, x)


def test_state_dict_and_parameter_names():
    for kw in (dict(), dict(kdim=11, vdim=7, add_bias_kv=True, bias=False)):
        t = nn.MultiheadAttention(E, H, **kw)
        o = MultiheadAttention(E, H, **kw)
        assert [n for n, _ in t.named_parameters()] == [n for n, _ in o.named_parameters()]
        assert list(t.state_dict()) == list(o.state_dict())
        o.load_state_dict(t.state_dict())
        t2 = nn.MultiheadAttention(E, H, **kw)
        t2.load_state_dict(o.state_dict())
        for a, b in zip(t2.parameters(), t.parameters()):
            assert torch.equal(a, b)
        assert isinstance(o, nn.MultiheadAttention)
        assert type(o.out_proj) is type(t.out_proj)


def test_from_torch_shares_and_to_torch_restores():
    t = nn.MultiheadAttention(E, H, dropout=0.1, batch_first=True).double()
    t.eval()
    seen = []
    t.register_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    o = MultiheadAttention.from_torch(t, backend="reference")
    assert o.in_proj_weight is t.in_proj_weight and o.out_proj is t.out_proj
    assert not o.training and o.in_proj_weight.dtype == torch.float64 and o.backend == "reference"
    assert len(o._forward_pre_hooks) == 1 and len(t._forward_pre_hooks) == 0
    x = torch.randn(2, 3, E, dtype=torch.float64)
    o(x, x, x)
    back = o.to_torch()
    assert type(back) is nn.MultiheadAttention and back.in_proj_weight is t.in_proj_weight
    assert len(back._forward_pre_hooks) == 0 and not hasattr(back, "backend")
    back(x, x, x)
    assert seen == ["MultiheadAttention", "MultiheadAttention"]
    assert isinstance(copy.deepcopy(o), MultiheadAttention)


def test_input_errors():
    m = MultiheadAttention(E, H)
    x = torch.randn(5, 2, E)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="query"):
        m(torch.randn(1, 5, 2, E), x, x)
    with pytest.raises(ValueError, match="embedding dim"):
        m(torch.randn(5, 2, E + 1), x, x)


def test_exported_names():
    assert seqkernels.nn.MultiheadAttention is MultiheadAttention

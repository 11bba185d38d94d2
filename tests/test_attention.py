"""The public attention API on every backend this machine can run, against the float64 reference
(DESIGN §5). Backend-specific extras live in test_attention_<backend>.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA

import seqkernels
from seqkernels import backends, testing
from seqkernels.ops import attention as attn_ops

BACKENDS = ["reference", "cpu", "triton"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _device_for(backend):
    if backend == "cuda":
        return "cuda"
    if backend == "triton" and HAS_CUDA:
        return "cuda"
    return "cpu"


def _skip_unless_runs(backend, call):
    reason = backends.why_not(attn_ops.OP, backend, call.device, call)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


# (B, Hq, Hkv, Lq, Lk, D, Dv, kwargs)
CASES = [
    (1, 2, 2, 1, 1, 16, 16, {}),
    (2, 2, 2, 17, 17, 40, 40, {"causal": True}),
    (1, 4, 2, 17, 97, 64, 64, {"causal": True}),
    (2, 4, 1, 97, 17, 64, 32, {}),
    (1, 2, 2, 33, 33, 80, 80, {"window": (7, 3)}),
    (2, 2, 2, 17, 40, 64, 64, {"kv_lengths": [0, 23], "causal": True}),
    (1, 2, 2, 5, 128, 128, 128, {"window": (16, -1)}),
    (1, 1, 1, 3, 19, 256, 256, {}),
    (2, 2, 2, 17, 23, 32, 32, {"mask": "bool_bcast"}),
    (1, 2, 2, 19, 17, 32, 48, {"mask": "float_full"}),
    (2, 2, 2, 21, 37, 32, 32, {"mask": "bool_transposed"}),
]


def _build(case, dtype, device):
    B, Hq, Hkv, Lq, Lk, D, Dv, kw = case
    q = torch.randn(B, Hq, Lq, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=dtype, device=device)
    kwargs = {k_: v_ for k_, v_ in kw.items() if k_ != "mask"}
    if "kv_lengths" in kwargs:
        kwargs["kv_lengths"] = torch.tensor(kwargs["kv_lengths"], dtype=torch.int32, device=device)
    mask = kw.get("mask")
    if mask == "bool_bcast":
        m = torch.rand(B, 1, 1, Lk, device=device) > 0.3
        m[..., 0] = False  # row-independent mask; some keys hidden for all rows
        kwargs["attn_mask"] = m
    elif mask == "bool_transposed":
        # Row-dependent, heads broadcast, keys Lq elements apart in memory (a mask built (Lk, Lq)):
        # the kernels must walk the key stride, not assume 1.
        m = (torch.rand(B, 1, Lk, Lq, device=device) > 0.3).transpose(-1, -2)
        m[:, :, 4] = False  # a fully masked row
        kwargs["attn_mask"] = m
    elif mask == "float_full":
        m = torch.randn(B, Hq, Lq, Lk, device=device).to(dtype)
        m[:, :, 2] = float("-inf")  # a fully masked row
        kwargs["attn_mask"] = m
    return q, k, v, kwargs


def _to64(kwargs):
    out = {}
    for k_, v_ in kwargs.items():
        if isinstance(v_, torch.Tensor):
            v_ = v_.cpu()
            if v_.is_floating_point():
                v_ = v_.double()
        out[k_] = v_
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: f"B{c[0]}H{c[1]}-{c[2]}L{c[3]}x{c[4]}D{c[5]}-{c[6]}{'-' + '-'.join(map(str, c[7])) if c[7] else ''}",
)
def test_forward_and_lse_parity(backend, dtype, case):
    device = _device_for(backend)
    q, k, v, kwargs = _build(case, dtype, device)
    _skip_unless_runs(backend, attn_ops.prepare_attention(q, k, v, **kwargs))
    out, lse = seqkernels.attention(q, k, v, return_lse=True, backend=backend, **kwargs)
    ref_out, ref_lse = seqkernels.attention(
        q.cpu().double(), k.cpu().double(), v.cpu().double(), return_lse=True, backend="reference", **_to64(kwargs)
    )
    base_out, base_lse = seqkernels.attention(q, k, v, return_lse=True, backend="reference", **kwargs)
    assert out.dtype == dtype and out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    report = testing.compare((out.cpu(), lse.cpu()), (ref_out, ref_lse), (base_out.cpu(), base_lse.cpu()))
    assert report.passed, str(report)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES[1:7] + CASES[8:], ids=lambda c: f"L{c[3]}x{c[4]}D{c[5]}-{c[6]}-{c[7]}")
def test_backward_parity(backend, dtype, case):
    device = _device_for(backend)
    q, k, v, kwargs = _build(case, dtype, device)
    _skip_unless_runs(backend, attn_ops.prepare_attention(q, k, v, **kwargs))
    g = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=dtype, device=device)

    def grads(backend_, q_, k_, v_, g_, kw):
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q_, k_, v_))
        out = seqkernels.attention(q_, k_, v_, backend=backend_, **kw)
        out.backward(g_)
        return q_.grad.cpu(), k_.grad.cpu(), v_.grad.cpu()

    got = grads(backend, q, k, v, g, kwargs)
    ref64 = grads("reference", q.cpu().double(), k.cpu().double(), v.cpu().double(), g.cpu().double(), _to64(kwargs))
    base = grads("reference", q, k, v, g, kwargs)
    report = testing.compare(got, ref64, base, grad=True)
    assert report.passed, str(report)


def _sdpa_inputs(shape_q, shape_kv, dtype):
    return (
        torch.randn(*shape_q, dtype=dtype),
        torch.randn(*shape_kv, dtype=dtype),
        torch.randn(*shape_kv, dtype=dtype),
    )


@pytest.mark.parametrize(
    "shape_q,shape_kv,kw",
    [
        ((2, 3, 17, 16), (2, 3, 23, 16), {}),
        ((2, 3, 17, 16), (2, 3, 11, 16), {"is_causal": True}),
        ((2, 4, 9, 32), (2, 2, 9, 32), {"is_causal": True, "enable_gqa": True}),
        ((3, 17, 16), (3, 5, 16), {"mask": (17, 5)}),
        ((17, 8), (6, 8), {"scale": 0.3}),
        ((2, 2, 2, 7, 16), (2, 2, 2, 9, 16), {"mask": (2, 1, 7, 9)}),
        ((1, 2, 7, 16), (1, 2, 9, 16), {"fmask": (7, 9)}),
    ],
)
def test_sdpa_matches_torch(shape_q, shape_kv, kw):
    q, k, v = _sdpa_inputs(shape_q, shape_kv, torch.float64)
    kw = dict(kw)
    if "mask" in kw:
        kw["attn_mask"] = torch.rand(kw.pop("mask")) > 0.4
    if "fmask" in kw:
        m = torch.randn(kw.pop("fmask"), dtype=torch.float64)
        m[3] = float("-inf")
        kw["attn_mask"] = m
    expected = F.scaled_dot_product_attention(q, k, v, **kw)
    got = seqkernels.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(got, expected)


def test_sdpa_rejects_what_torch_rejects():
    q, k, v = _sdpa_inputs((1, 4, 5, 8), (1, 2, 5, 8), torch.float32)
    with pytest.raises(ValueError, match="enable_gqa"):
        seqkernels.scaled_dot_product_attention(q, k, v)
    q, k, v = _sdpa_inputs((1, 2, 5, 8), (1, 2, 5, 8), torch.float32)
    with pytest.raises(ValueError, match="is_causal"):
        seqkernels.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, k, v: (q.double(), k, v), TypeError, "k: dtype"),
        (lambda q, k, v: (q[0], k, v), ValueError, "q: expected a 4-D"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "q: expected dtype"),
        (lambda q, k, v: (q, k[:, :, :, :8], v), ValueError, "head dim"),
        (
            lambda q, k, v: (torch.randn(1, 3, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)),
            ValueError,
            "multiple",
        ),
        (
            lambda q, k, v: (torch.randn(1, 2, 5, 300), torch.randn(1, 2, 7, 300), torch.randn(1, 2, 7, 16)),
            ValueError,
            "head dims",
        ),
        (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "v: expected shape"),
    ],
)
def test_bad_inputs_are_named(mutate, exc, match):
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    with pytest.raises(exc, match=match):
        seqkernels.attention(*mutate(q, k, v))


def test_bad_mask_and_lengths_are_named():
    q, k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    with pytest.raises(ValueError, match="attn_mask: shape"):
        seqkernels.attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"kv_lengths: expected shape \(2,\)"):
        seqkernels.attention(q, k, v, kv_lengths=torch.tensor([3], dtype=torch.int32))
    with pytest.raises(TypeError, match="kv_lengths: expected dtype"):
        seqkernels.attention(q, k, v, kv_lengths=torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="kv_lengths: values must lie"):
        seqkernels.attention(q, k, v, kv_lengths=torch.tensor([3, 8]))
    with pytest.raises(ValueError, match="window"):
        seqkernels.attention(q, k, v, window=(3,))


def test_lse_gradient_matches_reference():
    # The lse output is differentiable on every backend (ring-attention style merges need it).
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = seqkernels.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    torch.autograd.gradcheck(
        lambda q_, k_: seqkernels.attention(q_, k_, v, causal=True, return_lse=True, backend="reference")[1], (q, k)
    )


def test_fully_masked_rows_are_zero_with_zero_grads():
    q, k, v = (torch.randn(1, 1, 4, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kvl = torch.tensor([2])  # rows 0, 1 of a bottom-right causal pattern with Lk_b=2, Lq=4 see nothing
    out, lse = seqkernels.attention(q, k, v, causal=True, kv_lengths=kvl, return_lse=True)
    assert torch.all(out[0, 0, :2] == 0) and torch.all(torch.isneginf(lse[0, 0, :2]))
    out.sum().backward()
    assert torch.all(q.grad[0, 0, :2] == 0) and not torch.isnan(q.grad).any()

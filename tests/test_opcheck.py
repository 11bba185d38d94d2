"""torch.library.opcheck over every custom op in torch.ops.seqkernels (schema, fake kernel, autograd
registration, AOT dispatch): the attention families and the LSTM sequence op here; the KV-cache and
LSTM-cell families in their own files (listed in ELSEWHERE). A new op without an opcheck fails
`test_every_op_is_opchecked`."""

import pytest
import torch

import seqkernels  # noqa: F401  (registers every op family at import)
from seqkernels import _ext
from seqkernels.ops import attention as attn_ops
from seqkernels.ops import lstm as lstm_ops

HERE = {"attention_fwd", "attention_bwd", "triton_attention_fwd", "triton_attention_bwd", "lstm_layer_fwd"}
ELSEWHERE = {
    "kv_cache_append": "tests/test_kv_cache.py::test_opcheck",
    "triton_kv_cache_append": "tests/test_kv_cache.py::test_opcheck",
    "decode_attention": "tests/test_decode_attention.py::test_opcheck",
    "triton_decode_attention": "tests/test_decode_attention.py::test_opcheck",
    "lstm_cell_fwd": "tests/test_lstm_cell.py::test_opcheck",
    "lstm_cell_bwd": "tests/test_lstm_cell.py::test_opcheck",
    "triton_lstm_cell_fwd": "tests/test_lstm_cell.py::test_opcheck",
    "triton_lstm_cell_bwd": "tests/test_lstm_cell.py::test_opcheck",
}

needs_ext = pytest.mark.skipif(not _ext.extension_available(), reason="seqkernels._C is not built")


def _registered_ops() -> set:
    ns = torch.ops.seqkernels
    return {n for n in dir(ns) if isinstance(getattr(ns, n, None), torch._ops.OpOverloadPacket)}


def test_every_op_is_opchecked():
    ops = _registered_ops()
    if not _ext.extension_available():
        ops |= {n for n in HERE | set(ELSEWHERE) if not n.startswith("triton_")}
    assert ops == HERE | set(ELSEWHERE), f"ops without an opcheck: {sorted(ops - HERE - set(ELSEWHERE))}"


# One call per kind of input: plain, a float mask, kv_lengths with a window, bool mask with dropout
# (odd lengths, GQA 4 -> 2 heads, head dims 16/24).
CASES = {
    "plain": dict(),
    "float_mask": dict(mask="float"),
    "lengths_window": dict(lengths=True, window=(3, 0)),
    "bool_mask_dropout": dict(mask="bool", dropout_p=0.25),
}


def _attention_args(case, dtype=torch.float32):
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 5, 7, 16, 24
    q = torch.randn(B, Hq, Lq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=dtype, requires_grad=True)
    mask = None
    if case.get("mask") == "float":
        mask = torch.randn(B, Hq, Lq, Lk, dtype=dtype)
    elif case.get("mask") == "bool":
        mask = torch.rand(B, Hq, Lq, Lk) > 0.3
        mask[..., 0] = True
    call = attn_ops.prepare_attention(
        q,
        k,
        v,
        attn_mask=mask,
        kv_lengths=torch.tensor([7, 4]) if case.get("lengths") else None,
        window=case.get("window"),
        dropout_p=case.get("dropout_p", 0.0),
        seed=1234,
        causal=True,
    )
    return call


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("family", ["cpp", "triton"])
def test_attention_opcheck(family, case):
    if family == "cpp" and not _ext.extension_available():
        pytest.skip("seqkernels._C is not built")
    fwd, bwd = attn_ops.FAMILIES["cpu" if family == "cpp" else "triton"]
    call = _attention_args(CASES[case])
    torch.library.opcheck(fwd.default, call.args())
    with torch.no_grad():
        out, lse = fwd(*call.args())
    grad_out = torch.randn_like(out)
    q, k, v = (t.detach() for t in (call.q, call.k, call.v))
    call.q, call.k, call.v = q, k, v
    torch.library.opcheck(bwd.default, call.bwd_args(grad_out, out, lse))


@needs_ext
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_layer_opcheck(reverse):
    if not lstm_ops._HAS_LAYER_OP:
        pytest.skip("no CPU kernel for seqkernels::lstm_layer_fwd")
    T, B, H = 4, 3, 5
    gates = torch.randn(T, B, 4 * H)
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    w_hh, bias = torch.randn(4 * H, H), torch.randn(4 * H)
    torch.library.opcheck(torch.ops.seqkernels.lstm_layer_fwd.default, (gates, h0, c0, w_hh, bias, reverse))
    torch.library.opcheck(torch.ops.seqkernels.lstm_layer_fwd.default, (gates, h0, c0, w_hh, None, reverse))

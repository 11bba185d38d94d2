"""Backend resolution (DESIGN §3): argument > use_backend > SEQKERNELS_BACKEND > auto; explicit never falls back."""

import pytest
import torch

import seqkernels
from seqkernels import backends
from seqkernels.ops import attention as attn_ops


def _qkv(dtype=torch.float32):
    return (
        torch.randn(1, 2, 5, 16, dtype=dtype),
        torch.randn(1, 2, 7, 16, dtype=dtype),
        torch.randn(1, 2, 7, 16, dtype=dtype),
    )


def _chosen(*args, **kw):
    return seqkernels.explain("attention", *args, **kw).chosen


def test_auto_order_on_cpu_prefers_cpu_then_reference():
    q, k, v = _qkv()
    call = attn_ops.prepare_attention(q, k, v)
    cpu_ok = backends.why_not(attn_ops.OP, "cpu", q.device, call) is None
    assert _chosen(q, k, v) == ("cpu" if cpu_ok else "reference")


def test_precedence(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("SEQKERNELS_BACKEND", "reference")
    assert backends.requested(None) == ("reference", "the SEQKERNELS_BACKEND environment variable")
    with seqkernels.use_backend("cpu"):
        assert backends.requested(None)[0] == "cpu"
        assert backends.requested("reference")[0] == "reference"
        with seqkernels.use_backend(None):
            assert backends.requested(None)[0] == "reference"
    monkeypatch.setenv("SEQKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="SEQKERNELS_BACKEND"):
        seqkernels.attention(q, k, v)


def test_explicit_backend_never_falls_back():
    q, k, v = _qkv()
    with pytest.raises(seqkernels.BackendError, match="'cuda'.*CUDA tensors"):
        seqkernels.attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        seqkernels.attention(q, k, v, backend="flash")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    q, k, v = _qkv()
    call = attn_ops.prepare_attention(q, k, v)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "interpreter" in backends.why_not(attn_ops.OP, "triton", q.device, call)


def test_explain_reports_every_backend():
    q, k, v = _qkv(torch.float64)
    text = str(seqkernels.explain("attention", q, k, v, causal=True))
    for b in backends.BACKENDS:
        assert f"  {b}:" in text or f"runs on: {b}" in text
    assert "cuda: the cuda backend runs on CUDA tensors" in text
    with pytest.raises(ValueError, match="op_name"):
        seqkernels.explain("attn", q, k, v)


def test_not_implemented_is_reported_not_rerouted(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setattr(backends._ext, "has_kernel", lambda op, key: False)
    monkeypatch.setattr(backends, "_STATIC_REASONS", {})  # the per-(op, backend, device) cache
    call = attn_ops.prepare_attention(q, k, v)
    assert backends.why_not(attn_ops.OP, "cpu", q.device, call).startswith(backends.NOT_IMPLEMENTED)
    with pytest.raises(seqkernels.BackendError, match="not implemented on this backend yet"):
        seqkernels.attention(q, k, v, backend="cpu")
    assert _chosen(q, k, v) == "reference"


def test_import_does_not_touch_cuda():
    import subprocess
    import sys

    code = "import torch, seqkernels; assert not torch.cuda.is_initialized(), 'CUDA initialized at import'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_command_runs_on_this_machine(capsys):
    # `seqkernels check` over every backend: the cuda rows run on a GPU and are skipped (not
    # crashed on) where the extension has CUDA kernels but the machine has no device.
    from seqkernels import check

    assert check.main(ops=["lstm_cell", "kv_cache_append"], backends_=["cuda", "cpu"]) == 0
    out = capsys.readouterr().out
    assert " 0 failed" in out and "cpu" in out
    if not torch.cuda.is_available():
        assert "skip" in out


# ------------------------------------------------------------------------------------------------
# Per-call host work: a decode step or a small attention is a few microseconds of kernel, so every
# tensor op the Python layer dispatches around it (a no-op expand, an int32 cast of an int32
# tensor, five elementwise ops to validate lengths) is a visible share of the call. A valid call
# dispatches its kernel and at most the one reduction that validates its lengths on the host.
class _DispatchLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket).split(".")[-1] if func.namespace == "aten" else str(func))
        return func(*args, **(kwargs or {}))


def _cache_case(B=3, Hq=8, Hkv=4, S=40, D=24, lens_dtype=torch.int32):
    q = torch.randn(B, Hq, 2, D)
    kc, vc = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kn, vn = torch.randn(B, Hkv, 2, D), torch.randn(B, Hkv, 2, D)
    return q, kc, vc, kn, vn, torch.tensor([5, 17, 30][:B], dtype=lens_dtype)


_HOST_CHECK = ["aminmax", "_local_scalar_dense", "_local_scalar_dense"]  # min and max, read once


def _calls():
    q, kc, vc, kn, vn, lens = _cache_case()
    x, kx = torch.randn(2, 4, 5, 24), torch.randn(2, 2, 9, 24)
    lens64 = lens.long()
    return {
        "decode": (
            lambda: seqkernels.decode_attention(q, kc, vc, lens, backend="cpu"),
            "decode_attention",
            _HOST_CHECK,
        ),
        "decode_int64_lens": (
            lambda: seqkernels.decode_attention(q, kc, vc, lens64, backend="cpu"),
            "decode_attention",
            # the kernels read int32: one clamp and one cast of the caller's int64 lengths
            _HOST_CHECK + ["clamp", "_to_copy"],
        ),
        "append": (
            lambda: seqkernels.kv_cache_append(kc, vc, kn, vn, lens, backend="cpu"),
            "kv_cache_append",
            _HOST_CHECK,
        ),
        "append_unchecked": (
            lambda: seqkernels.kv_cache_append(kc, vc, kn, vn, lens, check=False, backend="cpu"),
            "kv_cache_append",
            [],
        ),
        "attention": (lambda: seqkernels.attention(x, x, x, backend="cpu"), "attention_fwd", []),
        # 4-D inputs whose leading dims agree go to the kernel as they are (only the output's
        # final reshape to the caller's leading shape is a view).
        "sdpa": (lambda: seqkernels.scaled_dot_product_attention(x, x, x, backend="cpu"), "attention_fwd", ["view"]),
        "sdpa_gqa": (
            lambda: seqkernels.scaled_dot_product_attention(x, kx, kx, enable_gqa=True, backend="cpu"),
            "attention_fwd",
            ["view"],
        ),
    }


@pytest.mark.skipif(not seqkernels._ext.extension_available(), reason="seqkernels._C is not built")
@pytest.mark.parametrize("case", list(_calls()))
def test_valid_call_dispatches_its_kernel_and_no_other_work(case):
    fn, kernel, host = _calls()[case]
    with torch.no_grad(), _DispatchLog() as log:
        fn()
    assert [op for op in log.ops if op.startswith("seqkernels.")] == [f"seqkernels.{kernel}.default"], log.ops
    assert [op for op in log.ops if not op.startswith("seqkernels.")] == host, log.ops

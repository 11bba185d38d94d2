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

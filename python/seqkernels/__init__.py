"""seqkernels: hand-written kernels for sequence models.

Fused scaled-dot-product attention (Triton, C++/CUDA, C++ CPU), a KV-cache append kernel with
decode attention against the cache, and a fused LSTM cell, behind one API with the same semantics
on every backend (DESIGN §2). Importing touches no GPU; the compiled extension is optional (the
reference and Triton backends work without it).
"""

from . import _ext

# Registers the C++ ops when the extension is built; a missing build is reported per call.
if _ext.extension_available():
    _ext.load_extension()

from .backends import BackendError, use_backend  # noqa: E402
from .ops.attention import attention, scaled_dot_product_attention  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "kv_cache_append": ("seqkernels.ops.kv_cache", "kv_cache_append"),
    "decode_attention": ("seqkernels.ops.kv_cache", "decode_attention"),
    "lstm_cell": ("seqkernels.ops.lstm", "lstm_cell"),
    "swap_attention": ("seqkernels.nn.swap", "swap_attention"),
    "restore_attention": ("seqkernels.nn.swap", "restore_attention"),
    "swap_lstm": ("seqkernels.nn.lstm", "swap_lstm"),
    "restore_lstm": ("seqkernels.nn.lstm", "restore_lstm"),
    "explain": ("seqkernels._explain", "explain"),
}


def __getattr__(name):
    # Submodules that other work lands in are imported on first use, keeping `import seqkernels` light.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value  # later lookups skip this hook (it costs microseconds per call)
        return value
    if name in ("nn", "testing", "reference", "integrations"):
        import importlib

        return importlib.import_module(f"seqkernels.{name}")
    raise AttributeError(f"module 'seqkernels' has no attribute {name!r}")


__all__ = ["attention", "scaled_dot_product_attention", "kv_cache_append", "decode_attention", "lstm_cell",
           "use_backend", "explain", "BackendError", "swap_attention", "restore_attention", "swap_lstm",
           "restore_lstm"]

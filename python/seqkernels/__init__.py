"""seqkernels: hand-written kernels for sequence models.

Fused scaled-dot-product attention (Triton, C++/CUDA, C++ CPU), a KV-cache append kernel with
decode attention against the cache, and a fused LSTM cell, behind one API with the same semantics
on every backend (DESIGN §2). Importing touches no GPU; the compiled extension is optional (the
reference and Triton backends work without it).
"""

from . import _ext

# Registers the C++ ops when the extension is built; a missing build is reported per call (or, with
# SEQKERNELS_REQUIRE_EXT=1, fails here).
_ext.require_if_asked()
if _ext.extension_available():
    _ext.load_extension()

# Every op module registers its custom ops, fakes and autograd at import (ops/_common.register_family),
# so all of them are imported here; Triton itself is imported only when a Triton kernel first runs.
from .backends import BackendError, use_backend  # noqa: E402
from .ops.attention import attention, attention_varlen, scaled_dot_product_attention  # noqa: E402
from .ops.kv_cache import decode_attention, kv_cache_append  # noqa: E402
from .ops.lstm import lstm_cell  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "swap_attention": ("seqkernels.nn.swap", "swap_attention"),
    "restore_attention": ("seqkernels.nn.swap", "restore_attention"),
    "swap_lstm": ("seqkernels.nn.lstm", "swap_lstm"),
    "restore_lstm": ("seqkernels.nn.lstm", "restore_lstm"),
    "explain": ("seqkernels._explain", "explain"),
}


def __getattr__(name):
    # The nn, integration and explain layers are imported on first use, keeping `import seqkernels` light.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value  # later lookups skip this hook (it costs microseconds per call)
        return value
    if name in ("nn", "testing", "reference", "integrations", "distributed"):
        import importlib

        return importlib.import_module(f"seqkernels.{name}")
    raise AttributeError(f"module 'seqkernels' has no attribute {name!r}")


__all__ = [
    "attention",
    "attention_varlen",
    "scaled_dot_product_attention",
    "kv_cache_append",
    "decode_attention",
    "lstm_cell",
    "use_backend",
    "explain",
    "BackendError",
    "swap_attention",
    "restore_attention",
    "swap_lstm",
    "restore_lstm",
]

"""Drop-in modules: MultiheadAttention, LSTMCell, LSTM, KVCache (DESIGN §2)."""

import importlib

_LAZY = {
    "MultiheadAttention": "seqkernels.nn.multihead_attention",
    "LSTMCell": "seqkernels.nn.lstm",
    "LSTM": "seqkernels.nn.lstm",
    "KVCache": "seqkernels.nn.kv_cache",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'seqkernels.nn' has no attribute {name!r}")


__all__ = list(_LAZY)

"""`seqkernels.explain(op_name, *args, **kwargs)`: which backend would run these inputs, and why not the others."""

from __future__ import annotations

import importlib

from . import backends

# public op name -> (module, name of the OpBackends spec, name of the prepare function)
_OPS = {
    "attention": ("seqkernels.ops.attention", "OP", "prepare_attention"),
    "scaled_dot_product_attention": ("seqkernels.ops.attention", "SDPA_OP", "prepare_sdpa"),
    "kv_cache_append": ("seqkernels.ops.kv_cache", "APPEND_OP", "prepare_append"),
    "decode_attention": ("seqkernels.ops.kv_cache", "DECODE_OP", "prepare_decode"),
    "lstm_cell": ("seqkernels.ops.lstm", "OP", "prepare_lstm_cell"),
}


def explain(op_name: str, *args, **kwargs) -> backends.Explanation:
    """Say which backend `seqkernels.<op_name>(*args, **kwargs)` would run on and, for every other
    backend, why not. Prints nothing; the returned object prints as a readable report."""
    if op_name not in _OPS:
        raise ValueError(f"op_name: unknown op {op_name!r}; expected one of {', '.join(_OPS)}")
    mod_name, spec_name, prepare_name = _OPS[op_name]
    mod = importlib.import_module(mod_name)
    spec, prepare = getattr(mod, spec_name), getattr(mod, prepare_name)
    explicit = kwargs.pop("backend", None)
    call = prepare(*args, **kwargs)
    return backends.explain_call(spec, call.device, call, explicit)

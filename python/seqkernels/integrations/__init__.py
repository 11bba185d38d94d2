"""Integrations with other libraries. Each submodule imports its library only when it is imported
itself, so `import seqkernels` never needs them:

- `seqkernels.integrations.transformers`: the "seqkernels" attention backend for Hugging Face
  transformers (`register()`, then `attn_implementation="seqkernels"`) and `SeqkernelsCache`, a
  KV cache for `generate` that decodes with `seqkernels.decode_attention`.
"""

__all__ = ["transformers"]

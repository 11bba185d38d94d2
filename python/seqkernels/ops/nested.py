"""torch nested jagged tensors (`layout=torch.jagged`) in seqkernels.scaled_dot_product_attention,
run through the packed-sequence kernels (attention_varlen) without padding."""

from __future__ import annotations


def nested_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *, backend=None, **mods):
    # TODO(issue 19): nested jagged inputs through attention_varlen.
    raise NotImplementedError("scaled_dot_product_attention: nested (jagged) tensors are not implemented yet")

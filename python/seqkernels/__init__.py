"""seqkernels: fused attention, KV cache and LSTM kernels for sequence models."""

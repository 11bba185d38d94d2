"""Runnable examples: `python -m seqkernels.examples.generate` (incremental decoding with KVCache)."""

"""Helpers shared by the Triton launchers: interpreter detection, block sizes, tuning buckets.

Nothing here touches the CUDA driver at import time; device properties are read when a launcher
runs (torch caches them per device).
"""

from __future__ import annotations

import os

import torch
import triton

__all__ = [
    "INTERPRET",
    "interpreting",
    "block_dim",
    "length_bucket",
    "device_arch",
    "tf32_requested",
    "dot_precision",
]

# The interpreter is chosen when triton.jit decorates a function (at import of the kernel module),
# so what matters is the environment as it was then, not as it is at call time.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    return INTERPRET


def block_dim(d: int) -> int:
    """Padded block size of a head dimension: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


def length_bucket(n: int) -> int:
    """Sequence lengths grouped for the autotune key, so a workload whose length changes every call
    (generation, variable-length batches) tunes once per power of two instead of once per length."""
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def device_arch(device: torch.device) -> int:
    """Compute capability as major * 10 + minor (80 for A100, 90 for H100); 0 when interpreting."""
    if INTERPRET or device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def tf32_requested() -> bool:
    """float32 inputs use exact (IEEE) products by default; SEQKERNELS_TRITON_TF32=1 opts into TF32
    tensor cores, about 8x the float32 throughput with a 10-bit mantissa on the dot products."""
    return os.environ.get("SEQKERNELS_TRITON_TF32", "0").strip().lower() in ("1", "true", "yes", "on")


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not tf32_requested():
        return "ieee"
    return "tf32"  # ignored by tl.dot for 16-bit inputs

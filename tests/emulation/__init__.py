"""CUDA-on-CPU harness: run the project's .cu kernels on CPU tensors (docs/EMULATION.md)."""

from .build import (
    EmulatedOps,
    EmulationBuildError,
    SanitizerResult,
    build_emulated,
    load_emulated,
    registered_schemas,
    rewrite_shared,
    run_in_subprocess,
    run_sanitized,
)

__all__ = [
    "EmulatedOps",
    "EmulationBuildError",
    "SanitizerResult",
    "build_emulated",
    "load_emulated",
    "registered_schemas",
    "rewrite_shared",
    "run_in_subprocess",
    "run_sanitized",
]

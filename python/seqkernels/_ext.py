"""Loading the compiled extension, with an actionable message when it is missing."""

import functools
import os
import warnings

import torch


class ExtensionMissingError(ImportError):
    pass


# The SEQKERNELS_CPU_ISA values csrc/cpu/simd.h's requested_isa() knows; it reads anything else as
# "native", the best level this CPU supports.
CPU_ISA_VALUES = ("native", "amx_bf16", "avx512_bf16", "avx512", "avx2", "portable", "default")


def cpu_isa_env_problem():
    """What is wrong with SEQKERNELS_CPU_ISA, or None (unset or a known value)."""
    value = os.environ.get("SEQKERNELS_CPU_ISA")
    if value is None or value in CPU_ISA_VALUES:
        return None
    return (
        f"SEQKERNELS_CPU_ISA={value!r} is not one of {', '.join(CPU_ISA_VALUES)} (lower case): the CPU "
        "kernels ignore it and take the best level this CPU supports"
    )


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import seqkernels._C (which registers the C++ ops); return the module or raise. Warns once
    when SEQKERNELS_CPU_ISA holds a value the kernels do not know."""
    problem = cpu_isa_env_problem()
    if problem is not None:
        warnings.warn(problem, stacklevel=2)
    try:
        from seqkernels import _C  # noqa: F401
    except ImportError as e:
        raise ExtensionMissingError(
            "seqkernels._C, the compiled extension, is not built (" + str(e) + "). Reinstall with "
            "`pip install --no-build-isolation -e .` from a source checkout (a C++ compiler and "
            "ninja are needed; set SEQKERNELS_CUDA=0 for a CPU-only build), or use "
            "backend='triton' / backend='reference'."
        ) from e
    return _C


def require_if_asked() -> None:
    """SEQKERNELS_REQUIRE_EXT=1 (CI sets it): a missing or broken build of seqkernels._C is an
    error at import instead of a per-call fallback, so the tests fail rather than skip."""
    if os.environ.get("SEQKERNELS_REQUIRE_EXT", "0") not in ("", "0"):
        load_extension()


def extension_available() -> bool:
    try:
        load_extension()
        return True
    except ExtensionMissingError:
        return False


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the C++ op `seqkernels::<op>` has a kernel registered for CPU or CUDA."""
    if not extension_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"seqkernels::{op}", dispatch_key)


def compiled_cuda_archs() -> list:
    if not extension_available():
        return []
    archs = getattr(load_extension(), "cuda_archs", "")
    return [a for a in archs.split(";") if a]


def built_with_cuda() -> bool:
    return bool(compiled_cuda_archs())

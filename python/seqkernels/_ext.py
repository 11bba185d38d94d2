"""Loading the compiled extension, with an actionable message when it is missing."""

import functools
import os

import torch


class ExtensionMissingError(ImportError):
    pass


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import seqkernels._C (which registers the C++ ops); return the module or raise."""
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

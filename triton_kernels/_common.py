"""Helpers shared by the Triton launchers: interpreter detection, block sizes, tuning buckets.

Nothing here touches the CUDA driver at import time; device properties are read when a launcher
runs (torch caches them per device).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import capabilities

__all__ = [
    "INTERPRET",
    "StaticConfig",
    "TRITON_DTYPE",
    "block_dim",
    "device_unsupported_reason",
    "refusal",
    "device_arch",
    "dot_precision",
    "interpreting",
    "lazy_static_configs",
    "length_bucket",
    "static_signature",
    "tanh",
    "tf32_requested",
]

# The interpreter is chosen when triton.jit decorates a function (at import of the kernel module),
# so what matters is the environment as it was then, not as it is at call time.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    return INTERPRET


def block_dim(d: int) -> int:
    """Padded block size of a head dimension: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


# torch dtype -> the element type of a Triton pointer in an ahead-of-time signature.
TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def device_unsupported_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run on `device`'s type, else why not: CPU tensors need the
    interpreter, devices other than CUDA and CPU are unsupported. (The architecture limit is the
    capability table's, see `refusal`.)"""
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        return (
            "CPU tensors run on the Triton kernels only under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before triton is imported)"
        )
    return f"device type {device.type!r} is not supported by the Triton kernels (cuda; cpu when interpreting)"


def lazy_static_configs(module_globals: dict, build):
    """A module `__getattr__` that builds the module's STATIC_CONFIGS (the ahead-of-time compile
    list: development tooling, kernel_report and the static tests) on first access and keeps it,
    so importing a kernel module to launch a kernel never computes it."""

    def __getattr__(name: str):
        if name == "STATIC_CONFIGS":
            value = module_globals["STATIC_CONFIGS"] = build()
            return value
        raise AttributeError(f"module {module_globals['__name__']!r} has no attribute {name!r}")

    return __getattr__


def refusal(op: str, features) -> str | None:
    """Why the Triton kernels of `op` refuse a call with these `capabilities.Features`, or None:
    the device type here, everything else (dtypes, head dims, mask dtypes, grid, architecture) from
    the one capability table that `explain` and the automatic choice also read."""
    return device_unsupported_reason(features.device) or capabilities.why_not(
        op, "triton", features, interpreting=INTERPRET
    )


def static_signature(fn, constexprs: dict, pointer_type, aligned_int, unit_strides=(), float_args=()):
    """(signature, constexprs, attrs) of one ahead-of-time compile of the jitted `fn`, argument by
    argument as Triton specializes them at run time: `constexprs` as given; `unit_strides` become the
    constant 1 (the stride of a contiguous last dim); `float_args` are fp32 scalars; an argument for
    which `pointer_type(name)` gives a type (e.g. "*bf16") is a pointer, 16-byte aligned as torch
    allocates; every other argument is an i32, marked a multiple of 16 where `aligned_int(name)`."""
    signature, consts, attrs = {}, {}, {}
    for idx, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            consts[name] = constexprs[name]
        elif name in unit_strides:
            signature[name] = "constexpr"
            consts[name] = 1
        elif name in float_args:
            signature[name] = "fp32"
        elif (ptr := pointer_type(name)) is not None:
            signature[name] = ptr
            attrs[(idx,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if aligned_int(name):
                attrs[(idx,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


@triton.jit
def tanh(x):
    """float32 tanh for the softcap. libdevice's tanh does not run under the interpreter, so one
    formula serves both: (1 - e^-2|x|) / (1 + e^-2|x|) with the sign put back (no overflow for any
    |x|; +-inf give +-1, NaN stays NaN), and below |x| = 0.3, where 1 - e^-2|x| would cancel, the
    odd Taylor series to x^9 (truncation < 6e-8 relative there). Relative error ~3e-7."""
    a = tl.abs(x)
    t = tl.math.exp2(a * -2.8853900817779268)  # exp(-2|x|)
    # The approximate division (2 ulp): IEEE division brings ptxas's slow-path subroutine, whose
    # call frame shows as a stack frame even in kernels with registers to spare.
    big = tl.fdiv(1.0 - t, 1.0 + t, ieee_rounding=False)
    x2 = x * x
    small = x * (
        1.0
        + x2
        * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397 + x2 * 0.021869488536155203)))
    )
    return tl.where(a < 0.3, small, tl.where(x < 0.0, -big, big))


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


class StaticConfig(tuple):
    """One compiled variant for the static (no-GPU) report (seqkernels.kernel_report), listed in a
    kernel module's ``STATIC_CONFIGS``: behaves as the tuple
    ``(kernel_fn, signature, constexprs, num_warps, num_stages, expects_mma)`` and also carries
    ``arch`` (the compute capability of the tuning table it comes from; None: every arch the report
    compiles for), ``attrs`` (divisibility hints as ``triton.compiler.ASTSource`` takes them) and a
    readable ``name``. ``expects_mma``: True for tensor cores in the arch's best form (wgmma on
    sm_90, mma.sync before), ``"mma"`` for mma.sync on every arch (tiles below wgmma's 64 rows),
    False for kernels without matrix products on tensor cores."""

    def __new__(cls, kernel_fn, signature, constexprs, num_warps, num_stages, expects_mma, *, arch, attrs, name):
        self = super().__new__(cls, (kernel_fn, signature, constexprs, num_warps, num_stages, expects_mma))
        self.arch = arch
        self.attrs = attrs
        self.name = name
        return self

    kernel_fn = property(lambda self: self[0])
    signature = property(lambda self: self[1])
    constexprs = property(lambda self: self[2])
    num_warps = property(lambda self: self[3])
    num_stages = property(lambda self: self[4])
    expects_mma = property(lambda self: self[5])

    def mma_for(self, arch: int):
        """The tensor-core instruction the PTX for `arch` must contain: "wgmma", "mma.sync" or None."""
        if not self.expects_mma:
            return None
        return "wgmma" if self.expects_mma is True and arch >= 90 else "mma.sync"

    def __repr__(self) -> str:
        return f"StaticConfig({self.name})"

"""What each backend's kernels take, per op: one declarative table (DESIGN §3).

`backends.why_not` (and through it `explain`, the automatic choice and the errors of an explicit
`backend=`) and the Triton launchers' refusals (`triton_kernels/*.unsupported_reason`) all read
this table; nothing else states a backend's dtype, head-dim, mask, gradient or architecture limits.
Argument validation (shapes, devices, index ranges) is not here: it lives once, in each op's
`prepare_*` function, and the kernels keep only cheap precondition checks.

The automatic order is per op and per device type, and follows the committed measurements
(`bench/results/`): see `AUTO_ORDER` below for the figures behind it.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, NamedTuple, Optional, Tuple

import torch

_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ALL_FLOATS = (_F16, _BF16, _F32, _F64)
MODIFIERS = ("softcap", "alibi", "sinks")


def modifiers_in(softcap: float, alibi_slopes, sinks) -> Tuple[str, ...]:
    """The names (MODIFIERS) of the score modifiers a normalized call switches on."""
    on = (softcap > 0, alibi_slopes is not None, sinks is not None)
    return tuple(name for name, flag in zip(MODIFIERS, on) if flag)


@dataclasses.dataclass(frozen=True)
class Capability:
    """The inputs one backend's kernels for one op accept.

    dtypes: element types of the op's floating tensors.
    max_head_dim: the widest head dim (D and Dv) a kernel has a tile for; None = no limit.
    mask_dtypes: attn_mask element types; "input" stands for the dtype of q.
    mask_grad: whether a gradient with respect to a float attn_mask is computed.
    grad: whether autograd through the op is supported (False: forward-only kernels).
    min_sm: oldest CUDA compute capability (major) the kernels are built and checked for.
    max_grid: the largest batch or head count one launch grid dimension takes.
    modifiers: the score modifiers (docs/DESIGN.md §2) the kernels apply: "softcap", "alibi",
        "sinks" (forward, and backward where `grad`).
    varlen: whether the kernels take packed sequences (cu_seqlens: attention_varlen, and the
        packed query batches of decode_attention / kv_cache_append).
    """

    dtypes: Tuple[torch.dtype, ...] = ALL_FLOATS
    max_head_dim: Optional[int] = None
    mask_dtypes: Tuple[object, ...] = (torch.bool, _F32, "input")
    mask_grad: bool = False
    grad: bool = True
    min_sm: Optional[int] = None
    max_grid: Optional[int] = None
    modifiers: Tuple[str, ...] = MODIFIERS
    varlen: bool = True


class Features(NamedTuple):
    """What one call asks of a backend (each op's `features(call)` fills this in). A NamedTuple:
    one is built per call on the dispatch path, where a dataclass costs microseconds."""

    dtype: torch.dtype
    device: torch.device
    head_dims: Tuple[int, ...] = ()
    mask_dtype: Optional[torch.dtype] = None
    mask_grad: bool = False
    needs_grad: bool = False
    grid: Tuple[int, ...] = ()
    modifiers: Tuple[str, ...] = ()
    varlen: bool = False


_KERNEL_FLOATS = (_F16, _BF16, _F32)

# Why gradients are refused, per op, where a backend's kernels are forward-only.
NO_GRAD = {
    "kv_cache_append": (
        "gradients through kv_cache_append are only tracked by the reference backend (the kernels "
        "write the cache in place outside autograd); use backend='reference' or torch.no_grad()"
    ),
    "decode_attention": (
        "gradients are not implemented for decode attention on the kernel backends (it is an "
        "inference op); use backend='reference' or torch.no_grad()"
    ),
}
MASK_GRAD = "gradients with respect to a float attn_mask are only computed by the reference backend"

_REFERENCE = Capability(mask_grad=True)

TABLE: Dict[str, Dict[str, Capability]] = {
    "attention": {
        "cpu": Capability(),
        # mma.sync on float16/bfloat16 tiles of width 64/128/256 (the tail of the head dim masked).
        "cuda": Capability(dtypes=(_F16, _BF16), max_head_dim=256, min_sm=8),
        # Grid axes carry the batch and the heads; CUDA caps the y/z grid dimensions at 65535.
        "triton": Capability(dtypes=_KERNEL_FLOATS, max_head_dim=256, min_sm=8, max_grid=65535),
        "reference": _REFERENCE,
    },
    "kv_cache_append": {
        "cpu": Capability(grad=False),
        "cuda": Capability(dtypes=_KERNEL_FLOATS, grad=False),
        "triton": Capability(dtypes=_KERNEL_FLOATS, grad=False, min_sm=8),
        "reference": _REFERENCE,
    },
    "decode_attention": {
        "cpu": Capability(grad=False),
        "cuda": Capability(dtypes=_KERNEL_FLOATS, max_head_dim=256, grad=False),
        "triton": Capability(dtypes=_KERNEL_FLOATS, max_head_dim=256, grad=False, min_sm=8),
        "reference": _REFERENCE,
    },
    "lstm_cell": {
        "cpu": Capability(),
        "cuda": Capability(),
        "triton": Capability(min_sm=8),
        "reference": _REFERENCE,
    },
}

# The automatic order per op and device type: the first backend in the list that is built and
# supports the call runs it. CPU tensors: the C++ kernels, then the reference. CUDA tensors follow
# the H100 run in bench/results/gpu_bfloat16_quick.csv (bfloat16, medians, CUDA time / Triton time
# in the same run): attention forward 1.68 and backward 2.92 (median over 4 shapes), decode 3.04,
# so Triton comes first for those; kv_cache_append 0.15 and the LSTM cell step 0.43 (sequence
# 0.57), so the CUDA kernels come first there.
AUTO_ORDER: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "attention": {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")},
    "decode_attention": {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")},
    "kv_cache_append": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    "lstm_cell": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
}

_BACKEND_TITLE = {"cpu": "C++ CPU", "cuda": "CUDA", "triton": "Triton", "reference": "reference"}


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _names(dtypes) -> str:
    return "/".join(_dtype_name(d) for d in dtypes)


def _sm(device: torch.device) -> Tuple[int, int]:
    # Separate so that tests can stand in for a device they do not have.
    return torch.cuda.get_device_capability(device)


def why_not(op: str, backend: str, f: Features, *, interpreting=False) -> Optional[str]:
    """None when `backend`'s kernels for `op` take a call with features `f`, else the reason.

    `interpreting`: Triton runs under its interpreter, where no GPU architecture applies (a bool,
    or a callable giving it, asked only when it matters)."""
    cap = TABLE[op][backend]
    if f.needs_grad and not cap.grad:
        return NO_GRAD.get(op, f"gradients through {op} are only computed by the reference backend")
    if f.mask_grad and not cap.mask_grad:
        return MASK_GRAD
    title = _BACKEND_TITLE[backend]
    missing = [m for m in f.modifiers if m not in cap.modifiers]
    if missing:
        return f"{', '.join(missing)}: not supported by the {title} kernels"
    if f.varlen and not cap.varlen:
        return f"packed sequences (cu_seqlens): not implemented by the {title} kernels yet"
    if f.dtype not in cap.dtypes:
        return f"the {title} kernels take {_names(cap.dtypes)}, not {_dtype_name(f.dtype)}"
    if cap.max_head_dim is not None and f.head_dims and max(f.head_dims) > cap.max_head_dim:
        dims = ", ".join(str(d) for d in f.head_dims)
        return f"head dims {dims}: the {title} kernels support 1..{cap.max_head_dim}"
    if (
        f.mask_dtype is not None
        and f.mask_dtype not in cap.mask_dtypes
        and not (f.mask_dtype == f.dtype and "input" in cap.mask_dtypes)
    ):
        allowed = tuple(f.dtype if m == "input" else m for m in cap.mask_dtypes)
        return f"attn_mask dtype {_dtype_name(f.mask_dtype)}: the {title} kernels take {_names(dict.fromkeys(allowed))}"
    if cap.max_grid is not None and f.grid and max(f.grid) > cap.max_grid:
        return f"batch or heads {f.grid} exceed the {title} kernels' grid limit of {cap.max_grid}"
    if cap.min_sm is not None and f.device.type == "cuda":
        if backend == "triton" and (interpreting() if callable(interpreting) else interpreting):
            return None
        major, minor = _sm(f.device)
        if major < cap.min_sm:
            return f"the {title} kernels need sm_{cap.min_sm}0 or newer, this GPU is sm_{major}{minor}"
    return None

"""Shared by the public ops: validation helpers (every error names the argument and what was expected)
and the one op-family registration helper."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Optional, Sequence

import torch

from .. import _ext

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtypes: Optional[Iterable[torch.dtype]] = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same(names: Iterable[str], tensors: Iterable[torch.Tensor], *, dtype=True, device=True):
    names, tensors = list(names), list(tensors)
    first_n, first = names[0], tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if dtype and t.dtype != first.dtype:
            raise TypeError(
                f"{n}: dtype {str(t.dtype).replace('torch.', '')} does not match "
                f"{first_n}'s {str(first.dtype).replace('torch.', '')}; all must share one dtype"
            )
        if device and t.device != first.device:
            raise ValueError(
                f"{n}: on device {t.device}, but {first_n} is on {first.device}; all tensors must be on one device"
            )


INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)


def to_int32_saturated(t: torch.Tensor, low: int = -1) -> torch.Tensor:
    """The int32 form of an index tensor the kernels read, contiguous. int64 values outside the
    int32 range are clamped to [low, INT32_MAX] first, never wrapped: a plain cast would turn
    2**32 + 3 into 3, a valid position or block id, and the kernels would silently use it. Clamped,
    an out-of-range value stays out of range (negative, or past any capacity), so a kernel that
    skips or clamps such values still does. `low` -1 suits lengths and block ids (any negative
    value means none); a start position that the kernels offset by a token index in int64
    (kv_cache_append's cache_seqlens) takes INT32_MIN, so that start + t stays negative where the
    int64 value's did. The caller validates values before this (on the host) wherever it can afford
    the sync; this is what keeps unvalidated GPU inputs safe."""
    if t.dtype == torch.int32 and t.is_contiguous():
        return t  # the common call: no two no-op dispatches (about 3 us) on every decode step
    if t.dtype == torch.int64:
        t = t.clamp(low, INT32_MAX)
    return t.to(torch.int32).contiguous()


def check_index_tensor(name: str, t, ndim: int, device: torch.device, what: str = "the other inputs"):
    """An int32/int64 index tensor of `ndim` dims on `device` (dtype/shape/device only; values are
    checked by the caller on the original tensor, before `to_int32_saturated`)."""
    check_tensor(name, t, ndim=ndim, dtypes=(torch.int32, torch.int64))
    if t.device != device:
        raise ValueError(f"{name}: on device {t.device}, expected {device} (the device of {what})")


def check_lengths(
    name: str, t, batch: int, device: torch.device, upper: Optional[int] = None, upper_name: str = ""
) -> torch.Tensor:
    """An int tensor (B,) on `device`, returned as contiguous int32. Values are range-checked (in
    the caller's dtype, before any conversion) only for CPU tensors: on a GPU that would cost a
    host sync per call, so there the kernels clamp instead (see `to_int32_saturated`)."""
    check_index_tensor(name, t, 1, device)
    if t.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},) (one entry per batch element), got {tuple(t.shape)}")
    if t.device.type == "cpu" and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (upper is not None and hi > upper):
            raise ValueError(f"{name}: values must lie in [0, {upper_name or upper}], got min {lo}, max {hi}")
    return to_int32_saturated(t)


def check_cu_seqlens(name: str, t, total: int, device: torch.device, max_seqlen=None, max_name: str = "max_seqlen"):
    """Cumulative sequence starts of a packed batch: int32 (N+1,) on `device`, starting at 0,
    non-decreasing, ending at `total`, every length <= `max_seqlen` (when given). Returns the
    contiguous tensor and the longest length: `max_seqlen` itself when given, else read from the
    tensor (a host sync on a GPU, the price of leaving it out, as in FlashAttention). Values are
    checked on CPU tensors; on a GPU that would cost a sync per call, and the kernels clamp each
    span into the tensors instead."""
    check_tensor(name, t, ndim=1, dtypes=(torch.int32,))
    if t.device != device:
        raise ValueError(f"{name}: on device {t.device}, expected {device} (the device of q)")
    if t.shape[0] < 1:
        raise ValueError(f"{name}: expected (N+1,) cumulative starts beginning with 0, got an empty tensor")
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"{max_name}: expected an int >= 0 or None, got {max_seqlen!r}")
    if t.device.type == "cpu":
        c = t.tolist()
        if c[0] != 0:
            raise ValueError(f"{name}: must start at 0, got {c[0]}")
        for b in range(len(c) - 1):
            if c[b + 1] < c[b]:
                raise ValueError(f"{name}: must be non-decreasing, got {c[b]} then {c[b + 1]} at index {b + 1}")
        if c[-1] != total:
            raise ValueError(f"{name}: must end at the total length {total}, got {c[-1]}")
    lens = t[1:] - t[:-1]
    longest = int(lens.max()) if (max_seqlen is None or t.device.type == "cpu") and lens.numel() else 0
    if max_seqlen is None:
        return t.contiguous(), max(longest, 0)
    if t.device.type == "cpu" and longest > max_seqlen:
        b = int(torch.argmax(lens))
        raise ValueError(f"{name}: sequence {b} has length {longest}, above {max_name}={max_seqlen}")
    return t.contiguous(), int(max_seqlen)


def packed_tile_offsets(cu_seqlens: torch.Tensor, rows_per_token: int, block_m: int, total: int) -> torch.Tensor:
    """Cumulative row tiles per sequence of a packed batch: int32 (N+1,) from 0, where sequence b owns
    the rows [cu[b], cu[b+1]) clamped into [0, total] (as the kernels clamp them), `rows_per_token` rows
    a token (the query heads of one kv head's group), cut into tiles of `block_m` rows. Torch ops on
    the device of `cu_seqlens`, no host sync: the kernels' grid finds its (sequence, tile) in it, and
    its last entry is the number of tiles."""
    cu = cu_seqlens.to(torch.int64)
    c0 = cu[:-1].clamp(0, total)
    c1 = torch.maximum(cu[1:].clamp(0, total), c0)
    tiles = torch.div((c1 - c0) * rows_per_token + (block_m - 1), block_m, rounding_mode="floor")
    return torch.cat([tiles.new_zeros(1), torch.cumsum(tiles, 0)]).to(torch.int32)


def check_scale(scale, head_dim: int) -> float:
    """`scale` resolved: None means 1/sqrt(head_dim); otherwise a real number (a Python or NumPy
    number, or a one-element tensor), finite. Errors name the argument."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.is_complex() or scale.dtype == torch.bool:
            raise TypeError(
                f"scale: expected a real number or None, got a tensor of shape {tuple(scale.shape)} "
                f"and dtype {str(scale.dtype).replace('torch.', '')}"
            )
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")
    return scale


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type the kernels accumulate in (and keep lse, sinks and ALiBi slopes in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_modifiers(q: torch.Tensor, softcap, alibi_slopes, sinks, batch: Optional[int] = None):
    """The score modifiers of attention and decode (docs/DESIGN.md §2), normalized for the
    kernels: softcap a float (0.0 = off), alibi_slopes (B, Hq) and sinks (Hq,) contiguous in the
    accumulation type (or None). The sinks conversion is differentiable, so a bfloat16 parameter
    (as gpt-oss keeps them) gets its gradient back in its own dtype. Values are checked (NaN
    slopes, NaN or +inf sinks) on CPU tensors only: on a GPU that would cost a host sync per call.
    `batch`: the number of sequences where that is not q's dim 0 (packed sequences)."""
    B, Hq = (q.shape[0] if batch is None else batch), q.shape[1]
    acc = acc_dtype(q.dtype)
    cap = 0.0
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap: expected a positive float or None, got {type(softcap).__name__} {softcap!r}")
        cap = float(softcap)
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"softcap: expected a finite float > 0 (None = off), got {softcap!r}")
        # The kernels hold the cap in the accumulation type: a cap beyond its range would be inf
        # there (c * tanh(s / c) = inf * 0, NaN), one below its smallest normal value may be 0.
        fi = torch.finfo(acc)
        if not fi.tiny <= cap <= fi.max:
            raise ValueError(
                f"softcap: expected a value in [{fi.tiny:.4g}, {fi.max:.4g}] for {str(q.dtype).replace('torch.', '')} "
                f"inputs (the range of {str(acc).replace('torch.', '')}, in which the kernels apply the cap), "
                f"got {softcap!r}"
            )
    slopes = None
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32, torch.float64))
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes: on device {alibi_slopes.device}, expected {q.device}")
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise ValueError(
                f"alibi_slopes: expected shape (Hq,) = ({Hq},) or (B, Hq) = ({B}, {Hq}) (one slope per query "
                f"head), got {tuple(alibi_slopes.shape)}"
            )
        if alibi_slopes.device.type == "cpu" and bool(torch.isnan(alibi_slopes).any()):
            raise ValueError("alibi_slopes: contains NaN")
        slopes = alibi_slopes.detach().to(acc).expand(B, Hq).contiguous()
    sk = None
    if sinks is not None:
        check_tensor("sinks", sinks, dtypes=FLOAT_DTYPES)
        if sinks.device != q.device:
            raise ValueError(f"sinks: on device {sinks.device}, expected {q.device}")
        if tuple(sinks.shape) != (Hq,):
            raise ValueError(
                f"sinks: expected shape (Hq,) = ({Hq},) (one sink logit per query head), got {tuple(sinks.shape)}"
            )
        if sinks.device.type == "cpu" and bool((torch.isnan(sinks) | (sinks == math.inf)).any()):
            raise ValueError("sinks: expected finite values or -inf (no sink), got NaN or +inf")
        sk = sinks.to(acc).contiguous()
    return cap, slopes, sk


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator: repeatable under torch.manual_seed and no
    GPU sync (the keep mask itself is computed on the device from (seed, offset, b, h, i, j))."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def expand_mask(mask: torch.Tensor, shape: tuple, name: str = "attn_mask") -> torch.Tensor:
    """`mask` broadcast to the 4-D `shape` as a view (stride 0 on broadcast dims, never copied)."""
    if mask.dim() > 4:
        raise ValueError(
            f"{name}: expected at most 4 dims broadcastable to {tuple(shape)}, got shape {tuple(mask.shape)}"
        )
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    for got, want in zip(m.shape, shape):
        if got not in (1, want):
            raise ValueError(
                f"{name}: shape {tuple(mask.shape)} is not broadcastable to (B, Hq, Lq, Lk) = {tuple(shape)}"
            )
    return m.expand(shape)


def register_family(
    names: Sequence[str], fakes: Sequence[Callable], *, backward=None, setup_context=None, cpp: bool = False
) -> Optional[tuple]:
    """Register one family of custom ops: a fake kernel for each of `names` (so torch.compile and
    meta tensors trace them) and, given `backward` (ops -> backward function), autograd on the first
    op. `cpp`: the ops come from the compiled extension, which may not be built; then nothing is
    registered and None is returned. Returns the ops (torch.ops.seqkernels.<name>, in order).

    Every op module calls this at import, and `import seqkernels` imports every op module, so fakes
    and autograd exist before any submodule is touched."""
    if cpp and not _ext.extension_available():
        return None
    for name, fake in zip(names, fakes, strict=True):
        torch.library.register_fake(f"seqkernels::{name}")(fake)
    ops = tuple(getattr(torch.ops.seqkernels, name) for name in names)
    if backward is not None:
        torch.library.register_autograd(f"seqkernels::{names[0]}", backward(ops), setup_context=setup_context)
    return ops


def kernel_families(triton: Sequence[str], cpp: Sequence[str], fakes: Sequence[Callable], **autograd) -> dict:
    """backend -> ops for an op whose Triton custom ops (`triton`, defined in Python) and C++ ops
    (`cpp`, one schema serving the CPU and CUDA kernels) share fakes and autograd."""
    families = {"triton": register_family(triton, fakes, **autograd)}
    ops = register_family(cpp, fakes, cpp=True, **autograd)
    if ops is not None:
        families["cpu"] = families["cuda"] = ops
    return families

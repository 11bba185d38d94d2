"""Backend resolution (DESIGN §3) and `explain`.

Per call, from the inputs' device: the `backend=` argument, then `use_backend(...)`, then the
`SEQKERNELS_BACKEND` environment variable, then auto: the first backend, in the op's measured
order (`capabilities.AUTO_ORDER`), that is built and supports these exact inputs (what each
backend supports is the table in `capabilities`). A backend that was asked for explicitly and cannot run raises `BackendError` with
the reason; it never falls back. Nothing here touches the CUDA driver at import time.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib.util
import os
from typing import Callable, Dict, Optional, Sequence

import torch

from . import _ext, capabilities

BACKENDS = ("cuda", "cpu", "triton", "reference")
NOT_IMPLEMENTED = "not implemented on this backend yet"

_scoped_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("seqkernels_backend", default=None)


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run these inputs (the message says why and how to fix)."""


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Run the enclosed seqkernels calls on backend `name` ("cuda", "cpu", "triton", "reference";
    None restores automatic choice). An explicit `backend=` argument still wins."""
    if name is not None:
        _check_name(name, "use_backend")
    token = _scoped_backend.set(name)
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def requested(explicit: Optional[str]) -> tuple[Optional[str], str]:
    """The backend asked for by the caller and where the request came from."""
    if explicit is not None:
        return _check_name(explicit, "backend="), "the backend= argument"
    scoped = _scoped_backend.get()
    if scoped is not None:
        return scoped, "seqkernels.use_backend"
    env = os.environ.get("SEQKERNELS_BACKEND", "").strip()
    if env and env != "auto":
        return _check_name(env, "SEQKERNELS_BACKEND"), "the SEQKERNELS_BACKEND environment variable"
    return None, "auto"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass
class OpBackends:
    """How one public op maps onto the backends.

    name: the public op (in messages);
    cpp_ops: the C++ ops it needs (their CPU/CUDA kernels are looked up in the dispatcher);
    features: call -> `capabilities.Features`, what the call asks of a backend (dtype, head dims,
    mask, gradients), checked against the backend's row of the capability table;
    kernels: its key in `capabilities.TABLE` and `capabilities.AUTO_ORDER` (default: `name`; the
    SDPA-compatible entry point runs the attention kernels).
    """

    name: str
    cpp_ops: Sequence[str]
    features: Callable[[object], capabilities.Features]
    kernels: Optional[str] = None

    @property
    def key(self) -> str:
        return self.kernels or self.name

    def auto_order(self, device_type: str) -> Sequence[str]:
        return capabilities.AUTO_ORDER[self.key].get(device_type, ("reference",))


def _generic_why_not(op: OpBackends, backend: str, device: torch.device) -> Optional[str]:
    # What does not depend on the call's tensors depends only on the op, the backend, the device
    # type and the environment, so it is computed once per combination: cheaper per call, and
    # traceable under torch.compile (the dispatcher query and lru_cache'd import are not).
    return _static_why_not(op.name, tuple(op.cpp_ops), backend, device.type, triton_interpreting())


_STATIC_REASONS: Dict[tuple, Optional[str]] = {}


def _static_why_not(name: str, cpp_ops: tuple, backend: str, dev: str, interpreting: bool) -> Optional[str]:
    key = (name, cpp_ops, backend, dev, interpreting)
    if key not in _STATIC_REASONS:
        _STATIC_REASONS[key] = _compute_static_why_not(cpp_ops, backend, dev, interpreting)
    return _STATIC_REASONS[key]


# What torch.compiler.assume_constant_result does (Dynamo calls the function at trace time and
# bakes the result in), without importing torch._dynamo here: that import pulls in triton, which
# must not load into the sanitizer-preloaded processes of the emulation tests.
_static_why_not._dynamo_marked_constant = True


def _compute_static_why_not(cpp_ops, backend, dev, interpreting) -> Optional[str]:
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if dev != backend:
            return f"the {backend} backend runs on {backend.upper() if backend == 'cuda' else 'CPU'} tensors; these are on {dev}"
        if not _ext.extension_available():
            return "the compiled extension seqkernels._C is not built (pip install --no-build-isolation -e .)"
        if backend == "cuda" and not _ext.built_with_cuda():
            return (
                "the extension was built without its CUDA part (rebuild with a CUDA build of torch and "
                "nvcc present, SEQKERNELS_CUDA=1)"
            )
        key = "CPU" if backend == "cpu" else "CUDA"
        for cpp in cpp_ops:
            if not _ext.has_kernel(cpp, key):
                return NOT_IMPLEMENTED + f" (no {key} kernel for seqkernels::{cpp})"
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if dev == "cpu" and not interpreting:
            return "Triton runs CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before importing triton)"
        if dev not in ("cpu", "cuda"):
            return f"Triton does not run on {dev} tensors"
        return None
    raise AssertionError(backend)


def why_not(op: OpBackends, backend: str, device: torch.device, call) -> Optional[str]:
    """None if `backend` can run this call, else the reason."""
    reason = _generic_why_not(op, backend, device)
    if reason is None:
        reason = capabilities.why_not(op.key, backend, op.features(call), interpreting=triton_interpreting)
    return reason


def resolve(op: OpBackends, device: torch.device, call, explicit: Optional[str]) -> str:
    name, source = requested(explicit)
    if name is not None:
        reason = why_not(op, name, device, call)
        if reason is not None:
            raise BackendError(
                f"seqkernels.{op.name}: backend {name!r} (requested by {source}) cannot run these inputs: "
                f"{reason}. Use backend=None for automatic choice, or see seqkernels.explain('{op.name}', ...)."
            )
        return name
    for candidate in op.auto_order(device.type):
        if why_not(op, candidate, device, call) is None:
            return candidate
    return "reference"


@dataclasses.dataclass
class Explanation:
    op: str
    device: str
    chosen: Optional[str]
    source: str
    reasons: Dict[str, Optional[str]]
    error: Optional[str] = None
    auto_order: Sequence[str] = ()

    def __str__(self) -> str:
        lines = [f"seqkernels.{self.op} on {self.device} tensors"]
        if self.error:
            lines.append(f"  invalid inputs: {self.error}")
        elif self.chosen is None:
            lines.append(f"  requested by {self.source}: cannot run (see below)")
        else:
            lines.append(f"  runs on: {self.chosen} (chosen by {self.source})")
        for b in BACKENDS:
            if b == self.chosen:
                continue
            r = self.reasons.get(b)
            if r is None:
                in_order = b in self.auto_order
                why = "could run these inputs" + (
                    "" if in_order else f" (not in the automatic order for {self.device} tensors)"
                )
                if in_order and self.chosen is not None and self.source == "auto":
                    why += ", but an earlier backend in the automatic order was chosen"
                r = why
            lines.append(f"  {b}: {r}")
        return "\n".join(lines)

    __repr__ = __str__


def explain_call(op: OpBackends, device: torch.device, call, explicit: Optional[str]) -> Explanation:
    reasons = {b: why_not(op, b, device, call) for b in BACKENDS}
    name, source = requested(explicit)
    if name is not None:
        chosen = name if reasons[name] is None else None
    else:
        chosen = resolve(op, device, call, None)
    return Explanation(op.name, device.type, chosen, source, reasons, auto_order=tuple(op.auto_order(device.type)))

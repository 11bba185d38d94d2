"""Numerical parity checks (DESIGN §5), usable on your own modules and functions.

The rule. Run the code under test in a low precision dtype ``t`` and compare it with a
float64 reference. Because rounding error is unavoidable, the yardstick is plain torch doing
the same math in the same dtype (the *baseline*)::

    err_k = max |out - ref|          (the code under test vs the float64 reference)
    err_t = max |baseline - ref|     (plain torch in dtype t vs the float64 reference)
    pass iff err_k <= 2 * err_t + parity_floor(t) * max(1, max|ref|)    (3 * err_t for gradients)
             and NaN / inf positions agree with the reference,
             and, for float32 / float64 outputs, torch.testing.assert_close(out, ref) holds.

So a kernel may be up to twice as far from the truth as torch's own math in that dtype, never
further. Example::

    import torch, seqkernels.testing as skt

    class MyAttention(torch.nn.Module): ...

    q, k, v = (torch.randn(2, 4, 97, 64) for _ in range(3))
    report = skt.check_parity(my_attention, torch.nn.functional.scaled_dot_product_attention,
                              q, k, v, dtype=torch.bfloat16, grads=True)
    print(report)          # one row per output and per input gradient
    assert report.passed

    skt.assert_close_to_reference(MyAttention(), reference_module, x, dtype=torch.float16)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ParityReport",
    "ParityRow",
    "assert_close_to_reference",
    "check_parity",
    "compare",
    "parity_floor",
]

# torch.testing.assert_close's default tolerances, used for the float32/float64 closeness check.
_CLOSE_TOL = {torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7)}


def parity_floor(dtype: torch.dtype) -> float:
    """Absolute rounding floor added to the parity bound for outputs of ``dtype``.

    The bound ``2 * err_t`` alone fails spuriously when the baseline happens to be (nearly)
    exact, e.g. an output that is a copy of an input, or a one-element reduction: then any
    other correctly rounded path that lands one ulp away would fail. The floor is therefore one
    ulp of 1.0 (``torch.finfo(dtype).eps``: 2^-10 for float16, 2^-7 for bfloat16, 2^-23 for
    float32), the distance between two neighbouring correctly rounded results of unit size.

    float64 is different: there the baseline *is* the reference (the same torch code), so
    ``err_t`` is usually exactly 0 and the floor alone must absorb an honest float64 kernel
    that sums in another order, about ``n * eps`` for an ``n``-term reduction of unit-size
    values. 2^-36 (about 1.5e-11) covers reductions far longer than any test uses and is still
    ten thousand times tighter than float32 precision. Non-floating dtypes get 0 (exact match).
    """
    if dtype == torch.float64:
        return 2.0**-36
    if dtype.is_floating_point:
        return float(torch.finfo(dtype).eps)
    return 0.0


@dataclass
class ParityRow:
    """One compared tensor. ``max_err``/``mean_err``: |out - ref| over positions where both are
    finite; ``baseline_err``: max |baseline - ref| likewise; ``bound`` = multiplier *
    baseline_err + floor; ``close``: the assert_close check (None for other dtypes)."""

    name: str
    dtype: torch.dtype | None
    shape: tuple[int, ...]
    max_err: float
    mean_err: float
    baseline_err: float
    bound: float
    nan_agree: bool
    inf_agree: bool
    close: bool | None
    passed: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        """``max_err / bound``; at most 1 for a passing row."""
        if self.bound > 0:
            return self.max_err / self.bound
        return 0.0 if self.max_err == 0 else math.inf


@dataclass
class ParityReport:
    """The rows of a parity check; ``passed`` when there is at least one row and all pass."""

    rows: list[ParityRow] = field(default_factory=list)
    title: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def failures(self) -> list[ParityRow]:
        return [r for r in self.rows if not r.passed]

    def __bool__(self) -> bool:
        return self.passed

    def extend(self, other: ParityReport) -> ParityReport:
        self.rows.extend(other.rows)
        return self

    def __str__(self) -> str:
        head = (
            "name",
            "dtype",
            "shape",
            "max err",
            "mean err",
            "torch err",
            "bound",
            "ratio",
            "nan/inf",
            "close",
            "result",
        )
        lines = []
        for r in self.rows:
            lines.append(
                (
                    r.name,
                    str(r.dtype).replace("torch.", "") if r.dtype is not None else "-",
                    "x".join(str(s) for s in r.shape) if r.shape else "()",
                    f"{r.max_err:.3e}",
                    f"{r.mean_err:.3e}",
                    f"{r.baseline_err:.3e}",
                    f"{r.bound:.3e}",
                    f"{r.ratio:.3f}",
                    "ok" if (r.nan_agree and r.inf_agree) else "DIFFER",
                    "-" if r.close is None else ("ok" if r.close else "FAIL"),
                    ("PASS" if r.passed else "FAIL") + (f" ({r.note})" if r.note else ""),
                )
            )
        widths = [max(len(h), *(len(l[c]) for l in lines)) if lines else len(h) for c, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        n_fail = len(self.failures)
        summary = ("PASSED" if self.passed else "FAILED") + (
            f": {len(self.rows) - n_fail}/{len(self.rows)} entries within the parity bound"
            if self.rows
            else ": nothing was compared"
        )
        out = []
        if self.title:
            out.append(self.title)
        out.append(
            "rule: max|out-ref| <= 2*max|torch-ref| + floor (3* for gradients); "
            "NaN/inf positions agree; float32/64 also assert_close"
        )
        out.append(fmt(head))
        out.append(fmt(["-" * w for w in widths]))
        out.extend(fmt(l) for l in lines)
        out.append(summary)
        return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------


def _fail_row(name, t, note) -> ParityRow:
    return ParityRow(
        name,
        getattr(t, "dtype", None),
        tuple(getattr(t, "shape", ())),
        math.inf,
        math.inf,
        math.nan,
        math.nan,
        False,
        False,
        None,
        False,
        note,
    )


def _compare_tensor(
    out: Tensor, ref: Tensor, baseline: Tensor | None, grad: bool, name: str, dtype: torch.dtype | None
) -> ParityRow:
    if not isinstance(out, Tensor) or not isinstance(ref, Tensor):
        return _fail_row(name, out, f"expected tensors, got {type(out).__name__} and {type(ref).__name__}")
    if tuple(out.shape) != tuple(ref.shape):
        return _fail_row(name, out, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    note = ""
    if baseline is not None and tuple(baseline.shape) != tuple(ref.shape):
        return _fail_row(name, out, f"baseline shape {tuple(baseline.shape)} != reference {tuple(ref.shape)}")

    if not out.is_floating_point():
        equal = bool(torch.equal(out.detach().cpu(), ref.detach().cpu().to(out.dtype)))
        diff = (out.detach().cpu().double() - ref.detach().cpu().double()).abs()
        err = float(diff.max()) if diff.numel() else 0.0
        return ParityRow(
            name,
            out.dtype,
            tuple(out.shape),
            err,
            float(diff.mean()) if diff.numel() else 0.0,
            0.0,
            0.0,
            True,
            True,
            None,
            equal,
            "" if equal else "integer values differ",
        )

    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    nan_agree = bool(torch.equal(torch.isnan(o), torch.isnan(r)))
    either_inf = torch.isinf(o) | torch.isinf(r)
    inf_agree = bool(((o == r) | ~either_inf).all())

    both = torch.isfinite(o) & torch.isfinite(r)
    d = (o - r).abs()[both]
    err_k = float(d.max()) if d.numel() else 0.0
    mean_k = float(d.mean()) if d.numel() else 0.0

    if baseline is None:
        err_t = 0.0
        note = "no baseline"
    else:
        b = baseline.detach().to("cpu", torch.float64)
        # A baseline that overflows or NaNs where the reference is finite must not loosen the bound.
        ok = torch.isfinite(b) & torch.isfinite(r)
        dt = (b - r).abs()[ok]
        err_t = float(dt.max()) if dt.numel() else 0.0
    work = out.dtype if dtype is None else dtype
    # The floor is one ulp at the output's own scale: an lse of 5 rounds in steps 5x wider than a
    # value near 1, so a unit-scale ulp would fail honest kernels on large-magnitude outputs.
    rf = r[torch.isfinite(r)]
    scale = max(1.0, float(rf.abs().max())) if rf.numel() else 1.0
    bound = (3.0 if grad else 2.0) * err_t + parity_floor(work) * scale

    close = None
    if work in _CLOSE_TOL and out.dtype in _CLOSE_TOL:
        rtol, atol = _CLOSE_TOL[work]
        close = bool(((o - r).abs() <= atol + rtol * r.abs())[both].all())

    passed = err_k <= bound and nan_agree and inf_agree and close is not False
    if not nan_agree:
        note = "NaN positions differ"
    elif not inf_agree:
        note = "inf positions differ"
    elif close is False:
        note = "assert_close fails"
    return ParityRow(
        name, out.dtype, tuple(out.shape), err_k, mean_k, err_t, bound, nan_agree, inf_agree, close, passed, note
    )


def _narrowest_dtype(obj) -> torch.dtype | None:
    dtypes = [t.dtype for t in _flatten(obj) if isinstance(t, Tensor) and t.is_floating_point()]
    return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else None


def compare(
    out: Any, ref: Any, baseline: Any, *, grad: bool = False, name: str = "out", dtype: torch.dtype | None = None
) -> ParityReport:
    """Apply the parity rule to ``out`` (code under test), ``ref`` (float64 reference) and
    ``baseline`` (plain torch in ``out``'s dtype).

    Each may be a tensor or a (nested) tuple/list of tensors; elements are named ``out[0]``,
    ``out[1]``, ... . Elements that are None in both ``out`` and ``ref`` are skipped (e.g. the
    gradient of an input that needs none); None on one side only fails. Positions where the
    reference is ``±inf`` (the lse of a fully masked row) must hold exactly the same value;
    NaN positions must agree; errors are measured over the positions finite in both.
    ``grad=True`` uses the gradient multiplier 3 instead of 2.

    ``dtype`` is the precision the computation ran in; it picks the rounding floor and whether
    the float32/float64 ``assert_close`` check applies. Default: the narrowest floating dtype
    among the tensors of ``out``, so in ``compare((out_bf16, lse_f32), ...)`` the float32 lse,
    which is only as accurate as its bfloat16 inputs, is judged as a bfloat16 result. Pass it
    when comparing such a wide output on its own.
    """
    if dtype is None:
        dtype = _narrowest_dtype(out)
    report = ParityReport()
    if isinstance(out, (tuple, list)) or isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)) or not isinstance(ref, (tuple, list)) or len(out) != len(ref):
            report.rows.append(_fail_row(name, None, "structure differs from the reference"))
            return report
        if baseline is None:
            baseline = [None] * len(ref)
        if not isinstance(baseline, (tuple, list)) or len(baseline) != len(ref):
            report.rows.append(_fail_row(name, None, "baseline structure differs from the reference"))
            return report
        for i, (o, r, b) in enumerate(zip(out, ref, baseline)):
            report.extend(compare(o, r, b, grad=grad, name=f"{name}[{i}]", dtype=dtype))
        return report
    if out is None and ref is None:
        return report
    if out is None or ref is None:
        missing = "output" if out is None else "reference"
        report.rows.append(_fail_row(name, out if out is not None else ref, f"{missing} is None"))
        return report
    report.rows.append(_compare_tensor(out, ref, baseline, grad, name, dtype))
    return report


# ----------------------------------------------------------------------------------------------
# check_parity
# ----------------------------------------------------------------------------------------------


def _map_tensors(obj, f, path):
    """Apply ``f(tensor, path)`` to every tensor in nested tuples/lists/dicts."""
    if isinstance(obj, Tensor):
        return f(obj, path)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(x, f, f"{path}.{n}") for n, x in zip(obj._fields, obj)))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(x, f, f"{path}[{i}]") for i, x in enumerate(obj))
    if isinstance(obj, dict):
        return {k: _map_tensors(x, f, f"{path}[{k!r}]") for k, x in obj.items()}
    return obj


def _flatten(obj) -> list[Any]:
    if isinstance(obj, (tuple, list)):
        return [y for x in obj for y in _flatten(x)]
    if isinstance(obj, dict):
        return [y for x in obj.values() for y in _flatten(x)]
    return [obj]


class _Copies:
    """Per-run copies of the arguments; remembers the differentiable leaves by path."""

    def __init__(self, args, kwargs, convert, wants_grad):
        self.leaves: dict = {}

        def f(t: Tensor, path: str):
            c = convert(t)
            if t.is_floating_point() and wants_grad(t):
                c = c.detach().requires_grad_(True)
                self.leaves[path] = c
            return c

        self.args = _map_tensors(tuple(args), f, "args")
        self.kwargs = {k: _map_tensors(v, f, k) for k, v in kwargs.items()}


def _prepare_callable(fn, dtype, device):
    if isinstance(fn, torch.nn.Module) and (dtype is not None or device is not None):
        m = copy.deepcopy(fn)
        return m.to(device=device, dtype=dtype) if dtype is not None else m.to(device=device)
    return fn


def _params(fn) -> dict:
    if isinstance(fn, torch.nn.Module):
        return {n: p for n, p in fn.named_parameters() if p.requires_grad and p.is_floating_point()}
    return {}


def _cotangents(outs: list[Any], seed: int) -> list[Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    cots = []
    for o in outs:
        if isinstance(o, Tensor) and o.is_floating_point() and o.requires_grad:
            cots.append(torch.randn(o.shape, generator=gen, dtype=torch.float64))
        else:
            cots.append(None)
    return cots


def _input_grads(outs, cots, leaves: list[Tensor | None]):
    """Gradients of ``sum(out * cot)`` with respect to ``leaves`` (None where a leaf is absent,
    unused, or nothing differentiable came out)."""
    pairs = [
        (o, c.to(device=o.device, dtype=o.dtype))
        for o, c in zip(outs, cots)
        if c is not None and isinstance(o, Tensor) and o.requires_grad and tuple(o.shape) == tuple(c.shape)
    ]
    present = [x for x in leaves if x is not None]
    if not pairs or not present:
        return [None] * len(leaves)
    grads = iter(torch.autograd.grad([o for o, _ in pairs], present, [c for _, c in pairs], allow_unused=True))
    return [None if x is None else next(grads) for x in leaves]


def check_parity(
    fn: Callable,
    reference_fn: Callable,
    *args,
    dtype: torch.dtype | None = None,
    grads: bool = False,
    seed: int = 0,
    **kwargs,
) -> ParityReport:
    """Check ``fn(*args, **kwargs)`` against ``reference_fn`` with the §5 parity rule.

    * reference: ``reference_fn`` on float64 CPU copies of every floating tensor argument
      (other tensors copied to the CPU; non-tensor arguments passed through unchanged);
    * code under test: ``fn`` on copies cast to ``dtype`` (default: each tensor's own dtype),
      on the arguments' devices;
    * baseline: ``reference_fn`` on the same low-precision copies, i.e. plain torch math in
      that dtype on that device.

    The floor and the float32/float64 ``assert_close`` check follow ``dtype`` (default: the
    narrowest floating input dtype), also for outputs kept wider, like a float32 lse.

    ``fn`` / ``reference_fn`` may be ``nn.Module``s: the reference module is deep-copied to
    float64 on the CPU, and with ``dtype`` the module under test and the baseline copy are cast
    to it (your modules are never modified). Arguments may be nested tuples/lists/dicts.

    ``grads=True`` also backpropagates a fixed random cotangent (drawn from ``seed``) through
    all three and compares the gradients of the floating tensor arguments that have
    ``requires_grad=True`` (all floating tensor arguments when none has), and, when both
    callables are modules, of their parameters of the same name, with the gradient
    multiplier 3. The CPU generator is seeded with ``seed`` before each of the three calls (and
    restored afterwards), so code that draws from it, e.g. dropout seeds, draws the same.

    Returns a :class:`ParityReport`; rows are named ``out`` (or ``out[i]``) and
    ``grad[args[i]]`` / ``grad[<kwarg>]`` / ``grad[param:<name>]``.
    """
    tensors = [t for t in _flatten(list(args) + list(kwargs.values())) if isinstance(t, Tensor)]
    float_args = [t for t in tensors if t.is_floating_point()]
    any_marked = any(t.requires_grad for t in float_args)
    # The precision the code under test runs in: the cast dtype, else the narrowest input.
    work = dtype
    if work is None and float_args:
        work = max((t.dtype for t in float_args), key=lambda d: torch.finfo(d).eps)

    def wants_grad(t: Tensor) -> bool:
        return grads and (t.requires_grad or not any_marked)

    def wide(t: Tensor) -> Tensor:
        # Always a fresh copy: code that writes into its arguments must not touch the caller's.
        t = t.detach()
        return (t.to("cpu", torch.float64) if t.is_floating_point() else t.cpu()).clone()

    ref_copies = _Copies(args, kwargs, wide, wants_grad)

    def low(t: Tensor) -> Tensor:
        t = t.detach()
        return (t.to(dtype) if (dtype is not None and t.is_floating_point()) else t).clone()

    test_copies = _Copies(args, kwargs, low, wants_grad)
    base_copies = _Copies(args, kwargs, low, wants_grad)

    test_fn = _prepare_callable(fn, dtype, None)
    ref_fn = _prepare_callable(reference_fn, torch.float64, torch.device("cpu"))
    base_fn = _prepare_callable(reference_fn, dtype, None)

    results = []
    with torch.random.fork_rng(devices=[]):
        for f, c in ((test_fn, test_copies), (ref_fn, ref_copies), (base_fn, base_copies)):
            torch.default_generator.manual_seed(seed)
            with torch.enable_grad() if grads else torch.no_grad():
                results.append(f(*c.args, **c.kwargs))
    out, ref, base = results

    def label(f):
        return getattr(f, "__name__", type(f).__name__)

    title = f"parity of {label(fn)} vs {label(reference_fn)}"
    if work is not None:
        title += f" in {str(work).replace('torch.', '')}"
    report = ParityReport(title=title)
    report.extend(compare(out, ref, base, name="out", dtype=work))
    if not grads:
        return report

    paths = list(ref_copies.leaves)
    names = [f"grad[{p}]" for p in paths]
    leaves = {
        "test": [test_copies.leaves.get(p) for p in paths],
        "ref": [ref_copies.leaves.get(p) for p in paths],
        "base": [base_copies.leaves.get(p) for p in paths],
    }
    test_p, ref_p, base_p = _params(test_fn), _params(ref_fn), _params(base_fn)
    for n in ref_p:
        if n in test_p and n in base_p:
            names.append(f"grad[param:{n}]")
            leaves["test"].append(test_p[n])
            leaves["ref"].append(ref_p[n])
            leaves["base"].append(base_p[n])

    flat_ref = _flatten(ref)
    cots = _cotangents(flat_ref, seed)
    flat_out, flat_base = _flatten(out), _flatten(base)
    if len(flat_out) != len(flat_ref) or len(flat_base) != len(flat_ref):
        report.rows.append(_fail_row("grad", None, "output structure differs; gradients not compared"))
        return report
    g_test = _input_grads(flat_out, cots, leaves["test"])
    g_ref = _input_grads(flat_ref, cots, leaves["ref"])
    g_base = _input_grads(flat_base, cots, leaves["base"])
    for name, gt, gr, gb in zip(names, g_test, g_ref, g_base):
        report.extend(compare(gt, gr, gb, grad=True, name=name, dtype=work))
    return report


def assert_close_to_reference(fn: Callable, reference_fn: Callable, *args, **kwargs) -> ParityReport:
    """:func:`check_parity`, raising ``AssertionError`` with the report's table when it fails.
    Returns the report when it passes."""
    report = check_parity(fn, reference_fn, *args, **kwargs)
    if not report.passed:
        raise AssertionError("parity check failed\n" + str(report))
    return report

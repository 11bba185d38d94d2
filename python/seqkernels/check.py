"""`seqkernels check`: the DESIGN §5 parity rule for every op on every backend this machine can run.

Each case draws fresh random inputs, runs the op on the backend in the low dtype, the reference in
float64 on the CPU, and plain torch math (the reference backend) in the low dtype as the baseline.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from typing import Callable, List, Optional

import torch

from . import backends, testing

# What `seqkernels check` can be asked for (the CLI's choices): the ops it has cases for, the
# backends it checks against the reference, and the dtypes of its cases (float64 runs where a
# backend has float64 kernels, the cpu one).
OPS = ("attention", "kv_cache_append", "decode_attention", "lstm_cell")
BACKENDS = ("cuda", "cpu", "triton")
DTYPES = ("float16", "bfloat16", "float32", "float64")


def prepare_triton_env() -> None:
    # Triton reads TRITON_INTERPRET when it is imported: without a GPU, Triton kernels run on CPU
    # tensors under the interpreter (as the tests run them). Called before anything imports triton.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_usable() -> tuple[bool, str]:
    """Is Triton usable here, and how: the one answer `seqkernels info` prints and `seqkernels check`
    acts on (it runs the Triton cases exactly when this says yes, on the device named)."""
    prepare_triton_env()
    if importlib.util.find_spec("triton") is None:
        return False, "no: triton is not installed (pip install triton)"
    try:
        import triton
    except Exception as e:  # a broken install: say so instead of failing later per case
        return False, f"no: import triton failed ({type(e).__name__}: {e})"
    if torch.cuda.is_available():
        return True, f"yes, on the GPU (triton {triton.__version__})"
    if backends.triton_interpreting():
        return True, (
            f"yes, on CPU tensors under the interpreter (TRITON_INTERPRET=1; triton {triton.__version__}): "
            "correctness only, slow"
        )
    return False, "no: no GPU, and TRITON_INTERPRET=0 turns the interpreter off"


def triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class Case:
    op: str  # public op name (seqkernels.explain's)
    name: str
    make: Callable  # (dtype, device) -> inputs
    run: Callable  # (inputs, backend) -> tensor or tuple of tensors
    grad: bool = False
    dtypes: tuple = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _to(inputs, dtype=None, device=None):
    def conv(t):
        if isinstance(t, torch.Tensor):
            t = t.to(device) if device is not None else t
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.detach().clone()
        return t

    return {k: conv(v) for k, v in inputs.items()}


def _attention_cases() -> List[Case]:
    import seqkernels

    def make(B, Hq, Hkv, Lq, Lk, D, extra=None):
        def f(dtype, device):
            d = {
                "q": torch.randn(B, Hq, Lq, D, dtype=dtype, device=device),
                "k": torch.randn(B, Hkv, Lk, D, dtype=dtype, device=device),
                "v": torch.randn(B, Hkv, Lk, D, dtype=dtype, device=device),
            }
            if extra:
                d.update(extra(dtype, device))
            return d

        return f

    def fwd(kw):
        def f(x, backend):
            return seqkernels.attention(
                x["q"],
                x["k"],
                x["v"],
                backend=backend,
                return_lse=True,
                **{**kw, **{k: v for k, v in x.items() if k not in "qkv"}},
            )

        return f

    def bwd(kw):
        def f(x, backend):
            q, k, v = (x[n].requires_grad_() for n in "qkv")
            out = seqkernels.attention(
                q, k, v, backend=backend, **{**kw, **{k_: v_ for k_, v_ in x.items() if k_ not in "qkv"}}
            )
            out.backward(torch.ones_like(out) * 0.1 + out.detach() * 0)
            return q.grad, k.grad, v.grad

        return f

    lengths = lambda dtype, device: {"kv_lengths": torch.tensor([13, 0], dtype=torch.int32, device=device)}  # noqa: E731
    mask = lambda dtype, device: {"attn_mask": torch.rand(2, 1, 17, 29, device=device) > 0.3}  # noqa: E731
    return [
        Case("attention", "fwd causal GQA (2,4/2,97x97,64)", make(2, 4, 2, 97, 97, 64), fwd({"causal": True})),
        Case(
            "attention",
            "fwd window+kv_lengths (2,2,17x29,40)",
            make(2, 2, 2, 17, 29, 40, lengths),
            fwd({"window": (5, 2)}),
        ),
        Case("attention", "fwd bool mask (2,2,17x29,128)", make(2, 2, 2, 17, 29, 128, mask), fwd({})),
        Case("attention", "bwd causal (1,2,33x65,64)", make(1, 2, 2, 33, 65, 64), bwd({"causal": True}), grad=True),
    ]


def _kv_cases() -> List[Case]:
    import seqkernels

    def make_append(dtype, device):
        B, H, S, T, D = 3, 2, 40, 5, 64
        return {
            "k_cache": torch.randn(B, H, S, D, dtype=dtype, device=device),
            "v_cache": torch.randn(B, H, S, D, dtype=dtype, device=device),
            "k_new": torch.randn(B, H, T, D, dtype=dtype, device=device),
            "v_new": torch.randn(B, H, T, D, dtype=dtype, device=device),
            "cache_seqlens": torch.tensor([0, 17, S - T], dtype=torch.int32, device=device),
        }

    def run_append(x, backend):
        seqkernels.kv_cache_append(
            x["k_cache"], x["v_cache"], x["k_new"], x["v_new"], x["cache_seqlens"], backend=backend
        )
        return x["k_cache"], x["v_cache"]

    def make_decode(dtype, device):
        B, Hq, Hkv, S, D = 3, 8, 2, 300, 128
        return {
            "q": torch.randn(B, Hq, 1, D, dtype=dtype, device=device),
            "k_cache": torch.randn(B, Hkv, S, D, dtype=dtype, device=device),
            "v_cache": torch.randn(B, Hkv, S, D, dtype=dtype, device=device),
            "cache_seqlens": torch.tensor([1, 177, S], dtype=torch.int32, device=device),
        }

    def run_decode(x, backend):
        return seqkernels.decode_attention(
            x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"], backend=backend, return_lse=True
        )

    return [
        Case("kv_cache_append", "append contiguous (3,2,40,64) T=5", make_append, run_append),
        Case("decode_attention", "decode GQA (3,8/2,300,128)", make_decode, run_decode),
    ]


def _lstm_cases() -> List[Case]:
    import seqkernels

    def make(dtype, device):
        B, I, H = 7, 33, 64
        return {
            "input": torch.randn(B, I, dtype=dtype, device=device),
            "hx": torch.randn(B, H, dtype=dtype, device=device),
            "cx": torch.randn(B, H, dtype=dtype, device=device),
            "weight_ih": torch.randn(4 * H, I, dtype=dtype, device=device) * 0.2,
            "weight_hh": torch.randn(4 * H, H, dtype=dtype, device=device) * 0.2,
            "bias_ih": torch.randn(4 * H, dtype=dtype, device=device),
            "bias_hh": torch.randn(4 * H, dtype=dtype, device=device),
        }

    def run(x, backend):
        return seqkernels.lstm_cell(**x, backend=backend)

    def run_bwd(x, backend):
        for t in x.values():
            t.requires_grad_()
        hy, cy = seqkernels.lstm_cell(**x, backend=backend)
        (hy.sum() + 0.5 * cy.sum()).backward()
        return tuple(x[n].grad for n in ("input", "hx", "cx", "weight_ih", "weight_hh", "bias_ih"))

    return [
        Case("lstm_cell", "fwd (7,33->64)", make, run),
        Case("lstm_cell", "bwd (7,33->64)", make, run_bwd, grad=True),
    ]


def _spec(op):
    from ._explain import _OPS

    mod_name, spec_name, _ = _OPS[op]
    return getattr(importlib.import_module(mod_name), spec_name)


def run_case(case: Case, backend: str, dtype: torch.dtype, device: str) -> tuple[str, Optional[testing.ParityReport]]:
    if device == "cuda" and not torch.cuda.is_available():
        # A CUDA build (kernels registered) on a machine without a GPU: nothing to run them on.
        return "skip: no CUDA device on this machine", None
    spec = _spec(case.op)
    reason = backends._generic_why_not(spec, backend, torch.device(device))
    if reason is not None:
        return "skip: " + reason, None
    inputs = case.make(torch.float64, "cpu")
    try:
        got = case.run(_to(inputs, dtype, device), backend)
    except backends.BackendError as e:
        return "skip: " + str(e).split("cannot run these inputs: ")[-1].split(". Use backend=")[0], None
    ref = case.run(_to(inputs), "reference")
    base = case.run(_to(inputs, dtype, "cpu"), "reference")
    got = tuple(t.detach().cpu() for t in got) if isinstance(got, tuple) else got.detach().cpu()
    report = testing.compare(got, ref, base, grad=case.grad)
    return ("pass" if report.passed else "FAIL"), report


def main(ops=None, backends_=None, dtypes=None, verbose=False) -> int:
    cases: List[Case] = []
    for loader, op_names in (
        (_attention_cases, ("attention",)),
        (_kv_cases, ("kv_cache_append", "decode_attention")),
        (_lstm_cases, ("lstm_cell",)),
    ):
        if ops and not set(ops) & set(op_names):
            continue
        cases += [c for c in loader() if not ops or c.op in ops]
    for what, given, known in (("op", ops, OPS), ("backend", backends_, BACKENDS), ("dtype", dtypes, DTYPES)):
        bad = sorted(set(given or ()) - set(known))
        if bad:
            raise ValueError(f"{what}: unknown {', '.join(map(repr, bad))}; expected one of {', '.join(known)}")
    want_backends = list(backends_ or BACKENDS)
    usable, how = False, ""
    if "triton" in want_backends:  # importing triton costs seconds: only when its rows are wanted
        usable, how = triton_usable()
        print(f"triton usable here: {how}")
    rows, failures = [], 0
    for case in cases:
        for backend in want_backends:
            device = "cuda" if backend == "cuda" else triton_device() if backend == "triton" else "cpu"
            for dtype in case.dtypes:
                if dtypes and str(dtype).replace("torch.", "") not in dtypes:
                    continue
                if backend == "triton" and not usable:
                    status, report = "skip: triton " + how, None
                else:
                    status, report = run_case(case, backend, dtype, device)
                failures += status == "FAIL"
                ratio = max((r.ratio for r in report.rows), default=0.0) if report else None
                rows.append((case.op, case.name, backend, str(dtype).replace("torch.", ""), status, ratio))
                if status == "FAIL" or (verbose and report):
                    print(report)
    w = max((len(r[1]) for r in rows), default=10)
    print(f"{'op':18s} {'case':{w}s} {'backend':9s} {'dtype':9s} {'err/bound':>9s}  result")
    for op, name, backend, dtype, status, ratio in rows:
        r = f"{ratio:9.3f}" if ratio is not None else " " * 9
        print(f"{op:18s} {name:{w}s} {backend:9s} {dtype:9s} {r}  {status}")
    print(
        f"\n{sum(r[4] == 'pass' for r in rows)} passed, {failures} failed, "
        f"{sum(r[4].startswith('skip') for r in rows)} skipped (backend not available for these inputs here)"
    )
    return 1 if failures else 0

"""The `seqkernels` command: `info`, `check`, `bench` (DESIGN §2, §7)."""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys


def version_string() -> str:
    import torch

    from . import __version__, _ext

    if _ext.extension_available():
        archs = _ext.compiled_cuda_archs()
        ext = "extension built" + (f", CUDA archs {';'.join(archs)}" if archs else ", CPU only")
    else:
        ext = "extension NOT built"
    return f"seqkernels {__version__} (torch {torch.__version__}; {ext})"


@functools.lru_cache(maxsize=None)
def _report_fn():
    """The extension's ``seqkernels_cpu_isa_report`` as a ctypes function (loaded once: the LSTM
    driver asks for its bf16 path per call), or None."""
    import ctypes

    from . import _ext

    if not _ext.extension_available():
        return None
    try:
        fn = ctypes.CDLL(_ext.load_extension().__file__).seqkernels_cpu_isa_report
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn


def cpu_isa_report() -> dict | None:
    """The CPU kernels' instruction-set report, from the extension itself (csrc/cpu/kv_cache.cpp's
    ``seqkernels_cpu_isa_report``, read through ctypes: it applies the same CPUID/XGETBV probe and
    SEQKERNELS_CPU_ISA rules as the kernels). ``{"active": "avx512", "supported": ["portable",
    ...], "avx512_bf16": True, "amx_bf16": False}``; None when the extension is not built or predates the report."""
    fn = _report_fn()
    if fn is None:
        return None
    fields = dict(kv.split("=", 1) for kv in fn().decode().split(";"))
    ops = _parse_ops(fields.get("ops", ""))
    return {
        "active": fields["active"],
        "supported": fields["supported"].split(","),
        "avx512_bf16": fields.get("avx512_bf16") == "1",
        "amx_bf16": fields.get("amx_bf16") == "1",
        "ops": ops,
    }


def _parse_ops(ops: str) -> dict:
    """The report's ops field, "attention_fwd=float32:avx512,bfloat16:avx512_bf16,...|decode_attention=..."
    (cpu/paths.h), as {family: {dtype: path}}."""
    out = {}
    for fam in filter(None, ops.split("|")):
        name, paths = fam.split("=", 1)
        out[name] = dict(p.split(":", 1) for p in paths.split(","))
    return out


def cpu_path(family: str, dtype: str) -> str | None:
    """The path one kernel family takes now for one dtype ("amx_bf16", ...): cpu_isa_report's
    ``ops[family][dtype]`` without building the rest of the report (the LSTM driver asks per call)."""
    fn = _report_fn()
    if fn is None:
        return None
    return _parse_ops(fn().decode().partition("ops=")[2]).get(family, {}).get(dtype)


def cpu_path_lines() -> list:
    """One line per CPU kernel family: the instruction-set path a call takes now, per dtype (the
    kernels' own rule, csrc/cpu/paths.h). Dtypes that share a path are listed together."""
    rep = cpu_isa_report()
    if rep is None or not rep["ops"]:
        return []
    lines = []
    for name, paths in rep["ops"].items():
        by_path: dict = {}
        for dt, isa in paths.items():
            by_path.setdefault(isa, []).append(dt)
        lines.append(f"  {name:<18} " + "; ".join(f"{'/'.join(dts)}: {isa}" for isa, dts in by_path.items()))
    return lines


def cpu_isa_summary() -> str:
    """The `cpu isa` line of `seqkernels info`: the path the CPU kernels take now, and the ones
    this CPU supports (SEQKERNELS_CPU_ISA=portable|avx2|avx512|avx512_bf16|amx_bf16|native lowers the
    choice)."""
    from ._ext import cpu_isa_env_problem

    rep = cpu_isa_report()
    if rep is None:
        return "unknown (extension not built)"
    bf16 = "avx512_bf16 present" if rep["avx512_bf16"] else "no avx512_bf16"
    bf16 += ", AMX-BF16 tiles usable" if rep.get("amx_bf16") else ""
    forced = os.environ.get("SEQKERNELS_CPU_ISA")
    how = f"; SEQKERNELS_CPU_ISA={forced}" if forced else ""
    if cpu_isa_env_problem() is not None:
        how += ", not a known level: ignored"
    return f"{rep['active']} (supports: {', '.join(rep['supported'])}; {bf16}{how})"


def cmd_info(args) -> int:
    import torch

    from . import _ext, backends, check

    # The same environment and answer as `seqkernels check` (check.triton_usable): the per-op
    # cells below then agree with what check runs.
    triton_ok, triton_how = check.triton_usable()

    lines = [
        f"seqkernels {__import__('seqkernels').__version__}",
        f"python     {platform.python_version()} ({platform.machine()})",
        f"torch      {torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
    ]
    lines.append(f"triton     usable here: {triton_how}")
    lines.append(f"cpu        {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    lines.append(f"cpu isa    {cpu_isa_summary()}")
    paths = cpu_path_lines()
    if paths:
        lines.append("cpu paths  per kernel family and input dtype (kv_cache_append is a copy, no ISA path):")
        lines += paths
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"gpu {i}      {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                f"{p.multi_processor_count} SMs"
            )
    else:
        lines.append("gpu        none visible to torch")
    if _ext.extension_available():
        archs = _ext.compiled_cuda_archs()
        lines.append(
            "extension  seqkernels._C built; CUDA part: " + (f"archs {';'.join(archs)}" if archs else "not built")
        )
    else:
        lines.append("extension  seqkernels._C NOT built (only the triton and reference backends)")
    lines.append("")
    lines.append("backends per op (kernel registered; automatic order per device type):")
    import importlib

    from ._explain import _OPS

    for name, (mod_name, spec_name, _) in _OPS.items():
        spec = getattr(importlib.import_module(mod_name), spec_name)
        cells = []
        for b in ("cuda", "cpu", "triton"):
            dev = "cuda" if b == "cuda" else check.triton_device() if b == "triton" else "cpu"
            reason = backends._generic_why_not(spec, b, torch.device(dev))
            if b == "triton" and not triton_ok:
                reason = triton_how.removeprefix("no: ")
            if reason is None:
                cells.append(f"{b}: yes")
            elif reason.startswith(backends.NOT_IMPLEMENTED):
                cells.append(f"{b}: not implemented")
            else:
                cells.append(f"{b}: no ({reason})")
        lines.append(f"  {name:30s} " + ", ".join(cells) + ", reference: yes")
        order = "; ".join(f"{dev}: {' > '.join(spec.auto_order(dev))}" for dev in ("cuda", "cpu"))
        lines.append(f"  {'':30s} auto order  {order}")
    print("\n".join(lines))
    if args.kernels:
        from . import kernel_report

        print()
        print(kernel_report.format_table(kernel_report.collect()))
    return 0


def cmd_check(args) -> int:
    from . import check

    return check.main(ops=args.op, backends_=args.backend, dtypes=args.dtype)


def cmd_bench(argv) -> int:
    from .bench import cli as bench_cli

    return bench_cli.main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    if argv[:1] in (["--version"], ["-V"]):
        # Answered before argparse builds the sub-commands (and before anything imports triton).
        print(version_string())
        return 0
    from .check import BACKENDS as CHECK_BACKENDS
    from .check import DTYPES as CHECK_DTYPES
    from .check import OPS as CHECK_OPS

    parser = argparse.ArgumentParser(prog="seqkernels", description=__doc__)
    parser.add_argument("--version", "-V", action="store_true", help="print the version and exit")
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        # Before the sub-command: argparse would only say that the sub-command is missing.
        parser.error(f"unrecognized argument {argv[0]!r} (expected info, check or bench first)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="versions, devices, backends built, CUDA archs compiled in")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="also compile every kernel and print registers, shared memory, spills and tensor-core use per arch (slow)",
    )
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("check", help="parity of every op on every backend available here (DESIGN §5)")
    p.add_argument("--op", action="append", choices=CHECK_OPS, help="only this op (repeatable)")
    p.add_argument("--backend", action="append", choices=CHECK_BACKENDS, help="only this backend (repeatable)")
    p.add_argument("--dtype", action="append", choices=CHECK_DTYPES, help="only this dtype (repeatable)")
    p.set_defaults(fn=cmd_check)
    sub.add_parser("bench", help="microbenchmarks, tables, CSV and plots (seqkernels bench --help)")
    args = parser.parse_args(argv)
    if args.version:
        print(version_string())
        return 0
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""Static report of the GPU code: registers, shared memory, spills, stack and tensor-core use of
every CUDA kernel and every Triton kernel configuration, per target arch, without a GPU.

    rows = collect(archs=["8.0", "9.0"])
    print(format_table(rows))           # `seqkernels info --kernels`

CUDA kernels (`csrc/cuda/*.cu`, source checkout) are compiled by nvcc for each arch with
``-Xptxas -v,-warn-spills``, the same flags as setup.py; ptxas's report gives registers,
static shared memory, spill stores/loads and the stack frame, and the SASS (``cuobjdump
-sass``) tells whether tensor-core instructions (HMMA/HGMMA) are present. Results are cached
under ``build/kernel_report`` per file, flags and header contents. Without the sources (an
installed wheel) ``collect`` reads the kernels compiled into ``seqkernels._C`` instead
(``cuobjdump -res-usage``: registers, shared, stack, local memory).

Triton kernels are compiled ahead of time with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 80 | 90, 32))``; the cubin's resource usage (``cuobjdump -res-usage``)
gives the same columns (Triton does not report spills without a driver; a non-zero stack or local
memory is what spills turn into). Tensor-core use comes from the PTX (``wgmma`` / ``mma.sync``):
ptxas makes HMMA/HGMMA only out of those, so only a kernel whose PTX has neither and whose entry
expects tensor cores is disassembled (``cuobjdump -sass``), to show what its SASS holds instead.
Entries that compile the same kernel (same function, signature, constexprs, hints, warps, stages
and arch) are compiled once and each gets its row. Inside a source checkout each
compiled kernel's columns are kept under ``build/kernel_report/triton``, named by Triton's cache
key, so a rerun whose Triton cache is warm runs no cuobjdump (``SEQKERNELS_REPORT_CACHE=0``: off).

Triton registry protocol
------------------------
A module ``triton_kernels/<op>.py`` makes its kernels visible here by defining

    STATIC_CONFIGS = [
        # (kernel, signature, constexprs, num_warps, num_stages, expects_mma)
        (_attention_fwd_kernel,
         {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "Out": "*fp16", "stride_qb": "i64", ...,
          "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "HEAD_DIM": "constexpr"},
         {"BLOCK_M": 128, "BLOCK_N": 64, "HEAD_DIM": 128},
         8, 3, True),
        ...
    ]

one entry per configuration the launcher can pick on a GPU: ``kernel`` the ``@triton.jit``
function, ``signature`` every parameter's Triton type (``"*fp16"``, ``"*bf16"``, ``"*fp32"``,
``"i32"``, ``"i64"``, ``"fp32"``, or ``"constexpr"``; pointers are compiled as 16-byte aligned
like the JIT does for torch tensors, ``"*fp16:1"`` says not aligned, ``"i32:16"`` says
divisible by 16 as for strides the JIT sees divisible), ``constexprs`` the values of the
constexpr parameters, and ``expects_mma`` True for kernels doing matrix products, which must
then use wgmma on sm_90 and mma (HMMA) on sm_80, ``"mma"`` when tensor cores are required but
mma.sync is the right instruction on sm_90 too (tiles below wgmma's 64 rows, e.g. decode), or
False. Every configuration must compile, use no
stack or local memory, and fit the arch's shared memory.

Rows are dicts with keys: ``kind`` ("cuda"/"triton"), ``source``, ``kernel``, ``config``,
``arch`` ("sm_80"), ``registers``, ``shared_bytes``, ``spill_stores``, ``spill_loads`` (None
when unknown), ``stack_bytes``, ``local_bytes``, ``tensor_cores`` (bool), ``expects_tensor_cores``
(bool or None) and ``problems`` (list of strings, empty when the kernel meets the bars).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

DEFAULT_ARCHS = ("8.0", "9.0")
# Opt-in maximum of shared memory per block, bytes.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
STATIC_SMEM_LIMIT = 48 * 1024

# Which CUDA kernels must use tensor cores: (pattern on the kernel's function name, expected).
# Kernels matching no pattern are reported without an expectation.
EXPECTS_TENSOR_CORES = [
    (re.compile(r"^_attention_(fwd|bwd)_kernel$"), True),
    (re.compile(r"^_selftest_mma_kernel$"), True),
    (re.compile(r"^_selftest_(plain|local_memory|spill)_kernel$"), False),
]

_TC_SASS = re.compile(r"\b(HMMA|HGMMA|IMMA|WGMMA)\b")
_LOCAL_SASS = re.compile(r"\b(STL|LDL)\b")


def source_root() -> Path | None:
    """The source checkout this module belongs to (the folder holding csrc/), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "csrc" / "cuda").is_dir() else None


def _arch_num(arch) -> int:
    return int(str(arch).replace("sm_", "").replace(".", ""))


def _archs(archs) -> list[int]:
    if archs is None:
        env = os.environ.get("SEQKERNELS_CUDA_ARCHS")
        archs = [a for a in env.replace(",", ";").split(";") if a.strip()] if env else DEFAULT_ARCHS
    return sorted({_arch_num(a) for a in archs})


def _tool(name: str) -> str | None:
    """A CUDA binary tool: CUDA_HOME, /usr/local/cuda, PATH, then Triton's bundled copy."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cands = [Path(home) / "bin" / name]
    found = shutil.which(name)
    if found:
        cands.append(Path(found))
    try:
        import triton

        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short_name(demangled: str) -> str:
    """`void seqkernels::_k<float, 64>(...)` -> `_k`."""
    name = demangled.split("(")[0]
    depth, cut = 0, len(name)
    for i in range(len(name) - 1, -1, -1):  # drop a trailing template argument list
        if name[i] == ">":
            depth += 1
        elif name[i] == "<":
            depth -= 1
            if depth == 0:
                cut = i
                break
    if depth == 0 and cut < len(name) and name.endswith(">"):
        name = name[:cut]
    return name.split("::")[-1].split()[-1]


def _display_name(demangled: str) -> str:
    """`void seqkernels::kv::_k<float, 64>(seqkernels::P)` -> `_k<float, 64>`."""
    name = demangled.split("(")[0]
    if name.startswith("void "):
        name = name[5:]
    head, lt, tail = name.partition("<")
    return head.split("::")[-1] + lt + tail


def _expects(short: str):
    for pat, want in EXPECTS_TENSOR_CORES:
        if pat.search(short):
            return want
    return None


def _expected_tc(row: dict) -> str | None:
    """The tensor-core form a row must show: None (no expectation), "no", "yes" (a CUDA kernel: any
    tensor-core instruction), "mma" (mma.sync) or "wgmma". A Triton entry expecting tensor cores in
    its arch's best form (True) wants wgmma from sm_90 on and mma.sync before."""
    exp = row.get("expects_tensor_cores")
    if exp is None:
        return None
    if exp is True and row["kind"] == "triton":
        return "wgmma" if _arch_num(row["arch"]) >= 90 else "mma"
    return {True: "yes", False: "no", "mma": "mma"}[exp]


def _problems(row: dict) -> list[str]:
    p = []
    if row.get("spill_stores") or row.get("spill_loads"):
        p.append(f"spills ({row.get('spill_stores')} B stores, {row.get('spill_loads')} B loads)")
    if row.get("stack_bytes"):
        p.append(f"stack frame {row['stack_bytes']} B")
    if row.get("local_bytes"):
        p.append(f"local memory {row['local_bytes']} B")
    limit = STATIC_SMEM_LIMIT if row["kind"] == "cuda" else SMEM_LIMIT.get(_arch_num(row["arch"]), 48 * 1024)
    if row.get("shared_bytes") and row["shared_bytes"] > limit:
        p.append(f"shared memory {row['shared_bytes']} B > {limit} B")
    exp = row.get("expects_tensor_cores")
    if exp and not row.get("tensor_cores"):
        p.append("no tensor-core instructions")
    elif _expected_tc(row) == "wgmma" and row.get("tensor_core_kind") != "wgmma":
        p.append("no wgmma on sm_90 (mma.sync only; declare expects_mma='mma' for tiles below 64 rows)")
    return p


# ------------------------------------------------------------------------------------------------
# SASS / resource-usage parsing (cuobjdump output of a cubin, fatbin or shared library)
# ------------------------------------------------------------------------------------------------
def parse_sass(text: str) -> dict[tuple[str, str], dict]:
    """{(arch, mangled function): {"tensor_cores": bool, "local_instructions": int}}."""
    out: dict[tuple[str, str], dict] = {}
    arch, func = "", None
    for line in text.splitlines():
        m = re.match(r"\s*code for (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            func = out.setdefault((arch, m.group(1)), {"tensor_cores": False, "local_instructions": 0})
            continue
        if func is not None and "/*" in line:
            if _TC_SASS.search(line):
                func["tensor_cores"] = True
            if _LOCAL_SASS.search(line):
                func["local_instructions"] += 1
    return out


def parse_res_usage(text: str) -> dict[tuple[str, str], dict]:
    """`cuobjdump -res-usage`: {(arch, mangled function): {registers, shared, stack, local, source}};
    source: the `identifier` of the function's ELF (the .cu file nvcc compiled it from), or None."""
    out: dict[tuple[str, str], dict] = {}
    arch, func, source = "", None, None
    for line in text.splitlines():
        if line.startswith("Fatbin elf code:"):
            source = None
            continue
        m = re.match(r"\s*identifier = (.+?)\s*$", line)
        if m:
            source = m.group(1)
            continue
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            func = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and func:
            out[(arch, func)] = {
                "registers": int(m.group(1)),
                "stack": int(m.group(2)),
                "shared": int(m.group(3)),
                "local": int(m.group(4)),
                "source": source,
            }
            func = None
    return out


def parse_ptxas(text: str) -> dict[tuple[str, str], dict]:
    """`ptxas -v` output: {(arch, mangled function): {registers, shared, spill_stores, spill_loads, stack}}."""
    out: dict[tuple[str, str], dict] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            cur = out.setdefault(
                (m.group(2), m.group(1)), {"registers": 0, "shared": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0}
            )
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["shared"] = int(sm.group(1)) if sm else 0
    return out


# ------------------------------------------------------------------------------------------------
# CUDA: nvcc per .cu file
# ------------------------------------------------------------------------------------------------
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def cuda_sources(root: Path | None = None) -> list[Path]:
    root = root or source_root()
    return sorted((root / "csrc" / "cuda").glob("*.cu")) if root else []


def _nvcc_command(src: Path, archs: list[int], out: Path, root: Path) -> list[str]:
    from torch.utils import cpp_extension

    nvcc = _tool("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME): the CUDA kernels cannot be compiled for the report")
    cmd = [
        nvcc,
        "-fatbin",
        "-O3",
        "-std=c++20",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-Xptxas=-v,-warn-spills",
        "-DSEQKERNELS_WITH_CUDA",
        *TORCH_NVCC_DEFINES,
        f"-I{root / 'csrc'}",
        f"-I{sysconfig.get_paths()['include']}",
    ]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd += ["-MD", "-MF", str(out) + ".d", str(src), "-o", str(out)]
    return cmd


def _deps_fresh(out: Path, cmd: list[str]) -> bool:
    stamp, dep = Path(str(out) + ".cmd"), Path(str(out) + ".d")
    if not (out.exists() and stamp.exists() and dep.exists()) or stamp.read_text() != shlex.join(cmd):
        return False
    deps = dep.read_text().replace("\\\n", " ").partition(":")[2].split()
    t = out.stat().st_mtime
    try:
        return all(os.stat(d).st_mtime <= t for d in deps)
    except FileNotFoundError:
        return False


def compile_cuda_file(src, archs=None, *, build_dir: Path | None = None) -> list[dict]:
    """Compile one .cu file for every arch with nvcc and report each kernel (cached)."""
    src = Path(src).resolve()
    root = source_root() or src.parents[2]
    arch_list = _archs(archs)
    build_dir = Path(build_dir or os.environ.get("SEQKERNELS_REPORT_BUILD_DIR") or root / "build" / "kernel_report")
    key = hashlib.sha256(f"{src}\0{arch_list}".encode()).hexdigest()[:12]
    out = build_dir / f"{src.stem}-{key}.fatbin"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = _nvcc_command(src, arch_list, out, root)
    log = Path(str(out) + ".ptxas")
    if not _deps_fresh(out, cmd) or not log.exists():
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src}:\n$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
        log.write_text(proc.stdout + proc.stderr)
        Path(str(out) + ".cmd").write_text(shlex.join(cmd))
    ptxas = parse_ptxas(log.read_text())
    cuobjdump = _tool("cuobjdump")
    sass = (
        parse_sass(subprocess.run([cuobjdump, "-sass", str(out)], capture_output=True, text=True).stdout)
        if cuobjdump
        else {}
    )
    names = _demangle(sorted({f for _, f in ptxas}))
    rows = []
    for (arch, func), r in sorted(ptxas.items(), key=lambda kv: (names[kv[0][1]], kv[0][0])):
        s = sass.get((arch, func), {})
        short = _short_name(names[func])
        row = {
            "kind": "cuda",
            "source": _rel(src),
            "kernel": _display_name(names[func]),
            "short_name": short,
            "config": "",
            "arch": arch,
            "registers": r["registers"],
            "shared_bytes": r["shared"],
            "spill_stores": r["spill_stores"],
            "spill_loads": r["spill_loads"],
            "stack_bytes": r["stack"],
            "local_bytes": 0,
            "tensor_cores": s.get("tensor_cores", False) if s else None,
            "expects_tensor_cores": _expects(short),
        }
        row["problems"] = _problems(row)
        rows.append(row)
    return rows


def _rel(p: Path) -> str:
    root = source_root()
    try:
        return str(p.relative_to(root)) if root else str(p)
    except ValueError:
        return str(p)


def _library_dumps(cuobjdump: str, lib: str) -> tuple[dict, dict]:
    """parse_res_usage and parse_sass of a library. The disassembly of seqkernels._C takes tens of
    CPU-seconds, so inside a source checkout (see _report_dir) both are kept under
    build/kernel_report/built, named after the library's path, size and mtime, and made by one
    process at a time: the test workers that each need them read the first one's."""
    import fcntl

    st = os.stat(lib)
    root = _report_dir()
    if root is None:
        return _dump_library(cuobjdump, lib)
    key = hashlib.sha256(f"{os.path.realpath(lib)}\0{st.st_size}\0{st.st_mtime_ns}\0{cuobjdump}".encode()).hexdigest()
    cache = root / "built" / f"{key[:16]}.json"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = open(cache.with_suffix(".lock"), "w")  # noqa: SIM115 (held for the dump below)
    except OSError:
        return _dump_library(cuobjdump, lib)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # JSON keys are strings: (arch, function) is kept as "arch function".
        try:
            res, sass = ({tuple(k.split(" ", 1)): v for k, v in d.items()} for d in json.loads(cache.read_text()))
            return res, sass
        except (OSError, ValueError):
            pass
        res, sass = _dump_library(cuobjdump, lib)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps([{" ".join(k): v for k, v in d.items()} for d in (res, sass)]))
        os.replace(tmp, cache)
        return res, sass


def _dump_library(cuobjdump: str, lib: str) -> tuple[dict, dict]:
    res = parse_res_usage(subprocess.run([cuobjdump, "-res-usage", lib], capture_output=True, text=True).stdout)
    sass = parse_sass(subprocess.run([cuobjdump, "-sass", lib], capture_output=True, text=True).stdout)
    return res, sass


def collect_built_cuda(archs=None) -> list[dict]:
    """Kernels compiled into seqkernels._C (no sources needed): cuobjdump of the library."""
    try:
        from seqkernels import _C
    except ImportError:
        return []
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None or not getattr(_C, "cuda_archs", ""):
        return []
    want = {f"sm_{a}" for a in _archs(archs)}
    res, sass = _library_dumps(cuobjdump, _C.__file__)
    names = _demangle(sorted({f for _, f in res}))
    rows = []
    for (arch, func), r in sorted(res.items()):
        if arch not in want:
            continue
        s = sass.get((arch, func), {})
        short = _short_name(names[func])
        row = {
            "kind": "cuda",
            "source": _rel(Path(r["source"])) if r.get("source") else "seqkernels._C",
            "kernel": _display_name(names[func]),
            "short_name": short,
            "config": "",
            "arch": arch,
            "registers": r["registers"],
            "shared_bytes": r["shared"],
            "spill_stores": None,
            "spill_loads": None,
            "stack_bytes": r["stack"],
            "local_bytes": r["local"],
            "tensor_cores": s.get("tensor_cores", False),
            "expects_tensor_cores": _expects(short),
        }
        row["problems"] = _problems(row)
        rows.append(row)
    return rows


def collect_cuda(sources=None, archs=None) -> list[dict]:
    srcs = [Path(s) for s in sources] if sources is not None else cuda_sources()
    if not srcs:
        return collect_built_cuda(archs)
    rows = []
    for s in srcs:
        rows += compile_cuda_file(s, archs)
    return rows


# ------------------------------------------------------------------------------------------------
# Triton: ahead-of-time compilation of STATIC_CONFIGS
# ------------------------------------------------------------------------------------------------
def triton_modules() -> list[str]:
    """Modules of seqkernels.triton_kernels (the top-level triton_kernels/ folder)."""
    try:
        pkg = importlib.import_module("seqkernels.triton_kernels")
    except ImportError:
        return []
    return sorted(f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _signature_and_attrs(kernel, signature: dict) -> tuple[dict, dict]:
    """Split `"type:16"` hints off the signature into tt.divisibility attributes, the way the
    JIT specializes: pointers are taken 16-byte aligned (torch allocations are) unless written
    `"*fp16:1"`; integers only when written `"i32:16"`."""
    sig, attrs = {}, {}
    names = list(kernel.arg_names)
    for name, typ in signature.items():
        base, _, hint = str(typ).partition(":")
        sig[name] = base
        divisible = hint == "16" or (not hint and base.startswith("*"))
        if divisible:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_triton_config(
    kernel,
    signature: dict,
    constexprs: dict,
    num_warps: int,
    num_stages: int,
    arch: int,
    attrs: dict | None = None,
    sass: bool = True,
) -> dict:
    """Compile one configuration for one arch; resource usage from the cubin. `attrs` (as
    ASTSource takes them) replaces the divisibility hints derived from the signature, for modules
    that state exactly which arguments the JIT sees divisible by 16. `sass=False`: a kernel whose
    PTX has no tensor-core instruction is not disassembled (its row says no tensor cores, from the
    PTX, and `local_instructions` None); the report passes it for entries that expect none."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, derived = _signature_and_attrs(kernel, signature)
    attrs = derived if attrs is None else attrs
    src = ASTSource(fn=kernel, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    cache = _triton_row_cache(compiled)
    if cache is not None and cache.is_file():
        try:
            row = json.loads(cache.read_text())
            # A row kept without disassembly serves a caller that wants it only when the PTX
            # settled the question.
            if not sass or row["sass_checked"] or row["tensor_cores"]:
                return row
        except (OSError, ValueError, KeyError):
            pass
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or Triton's bundled tools)")
    import tempfile

    ptx = compiled.asm.get("ptx", "")
    # The PTX settles the tensor-core question when it holds wgmma or mma.sync (ptxas turns them
    # into HGMMA / HMMA, and makes them out of nothing else); a kernel without them is
    # disassembled only when its entry expects tensor cores, so that the report shows what its
    # SASS holds. Disassembly (cuobjdump -sass) is about a sixth of the cost of a cold compile
    # (the float32 kernels, which expect no tensor cores, are most of those without them); the
    # resource usage (-res-usage) costs milliseconds.
    ptx_kind = "wgmma" if "wgmma." in ptx else ("mma" if "mma.sync" in ptx else None)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = parse_res_usage(subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout)
        dump = (
            parse_sass(subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout)
            if ptx_kind is None and sass
            else None
        )
    r = next(iter(res.values()), {"registers": None, "stack": 0, "local": 0})
    s = next(iter(dump.values()), {"tensor_cores": False, "local_instructions": 0}) if dump is not None else None
    kind = ptx_kind or ("mma" if s is not None and s["tensor_cores"] else None)
    row = {
        "registers": r["registers"],
        "shared_bytes": int(compiled.metadata.shared),
        "stack_bytes": r["stack"],
        "local_bytes": r["local"],
        # STL/LDL instructions in the SASS; None when the SASS was not disassembled (see above).
        "local_instructions": s["local_instructions"] if s is not None else None,
        "tensor_cores": kind is not None,
        "tensor_core_kind": kind,
        "sass_checked": s is not None,
    }
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(row))
            os.replace(tmp, cache)
        except OSError:
            pass
    return row


# Bump when what compile_triton_config reads from a compiled kernel changes: the cached rows of
# older versions are then not used.
_TRITON_ROW_VERSION = 3


def _triton_row_cache(compiled) -> Path | None:
    """Where the resource row of a compiled Triton kernel is kept between runs: under
    build/kernel_report/triton of the source checkout (SEQKERNELS_REPORT_BUILD_DIR), named after
    Triton's own cache key of the compile (source, constexprs, options, target, Triton and ptxas
    versions), so that a rerun whose Triton cache is warm runs no cuobjdump. None outside a checkout
    or with SEQKERNELS_REPORT_CACHE=0."""
    key = getattr(compiled, "hash", None)
    root = _report_dir()
    if not key or root is None:
        return None
    return root / "triton" / f"{key}-v{_TRITON_ROW_VERSION}.json"


def _report_dir() -> Path | None:
    """Where results are kept between runs: SEQKERNELS_REPORT_BUILD_DIR, else build/kernel_report
    of the source checkout; None outside a checkout or with SEQKERNELS_REPORT_CACHE=0."""
    if os.environ.get("SEQKERNELS_REPORT_CACHE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    root = os.environ.get("SEQKERNELS_REPORT_BUILD_DIR") or (
        source_root() / "build" / "kernel_report" if source_root() else None
    )
    return Path(root) if root else None


def _config_label(constexprs: dict, num_warps: int, num_stages: int) -> str:
    return ",".join(f"{k}={v}" for k, v in constexprs.items()) + f",warps={num_warps},stages={num_stages}"


def _entry_archs(entry, archs: list[int]) -> list[int]:
    # An entry of a per-arch tuning table (`arch` attribute) is compiled for the arch classes it
    # serves: 80 covers sm_8x, 90 sm_9x and newer, within the requested list.
    own = getattr(entry, "arch", None)
    if own is None:
        return archs
    return [a for a in archs if (a >= 90) == (own >= 90)]


def _triton_row(modname: str, index: int, arch: int) -> dict:
    """The row of one entry and arch before compiling: what it is and what it must show."""
    entry = importlib.import_module(modname).STATIC_CONFIGS[index]
    kernel, signature, constexprs, num_warps, num_stages, expects = entry
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", str(kernel))
    return {
        "kind": "triton",
        "source": modname,
        "kernel": name,
        "short_name": name,
        "config": getattr(entry, "name", None) or _config_label(constexprs, num_warps, num_stages),
        "arch": f"sm_{arch}",
        "spill_stores": None,
        "spill_loads": None,
        "expects_tensor_cores": expects if expects == "mma" else bool(expects),
    }


def _triton_compile_job(modname: str, index: int, arch: int, sass: bool | None = None) -> dict:
    """compile_triton_config's columns for one entry and arch, or {"error": message}. `sass`:
    disassemble a kernel without tensor-core PTX (default: when the entry expects tensor cores)."""
    entry = importlib.import_module(modname).STATIC_CONFIGS[index]
    kernel, signature, constexprs, num_warps, num_stages, expects = entry
    try:
        return compile_triton_config(
            kernel,
            signature,
            constexprs,
            num_warps,
            num_stages,
            arch,
            attrs=getattr(entry, "attrs", None),
            sass=bool(expects) if sass is None else sass,
        )
    except Exception as e:  # a config that does not compile is a finding, not a crash
        return {"error": f"does not compile: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def _finish_triton_row(row: dict, compiled: dict) -> dict:
    row = dict(row)
    if "error" in compiled:
        row.update(
            {"registers": None, "shared_bytes": None, "stack_bytes": None, "local_bytes": None, "tensor_cores": None}
        )
        row["problems"] = [compiled["error"]]
    else:
        row.update(compiled)
        row["problems"] = _problems(row)
    return row


def _triton_job(modname: str, index: int, arch: int) -> dict:
    return _finish_triton_row(_triton_row(modname, index, arch), _triton_compile_job(modname, index, arch))


def _compile_key(modname: str, index: int, arch: int):
    """What triton.compile sees of one entry and arch: entries with equal keys compile to the same
    kernel (Triton's cache key is a function of these), so it is compiled once for all of them."""
    entry = importlib.import_module(modname).STATIC_CONFIGS[index]
    kernel, signature, constexprs, num_warps, num_stages, _ = entry
    sig, derived = _signature_and_attrs(kernel, signature)
    attrs = getattr(entry, "attrs", None)
    attrs = derived if attrs is None else attrs
    return (
        id(kernel),
        repr(sorted(sig.items())),
        repr(sorted((k, repr(v)) for k, v in dict(constexprs).items())),
        repr(sorted((repr(k), repr(v)) for k, v in attrs.items())),
        num_warps,
        num_stages,
        arch,
    )


def _progress(done: int, total: int) -> None:
    # SEQKERNELS_REPORT_PROGRESS=1 (tests/aot_static.py): a line per finished compile on stderr, which
    # the parent reads while the compile runs.
    if os.environ.get("SEQKERNELS_REPORT_PROGRESS") == "1":
        print(f"@@PROGRESS@@ {done} {total}", file=sys.stderr, flush=True)


def _collect_triton_here(modules, archs) -> list[dict]:
    jobs = []
    for modname in modules:
        configs = getattr(importlib.import_module(modname), "STATIC_CONFIGS", [])
        jobs += [(modname, i, arch) for i, entry in enumerate(configs) for arch in _entry_archs(entry, archs)]
    # One compile per distinct (kernel, signature, constexprs, attrs, warps, stages, arch); every
    # entry still gets its own row, checked against its own expectation.
    first: dict = {}
    unique = []
    job_key = []
    for job in jobs:
        key = _compile_key(*job)
        if key not in first:
            first[key] = len(unique)
            unique.append([*job, False])
        # Disassembled when any of the entries sharing the kernel expects tensor cores.
        unique[first[key]][3] |= bool(importlib.import_module(job[0]).STATIC_CONFIGS[job[1]][5])
        job_key.append(first[key])
    workers = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    if workers == 1 or len(unique) < 2:
        compiled = []
        for job in unique:
            compiled.append(_triton_compile_job(*job))
            _progress(len(compiled), len(unique))
    else:
        # Compilation is CPU-bound Python + LLVM + ptxas: one process per core (fork keeps the
        # imported modules; nothing here touches a GPU driver).
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(
            min(workers, len(unique)), mp_context=multiprocessing.get_context("fork")
        ) as pool:
            compiled = []
            for result in pool.map(_triton_compile_job, *zip(*unique)):
                compiled.append(result)
                _progress(len(compiled), len(unique))
    return [_finish_triton_row(_triton_row(*job), compiled[k]) for job, k in zip(jobs, job_key)]


def collect_triton(modules=None, archs=None) -> list[dict]:
    """Compile every STATIC_CONFIGS entry of the Triton kernel modules for every arch.

    The Triton interpreter (TRITON_INTERPRET=1, as in the tests) replaces @triton.jit functions
    with interpreted ones that cannot be compiled, so the work then runs in a child process."""
    mods = list(modules) if modules is not None else triton_modules()
    arch_list = _archs(archs)
    if not mods:
        return []
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = dict(os.environ, TRITON_INTERPRET="0")
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        code = (
            "import json,sys; from seqkernels.kernel_report import _collect_triton_here as c; "
            "print('@@ROWS@@' + json.dumps(c(json.loads(sys.argv[1]), json.loads(sys.argv[2]))))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(mods), json.dumps(arch_list)],
            env=env,
            capture_output=True,
            text=True,
        )
        marker = proc.stdout.rfind("@@ROWS@@")
        if proc.returncode != 0 or marker < 0:
            raise RuntimeError(f"Triton ahead-of-time compilation failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
        return json.loads(proc.stdout[marker + len("@@ROWS@@") :])
    return _collect_triton_here(mods, arch_list)


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------
def collect(archs=None) -> list[dict]:
    """Every CUDA kernel and Triton kernel configuration, per arch (default SEQKERNELS_CUDA_ARCHS
    or 8.0;9.0). Parts whose tools are missing (no nvcc, no triton) are skipped."""
    rows = []
    try:
        rows += collect_cuda(archs=archs)
    except RuntimeError as e:
        if "nvcc not found" not in str(e):
            raise
        rows += collect_built_cuda(archs)
    try:
        import triton  # noqa: F401
    except ImportError:
        return rows
    return rows + collect_triton(archs=archs)


def format_table(rows: list[dict]) -> str:
    """Human-readable table: one line per kernel (and Triton config) and arch."""
    if not rows:
        return "no GPU kernels found"
    headers = [
        "kind",
        "kernel",
        "arch",
        "regs",
        "smem B",
        "spill st/ld B",
        "stack B",
        "local B",
        "tensor cores",
        "status",
    ]

    def fmt(v):
        return "?" if v is None else str(v)

    def tc(r):
        have = (
            "?"
            if r.get("tensor_cores") is None
            else (r.get("tensor_core_kind") or "yes")
            if r["tensor_cores"]
            else "no"
        )
        want = _expected_tc(r)
        return have + ("" if want is None else f" (expected {want})")

    lines = []
    for r in rows:
        name = r["kernel"]
        if r.get("config"):
            name += f" [{r['config']}]"
        spills = "?" if r.get("spill_stores") is None else f"{r['spill_stores']}/{r['spill_loads']}"
        status = "ok" if not r["problems"] else "; ".join(r["problems"])
        lines.append(
            [
                r["kind"],
                name,
                r["arch"],
                fmt(r.get("registers")),
                fmt(r.get("shared_bytes")),
                spills,
                fmt(r.get("stack_bytes")),
                fmt(r.get("local_bytes")),
                tc(r),
                status,
            ]
        )
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    return "\n".join(out)


if __name__ == "__main__":
    print(format_table(collect()))

"""Build the project's CUDA sources as C++ against the CUDA shim and load them as torch ops.

    emu = load_emulated("kv_cache_append", ["csrc/cuda/kv_cache_append.cu"])
    emu.kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens, None)   # CPU tensors

Each .cu file is compiled by the host C++ compiler with ``-DSEQKERNELS_CUDA_EMULATION`` and
``tests/emulation/cuda_shim.h`` force-included, into a small shared library of its own (never
the wheel's ``seqkernels._C``). ``SK_REGISTER_CUDA`` registers the launchers for CPU tensors in
a namespace of that library (``torch.ops.seqkernels_emu_<name>``), whose schemas are generated
from ``csrc/registration.cpp``. Builds are incremental (per-object dependency tracking) and
cached under ``build/emulation`` (``SEQKERNELS_EMU_BUILD_DIR``); the heavy torch headers are
precompiled once per variant (``SEQKERNELS_EMU_PCH=0`` turns that off).

Before compiling, each source is copied into the build folder with its ``__shared__``
declarations rewritten (see ``rewrite_shared``): a static one also registers itself with the
emulator so it can be poisoned between blocks, and ``extern __shared__ T name[];`` becomes a
pointer to the launch's dynamic shared memory. ``#line`` keeps diagnostics on the original file.

Sanitizers: ``run_sanitized("thread" | "address", name, sources, func, *args)`` builds the
sanitized variant here, then runs ``func(emu, *args)`` in a child Python with the sanitizer
runtime preloaded (a sanitized library cannot be loaded into an uninstrumented process) and
returns a ``SanitizerResult``.

The C++ CPU kernels (``csrc/cpu/*.cpp``) get a sanitized build of their own through the same
machinery: ``run_cpu_sanitized(name, func, *args)`` compiles the real sources (not copies) with
``-fsanitize=address,undefined -fno-sanitize-recover=undefined`` and the real build's ``-fopenmp``
into a shared library under ``build/emulation`` whose ops live in ``torch.ops.seqkernels_cpu_<name>_
asan_ubsan`` (``-Dseqkernels=<that namespace>`` renames the C++ namespace and the
``TORCH_LIBRARY_IMPL(seqkernels, CPU, m)`` blocks; the schemas are generated from
``csrc/registration.cpp`` as above), then runs ``func(ops, *args)`` in a child Python with
libasan and libubsan preloaded (tests/test_cpu_sanitizers.py).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import inspect
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SHIM = HERE / "cuda_shim.h"
RUNTIME = HERE / "cuda_shim_runtime.cpp"
REGISTRATION = REPO / "csrc" / "registration.cpp"
SANITIZERS = {"thread": "tsan", "address": "asan"}
# Sanitizer modes of the CPU kernel build (run_cpu_sanitized); "address,undefined" is ASan plus
# UBSan with every UBSan check fatal. Values: the suffix of the namespace / build folder.
CPU_SANITIZERS = {"address,undefined": "asan_ubsan", "address": "asan", "thread": "tsan"}
# Runtimes to preload for each mode, the first one first (ASan must come first in the list).
_RUNTIME_LIBS = {"thread": ["tsan"], "address": ["asan"], "address,undefined": ["asan", "ubsan"]}
_MIRROR_SUFFIXES = {".cu", ".cuh", ".h", ".hpp", ".cpp", ".inc", ".inl"}

# torch builds CUDA code with these; mirroring them keeps what compiles here compiling under nvcc.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


class EmulationBuildError(RuntimeError):
    """The emulated extension failed to compile or link; the message holds the compiler output."""


def worker_cores() -> int:
    """Processes a test may keep busy at once: MAX_JOBS, else the machine's cores shared among
    pytest-xdist's workers (every worker may be compiling, or running tests, at the same time: one
    each under CI's `-n 2` on two cores). Builds here and the Triton ahead-of-time compile shards
    (tests/aot_static.py) size their pools by it; more processes than cores only add switching."""
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    return max(1, (os.cpu_count() or 1) // workers)


def build_root() -> Path:
    return Path(os.environ.get("SEQKERNELS_EMU_BUILD_DIR") or REPO / "build" / "emulation")


def _cxx() -> str:
    return os.environ.get("CXX", "g++")


# ------------------------------------------------------------------------------------------------
# Source rewriting
# ------------------------------------------------------------------------------------------------
_TOKEN_RE = re.compile(r"\b__shared__\b")
_ALIGN_RE = re.compile(r"\b(?:__align__|alignas)\s*\(\s*[^()]*\)")
_IDENT_RE = re.compile(r"[A-Za-z_]\w*")
_KEYWORDS = {"const", "volatile", "unsigned", "signed", "int", "float", "double", "char", "short", "long"}


def _blank_non_code(text: str) -> str:
    """Same-length copy of `text` with comments, string/char literals and preprocessor lines
    replaced by spaces (newlines kept), so searches only see code."""
    out = list(text)
    i, n = 0, len(text)
    at_line_start = True
    while i < n:
        c = text[i]
        if at_line_start and c in " \t":
            i += 1
            continue
        if at_line_start and c == "#":
            # Preprocessor directive, with backslash continuations.
            while i < n and text[i] != "\n":
                if text[i] == "\\" and i + 1 < n and text[i + 1] == "\n":
                    out[i] = " "
                    i += 2
                    continue
                out[i] = " "
                i += 1
            continue
        at_line_start = False
        if c == "\n":
            at_line_start = True
            i += 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                out[i] = " "
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            for k in range(i, end):
                if text[k] != "\n":
                    out[k] = " "
            i = end
        elif c in "\"'":
            k = i + 1
            while k < n and text[k] != c:
                k += 2 if text[k] == "\\" else 1
            for j in range(i, min(k + 1, n)):
                if text[j] != "\n":
                    out[j] = " "
            i = k + 1
        else:
            i += 1
    return "".join(out)


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _declarator_name(decl: str) -> str | None:
    decl = decl.split("=")[0]
    decl = re.sub(r"\[[^\]]*\]", " ", decl)
    names = [m for m in _IDENT_RE.findall(decl) if m not in _KEYWORDS]
    return names[-1] if names else None


def rewrite_shared(text: str, path: str = "<source>") -> str:
    """Rewrite the `__shared__` declarations of one source file for the emulator.

    `__shared__ T a[N], b;`               -> unchanged (the shim makes `__shared__` `static`)
                                             plus `SK_EMU_REGISTER_SHARED(a) ...` after the `;`
    `extern __shared__ __align__(16) T s[];` -> `T* const s = ::sk_emu::dynamic_smem<T>();`
    Line numbers are preserved. A form it cannot parse is left alone, so the compiler reports it.
    """
    code = _blank_non_code(text)
    edits = []  # (start, end, replacement)
    for m in _TOKEN_RE.finditer(code):
        end = code.find(";", m.end())
        if end < 0 or "{" in code[m.end() : end] or "}" in code[m.end() : end]:
            continue
        stmt_start = max(code.rfind(ch, 0, m.start()) for ch in ";{}") + 1
        prefix = code[stmt_start : m.start()]
        body = _ALIGN_RE.sub(" ", code[m.end() : end])
        ext = re.search(r"\bextern\b", prefix)
        if ext:
            dm = re.fullmatch(r"\s*(.*?)\b([A-Za-z_]\w*)\s*\[\s*\]\s*", body, re.S)
            if not dm or not dm.group(1).strip():
                continue
            typ = " ".join(dm.group(1).split())
            name = dm.group(2)
            start = stmt_start + ext.start()
            newlines = text.count("\n", start, end + 1)
            repl = f"{typ}* const {name} = ::sk_emu::dynamic_smem<{typ}>();" + "\n" * newlines
            edits.append((start, end + 1, repl))
        else:
            names = [_declarator_name(d) for d in _split_top_level(body)]
            if not names or any(n is None for n in names):
                continue
            reg = " ".join(f"SK_EMU_REGISTER_SHARED({n})" for n in names)
            edits.append((end + 1, end + 1, " " + reg))
    for start, end, repl in sorted(edits, reverse=True):
        text = text[:start] + repl + text[end:]
    return text


def _write_if_changed(path: Path, content: str) -> None:
    if path.exists() and path.read_text() == content:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(content)
    os.replace(tmp, path)


def _mirror(sources: list[Path], dest: Path) -> list[Path]:
    """Copy csrc/ and the sources' folders under dest with shared memory rewritten; returns the
    mirrored paths of `sources`."""
    files = {p for p in (REPO / "csrc").rglob("*") if p.suffix in _MIRROR_SUFFIXES and p.is_file()}
    for s in sources:
        files.update(p for p in s.parent.iterdir() if p.suffix in _MIRROR_SUFFIXES and p.is_file())
        files.add(s)
    for f in sorted(files):
        rel = f.relative_to(REPO)
        text = f.read_text()
        _write_if_changed(dest / rel, f'#line 1 "{f}"\n' + rewrite_shared(text, str(f)))
    return [dest / s.relative_to(REPO) for s in sources]


# ------------------------------------------------------------------------------------------------
# Schemas
# ------------------------------------------------------------------------------------------------
def registered_schemas() -> list[str]:
    """The `m.def(...)` schema strings of csrc/registration.cpp, in order."""
    code = REGISTRATION.read_text()
    schemas = []
    for m in re.finditer(r"\bm\.def\(\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)\)", code):
        schemas.append("".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", m.group(1))))
    if not schemas:
        raise EmulationBuildError(f'no m.def("...") schema found in {REGISTRATION}')
    return schemas


def _schemas_cpp(namespace: str, schemas: list[str]) -> str:
    lines = ["#include <torch/library.h>", f"TORCH_LIBRARY({namespace}, m) {{"]
    lines += [f"  m.def({json.dumps(s)});" for s in schemas]
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Compilation
# ------------------------------------------------------------------------------------------------
def _torch_paths():
    from torch.utils import cpp_extension

    return cpp_extension.include_paths(), cpp_extension.library_paths()


def _base_flags(sanitizer: str | None) -> list[str]:
    import torch

    inc, _ = _torch_paths()
    flags = [
        "-std=c++20",
        "-fPIC",
        "-pthread",
        "-O1",
        "-g1",
        "-fvisibility=hidden",
        "-DSEQKERNELS_CUDA_EMULATION",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-Wno-unused-variable",
        "-Wno-unused-function",
    ] + TORCH_NVCC_DEFINES
    flags += [f"-isystem{p}" for p in inc] + [f"-isystem{sysconfig.get_paths()['include']}"]
    if sanitizer == "thread":
        flags += ["-fsanitize=thread"]
    elif sanitizer == "address":
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    elif sanitizer is not None:
        raise ValueError(f"sanitizer must be None, 'thread' or 'address', got {sanitizer!r}")
    return flags


def _read_deps(depfile: Path) -> list[str]:
    text = depfile.read_text().replace("\\\n", " ")
    _, _, deps = text.partition(":")
    return [d.replace("\\ ", " ") for d in re.split(r"(?<!\\)\s+", deps.strip()) if d]


def _up_to_date(out: Path, cmd: list[str]) -> bool:
    stamp, dep = out.with_name(out.name + ".cmd"), out.with_name(out.name + ".d")
    if not (out.exists() and stamp.exists() and dep.exists()) or stamp.read_text() != shlex.join(cmd):
        return False
    t = out.stat().st_mtime
    try:
        return all(os.stat(d).st_mtime <= t for d in _read_deps(dep))
    except FileNotFoundError:
        return False


def _compile(cmd: list[str], out: Path) -> None:
    """Run `cmd` (which writes `out` and `out`.d) unless `out` is up to date."""
    if _up_to_date(out, cmd):
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulationBuildError(f"emulated build failed:\n$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if "invalid-pch" in proc.stderr or "not used because" in proc.stderr:
        sys.stderr.write(proc.stderr)
    out.with_name(out.name + ".cmd").write_text(shlex.join(cmd))


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _variant(sanitizer: str | None) -> str:
    return SANITIZERS.get(sanitizer, "plain") if sanitizer else "plain"


# The torch headers precompiled per variant: what csrc's launchers and registrations include (the
# per-operator ATen/ops headers they add are small), not ATen/ATen.h, which none of them needs and
# which made the precompiled header 1.7 times larger and 7 s slower to build.
_PCH_TORCH_HEADERS = "#include <ATen/Dispatch.h>\n#include <ATen/Parallel.h>\n#include <ATen/core/Tensor.h>\n#include <torch/library.h>\n"


def _use_pch() -> bool:
    return os.environ.get("SEQKERNELS_EMU_PCH", "1").strip().lower() not in ("0", "false", "off", "no")


def _prepare_variant(sanitizer: str | None) -> tuple[list[str], list[str], Path]:
    """Per-variant shared pieces: flags, the `-include` flags (precompiled header), runtime object."""
    import torch

    flags = _base_flags(sanitizer)
    key = hashlib.sha256("\0".join(flags + [torch.__version__, _cxx()]).encode()).hexdigest()[:12]
    vdir = build_root() / f"variant-{_variant(sanitizer)}-{key}"
    with _locked(vdir / ".lock"):
        runtime_obj = vdir / "cuda_shim_runtime.o"
        cmd = [
            _cxx(),
            *flags,
            "-include",
            str(SHIM),
            "-MMD",
            "-MF",
            str(runtime_obj) + ".d",
            "-c",
            str(RUNTIME),
            "-o",
            str(runtime_obj),
        ]
        _compile(cmd, runtime_obj)
        if not _use_pch():
            return flags, ["-include", str(SHIM)], runtime_obj
        header = vdir / "sk_emu_pch.h"
        _write_if_changed(header, f'#include "{SHIM}"\n{_PCH_TORCH_HEADERS}')
        gch = vdir / "sk_emu_pch.h.gch"
        cmd = [_cxx(), *flags, "-x", "c++-header", str(header), "-MMD", "-MF", str(gch) + ".d", "-o", str(gch)]
        _compile(cmd, gch)
        return flags, ["-include", str(header), "-Winvalid-pch"], runtime_obj


def _namespace(name: str, sanitizer: str | None) -> str:
    base = re.sub(r"\W", "_", name)
    return f"seqkernels_emu_{base}" + (f"_{SANITIZERS[sanitizer]}" if sanitizer else "")


def build_emulated(
    name: str, sources, *, extra_cflags=(), schemas=(), sanitizer: str | None = None
) -> tuple[Path, str]:
    """Compile and link the emulated extension; returns (shared library path, op namespace)."""
    srcs = [(REPO / s).resolve() if not Path(s).is_absolute() else Path(s) for s in sources]
    for s in srcs:
        if not s.is_file():
            raise FileNotFoundError(f"emulated source {s} does not exist")
        if REPO not in s.parents:
            raise ValueError(f"emulated source {s} must be inside the repository {REPO}")
    namespace = _namespace(name, sanitizer)
    flags, include_flags, runtime_obj = _prepare_variant(sanitizer)
    _, libdirs = _torch_paths()
    ext_dir = build_root() / f"{namespace}"
    with _locked(ext_dir / ".lock"):
        mirrored = _mirror(srcs, ext_dir / "src")
        all_schemas = registered_schemas() + list(schemas)
        schemas_src = ext_dir / "schemas.cpp"
        _write_if_changed(schemas_src, _schemas_cpp(namespace, all_schemas))
        tu_flags = [
            *flags,
            *include_flags,
            f"-I{ext_dir / 'src' / 'csrc'}",
            f"-DSK_EMU_NAMESPACE={namespace}",
            *extra_cflags,
        ]
        jobs = []
        for src in [*mirrored, schemas_src]:
            obj = ext_dir / "obj" / (src.relative_to(ext_dir).as_posix().replace("/", "__") + ".o")
            cmd = [_cxx(), *tu_flags, "-x", "c++", "-MMD", "-MF", str(obj) + ".d", "-c", str(src), "-o", str(obj)]
            jobs.append((cmd, obj))
        max_jobs = min(2, worker_cores())
        with concurrent.futures.ThreadPoolExecutor(max_jobs) as pool:
            for f in [pool.submit(_compile, cmd, obj) for cmd, obj in jobs]:
                f.result()
        so = ext_dir / f"{namespace}.so"
        objs = [str(obj) for _, obj in jobs] + [str(runtime_obj)]
        link = [
            _cxx(),
            "-shared",
            *[f for f in flags if f.startswith("-fsanitize") or f == "-pthread"],
            "-o",
            str(so),
            *objs,
            *[f"-L{d}" for d in libdirs],
            *[f"-Wl,-rpath,{d}" for d in libdirs],
            "-lc10",
            "-ltorch_cpu",
            "-ltorch",
        ]
        stamp = so.with_name(so.name + ".cmd")
        if not (
            so.exists()
            and stamp.exists()
            and stamp.read_text() == shlex.join(link)
            and all(Path(o).stat().st_mtime <= so.stat().st_mtime for o in objs)
        ):
            tmp = so.with_name(so.name + f".tmp{os.getpid()}")
            link_tmp = [str(tmp) if a == str(so) else a for a in link]
            proc = subprocess.run(link_tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise EmulationBuildError(
                    f"emulated link failed:\n$ {shlex.join(link_tmp)}\n{proc.stdout}{proc.stderr}"
                )
            os.replace(tmp, so)
            stamp.write_text(shlex.join(link))
    return so, namespace


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
class EmulatedOps:
    """The ops of one emulated extension: `emu.attention_fwd(...)` is
    `torch.ops.<namespace>.attention_fwd`, taking CPU tensors."""

    def __init__(self, namespace: str, path: Path | str, sanitizer: str | None = None):
        self.namespace = namespace
        self.path = Path(path)
        self.sanitizer = sanitizer

    def __getattr__(self, op: str):
        if op.startswith("__"):
            raise AttributeError(op)
        import torch

        if not self.has(op):
            raise AttributeError(
                f"emulated extension {self.namespace} has no CPU kernel for '{op}': its .cu sources must "
                f"register it with SK_REGISTER_CUDA({op}, fn)"
            )
        return getattr(getattr(torch.ops, self.namespace), op)

    def has(self, op: str) -> bool:
        import torch

        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{self.namespace}::{op}", "CPU")

    def __repr__(self):
        return f"EmulatedOps({self.namespace!r}, {str(self.path)!r})"


_LOADED: dict[str, tuple[tuple, EmulatedOps]] = {}


def load_emulated(name: str, sources, *, extra_cflags=(), schemas=(), sanitizer: str | None = None) -> EmulatedOps:
    """Build (if needed) and load the emulated extension `name` made of `sources` (.cu files,
    relative to the repo root or absolute); returns its ops. `schemas` adds op schemas beyond
    csrc/registration.cpp (for test-only kernels). A sanitized variant can only be loaded in a
    process started with its runtime preloaded: use `run_sanitized` for that."""
    import torch

    if sanitizer is not None and not _sanitizer_preloaded(sanitizer):
        raise RuntimeError(
            f"the {sanitizer} sanitizer runtime is not preloaded in this process; "
            "use run_sanitized(...) to run sanitized emulated kernels in a child process"
        )
    key_args = (tuple(map(str, sources)), tuple(extra_cflags), tuple(schemas))
    namespace = _namespace(name, sanitizer)
    if namespace in _LOADED:
        prev_args, ops = _LOADED[namespace]
        if prev_args != key_args:
            raise ValueError(f"emulated extension {name!r} already loaded with other sources/flags: {prev_args}")
        return ops
    so, namespace = build_emulated(name, sources, extra_cflags=extra_cflags, schemas=schemas, sanitizer=sanitizer)
    torch.ops.load_library(str(so))
    ops = EmulatedOps(namespace, so, sanitizer)
    _LOADED[namespace] = (key_args, ops)
    return ops


def _sanitizer_preloaded(sanitizer: str) -> bool:
    lib = f"lib{SANITIZERS[sanitizer]}"
    try:
        with open("/proc/self/maps") as f:
            return lib in f.read()
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# Sanitized runs in a child process
# ------------------------------------------------------------------------------------------------
_REPORT_RE = {
    "plain": re.compile(r"(?!x)x"),
    "thread": re.compile(r"WARNING: ThreadSanitizer:.*?(?:\n={10,}|\Z)", re.S),
    "address": re.compile(r"(?:ERROR|WARNING): AddressSanitizer:.*?(?:\n==\d+==ABORTING|\Z)", re.S),
    # ASan's reports, and UBSan's "<file>:<line>:<col>: runtime error: ..." up to its SUMMARY line.
    "address,undefined": re.compile(
        r"(?:ERROR|WARNING): AddressSanitizer:.*?(?:\n==\d+==ABORTING|\Z)"
        r"|[^\n]*runtime error: .*?(?:\nSUMMARY: UndefinedBehaviorSanitizer[^\n]*|\Z)",
        re.S,
    ),
}


@dataclasses.dataclass
class SanitizerResult:
    sanitizer: str  # "thread", "address", "address,undefined" (CPU kernels) or "plain"
    target: str
    returncode: int
    output: str

    @property
    def report(self) -> str:
        """The sanitizer's report(s) in the output, "" when there is none."""
        return "\n".join(m.group(0) for m in _REPORT_RE[self.sanitizer].finditer(self.output))

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and not self.report

    def assert_clean(self) -> "SanitizerResult":
        if not self.clean:
            tail = self.output[-12000:]
            raise AssertionError(
                f"{self.target} under the {self.sanitizer} sanitizer failed (exit code {self.returncode}):\n{tail}"
            )
        return self


def sanitizer_runtime(sanitizer: str) -> str:
    """The main runtime library of `sanitizer` (the one that must be preloaded first)."""
    return sanitizer_runtimes(sanitizer)[0]


def sanitizer_runtimes(sanitizer: str) -> list[str]:
    """Every runtime library `sanitizer` needs preloaded, in LD_PRELOAD order."""
    paths = []
    for name in _RUNTIME_LIBS[sanitizer]:
        lib = f"lib{name}.so"
        path = subprocess.run([_cxx(), f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not path or not os.path.isabs(path) or not os.path.exists(path):
            raise EmulationBuildError(f"{_cxx()} has no {lib} (install the compiler's sanitizer runtimes)")
        paths.append(path)
    return paths


def run_sanitized(
    sanitizer: str,
    name: str,
    sources,
    func,
    *args,
    extra_cflags=(),
    schemas=(),
    timeout: float = 600,
    env: dict | None = None,
) -> SanitizerResult:
    """Run `func(emu, *args)` against the `sanitizer` ("thread" or "address") build of the
    emulated extension in a child process with the sanitizer runtime preloaded. `func` must be a
    module-level function (it is imported from its file in the child) and `args` picklable.
    Returns the result; call `.assert_clean()` on it in a test."""
    if sanitizer not in SANITIZERS:
        raise ValueError(f"sanitizer must be 'thread' or 'address', got {sanitizer!r}")
    return run_in_subprocess(
        name,
        sources,
        func,
        *args,
        sanitizer=sanitizer,
        extra_cflags=extra_cflags,
        schemas=schemas,
        timeout=timeout,
        env=env,
    )


def run_in_subprocess(
    name: str,
    sources,
    func,
    *args,
    sanitizer: str | None = None,
    extra_cflags=(),
    schemas=(),
    timeout: float = 600,
    env: dict | None = None,
) -> SanitizerResult:
    """Like `run_sanitized`, also without a sanitizer: for runs that may end the process (a
    kernel that never returns makes the emulator abort it after SEQKERNELS_EMU_TIMEOUT)."""
    so, namespace = build_emulated(name, sources, extra_cflags=extra_cflags, schemas=schemas, sanitizer=sanitizer)
    return _run_child(so, namespace, sanitizer, func, args, timeout=timeout, env=env)


def _run_child(
    so: Path, namespace: str, sanitizer: str | None, func, args: tuple, *, timeout: float, env: dict | None
) -> SanitizerResult:
    """Run `func(ops, *args)` in a child Python that loads the library `so` (ops in `namespace`),
    with the runtimes of `sanitizer` preloaded."""
    module_file = inspect.getfile(func)
    spec = {
        "so": str(so),
        "namespace": namespace,
        "sanitizer": sanitizer,
        "module_file": module_file,
        "qualname": func.__qualname__,
        "args": base64.b64encode(pickle.dumps(args)).decode(),
        "sys_path": [str(HERE.parent), str(REPO / "python"), str(Path(module_file).parent)],
    }
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env.setdefault("OMP_NUM_THREADS", "1")
    if sanitizer is not None:
        child_env["LD_PRELOAD"] = " ".join(sanitizer_runtimes(sanitizer))
        child_env["TSAN_OPTIONS"] = "halt_on_error=1 exitcode=66 report_signal_unsafe=0 " + child_env.get(
            "TSAN_OPTIONS", ""
        )
        child_env["ASAN_OPTIONS"] = (
            "detect_leaks=0 halt_on_error=1 exitcode=67 detect_odr_violation=0 " + child_env.get("ASAN_OPTIONS", "")
        )
        child_env["UBSAN_OPTIONS"] = "halt_on_error=1 print_stacktrace=1 exitcode=68 " + child_env.get(
            "UBSAN_OPTIONS", ""
        )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    target = f"{func.__module__}.{func.__qualname__}"
    kind = sanitizer or "plain"
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / "_sanitized_child.py"), spec_path],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return SanitizerResult(kind, target, proc.returncode, proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as e:

        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        return SanitizerResult(kind, target, -9, text(e.stdout) + text(e.stderr) + f"\n[timed out after {timeout} s]")
    finally:
        os.unlink(spec_path)


# ------------------------------------------------------------------------------------------------
# The C++ CPU kernels under sanitizers
# ------------------------------------------------------------------------------------------------
# The real build (setup.py) compiles csrc/cpu/*.cpp with -O3 -std=c++20 -fopenmp at the baseline
# ISA; the AVX2 code paths come from target attributes / pragmas chosen by cpuid at run time, so
# the same sources compiled here (no -march) take the same ISA paths. The sanitized build differs
# only in -O0 -g1 and the instrumentation. -O0 because it is the build that shows most (no access is
# optimized away before the sanitizer sees it), because it shows that the kernels do not depend on
# the optimizer to be right (their policy templates are always_inline, cpu/simd.h SK_POLICY_INLINE:
# at -O0 `flatten` alone left them baseline code, and every SIMD path here gave garbage), and because
# it compiles in about half the CPU time of -O1 (2026-12-07, 2-core Xeon: 102 s for the whole
# library on one core against about 190 s); the portable path's sweep runs about twice as long.
_CPU_SANITIZE_FLAGS = {
    "address,undefined": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "address": ["-fsanitize=address", "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}


def cpu_sources() -> list[str]:
    """The CPU kernel sources of the real extension (csrc/cpu/*.cpp), relative to the repo root."""
    return sorted(p.relative_to(REPO).as_posix() for p in (REPO / "csrc" / "cpu").glob("*.cpp"))


def cpu_namespace(name: str, sanitizer: str) -> str:
    base = re.sub(r"\W", "_", name)
    return f"seqkernels_cpu_{base}_{CPU_SANITIZERS[sanitizer]}"


def _cpu_flags(sanitizer: str) -> list[str]:
    import torch

    if sanitizer not in _CPU_SANITIZE_FLAGS:
        raise ValueError(f"sanitizer must be one of {sorted(_CPU_SANITIZE_FLAGS)}, got {sanitizer!r}")
    inc, _ = _torch_paths()
    flags = [
        "-std=c++20",
        "-fPIC",
        "-pthread",
        "-fopenmp",
        "-O0",
        "-g1",
        "-fvisibility=hidden",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-Wno-unused-variable",
        "-Wno-unused-function",
    ] + _CPU_SANITIZE_FLAGS[sanitizer]
    flags += [f"-isystem{p}" for p in inc] + [f"-isystem{sysconfig.get_paths()['include']}"]
    return flags


def _prepare_cpu_variant(sanitizer: str) -> tuple[list[str], list[str]]:
    """Flags and `-include` flags (the precompiled torch headers) of one CPU sanitizer variant."""
    import torch

    flags = _cpu_flags(sanitizer)
    key = hashlib.sha256("\0".join(flags + [torch.__version__, _cxx()]).encode()).hexdigest()[:12]
    vdir = build_root() / f"variant-cpu-{CPU_SANITIZERS[sanitizer]}-{key}"
    if not _use_pch():
        return flags, []
    with _locked(vdir / ".lock"):
        # _PCH_TORCH_HEADERS pull in no at::vec header, so lstm_cell.cpp's AVX2 region (which
        # includes them under a target pragma) still gets its AVX2 copies.
        header = vdir / "sk_cpu_pch.h"
        _write_if_changed(header, _PCH_TORCH_HEADERS)
        gch = vdir / "sk_cpu_pch.h.gch"
        cmd = [_cxx(), *flags, "-x", "c++-header", str(header), "-MMD", "-MF", str(gch) + ".d", "-o", str(gch)]
        _compile(cmd, gch)
    return flags, ["-include", str(header), "-Winvalid-pch"]


def build_cpu(
    name: str = "kernels",
    sources=None,
    *,
    sanitizer: str = "address,undefined",
    extra_sources=(),
    extra_cflags=(),
    schemas=(),
) -> tuple[Path, str]:
    """Compile and link the CPU kernels `sources` (default: `cpu_sources()`, the real
    csrc/cpu/*.cpp, compiled where they are) plus `extra_sources` (test-only kernels that register
    with `TORCH_LIBRARY_IMPL(seqkernels, CPU, m)` too, their schemas in `schemas`) with `sanitizer`;
    returns (shared library path, op namespace). `-Dseqkernels=<namespace>` moves both the C++
    namespace and the op registrations out of `seqkernels`, so the library can sit beside the real
    extension in one process. Incremental and cached under build_root() like build_emulated."""
    srcs = []
    for s in [*(cpu_sources() if sources is None else sources), *extra_sources]:
        p = Path(s) if Path(s).is_absolute() else (REPO / s).resolve()
        if not p.is_file():
            raise FileNotFoundError(f"CPU source {p} does not exist")
        srcs.append(p)
    namespace = cpu_namespace(name, sanitizer)
    flags, include_flags = _prepare_cpu_variant(sanitizer)
    _, libdirs = _torch_paths()
    ext_dir = build_root() / namespace
    with _locked(ext_dir / ".lock"):
        schemas_src = ext_dir / "schemas.cpp"
        _write_if_changed(schemas_src, _schemas_cpp(namespace, registered_schemas() + list(schemas)))
        tu_flags = [*flags, *include_flags, f"-I{REPO / 'csrc'}", f"-Dseqkernels={namespace}", *extra_cflags]
        jobs = []
        # Largest first (attention.cpp), so that two workers finish at about the same time.
        for src in sorted(srcs, key=lambda p: -p.stat().st_size) + [schemas_src]:
            rel = src.relative_to(REPO) if REPO in src.parents else Path(src.name)
            obj = ext_dir / "obj" / (rel.as_posix().replace("/", "__") + ".o")
            cmd = [_cxx(), *tu_flags, "-x", "c++", "-MMD", "-MF", str(obj) + ".d", "-c", str(src), "-o", str(obj)]
            jobs.append((cmd, obj))
        max_jobs = min(2, worker_cores())
        with concurrent.futures.ThreadPoolExecutor(max_jobs) as pool:
            for f in [pool.submit(_compile, cmd, obj) for cmd, obj in jobs]:
                f.result()
        so = ext_dir / f"{namespace}.so"
        objs = [str(obj) for _, obj in jobs]
        link = [
            _cxx(),
            "-shared",
            *[f for f in flags if f.startswith("-fsanitize") or f in ("-pthread", "-fopenmp")],
            "-o",
            str(so),
            *objs,
            *[f"-L{d}" for d in libdirs],
            *[f"-Wl,-rpath,{d}" for d in libdirs],
            "-lc10",
            "-ltorch_cpu",
            "-ltorch",
        ]
        stamp = so.with_name(so.name + ".cmd")
        if not (
            so.exists()
            and stamp.exists()
            and stamp.read_text() == shlex.join(link)
            and all(Path(o).stat().st_mtime <= so.stat().st_mtime for o in objs)
        ):
            tmp = so.with_name(so.name + f".tmp{os.getpid()}")
            link_tmp = [str(tmp) if a == str(so) else a for a in link]
            proc = subprocess.run(link_tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise EmulationBuildError(
                    f"CPU sanitizer link failed:\n$ {shlex.join(link_tmp)}\n{proc.stdout}{proc.stderr}"
                )
            os.replace(tmp, so)
            stamp.write_text(shlex.join(link))
    return so, namespace


def run_cpu_sanitized(
    name: str,
    func,
    *args,
    sources=None,
    sanitizer: str = "address,undefined",
    extra_sources=(),
    extra_cflags=(),
    schemas=(),
    timeout: float = 600,
    env: dict | None = None,
) -> SanitizerResult:
    """Run `func(ops, *args)` against the `sanitizer` build of the CPU kernels (`build_cpu`) in a
    child process with the sanitizer runtimes preloaded; `ops.attention_fwd` is the sanitized
    `torch.ops.<namespace>.attention_fwd`. `func` must be a module-level function and `args`
    picklable; `env` adds to the child's environment (e.g. SEQKERNELS_CPU_ISA=portable). Returns
    the result; call `.assert_clean()` on it in a test."""
    so, namespace = build_cpu(
        name, sources, sanitizer=sanitizer, extra_sources=extra_sources, extra_cflags=extra_cflags, schemas=schemas
    )
    return _run_child(so, namespace, sanitizer, func, args, timeout=timeout, env=env)

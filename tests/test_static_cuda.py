"""Static checks of the CUDA kernels (DESIGN §6.3): every csrc/cuda/*.cu file compiled by nvcc
for every arch of SEQKERNELS_CUDA_ARCHS (default 8.0;9.0) must have zero spills, no stack frame,
static shared memory within 48 KiB, and tensor-core instructions in its SASS where
kernel_report.EXPECTS_TENSOR_CORES says so. The report machinery is itself tested on
tests/emulation/static_selftest_kernels.cu, whose answers are known. No GPU needed. When the
extension was built with CUDA after the sources last changed (CI), the file tests read the built
library's cubins (what ships) instead of compiling each file again."""

import functools
import os

import pytest

from seqkernels import kernel_report as kr

needs_nvcc = pytest.mark.skipif(
    kr._tool("nvcc") is None or kr._tool("cuobjdump") is None,
    reason="nvcc and cuobjdump are needed to compile the CUDA kernels",
)
ARCHS = [f"sm_{a}" for a in kr._archs(None)]
SELFTEST = "tests/emulation/static_selftest_kernels.cu"


@needs_nvcc
def test_report_on_kernels_with_known_answers():
    rows = kr.compile_cuda_file(SELFTEST, archs=["8.0", "9.0"])
    by = {(r["short_name"], r["arch"]): r for r in rows}
    for arch in ("sm_80", "sm_90"):
        mma, plain = by[("_selftest_mma_kernel", arch)], by[("_selftest_plain_kernel", arch)]
        local, spill = by[("_selftest_local_memory_kernel", arch)], by[("_selftest_spill_kernel", arch)]
        assert mma["tensor_cores"] and mma["problems"] == []
        assert not plain["tensor_cores"] and plain["problems"] == []
        assert plain["shared_bytes"] == 128 * 4 and 0 < plain["registers"] <= 64
        assert local["stack_bytes"] >= 1024 and any("stack" in p for p in local["problems"])
        assert spill["spill_stores"] > 0 and spill["spill_loads"] > 0 and spill["registers"] <= 32
        assert any("spills" in p for p in spill["problems"])
    table = kr.format_table(rows)
    assert "_selftest_spill_kernel" in table and "spills" in table and "yes (expected yes)" in table


def test_expectation_table_and_name_parsing():
    assert (
        kr._short_name("void seqkernels::_attention_fwd_kernel<__half, 64, true>(seqkernels::P)")
        == "_attention_fwd_kernel"
    )
    assert kr._expects("_attention_fwd_kernel") is True and kr._expects("_attention_bwd_kernel") is True
    assert kr._expects("_kv_cache_append_kernel") is None
    row = {
        "kind": "cuda",
        "arch": "sm_90",
        "spill_stores": 0,
        "spill_loads": 0,
        "stack_bytes": 0,
        "local_bytes": 0,
        "shared_bytes": 1024,
        "tensor_cores": False,
        "expects_tensor_cores": True,
    }
    assert kr._problems(row) == ["no tensor-core instructions"]


@functools.lru_cache(maxsize=1)
def _built_rows():
    """The CUDA kernels of the built seqkernels._C (kernel_report.collect_built_cuda, each with the
    .cu file nvcc compiled it from) when the library holds them for every arch checked here and was
    built after every file under csrc/ last changed: the cubins that ship, from the build's own nvcc
    flags, so the per-file tests need no second compile of the same code (CI builds the extension
    with CUDA first). None otherwise: a CPU-only build, an edited source, a wheel outside a checkout."""
    from pathlib import Path

    from seqkernels import _ext

    root = kr.source_root()
    if root is None or not _ext.extension_available():
        return None
    built = {f"sm_{a.replace('.', '')}" for a in _ext.compiled_cuda_archs()}
    if not set(ARCHS) <= built:
        return None
    lib = Path(_ext.load_extension().__file__)
    newest = max((p.stat().st_mtime for p in (root / "csrc").rglob("*") if p.is_file()), default=0.0)
    if lib.stat().st_mtime < newest:
        return None
    return [r for r in kr.collect_built_cuda() if r["arch"] in ARCHS] or None


@pytest.fixture
def built_rows():
    # Once per worker process (a module fixture would be set up again each time the scheduler
    # interleaves another file's tests); the library's dumps themselves (cuobjdump -sass of the
    # whole library, 20 to 35 s) are made by the first worker and read from build/kernel_report by
    # the other (kernel_report._library_dumps).
    return _built_rows()


def test_res_usage_names_each_functions_source():
    # cuobjdump -res-usage of a library: one ELF per (.cu file, arch), each under its identifier;
    # an ELF without one (not from nvcc -c) must not inherit the previous ELF's.
    text = """
Fatbin elf code:
================
arch = sm_80
identifier = /src/csrc/cuda/attention.cu

Resource usage:
 Function _Z1av:
  REG:96 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:888
Fatbin elf code:
================
arch = sm_90
identifier = /src/csrc/cuda/kv_cache.cu
 Function _Z1bv:
  REG:40 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:400
Fatbin elf code:
================
arch = sm_90
 Function _Z1cv:
  REG:8 STACK:0 SHARED:0 LOCAL:0
"""
    got = kr.parse_res_usage(text)
    assert got[("sm_80", "_Z1av")] == dict(registers=96, stack=0, shared=1024, local=0,
                                          source="/src/csrc/cuda/attention.cu")  # fmt: skip
    assert got[("sm_90", "_Z1bv")]["source"] == "/src/csrc/cuda/kv_cache.cu" and got[("sm_90", "_Z1bv")]["stack"] == 16
    assert got[("sm_90", "_Z1cv")]["source"] is None


@needs_nvcc
@pytest.mark.parametrize("source", [str(p.relative_to(kr.source_root())) for p in kr.cuda_sources()])
def test_cuda_kernel_file(source, built_rows):
    shipped = [r for r in built_rows or () if r["source"] == source]
    # What ships when the build is fresh (no spill counts there: spills show as stack or local
    # bytes), else nvcc on the file with ptxas -v.
    rows = shipped or kr.compile_cuda_file(kr.source_root() / source)
    assert rows, f"{source} defines no kernel"
    assert {r["arch"] for r in rows} == set(ARCHS)
    bad = [r for r in rows if r["problems"]]
    assert not bad, "\n" + kr.format_table(bad)


def test_library_dumps_are_made_once_per_build(tmp_path, monkeypatch):
    # A stand-in cuobjdump that counts its runs: the second worker reads the first one's dumps, and
    # a rebuilt library (new mtime) is dumped again.
    count = tmp_path / "runs"
    tool = tmp_path / "cuobjdump"
    tool.write_text(
        f"""#!/bin/sh
echo x >> {count}
if [ "$1" = "-res-usage" ]; then
  printf 'Fatbin elf code:\\narch = sm_90\\n Function _Z1kv:\\n  REG:40 STACK:0 SHARED:16 LOCAL:0\\n'
else
  printf '\\tcode for sm_90\\n\\t\\tFunction : _Z1kv\\n        /*0010*/ HMMA.16816.F32 R0, R2, R4, R0 ;\\n'
fi
"""
    )
    tool.chmod(0o755)
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\0" * 64)
    monkeypatch.setenv("SEQKERNELS_REPORT_BUILD_DIR", str(tmp_path / "report"))
    monkeypatch.delenv("SEQKERNELS_REPORT_CACHE", raising=False)
    first = kr._library_dumps(str(tool), str(lib))
    assert first[0][("sm_90", "_Z1kv")]["registers"] == 40 and first[1][("sm_90", "_Z1kv")]["tensor_cores"]
    runs = len(count.read_text().split())
    assert runs == 2
    assert kr._library_dumps(str(tool), str(lib)) == first
    assert len(count.read_text().split()) == runs  # read back, not dumped again

    st = os.stat(lib)
    os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert kr._library_dumps(str(tool), str(lib)) == first
    assert len(count.read_text().split()) == 2 * runs
    monkeypatch.setenv("SEQKERNELS_REPORT_CACHE", "0")
    assert kr._library_dumps(str(tool), str(lib)) == first
    assert len(count.read_text().split()) == 3 * runs

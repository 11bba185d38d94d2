"""Static checks of the CUDA kernels (DESIGN §6.3): every csrc/cuda/*.cu file compiled by nvcc
for every arch of SEQKERNELS_CUDA_ARCHS (default 8.0;9.0) must have zero spills, no stack frame,
static shared memory within 48 KiB, and tensor-core instructions in its SASS where
kernel_report.EXPECTS_TENSOR_CORES says so. The report machinery is itself tested on
tests/emulation/static_selftest_kernels.cu, whose answers are known. No GPU needed."""

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


@needs_nvcc
@pytest.mark.parametrize("source", [str(p.relative_to(kr.source_root())) for p in kr.cuda_sources()])
def test_cuda_kernel_file(source):
    rows = kr.compile_cuda_file(kr.source_root() / source)
    assert rows, f"{source} defines no kernel"
    assert {r["arch"] for r in rows} == set(ARCHS)
    bad = [r for r in rows if r["problems"]]
    assert not bad, "\n" + kr.format_table(bad)

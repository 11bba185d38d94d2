"""The build side of the CUDA-on-CPU harness: shared-memory rewriting, schema generation,
registration of launchers under emulation."""

import re

import pytest
import torch
from emulation import registered_schemas, rewrite_shared
from emulation.selftest import SCHEMAS, load_selftest

pytestmark = pytest.mark.emulation


@pytest.mark.parametrize(
    "src,want",
    [
        ("  __shared__ float tile[64][65];\n", "  __shared__ float tile[64][65]; SK_EMU_REGISTER_SHARED(tile)\n"),
        (
            "__shared__ __align__(16) T a[N * 2], b;",
            "__shared__ __align__(16) T a[N * 2], b; SK_EMU_REGISTER_SHARED(a) SK_EMU_REGISTER_SHARED(b)",
        ),
        (
            "__shared__ typename Cfg<T, 4>::Storage st;",
            "__shared__ typename Cfg<T, 4>::Storage st; SK_EMU_REGISTER_SHARED(st)",
        ),
        (
            "extern __shared__ __align__(16) unsigned char smem[];",
            "unsigned char* const smem = ::sk_emu::dynamic_smem<unsigned char>();",
        ),
        (
            "extern __shared__\n  float4 buf[];\nint x;",
            "float4* const buf = ::sk_emu::dynamic_smem<float4>();\n\nint x;",
        ),
        (
            "// __shared__ float not_code[4];\n/* extern __shared__ int c[]; */ int y = 0;",
            "// __shared__ float not_code[4];\n/* extern __shared__ int c[]; */ int y = 0;",
        ),
        ('const char* s = "__shared__ float q[2];";', 'const char* s = "__shared__ float q[2];";'),
        ("#define SMEM __shared__ float z[4];\n", "#define SMEM __shared__ float z[4];\n"),
    ],
)
def test_rewrite_shared(src, want):
    assert rewrite_shared(src) == want
    assert rewrite_shared(src).count("\n") == src.count("\n")  # line numbers kept


def test_schemas_come_from_registration_cpp():
    text = open("csrc/registration.cpp").read()
    schemas = registered_schemas()
    assert len(schemas) == len(re.findall(r"\bm\.def\(", text))
    names = [s.split("(")[0] for s in schemas]
    assert "attention_fwd" in names and "lstm_cell_bwd" in names
    for s in schemas:
        torch._C.parse_schema(s)


def test_emulated_namespace_has_every_schema_and_cpu_kernels():
    emu = load_selftest()
    ns = getattr(torch.ops, emu.namespace)
    for s in registered_schemas() + SCHEMAS:
        name = s.split("(")[0]
        base, _, overload = name.partition(".")  # "op" or "op.overload" (lstm_layer_fwd.fused)
        op = getattr(getattr(ns, base), overload or "default")
        assert str(op._schema).split("(")[0].endswith(name)
    assert emu.has("selftest_mma") and not emu.has("attention_fwd")
    with pytest.raises(AttributeError, match="SK_REGISTER_CUDA"):
        emu.attention_fwd  # noqa: B018 (the attribute access is what raises)
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"{emu.namespace}::selftest_mma", "CUDA")


def test_worker_cores_shares_the_machine_among_xdist_workers(monkeypatch):
    from emulation.build import worker_cores

    monkeypatch.delenv("MAX_JOBS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert worker_cores() == 1
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert worker_cores() == 8
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "32")
    assert worker_cores() == 1  # never below one
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT")
    assert worker_cores() == 16
    monkeypatch.setenv("MAX_JOBS", "3")  # an explicit MAX_JOBS wins
    assert worker_cores() == 3

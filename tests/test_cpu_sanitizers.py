"""The C++ CPU kernels (csrc/cpu/*.cpp) under AddressSanitizer and UndefinedBehaviorSanitizer.

A second build of the CPU kernels (emulation.build.build_cpu: the real sources, compiled with
-fsanitize=address,undefined -fno-sanitize-recover=undefined -O0, ops in the namespace
torch.ops.seqkernels_cpu_kernels_asan_ubsan) runs the boundary sweeps of tests/cpu_sanitize/sweeps.py
in a child Python with libasan + libubsan preloaded (emulation.build.run_cpu_sanitized): any
out-of-bounds access, even a read whose value is never used, and any undefined behaviour ends the
child with the sanitizer's report, which fails the test. Each sweep runs on every instruction-set
path the machine can execute (ISAS below: AMX, AVX-512, AVX2, portable, each forced by
SEQKERNELS_CPU_ISA, which all three kernel families read), and checks its results against the
reference: the build is -O0, so a path that is right only once the optimizer has inlined it fails
here. Planted bugs (tests/cpu_sanitize/planted_bugs.cpp, compiled into the same library) show that
both sanitizers report.

The default run (CI) takes a bounded sample of each sweep (every tile-edge length, head dim,
dtype and option still appears); the whole sweep, one child per kernel family and path, is

    python -m pytest -q -p no:cacheprovider tests/test_cpu_sanitizers.py --run-slow

The sanitized build is cached under build/emulation/ (SEQKERNELS_EMU_BUILD_DIR); its first build
costs about 100 CPU-seconds on the 2-core Xeon (tests/emulation/build.py says why -O0).
"""

import os

import pytest
from emulation.build import cpu_namespace, run_cpu_sanitized

# The first test builds the sanitized library (minutes on a loaded machine); the children have
# their own timeouts.
pytestmark = pytest.mark.timeout(1800)

NAME = "kernels"
EXTRA_SOURCES = ["tests/cpu_sanitize/planted_bugs.cpp"]
SCHEMAS = ["cpu_sanitize_selftest(Tensor x, int which) -> Tensor"]
FAMILIES = ("attention", "kv_cache", "lstm", "lstm_bf16")
ISAS = ("amx", "avx512", "avx2", "portable")
# Set at the child's start (every kernel also reads it per call): each run forces its level, so an
# AVX-512 machine still sanitizes the AVX2 code. "avx512" is the top AVX-512 level the CPU has
# (sweeps.select_isa): with AVX512_BF16 that includes the bf16 attention's dot path and the bf16
# LSTM sequence kernel's (lstm_bf16). "amx" is the AMX-BF16 attention and the bf16 LSTM sequence
# kernel on tiles (the families with a tile path); ASan does not see the tile loads and stores
# (inline assembly), only the code around them, so the padding they rely on is checked by the
# parity tests' NaN-filled neighbours, not here.
ISA_ENV = {isa: {"SEQKERNELS_CPU_ISA": {"avx512": "avx512_bf16", "amx": "amx_bf16"}.get(isa, isa)} for isa in ISAS}
ISA_FLAGS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "amx": {"avx512_bf16", "amx_tile", "amx_bf16"},
}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


# lstm_bf16 on the avx512 run only where that level is AVX512_BF16 (without it the bf16 LSTM is
# widened to the float32 kernels, which the lstm family covers).
ISA_FAMILIES = {
    "amx": ("attention", "lstm_bf16"),
    "avx512": FAMILIES[:3] + (("lstm_bf16",) if "avx512_bf16" in _cpu_flags() else ()),
    "avx2": FAMILIES[:3],
    "portable": FAMILIES[:3],
}


def _skip_unless_isa(isa):
    if isa in ISA_FLAGS and not ISA_FLAGS[isa] <= _cpu_flags():
        pytest.skip(f"this CPU cannot run the {isa} path (the lower levels' runs cover what it takes)")
    if isa != "portable" and os.environ.get("SEQKERNELS_CPU_ISA") in ("portable", "default"):
        pytest.skip("SEQKERNELS_CPU_ISA=portable in the environment forces the portable paths")


def _run(func, *args, env=None, timeout=900):
    return run_cpu_sanitized(NAME, func, *args, extra_sources=EXTRA_SOURCES, schemas=SCHEMAS, env=env, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# Child-side functions (module level: the child imports this file and calls them with the ops)
# ------------------------------------------------------------------------------------------------
def _selftest(ops, which):
    import torch

    x = torch.arange(13, dtype=torch.float32)  # 13 floats: one full 8-lane load, a 5-lane tail
    got = ops.cpu_sanitize_selftest(x, which)
    assert got.item() == float(x.sum()), got
    print(f"selftest {which} returned the right sum")


def _check_namespace(ops):
    import torch

    assert ops.namespace == cpu_namespace(NAME, "address,undefined"), ops.namespace
    for op in (
        "attention_fwd",
        "attention_bwd",
        "kv_cache_append",
        "decode_attention",
        "lstm_cell_fwd",
        "lstm_cell_bwd",
        "lstm_layer_fwd",
        "cpu_sanitize_selftest",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{ops.namespace}::{op}", "CPU"), op
    # Nothing of the sanitized library lands in the real extension's namespace.
    assert not any(name.startswith("seqkernels::") for name in torch._C._dispatch_get_all_op_names()), (
        "the sanitized library registered ops in seqkernels::"
    )
    print("namespace ok")


def _sweep(ops, families, level, isa, shard=0, nshards=1):
    from cpu_sanitize.sweeps import run_family

    _check_namespace(ops)
    _selftest(ops, 0)  # the correct twin of the planted bugs: no report
    for family in families:
        run_family(ops, family, level, isa, shard, nshards)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------
def test_address_sanitizer_reports_planted_tail_overread():
    """An 8-lane load at the tail of a 13-float tensor whose extra lanes are discarded: the result
    is right, ASan must still stop it."""
    res = _run(_selftest, 1)
    assert res.returncode != 0, res.output[-6000:]
    # GCC's ASan names a 32-byte access that starts in bounds "unknown-crash"; the description
    # of the address is the heap overflow's.
    report = res.report
    assert "READ of size 32" in report, res.output[-6000:]
    assert "0 bytes to the right of 52-byte region" in report, res.output[-6000:]
    assert "in sum_floats" in report and "planted_bugs.cpp:" in report, res.output[-6000:]


def test_ubsan_reports_planted_signed_overflow():
    res = _run(_selftest, 2)
    assert res.returncode != 0, res.output[-6000:]
    assert "runtime error: signed integer overflow" in res.report, res.output[-6000:]
    assert "planted_bugs.cpp:" in res.report, res.output[-6000:]


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_kernels_sanitized_sample(isa):
    """The bounded sample of every sweep (attention fwd/bwd, KV append and decode, LSTM cell and
    layer) on one instruction-set path, in one child."""
    _skip_unless_isa(isa)
    families = ISA_FAMILIES[isa]
    res = _run(_sweep, families, "ci", isa, env=ISA_ENV[isa]).assert_clean()
    assert "namespace ok" in res.output and "selftest 0 returned the right sum" in res.output
    for family in families:
        assert f"cpu-sanitize sweep {family} (ci, {isa} path" in res.output, res.output[-6000:]
    assert res.output.count(" 0 mismatches") == len(families), res.output[-6000:]


@pytest.mark.slow
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_kernels_sanitized_full(family, isa):
    """The whole sweep of one kernel family on one path (`--run-slow`)."""
    _skip_unless_isa(isa)
    if family not in ISA_FAMILIES[isa]:
        pytest.skip(f"{family} has no {isa} path")
    res = _run(_sweep, (family,), "full", isa, env=ISA_ENV[isa], timeout=7000).assert_clean()
    assert f"cpu-sanitize sweep {family} (full, {isa} path" in res.output, res.output[-6000:]
    assert " 0 mismatches" in res.output, res.output[-6000:]

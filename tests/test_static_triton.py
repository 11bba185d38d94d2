"""Static checks of the Triton kernels (DESIGN §6.2): every configuration listed in a
triton_kernels/<op>.py STATIC_CONFIGS is compiled ahead of time for every arch of
SEQKERNELS_CUDA_ARCHS (default 8.0;9.0) and must compile, use no stack or local memory, fit the
arch's shared memory, and use tensor cores (wgmma on sm_90) when it does matrix work. The
machinery is tested on tests/emulation/static_selftest_triton.py. No GPU needed.

A cold compile of the lists takes minutes (about 2.5 CPU-seconds per configuration and arch on the
2-core reference machine): each module test prints what it compiles, a progress line every 30 s
and its total past pytest's capture. Triton's cache (TRITON_CACHE_DIR, by default build/triton-cache
of the checkout, set in tests/conftest.py) and kernel_report's per-kernel rows (build/kernel_report/
triton) make a rerun in the same checkout take seconds."""

import importlib
import os
import sys
import time

import pytest
from aot_static import collect_triton_shard, static_shard

from seqkernels import kernel_report as kr

triton = pytest.importorskip("triton")
needs_cuobjdump = pytest.mark.skipif(kr._tool("cuobjdump") is None, reason="cuobjdump is needed")


@needs_cuobjdump
def test_report_on_triton_kernels_with_known_answers(monkeypatch):
    # The interpreter flag (set by the test suite) must not stop ahead-of-time compilation.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = kr.collect_triton(modules=["emulation.static_selftest_triton"], archs=["8.0", "9.0"])
    assert len(rows) == 10
    good_mm, scale, small_mm, huge, claims_mma = rows[0:2], rows[2:4], rows[4:6], rows[6:8], rows[8:10]
    for r in good_mm:
        assert r["tensor_cores"] and r["problems"] == [] and r["shared_bytes"] > 0, r
        assert not r["sass_checked"], r  # the PTX settled it
    assert [r["arch"] for r in good_mm] == ["sm_80", "sm_90"]
    assert [r["tensor_core_kind"] for r in good_mm] == ["mma", "wgmma"]
    assert [r["tensor_core_kind"] for r in small_mm] == ["mma", "mma"] and all(not r["problems"] for r in small_mm)
    # The same instruction choice is a finding when the configuration promises wgmma.
    assert any("no wgmma" in p for p in kr._problems(dict(small_mm[1], expects_tensor_cores=True)))
    for r in scale:
        assert not r["tensor_cores"] and r["problems"] == [], r
        # Expects no tensor cores and its PTX has none: not disassembled.
        assert not r["sass_checked"] and r["local_instructions"] is None, r
    for r in claims_mma:
        assert r["sass_checked"] and r["local_instructions"] == 0, r
        assert r["problems"] == ["no tensor-core instructions"], r
    assert all(r["problems"] for r in huge)
    assert all(any("shared memory" in p for p in r["problems"]) for r in huge)
    assert "_selftest_matmul_kernel" in kr.format_table(rows)


# A module's list is compiled in shards of about this many entries (every nth entry per shard), each
# its own test: CI's two xdist workers share the minutes of a cold compile (tests/conftest.py hands
# each shard out on its own, first) instead of one worker ending the run alone on it. Each shard
# compiles on the cores left to its worker (emulation.build.worker_cores: one under CI's `-n 2`
# on two cores), so that shards and the other worker's tests never ask for more cores than there are;
# a shard's own start (a fresh process importing triton and the module) is a few seconds. Four
# shards of the attention list (340 entries, about 920 CPU-s cold on the 2-core Xeon of
# 2026-12-06) of about 230 s each.
_CONFIGS_PER_SHARD = 86


def _module_shards():
    params = []
    for name in kr.triton_modules():
        try:
            n = len(getattr(importlib.import_module(name), "STATIC_CONFIGS", None) or ())
        except ImportError:
            params.append(pytest.param(name, 0, 1, id=name))  # the test reports the import error
            continue
        if not n:
            continue
        nshards = max(1, round(n / _CONFIGS_PER_SHARD))
        for shard in range(nshards):
            params.append(
                pytest.param(name, shard, nshards, id=name if nshards == 1 else f"{name}-{shard + 1}of{nshards}")
            )
    return params


def _say(request, msg):
    """A progress line on the terminal past pytest's capture: these compiles take minutes cold."""
    cap = request.config.pluginmanager.get_plugin("capturemanager")
    if cap is None:
        print(msg, file=sys.stderr, flush=True)
        return
    with cap.global_and_fixture_disabled():
        print(msg, file=sys.stderr, flush=True)


# A cold shard takes about 4 minutes on one free core and three times that on a machine loaded past
# 10: past pyproject's 600 s per test. Its progress lines show it is not stuck.
@pytest.mark.timeout(2400)
@needs_cuobjdump
@pytest.mark.parametrize("module,shard,nshards", _module_shards())
def test_triton_kernel_module(module, shard, nshards, request):
    configs = static_shard(importlib.import_module(module).STATIC_CONFIGS, shard, nshards)
    part = f" (shard {shard + 1}/{nshards})" if nshards > 1 else ""
    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    _say(request, f"\n[static triton] compiling {len(configs)} configs of {module}{part} ahead of time for "
                  f"sm_80/sm_90 (Triton's cache {cache} makes a rerun take seconds)")  # fmt: skip
    t0 = time.perf_counter()
    last = [t0]

    def progress(done, total):
        # A line every 30 s and at the end: the cold compile of a shard takes minutes.
        now = time.perf_counter()
        if done == total or now - last[0] >= 30:
            last[0] = now
            _say(request, f"[static triton] {module}{part}: {done}/{total} compiled, {now - t0:.0f} s")

    rows = collect_triton_shard(module, shard, nshards, progress)
    _say(request, f"[static triton] {module}{part}: {len(rows)} kernels checked in {time.perf_counter() - t0:.0f} s")
    assert rows
    # One row per entry and arch: the shard compiled its whole share, so the shards together compile
    # the whole list.
    archs = kr._archs(None)
    assert len(rows) == sum(len(kr._entry_archs(c, archs)) for c in configs), (len(rows), len(configs))
    bad = [r for r in rows if r["problems"]]
    assert not bad, "\n" + kr.format_table(bad)

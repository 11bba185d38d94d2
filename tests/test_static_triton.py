"""Static checks of the Triton kernels (DESIGN §6.2): every configuration listed in a
triton_kernels/<op>.py STATIC_CONFIGS is compiled ahead of time for every arch of
SEQKERNELS_CUDA_ARCHS (default 8.0;9.0) and must compile, use no stack or local memory, fit the
arch's shared memory, and use tensor cores (wgmma on sm_90) when it does matrix work. The
machinery is tested on tests/emulation/static_selftest_triton.py. No GPU needed."""

import importlib
import os
import sys
import time

import pytest

from seqkernels import kernel_report as kr

triton = pytest.importorskip("triton")
needs_cuobjdump = pytest.mark.skipif(kr._tool("cuobjdump") is None, reason="cuobjdump is needed")


@needs_cuobjdump
def test_report_on_triton_kernels_with_known_answers(monkeypatch):
    # The interpreter flag (set by the test suite) must not stop ahead-of-time compilation.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = kr.collect_triton(modules=["emulation.static_selftest_triton"], archs=["8.0", "9.0"])
    assert len(rows) == 8
    good_mm, scale, small_mm, huge = rows[0:2], rows[2:4], rows[4:6], rows[6:8]
    for r in good_mm:
        assert r["tensor_cores"] and r["problems"] == [] and r["shared_bytes"] > 0, r
    assert [r["arch"] for r in good_mm] == ["sm_80", "sm_90"]
    assert [r["tensor_core_kind"] for r in good_mm] == ["mma", "wgmma"]
    assert [r["tensor_core_kind"] for r in small_mm] == ["mma", "mma"] and all(not r["problems"] for r in small_mm)
    # The same instruction choice is a finding when the configuration promises wgmma.
    assert any("no wgmma" in p for p in kr._problems(dict(small_mm[1], expects_tensor_cores=True)))
    for r in scale:
        assert not r["tensor_cores"] and r["problems"] == [], r
    assert all(r["problems"] for r in huge)
    assert all(any("shared memory" in p for p in r["problems"]) for r in huge)
    assert "_selftest_matmul_kernel" in kr.format_table(rows)


def _modules_with_configs():
    mods = []
    for name in kr.triton_modules():
        try:
            if getattr(importlib.import_module(name), "STATIC_CONFIGS", None):
                mods.append(name)
        except ImportError:
            mods.append(name)  # the test reports the import error
    return mods


def _say(request, msg):
    """A progress line on the terminal past pytest's capture: these compiles take minutes cold."""
    cap = request.config.pluginmanager.get_plugin("capturemanager")
    if cap is None:
        print(msg, file=sys.stderr, flush=True)
        return
    with cap.global_and_fixture_disabled():
        print(msg, file=sys.stderr, flush=True)


@needs_cuobjdump
@pytest.mark.parametrize("module", _modules_with_configs())
def test_triton_kernel_module(module, request):
    n = len(getattr(importlib.import_module(module), "STATIC_CONFIGS", ()) or ())
    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    _say(request, f"\n[static triton] compiling {n} configs of {module} ahead of time for sm_80/sm_90 "
                  f"(Triton's cache {cache} makes a rerun take seconds)")  # fmt: skip
    t0 = time.perf_counter()
    rows = kr.collect_triton(modules=[module])
    _say(request, f"[static triton] {module}: {len(rows)} kernels checked in {time.perf_counter() - t0:.0f} s")
    assert rows
    bad = [r for r in rows if r["problems"]]
    assert not bad, "\n" + kr.format_table(bad)

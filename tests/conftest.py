"""Shared test setup.

Triton must see TRITON_INTERPRET=1 before it is imported when no GPU is present, so this runs
before anything imports triton. `cuda` tests skip cleanly without a GPU.
"""

import os
import random
import zlib


def _has_gpu() -> bool:
    # Without importing torch.cuda state early: nvidia-smi-free check through the driver files.
    return os.path.exists("/dev/nvidia0") or os.environ.get("SEQKERNELS_TEST_FORCE_CUDA") == "1"


if not _has_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Triton's compile cache (the ahead-of-time compiles of tests/test_static_triton.py and the kernel
# tests' samples) lives under the checkout's build/ (ignored by git) unless TRITON_CACHE_DIR says
# otherwise, so that a rerun in the same checkout reuses it; kernel_report keeps its rows next to
# its CUDA results, under build/kernel_report.
os.environ.setdefault(
    "TRITON_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "triton-cache"),
)

# Two test workers share the 2-core machine (CI's `-n 2`), each with torch's OpenMP pool of one
# thread per core: OpenMP's default spin-waiting then burns the other worker's core between parallel
# regions. Passive waiting keeps every test's threads (the CPU kernels still run their parallel
# regions on two threads) and took a quarter off the CPU time of the CPU-kernel test files
# (tests/test_modifiers.py, test_attention_cpu.py, test_adversarial.py, test_lstm_module.py with -n 2:
# 251 -> 170 user CPU-s, 149 -> 105 s wall, 2026-12-06). Children (sanitizer runs, distributed
# ranks, compile pools) inherit it. Set before torch loads libgomp, which reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS (the Triton interpreter's tl.dot; torch itself uses MKL) spins the same way and
# has no passive mode: one thread. The interpreter-heavy files (test_attention_triton.py without
# its compile sample, test_varlen.py, test_decode_varlen.py, test_attention.py) took 8-18% less CPU
# time with it (two runs each way, -n 2, 2026-12-06).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _interpreter_dot_like_the_gpu():
    """The Triton interpreter's tl.dot is one numpy matmul, summed in whatever order the CPU's
    OpenBLAS kernel takes. The attention backward recomputes the forward's scores transposed
    (K Q^T against the forward's Q K^T) and relies on getting the same bits: on the GPU each
    score is one loop of FMAs over k (float32, "ieee") or one MMA, whatever the operand order.
    OpenBLAS's Haswell kernel (AVX2 machines; AMD Zen, AVX-512 ones included) sums a product and
    its transpose in different orders, so the interpreter's scores differed in the last bit, which
    at |s| ~ 1e4 moves P by 1e-3 and at 1e20 makes exp(s - lse) overflow (test_huge_scores'
    dV failed there, 2026-12-07, while SkylakeX's kernel agreed bitwise). Products of float32
    (or float16) operands are exact in float64 and the sum is rounded once to float32, so a
    product and its transpose agree, as on the GPU; the accumulator is added in float32 as before."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    plain = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        wide = (np.float32, np.float16)
        if d.data.dtype == np.float32 and a.data.dtype in wide and b.data.dtype in wide:
            prod = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)).astype(np.float32)
            return interpreter.TensorHandle(prod + d.data, d.dtype.scalar)
        return plain(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot


def pytest_configure(config):
    # In pytest's own processes only: the sanitized subprocesses import test modules, and with them
    # this file, and must not import triton (its library does not load under AddressSanitizer).
    if os.environ.get("TRITON_INTERPRET") == "1":
        _interpreter_dot_like_the_gpu()


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow (the full static compile matrix, large interpreter runs)",
    )


def pytest_collection_modifyitems(config, items):
    # Slow tests (tens of minutes on 2 cores) stay out of the default run and CI's 30-minute budget;
    # `pytest --run-slow` or SEQKERNELS_SLOW_TESTS=1 runs them.
    # They are deselected (reported as "deselected"), not skipped, so that the skip count of a run
    # is what this machine cannot do (GPU-only tests) and not what was chosen to leave out.
    run_slow = config.getoption("--run-slow") or os.environ.get("SEQKERNELS_SLOW_TESTS") == "1"
    if not run_slow:
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (cuda marker)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


# ------------------------------------------------------------------------------------------------
# Distribution over xdist workers (CI: `-n 2 --dist loadfile`)
# ------------------------------------------------------------------------------------------------
# xdist's loadfile hands out whole files (each file's module fixtures, emulated and sanitized
# builds, are made once), most tests first, one file at a time per worker. Two changes:
# - tests with no fixture to share that take minutes are handed out one by one: the shards of the
#   Triton AOT compile and the per-file CUDA compiles, so the two workers share them;
# - the longest units start first (measured with --durations on the 2-core machine, cold caches),
#   so that the run ends on short units on both workers instead of one worker alone on a long one
#   (the 340-entry Triton compile, minutes cold, started last in a loadfile run). A stale or
#   missing estimate only changes the order.
_OWN_UNIT_PREFIXES = (
    "tests/test_static_triton.py::test_triton_kernel_module[",
    "tests/test_static_cuda.py::test_cuda_kernel_file[",
)
# Seconds per unit (a file, or one test of _OWN_UNIT_PREFIXES), matched by prefix, first match: a
# clean-clone run on the 2-core Xeon of 2026-12-06 (cold caches, two workers; the Triton shards timed
# alone on one core). Only the order matters. Units not listed keep xdist's order after these.
_UNIT_SECONDS = (
    ("tests/test_attention_cuda.py", 360),
    ("tests/test_cpu_sanitizers.py", 290),
    ("tests/test_static_triton.py::test_triton_kernel_module[seqkernels.triton_kernels.attention", 230),
    ("tests/test_attention_triton.py", 150),
    ("tests/test_decode_attention.py", 115),
    ("tests/test_distributed.py", 100),
    ("tests/test_modifiers.py", 100),
    ("tests/test_static_triton.py::test_triton_kernel_module[seqkernels.triton_kernels.kv_cache", 90),
    ("tests/test_cpu_isa.py", 65),
    ("tests/test_emulation_sanitizers.py", 55),
    ("tests/test_attention_cpu.py", 55),
    ("tests/test_decode_varlen_gpu.py", 53),
    ("tests/test_lstm_cell.py", 50),
    ("tests/test_dropout_grid.py", 42),
    ("tests/test_adversarial.py", 42),
    ("tests/test_opcheck.py", 41),
    ("tests/test_static_cuda.py::test_cuda_kernel_file[", 35),
    ("tests/test_static_triton.py::test_triton_kernel_module[", 30),
    ("tests/test_padding.py", 32),
    ("tests/test_properties.py", 32),
)


def _unit_seconds(scope: str) -> float:
    return next((sec for prefix, sec in _UNIT_SECONDS if scope.startswith(prefix)), 0.0)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: no error where it is not installed
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    try:
        from xdist.scheduler import LoadFileScheduling
    except ImportError:  # an xdist without it: its own scheduler
        return None

    class LongestFirstLoadFile(LoadFileScheduling):
        _ordered = False

        def _split_scope(self, nodeid):
            if nodeid.startswith(_OWN_UNIT_PREFIXES):
                return nodeid
            return super()._split_scope(nodeid)

        def _assign_work_unit(self, node):
            # The queue is complete at the first assignment: order it once, longest first (stable:
            # xdist's order, most tests first, among units without an estimate).
            if not self._ordered:
                self._ordered = True
                units = sorted(self.workqueue.items(), key=lambda unit: -_unit_seconds(unit[0]))
                self.workqueue.clear()
                self.workqueue.update(units)
            super()._assign_work_unit(node)

    return LongestFirstLoadFile(config, log)


@pytest.fixture(autouse=True)
def seed(request):
    """Fresh but reproducible random inputs per test: the seed derives from the test id."""
    s = zlib.crc32(request.node.nodeid.encode()) % (2**31)
    torch.manual_seed(s)
    random.seed(s)
    return s


def devices():
    """Devices the parametrized tests run on: CPU always, CUDA when present."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])

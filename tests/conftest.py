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

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


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

"""The sanitizer side of the CUDA-on-CPU harness: ThreadSanitizer must report a missing
__syncthreads and AddressSanitizer out-of-bounds writes (global, dynamic and static shared
memory) planted in test kernels, and neither may report anything on correct kernels that use
every emulated primitive (no false positives from the harness itself).

Each case runs in a child Python with the sanitizer runtime preloaded (emulation.run_sanitized)."""

import pytest
from emulation.selftest import run_selftest_sanitized

pytestmark = pytest.mark.emulation


def _exercise_everything(emu):
    """Correct use of every primitive; must be sanitizer-clean."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(300)
    torch.testing.assert_close(
        emu.selftest_block_reduce(x, 128, True)[:, 0],
        torch.cat([x, torch.zeros(84)]).view(3, 128).sum(1),
        rtol=1e-5,
        atol=1e-5,
    )
    emu.selftest_block_reduce(x, 64, False)
    v = torch.arange(64, dtype=torch.int32)
    assert emu.selftest_shfl(v, 3, 1, 32, -1)[0].item() == 1
    emu.selftest_shfl(v.double(), 2, 3, 8, 0x0F0F0F0F)
    emu.selftest_vote(torch.ones(64, dtype=torch.int32), v, -1)
    iout, _, _ = emu.selftest_atomics(v, v.float(), 2)
    assert iout[0].item() == int(v.sum())
    emu.selftest_poison(torch.empty(1), 2)
    emu.selftest_convert(torch.randn(100), torch.randn(100))
    emu.selftest_ldmatrix(torch.randint(-100, 100, (32, 8), dtype=torch.int16), 4, True)
    for a_trans in (False, True):
        for b_trans in (False, True):
            a, c = torch.randn(16, 16).half(), torch.randn(16, 8)
            b = torch.randn(*((16, 8) if b_trans else (8, 16))).half()
            d = emu.selftest_mma(a, b, c, a_trans, b_trans, 9)
            assert torch.isfinite(d).all()
    emu.selftest_race(torch.randn(64), True)
    emu.selftest_oob(torch.randn(48), 0)
    print("exercised every primitive")


def _race(emu):
    import torch

    emu.selftest_race(torch.randn(64), False)


def _oob(emu, where):
    import torch

    emu.selftest_oob(torch.randn(48), where)


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_sanitizers_are_quiet_on_correct_kernels(sanitizer):
    res = run_selftest_sanitized(sanitizer, _exercise_everything).assert_clean()
    assert "exercised every primitive" in res.output


def test_thread_sanitizer_reports_missing_syncthreads():
    res = run_selftest_sanitized("thread", _race)
    assert res.returncode != 0
    assert "data race" in res.report, res.output[-6000:]
    assert "_race_kernel" in res.report and "selftest_kernels.cu" in res.report


@pytest.mark.parametrize(
    "where,kind",
    [(1, "heap-buffer-overflow"), (2, "use-after-poison"), (3, "global-buffer-overflow")],
    ids=["global", "dynamic_shared", "static_shared"],
)
def test_address_sanitizer_reports_out_of_bounds(where, kind):
    res = run_selftest_sanitized("address", _oob, where)
    assert res.returncode != 0
    assert kind in res.report, res.output[-6000:]
    assert "_oob_kernel" in res.report and "selftest_kernels.cu" in res.report

"""The CUDA-on-CPU harness itself: its warp shuffles, votes, atomics, barriers, shared memory,
half/bf16 conversions and tensor-core primitives against independent references (the CUDA
programming guide's semantics, torch, plain matrix products), and the errors it must raise
instead of hanging. Kernels: tests/emulation/selftest_kernels.cu."""

import math
import time
from fractions import Fraction

import pytest
import torch
from emulation.selftest import load_selftest, run_selftest_subprocess

pytestmark = pytest.mark.emulation

FULL = 0xFFFFFFFF


@pytest.fixture(scope="module")
def emu():
    return load_selftest()


def _signed(mask):
    return mask - (1 << 32) if mask >= 1 << 31 else mask


# ----------------------------------------------------------------------------------------------
# Shuffles
# ----------------------------------------------------------------------------------------------
def _shfl_ref(vals, mode, arg, width, mask, garbage):
    """CUDA programming guide semantics of __shfl*_sync; reading a lane outside `mask` is
    undefined, which the emulator makes all-ones bits (`garbage`)."""
    out = list(vals)
    for t in range(len(vals)):
        lane, base = t % 32, t - t % 32
        if not (mask >> lane) & 1:
            continue
        seg = lane - lane % width
        if mode == 0:
            src = seg + arg % width
        elif mode == 1:
            src = lane - arg if lane - seg >= arg else lane
        elif mode == 2:
            src = lane + arg if lane - seg + arg < width else lane
        else:
            src = lane ^ arg
            if src // width > lane // width:  # later groups are not reachable
                src = lane
        exists = base + src < len(vals)
        out[t] = vals[base + src] if exists and (mask >> src) & 1 else garbage
    return out


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("n,mask", [(64, FULL), (64, 0x0F0FF0F0), (48, 0x0000FFFF)])
@pytest.mark.parametrize("mode", [0, 1, 2, 3], ids=["idx", "up", "down", "xor"])
def test_shuffles_every_width(emu, dtype, n, mask, mode):
    g = torch.Generator().manual_seed(n + mode)
    vals = (torch.randn(n, generator=g, dtype=torch.float64) * 1000).to(dtype)
    if dtype == torch.int32:
        vals = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int32)
    garbage = -1 if dtype == torch.int32 else float("nan")
    for width in (1, 2, 4, 8, 16, 32):
        args = range(0, 40, 3) if mode == 0 else range(0, width)
        for arg in args:
            got = emu.selftest_shfl(vals, mode, arg, width, _signed(mask)).tolist()
            want = _shfl_ref(vals.tolist(), mode, arg, width, mask, garbage)
            for i, (a, b) in enumerate(zip(got, want)):
                same = (math.isnan(a) and math.isnan(b)) if isinstance(b, float) and math.isnan(b) else a == b
                assert same, f"lane {i} width {width} arg {arg}: got {a}, expected {b}"


# ----------------------------------------------------------------------------------------------
# Votes, match, reductions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,mask", [(96, FULL), (64, 0x5A5AA5A5), (40, 0x000000FF)])
def test_votes_match_reduce(emu, n, mask):
    g = torch.Generator().manual_seed(n)
    pred = torch.randint(0, 2, (n,), generator=g, dtype=torch.int32)
    pred[:32] = 1  # warp 0 all true so __all_sync sees both outcomes across warps
    vals = torch.randint(-5, 5, (n,), generator=g, dtype=torch.int32)
    got = emu.selftest_vote(pred, vals, _signed(mask))
    for t in range(n):
        lane, base = t % 32, t - t % 32
        if not (mask >> lane) & 1:
            assert got[t].tolist() == [0] * 7
            continue
        members = [base + l for l in range(32) if (mask >> l) & 1 and base + l < n]
        ballot = sum(1 << (m - base) for m in members if pred[m])
        match = sum(1 << (m - base) for m in members if vals[m] == vals[t])
        total = sum(int(vals[m]) for m in members)
        want = [
            ballot,
            int(any(pred[m] for m in members)),
            int(all(pred[m] for m in members)),
            match,
            total,
            min(int(vals[m]) for m in members),
            max(int(vals[m]) for m in members),
        ]
        want[0] = _signed(want[0])
        want[3] = _signed(want[3])
        assert got[t].tolist() == want, f"thread {t}"


# ----------------------------------------------------------------------------------------------
# Atomics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks,threads", [(3, 256), (1, 97)])
def test_atomics(emu, blocks, threads):
    g = torch.Generator().manual_seed(blocks)
    ivals = torch.randint(-1000, 1000, (blocks * threads,), generator=g, dtype=torch.int32)
    fvals = torch.randn(blocks * threads, generator=g)
    iout, fout, dout = emu.selftest_atomics(ivals, fvals, blocks)
    n = blocks * threads
    assert iout.tolist() == [int(ivals.sum()), int(ivals.max()), int(ivals.min()), n, n % 100]
    exact = fvals.double().sum().item()
    assert abs(fout[0].item() - exact) < 1e-4 * n
    assert fout[1].item() == 1.5
    assert abs(dout[0].item() - exact) < 1e-9 * n


# ----------------------------------------------------------------------------------------------
# Barriers and shared memory
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,threads", [(1000, 256), (97, 32), (1500, 1024)])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static_smem", "dynamic_smem"])
def test_block_reduce_with_barriers(emu, n, threads, dynamic):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    got = emu.selftest_block_reduce(x, threads, dynamic)
    blocks = (n + threads - 1) // threads
    padded = torch.cat([x, torch.zeros(blocks * threads - n)]).view(blocks, threads)
    torch.testing.assert_close(got[:, 0], padded.sum(1), rtol=1e-5, atol=1e-5)
    assert got[:, 1].tolist() == (padded > 0).sum(1).float().tolist()
    valid = torch.arange(blocks * threads).view(blocks, threads) < n
    assert got[:, 2].tolist() == ((padded > 0) | ~valid).all(1).float().tolist()
    assert got[:, 3].tolist() == (padded > 0).any(1).float().tolist()


def test_shared_memory_is_poisoned_before_every_block(emu):
    got = emu.selftest_poison(torch.empty(1), 4)
    assert torch.isnan(got).all(), got  # 0xFF bytes read as NaN, never the previous block's 1.0 / 2.0


# ----------------------------------------------------------------------------------------------
# half / bfloat16
# ----------------------------------------------------------------------------------------------
def _round_rne(v: Fraction, mant_bits: int, emin: int, emax: int) -> float:
    """Round an exact rational to a binary format with `mant_bits` stored bits and exponent
    range [emin, emax], to nearest even, in one step."""
    if v == 0:
        return 0.0
    exp = math.floor(math.log2(abs(v)))
    while Fraction(2) ** exp > abs(v):  # log2 of a huge or tiny rational may be off by one
        exp -= 1
    while Fraction(2) ** (exp + 1) <= abs(v):
        exp += 1
    exp = max(exp, emin)  # the subnormal range has the spacing of the smallest normal binade
    r = round(v * Fraction(2) ** (mant_bits - exp)) * Fraction(2) ** (exp - mant_bits)  # ties to even
    max_finite = (2 - Fraction(1, 2**mant_bits)) * Fraction(2) ** emax
    return math.copysign(math.inf, v) if abs(r) > max_finite else float(r)


def _f16(v):
    return _round_rne(v, 10, -14, 15)


def _bf16(v):
    return _round_rne(v, 7, -126, 127)


def _inputs():
    g = torch.Generator().manual_seed(7)
    scales = 10.0 ** torch.randint(-9, 6, (3000,), generator=g).double()
    x = (torch.randn(3000, generator=g, dtype=torch.float64) * scales).float()
    specials = [
        1 + 2**-11,
        1 + 3 * 2**-11,
        65504.0,
        65519.99,
        65520.0,
        2.0**-25,
        3 * 2.0**-25,
        2.0**-24,
        6.0e-8,
        1 + 2**-8,
        1 + 3 * 2**-8,
        3.3895314e38,
        -0.0,
        float("inf"),
        float("-inf"),
        float("nan"),
        2.0**-14 - 2.0**-25,
        1e-40,
    ]
    x = torch.cat([x, torch.tensor(specials)])
    y = x[torch.randperm(len(x), generator=g)] * 0.37
    return x, y


def test_half_bf16_conversions_match_torch(emu):
    x, y = _inputs()
    h, bf, hback, bfback, _, _, pairs = emu.selftest_convert(x, y)
    nan = torch.isnan(x)
    assert torch.equal(h[~nan], x.to(torch.float16).view(torch.int16)[~nan])
    assert torch.equal(bf[~nan], x.to(torch.bfloat16).view(torch.int16)[~nan])
    assert torch.isnan(h.view(torch.float16)[nan]).all() and torch.isnan(bf.view(torch.bfloat16)[nan]).all()
    torch.testing.assert_close(hback, h.view(torch.float16).float(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(bfback, bf.view(torch.bfloat16).float(), rtol=0, atol=0, equal_nan=True)
    want = torch.stack([x.half().float(), y.half().float(), x.bfloat16().float(), y.bfloat16().float()], 1)
    torch.testing.assert_close(pairs, want, rtol=0, atol=0, equal_nan=True)


def test_half_bf16_arithmetic_rounds_once(emu):
    x, y = _inputs()
    _, _, _, _, hops, bops, _ = emu.selftest_convert(x, y)
    hx, hy = x.half().double().tolist(), y.half().double().tolist()
    bx, by = x.bfloat16().double().tolist(), y.bfloat16().double().tolist()
    got_h = hops.view(torch.float16).double().tolist()
    got_b = bops.view(torch.bfloat16).double().tolist()
    checked = 0
    for i in range(len(hx)):
        for got, a, b, rnd in ((got_h[i], hx[i], hy[i], _f16), (got_b[i], bx[i], by[i], _bf16)):
            if not (math.isfinite(a) and math.isfinite(b)):
                assert all(math.isnan(g) or math.isinf(g) for g in got) or a == 0 or b == 0, (i, a, b, got)
                continue
            fa, fb = Fraction(a), Fraction(b)
            for j, want in enumerate((fa + fb, fa * fb, fa * fb + fa)):
                assert got[j] == rnd(want), f"element {i} op {j} on {a!r}, {b!r}: got {got[j]!r}, want {rnd(want)!r}"
                checked += 1
    assert checked > 15000


# ----------------------------------------------------------------------------------------------
# ldmatrix and mma
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_fragments(emu, n, trans):
    m = torch.randint(-(2**15), 2**15 - 1, (n * 8, 8), dtype=torch.int16, generator=torch.Generator().manual_seed(n))
    got = emu.selftest_ldmatrix(m, n, trans)
    u = m.int() & 0xFFFF
    # PTX ISA, ldmatrix: lane l receives row l/4, elements 2*(l%4) and 2*(l%4)+1 of each 8x8
    # matrix (of its transpose with .trans), the lower-indexed element in the low half.
    for lane in range(32):
        for i in range(n):
            mat = u[8 * i : 8 * i + 8]
            mat = mat.t() if trans else mat
            r, c = lane // 4, 2 * (lane % 4)
            want = int(mat[r, c]) | (int(mat[r, c + 1]) << 16)
            assert got[lane, i].item() & 0xFFFFFFFF == want, (lane, i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("a_trans", [False, True], ids=["A", "At"])
@pytest.mark.parametrize("b_trans", [False, True], ids=["Bt", "B"])
@pytest.mark.parametrize("zero_rows_from", [16, 5])
def test_mma_matches_matmul(emu, dtype, a_trans, b_trans, zero_rows_from):
    g = torch.Generator().manual_seed(int(a_trans) * 2 + int(b_trans) + zero_rows_from)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(*((16, 8) if b_trans else (8, 16)), generator=g).to(dtype)
    c = torch.randn(16, 8, generator=g)
    got = emu.selftest_mma(a, b, c, a_trans, b_trans, zero_rows_from)
    sa, sb = a.float().clone(), b.float().clone()
    sa[zero_rows_from:] = 0  # cp.async with a false predicate zero-fills those stored rows
    sb[zero_rows_from:] = 0
    A = sa.t() if a_trans else sa
    B = sb if b_trans else sb.t()
    torch.testing.assert_close(got, A @ B + c, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Launch configuration and device properties
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [(32, 1, 1), (8, 4, 2), (3, 5, 7)])
def test_launch_indices(emu, block):
    out = emu.selftest_launch(torch.empty(1), *block, 0, False)
    bx, by, bz = block
    rows = out.view(2 * 3 * 2, bx * by * bz, 12)
    for b in range(12):
        for t in range(bx * by * bz):
            want = [t % bx, (t // bx) % by, t // (bx * by), b % 2, (b // 2) % 3, b // 6, bx, by, bz, 2, 3, 2]
            assert rows[b, t].tolist() == want


@pytest.mark.parametrize("block", [(1025, 1, 1), (32, 32, 2), (1, 1, 65)])
def test_launch_rejects_oversized_blocks(emu, block):
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        emu.selftest_launch(torch.empty(1), *block, 0, False)


def test_dynamic_shared_memory_limits(emu, monkeypatch):
    like = torch.empty(1)
    emu.selftest_launch(like, 32, 1, 1, 48 * 1024, False)
    with pytest.raises(RuntimeError, match="SK_SET_MAX_DYNAMIC_SMEM"):
        emu.selftest_launch(like, 32, 1, 1, 60000, False)
    emu.selftest_launch(like, 32, 1, 1, 60000, True)
    with pytest.raises(RuntimeError, match="sm_80"):
        emu.selftest_launch(like, 32, 1, 1, 200000, True)
    monkeypatch.setenv("SEQKERNELS_EMU_ARCH", "90")
    emu.selftest_launch(like, 32, 1, 1, 200000, True)
    with pytest.raises(RuntimeError, match="sm_90"):
        emu.selftest_launch(like, 32, 1, 1, 227 * 1024 + 1, True)


@pytest.mark.parametrize("arch,want", [("80", (80, 108, 163 * 1024)), ("90", (90, 132, 227 * 1024))])
def test_device_properties(emu, monkeypatch, arch, want):
    monkeypatch.setenv("SEQKERNELS_EMU_ARCH", arch)
    assert tuple(emu.selftest_device_info(torch.empty(1), i) for i in range(3)) == want


# ----------------------------------------------------------------------------------------------
# Misuse is reported, quickly
# ----------------------------------------------------------------------------------------------
MISUSE = [
    (0, r"(?s)__syncthreads in divergent code"),
    (1, r"(?s)__syncthreads in divergent code.*reaches the barrier at .*selftest_kernels.cu:\d+ while others wait"),
    (2, r"(?s)lane 5 .*(exited while lanes of mask 0xffffffff wait|has already exited)"),
    (3, r"(?s)deadlock.*__syncwarp\(mask=0xffffffff\).*selftest_kernels.cu"),
    (4, r"(?s)mask 0x00000002 that does not include itself"),
    (5, r"(?s)width 12 is not a power of two"),
    (6, r"(?s)__trap\(\) at .*selftest_kernels.cu"),
    (7, r"(?s)mma_m16n8k16"),
    (8, r"(?s)ldmatrix.*not 16-byte aligned.*selftest_kernels.cu"),
]


@pytest.mark.parametrize("which,pattern", MISUSE, ids=[str(w) for w, _ in MISUSE])
def test_misuse_is_an_error_not_a_hang(emu, which, pattern):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=pattern) as info:
        emu.selftest_misuse(torch.empty(1), which)
    assert time.monotonic() - start < 10
    assert "_misuse_kernel" in str(info.value)
    # The harness is usable again after a failed launch.
    assert emu.selftest_vote(torch.ones(32, dtype=torch.int32), torch.ones(32, dtype=torch.int32), -1)[0, 1] == 1


def _spin_forever(emu):
    emu.selftest_misuse(__import__("torch").empty(1), 9)


def test_watchdog_ends_a_kernel_that_never_returns():
    start = time.monotonic()
    res = run_selftest_subprocess(_spin_forever, env={"SEQKERNELS_EMU_TIMEOUT": "2"}, timeout=300)
    assert res.returncode != 0
    assert "no progress for 2 s" in res.output and "aborting the process" in res.output, res.output[-3000:]
    assert "thread 0: running" in res.output
    assert time.monotonic() - start < 290

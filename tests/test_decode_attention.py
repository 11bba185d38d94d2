"""decode_attention on every backend (reference, cpu, triton under the interpreter, cuda through the
CUDA-on-CPU harness, cuda on a GPU) against the float64 reference with the DESIGN §5 rule: contiguous
and paged caches (permuted block tables), GQA/MQA, Tq > 1 and prefill chunks, windows, split counts,
garbage/NaN in unused slots, NaN propagation, validation, opcheck and the split heuristic."""

import math

import pytest
import torch
from conftest import HAS_CUDA
from decode_cases import make_kv_cache

import seqkernels
from seqkernels import backends, reference, testing
from seqkernels.ops import kv_cache as kv_ops

BACKENDS = ["reference", "cpu", "triton", "cuda_emu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SOURCES = ["csrc/cuda/kv_cache.cu"]


@pytest.fixture(scope="module")
def emu():
    from emulation import load_emulated

    return load_emulated("kv_cache", SOURCES)


def make_cache(
    B, Hq, Hkv, Tq, D, Dv, S, dtype, device="cpu", *, paged=False, block_size=8, lens=None, garbage=float("nan")
):
    """q, k_cache, v_cache, cache_seqlens, block_table. Lengths are random in [Tq, S] (always including
    Tq and S when B > 1); a paged cache gets a random permutation of blocks and -1 in table entries past
    a sequence's length; every slot at or past a sequence's length holds `garbage`."""
    q = torch.randn(B, Hq, Tq, D, dtype=dtype, device=device)
    if lens is None:
        lens = torch.randint(Tq, S + 1, (B,))
        lens[0] = S
        if B > 1:
            lens[1] = Tq
    kc, vc, lens, table = make_kv_cache(
        lens, Hkv, D, Dv, S, dtype, paged=paged, block_size=block_size, garbage=garbage, device=device
    )
    return q, kc, vc, lens, table


def _device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def run_decode(backend, q, kc, vc, lens, bt, *, window=None, num_splits=None, emu=None):
    if backend == "cuda_emu":
        c = kv_ops.prepare_decode(q, kc, vc, lens, block_table=bt, window=window, num_splits=num_splits)
        return emu.decode_attention(*c.args())
    c = kv_ops.prepare_decode(q, kc, vc, lens, block_table=bt, window=window, num_splits=num_splits)
    reason = backends.why_not(kv_ops.DECODE_OP, backend, c.device, c)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    return seqkernels.decode_attention(
        q, kc, vc, lens, block_table=bt, window=window, num_splits=num_splits, return_lse=True, backend=backend
    )


def ref_decode(q, kc, vc, lens, bt, window, dtype=torch.float64):
    left = -1 if window is None else (window if isinstance(window, int) else window[0])

    def cast(t):
        return t.cpu().to(dtype)

    return reference.decode_attention_ref(
        cast(q),
        cast(kc),
        cast(vc),
        lens.cpu(),
        block_table=None if bt is None else bt.cpu(),
        window_left=left,
        window_right=0,
    )


def check(out_lse, q, kc, vc, lens, bt, window=None):
    out, lse = out_lse
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], vc.shape[-1])
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32) and lse.shape == q.shape[:3]
    ref = ref_decode(q, kc, vc, lens, bt, window)
    base = ref_decode(q, kc, vc, lens, bt, window, dtype=q.dtype)
    report = testing.compare((out.cpu(), lse.cpu()), ref, base)
    assert report.passed, str(report)


# (B, Hq, Hkv, Tq, D, Dv, S, paged, window, num_splits)
CASES = [
    (2, 2, 2, 1, 64, 64, 97, False, None, 1),
    (3, 8, 2, 1, 128, 128, 57, True, None, 3),
    (2, 4, 1, 3, 40, 24, 60, False, 5, 2),
    (1, 2, 1, 17, 80, 80, 40, True, None, None),
    (2, 3, 3, 1, 17, 33, 23, True, None, 7),
    (2, 2, 2, 2, 256, 256, 19, False, (0, 0), 1),
]


def _case_id(c):
    B, Hq, Hkv, Tq, D, Dv, S, paged, window, splits = c
    return f"B{B}H{Hq}-{Hkv}T{Tq}D{D}-{Dv}S{S}{'-paged' if paged else ''}-w{window}-s{splits}"


def _parity_params():
    """Every case and dtype on the cheap backends; the interpreted/emulated ones (seconds per call) run
    float16 on the first two cases only, since it shares every code path with bfloat16 but the loads."""
    out = []
    for backend in BACKENDS:
        for dtype in DTYPES:
            for i, case in enumerate(CASES):
                if backend in ("triton", "cuda_emu") and dtype == torch.float16 and i >= 2:
                    continue
                out.append(pytest.param(backend, dtype, case, id=f"{backend}-{str(dtype)[6:]}-{_case_id(case)}"))
    return out


@pytest.mark.parametrize("backend, dtype, case", _parity_params())
def test_decode_parity(backend, dtype, case, request):
    B, Hq, Hkv, Tq, D, Dv, S, paged, window, splits = case
    emu = request.getfixturevalue("emu") if backend == "cuda_emu" else None
    q, kc, vc, lens, bt = make_cache(B, Hq, Hkv, Tq, D, Dv, S, dtype, _device_for(backend), paged=paged)
    res = run_decode(backend, q, kc, vc, lens, bt, window=window, num_splits=splits, emu=emu)
    check(res, q, kc, vc, lens, bt, window)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda_emu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_prefill_chunk(backend, paged, request):
    """A chunk of many queries (a prefill continued against an existing cache), causal within it."""
    emu = request.getfixturevalue("emu") if backend == "cuda_emu" else None
    Tq, S = (97, 257) if backend == "cpu" else (12, 30)
    q, kc, vc, lens, bt = make_cache(
        1, 4, 2, Tq, 32, 32, S, torch.float32, _device_for(backend), paged=paged, lens=[S - 3]
    )
    res = run_decode(backend, q, kc, vc, lens, bt, num_splits=2, emu=emu)
    check(res, q, kc, vc, lens, bt)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda_emu"])
def test_split_counts_agree(backend, request):
    """Every split count gives the same result; with 17 splits the second sequence (2 keys) leaves most
    of its splits empty."""
    emu = request.getfixturevalue("emu") if backend == "cuda_emu" else None
    q, kc, vc, lens, bt = make_cache(2, 4, 2, 2, 32, 32, 50, torch.float32, paged=True)
    one = run_decode(backend, q, kc, vc, lens, bt, num_splits=1, emu=emu)
    for splits in (2, 17):
        res = run_decode(backend, q, kc, vc, lens, bt, num_splits=splits, emu=emu)
        check(res, q, kc, vc, lens, bt)
        torch.testing.assert_close(res[0], one[0], atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(res[1], one[1], atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda_emu"])
def test_unused_slots_never_leak(backend, request):
    """Replacing whatever lies at or past each length (and in unallocated blocks) changes nothing."""
    emu = request.getfixturevalue("emu") if backend == "cuda_emu" else None
    for paged in (False, True):
        torch.manual_seed(3)
        a = make_cache(3, 4, 2, 2, 24, 24, 21, torch.float32, paged=paged, garbage=float("nan"))
        torch.manual_seed(3)
        b = make_cache(3, 4, 2, 2, 24, 24, 21, torch.float32, paged=paged, garbage=float("inf"))
        ra = run_decode(backend, *a, num_splits=3, emu=emu)
        rb = run_decode(backend, *b, num_splits=3, emu=emu)
        assert torch.isfinite(ra[0]).all() and torch.isfinite(ra[1]).all()
        assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda_emu"])
def test_nan_in_visible_key_propagates(backend, request):
    emu = request.getfixturevalue("emu") if backend == "cuda_emu" else None
    q, kc, vc, lens, bt = make_cache(2, 2, 1, 1, 16, 16, 20, torch.float32, lens=[20, 11])
    kc[1, 0, 4, 3] = float("nan")
    res = run_decode(backend, q, kc, vc, lens, bt, num_splits=2, emu=emu)
    assert torch.isnan(res[0][1]).all() and torch.isnan(res[1][1]).all()
    assert torch.isfinite(res[0][0]).all()
    check(res, q, kc, vc, lens, bt)


def test_float64_cpu_and_portable_path(monkeypatch):
    q, kc, vc, lens, bt = make_cache(2, 4, 2, 3, 40, 40, 70, torch.float64, paged=True)
    out, lse = seqkernels.decode_attention(
        q, kc, vc, lens, block_table=bt, num_splits=2, return_lse=True, backend="cpu"
    )
    ref_out, ref_lse = ref_decode(q, kc, vc, lens, bt, None)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    # The at::vec path (CPUs without AVX2) gives the same results within the rule.
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", "default")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, kc, vc, lens, bt = make_cache(2, 4, 2, 3, 40, 24, 70, dtype, paged=False)
        check(run_decode("cpu", q, kc, vc, lens, bt, window=9, num_splits=2), q, kc, vc, lens, bt, window=9)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda_emu"])
def test_op_rows_that_see_nothing(backend, request):
    """Called directly, the op accepts lengths below Tq: queries at negative positions see no key, so
    their output is 0 and their lse -inf (never NaN)."""
    q, kc, vc, _, _ = make_cache(2, 2, 2, 4, 16, 16, 12, torch.float32)
    lens = torch.tensor([2, 0], dtype=torch.int32)
    args = (q, kc, vc, lens, None, 0.25, -1, 0, 2)
    if backend == "cuda_emu":
        out, lse = request.getfixturevalue("emu").decode_attention(*args)
    elif backend == "cpu":
        out, lse = torch.ops.seqkernels.decode_attention(*args)
    else:
        out, lse = torch.ops.seqkernels.triton_decode_attention(*args)
    ref_out, ref_lse = reference.decode_attention_ref(q.double(), kc.double(), vc.double(), lens, scale=0.25)
    assert not out.isnan().any()
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all() and (lse[0, :, :2] == float("-inf")).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["cpp", "triton"])
def test_opcheck(op):
    q, kc, vc, lens, bt = make_cache(2, 4, 2, 2, 16, 16, 20, torch.float32, paged=True)
    c = kv_ops.prepare_decode(q, kc, vc, lens, block_table=bt, num_splits=2)
    fn = torch.ops.seqkernels.decode_attention if op == "cpp" else torch.ops.seqkernels.triton_decode_attention
    torch.library.opcheck(fn.default, c.args())


def test_return_lse_and_explain():
    q, kc, vc, lens, bt = make_cache(1, 2, 2, 1, 16, 16, 9, torch.float32)
    out = seqkernels.decode_attention(q, kc, vc, lens)
    out2, lse = seqkernels.decode_attention(q, kc, vc, lens, return_lse=True)
    assert torch.equal(out, out2) and lse.shape == (1, 2, 1)
    ex = seqkernels.explain("decode_attention", q, kc, vc, lens)
    assert ex.chosen == "cpu", str(ex)
    q.requires_grad_(True)
    ex = seqkernels.explain("decode_attention", q, kc, vc, lens)
    assert ex.chosen == "reference" and "gradients" in ex.reasons["cpu"]
    with pytest.raises(seqkernels.BackendError, match="gradients"):
        seqkernels.decode_attention(q, kc, vc, lens, backend="cpu")
    out = seqkernels.decode_attention(q, kc, vc, lens)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def _bad(mutate):
    q, kc, vc, lens, bt = make_cache(2, 4, 2, 2, 16, 16, 24, torch.float32, paged=True, block_size=8, garbage=0.5)
    kw = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens, block_table=bt)
    mutate(kw)
    return kw


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda kw: kw.update(q=kw["q"].half()), TypeError, "k_cache.*dtype"),
        (lambda kw: kw.update(q=kw["q"][:, :3]), ValueError, "multiple of the number of key/value heads"),
        (lambda kw: kw.update(q=kw["q"][..., :8]), ValueError, "head dim"),
        (lambda kw: kw.update(q=kw["q"][:, :, :0]), ValueError, "Tq >= 1"),
        (lambda kw: kw.update(cache_seqlens=torch.tensor([24, 1], dtype=torch.int32)), ValueError, "sequence 1.*Tq=2"),
        (lambda kw: kw.update(cache_seqlens=torch.tensor([25, 3], dtype=torch.int32)), ValueError, "sequence 0"),
        (lambda kw: kw["block_table"].__setitem__((1, 0), 1000), ValueError, "sequence 1.*block id 1000"),
        (lambda kw: kw.update(block_table=kw["block_table"].float()), TypeError, "block_table"),
        (lambda kw: kw.update(cache_seqlens=kw["cache_seqlens"][:1]), ValueError, "cache_seqlens"),
        (lambda kw: kw.update(num_splits=0), ValueError, "num_splits"),
        (lambda kw: kw.update(window=(1, 2, 3)), ValueError, "window"),
        (lambda kw: kw.update(window=-2), ValueError, "window"),
    ],
)
def test_bad_inputs_are_named(mutate, exc, match):
    kw = _bad(mutate)
    with pytest.raises(exc, match=match):
        seqkernels.decode_attention(kw.pop("q"), kw.pop("k_cache"), kw.pop("v_cache"), kw.pop("cache_seqlens"), **kw)


def test_int64_indices_are_accepted():
    q, kc, vc, lens, bt = make_cache(2, 2, 2, 1, 16, 16, 24, torch.float32, paged=True)
    a = seqkernels.decode_attention(q, kc, vc, lens, block_table=bt, backend="cpu")
    b = seqkernels.decode_attention(q, kc, vc, lens.long(), block_table=bt.long(), backend="cpu")
    assert torch.equal(a, b)


def test_split_heuristic():
    choose = kv_ops.choose_num_splits
    assert choose(units=64, length=100000, parallelism=32, min_keys=256) == 1  # the machine is full already
    assert choose(units=4, length=200, parallelism=32, min_keys=256) == 1  # too short to split
    s = choose(units=4, length=100000, parallelism=32, min_keys=256)
    assert s == 8  # 4 units x 8 splits fill 32 workers exactly
    assert choose(units=3, length=1024, parallelism=132, min_keys=256) <= 1024 // 256
    # The public layer resolves it from the inputs: many CPU threads and one long sequence split.
    q, kc, vc, lens, _ = make_cache(1, 1, 1, 1, 16, 16, 4096, torch.float32, lens=[4096])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert kv_ops.prepare_decode(q, kc, vc, lens).num_splits == 4
        assert kv_ops.prepare_decode(q, kc, vc, lens, num_splits=3).num_splits == 3
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Score modifiers on the CUDA decode kernels (through the CUDA-on-CPU harness): softcap, ALiBi and
# sinks against the float64 reference, one split and several (the sink joins a row once, after the
# splits are merged), contiguous and paged caches, Tq = 1 and > 1.


def _decode_mods(B, Hq, *, softcap=0.0, alibi=False, sinks=None):
    """(softcap or None, alibi_slopes (B, Hq) float32 or None, sinks (Hq,) float32 or None)."""
    slopes = torch.rand(B, Hq) * 0.3 + 0.02 if alibi else None
    if sinks == "random":
        sinks = torch.randn(Hq) * 2
    elif sinks is not None:
        sinks = torch.tensor(sinks, dtype=torch.float32)
    return (float(softcap) or None), slopes, sinks  # prepare_decode: None = no softcap


def ref_decode_mods(q, kc, vc, lens, bt, window, mods, dtype=torch.float64):
    softcap, slopes, sinks = mods
    left = -1 if window is None else window
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def cast(t):
        return None if t is None else t.cpu().to(dtype)

    return reference.decode_attention_ref(
        cast(q),
        cast(kc),
        cast(vc),
        lens.cpu(),
        block_table=None if bt is None else bt.cpu(),
        window_left=left,
        window_right=0,
        softcap=softcap,
        alibi_slopes=None if slopes is None else slopes.to(acc),
        sinks=None if sinks is None else sinks.to(acc),
    )


def run_decode_mods(emu, q, kc, vc, lens, bt, window, splits, mods):
    softcap, slopes, sinks = mods
    c = kv_ops.prepare_decode(
        q,
        kc,
        vc,
        lens,
        block_table=bt,
        window=window,
        num_splits=splits,
        softcap=softcap,
        alibi_slopes=slopes,
        sinks=sinks,
    )
    return emu.decode_attention(*c.args())


ALL_MODS = {"softcap": 2.0, "alibi": True, "sinks": "random"}
# (B, Hq, Hkv, Tq, D, Dv, S, paged, window, num_splits, dtype, modifiers)
MOD_CASES = [
    (2, 4, 2, 1, 64, 64, 57, False, None, 1, torch.float16, ALL_MODS),
    (2, 4, 2, 1, 64, 64, 57, True, None, 3, torch.bfloat16, ALL_MODS),
    (2, 4, 1, 3, 40, 24, 60, False, 5, 2, torch.float32, ALL_MODS),
    (2, 4, 1, 3, 40, 24, 60, True, 5, 1, torch.float32, ALL_MODS),
    (1, 2, 1, 9, 80, 80, 40, True, None, 4, torch.float32, {"sinks": "random"}),
    (3, 8, 2, 1, 128, 128, 33, True, None, 7, torch.bfloat16, {"softcap": 1.5}),
    (2, 2, 2, 2, 256, 256, 19, False, None, 1, torch.float16, {"alibi": True}),
    (2, 4, 2, 9, 32, 32, 30, True, 3, 2, torch.float32, {"softcap": 3.0, "alibi": True, "sinks": [0.5, -math.inf] * 2}),
]


def _mod_case_id(c):
    B, Hq, Hkv, Tq, D, Dv, S, paged, window, splits, dtype, mods = c
    return (
        f"B{B}H{Hq}-{Hkv}T{Tq}D{D}-{Dv}S{S}{'-paged' if paged else ''}-w{window}-s{splits}-{str(dtype)[6:]}-"
        + "+".join(sorted(mods))
    )


@pytest.mark.emulation
@pytest.mark.parametrize("case", MOD_CASES, ids=[_mod_case_id(c) for c in MOD_CASES])
def test_cuda_decode_modifiers_emulated(emu, case):
    B, Hq, Hkv, Tq, D, Dv, S, paged, window, splits, dtype, mod_kw = case
    torch.manual_seed(B * 100 + Tq * 10 + splits)
    q, kc, vc, lens, bt = make_cache(B, Hq, Hkv, Tq, D, Dv, S, dtype, paged=paged)
    mods = _decode_mods(B, Hq, **mod_kw)
    out, lse = run_decode_mods(emu, q, kc, vc, lens, bt, window, splits, mods)
    ref = ref_decode_mods(q, kc, vc, lens, bt, window, mods)
    base = ref_decode_mods(q, kc, vc, lens, bt, window, mods, dtype=dtype)
    report = testing.compare((out, lse), ref, base)
    assert report.passed, str(report)


@pytest.mark.emulation
def test_cuda_decode_modifiers_split_counts_agree(emu):
    """The sink is merged once whatever the split count (17 splits leave some empty)."""
    torch.manual_seed(1)
    q, kc, vc, lens, bt = make_cache(2, 4, 2, 2, 32, 32, 50, torch.float32, paged=True)
    mods = _decode_mods(2, 4, softcap=2.0, alibi=True, sinks="random")
    one = run_decode_mods(emu, q, kc, vc, lens, bt, None, 1, mods)
    ref = ref_decode_mods(q, kc, vc, lens, bt, None, mods)
    base = ref_decode_mods(q, kc, vc, lens, bt, None, mods, dtype=torch.float32)
    for splits in (2, 17):
        res = run_decode_mods(emu, q, kc, vc, lens, bt, None, splits, mods)
        report = testing.compare(res, ref, base)
        assert report.passed, str(report)
        torch.testing.assert_close(res[0], one[0], atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(res[1], one[1], atol=2e-6, rtol=2e-6)


@pytest.mark.emulation
@pytest.mark.parametrize("splits", [1, 3])
def test_cuda_decode_modifiers_rows_that_see_nothing(emu, splits):
    """Queries at negative positions (lengths below Tq, the op called directly) see no key: out 0 and
    lse = the sink (finite), or -inf (a -inf sink)."""
    q, kc, vc, _, _ = make_cache(2, 2, 2, 4, 16, 16, 12, torch.float32)
    lens = torch.tensor([2, 0], dtype=torch.int32)
    sinks = torch.tensor([0.75, -math.inf])
    slopes = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    out, lse = emu.decode_attention(q, kc, vc, lens, None, 0.25, -1, 0, splits, slopes, sinks, 2.0)
    ref_out, ref_lse = reference.decode_attention_ref(
        q.double(),
        kc.double(),
        vc.double(),
        lens,
        scale=0.25,
        softcap=2.0,
        alibi_slopes=slopes.double(),
        sinks=sinks.double(),
    )
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[1] == 0).all() and (lse[1, 0] == 0.75).all() and (lse[1, 1] == -math.inf).all()
    assert (lse[0, 0, :2] == 0.75).all() and (lse[0, 1, :2] == -math.inf).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def _sanitized_case_mods(emu):
    torch.manual_seed(0)
    for paged, splits in ((False, 1), (True, 3)):
        q, kc, vc, lens, bt = make_cache(2, 4, 2, 2, 40, 24, 19, torch.bfloat16, paged=paged, block_size=4)
        mods = _decode_mods(2, 4, softcap=2.0, alibi=True, sinks="random")
        out, _ = run_decode_mods(emu, q, kc, vc, lens, bt, None, splits, mods)
        ref_out, _ = ref_decode_mods(q, kc, vc, lens, bt, None, mods)
        assert (out.double() - ref_out).abs().max() < 3e-2


@pytest.mark.emulation
@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_cuda_decode_modifiers_sanitized(sanitizer):
    from emulation import run_sanitized

    run_sanitized(sanitizer, "kv_cache", SOURCES, _sanitized_case_mods).assert_clean()


def _sanitized_case(emu):
    torch.manual_seed(0)
    for paged, splits in ((False, 1), (True, 3)):
        q, kc, vc, lens, bt = make_cache(2, 4, 2, 2, 40, 24, 19, torch.bfloat16, paged=paged, block_size=4)
        c = kv_ops.prepare_decode(q, kc, vc, lens, block_table=bt, num_splits=splits)
        out, lse = emu.decode_attention(*c.args())
        ref_out, _ = ref_decode(q, kc, vc, lens, bt, None)
        assert (out.double() - ref_out).abs().max() < 3e-2
        kn, vn = torch.randn(2, 2, 3, 40, dtype=torch.bfloat16), torch.randn(2, 2, 3, 24, dtype=torch.bfloat16)
        start = (lens - 3).clamp(min=0)
        emu.kv_cache_append(kc, vc, kn, vn, start, bt)


@pytest.mark.emulation
@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_cuda_kernels_sanitized(sanitizer):
    from emulation import run_sanitized

    run_sanitized(sanitizer, "kv_cache", SOURCES, _sanitized_case).assert_clean()


@pytest.mark.cuda
def test_cuda_matches_cpu_on_gpu():
    q, kc, vc, lens, bt = make_cache(4, 16, 4, 1, 128, 128, 1000, torch.bfloat16, paged=True, block_size=16)
    dev = [t.cuda() if t is not None else None for t in (q, kc, vc, lens, bt)]
    for splits in (None, 1, 8):
        res = seqkernels.decode_attention(
            *dev[:4], block_table=dev[4], num_splits=splits, return_lse=True, backend="cuda"
        )
        check(tuple(t.cpu() for t in res), q, kc, vc, lens, bt)


def test_scale_is_applied():
    q, kc, vc, lens, bt = make_cache(1, 2, 2, 1, 16, 16, 10, torch.float32)
    out, lse = seqkernels.decode_attention(q, kc, vc, lens, scale=0.1, return_lse=True, backend="cpu")
    ref_out, ref_lse = reference.decode_attention_ref(q.double(), kc.double(), vc.double(), lens, scale=0.1)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, seqkernels.decode_attention(q, kc, vc, lens, backend="cpu"))
    assert math.isfinite(float(lse.max()))


# ------------------------------------------------------------------------------------------------
# Issue 15 (CPU backend): large but finite scores, the split merge, and the rescale across key tiles,
# on both of kv_cache.cpp's paths (SEQKERNELS_CPU_ISA=default forces its at::vec path).

CPU_ISAS = ["native", "default"]


def _set_cpu_isa(monkeypatch, isa):
    if isa == "default":
        monkeypatch.setenv("SEQKERNELS_CPU_ISA", "default")
    else:
        monkeypatch.delenv("SEQKERNELS_CPU_ISA", raising=False)


def _sdpa_decode_witness(q, kc, vc, lens, scale):
    """torch's math SDPA (float32, float64 for float64 inputs) on a contiguous cache, causal at the
    bottom right of each sequence."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    wt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Tq, _ = q.shape
    g = Hq // kc.shape[1]
    outs = []
    for b in range(B):
        n = int(lens[b])
        k, v = (t[b : b + 1, :, :n].to(wt).repeat_interleave(g, dim=1) for t in (kc, vc))
        pos = torch.arange(Tq) + n - Tq
        vis = torch.arange(n).view(1, n) <= pos.view(Tq, 1)
        with sdpa_kernel(SDPBackend.MATH):
            outs.append(
                torch.nn.functional.scaled_dot_product_attention(q[b : b + 1].to(wt), k, v, attn_mask=vis, scale=scale)
            )
    return torch.cat(outs)


def _huge_decode_inputs(dtype, mag, B=2, Hq=4, Hkv=2, Tq=2, D=4, Dv=16, S=150, lens=(150, 97)):
    """q.k * scale = mag * sign * c_j exactly (see test_attention_cpu._huge_score_inputs): q rows
    A * sign * (1, 1, 0, 0), cache keys (A c_j / 2, A c_j / 2, A r_j), c_j cycling through 1, 7/8,
    3/4, 1/2, so every row's max is tied between several keys (a different number in each of 3
    splits) and the output is the mean of v over them. Slots past a sequence's length hold NaN."""
    A = 128.0 if dtype == torch.float16 else 2.0 ** math.floor(math.log2(mag) / 2)
    sign = torch.tensor([1.0, -1.0] * (Hq // 2), dtype=torch.float64).view(1, Hq, 1, 1)
    q = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    q[..., :2] = A * sign
    c = torch.tensor([1.0, 0.875, 0.75, 0.5], dtype=torch.float64).repeat(S // 4 + 1)[:S]
    kc = torch.empty(B, Hkv, S, D, dtype=torch.float64)
    kc[..., :2] = (A * c / 2).view(S, 1)
    kc[..., 2:] = A * (torch.rand(B, Hkv, S, D - 2, dtype=torch.float64) * 2 - 1)
    vc = torch.randn(B, Hkv, S, Dv, dtype=torch.float64)
    lens = torch.tensor(lens, dtype=torch.int32)
    for b in range(B):
        kc[b, :, int(lens[b]) :] = float("nan")
        vc[b, :, int(lens[b]) :] = float("nan")
    return q.to(dtype), kc.to(dtype), vc.to(dtype), lens, mag / (A * A)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=lambda d: str(d).replace("torch.", ""))
def test_cpu_decode_huge_finite_scores(dtype, splits, isa, monkeypatch):
    # Scores of +-1e9, 1e20, 1e38, 3e38 (1.5e308 in float64): never NaN / inf / 0; the reference's out
    # and lse within the parity rule, and the mean of v over the tied keys as torch's SDPA gives.
    _set_cpu_isa(monkeypatch, isa)
    for mag in [1e9, 1e20, 1e38, 3e38] + ([1e300, 1.5e308] if dtype == torch.float64 else []):
        q, kc, vc, lens, scale = _huge_decode_inputs(dtype, mag)
        out, lse = seqkernels.decode_attention(
            q, kc, vc, lens, scale=scale, num_splits=splits, return_lse=True, backend="cpu"
        )
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), mag
        ref = reference.decode_attention_ref(q.double(), kc.double(), vc.double(), lens, scale=scale)
        base = reference.decode_attention_ref(q, kc, vc, lens, scale=scale)
        report = testing.compare((out, lse), ref, base)
        assert report.passed, f"mag={mag}\n{report}"
        wit = _sdpa_decode_witness(q, kc, vc, lens, scale)
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-9}[dtype]
        torch.testing.assert_close(out.double(), wit.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("splits", [1, 3])
def test_cpu_decode_issue_repro(splits, isa, monkeypatch):
    # q of 1e5s against a cache of 1e5s: every score is 1e10 / sqrt(D), the output the mean of v.
    _set_cpu_isa(monkeypatch, isa)
    q = torch.full((1, 2, 1, 4), 1e5)
    kc = torch.full((1, 1, 20, 4), 1e5)
    vc = torch.randn(1, 1, 20, 4)
    lens = torch.tensor([20], dtype=torch.int32)
    out, lse = seqkernels.decode_attention(q, kc, vc, lens, num_splits=splits, return_lse=True, backend="cpu")
    ref_out, ref_lse = seqkernels.decode_attention(q, kc, vc, lens, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(out[0, :, 0], vc[0, 0].mean(0).expand(2, -1))
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_decode_split_merge_nan_and_empty(isa, monkeypatch):
    # A NaN score in a split whose sibling splits see no key (one key, three splits) still makes the
    # row NaN, as in the reference, and a row that no split sees stays 0 / -inf.
    _set_cpu_isa(monkeypatch, isa)
    q, kc, vc, lens, bt = make_cache(2, 2, 1, 1, 16, 16, 20, torch.float32, lens=[20, 1])
    kc[1, 0, 0, 3] = float("nan")
    args = (q, kc, vc, lens, None, 0.25, -1, 0, 3)
    out, lse = torch.ops.seqkernels.decode_attention(*args)
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()
    lens0 = torch.tensor([20, 0], dtype=torch.int32)
    out, lse = torch.ops.seqkernels.decode_attention(q, kc, vc, lens0, None, 0.25, -1, 0, 3)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()


@pytest.mark.parametrize(
    "dtype, isa",
    [(torch.float64, "native"), (torch.float32, "default"), (torch.bfloat16, "default"), (torch.float32, "native")],
    ids=["float64", "float32-default", "bfloat16-default", "float32-native"],
)
def test_cpu_decode_rescale_across_key_tiles(dtype, isa, monkeypatch):
    # 250 keys (4 tiles of 64) with scores rising along them, one split: the running max grows in
    # every tile, so each tile must rescale what the earlier ones accumulated (on the at::vec path
    # as on the AVX2 one).
    _set_cpu_isa(monkeypatch, isa)
    B, Hq, Hkv, Tq, D, Dv, S = 1, 2, 1, 1, 16, 16, 250
    w = torch.randn(D, dtype=torch.float64)
    w = w / w.norm()
    ramp = torch.linspace(0.0, 12.0, S, dtype=torch.float64)
    q = (w * math.sqrt(D) + 0.05 * torch.randn(B, Hq, Tq, D, dtype=torch.float64)).to(dtype)
    kc = (ramp.view(1, 1, S, 1) * w + 0.1 * torch.randn(B, Hkv, S, D, dtype=torch.float64)).to(dtype)
    vc = torch.randn(B, Hkv, S, Dv, dtype=torch.float64).to(dtype)
    lens = torch.tensor([S], dtype=torch.int32)
    res = seqkernels.decode_attention(q, kc, vc, lens, num_splits=1, return_lse=True, backend="cpu")
    assert float(res[1].min()) > 9.0  # the max really sits in the last tile
    if dtype == torch.float64:
        ref_out, ref_lse = ref_decode(q, kc, vc, lens, None, None)
        torch.testing.assert_close(res[0], ref_out)
        torch.testing.assert_close(res[1], ref_lse)
    check(res, q, kc, vc, lens, None)


# ------------------------------------------------------------------------------------------------
# Triton: score modifiers (softcap, ALiBi, sinks) against decode_attention_ref
# ------------------------------------------------------------------------------------------------

# (B, Hq, Hkv, Tq, D, Dv, S, paged, window_left, num_splits, softcap, alibi, sinks, lens)
_TRITON_MOD_CASES = [
    (2, 4, 2, 1, 16, 16, 40, False, -1, 1, 1.5, True, "rand", None),
    (2, 4, 2, 1, 16, 16, 40, True, -1, 3, 1.5, True, "rand", None),
    (2, 4, 1, 3, 32, 24, 37, True, 5, 2, 0.0, True, "rand", None),
    # A sequence of length 0 (Tq = 1 sees nothing: output 0, lse = the sink), split and not.
    (3, 4, 2, 1, 16, 16, 33, False, -1, 4, 2.0, False, "rand", (33, 0, 20)),
    (3, 4, 2, 1, 16, 16, 33, True, -1, 1, 2.0, True, "rand", (33, 0, 20)),
    (2, 2, 2, 2, 16, 16, 23, True, -1, 2, 0.0, False, "rand", None),
    (2, 2, 1, 1, 16, 16, 30, False, -1, 1, 1.0, False, None, None),
    (2, 4, 4, 2, 16, 16, 30, True, 7, 3, 0.0, True, None, None),
    # -inf sinks are no sinks, also through the split merge.
    (2, 2, 1, 1, 16, 16, 30, True, -1, 2, 1.0, True, "neginf", None),
]


def _triton_mod_params():
    out = []
    for i, case in enumerate(_TRITON_MOD_CASES):
        for dtype in DTYPES if i < 2 else [torch.float32, torch.bfloat16]:
            B, Hq, Hkv, Tq, D, Dv, S, paged, wl, splits, cap, alibi, sinks, lens = case
            cid = f"B{B}H{Hq}-{Hkv}T{Tq}D{D}-{Dv}S{S}{'-paged' if paged else ''}-w{wl}-s{splits}-cap{cap}"
            cid += f"{'-alibi' if alibi else ''}-sinks{sinks}-len{lens}-{str(dtype)[6:]}"
            out.append(pytest.param(dtype, case, id=cid))
    return out


@pytest.mark.parametrize("dtype, case", _triton_mod_params())
def test_triton_decode_modifiers(dtype, case):
    pytest.importorskip("triton")
    from seqkernels.triton_kernels import kv_cache as tkv

    B, Hq, Hkv, Tq, D, Dv, S, paged, wl, splits, cap, alibi, sinks, lens = case
    device = _device_for("triton")
    if device == "cpu" and not tkv.INTERPRET:
        pytest.skip("Triton on CPU tensors needs the interpreter")
    torch.manual_seed(7)
    q, kc, vc, cache_lens, bt = make_cache(B, Hq, Hkv, Tq, D, Dv, S, dtype, device, paged=paged, lens=lens)
    slopes = torch.rand(B, Hq) * 0.5 if alibi else None
    sink = None
    if sinks == "rand":
        sink = torch.randn(Hq) * 2.0
        sink[-1] = float("-inf")
    elif sinks == "neginf":
        sink = torch.full((Hq,), float("-inf"))
    scale = 0.6
    out, lse = tkv.decode_attention(
        q,
        kc,
        vc,
        cache_lens,
        bt,
        scale,
        wl,
        0,
        splits,
        None if slopes is None else slopes.to(device),
        None if sink is None else sink.to(device),
        cap,
    )

    def ref(dt):
        def cast(t):
            return t.cpu().to(dt)

        wide = torch.float64 if dt == torch.float64 else torch.float32
        return reference.decode_attention_ref(
            cast(q),
            cast(kc),
            cast(vc),
            cache_lens.cpu(),
            block_table=None if bt is None else bt.cpu(),
            scale=scale,
            window_left=wl,
            window_right=0,
            softcap=cap or None,
            alibi_slopes=None if slopes is None else slopes.to(wide),
            sinks=None if sink is None else sink.to(wide),
        )

    report = testing.compare((out.cpu(), lse.cpu()), ref(torch.float64), ref(dtype))
    assert report.passed, str(report)

"""The CUDA attention kernels (csrc/cuda/attention.cu) against the float64 reference (DESIGN §5).

The same cases run twice: through the CUDA-on-CPU harness (`emulation` marker: the .cu launcher
and kernels compiled as C++ and run on CPU tensors, so CI executes the real fragment indexing,
masking and pipelining code), and on a GPU through torch.ops.seqkernels (`cuda` marker, skipped
without one). Emulated shapes are small; every head-dim tile (64, 128, 256), both dtypes, both
forward variants (plain, and attn_mask / dropout) and both dQ paths are covered.
"""

import math

import pytest
import torch

from seqkernels.reference import attention_bwd_ref, attention_ref
from seqkernels.testing import compare

SOURCES = ["csrc/cuda/attention.cu"]
ARG_NAMES = (
    "attn_mask",
    "kv_lengths",
    "scale",
    "window_left",
    "window_right",
    "bottom_right",
    "dropout_p",
    "seed",
    "offset",
)


def _normalized(q, k, **kw):
    """The op's positional arguments (docs/INTERNALS.md) with defaults filled in."""
    args = dict(
        attn_mask=None,
        kv_lengths=None,
        scale=q.shape[-1] ** -0.5,
        window_left=-1,
        window_right=-1,
        bottom_right=True,
        dropout_p=0.0,
        seed=0,
        offset=0,
    )
    args.update(kw)
    m = args["attn_mask"]
    if m is not None:
        args["attn_mask"] = m.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return args


def _ref_kwargs(args):
    """The same arguments for the reference, on the CPU."""
    r = dict(args)
    for name in ("attn_mask", "kv_lengths"):
        if r[name] is not None:
            r[name] = r[name].cpu()
    return r


def _inputs(shape, dtype, device, *, q_layout="bhld"):
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    if q_layout == "blhd":  # q as a (B, L, H, D) buffer viewed as (B, H, L, D): strided rows
        q = torch.randn(B, Lq, Hq, D, dtype=dtype, device=device).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, Lq, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=dtype, device=device)
    return q, k, v


def _call_args(args):
    return [args[n] for n in ARG_NAMES]


def _float_mask(Lq, Lk, dtype, device):
    m = torch.randn(1, 1, Lq, Lk, device=device) * 2
    m[..., ::3] = -math.inf  # some -inf entries; every row keeps others
    return m.to(dtype)


def _bool_mask(Lq, Lk, device, *, dead_rows=(1,)):
    m = torch.rand(1, 1, Lq, Lk, device=device) > 0.4
    for r in dead_rows:
        if r < Lq:
            m[..., r, :] = False  # a row that sees nothing: out 0, lse -inf, grads 0
    return m


# (id, shape (B, Hq, Hkv, Lq, Lk, D, Dv), dtype, extra arguments (callable of device or dict))
FWD_CASES = [
    ("d64_gqa", (1, 2, 1, 17, 33, 64, 64), torch.float16, {}),
    ("d128_lq1_causal", (1, 1, 1, 1, 97, 128, 128), torch.bfloat16, {"window_right": 0}),
    ("d40_dv80_causal_topleft", (2, 2, 2, 97, 17, 40, 80), torch.float16, {"window_right": 0, "bottom_right": False}),
    ("d256_window", (1, 2, 1, 33, 97, 256, 256), torch.bfloat16, {"window_left": 8, "window_right": 4}),
    (
        "d64_kv_lengths",
        (2, 1, 1, 17, 40, 64, 64),
        torch.float16,
        lambda dev: {"kv_lengths": torch.tensor([0, 23], dtype=torch.int32, device=dev)},
    ),
    ("d64_bool_mask", (1, 2, 2, 33, 33, 64, 64), torch.float16, lambda dev: {"attn_mask": _bool_mask(33, 33, dev)}),
    (
        "d128_bf16_mask_causal",
        (1, 2, 1, 17, 29, 128, 128),
        torch.bfloat16,
        lambda dev: {"attn_mask": _float_mask(17, 29, torch.bfloat16, dev), "window_right": 0},
    ),
    (
        "d20_dv12_f32_mask",
        (1, 1, 1, 17, 29, 20, 12),
        torch.float16,
        lambda dev: {"attn_mask": _float_mask(17, 29, torch.float32, dev)},
    ),
    ("d64_dropout", (1, 2, 1, 33, 47, 64, 64), torch.float16, {"dropout_p": 0.3, "seed": 1234, "offset": 7}),
    (
        "d256_dropout_mask",
        (1, 1, 1, 17, 17, 256, 256),
        torch.float16,
        lambda dev: {"dropout_p": 0.5, "seed": 99, "attn_mask": _bool_mask(17, 17, dev)},
    ),
    ("d64_causal_lq_gt_lk", (1, 2, 2, 40, 17, 64, 64), torch.bfloat16, {"window_right": 0}),
    ("d64_strided_q", (1, 3, 3, 33, 33, 64, 64), torch.float16, {"q_layout": "blhd"}),
    ("d64_l257_causal", (1, 1, 1, 257, 257, 64, 64), torch.float16, {"window_right": 0}),
    ("d128_l257_window", (1, 1, 1, 257, 130, 128, 128), torch.bfloat16, {"window_left": 40, "window_right": 3}),
]

BWD_CASES = [
    ("d64_gqa", (1, 4, 2, 17, 33, 64, 64), torch.float16, {}),
    ("d128_causal", (1, 1, 1, 97, 97, 128, 128), torch.bfloat16, {"window_right": 0}),
    (
        "d40_dv80_kv_lengths",
        (2, 2, 1, 17, 40, 40, 80),
        torch.float16,
        lambda dev: {"kv_lengths": torch.tensor([0, 23], dtype=torch.int32, device=dev)},
    ),
    (
        "d64_mask_dropout",
        (1, 2, 2, 33, 33, 64, 64),
        torch.float16,
        lambda dev: {"attn_mask": _bool_mask(33, 33, dev), "dropout_p": 0.25, "seed": 5, "offset": 3},
    ),
    ("d256_window", (1, 1, 1, 17, 29, 256, 256), torch.bfloat16, {"window_left": 5, "window_right": 3}),
    ("d64_causal_lq_gt_lk", (1, 2, 1, 40, 17, 64, 64), torch.float16, {"window_right": 0}),
    (
        "d20_dv12_float_mask",
        (1, 1, 1, 17, 29, 20, 12),
        torch.float16,
        lambda dev: {"attn_mask": _float_mask(17, 29, torch.float16, dev)},
    ),
]


def _case(extra, device):
    kw = extra(device) if callable(extra) else dict(extra)
    layout = kw.pop("q_layout", "bhld")
    return kw, layout


def check_forward(fwd, case, device):
    _, shape, dtype, extra = case
    kw, layout = _case(extra, device)
    q, k, v = _inputs(shape, dtype, device, q_layout=layout)
    args = _normalized(q, k, **kw)
    out, lse = fwd(q, k, v, *_call_args(args))
    assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    ref = attention_ref(q.cpu().double(), k.cpu().double(), v.cpu().double(), **_ref_kwargs(args))
    base = attention_ref(q.cpu(), k.cpu(), v.cpu(), **_ref_kwargs(args))
    report = compare((out.cpu(), lse.cpu()), ref, base)
    assert report.passed, str(report)
    # Rows that see no key: exactly 0 and -inf (never NaN).
    dead = ref[1] == -math.inf
    if dead.any():
        assert torch.all(out.cpu()[dead] == 0) and torch.all(lse.cpu()[dead] == -math.inf)


def check_backward(fwd, bwd, case, device, deterministic):
    _, shape, dtype, extra = case
    kw, layout = _case(extra, device)
    q, k, v = _inputs(shape, dtype, device, q_layout=layout)
    dout = torch.randn(*q.shape[:3], v.shape[-1], dtype=dtype, device=device)
    args = _normalized(q, k, **kw)
    out, lse = fwd(q, k, v, *_call_args(args))
    grads = bwd(dout, q, k, v, out, lse, *_call_args(args), deterministic)
    assert grads[3].shape == (0,)  # grad_sinks: empty without sinks
    grads = grads[:3]
    for g, x in zip(grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
    cpu = [t.cpu() for t in (dout, q, k, v)]
    ref = attention_bwd_ref(*[t.double() for t in cpu], **_ref_kwargs(args))
    base = attention_bwd_ref(*cpu, **_ref_kwargs(args))
    report = compare(tuple(g.cpu() for g in grads), tuple(ref), tuple(base), grad=True)
    assert report.passed, str(report)
    for g in grads:
        assert torch.isfinite(g.cpu()).all()
    dead = lse.cpu() == -math.inf
    if dead.any():
        assert torch.all(grads[0].cpu()[dead] == 0)


# ------------------------------------------------------------------------------------------------
# Emulated (CPU tensors through the CUDA-on-CPU harness)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emu():
    from emulation import load_emulated

    return load_emulated("attention", SOURCES)


@pytest.mark.emulation
@pytest.mark.parametrize("case", FWD_CASES, ids=[c[0] for c in FWD_CASES])
def test_forward_emulated(emu, case):
    check_forward(emu.attention_fwd, case, "cpu")


@pytest.mark.emulation
@pytest.mark.parametrize(
    "case,deterministic",
    [(c, i % 2 == 0) for i, c in enumerate(BWD_CASES)] + [(BWD_CASES[0], False)],
    ids=[f"{c[0]}-{'det' if i % 2 == 0 else 'atomic'}" for i, c in enumerate(BWD_CASES)]
    + [f"{BWD_CASES[0][0]}-atomic"],
)
def test_backward_emulated(emu, case, deterministic):
    check_backward(emu.attention_fwd, emu.attention_bwd, case, "cpu", deterministic)


# ------------------------------------------------------------------------------------------------
# Tile-boundary sweep at the CUDA kernels' own tiles (head-dim tile 64): FwdConfig<64, plain> is
# 128 queries x 64 keys, FwdConfig<64, general> (mask or dropout) 64 x 64, BwdConfig<64> 128 keys x
# 64 queries per step, DqConfig<64> 64 x 64 (csrc/cuda/attention_fwd.cuh, attention_bwd.cuh).
# Lengths at t - 1, t, t + 1 and 2t +- 1 of those tiles, and bottom-right offsets Lk - Lq at several
# residues modulo 64, causal, one head, both forward variants and both dQ paths.
CUDA_QUERY_TILES = (64, 128)
CUDA_KEY_TILES = (64, 128)


def test_cuda_tile_sizes_match_the_sources():
    import re

    src = open("csrc/cuda/attention_fwd.cuh").read() + open("csrc/cuda/attention_bwd.cuh").read()
    fwd = re.findall(r"FwdConfig<64,\s*(?:true|false)>\s*\{\s*using type = FwdTraits<64,\s*(\d+),\s*(\d+)", src)
    bwd = re.findall(r"BwdConfig<64>\s*\{\s*using type = BwdTraits<64,\s*(\d+),\s*(\d+)", src)
    dq = re.findall(r"DqConfig<64>\s*\{\s*using type = DqTraits<64,\s*(\d+),\s*(\d+)", src)
    assert len(fwd) == 2 and len(bwd) == 1 and len(dq) == 1, "tile configurations moved: update this sweep"
    queries = {int(m) for m, _ in fwd} | {int(bwd[0][1]), int(dq[0][0])}
    keys = {int(n) for _, n in fwd} | {int(bwd[0][0]), int(dq[0][1])}
    assert queries == set(CUDA_QUERY_TILES) and keys == set(CUDA_KEY_TILES), (queries, keys)


def _sweep_shapes():
    tq, tk = min(CUDA_QUERY_TILES), min(CUDA_KEY_TILES)
    shapes = [(tq - 1, tk + 1), (tq, 2 * tk), (tq + 1, 2 * tk + 1), (2 * tq + 1, 2 * tk - 1), (1, 3 * tk - 1)]
    shapes += [(tq + 1, tq + 1 + r) for r in (1, 31, tk - 1, tk, tk + 1)]  # offsets at residues mod tk
    return list(dict.fromkeys(shapes))


SWEEP = [
    (f"lq{lq}_lk{lk}", (1, 1, 1, lq, lk, 64, 64), torch.float16, {"window_right": 0}) for lq, lk in _sweep_shapes()
]


@pytest.mark.emulation
@pytest.mark.parametrize("general", [False, True], ids=["plain", "general"])
@pytest.mark.parametrize("case", SWEEP, ids=[c[0] for c in SWEEP])
def test_tile_sweep_forward_emulated(emu, case, general):
    name, shape, dtype, extra = case
    if general:  # an all-true bool mask selects the general (mask/dropout) variant, same answer
        extra = dict(extra, attn_mask=torch.ones(1, 1, shape[3], shape[4], dtype=torch.bool))
    check_forward(emu.attention_fwd, (name, shape, dtype, extra), "cpu")


@pytest.mark.emulation
@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
@pytest.mark.parametrize("case", SWEEP, ids=[c[0] for c in SWEEP])
def test_tile_sweep_backward_emulated(emu, case, deterministic):
    check_backward(emu.attention_fwd, emu.attention_bwd, case, "cpu", deterministic)


@pytest.mark.emulation
def test_empty_and_keyless_emulated(emu):
    q, k, v = _inputs((1, 2, 2, 5, 0, 64, 64), torch.float16, "cpu")
    args = _normalized(q, k)
    out, lse = emu.attention_fwd(q, k, v, *_call_args(args))
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    dq, dk, dv, _ = emu.attention_bwd(torch.randn_like(out), q, k, v, out, lse, *_call_args(args), True)
    assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape
    q, k, v = _inputs((1, 2, 2, 0, 7, 64, 64), torch.float16, "cpu")
    out, lse = emu.attention_fwd(q, k, v, *_call_args(_normalized(q, k)))
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)
    dq, dk, dv, _ = emu.attention_bwd(out, q, k, v, out, lse, *_call_args(_normalized(q, k)), False)
    assert torch.all(dk == 0) and torch.all(dv == 0)


def _hostile_inputs(kind, device):
    """Scores and masks at the float limit: a float32 mask of finfo.min on whole rows and -1e30 on
    half of another (rows that see keys with finite scores: torch gives the mean of v there, not 0),
    or bfloat16 q/k so large that scale * q.k lies beyond FLT_MAX / log2(e)."""
    B, H, Lq, Lk, D = 1, 2, 19, 37, 64
    if kind == "finfo_min_mask":
        q, k, v = _inputs((B, H, H, Lq, Lk, D, D), torch.float16, device)
        m = torch.zeros(1, 1, Lq, Lk, device=device)
        m[..., 3, :] = torch.finfo(torch.float32).min
        m[..., 5, ::2] = -1e30
        m[..., 7, :] = -3e38
        m[..., 7, 9] = 0
        return q, k, v, {"attn_mask": m}
    # scale = 1 and q.k = D * big^2 * c_j with c_j in (0.5, 1]: scores up to 2.4e38, finite in
    # float32 but beyond FLT_MAX / log2(e) = 2.36e38.
    _, _, v = _inputs((B, H, H, Lq, Lk, D, D), torch.bfloat16, device)
    big = 1.95e18
    c = torch.linspace(0.5, 1.0, Lk, device=device)[torch.randperm(Lk, device=device)]
    q = torch.full((B, H, Lq, D), big, device=device).to(torch.bfloat16)
    k = (big * c).view(1, 1, Lk, 1).expand(B, H, Lk, D).to(torch.bfloat16)
    return q, k, v, {"scale": 1.0}


@pytest.mark.emulation
@pytest.mark.parametrize("kind", ["finfo_min_mask", "bf16_scores_beyond_flt_max_over_log2e"])
def test_large_scores_and_mask_constants_emulated(emu, kind):
    q, k, v, kw = _hostile_inputs(kind, "cpu")
    args = _normalized(q, k, **kw)
    out, lse = emu.attention_fwd(q, k, v, *_call_args(args))
    ref = attention_ref(q.double(), k.double(), v.double(), **_ref_kwargs(args))
    base = attention_ref(q, k, v, **_ref_kwargs(args))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    report = compare((out, lse), ref, base)
    assert report.passed, str(report)
    if kind == "finfo_min_mask":
        torch.testing.assert_close(out[:, :, 3].float(), v.float().mean(2), atol=2e-3, rtol=2e-3)
    dout = torch.randn_like(out)
    grads = emu.attention_bwd(dout, q, k, v, out, lse, *_call_args(args), True)[:3]
    ref_g = attention_bwd_ref(dout.double(), q.double(), k.double(), v.double(), **_ref_kwargs(args))
    base_g = attention_bwd_ref(dout, q, k, v, **_ref_kwargs(args))
    assert all(torch.isfinite(g).all() for g in grads)
    # With scores of 1e38 the softmax is one-hot, so the exact dQ and dK are 0: torch's autograd
    # cancels p * (g - p.g) exactly there, a FlashAttention backward forms dP - delta from two
    # dot products and keeps a rounding of |dO||V| times |K| = 2e18. Only dV is comparable then.
    keep = slice(0, 3) if kind == "finfo_min_mask" else slice(2, 3)
    report = compare(tuple(grads)[keep], tuple(ref_g)[keep], tuple(base_g)[keep], grad=True)
    assert report.passed, str(report)


@pytest.mark.emulation
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: _inputs((1, 1, 1, 4, 4, 64, 64), torch.float32, "cpu"), "float16 or bfloat16"),
        (lambda: _inputs((1, 1, 1, 4, 4, 264, 64), torch.float16, "cpu"), r"head dims up to 256"),
        (lambda: _inputs((1, 3, 2, 4, 4, 64, 64), torch.float16, "cpu"), "multiple of kv heads"),
    ],
    ids=["float32", "head_dim_264", "gqa_ratio"],
)
def test_rejects_emulated(emu, make, match):
    q, k, v = make()
    with pytest.raises(RuntimeError, match=match):
        emu.attention_fwd(q, k, v, *_call_args(_normalized(q, k)))


@pytest.mark.emulation
def test_rejects_bad_mask_and_lengths_emulated(emu):
    q, k, v = _inputs((2, 1, 1, 4, 6, 64, 64), torch.float16, "cpu")
    mask = torch.zeros(2, 1, 4, 6, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="attn_mask must be bool"):
        emu.attention_fwd(q, k, v, *_call_args(_normalized(q, k, attn_mask=mask)))
    with pytest.raises(RuntimeError, match="kv_lengths must be a contiguous int32"):
        emu.attention_fwd(q, k, v, *_call_args(_normalized(q, k, kv_lengths=torch.tensor([3, 4]))))


def _sanitizer_case(emu):
    """Every kernel once on a small shape (runs in a child process): the plain forward with a
    causal band and the deterministic backward (dq kernel), then the mask + dropout forward and
    the atomic-dQ backward (dq_accum + convert)."""
    torch.manual_seed(0)
    q, k, v = _inputs((1, 2, 1, 19, 21, 64, 64), torch.float16, "cpu")
    mask = _bool_mask(19, 21, "cpu").expand(1, 2, 19, 21)
    for extra, det in (({"window_right": 0}, True), ({"attn_mask": mask, "dropout_p": 0.2, "seed": 3}, False)):
        args = _normalized(q, k, **extra)
        out, lse = emu.attention_fwd(q, k, v, *_call_args(args))
        emu.attention_bwd(torch.randn_like(out), q, k, v, out, lse, *_call_args(args), det)


@pytest.mark.emulation
@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_sanitized_emulated(sanitizer):
    from emulation import run_sanitized

    run_sanitized(sanitizer, "attention", SOURCES, _sanitizer_case).assert_clean()


# ------------------------------------------------------------------------------------------------
# Score modifiers (softcap, ALiBi, sinks): forward and backward against the float64 reference with
# autograd (sinks a float64 leaf), through the kMods variants of the kernels. The tile-boundary
# shapes sit around the tiles the modifiers run in: the general forward (64 x 64 at head dim 64),
# BwdConfig<64> (128 keys x 64 queries) and DqConfig<64> (64 x 64).


def _mods(B, Hq, *, softcap=0.0, alibi=False, sinks=None):
    """(alibi_slopes (B, Hq) float32 or None, sinks (Hq,) float32 or None, softcap) as the op takes
    them. `sinks`: None, "random", "-inf" (every head) or a list of values."""
    slopes = torch.rand(B, Hq) * 0.3 + 0.02 if alibi else None
    if sinks == "random":
        sinks = torch.randn(Hq) * 2
    elif sinks == "-inf":
        sinks = torch.full((Hq,), -math.inf)
    elif sinks is not None:
        sinks = torch.tensor(sinks, dtype=torch.float32)
    return slopes, sinks, float(softcap)


def _ref_modified(dout, q, k, v, args, mods, dtype):
    """out, lse and (dq, dk, dv, dsinks) of attention_ref with the modifiers, computed in `dtype`
    (float64: the reference; the inputs' dtype: the plain-torch baseline)."""
    slopes, sinks, softcap = mods
    with torch.enable_grad():
        xs = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        sk = None
        if sinks is not None:
            sk = sinks.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
        al = None if slopes is None else slopes.to(torch.float64 if dtype == torch.float64 else torch.float32)
        out, lse = attention_ref(*xs, **_ref_kwargs(args), softcap=softcap, alibi_slopes=al, sinks=sk)
        leaves = xs + ([sk] if sk is not None else [])
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return (out.detach(), lse.detach()), tuple(grads)


def check_modified(emu, shape, dtype, kw, mod_kw, deterministic):
    B, Hq = shape[0], shape[1]
    kw = dict(kw)
    q, k, v = _inputs(shape, dtype, "cpu")
    for name in ("attn_mask", "kv_lengths"):
        if callable(kw.get(name)):
            kw[name] = kw[name](q, k)
    args = _normalized(q, k, **kw)
    mods = _mods(B, Hq, **mod_kw)
    out, lse = emu.attention_fwd(q, k, v, *_call_args(args), *mods)
    dout = torch.randn(*q.shape[:3], v.shape[-1], dtype=dtype)
    ref_fwd, ref_g = _ref_modified(dout, q, k, v, args, mods, torch.float64)
    base_fwd, base_g = _ref_modified(dout, q, k, v, args, mods, dtype)
    report = compare((out, lse), ref_fwd, base_fwd)
    assert report.passed, str(report)
    dq, dk, dv, dsinks = emu.attention_bwd(dout, q, k, v, out, lse, *_call_args(args), deterministic, *mods)
    got = (dq, dk, dv) + ((dsinks,) if mods[1] is not None else ())
    assert dsinks.dtype == torch.float32 and dsinks.shape == ((Hq,) if mods[1] is not None else (0,))
    # dsinks is judged at the inputs' precision: it is built from delta = dO.O, and O was rounded to
    # that dtype (the plain-torch baseline keeps O in float32).
    report = compare(got, ref_g, base_g, grad=True, dtype=dtype)
    assert report.passed, str(report)
    assert all(torch.isfinite(g).all() for g in got)
    return out, lse, ref_fwd


def _dead_row_mask(q, k):
    return _bool_mask(q.shape[2], k.shape[2], "cpu", dead_rows=(1, 4))


def _lengths(*n):
    return lambda q, k: torch.tensor(n, dtype=torch.int32)


def _big_mask(q, k):
    """Scores near 1e5 on one row: its lse is past kLseRecomputeAbove, so the backward recomputes
    that row's max and l, which must include the sink (1e5 + 0.5 on head 0)."""
    m = torch.zeros(1, 1, q.shape[2], k.shape[2])
    m[..., 2, :] = 1e5
    return m


ALL = {"softcap": 2.0, "alibi": True, "sinks": "random"}
# (id, shape (B, Hq, Hkv, Lq, Lk, D, Dv), dtype, arguments, modifiers)
MOD_CASES = [
    ("softcap_gqa", (1, 4, 2, 17, 33, 64, 64), torch.float16, {}, {"softcap": 1.5}),
    ("alibi_causal", (2, 2, 1, 33, 40, 64, 64), torch.bfloat16, {"window_right": 0}, {"alibi": True}),
    ("sinks", (1, 2, 2, 17, 29, 64, 64), torch.float16, {}, {"sinks": "random"}),
    ("all_gqa_window", (1, 4, 2, 40, 47, 64, 64), torch.bfloat16, {"window_left": 8, "window_right": 0}, ALL),
    ("all_topleft_lq_gt_lk", (2, 2, 2, 40, 17, 64, 64), torch.float16, {"window_right": 0, "bottom_right": False}, ALL),
    ("all_bool_mask_dead_rows", (1, 2, 2, 33, 33, 64, 64), torch.float16, {"attn_mask": _dead_row_mask}, ALL),
    (
        "all_dead_rows_sink_minus_inf_on_one_head",
        (1, 2, 2, 33, 33, 64, 64),
        torch.bfloat16,
        {"attn_mask": _dead_row_mask},
        {"softcap": 2.0, "alibi": True, "sinks": [0.7, -math.inf]},
    ),
    (
        "all_float_mask_kv_lengths",
        (2, 2, 1, 17, 40, 40, 80),
        torch.float16,
        {"attn_mask": lambda q, k: _float_mask(17, 40, torch.float32, "cpu"), "kv_lengths": _lengths(0, 23)},
        ALL,
    ),
    (
        "softcap_alibi_kv_lengths_no_sink",
        (2, 2, 1, 17, 40, 64, 64),
        torch.bfloat16,
        {"kv_lengths": _lengths(0, 23)},
        {"softcap": 2.0, "alibi": True},
    ),
    ("all_dropout", (1, 2, 1, 33, 47, 64, 64), torch.float16, {"dropout_p": 0.3, "seed": 11, "offset": 2}, ALL),
    ("all_lk1", (1, 2, 2, 5, 1, 64, 64), torch.float16, {}, ALL),
    ("sinks_minus_inf", (1, 2, 2, 17, 17, 64, 64), torch.bfloat16, {"attn_mask": _dead_row_mask}, {"sinks": "-inf"}),
    (
        "sinks_recomputed_rows",
        (1, 2, 1, 9, 13, 64, 64),
        torch.float16,
        {"attn_mask": _big_mask},
        {"alibi": True, "sinks": [1e5 + 0.5, 1.0]},
    ),
    ("all_d128", (1, 2, 1, 17, 29, 128, 128), torch.bfloat16, {"window_right": 0}, ALL),
    ("all_d256", (1, 1, 1, 17, 20, 256, 256), torch.float16, {}, ALL),
] + [
    (f"all_causal_lq{lq}_lk{lk}", (1, 1, 1, lq, lk, 64, 64), torch.float16, {"window_right": 0}, ALL)
    for lq, lk in ((63, 65), (64, 128), (65, 129), (129, 127), (1, 191))
]


@pytest.mark.emulation
@pytest.mark.parametrize(
    "case,deterministic",
    [(c, i % 2 == 0) for i, c in enumerate(MOD_CASES)],
    ids=[f"{c[0]}-{'det' if i % 2 == 0 else 'atomic'}" for i, c in enumerate(MOD_CASES)],
)
def test_modifiers_emulated(emu, case, deterministic):
    torch.manual_seed(len(case[0]))
    _, shape, dtype, kw, mod_kw = case
    check_modified(emu, shape, dtype, kw, mod_kw, deterministic)


@pytest.mark.emulation
@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_modifiers_keyless_rows_emulated(emu, deterministic):
    """Rows that see no key: with a finite sink out 0 and lse = sink exactly, and no gradient but the
    sink's (which is 0 too: delta = dO.O = 0); with a -inf sink out 0 and lse -inf."""
    torch.manual_seed(0)
    out, lse, _ = check_modified(
        emu,
        (2, 2, 1, 9, 12, 64, 64),
        torch.float16,
        {"kv_lengths": _lengths(0, 5)},
        {"softcap": 3.0, "alibi": True, "sinks": [1.25, -math.inf]},
        deterministic,
    )
    assert torch.all(out[0] == 0)
    assert torch.all(lse[0, 0] == 1.25) and torch.all(lse[0, 1] == -math.inf)
    assert torch.isfinite(lse[1]).all()


@pytest.mark.emulation
def test_modifiers_keyless_problem_emulated(emu):
    """Lk = 0: every row's softmax holds only its sink."""
    q, k, v = _inputs((1, 2, 2, 5, 0, 64, 64), torch.float16, "cpu")
    mods = _mods(1, 2, softcap=2.0, alibi=True, sinks=[0.5, -math.inf])
    args = _normalized(q, k)
    out, lse = emu.attention_fwd(q, k, v, *_call_args(args), *mods)
    assert torch.all(out == 0) and torch.all(lse[0, 0] == 0.5) and torch.all(lse[0, 1] == -math.inf)
    dq, _, _, dsinks = emu.attention_bwd(torch.randn_like(out), q, k, v, out, lse, *_call_args(args), True, *mods)
    assert torch.all(dq == 0) and torch.equal(dsinks, torch.zeros(2))


def _sanitizer_case_mods(emu):
    """The kMods kernels once each (plain band: deterministic dQ; mask + dropout: atomic dQ), every
    modifier on, on a small shape."""
    torch.manual_seed(0)
    q, k, v = _inputs((1, 2, 1, 19, 21, 64, 64), torch.float16, "cpu")
    mask = _bool_mask(19, 21, "cpu").expand(1, 2, 19, 21)
    mods = _mods(1, 2, softcap=2.0, alibi=True, sinks="random")
    for extra, det in (({"window_right": 0}, True), ({"attn_mask": mask, "dropout_p": 0.2, "seed": 3}, False)):
        args = _normalized(q, k, **extra)
        out, lse = emu.attention_fwd(q, k, v, *_call_args(args), *mods)
        emu.attention_bwd(torch.randn_like(out), q, k, v, out, lse, *_call_args(args), det, *mods)


@pytest.mark.emulation
@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_sanitized_modifiers_emulated(sanitizer):
    from emulation import run_sanitized

    run_sanitized(sanitizer, "attention", SOURCES, _sanitizer_case_mods).assert_clean()


# ------------------------------------------------------------------------------------------------
# GPU (torch.ops.seqkernels on CUDA tensors)
# ------------------------------------------------------------------------------------------------

GPU_EXTRA_FWD = [
    ("d128_big_causal", (2, 4, 2, 513, 1031, 128, 128), torch.bfloat16, {"window_right": 0}),
    ("d64_big", (2, 8, 8, 1024, 1024, 64, 64), torch.float16, {}),
    (
        "d256_big_mask",
        (1, 2, 1, 300, 257, 256, 256),
        torch.float16,
        lambda dev: {"attn_mask": _float_mask(300, 257, torch.float16, dev)},
    ),
]


def _cuda_ops():
    from seqkernels._ext import has_kernel, load_extension

    load_extension()
    if not has_kernel("attention_fwd", "CUDA"):
        pytest.skip("seqkernels was built without the CUDA kernels")
    return torch.ops.seqkernels.attention_fwd, torch.ops.seqkernels.attention_bwd


@pytest.mark.cuda
@pytest.mark.parametrize("case", FWD_CASES + GPU_EXTRA_FWD, ids=[c[0] for c in FWD_CASES + GPU_EXTRA_FWD])
def test_forward_cuda(case):
    fwd, _ = _cuda_ops()
    check_forward(fwd, case, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("case", BWD_CASES + GPU_EXTRA_FWD[:1], ids=[c[0] for c in BWD_CASES + GPU_EXTRA_FWD[:1]])
def test_backward_cuda(case, deterministic):
    fwd, bwd = _cuda_ops()
    check_backward(fwd, bwd, case, "cuda", deterministic)


@pytest.mark.cuda
def test_deterministic_backward_is_bitwise_repeatable_cuda():
    fwd, bwd = _cuda_ops()
    q, k, v = _inputs((2, 4, 2, 300, 300, 128, 128), torch.bfloat16, "cuda")
    args = _normalized(q, k, window_right=0)
    out, lse = fwd(q, k, v, *_call_args(args))
    dout = torch.randn_like(out)
    first = bwd(dout, q, k, v, out, lse, *_call_args(args), True)
    for _ in range(3):
        again = bwd(dout, q, k, v, out, lse, *_call_args(args), True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Packed sequences (cu_seqlens, attention_varlen): the kernels' per-sequence tile schedule against
# the float64 reference one sequence at a time. q, k, v are token-major (total, H, D) tensors passed
# as the (1, H, total, D) views attention_varlen hands the op; out, lse, dq, dk, dv come back
# token-major. Lengths sit at the tiles of head dim 64: queries at 63/64/65 and 127/128/129 (forward
# 128 plain / 64 general, dQ 64, dK/dV steps 64), keys at 63/64/65 and 128/129 (key tiles 64, 128).


def _packed_inputs(lens_q, lens_k, Hq, Hkv, D, Dv, dtype):
    """Token-major q, k, v, their (1, H, total, D) views and cu_seqlens (int32)."""
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, Hq, D, dtype=dtype)
    k = torch.randn(tk, Hkv, D, dtype=dtype)
    v = torch.randn(tk, Hkv, Dv, dtype=dtype)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    views = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
    return views, cu_q, cu_k


def _token_major(t):
    """Whether a (1, H, total, d) tensor is a view of contiguous (total, H, d) storage."""
    return t.shape[0] == 1 and t[0].transpose(0, 1).is_contiguous()


def check_varlen(emu, lens_q, lens_k, Hq, Hkv, D, Dv, dtype, kw, mod_kw, deterministic):
    (q, k, v), cu_q, cu_k = _packed_inputs(lens_q, lens_k, Hq, Hkv, D, Dv, dtype)
    N = len(lens_q)
    max_q, max_k = max(lens_q + [0]) + 1, max(lens_k + [0]) + 2  # bounds, not the exact maxima
    varlen = (cu_q, cu_k, max_q, max_k)
    args = _normalized(q, k, **kw)
    mods = _mods(N, Hq, **mod_kw)
    out, lse = emu.attention_fwd(q, k, v, *_call_args(args), *mods, *varlen, deterministic)
    assert out.shape == (1, Hq, sum(lens_q), Dv) and _token_major(out)
    assert lse.shape == (1, Hq, sum(lens_q)) and lse.is_contiguous() and lse.dtype == torch.float32
    dout = torch.randn(sum(lens_q), Hq, Dv, dtype=dtype).transpose(0, 1).unsqueeze(0)
    ref_args = dict(args, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
    ref_fwd, ref_g = _ref_modified(dout, q, k, v, ref_args, mods, torch.float64)
    base_fwd, base_g = _ref_modified(dout, q, k, v, ref_args, mods, dtype)
    report = compare((out, lse), ref_fwd, base_fwd)
    assert report.passed, str(report)
    dead = ref_fwd[1] == -math.inf
    assert torch.all(out[dead] == 0) and torch.all(lse[dead] == -math.inf)
    dq, dk, dv, dsinks = emu.attention_bwd(dout, q, k, v, out, lse, *_call_args(args), deterministic, *mods, *varlen)
    for g, x in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype and _token_major(g)
    got = (dq, dk, dv) + ((dsinks,) if mods[1] is not None else ())
    report = compare(got, ref_g, base_g, grad=True, dtype=dtype)
    assert report.passed, str(report)
    assert all(torch.isfinite(g).all() for g in got)
    return out, lse


# (id, lens_q, lens_k, Hq, Hkv, D, Dv, dtype, arguments, modifiers, deterministic)
VARLEN_CASES = [
    ("f16_gqa_empty_len1", [5, 0, 1, 17, 0], [7, 3, 1, 17, 0], 2, 1, 64, 64, torch.float16, {}, {}, True),
    (
        "bf16_causal_query_tiles",
        [127, 128, 129],
        [128, 129, 64],
        1,
        1,
        64,
        64,
        torch.bfloat16,
        {"window_right": 0},
        {},
        False,
    ),
    (
        "f16_causal_general_tiles",
        [63, 64, 65, 1],
        [63, 64, 65, 129],
        1,
        1,
        64,
        64,
        torch.float16,
        {"window_right": 0, "dropout_p": 0.2, "seed": 7, "offset": 3},
        {},
        True,
    ),
    (
        "bf16_window_lq_gt_lk_topleft",
        [40, 9, 0, 33],
        [17, 30, 5, 0],
        2,
        2,
        64,
        64,
        torch.bfloat16,
        {"window_left": 6, "window_right": 2, "bottom_right": False},
        {},
        True,
    ),
    (
        "f16_mods_gqa_d40_dv80",
        [17, 0, 33, 1],
        [20, 4, 33, 1],
        4,
        2,
        40,
        80,
        torch.float16,
        {"window_left": 8, "window_right": 0},
        ALL,
        False,
    ),
    (
        "bf16_mods_dropout_keyless",
        [9, 12, 0, 20],
        [0, 15, 3, 64],
        2,
        1,
        64,
        64,
        torch.bfloat16,
        {"dropout_p": 0.3, "seed": 11, "offset": 2},
        {"softcap": 2.0, "alibi": True, "sinks": [0.5, -math.inf]},
        True,
    ),
    (
        "f16_d128_dropout_atomic",
        [20, 33],
        [31, 8],
        2,
        1,
        128,
        128,
        torch.float16,
        {"dropout_p": 0.25, "seed": 3},
        {},
        False,
    ),
]


@pytest.mark.emulation
@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen_emulated(emu, case):
    torch.manual_seed(len(case[0]))
    _, lens_q, lens_k, Hq, Hkv, D, Dv, dtype, kw, mod_kw, det = case
    check_varlen(emu, lens_q, lens_k, Hq, Hkv, D, Dv, dtype, kw, mod_kw, det)


@pytest.mark.emulation
def test_varlen_dropout_matches_padded_emulated(emu):
    """A packed batch drops exactly what the same sequences padded to (N, Hq, max_q, max_k) drop:
    each sequence's output equals the padded kernel's on that batch index."""
    torch.manual_seed(0)
    lens_q, lens_k = [5, 12], [9, 3]
    (q, k, v), cu_q, cu_k = _packed_inputs(lens_q, lens_k, 2, 2, 64, 64, torch.float16)
    kw = {"dropout_p": 0.4, "seed": 21, "offset": 5}
    out, _ = emu.attention_fwd(q, k, v, *_call_args(_normalized(q, k, **kw)), None, None, 0.0, cu_q, cu_k, 12, 9)
    qp, kp, vp = torch.zeros(2, 2, 12, 64), torch.zeros(2, 2, 9, 64), torch.zeros(2, 2, 9, 64)
    for b in range(2):
        qp[b, :, : lens_q[b]] = q[0, :, cu_q[b] : cu_q[b + 1]].float()
        kp[b, :, : lens_k[b]] = k[0, :, cu_k[b] : cu_k[b + 1]].float()
        vp[b, :, : lens_k[b]] = v[0, :, cu_k[b] : cu_k[b + 1]].float()
    qp, kp, vp = (t.half() for t in (qp, kp, vp))
    lengths = torch.tensor(lens_k, dtype=torch.int32)
    # No band: the alignment (Lk_b - 12 padded, lk - lq packed) does not matter here.
    outp, _ = emu.attention_fwd(qp, kp, vp, *_call_args(_normalized(qp, kp, kv_lengths=lengths, **kw)))
    for b in range(2):
        torch.testing.assert_close(out[0, :, cu_q[b] : cu_q[b + 1]], outp[b, :, : lens_q[b]], atol=0, rtol=0)


@pytest.mark.emulation
@pytest.mark.parametrize("deterministic", [False], ids=["atomic"])
def test_varlen_lse_gradient_call_emulated(emu, deterministic):
    """The autograd layer's lse-gradient call: V := ones (Dv = 1), dO := g, out := 0 gives
    dq, dk of sum(g * lse)."""
    torch.manual_seed(1)
    lens_q, lens_k = [7, 0, 66], [5, 2, 70]
    (q, k, _), cu_q, cu_k = _packed_inputs(lens_q, lens_k, 2, 1, 64, 8, torch.float16)
    args = _normalized(q, k, window_right=0)
    varlen = (cu_q, cu_k, 66, 70)
    _, lse = emu.attention_fwd(q, k, k[..., :8], *_call_args(args), None, None, 0.0, *varlen)
    g = torch.randn(1, 2, sum(lens_q), 1).half()
    ones = torch.ones(1, 1, sum(lens_k), 1, dtype=torch.float16)
    dq, dk, dv, _ = emu.attention_bwd(
        g, q, k, ones, torch.zeros_like(g), lse, *_call_args(args), deterministic, None, None, 0.0, *varlen
    )
    ref_args = dict(args, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=66, max_seqlen_k=70)
    grads = []
    for dtype in (torch.float64, torch.float16):
        with torch.enable_grad():
            qd, kd = (t.detach().to(dtype).requires_grad_(True) for t in (q, k))
            _, lse_r = attention_ref(qd, kd, ones.to(dtype), **ref_args)
            grads.append(torch.autograd.grad((lse_r * g[..., 0].to(lse_r.dtype)).sum(), (qd, kd)))
    report = compare((dq, dk), grads[0], grads[1], grad=True, dtype=torch.float16)
    assert report.passed, str(report)


@pytest.mark.emulation
def test_varlen_rejects_bad_cpu_cu_seqlens_emulated(emu):
    (q, k, v), cu_q, cu_k = _packed_inputs([3, 4], [3, 4], 1, 1, 64, 64, torch.float16)
    args = _call_args(_normalized(q, k))
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        emu.attention_fwd(q, k, v, *args, None, None, 0.0, torch.tensor([0, 5, 4], dtype=torch.int32), cu_k, 8, 8)
    with pytest.raises(RuntimeError, match="kv_lengths is not taken"):
        emu.attention_fwd(
            q, k, v, *args[:1], torch.tensor([3], dtype=torch.int32), *args[2:], None, None, 0.0, cu_q, cu_k, 8, 8
        )


# Unchecked cu_seqlens (decreasing, beyond the totals, negative) as a GPU launch may meet them: a
# build whose launcher skips the value checks (SEQKERNELS_EMU_UNCHECKED_CU_SEQLENS), run under
# AddressSanitizer: every kernel of both directions must stay inside its tensors, and the rows of no
# sequence come back 0 / -inf / zero gradients.
UNCHECKED_FLAGS = ("-DSEQKERNELS_EMU_UNCHECKED_CU_SEQLENS",)


def _sanitizer_case_varlen(emu):
    torch.manual_seed(0)
    (q, k, v), _, _ = _packed_inputs([20, 13], [24, 9], 2, 1, 64, 64, torch.float16)
    bad = [
        ([0, 20, 33], [0, 24, 33]),  # valid: the sanitized baseline
        ([0, 30, 10], [0, 5, 40]),  # decreasing (rows 30.. in no sequence), k beyond the total
        ([-5, 50, 60], [3, -2, 100]),  # negative and beyond
    ]
    mods = _mods(2, 2, softcap=2.0, alibi=True, sinks="random")
    for i, (cq, ck) in enumerate(bad):
        cu = (torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32), 64, 64)
        for extra, det, m in (
            ({"window_right": 0}, True, (None, None, 0.0)),
            ({"dropout_p": 0.2, "seed": 3}, False, mods),
        ):
            args = _call_args(_normalized(q, k, **extra))
            out, lse = emu.attention_fwd(q, k, v, *args, *m, *cu, False)
            dq, dk, dv, _ = emu.attention_bwd(torch.randn_like(out), q, k, v, out, lse, *args, det, *m, *cu)
            assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
            if i == 1:  # rows in no sequence: 0, -inf, no gradient
                assert torch.all(out[:, :, 30:] == 0) and torch.all(lse[:, :, 30:] == -math.inf)
                assert torch.all(dq[:, :, 30:] == 0)


@pytest.mark.emulation
def test_varlen_unchecked_cu_seqlens_address_sanitized_emulated():
    from emulation import run_sanitized

    res = run_sanitized("address", "attention_unchecked", SOURCES, _sanitizer_case_varlen, extra_cflags=UNCHECKED_FLAGS)
    res.assert_clean()


def check_varlen_public(case, deterministic, device, backend):
    """seqkernels.attention_varlen (forward and backward through autograd) on `backend` against the
    reference backend in float64 and in the inputs' dtype."""
    import seqkernels

    torch.manual_seed(len(case[0]))
    _, lens_q, lens_k, Hq, Hkv, D, Dv, dtype, kw, mod_kw, _ = case
    (q, k, v), cu_q, cu_k = _packed_inputs(lens_q, lens_k, Hq, Hkv, D, Dv, dtype)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    max_q, max_k = max(lens_q), max(lens_k)
    slopes, sinks, softcap = _mods(len(lens_q), Hq, **mod_kw)
    wl, wr = kw.get("window_left", -1), kw.get("window_right", -1)
    call = dict(
        window=None if (wl, wr) == (-1, -1) else (wl, wr),
        softcap=softcap or None,
        alibi_slopes=slopes,
        sinks=sinks,
        deterministic=deterministic,
    )

    def run(xs, cu, backend, to):
        extra = {n: (to(t) if isinstance(t, torch.Tensor) else t) for n, t in call.items()}
        xs = [t.requires_grad_(True) for t in xs]
        out, lse = seqkernels.attention_varlen(
            *xs, *cu, max_q, max_k, return_lse=True, backend=backend, **extra
        )  # fmt: skip
        return xs, out, lse

    dev_xs, out, lse = run([t.to(device) for t in (q, k, v)], (cu_q.to(device), cu_k.to(device)), backend,
                           lambda t: t.to(device))  # fmt: skip
    ref_xs, out_r, lse_r = run([t.double() for t in (q, k, v)], (cu_q, cu_k), "reference", lambda t: t.double())
    base_xs, out_b, lse_b = run([t.clone() for t in (q, k, v)], (cu_q, cu_k), "reference", lambda t: t)
    assert out.shape == (sum(lens_q), Hq, Dv) and lse.shape == (Hq, sum(lens_q))
    report = compare((out.detach().cpu(), lse.cpu()), (out_r.detach(), lse_r), (out_b.detach(), lse_b))
    assert report.passed, str(report)
    g = torch.randn(out_r.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, dev_xs, g.to(dtype).to(device))
    grads_r = torch.autograd.grad(out_r, ref_xs, g)
    grads_b = torch.autograd.grad(out_b, base_xs, g.to(dtype))
    report = compare(tuple(x.cpu() for x in grads), grads_r, grads_b, grad=True, dtype=dtype)
    assert report.passed, str(report)


# GPU: the public attention_varlen on the CUDA backend (skipped without one). Dropout draws its seed
# from torch's generator (covered in emulation against the reference with a fixed seed);
# attention_varlen aligns bottom-right only.
VARLEN_GPU_CASES = [c for c in VARLEN_CASES if not c[8].get("dropout_p") and c[8].get("bottom_right", True)] + [
    (
        "bf16_d128_big_causal_gqa",
        [1, 300, 0, 513, 77, 128],
        [1, 300, 9, 700, 77, 200],
        4,
        2,
        128,
        128,
        torch.bfloat16,
        {"window_right": 0},
        {},
        True,
    ),
    ("f16_d256_big_mods", [257, 64, 129], [300, 64, 1], 2, 1, 256, 256, torch.float16, {}, ALL, True),
]


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
@pytest.mark.parametrize("case", VARLEN_GPU_CASES, ids=[c[0] for c in VARLEN_GPU_CASES])
def test_varlen_cuda(case, deterministic):
    _cuda_ops()
    check_varlen_public(case, deterministic, "cuda", "cuda")

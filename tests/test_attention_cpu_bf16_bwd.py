"""The bfloat16 backward on AVX512_BF16 and on AMX tiles (csrc/cpu/attention.cpp: bwd_block_avx512bf16,
bwd_block_amx), each forced where the CPU has it: the five products of the backward on bf16 operands,
float32 accumulation, against the float64 reference by the parity rule (DESIGN §5,
seqkernels.testing.compare with grad=True).

The shapes follow the backward's tiles: query blocks of kBwdBM = 64 rows that start at an even row
(Q^T and dO^T are packed as row pairs; an odd last row is paired with zeros), key blocks of
kBwdBN = 64 keys in panels of NR = 32, register tiles of 6 rows, head dims in pairs (an odd D or
Dv gets a zero pad) and output columns of 64 / 32 / 16 values; for the tiles, query blocks of
kBwdBMTiles = 128 rows that start at a multiple of 32 with rows of the block before the first
visible one, key blocks of kBwdBNTiles = 128 keys, 16-row tiles (Lq and the rows per block at every
residue mod 16), head dims padded to 32 and Q^T / dO^T rows to 16.
"""

import math
import zlib

import pytest
import torch

try:
    import seqkernels._C  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    pytest.skip(f"seqkernels._C is not built: {e}", allow_module_level=True)

from test_attention_cpu import (
    BF16_DOT_PATHS,
    _kw,
    check_parity,
    check_public_parity,
    needs_bf16_dot,
    rand,
    sk_backward,
    sk_forward,
)

from seqkernels.reference import attention_bwd_ref
from seqkernels.testing import compare

pytestmark = needs_bf16_dot

DT = torch.bfloat16


@pytest.fixture(autouse=True, params=BF16_DOT_PATHS)
def _bf16_isa(request, monkeypatch):
    # Every test on each bf16 dot path this CPU has (forward and backward take the same one).
    from seqkernels import cli

    monkeypatch.setenv("SEQKERNELS_CPU_ISA", request.param)
    assert cli.cpu_isa_report()["ops"]["attention_bwd"]["bfloat16"] == request.param


# (B, Hq, Hkv, Lq, Lk, D, Dv, window, bottom_right, kv_lengths)
BWD_CASES = {
    "lq63-lk31-d17-dv15": (1, 2, 1, 63, 31, 17, 15, (-1, -1), True, None),
    "lq64-lk32-d40-dv48-causal": (1, 2, 2, 64, 32, 40, 48, (-1, 0), True, None),
    "lq65-lk33-d64-dv80-gqa4": (1, 4, 1, 65, 33, 64, 80, (-1, -1), True, None),
    "lq129-lk65-d128-dv48-causal": (1, 2, 1, 129, 65, 128, 48, (-1, 0), True, None),
    "lq97-lk200-d40-dv80-window": (1, 4, 2, 97, 200, 40, 80, (20, 5), True, None),
    "lq131-lk131-d17-dv15-window-odd": (1, 2, 1, 131, 131, 17, 15, (7, 0), True, None),
    "lq7-lk130-d2-dv17-causal": (2, 2, 2, 7, 130, 2, 17, (-1, 0), True, None),
    "lq1-lk97-d64": (1, 4, 2, 1, 97, 64, 64, (-1, -1), True, None),
    "lengths-zero": (3, 2, 1, 67, 65, 17, 15, (-1, -1), True, [65, 0, 33]),
    "lengths-causal-gqa2": (2, 4, 2, 70, 129, 64, 48, (-1, 0), True, [129, 40]),
    "causal-br-unseen-rows": (1, 2, 1, 65, 33, 40, 48, (-1, 0), True, None),
    "causal-tl-lq-gt-lk": (1, 2, 2, 101, 65, 48, 32, (-1, 0), False, None),
    # Around the AMX backward's 128-row query blocks and 128-key blocks.
    "lq127-lk129-d64": (1, 2, 1, 127, 129, 64, 64, (-1, -1), True, None),
    "lq128-lk127-d32-dv48-causal": (1, 2, 2, 128, 127, 32, 48, (-1, 0), True, None),
    "lq257-lk255-d40-causal-gqa2": (1, 4, 2, 257, 255, 40, 40, (-1, 0), True, None),
}


@pytest.mark.parametrize("extra", ["plain", "bool-mask", "finfo-min-mask", "dropout"])
@pytest.mark.parametrize("case", list(BWD_CASES), ids=list(BWD_CASES))
def test_bf16_bwd_parity(case, extra):
    B, Hq, Hkv, Lq, Lk, D, Dv, window, br, lens = BWD_CASES[case]
    torch.manual_seed(zlib.crc32(f"bwd/{case}/{extra}".encode()) % 10000)
    q, k, v = rand(B, Hq, Lq, D, dtype=DT), rand(B, Hkv, Lk, D, dtype=DT), rand(B, Hkv, Lk, Dv, dtype=DT)
    mask = None
    if extra == "bool-mask":
        mask = (torch.rand(B, 1, Lq, Lk) > 0.3).expand(B, Hq, Lq, Lk)
    elif extra == "finfo-min-mask":
        keep = torch.rand(B, 1, Lq, Lk) > 0.3
        mask = torch.zeros(B, 1, Lq, Lk, dtype=DT).masked_fill(~keep, torch.finfo(DT).min).expand(B, Hq, Lq, Lk)
    kw = _kw(
        1.0 / math.sqrt(D),
        attn_mask=mask,
        window=window,
        bottom_right=br,
        kv_lengths=None if lens is None else torch.tensor(lens, dtype=torch.int32),
        dropout_p=0.2 if extra == "dropout" else 0.0,
        seed=13,
        offset=4,
    )
    check_parity(q, k, v, kw)


def test_bf16_bwd_strided_inputs():
    # Transposed storage and a stride-0 kv head take the same packing.
    torch.manual_seed(3)
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 77, 90, 40, 24
    q = rand(B, Lq, Hq, D, dtype=DT).transpose(1, 2)
    k = rand(B, 1, Lk, D, dtype=DT).expand(B, Hkv, Lk, D)
    v = rand(B, Lk, Hkv, Dv, dtype=DT).transpose(1, 2)
    check_parity(q, k, v, _kw(1.0 / math.sqrt(D), window=(-1, 0)))


def _grads(q, k, v, kw, g, deterministic=False):
    out, lse = sk_forward(q, k, v, kw)
    return out, lse, sk_backward(g, q, k, v, out, lse, kw, deterministic=deterministic)


def test_bf16_bwd_is_the_bf16_kernel_and_deterministic(monkeypatch):
    # The bf16 products round P and dS to bf16: the gradients differ from the float32 kernel's
    # (the AVX-512 float32 path, selected by SEQKERNELS_CPU_ISA=avx512), and repeat bitwise,
    # with and without `deterministic`.
    torch.manual_seed(5)
    B, Hq, Hkv, L, D = 2, 4, 2, 150, 64
    q, k, v = rand(B, Hq, L, D, dtype=DT), rand(B, Hkv, L, D, dtype=DT), rand(B, Hkv, L, D, dtype=DT)
    g = rand(B, Hq, L, D, dtype=DT)
    kw = _kw(1.0 / math.sqrt(D), window=(-1, 0))
    out, lse, first = _grads(q, k, v, kw, g)
    for det in (False, True, False):
        _, _, again = _grads(q, k, v, kw, g, deterministic=det)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", "avx512")
    f32 = sk_backward(g, q, k, v, out, lse, kw)
    assert any(not torch.equal(a, b) for a, b in zip(first, f32))


def test_bf16_bwd_large_scores():
    # Scores around 1e4 (large q, k in bf16, scale 1): P near 0/1 everywhere, rows whose |lse|
    # passes kLseRecomputeAbove take the lse corrections (the bf16 forward kernel on the bf16
    # packed Q/K).
    torch.manual_seed(8)
    B, Hq, Hkv, Lq, Lk, D, Dv = 1, 2, 1, 70, 97, 64, 48
    q = (rand(B, Hq, Lq, D, dtype=torch.float64) * 40).to(DT)
    k = (rand(B, Hkv, Lk, D, dtype=torch.float64) * 40).to(DT)
    v = rand(B, Hkv, Lk, Dv, dtype=DT)
    check_parity(q, k, v, _kw(1.0, window=(-1, 0)))


def test_bf16_bwd_huge_lse_rows():
    # Rows that see keys only through finfo.min (|lse| ~ 3.4e38, lse_corrections), rows masked
    # out entirely by a bool mask (no key: zero gradients) and ordinary rows in one call.
    torch.manual_seed(9)
    B, Hq, Hkv, Lq, Lk, D, Dv = 1, 2, 2, 67, 70, 33, 40
    q, k, v = rand(B, Hq, Lq, D, dtype=DT), rand(B, Hkv, Lk, D, dtype=DT), rand(B, Hkv, Lk, Dv, dtype=DT)
    fm = torch.zeros(B, 1, Lq, Lk, dtype=DT)
    fm[:, :, 3:9] = torch.finfo(DT).min
    fm[:, :, 40, :35] = torch.finfo(DT).min
    check_parity(q, k, v, _kw(1.0 / math.sqrt(D), attn_mask=fm.expand(B, Hq, Lq, Lk)))
    bm = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    bm[:, :, 10:13] = False
    bm[:, :, 64] = False
    check_parity(q, k, v, _kw(1.0 / math.sqrt(D), attn_mask=bm.expand(B, Hq, Lq, Lk)))


def test_bf16_bwd_nan_query_row():
    # A NaN query row of query head 1 (kv head 0): dq is NaN in that row only; dK and dV of kv
    # head 0 are NaN at most where the reference's are (plain matmuls: 0 * NaN makes all of them
    # NaN), and kv head 1 is untouched and within the parity bound. With window (0, 1) the first
    # row that sees key block [64, 128) is 63; the bf16 kernel starts that block's query rows at
    # the even row 62, which holds the NaN (its dS and P there are 0, the products 0 * NaN).
    torch.manual_seed(10)
    B, Hq, Hkv, L, D = 1, 4, 2, 150, 32
    q, k, v = rand(B, Hq, L, D, dtype=DT), rand(B, Hkv, L, D, dtype=DT), rand(B, Hkv, L, D, dtype=DT)
    q[0, 1, 62] = float("nan")
    kw = _kw(1.0 / math.sqrt(D), window=(0, 1))
    out, lse = sk_forward(q, k, v, kw)
    g = rand(B, Hq, L, D, dtype=DT)
    dq, dk, dv = sk_backward(g, q, k, v, out, lse, kw)
    ref = attention_bwd_ref(g.double(), q.double(), k.double(), v.double(), **kw)
    base = attention_bwd_ref(g, q, k, v, **kw)
    report = compare(
        [dq, dk[:, 1:], dv[:, 1:]],
        [ref[0], ref[1][:, 1:], ref[2][:, 1:]],
        [base[0], base[1][:, 1:], base[2][:, 1:]],
        grad=True,
        name="grad",
    )
    assert report.passed, str(report)
    for got, want in ((dk, ref[1]), (dv, ref[2])):
        assert not (got.isnan() & ~want.isnan()).any()


def test_bf16_bwd_nonfinite_grad_beside_a_query_block():
    # The AMX backward starts each query block at a multiple of 32, so that the dK^T / dV^T
    # products' 32-column passes over a Q^T / dO^T row stay inside its Lq2 (Lq rounded up to 32)
    # columns. Bottom-right causal with Lk = Lq + 16 makes row 112 the first to see the keys from
    # 128 (the AMX path's second key block): a block started there (16 mod 32) would read 16
    # columns past the end of each dO^T row, that is rows 0..15 of the next head dim, against P
    # rows that are zero. Finite values add nothing there; the inf in grad_out's row 3, dim 5
    # would make dV[:, 4] NaN for those keys, where the reference's dV[:, 4] is finite (its plain
    # products meet the inf in dV[:, 5] only).
    torch.manual_seed(11)
    B, H, Lq, D = 1, 1, 160, 32
    Lk = Lq + 16
    q, k, v = rand(B, H, Lq, D, dtype=DT), rand(B, H, Lk, D, dtype=DT), rand(B, H, Lk, D, dtype=DT)
    g = rand(B, H, Lq, D, dtype=DT)
    g[0, 0, 3, 5] = float("inf")
    kw = _kw(1.0 / math.sqrt(D), window=(-1, 0), bottom_right=True)
    out, lse = sk_forward(q, k, v, kw)
    dq, dk, dv = sk_backward(g, q, k, v, out, lse, kw)
    ref = attention_bwd_ref(g.double(), q.double(), k.double(), v.double(), **kw)
    base = attention_bwd_ref(g, q, k, v, **kw)
    assert not (dv.isnan() & ~ref[2].isnan()).any()
    cols = [c for c in range(D) if c != 5]
    report = compare([dv[..., cols]], [ref[2][..., cols]], [base[2][..., cols]], grad=True, name="dv")
    assert report.passed, str(report)


@pytest.mark.parametrize(
    "mods",
    [dict(softcap=3.0), dict(alibi=True), dict(sinks=True), dict(softcap=2.0, alibi=True, sinks=True), {}],
    ids=["softcap", "alibi", "sinks", "all", "none"],
)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_bf16_bwd_modifiers_public_api(mods, packed):
    # The public op through autograd (odd head dims, GQA 4, a window), forward and backward,
    # against the float64 reference by the parity rule.
    g = torch.Generator().manual_seed(31)
    mods = dict(mods)
    kw = dict(causal=True, window=(40, -1))
    if mods.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(2 if not packed else 4, 4, generator=g) * 0.3
    sinks = torch.randn(4, generator=g) if mods.pop("sinks", False) else None
    kw.update(mods)
    cu_lens = ([1, 0, 65, 64], [33, 2, 65, 97]) if packed else None
    check_public_parity(kw, sinks, (4, 1, 17, 15), (65, 97), cu_lens, seed=7, dtype=DT)

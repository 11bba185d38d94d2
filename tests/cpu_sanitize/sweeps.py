"""Boundary sweeps of the C++ CPU kernels, run inside the sanitized child process.

`run_family(ops, family, level)` is called by emulation.build.run_cpu_sanitized in a child Python
with libasan + libubsan preloaded; `ops.<op>` are the AddressSanitizer + UBSan builds of
csrc/cpu/*.cpp (torch.ops.seqkernels_cpu_kernels_asan_ubsan.<op>). Every result is compared with
the float64 reference (python/seqkernels/reference.py, loaded from its file so that the
uninstrumented seqkernels._C is never imported here) loosely: the point is memory errors, but a
result that is not finite or not close still fails.

The shapes come from the kernels' tile sizes, read from the sources (`tile_sizes`): lengths at
t - 1, t, t + 1, 2t - 1, 2t + 1 of every tile t (SIMD panel NR = 2W, register tile kMR, query and
key blocks of the forward and backward, the decode key/row tiles, the LSTM column block) and one
spanning 3+ blocks; head dims 1, W - 1, W, W + 1 (W = 8 lanes for 32-bit compute, 4 for float64);
float32, float64, bfloat16, float16. Keys past kv_lengths and cache slots past cache_seqlens hold
NaN, so a kernel that reads them into a result shows up as a NaN even where the read itself is in
bounds.

Levels: "ci" is a bounded sample in which every length, head dim, dtype and option still appears
(tests/test_cpu_sanitizers.py, default run); "full" is the whole cross product (`--run-slow`).
The instruction set path ("avx512", "avx2" or "portable") is selected through the environment variables
the kernels read (`select_isa`: SEQKERNELS_CPU_ISA).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import random
import re
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DTYPES = ("float32", "float64", "bfloat16", "float16")
# Tolerance of max |got - want| relative to max(1, max |want|), per dtype.
TOL = {"float32": 2e-4, "float64": 1e-9, "bfloat16": 4e-2, "float16": 1e-2}
FAMILIES = ("attention", "kv_cache", "lstm", "lstm_bf16")


# ------------------------------------------------------------------------------------------------
# Tile sizes, read from the kernels
# ------------------------------------------------------------------------------------------------
def _grab(path: str, name: str) -> int:
    text = (REPO / path).read_text()
    m = re.search(rf"\b{name}\s*=\s*(\d+)", text)
    if not m:
        raise AssertionError(f"tile constant {name} not found in {path}: update tests/cpu_sanitize/sweeps.py")
    return int(m.group(1))


def tile_sizes() -> dict:
    return {
        "kMR": _grab("csrc/cpu/attention.cpp", "kMR"),
        "fwd_BM": _grab("csrc/cpu/attention.cpp", "kFwdBM"),
        "fwd_BN": _grab("csrc/cpu/attention.cpp", "kFwdBN"),
        "bwd_BM": _grab("csrc/cpu/attention.cpp", "kBwdBM"),
        "bwd_BN": _grab("csrc/cpu/attention.cpp", "kBwdBN"),
        "kSlice": _grab("csrc/cpu/attention.cpp", "kSlice"),
        "key_tile": _grab("csrc/cpu/kv_cache.cpp", "kKeyTile"),
        "row_tile": _grab("csrc/cpu/kv_cache.cpp", "kRowTile"),
        "col_block": _grab("csrc/cpu/lstm_cell.cpp", "kColBlock"),
    }


def lanes(dtype: str) -> int:
    """SIMD lanes of the compute type: 8 floats (AVX2 and at::vec's 32-byte default), 4 doubles."""
    return 4 if dtype == "float64" else 8


def edges(t: int) -> set[int]:
    return {x for x in (t - 1, t, t + 1, 2 * t - 1, 2 * t + 1) if x >= 1}


def _pick(seq, n: int):
    return seq[n % len(seq)]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------
# Cases (plain dicts: printed as the reproducer when something fails)
# ------------------------------------------------------------------------------------------------
def attention_cases(level: str) -> list[dict]:
    t = tile_sizes()
    cases = []
    for dtype in DTYPES:
        W = lanes(dtype)
        NR = 2 * W
        lq = sorted({1} | edges(t["kMR"]) | edges(t["bwd_BM"]) | edges(t["fwd_BM"]) | {3 * t["fwd_BM"] + 1})
        lk = sorted(
            {1} | edges(NR) | edges(t["bwd_BN"]) | edges(t["kSlice"] * NR) | edges(t["fwd_BN"]) | {3 * t["fwd_BN"] + 1}
        )
        if level == "ci":
            # Every key length once, the query lengths cycling (both extremes included).
            pairs = [(lq[(i * 7) % len(lq)], L) for i, L in enumerate(lk)] + [(lq[-1], lk[-1])]
        else:
            pairs = list(itertools.product(lq, lk))
        dims = [1, W - 1, W, W + 1] + ([2 * W + 1] if level != "ci" else [])
        for n, (Lq, Lk) in enumerate(pairs):
            rnd = random.Random(_seed("attention", dtype, Lq, Lk, n))
            Hq, Hkv = _pick([(1, 1), (2, 1), (3, 1), (4, 2)], n)
            B = 2 if n % 3 else 1
            masks = ["none", "bool", "bool_bcast", "bool_keys", "float32", "float_q", "float_big", "none"]
            mask = _pick(masks, n + n // 8)
            kv = None
            if n % 4 == 1 or n % 4 == 2:
                cand = sorted({0, 1, Lk - 1, Lk, max(1, Lk - NR), min(Lk, NR + 1), Lk // 2})
                kv = [min(Lk, max(0, rnd.choice(cand))) for _ in range(B)]
                kv[0] = Lk - 1 if Lk > 1 else Lk
            windows = [(-1, -1), (-1, 0), (NR - 1, 0), (NR + 1, NR), (0, -1), (1, 2 * NR - 1), (-1, -1)]
            wl, wr = _pick(windows, n)
            cases.append(
                dict(
                    op="attention",
                    dtype=dtype,
                    B=B,
                    Hq=Hq,
                    Hkv=Hkv,
                    Lq=Lq,
                    Lk=Lk,
                    D=dims[n % len(dims)],
                    Dv=dims[(n + 1 + n // len(dims)) % len(dims)],
                    mask=mask,
                    kv_lengths=kv,
                    window=(wl, wr),
                    bottom_right=bool(rnd.getrandbits(1)) if (wl, wr) != (-1, -1) else bool(n % 2),
                    # The reference's Philox mask is slow in torch: dropout on the smaller shapes.
                    dropout=0.25 if n % 6 == 5 and Lq * Lk <= 8192 else 0.0,
                    layout=_pick(["contig", "bshd", "strided_d", "contig", "bcast_b"], n // 2),
                    threads=1 + (n % 2),
                    seed=_seed("attention-data", dtype, n, Lq, Lk),
                    mods=_pick(MOD_KINDS, n // 2 + n),
                )
            )
    # Dropout at tile edges (small: the reference's Philox mask is slow in torch).
    for dtype in DTYPES:
        NR = 2 * lanes(dtype)
        for n, (Lq, Lk) in enumerate(
            ((t["kMR"] + 1, NR + 1), (2 * t["kMR"] + 1, t["bwd_BN"] + 1), (t["fwd_BM"] + 1, 2 * NR + 1))
        ):
            cases.append(
                dict(
                    op="attention",
                    dtype=dtype,
                    B=1,
                    Hq=2,
                    Hkv=1,
                    Lq=Lq,
                    Lk=Lk,
                    D=lanes(dtype) + 1,
                    Dv=lanes(dtype) - 1,
                    mask=_pick(["none", "bool", "float32"], n),
                    kv_lengths=[Lk - 1] if n == 1 else None,
                    window=_pick([(-1, -1), (-1, 0), (3, 1)], n),
                    bottom_right=True,
                    dropout=0.25,
                    layout="contig",
                    threads=1 + n % 2,
                    seed=_seed("attention-dropout", dtype, Lq, Lk),
                    mods=_pick(["all", "none", "sinks"], n),
                )
            )
    # Degenerate shapes (the early returns and zero-filled gradients).
    for dtype in DTYPES:
        for Lq, Lk, kv in ((0, 5, None), (4, 0, None), (7, 19, [0, 0])):
            cases.append(
                dict(
                    op="attention",
                    dtype=dtype,
                    B=2,
                    Hq=2,
                    Hkv=1,
                    Lq=Lq,
                    Lk=Lk,
                    D=3,
                    Dv=5,
                    mask="none",
                    kv_lengths=kv,
                    window=(-1, -1),
                    bottom_right=True,
                    dropout=0.0,
                    layout="contig",
                    threads=2,
                    seed=_seed("attention-degenerate", dtype, Lq, Lk),
                    mods="all" if Lq else "none",
                )
            )
    # Score modifiers at the forward / backward block edges, with rows that see no key (the sink's
    # lse) and a -inf sink on one head.
    for dtype in DTYPES:
        for n, (Lq, Lk) in enumerate(
            (
                (t["fwd_BM"] + 1, t["fwd_BN"] - 1),
                (t["bwd_BM"] - 1, t["bwd_BN"] + 1),
                (t["kMR"] + 1, 1),
                (2 * t["kMR"] + 1, t["fwd_BN"] + 1),
            )
        ):
            cases.append(
                dict(
                    op="attention",
                    dtype=dtype,
                    B=2,
                    Hq=4,
                    Hkv=2,
                    Lq=Lq,
                    Lk=Lk,
                    D=lanes(dtype) + 1,
                    Dv=lanes(dtype) - 1 if lanes(dtype) > 1 else 1,
                    mask=_pick(["bool", "none", "float32", "float_big"], n),
                    kv_lengths=[Lk, max(0, Lk // 2)] if n % 2 else None,
                    window=_pick([(-1, 0), (-1, -1), (5, 0), (-1, 0)], n),
                    bottom_right=True,
                    dropout=0.0,
                    layout="contig",
                    threads=1 + n % 2,
                    seed=_seed("attention-mods", dtype, Lq, Lk),
                    mods=_pick(["all", "softcap", "alibi", "sinks"], n + 2),
                )
            )
    return cases


# Score modifiers of a case: none, each alone, all together (softcap 2.5, ALiBi slopes in
# [0.02, 0.32], sinks ~ N(0, 2) with head 0's at -inf when the case has several heads).
MOD_KINDS = ("none", "all", "softcap", "none", "alibi", "sinks")


def _modifiers(gen, c, B, Hq, dt):
    """(alibi_slopes (B, Hq), sinks (Hq,), softcap) in the accumulation type, as the ops take them."""
    import torch

    kind = c.get("mods", "none")
    acc = torch.float64 if dt == torch.float64 else torch.float32
    slopes = sinks = None
    softcap = 0.0
    if kind in ("all", "softcap"):
        softcap = 2.5
    if kind in ("all", "alibi"):
        slopes = (torch.rand((B, Hq), generator=gen, dtype=torch.float64) * 0.3 + 0.02).to(acc)
    if kind in ("all", "sinks"):
        sinks = (torch.randn((Hq,), generator=gen, dtype=torch.float64) * 2).to(acc)
        if Hq > 1:
            sinks[0] = -math.inf
    return slopes, sinks, softcap


def kv_cache_cases(level: str) -> list[dict]:
    t = tile_sizes()
    KT, RT = t["key_tile"], t["row_tile"]
    lens = sorted({0, 1} | edges(8) | edges(KT) | {3 * KT + 1})
    cases = []
    for dtype in DTYPES:
        dims = [1, 7, 8, 9, 17] + ([15, 16, 33, 65] if level != "ci" else [33, 65])
        # Query rows (Tq * G) at the row tile's edges.
        rows = [(1, 1), (2, 2), (5, 3), (RT - 1, 1), (RT // 2, 2), ((RT + 1) // 3 + 1, 3), (RT + 1, 1)]
        layouts = [0, 1, 3, 16]  # 0: contiguous, else the paged block size
        if level == "ci":
            combos = [(lens[i % len(lens)], _pick(rows, i), _pick(layouts, i + i // 4)) for i in range(len(lens) + 4)]
        else:
            combos = list(itertools.product(lens, rows, layouts))
        for n, (L, (Tq, G), bs) in enumerate(combos):
            rnd = random.Random(_seed("decode", dtype, L, Tq, G, bs, n))
            B = 2 if n % 3 else 1
            Hkv = 1 + (n % 2)
            lens_b = [L] + [rnd.choice(lens) for _ in range(B - 1)]
            cases.append(
                dict(
                    op="decode",
                    dtype=dtype,
                    B=B,
                    Hkv=Hkv,
                    G=G,
                    Tq=Tq,
                    D=dims[n % len(dims)],
                    Dv=dims[(n * 3 + 1) % len(dims)],
                    lens=lens_b,
                    block_size=bs,
                    extra=_pick([0, 0, 3, 1], n),
                    splits=_pick([1, 3, 1, 2], n // 2),
                    window_left=_pick([-1, -1, 0, 5, KT + 3], n),
                    q_layout=_pick(["contig", "strided"], n // 3),
                    threads=1 + (n % 2),
                    seed=_seed("decode-data", dtype, n, L),
                    mods=_pick(MOD_KINDS, n + n // 6),
                )
            )
        # Appends: the last token exactly at the end of the cache, one past it, all past it, and
        # across block edges; strided new tokens.
        T_list = [1, 3, 17]
        cap_list = [KT, KT + 1, 7]
        combos = list(itertools.product(T_list, cap_list, layouts, range(4)))
        if level == "ci":
            combos = combos[::5]
        for n, (T, cap, bs, where) in enumerate(combos):
            cases.append(
                dict(
                    op="append",
                    dtype=dtype,
                    B=2,
                    Hkv=1 + (n % 2),
                    T=T,
                    capacity=cap,
                    block_size=bs,
                    where=where,
                    D=_pick(dims, n),
                    Dv=_pick(dims, n + 2),
                    new_layout=_pick(["contig", "strided", "bshd"], n),
                    threads=1 + (n % 2),
                    seed=_seed("append-data", dtype, n, T, cap, bs),
                )
            )
    return cases


def lstm_cases(level: str) -> list[dict]:
    t = tile_sizes()
    CB = t["col_block"]
    cases = []
    for dtype in DTYPES:
        W = lanes(dtype)
        hs = sorted({1, 2} | edges(W) | edges(2 * W) | edges(4 * W) | {CB - 1, CB, CB + 1, 2 * CB + 1})
        if level == "ci":
            hs = sorted({1, W - 1, W, W + 1, 2 * W + 1, CB + 1})
        for n, H in enumerate(hs):
            for v in range(1 if level == "ci" else 3):
                m = n + v
                cases.append(
                    dict(
                        op="cell",
                        dtype=dtype,
                        B=_pick([1, 3, 2], m),
                        H=H,
                        bias=_pick(["both", "none", "ih", "hh"], m),
                        rows=_pick(["contig", "padded", "contig", "bcast"], m // 2),
                        grads=_pick(["both", "hy", "cy", "none"], m + m // 4),
                        threads=1 + (m % 2),
                        seed=_seed("lstm-cell", dtype, H, v),
                    )
                )
    for dtype in ("float32", "float64"):
        hs = [1, 7, 9, 33, 64, 71] if level == "ci" else [1, 3, 7, 8, 9, 31, 33, 63, 64, 65, 71, 100]
        for n, H in enumerate(hs):
            for v in range(1 if level == "ci" else 2):
                m = n + v
                cases.append(
                    dict(
                        op="layer",
                        dtype=dtype,
                        T=_pick([3, 1, 2], m),
                        B=_pick([2, 1, 3], m),
                        H=H,
                        bias=bool(m % 2),
                        reverse=bool((m // 2) % 2),
                        threads=2,
                        seed=_seed("lstm-layer", dtype, H, v),
                    )
                )
    return cases


def lstm_bf16_cases(level: str) -> list[dict]:
    """The bf16 LSTM sequence kernel (lstm_layer_fwd.fused on bf16, and lstm_layer_fwd.backward on its
    training states), on AMX tiles or vdpbf16ps: H
    around its 16-unit blocks, B around the tiles' 16- and 32-row groups and the dot engine's
    6-row register tiles, T past a projection chunk (Tc = 16 at B = 16, 64 at B <= 4 or odd B < 16).
    ASan sees the epilogue's reads and writes (the projection rows, bias, cell state, outputs, the
    padded h buffer) and the dot engine's loads, not the tile loads and stores."""
    shapes = [(3, 1, 7, 1), (17, 16, 33, 17), (2, 33, 32, 31), (66, 3, 40, 16)]
    if level != "ci":
        shapes += [(5, 15, 9, 15), (4, 31, 64, 33), (3, 64, 17, 48), (2, 17, 96, 130)]
    return [
        dict(
            op="layer_bf16",
            dtype="bfloat16",
            T=T,
            B=B,
            I=I,
            H=H,
            bias=bool(n % 2),
            reverse=bool(n // 2 % 2),
            threads=2,
            seed=_seed("lstm-bf16", "bfloat16", H, n),
        )
        for n, (T, B, I, H) in enumerate(shapes)
    ]


CASES = {"attention": attention_cases, "kv_cache": kv_cache_cases, "lstm": lstm_cases, "lstm_bf16": lstm_bf16_cases}


# ------------------------------------------------------------------------------------------------
# Child side
# ------------------------------------------------------------------------------------------------
def load_reference():
    """python/seqkernels/reference.py as a standalone module: plain torch, no seqkernels._C."""
    spec = importlib.util.spec_from_file_location(
        "_sk_reference_standalone", REPO / "python" / "seqkernels" / "reference.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dt(name):
    import torch

    return getattr(torch, name)


def _randn(gen, shape, dtype, layout="contig", scale=1.0):
    """A tensor of `shape` in one of several memory layouts (the kernels take any strides)."""
    import torch

    if layout == "bshd" and len(shape) == 4:
        B, H, L, D = shape
        x = torch.randn((B, L, H, D), generator=gen, dtype=torch.float64).transpose(1, 2)
    elif layout == "strided_d":
        x = torch.randn(tuple(shape[:-1]) + (2 * shape[-1],), generator=gen, dtype=torch.float64)[..., ::2]
    elif layout == "strided":  # rows padded: last dim contiguous, larger row stride
        x = torch.randn(tuple(shape[:-1]) + (shape[-1] + 3,), generator=gen, dtype=torch.float64)
        x = x[..., : shape[-1]]
    elif layout == "bcast_b" and len(shape) == 4:
        x = torch.randn((1,) + tuple(shape[1:]), generator=gen, dtype=torch.float64).expand(shape)
    else:
        x = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    return (x * scale).to(dtype)


def _check(failures: list, case: dict, name: str, got, want, tol: float, allow_inf: bool = False) -> None:
    import torch

    g, w = got.double(), want.double()
    if g.shape != w.shape:
        failures.append(f"{name}: shape {tuple(g.shape)} != reference {tuple(w.shape)} in {case}")
        return
    if torch.isnan(g).any() and not torch.isnan(w).any():
        failures.append(f"{name}: NaN in the result (reference has none) in {case}")
        return
    fin = torch.isfinite(w)
    if not torch.equal(torch.isfinite(g), fin) or (allow_inf and not torch.equal(g[~fin], w[~fin])):
        failures.append(f"{name}: non-finite entries differ from the reference in {case}")
        return
    if not allow_inf and not bool(fin.all()):
        failures.append(f"{name}: reference not finite in {case}")
        return
    if fin.any():
        err = (g[fin] - w[fin]).abs().max().item()
        scale = max(1.0, w[fin].abs().max().item())
        if not err <= tol * scale:
            failures.append(f"{name}: max error {err:.3g} > {tol:g} * {scale:.3g} in {case}")


def _attention_mask(gen, c, dtype):
    import torch

    B, Hq, Lq, Lk = c["B"], c["Hq"], c["Lq"], c["Lk"]
    kind = c["mask"]
    if kind == "none":
        return None
    if kind == "bool":
        m = torch.rand((B, Hq, Lq, Lk), generator=gen) < 0.8
    elif kind == "bool_bcast":
        m = (torch.rand((1, 1, Lq, Lk), generator=gen) < 0.7).expand(B, Hq, Lq, Lk)
    elif kind == "bool_keys":
        m = (torch.rand((B, 1, 1, Lk), generator=gen) < 0.75).expand(B, Hq, Lq, Lk)
    elif kind == "float32":
        m = torch.randn((B, 1, Lq, Lk), generator=gen).expand(B, Hq, Lq, Lk)
    elif kind == "float_q":
        m = torch.randn((1, Hq, Lq, Lk), generator=gen).to(dtype).expand(B, Hq, Lq, Lk)
    elif kind == "float_big":
        # A large common offset: |lse| past the backward's recompute threshold (lse_corrections).
        off = -1e4 if dtype == torch.float64 else -1e3
        m = (torch.randn((B, Hq, Lq, Lk), generator=gen, dtype=torch.float64) + off).to(
            dtype if dtype in (torch.float64, torch.float32) else torch.float32
        )
    else:
        raise ValueError(kind)
    return m


def _run_attention(ops, ref, c, failures):
    import torch

    dt = _dt(c["dtype"])
    gen = torch.Generator().manual_seed(c["seed"])
    B, Hq, Hkv, Lq, Lk, D, Dv = (c[x] for x in ("B", "Hq", "Hkv", "Lq", "Lk", "D", "Dv"))
    layout = c["layout"]
    kv_layout = "contig" if (layout == "bcast_b" and c["kv_lengths"] is not None) else layout
    q = _randn(gen, (B, Hq, Lq, D), dt, "contig" if layout == "bcast_b" else layout)
    k = _randn(gen, (B, Hkv, Lk, D), dt, kv_layout)
    v = _randn(gen, (B, Hkv, Lk, Dv), dt, kv_layout)
    kv = None
    if c["kv_lengths"] is not None:
        kv = torch.tensor(c["kv_lengths"], dtype=torch.int32)
        for b, n in enumerate(c["kv_lengths"]):
            k[b, :, n:] = float("nan")  # padded keys: must never reach a result
            v[b, :, n:] = float("nan")
    mask = _attention_mask(gen, c, dt)
    scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    wl, wr = c["window"]
    br, p = c["bottom_right"], c["dropout"]
    args = dict(
        attn_mask=mask,
        kv_lengths=kv,
        scale=scale,
        window_left=wl,
        window_right=wr,
        bottom_right=br,
        dropout_p=p,
        seed=c["seed"],
        offset=0,
    )
    slopes, sinks, softcap = mods = _modifiers(gen, c, B, Hq, dt)
    out, lse = ops.attention_fwd(q, k, v, mask, kv, scale, wl, wr, br, p, c["seed"], 0, *mods)
    dout = _randn(gen, (B, Hq, Lq, Dv), dt)
    # Forward and backward reference in one autograd pass (attention_bwd_ref's math without its
    # second forward).
    with torch.enable_grad():
        q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
        s64 = None if sinks is None else sinks.detach().double().requires_grad_(True)
        ref_out, ref_lse = ref.attention_ref(
            q64,
            k64,
            v64,
            **args,
            softcap=softcap or None,
            alibi_slopes=None if slopes is None else slopes.double(),
            sinks=s64,
        )
        leaves = (q64, k64, v64) + (() if s64 is None else (s64,))
        grads = torch.autograd.grad(ref_out, leaves, dout.double(), allow_unused=True)
    rq, rk, rv, *rs = (torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves))
    ref_out, ref_lse = ref_out.detach(), ref_lse.detach()
    tol = TOL[c["dtype"]]
    _check(failures, c, "attention_fwd out", out, ref_out, tol)
    _check(
        failures, c, "attention_fwd lse", lse, ref_lse, max(tol, 1e-4) if dt != torch.float64 else tol, allow_inf=True
    )
    dq, dk, dv, ds = ops.attention_bwd(
        dout, q, k, v, out, lse, mask, kv, scale, wl, wr, br, p, c["seed"], 0, False, *mods
    )
    gtol = tol * (2 if dt in (torch.bfloat16, torch.float16) else 1)
    _check(failures, c, "attention_bwd dq", dq, rq, gtol)
    _check(failures, c, "attention_bwd dk", dk, rk, gtol)
    _check(failures, c, "attention_bwd dv", dv, rv, gtol)
    if sinks is not None:
        # A sum over every row of a head: its scale is the row count's.
        _check(failures, c, "attention_bwd dsinks", ds, rs[0], gtol * max(1, B * Lq) ** 0.5)
    elif ds.numel() != 0:
        failures.append(f"attention_bwd dsinks: expected an empty tensor without sinks, got {tuple(ds.shape)} in {c}")


def _paged_cache(gen, c, S_cap, D, dt, lens, fill_tokens):
    """A cache of capacity S_cap per sequence (contiguous, or paged with c["block_size"]) holding
    NaN everywhere but the first lens[b] positions, which get fill_tokens[b, :, p]. Returns
    (cache, block_table or None, logical positions -> (outer, slot) map)."""
    import torch

    B, Hkv, bs = c["B"], c["Hkv"], c["block_size"]
    if bs == 0:
        cache = torch.full((B, Hkv, S_cap, D), float("nan"), dtype=dt)
        for b in range(B):
            cache[b, :, : lens[b]] = fill_tokens[b, :, : lens[b]].to(dt)
        return cache, None
    max_blocks = max(1, -(-S_cap // bs))
    num_blocks = B * max_blocks + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    cache = torch.full((num_blocks, Hkv, bs, D), float("nan"), dtype=dt)
    for b in range(B):
        for col in range(max_blocks):
            blk = perm[b * max_blocks + col]
            table[b, col] = blk
            for s in range(bs):
                p = col * bs + s
                if p < lens[b]:
                    cache[blk, :, s] = fill_tokens[b, :, p].to(dt)
    return cache, table


def _run_decode(ops, ref, c, failures):
    import torch

    dt = _dt(c["dtype"])
    gen = torch.Generator().manual_seed(c["seed"])
    B, Hkv, G, Tq, D, Dv = (c[x] for x in ("B", "Hkv", "G", "Tq", "D", "Dv"))
    lens = c["lens"]
    S_cap = max(max(lens), 1) + c["extra"]
    bs = c["block_size"]
    if bs:
        S_cap = -(-S_cap // bs) * bs if c["extra"] == 0 else S_cap  # exactly full blocks, or not
    ktok = torch.randn((B, Hkv, S_cap, D), generator=gen, dtype=torch.float64)
    vtok = torch.randn((B, Hkv, S_cap, Dv), generator=gen, dtype=torch.float64)
    kc, table = _paged_cache(gen, c, S_cap, D, dt, lens, ktok)
    gen2 = torch.Generator().manual_seed(c["seed"])  # the same block permutation for V
    _ = torch.randn((B, Hkv, S_cap, D), generator=gen2, dtype=torch.float64)
    _ = torch.randn((B, Hkv, S_cap, Dv), generator=gen2, dtype=torch.float64)
    vc, table_v = _paged_cache(gen2, c, S_cap, Dv, dt, lens, vtok)
    assert table is None or torch.equal(table, table_v)
    q = _randn(gen, (B, Hkv * G, Tq, D), dt, c["q_layout"])
    seqlens = torch.tensor(lens, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)
    slopes, sinks, softcap = mods = _modifiers(gen, c, B, Hkv * G, dt)
    out, lse = ops.decode_attention(q, kc, vc, seqlens, table, scale, c["window_left"], -1, c["splits"], *mods)
    ref_out, ref_lse = ref.decode_attention_ref(
        q.double(),
        kc.double(),
        vc.double(),
        seqlens,
        block_table=table,
        scale=scale,
        window_left=c["window_left"],
        window_right=-1,
        softcap=softcap or None,
        alibi_slopes=None if slopes is None else slopes.double(),
        sinks=None if sinks is None else sinks.double(),
    )
    tol = TOL[c["dtype"]]
    _check(failures, c, "decode_attention out", out, ref_out, tol)
    _check(
        failures,
        c,
        "decode_attention lse",
        lse,
        ref_lse,
        max(tol, 1e-4) if dt != torch.float64 else tol,
        allow_inf=True,
    )


def _run_append(ops, ref, c, failures):
    import torch

    dt = _dt(c["dtype"])
    gen = torch.Generator().manual_seed(c["seed"])
    B, Hkv, T, D, Dv, cap, bs = (c[x] for x in ("B", "Hkv", "T", "D", "Dv", "capacity", "block_size"))
    # where: 0 the last token lands on the last slot, 1 one past the end, 2 every token past it,
    # 3 from position 0 (the first block) with the other sequence at the end.
    start = {0: cap - T, 1: cap - T + 1, 2: cap, 3: 0}[c["where"]]
    lens = [max(start, 0), max(cap - T, 0) if c["where"] == 3 else max(start - 1, 0)]
    full = torch.randn((B, Hkv, cap, max(D, Dv)), generator=gen, dtype=torch.float64)
    kc, table = _paged_cache(gen, c, cap, D, dt, [cap] * B, full[..., :D])
    vc, _ = (None, None)
    if table is None:
        vc = torch.full((B, Hkv, cap, Dv), -7.0, dtype=dt)
    else:
        vc = torch.full((kc.shape[0], Hkv, bs, Dv), -7.0, dtype=dt)
        # Unused table columns: -1 (skipped), like a sequence that has not grown that far.
        table[1, -1] = -1
    kn = _randn(gen, (B, Hkv, T, D), dt, c["new_layout"])
    vn = _randn(gen, (B, Hkv, T, Dv), dt, c["new_layout"])
    seqlens = torch.tensor(lens, dtype=torch.int32)
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    ops.kv_cache_append(k1, v1, kn, vn, seqlens, table)
    ref.kv_cache_append_ref(k2, v2, kn, vn, seqlens, table)
    for name, got, want in (("kv_cache_append k_cache", k1, k2), ("kv_cache_append v_cache", v1, v2)):
        if not torch.equal(torch.isnan(got), torch.isnan(want)) or not torch.equal(
            torch.nan_to_num(got, nan=0.0), torch.nan_to_num(want, nan=0.0)
        ):
            failures.append(f"{name}: differs from the reference in {c}")


def _lstm_rows(gen, B, cols, dt, how):
    import torch

    if how == "padded":
        return torch.randn((B, cols + 5), generator=gen, dtype=torch.float64)[:, :cols].to(dt)
    if how == "bcast" and B > 1:
        return torch.randn((1, cols), generator=gen, dtype=torch.float64).expand(B, cols).to(dt)
    return torch.randn((B, cols), generator=gen, dtype=torch.float64).to(dt)


def _run_lstm_cell(ops, ref, c, failures):
    import torch

    dt = _dt(c["dtype"])
    gen = torch.Generator().manual_seed(c["seed"])
    B, H = c["B"], c["H"]
    ig = _lstm_rows(gen, B, 4 * H, dt, c["rows"])
    hg = _lstm_rows(gen, B, 4 * H, dt, "contig" if c["rows"] == "padded" else c["rows"])
    cx = _lstm_rows(gen, B, H, dt, c["rows"])
    bias = lambda: torch.randn(4 * H, generator=gen, dtype=torch.float64).to(dt)  # noqa: E731
    bih = bias() if c["bias"] in ("both", "ih") else None
    bhh = bias() if c["bias"] in ("both", "hh") else None
    hy, cy, ws = ops.lstm_cell_fwd(ig, hg, cx, bih, bhh)
    d = lambda x: None if x is None else x.double()  # noqa: E731
    rhy, rcy, rws = ref.lstm_cell_fwd_ref(d(ig), d(hg), d(cx), d(bih), d(bhh))
    tol = TOL[c["dtype"]]
    _check(failures, c, "lstm_cell_fwd hy", hy, rhy, tol)
    _check(failures, c, "lstm_cell_fwd cy", cy, rcy, tol)
    _check(failures, c, "lstm_cell_fwd workspace", ws, rws, tol)
    ghy = _lstm_rows(gen, B, H, dt, c["rows"]) if c["grads"] in ("both", "hy") else None
    gcy = _lstm_rows(gen, B, H, dt, "padded") if c["grads"] in ("both", "cy") else None
    gg, gcx = ops.lstm_cell_bwd(ghy, gcy, cx, cy, ws)
    rgg, rgcx = ref.lstm_cell_bwd_ref(d(ghy), d(gcy), d(cx), d(cy), d(ws))
    _check(failures, c, "lstm_cell_bwd grad_gates", gg, rgg, tol)
    _check(failures, c, "lstm_cell_bwd grad_cx", gcx, rgcx, tol)


def _run_lstm_layer(ops, ref, c, failures):
    import torch

    dt = _dt(c["dtype"])
    gen = torch.Generator().manual_seed(c["seed"])
    T, B, H = c["T"], c["B"], c["H"]
    ig = torch.randn((T, B, 4 * H), generator=gen, dtype=torch.float64).to(dt)
    h0 = torch.randn((B, H), generator=gen, dtype=torch.float64).to(dt)
    c0 = torch.randn((B, H), generator=gen, dtype=torch.float64).to(dt)
    w = (torch.randn((4 * H, H), generator=gen, dtype=torch.float64) / math.sqrt(H)).to(dt)
    bias = torch.randn(4 * H, generator=gen, dtype=torch.float64).to(dt) if c["bias"] else None
    out, hn, cn = ops.lstm_layer_fwd(ig, h0, c0, w, bias, c["reverse"])
    rout, rhn, rcn = ref.lstm_layer_fwd_ref(
        ig.double(), h0.double(), c0.double(), w.double(), None if bias is None else bias.double(), c["reverse"]
    )
    tol = TOL[c["dtype"]] * 10  # T steps of GEMM + cell rounding
    _check(failures, c, "lstm_layer_fwd out", out, rout, tol)
    _check(failures, c, "lstm_layer_fwd h_n", hn, rhn, tol)
    _check(failures, c, "lstm_layer_fwd c_n", cn, rcn, tol)


def _run_lstm_layer_bf16(ops, ref, c, failures):
    import torch

    gen = torch.Generator().manual_seed(c["seed"])
    T, B, n_in, H = c["T"], c["B"], c["I"], c["H"]
    r = lambda *shape, s=1.0: (torch.randn(shape, generator=gen, dtype=torch.float64) * s).bfloat16()  # noqa: E731
    x, h0, c0 = r(T, B, n_in), r(B, H), r(B, H)
    w_ih, w_hh = r(4 * H, n_in, s=n_in**-0.5), r(4 * H, H, s=H**-0.5)
    bias = r(4 * H) if c["bias"] else None
    out, hn, cn, _, _ = ops.lstm_layer_fwd.fused(x, h0, c0, w_ih, w_hh, bias, c["reverse"], False)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    rout, rhn, rcn = ref.lstm_layer_fwd_ref(d(x) @ d(w_ih).t(), d(h0), d(c0), d(w_hh), d(bias), c["reverse"])
    tol = TOL["bfloat16"]
    _check(failures, c, "lstm_layer_fwd.fused out", out, rout, tol)
    _check(failures, c, "lstm_layer_fwd.fused h_n", hn, rhn, tol)
    _check(failures, c, "lstm_layer_fwd.fused c_n", cn, rcn, tol)
    # The training forward's saved states and the bf16 backward on them (grad_cn absent: zeros),
    # against the step-by-step float64 recurrence on the same bf16 states.
    _, _, _, ws, cs = ops.lstm_layer_fwd.fused(x, h0, c0, w_ih, w_hh, bias, c["reverse"], True)
    go, ghn = r(T, B, H), r(B, H)
    gg, gh0, gc0 = ops.lstm_layer_fwd.backward(go, ghn, None, ws, cs, c0, w_hh, c["reverse"])
    gh, gc, rgg = d(ghn), torch.zeros(B, H, dtype=torch.float64), torch.empty(T, B, 4 * H, dtype=torch.float64)
    for t in range(T) if c["reverse"] else range(T - 1, -1, -1):
        gh = gh + d(go[t])
        c_prev = c0 if t == (T - 1 if c["reverse"] else 0) else cs[t + 1 if c["reverse"] else t - 1]
        rgg[t], gc = ref.lstm_cell_bwd_ref(gh, gc, d(c_prev), d(cs[t]), d(ws[t]))
        gh = rgg[t] @ d(w_hh)
    _check(failures, c, "lstm_layer_fwd.backward grad_gates", gg, rgg, tol * 4)
    _check(failures, c, "lstm_layer_fwd.backward grad_h0", gh0, gh, tol * 4)
    _check(failures, c, "lstm_layer_fwd.backward grad_c0", gc0, gc, tol * 4)


RUNNERS = {
    "attention": _run_attention,
    "decode": _run_decode,
    "append": _run_append,
    "cell": _run_lstm_cell,
    "layer": _run_lstm_layer,
    "layer_bf16": _run_lstm_layer_bf16,
}


# How each kernel family is sent down its portable path, as the real extension reads it:
# every family reads SEQKERNELS_CPU_ISA=portable on every call (csrc/cpu/simd.h; the older
# spelling "default" is taken too).
PORTABLE_ENV = {
    "attention": ("SEQKERNELS_CPU_ISA", "portable"),
    "kv_cache": ("SEQKERNELS_CPU_ISA", "portable"),
    "lstm": ("SEQKERNELS_CPU_ISA", "portable"),
    "lstm_bf16": ("SEQKERNELS_CPU_ISA", "portable"),
}


def select_isa(family: str, isa: str) -> None:
    """Point `family`'s kernels at the AVX-512, AVX2 or portable path, through the environment the
    kernels read (SEQKERNELS_CPU_ISA; a level above the CPU's falls back to the best it has)."""

    var, value = PORTABLE_ENV[family]
    if isa == "portable":
        os.environ[var] = value
    elif isa == "avx2":
        os.environ[var] = isa  # forced, so an AVX-512 machine still runs the AVX2 code
    elif isa == "amx":
        os.environ[var] = "amx_bf16"  # the AMX-BF16 tiles of the bf16 kernels (where the CPU has them)
    elif isa == "avx512":
        # The highest AVX-512 level: AVX512_BF16 (the bf16 attention's and LSTM's dot paths) where
        # the CPU has it, plain AVX-512 elsewhere (a request above the CPU's level falls back).
        os.environ[var] = "avx512_bf16"
    else:
        raise ValueError(f"isa must be 'amx', 'avx512', 'avx2' or 'portable', got {isa!r}")


def run_family(ops, family: str, level: str, isa: str, shard: int = 0, nshards: int = 1) -> None:
    """Child entry point: every case of `family` at `level` (cases i with i % nshards == shard)
    through the sanitized ops, on the `isa` path. Each case is announced on stderr before it
    runs, so a sanitizer report (which ends the process) follows the line naming its reproducer."""
    import torch

    select_isa(family, isa)
    ref = load_reference()
    cases = CASES[family](level)[shard::nshards]
    failures: list[str] = []
    t0 = time.time()
    for i, c in enumerate(cases):
        sys.stderr.write(f"[cpu-sanitize] {family} ({isa} path) {i}: {c}\n")
        sys.stderr.flush()
        torch.set_num_threads(c.get("threads", 1))
        RUNNERS[c["op"]](ops, ref, c, failures)
    torch.set_num_threads(1)
    print(
        f"cpu-sanitize sweep {family} ({level}, {isa} path, shard {shard}/{nshards}): {len(cases)} cases "
        f"in {time.time() - t0:.1f} s, {len(failures)} mismatches"
    )
    if failures:
        raise AssertionError(f"{len(failures)} results differ from the reference:\n" + "\n".join(failures[:20]))

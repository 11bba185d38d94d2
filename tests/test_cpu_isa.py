"""The CPU kernels on every instruction-set level this machine supports (issue 21).

cpu/simd.h picks the highest path the CPU and OS support; SEQKERNELS_CPU_ISA=portable|avx2|avx512|
avx512_bf16|amx_bf16 lowers it (avx512_bf16 and amx_bf16 differ from avx512 in the bf16 attention
only). Each level runs in its own subprocess (the variable is set before anything loads the
extension, as a user would set it), running attention (forward and backward, padded and packed),
decode attention and the LSTM kernels against the
float64 reference by the parity rule (seqkernels.testing.compare). Levels this CPU lacks are skipped
with the reason; asking for one of them must fall back to the best supported level, not crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from seqkernels import _ext, cli, reference, testing

LEVELS = ["portable", "avx2", "avx512", "avx512_bf16", "amx_bf16"]

pytestmark = pytest.mark.skipif(not _ext.extension_available(), reason="seqkernels._C is not built")


def _supported() -> list[str]:
    rep = cli.cpu_isa_report()
    return [] if rep is None else rep["supported"]


def _run_worker(isa: str, *args: str) -> dict:
    env = dict(os.environ, SEQKERNELS_CPU_ISA=isa)
    proc = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"worker under SEQKERNELS_CPU_ISA={isa} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Worker: runs in the subprocess.

# (B, Hq, Hkv, Tq, D, Dv, S, paged, window_left, num_splits, softcap, alibi): head sizes that are
# and are not multiples of 4, 8 and 16 (the float64 AVX2 / AVX-512 and float32 tails), several rows
# per KV head (the register blocks of 1, 2, 4 and 6 query rows), splits, a paged cache and the
# score modifiers.
DECODE_CASES = [
    (2, 8, 2, 1, 128, 128, 150, False, -1, 1, 0.0, False),
    (2, 32, 8, 1, 64, 64, 97, True, -1, 3, 0.0, False),
    (3, 8, 1, 1, 17, 33, 71, False, -1, 2, 0.0, False),
    (2, 4, 1, 3, 40, 24, 60, False, 5, 2, 0.0, False),
    (1, 6, 1, 2, 80, 72, 130, True, -1, 1, 0.0, False),
    (2, 12, 2, 1, 24, 8, 45, False, -1, 1, 1.5, True),
    (2, 4, 2, 1, 256, 200, 40, False, -1, 1, 0.0, False),
]
DECODE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _decode_case(case, dtype, gen):
    B, Hq, Hkv, Tq, D, Dv, S, paged, wl, splits, cap, alibi = case
    q = torch.randn(B, Hq, Tq, D, generator=gen, dtype=torch.float64)
    lens = torch.randint(Tq, S + 1, (B,), generator=gen, dtype=torch.int32)
    lens[0] = S
    if paged:
        bs = 16
        nb = -(-S // bs)
        kc = torch.randn(B * nb + 2, Hkv, bs, D, generator=gen, dtype=torch.float64)
        vc = torch.randn(B * nb + 2, Hkv, bs, Dv, generator=gen, dtype=torch.float64)
        table = torch.randperm(B * nb + 2, generator=gen)[: B * nb].view(B, nb).to(torch.int32)
    else:
        kc = torch.randn(B, Hkv, S, D, generator=gen, dtype=torch.float64)
        vc = torch.randn(B, Hkv, S, Dv, generator=gen, dtype=torch.float64)
        table = None
    slopes = (torch.rand(B, Hq, generator=gen) * 0.3) if alibi else None
    q, kc, vc = (t.to(dtype) for t in (q, kc, vc))
    return q, kc, vc, lens, table, wl, splits, cap, slopes


def _decode_ref(q, kc, vc, lens, table, wl, cap, slopes, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return reference.decode_attention_ref(
        q.to(dtype),
        kc.to(dtype),
        vc.to(dtype),
        lens,
        block_table=table,
        window_left=wl,
        window_right=0,
        softcap=cap or None,
        alibi_slopes=None if slopes is None else slopes.to(acc),
    )


def _worker_decode() -> list[str]:
    import seqkernels

    failures = []
    gen = torch.Generator().manual_seed(21)
    for i, case in enumerate(DECODE_CASES):
        for dtype in DECODE_DTYPES:
            q, kc, vc, lens, table, wl, splits, cap, slopes = _decode_case(case, dtype, gen)
            kw = {"softcap": cap} if cap else {}
            if slopes is not None:
                kw["alibi_slopes"] = slopes
            out = seqkernels.decode_attention(
                q,
                kc,
                vc,
                lens,
                block_table=table,
                window=None if wl < 0 else wl,
                num_splits=splits,
                return_lse=True,
                backend="cpu",
                **kw,
            )
            ref = _decode_ref(q, kc, vc, lens, table, wl, cap, slopes, torch.float64)
            base = _decode_ref(q, kc, vc, lens, table, wl, cap, slopes, dtype)
            report = testing.compare(tuple(out), ref, base)
            if not report.passed:
                failures.append(f"decode case {i} {dtype}:\n{report}")
    # q * scale past float32's range, every score finite (the attention case of the same name).
    for dtype in (torch.float32, torch.bfloat16):
        q = (torch.randn(2, 4, 1, 16, generator=gen, dtype=torch.float64) * 1e38).to(dtype)
        k = (torch.randn(2, 2, 9, 16, generator=gen, dtype=torch.float64) * 1e-37).to(dtype)
        v = torch.randn(2, 2, 9, 16, generator=gen, dtype=torch.float64).to(dtype)
        lens = torch.tensor([9, 6], dtype=torch.int32)
        out = seqkernels.decode_attention(q, k, v, lens, scale=4.0, return_lse=True, backend="cpu")
        res = [[], []]
        for b in range(2):
            for j, dt in enumerate((torch.float64, dtype)):
                kb, vb = (t[b : b + 1, :, : lens[b]].to(dt) for t in (k, v))
                o, lse = seqkernels.attention(
                    q[b : b + 1].to(dt), kb, vb, scale=4.0, return_lse=True, backend="reference"
                )
                res[j].append((o, lse))
        ref, base = (tuple(torch.cat([r[n] for r in rs]) for n in range(2)) for rs in res)
        report = testing.compare(tuple(out), ref, base)
        if not report.passed:
            failures.append(f"decode, q * scale overflowing {dtype}:\n{report}")
    return failures


def _worker_lstm() -> list[str]:
    import seqkernels

    failures = []
    gen = torch.Generator().manual_seed(7)
    for B, n_in, H in [(3, 17, 5), (5, 40, 33), (2, 16, 64), (4, 7, 520)]:
        for dtype in [torch.float32, torch.bfloat16, torch.float16, torch.float64]:
            t = [
                torch.randn(B, n_in, generator=gen),
                torch.randn(B, H, generator=gen),
                torch.randn(B, H, generator=gen),
                torch.randn(4 * H, n_in, generator=gen) / n_in**0.5,
                torch.randn(4 * H, H, generator=gen) / H**0.5,
                torch.randn(4 * H, generator=gen) * 0.5,
                torch.randn(4 * H, generator=gen) * 0.5,
            ]
            args = [x.to(dtype) for x in t]
            got = seqkernels.lstm_cell(*args, backend="cpu")
            ref = reference.lstm_cell_ref(*[a.double() for a in args])
            base = reference.lstm_cell_ref(*args)
            report = testing.compare(tuple(got), ref, base)
            if not report.passed:
                failures.append(f"lstm_cell B{B} H{H} {dtype}:\n{report}")
    # The sequence kernel (lstm_layer_fwd, what seqkernels.nn.LSTM runs without gradients).
    for T, B, H in [(5, 3, 40), (4, 2, 72)]:
        for dtype in [torch.float32, torch.float64]:
            ig = torch.randn(T, B, 4 * H, generator=gen, dtype=torch.float64)
            h0 = torch.randn(B, H, generator=gen, dtype=torch.float64)
            c0 = torch.randn(B, H, generator=gen, dtype=torch.float64)
            w = torch.randn(4 * H, H, generator=gen, dtype=torch.float64) / H**0.5
            bias = torch.randn(4 * H, generator=gen, dtype=torch.float64) * 0.5
            args = [x.to(dtype) for x in (ig, h0, c0, w, bias)]
            got = torch.ops.seqkernels.lstm_layer_fwd(*args, False)
            ref = reference.lstm_layer_fwd_ref(*[a.double() for a in args])
            base = reference.lstm_layer_fwd_ref(*args)
            report = testing.compare(tuple(got), tuple(ref), tuple(base))
            if not report.passed:
                failures.append(f"lstm_layer_fwd T{T} B{B} H{H} {dtype}:\n{report}")
    return failures


# (B, Hq, Hkv, Lq, Lk, D, Dv, kwargs): lengths at the panel widths of every level (NR = 2W: 16 for
# AVX2, 32 for AVX-512 float32; 8 for AVX2 float64) and one past them, head dims that are not
# multiples of 8 or 16, GQA, windows, the modifiers, dropout, and a packed batch.
ATTENTION_CASES = [
    (2, 4, 2, 31, 33, 64, 64, dict(causal=True)),
    (1, 2, 2, 65, 32, 17, 40, dict(window=(9, 3))),
    (2, 4, 1, 16, 47, 80, 24, dict(softcap=4.0, alibi=True, sinks=True)),
    (1, 2, 1, 33, 64, 32, 32, dict(dropout_p=0.25)),
    (1, 4, 2, 0, 0, 40, 40, dict(packed=([3, 0, 33, 17], [5, 2, 32, 40]), causal=True)),
    # Scales <= 0 (any finite scale is valid) with key blocks cut short by Lk and by the causal
    # edge: the padding columns are -inf, which a negative or zero scale must not turn into +inf
    # or NaN (the AMX forward once scaled them after filling).
    (1, 2, 1, 20, 37, 24, 24, dict(causal=True, scale=-0.7)),
    (1, 2, 2, 5, 70, 16, 16, dict(scale=0.0)),
    # Tiny q and k under a huge scale: every product q_i k_i is below FLT_MIN, which the bf16
    # products (vdpbf16ps, tdpbf16ps) flush to zero before the scale multiplies the sum (the
    # scores then vanished: output 0.15 off, torch 0.0016); such scales widen to float32. bf16 only:
    # float32 torch's own gradients (subnormal products) fail assert_close here.
    (1, 2, 1, 9, 37, 24, 24, dict(scale=3e38, qk_magnitude=(1e-20, 1e-20), dtypes=(torch.bfloat16,))),
    # Huge q under a scale > 1: q * scale overflows the accumulation type (|q| up to ~2.5x the
    # magnitude) although every score is finite; the float paths then apply the scale to the scores
    # and to dK (it was NaN in every output and gradient). float32 forward only: its dK = scale sum
    # dS q is ill-conditioned at 1e36 for torch too (assert_close fails both); float64 with its
    # gradients (no lse term and a small dO keep dK inside float64's range). k's subnormals: no bf16.
    (1, 2, 2, 3, 21, 16, 16, dict(scale=2.0, qk_magnitude=(1e38, 1e-38), dtypes=(torch.float32,), fwd_only=True)),
    (
        1,
        2,
        2,
        3,
        21,
        16,
        16,
        dict(scale=1e3, qk_magnitude=(1e306, 1e-309), dtypes=(torch.float64,), lse_grad=False, go_scale=0.01),
    ),
]


def _attention_run(case, dtype, backend, gen_seed):
    """(out, lse), (dq, dk, dv[, dsinks]) of one case on `backend` with inputs in `dtype`."""
    import seqkernels

    B, Hq, Hkv, Lq, Lk, D, Dv, kw = case
    kw = dict(kw)
    g = torch.Generator().manual_seed(gen_seed)
    packed = kw.pop("packed", None)
    mag = kw.pop("qk_magnitude", (1.0, 1.0)) + (1.0,)
    kw.pop("dtypes", None)
    lse_grad, go_scale = kw.pop("lse_grad", True), kw.pop("go_scale", 1.0)
    kw.pop("fwd_only", None)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(B, Hq, generator=g) * 0.3
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(Hq, generator=g).to(dtype).requires_grad_()
    if packed is None:
        shapes = [(B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)]
    else:
        shapes = [(sum(packed[0]), Hq, D), (sum(packed[1]), Hkv, D), (sum(packed[1]), Hkv, Dv)]
    q, k, v = (
        (torch.randn(*s, generator=g, dtype=torch.float64) * mag[i]).to(dtype).requires_grad_()
        for i, s in enumerate(shapes)
    )
    go = (torch.randn(*(shapes[0][:-1] + (Dv,)), generator=g, dtype=torch.float64) * go_scale).to(dtype)
    if "alibi_slopes" in kw and dtype == torch.float64:
        kw["alibi_slopes"] = kw["alibi_slopes"].double()
    torch.manual_seed(gen_seed)  # the dropout seed
    if packed is None:
        out, lse = seqkernels.attention(q, k, v, return_lse=True, backend=backend, **kw)
    else:
        cu = [torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32) for x in packed]
        out, lse = seqkernels.attention_varlen(q, k, v, *cu, return_lse=True, backend=backend, **kw)
    leaves = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])
    grads = torch.autograd.grad((out * go).sum() + (lse.sum() if lse_grad else 0), leaves)
    return (out.detach(), lse.detach()), tuple(grads)


def _worker_attention() -> list[str]:
    failures = []
    for i, case in enumerate(ATTENTION_CASES):
        for dtype in case[-1].get("dtypes", [torch.float32, torch.bfloat16, torch.float64]):
            got = _attention_run(case, dtype, "cpu", 100 + i)
            ref = _attention_run(case, torch.float64, "reference", 100 + i)
            base = _attention_run(case, dtype, "reference", 100 + i)
            for what, j, grad in (("out/lse", 0, False), ("grads", 1, True))[: 1 if case[-1].get("fwd_only") else 2]:
                report = testing.compare(got[j], ref[j], base[j], grad=grad, dtype=dtype)
                if not report.passed:
                    failures.append(f"attention case {i} {dtype} {what}:\n{report}")
    return failures


def _worker(what: str) -> None:
    rep = cli.cpu_isa_report()
    failures = []
    if what in ("attention", "all"):
        failures += _worker_attention()
    if what in ("decode", "all"):
        failures += _worker_decode()
    if what in ("lstm", "all"):
        failures += _worker_lstm()
    print(json.dumps({"report": rep, "failures": failures}))


# ------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("isa", LEVELS)
def test_every_level_matches_the_reference(isa):
    if isa not in _supported():
        pytest.skip(f"this CPU/OS does not support the {isa} path (supports: {', '.join(_supported())})")
    res = _run_worker(isa, "all")
    # The forced level is the one the kernels took (the extension's own report, in the worker).
    assert res["report"]["active"] == isa
    assert not res["failures"], "\n".join(res["failures"])


@pytest.mark.parametrize("isa", LEVELS)
def test_forcing_a_level_never_raises_it(isa):
    # A request above what the CPU has gives the best supported level; one at or below it is taken
    # as asked. Either way the kernels run (here: one small decode case) and match the reference.
    sup = _supported()
    res = _run_worker(isa, "small")
    want = isa if isa in sup else sup[-1]
    assert res["report"]["active"] == want
    assert not res["failures"], "\n".join(res["failures"])


def test_unknown_value_means_native():
    sup = _supported()
    res = _run_worker("no-such-isa", "small")
    assert res["report"]["active"] == sup[-1]
    assert res["report"]["supported"] == sup


@pytest.mark.parametrize("value", ["AVX2", "bogus", "avx-512"])
def test_unknown_value_is_reported(value, monkeypatch):
    """An unknown value (a wrong case, a typo) is not silently taken for native: loading the
    extension warns, and `seqkernels info` says it is ignored. Known values say nothing."""
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", value)
    assert "is not one of" in _ext.cpu_isa_env_problem()
    _ext.load_extension.cache_clear()
    try:
        with pytest.warns(UserWarning, match=f"SEQKERNELS_CPU_ISA='{value}' is not one of"):
            _ext.load_extension()
    finally:
        _ext.load_extension.cache_clear()
    assert "not a known level: ignored" in cli.cpu_isa_summary()
    for known in _ext.CPU_ISA_VALUES:
        monkeypatch.setenv("SEQKERNELS_CPU_ISA", known)
        assert _ext.cpu_isa_env_problem() is None


def test_default_is_the_portable_alias():
    assert _run_worker("default", "small")["report"]["active"] == "portable"


def test_info_line_and_cpuinfo_agree(monkeypatch):
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", "portable")
    assert cli.cpu_isa_summary().startswith("portable (supports: portable")
    monkeypatch.delenv("SEQKERNELS_CPU_ISA")
    assert cli.cpu_isa_summary().startswith(_supported()[-1] + " (supports: ")
    # The extension's CPUID/XGETBV probe against the kernel's view of this CPU (Linux): a level the
    # probe reports needs its flags in /proc/cpuinfo (the OS may hide more, never less).
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags")
    if "avx2" in _supported():
        assert {"avx2", "fma", "f16c"} <= flags
    if "avx512" in _supported():
        assert {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    if "avx512_bf16" in _supported():
        assert "avx512_bf16" in flags
    if "amx_bf16" in _supported():
        assert {"amx_tile", "amx_bf16"} <= flags


def _worker_small() -> None:
    import seqkernels

    rep = cli.cpu_isa_report()
    gen = torch.Generator().manual_seed(3)
    failures = []
    q, kc, vc, lens, table, wl, splits, cap, slopes = _decode_case(DECODE_CASES[2], torch.float32, gen)
    out = seqkernels.decode_attention(q, kc, vc, lens, num_splits=splits, return_lse=True, backend="cpu")
    report = testing.compare(
        tuple(out),
        _decode_ref(q, kc, vc, lens, table, wl, cap, slopes, torch.float64),
        _decode_ref(q, kc, vc, lens, table, wl, cap, slopes, torch.float32),
    )
    if not report.passed:
        failures.append(str(report))
    print(json.dumps({"report": rep, "failures": failures}))


if __name__ == "__main__":
    if sys.argv[1] == "small":
        _worker_small()
    else:
        _worker(sys.argv[1])


def test_reported_paths_are_the_paths_taken(monkeypatch):
    # `seqkernels info`'s per-family paths (csrc/cpu/paths.h) against what the kernels do: under every
    # level this CPU supports, the attention forward on fixed inputs gives bitwise the same output
    # wherever the report names the same path, and a different one wherever it names another (the
    # paths differ in vector width, exp2 or bf16 rounding, so their outputs never agree bit for bit).
    import seqkernels

    g = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        q, k, v = (torch.randn(1, 2, 70, 40, generator=g).to(dtype) for _ in range(3))
        seen = {}
        for level in _supported():
            monkeypatch.setenv("SEQKERNELS_CPU_ISA", level)
            path = cli.cpu_isa_report()["ops"]["attention_fwd"][str(dtype).removeprefix("torch.")]
            assert path in _supported() and LEVELS.index(path) <= LEVELS.index(level)
            # The float32 lse too: a bf16 output rounds most differences away.
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            out = torch.cat(
                [t.to(acc).flatten() for t in seqkernels.attention(q, k, v, return_lse=True, backend="cpu")]
            )
            for other, ref in seen.items():
                assert torch.equal(out, ref) == (other == path), (dtype, level, path, other)
            seen.setdefault(path, out)
    monkeypatch.delenv("SEQKERNELS_CPU_ISA")
    ops = cli.cpu_isa_report()["ops"]
    assert set(ops) == {"attention_fwd", "attention_bwd", "decode_attention", "lstm"}
    # float64 decode has the same levels as float32 (F64Ops on the float64 attention policies).
    assert ops["decode_attention"]["float64"] == ops["decode_attention"]["float32"]
    if "avx512_bf16" in _supported():
        best = "amx_bf16" if "amx_bf16" in _supported() else "avx512_bf16"
        assert ops["attention_fwd"]["bfloat16"] == ops["attention_bwd"]["bfloat16"] == best
        assert ops["attention_fwd"]["float16"] == "avx512"  # float16 is widened, never rounded to bf16

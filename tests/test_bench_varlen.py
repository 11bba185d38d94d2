"""The varlen bench suite at a tiny packing: rows, columns, exact pair counts, findings."""

import csv
import dataclasses
import time

import pytest
import torch

from seqkernels.bench import cli as bench_cli
from seqkernels.bench import harness, varlen

TINY = {"n": 5, "lo": 4, "hi": 40, "hq": 4, "hkv": 2, "d": 16}


def _brute_pairs(lens_q, lens_k, causal):
    total = 0
    for lq, lk in zip(lens_q, lens_k):
        i = torch.arange(lq).view(-1, 1)
        j = torch.arange(lk).view(1, -1)
        seen = (j <= i + (lk - lq)) if causal else torch.ones(lq, lk, dtype=torch.bool)
        total += int(seen.sum())
    return total


@pytest.mark.parametrize("causal", [True, False])
def test_visible_pairs_match_brute_force(causal):
    lens_q = [1, 3, 7, 2, 16, 5, 0]
    lens_k = [1, 3, 7, 5, 9, 2, 4]  # longer and shorter key sides: bottom-right diagonal
    assert varlen.visible_pairs(lens_q, lens_k, causal) == _brute_pairs(lens_q, lens_k, causal)
    assert varlen.visible_pairs(lens_q, causal=causal) == _brute_pairs(lens_q, lens_q, causal)
    lens = varlen.sequence_lengths(9, 4, 40)
    assert varlen.visible_pairs(lens) == _brute_pairs(lens, lens, True) == sum(L * (L + 1) // 2 for L in lens)


def test_lengths_and_dense_shape():
    lens = varlen.sequence_lengths(64, 16, 4096)
    assert lens == varlen.sequence_lengths(64, 16, 4096)  # fixed seed
    assert len(lens) == 64 and min(lens) >= 16 and max(lens) <= 4096
    assert max(lens) > 8 * sorted(lens)[32]  # a long tail
    B, L = varlen.dense_shape(lens)
    pairs = varlen.visible_pairs(lens)
    assert abs(B * L * (L + 1) / 2 - pairs) <= 0.5 * L * (L + 1) / 2 + 0.05 * pairs


def test_padded_forms_compute_the_packed_pattern():
    """The SDPA mask's real rows see exactly the packed pairs; padding rows see key 0 only."""
    lens = [3, 1, 6]
    p = varlen._Packing(harness.Settings("cpu", torch.float32, quick=True), lens, 2, 1, 4)
    m = p.sdpa_mask()[:, 0]
    real = sum(int(m[b, p.lmax - L :].sum()) for b, L in enumerate(lens))
    assert real == varlen.visible_pairs(lens) == _brute_pairs(lens, lens, True)
    for b, L in enumerate(lens):
        pad = m[b, : p.lmax - L]
        assert pad[:, 0].all() and not pad[:, 1:].any()
        assert not m[b, :, L:].any()  # no key beyond the sequence


def _one_call(fns, s, **kw):
    """harness.measure's contract at one call per input set (the reference backend is slow to repeat)."""
    t0 = time.perf_counter()
    for f in fns:
        f()
    ms = 1e3 * (time.perf_counter() - t0) / len(fns)
    return 0.95 * ms, ms, 1.05 * ms


def _run(monkeypatch, backend, fast=False):
    monkeypatch.setattr(varlen, "_TEST_SHAPE", TINY)
    if fast:
        monkeypatch.setattr(varlen, "measure", _one_call)
    s = harness.Settings("cpu", torch.float32, quick=True, backend=backend, repeat=0.2)
    rec = harness.Recorder(s)
    rec.meta["gemm_tflops"] = 1.0
    varlen.suite_varlen(rec, s, lambda m: None)
    return rec


def _check_columns(rec, tmp_path):
    fields = {f.name for f in dataclasses.fields(harness.Row)}
    assert all(set(dataclasses.asdict(r)) == fields for r in rec.rows)
    csv_path, _ = bench_cli.write_outputs(rec, str(tmp_path), "t", plots=False)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench_cli.CSV_FIELDS and all(r["suite"] == "varlen" for r in rows)


def test_suite_on_the_reference_backend(monkeypatch, tmp_path):
    rec = _run(monkeypatch, "reference", fast=True)
    _check_columns(rec, tmp_path)
    lens = varlen.sequence_lengths(TINY["n"], TINY["lo"], TINY["hi"])
    T, pairs = sum(lens), varlen.visible_pairs(lens)
    (shape,) = rec.meta["varlen"]
    assert shape.startswith(f"N{TINY['n']} T{T} ") and rec.meta["varlen"][shape]["visible_pairs"] == pairs
    B, L = varlen.dense_shape(lens)
    dense = f"B{B} Hq4 Hkv2 L{L} D16 causal dense"
    for op in ("fwd", "fwd+bwd"):
        for prov in ("seqkernels_reference", "seqkernels_reference_padded", "seqkernels_reference_loop"):
            t, rate, pct = (rec.row("varlen", op, prov, shape, m) for m in ("time", "tflops", "pct_gemm"))
            assert t is not None, (op, prov, [r.note for r in rec.rows if r.metric == "status"])
            assert t.unit == "ms" and t.p20 <= t.p50 <= t.p80
            # the rate counts the useful pairs exactly: 4 D Hq per pair forward, 3.5x with the backward
            flops = 4 * 16 * 4 * pairs * (3.5 if op == "fwd+bwd" else 1.0)
            assert rate.unit == "TFLOP/s" and rate.p50 == pytest.approx(flops / (t.p50 * 1e-3) / 1e12)
            assert pct.p50 == pytest.approx(100 * rate.p50)
        assert rec.row("varlen", op, "seqkernels_reference", dense, "tflops") is not None
        assert rec.row("varlen", op, "torch_sdpa_padded", shape) is None  # --backend: no peers
    assert not [r for r in rec.rows if r.metric == "status"]  # every provider passed parity
    findings = rec.meta["findings"]
    assert findings == varlen.varlen_findings(rec)
    for op in ("fwd", "fwd+bwd"):
        dense_line = [f for f in findings if f.startswith(f"varlen {op} (") and "the dense rate" in f]
        padded_line = [f for f in findings if f.startswith(f"varlen {op} (") and "vs seqkernels_reference_padded" in f]
        assert len(dense_line) == 1 and len(padded_line) == 1
        assert ">= 0.9x target" in dense_line[0] and "p20-p80" in dense_line[0]
        assert "vs seqkernels_reference_loop" in padded_line[0] and ">= 2x target" in padded_line[0]
        assert " on this " in padded_line[0]  # the machine named


def test_suite_on_the_cpu_backend(monkeypatch, tmp_path):
    from seqkernels import _ext, capabilities

    if not _ext.extension_available():
        pytest.skip("needs the C++ CPU kernels (seqkernels._C)")
    rec = _run(monkeypatch, None)
    _check_columns(rec, tmp_path)
    (shape,) = rec.meta["varlen"]
    for op in ("fwd", "fwd+bwd"):
        assert rec.row("varlen", op, "torch_sdpa_padded", shape) is not None
        assert rec.row("varlen", op, "seqkernels_cpu_padded", shape) is not None
        if capabilities.TABLE["attention"]["cpu"].varlen:
            assert rec.row("varlen", op, "seqkernels_cpu", shape) is not None
            assert any(f.startswith(f"varlen {op} (") and "vs torch_sdpa_padded" in f for f in rec.meta["findings"])
        else:  # the packed rows say why, and the findings say nothing was measured
            st = rec.row("varlen", op, "seqkernels_cpu", shape, "status")
            assert st is not None and st.note.startswith("unsupported: ")
            assert any("packed attention not measured" in f for f in rec.meta["findings"])
    assert "seqkernels_cpu" in bench_cli.format_table(rec)

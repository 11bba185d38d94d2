"""The bench report a user reads: spreads kept, noise flagged, findings qualified, no empty sections,
plots with numeric x axes and p20-p80 error bars. Synthetic timing series, no kernels timed."""

import statistics

import pytest
import torch

from seqkernels.bench import cli as bench_cli
from seqkernels.bench import harness, plots


def _quantiles(times):
    qs = statistics.quantiles(times, n=10, method="inclusive")
    return qs[1], statistics.median(times), qs[7]


def _recorder(monkeypatch, load=0.5, cores=2):
    monkeypatch.setattr(harness, "load_average", lambda: load)
    monkeypatch.setattr(harness.os, "cpu_count", lambda: cores)
    rec = harness.Recorder(harness.Settings(device="cpu", dtype=torch.float32, quick=True))
    return rec


def test_flagging_rule_on_synthetic_series():
    steady = [10.0, 10.1, 9.9, 10.05, 9.95, 10.02, 9.98, 10.0, 10.1, 9.9]
    jittery = [10.0, 12.5, 8.0, 11.8, 9.0, 13.0, 8.5, 10.0, 12.0, 8.2]
    assert not harness.is_noisy(*_quantiles(steady))
    assert harness.is_noisy(*_quantiles(jittery))
    # The rule is p80 - p20 > 10% of the median, inclusive of the boundary on the quiet side.
    assert not harness.is_noisy(95.0, 100.0, 105.0)
    assert harness.is_noisy(94.0, 100.0, 105.0)
    assert harness.is_noisy(0.5, 0.0, 1.0)  # a spread around a zero median cannot be trusted either
    assert not harness.is_noisy(0.0, 0.0, 0.0)  # a derived constant has no spread


def test_overload_rule():
    assert harness.machine_overloaded(2.5, 2)
    assert not harness.machine_overloaded(2.0, 2)
    assert not harness.machine_overloaded(None, 2)


def test_speedup_range_pairs_opposite_ends():
    slow = harness.Row("s", "op", "peer", "x", "float32", "time", "ms", 12.0, 13.0, 14.0)
    fast = harness.Row("s", "op", "sk", "x", "float32", "time", "ms", 9.0, 10.0, 11.0)
    mid, low, high = harness.speedup(slow, fast)
    assert mid == pytest.approx(1.3)
    assert low == pytest.approx(12 / 11) and high == pytest.approx(14 / 9)
    assert harness.format_ratio(mid, low, high) == "1.30x, p20-p80 1.09-1.56x"


def _add_rnn_rows(rec, jitter):
    for L, lstm_ms, att_ms in ((16, 6.0, 3.0), (1024, 270.0, 280.0)):
        shape = f"B8 d512 L{L}"
        rec.add_time("rnn_vs_attention", "sequence", "lstm_1layer", shape, (lstm_ms * 0.99, lstm_ms, lstm_ms * 1.01))
        j = jitter * att_ms
        rec.add_time("rnn_vs_attention", "sequence", "attention_layer", shape, (att_ms - j, att_ms, att_ms + j))


def test_table_and_findings_flag_a_noisy_line(monkeypatch):
    rec = _recorder(monkeypatch)
    rec.add("ceiling", "gemm", "torch.matmul", "-", "tflops", "TFLOP/s", 0.14, 0.15, 0.16)
    rec.add_failure("ceiling", "copy", "torch.copy_", "-", "not measured here: RuntimeError: out of memory")
    _add_rnn_rows(rec, jitter=0.2)  # the attention rows spread 40% of their median
    table = bench_cli.format_table(rec)
    assert "NOISY RUN" not in table
    att_lines = [line for line in table.splitlines() if "attention_layer" in line]
    assert att_lines and all(line.rstrip().endswith("NOISY") for line in att_lines)
    lstm_lines = [line for line in table.splitlines() if "lstm_1layer" in line]
    assert lstm_lines and not any("NOISY" in line for line in lstm_lines)
    assert "[2.400-3.600]" in table  # the p20-p80 range of the 3 ms row is printed
    # The ceilings print a value with its range, or one line saying why not: no empty section.
    assert "torch.matmul" in table and "0.15 TFLOP/s [0.14-0.16]" in table
    assert "not measured here: RuntimeError" in table
    sections = table.split("\n")
    for i, line in enumerate(sections):
        if " / " in line and not line.startswith(" "):
            assert i + 1 < len(sections) and sections[i + 1].startswith("    "), f"empty section {line!r}"
    findings = harness.rnn_vs_attention_findings(rec)
    assert len(findings) == 1
    f = findings[0]
    assert "on this 2-core" in f and "CPU" in f
    assert "batch 8, width 512, float32" in f
    assert "L=16 2.00x, p20-p80 1.65-2.5" in f  # 5.94/3.6 to 6.06/2.4
    assert "faster at L = 16" in f and "within the p20-p80 spread at L = 1024" in f
    assert "noisy: rerun with more repeats" in f


def test_quiet_run_is_not_flagged(monkeypatch):
    rec = _recorder(monkeypatch)
    _add_rnn_rows(rec, jitter=0.01)
    timed = [line for line in bench_cli.format_table(rec).splitlines() if " ms [" in line]
    assert len(timed) == 4 and not any("NOISY" in line for line in timed)
    (f,) = harness.rnn_vs_attention_findings(rec)
    assert "noisy" not in f and "slower at L = 1024" in f


def test_load_above_core_count_flags_every_line(monkeypatch):
    rec = _recorder(monkeypatch, load=3.7, cores=2)
    _add_rnn_rows(rec, jitter=0.01)
    assert rec.overloaded
    table = bench_cli.format_table(rec)
    assert table.startswith("NOISY RUN: the load average reached 3.7 on 2 cores")
    timed = [line for line in table.splitlines() if " ms [" in line]
    assert timed and all("NOISY" in line for line in timed)
    assert all("noisy: rerun with more repeats" in f for f in harness.rnn_vs_attention_findings(rec))


def test_plots_have_numeric_shared_x_and_error_bars(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    rec = _recorder(monkeypatch)
    # Two providers measured on different lengths: each must sit at its own numeric x.
    for prov, lens in (("seqkernels_cpu", (512, 1024, 2048)), ("torch_sdpa", (1024, 4096))):
        for L in lens:
            t = L / 1000
            flops = 4 * 8 * L * L * 64
            rec.add_time(
                "attention",
                "fwd",
                prov,
                f"B1 H8 L{L} D64",
                (0.9 * t, t, 1.2 * t),
                per=[("tflops", "TFLOP/s", lambda ms, f=flops: f / (ms * 1e-3) / 1e12)],
            )
    _add_rnn_rows(rec, jitter=0.1)
    for n in (16, 128):
        shape = f"B1 d512 context{n}"
        rec.add_time("rnn_vs_attention", "generate_token", "lstm_step", shape, (0.4, 0.5, 0.6))
        rec.add_time("rnn_vs_attention", "generate_token", "attention_full_recompute", shape, (1.0, 1.2, 1.5))
    csv_path, pngs = bench_cli.write_outputs(rec, str(tmp_path), "cpu_float32_quick")
    by_name = {p[len(str(tmp_path)) + len("/cpu_float32_quick_") :]: p for p in pngs}
    assert sorted(by_name) == ["attention.png", "rnn_vs_attention.png"]
    (panel,) = plots.read_axes_data(by_name["attention.png"])
    assert panel["xlabel"] == "sequence length L"
    assert "B1 H8 D64" in panel["title"] and "float32" in panel["title"] and "CPU" in panel["title"]
    lines = {line["label"]: line for line in panel["lines"]}
    assert lines["seqkernels_cpu"]["x"] == [512, 1024, 2048]
    assert lines["torch_sdpa"]["x"] == [1024, 4096]
    sk = lines["seqkernels_cpu"]
    assert all(lo < mid < hi for lo, mid, hi in zip(sk["p20"], sk["p50"], sk["p80"]))
    rnn = plots.read_axes_data(by_name["rnn_vs_attention.png"])
    assert [p["xlabel"] for p in rnn] == ["sequence length L", "sequence length L", "context length"]
    assert "batch 8, width 512, float32" in rnn[0]["title"]
    assert "batch 1, width 512, float32" in rnn[2]["title"]
    seq = {line["label"]: line for line in rnn[0]["lines"]}
    assert seq["lstm_1layer"]["x"] == [16, 1024]
    assert seq["attention_layer"]["p20"][0] < seq["attention_layer"]["p50"][0] < seq["attention_layer"]["p80"][0]


def test_matplotlib_figure_draws_error_bars(monkeypatch, tmp_path):
    # The JSON chunk must describe what matplotlib drew: intercept the figure before it is closed.
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    rec = _recorder(monkeypatch)
    for L in (256, 1024):
        rec.add_time("lstm", "sequence", "torch_LSTM", f"layers2 H{L} L128 B32", (1.0, 1.1, 1.3))
    bench_cli.write_outputs(rec, str(tmp_path), "s")
    ax = figs[0].axes[0]
    assert ax.get_xscale() == "log"
    assert len(ax.containers) == 1  # one errorbar container for the one provider
    line, caps, (bars,) = ax.containers[0]
    assert list(line.get_xdata()) == [256, 1024]
    segs = bars.get_segments()
    assert [tuple(s[:, 1]) for s in segs] == [pytest.approx((1.0, 1.3))] * 2

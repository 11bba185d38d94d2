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
    assert not harness.machine_overloaded(2.0, 2) and not harness.machine_overloaded(2.004, 2)
    assert harness.machine_overloaded(2.01, 2)
    assert not harness.machine_overloaded(None, 2)


def test_speedup_range_pairs_opposite_ends():
    slow = harness.Row("s", "op", "peer", "x", "float32", "time", "ms", 12.0, 13.0, 14.0)
    fast = harness.Row("s", "op", "sk", "x", "float32", "time", "ms", 9.0, 10.0, 11.0)
    mid, low, high = harness.speedup(slow, fast)
    assert mid == pytest.approx(1.3)
    assert low == pytest.approx(12 / 11) and high == pytest.approx(14 / 9)
    assert harness.format_ratio(mid, low, high) == "1.30x, p20-p80 1.09-1.56x"


class _DriftingClock:
    """A fake time.perf_counter for the harness: every call of a provider advances it by the
    provider's cost times a slowdown that grows with each call made (a host drifting slower), so a
    timing series is synthetic and exact."""

    def __init__(self, drift):
        self.now, self.calls, self.drift, self.log = 0.0, 0, drift, []

    def __call__(self):
        return self.now

    def provider(self, name, cost_s):
        def call():
            self.log.append(name)
            self.now += cost_s * (1.0 + self.drift * self.calls)
            self.calls += 1

        return call


@pytest.mark.parametrize("quick", [True, False])
def test_rounds_give_drift_free_ratios(monkeypatch, quick):
    # Two providers of equal cost on a host that slows by 2% per call: timed one after the other
    # (measure), the second's median comes out far slower; in rounds (measure_rounds) the medians
    # agree, and the calls alternate A B, B A, ... after each provider's warm-up.
    s = harness.Settings(device="cpu", dtype=torch.float32, quick=quick)
    clock = _DriftingClock(0.02)
    monkeypatch.setattr(harness.time, "perf_counter", clock)
    a, b = clock.provider("a", 0.05), clock.provider("b", 0.05)
    one_by_one = [harness.measure([a], s)[1], harness.measure([b], s)[1]]
    assert one_by_one[1] / one_by_one[0] > 1.1

    clock.log.clear()
    rounds = harness.measure_rounds([[a], [b]], s)
    warm = 1 if quick else 2
    timed = clock.log[2 * warm :]
    assert clock.log[: 2 * warm] == ["a"] * warm + ["b"] * warm
    assert timed[:8] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert timed.count("a") == timed.count("b") >= (3 if quick else 5)
    assert rounds[1][1] / rounds[0][1] == pytest.approx(1.0, abs=0.02)
    for p20, p50, p80 in rounds:
        assert p20 <= p50 <= p80


def test_rounds_collects_then_reports_each_provider(monkeypatch):
    s = harness.Settings(device="cpu", dtype=torch.float32, quick=True)
    clock = _DriftingClock(0.0)
    monkeypatch.setattr(harness.time, "perf_counter", clock)
    got = {}
    r = harness.Rounds(s)
    r.add([clock.provider("a", 0.01)], lambda ms: got.setdefault("a", ms))
    r.add([clock.provider("b", 0.03)], lambda ms: got.setdefault("b", ms))
    assert got == {}  # nothing timed before run()
    r.run()
    assert got["a"][1] == pytest.approx(10.0) and got["b"][1] == pytest.approx(30.0)
    r.run()  # nothing pending: no second report
    assert len(got) == 2


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
    # Just past the core count: the bench's own threads make about the core count on their own, so
    # the figure is printed to two decimals (2.0 would not read as above 2 cores).
    assert not harness.machine_overloaded(2.0, 2) and not harness.machine_overloaded(2.004, 2)
    assert harness.machine_overloaded(2.01, 2)
    rec = _recorder(monkeypatch, load=2.04, cores=2)
    _add_rnn_rows(rec, jitter=0.01)
    assert rec.overloaded
    table = bench_cli.format_table(rec)
    assert table.startswith("NOISY RUN: the load average reached 2.04 on 2 cores")
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


def test_suites_time_each_shapes_providers_in_rounds(monkeypatch):
    # The attention (with its modifier rows), decode and LSTM suites at tiny shapes: every provider
    # that passes parity gets its rows, and the providers of one shape are timed by one
    # measure_rounds call (a same-run comparison), not one after the other.
    from seqkernels import _ext
    from seqkernels.bench import suites

    if not _ext.extension_available():
        pytest.skip("needs the C++ CPU kernels (seqkernels._C)")
    monkeypatch.setattr(suites, "_attention_shapes", lambda s: [(1, 2, 40, 16)])
    monkeypatch.setattr(suites, "_modifier_shapes", lambda s: [(1, 2, 24, 16)])
    monkeypatch.setattr(suites, "_decode_shapes", lambda s: [(2, 4, 2, 48, 16)])
    groups = []
    real = harness.measure_rounds

    def spy(fn_groups, s, **kw):
        groups.append(len(fn_groups))
        return real(fn_groups, s, **kw)

    monkeypatch.setattr(harness, "measure_rounds", spy)
    s = harness.Settings("cpu", torch.float32, quick=True, repeat=0.2)
    rec = harness.Recorder(s)
    rec.meta.update(gemm_tflops=1.0, copy_gbps=1.0)
    suites.suite_attention(rec, s, lambda m: None)
    suites.suite_decode(rec, s, lambda m: None)
    assert not [r.note for r in rec.rows if r.metric == "status"]
    peers = ["seqkernels_cpu", "torch_sdpa", "torch_sdpa_math", "naive"]
    for causal in ("", " causal"):
        for op in ("fwd", "bwd"):
            for p in peers:
                t = rec.row("attention", op, p, f"B1 H2 L40 D16{causal}")
                assert t is not None and t.p20 <= t.p50 <= t.p80, (op, p, causal)
    for mod in ("plain", "sinks", "alibi", "softcap"):
        for op in ("fwd", "bwd"):
            assert rec.row("attention", op, "torch_eager", f"B1 H2 L24 D16 {mod}") is not None
    assert rec.row("decode", "decode", "torch_sdpa_slice", "B2 Hq4 Hkv2 S48 D16") is not None
    # 2 attention shapes x (fwd, bwd) of 4 providers and the GEMM, 4 modifiers x (fwd, bwd) of 2,
    # decode's 2.
    assert groups == [5] * 4 + [2] * 8 + [2]
    # "% of GEMM" divides by the GEMM rate of the same rounds, not the run-start ceiling (1.0 here).
    for causal, half in (("", 1.0), (" causal", 0.5)):
        shape = f"B1 H2 L40 D16{causal}"
        per_shape = rec.meta["gemm_tflops_per_shape"][shape]
        for op, work in (("fwd", 1.0), ("bwd", 2.5)):
            t = rec.row("attention", op, "seqkernels_cpu", shape)
            pct = rec.row("attention", op, "seqkernels_cpu", shape, "pct_gemm")
            rate = work * half * 4 * 2 * 40 * 40 * 16 / (t.p50 * 1e-3) / 1e12
            assert pct.p50 == pytest.approx(100 * rate / per_shape[op])
            assert per_shape[op] != 1.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mod", ["plain", "sinks", "alibi", "softcap", "causal"])
def test_bench_peers_pass_the_parity_gate(dtype, mod):
    # The bench times a peer only once it passes the gate; the eager peers computed their softmax in
    # float32 whatever the input dtype, and so failed it at float64 (err 4e-8 against a 1.5e-11 bound).
    from seqkernels import reference
    from seqkernels.bench import suites

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 37, 24, generator=g).to(dtype) for _ in range(3))
    if mod == "causal":
        peers = suites._sdpa_providers(harness.Settings("cpu", dtype, quick=True))
        out = peers["naive"](q, k, v, True)
        mk, m64 = dict(window_left=-1, window_right=0), dict(window_left=-1, window_right=0)
    else:
        mk = suites._modifier_kwargs(mod, 4, "cpu")
        out = suites.eager_modified_attention(q, k, v, **mk)
        m64 = {n: (x.double() if isinstance(x, torch.Tensor) else x) for n, x in mk.items()}
    ref = reference.attention_ref(q.double(), k.double(), v.double(), **m64)[0]
    base = reference.attention_ref(q, k, v, **mk)[0]
    assert suites._gate(out, ref, base) is None

"""seqkernels.lstm_cell and its ops (lstm_cell_fwd / lstm_cell_bwd) on every backend this machine can
run, against the float64 reference with the DESIGN §5 rule; the CUDA kernels also through the
CUDA-on-CPU harness (plain, ThreadSanitizer, AddressSanitizer)."""

import pytest
import torch
from aot_static import compile_static
from conftest import HAS_CUDA

import seqkernels
from seqkernels import _ext, backends, reference, testing
from seqkernels.ops import lstm as lstm_ops

BACKENDS = ["reference", "cpu", "triton"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (batch, input_size, hidden_size); odd sizes, a size that takes the CUDA vector path (H % 8 == 0)
# and one with H > the CPU column block (512).
SHAPES = [(1, 1, 1), (3, 17, 5), (5, 40, 33), (2, 16, 64), (4, 7, 520)]


def _device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def _skip_unless_runs(backend, call):
    reason = backends.why_not(lstm_ops.OP, backend, call.device, call)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _inputs(B, n_in, H, dtype, device="cpu", bias=True, unbatched=False):
    lead = () if unbatched else (B,)
    t = [
        torch.randn(*lead, n_in),
        torch.randn(*lead, H),
        torch.randn(*lead, H),
        torch.randn(4 * H, n_in) / n_in**0.5,
        torch.randn(4 * H, H) / H**0.5,
    ]
    if bias:
        t += [torch.randn(4 * H) * 0.5, torch.randn(4 * H) * 0.5]
    return [x.to(device=device, dtype=dtype) for x in t]


def _cpu64(ts):
    return [t.detach().cpu().double() for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}I{}H{}".format(*s))
def test_forward_parity(backend, dtype, shape):
    if backend == "triton" and dtype == torch.float64 and shape[2] > 64:
        pytest.skip("interpreter time: float64 Triton covered on the smaller shapes")
    args = _inputs(*shape, dtype, _device_for(backend))
    _skip_unless_runs(backend, lstm_ops.prepare_lstm_cell(*args))
    hy, cy = seqkernels.lstm_cell(*args, backend=backend)
    assert hy.dtype == dtype and hy.shape == (shape[0], shape[2]) and cy.shape == hy.shape
    ref = reference.lstm_cell_ref(*_cpu64(args))
    base = reference.lstm_cell_ref(*[a.cpu() for a in args])
    report = testing.compare((hy.cpu(), cy.cpu()), ref, base)
    assert report.passed, str(report)


def _grads(backend, args, g_hy, g_cy):
    leaves = [a.detach().requires_grad_() for a in args]
    hy, cy = seqkernels.lstm_cell(*leaves, backend=backend)
    outs, cots = [o for o, g in ((hy, g_hy), (cy, g_cy)) if g is not None], [g for g in (g_hy, g_cy) if g is not None]
    torch.autograd.backward(outs, cots)
    return tuple(leaf.grad.cpu() if leaf.grad is not None else None for leaf in leaves)


def _backward_case(backend, dtype, shape, which):
    device = _device_for(backend)
    args = _inputs(*shape, dtype, device)
    _skip_unless_runs(backend, lstm_ops.prepare_lstm_cell(*args))
    B, _, H = shape
    g_hy = torch.randn(B, H, dtype=dtype, device=device) if which != "cy_only" else None
    g_cy = torch.randn(B, H, dtype=dtype, device=device) if which != "hy_only" else None
    got = _grads(backend, args, g_hy, g_cy)
    ref = _grads("reference", _cpu64(args), *[None if g is None else g.cpu().double() for g in (g_hy, g_cy)])
    base = _grads("reference", [a.cpu() for a in args], *[None if g is None else g.cpu() for g in (g_hy, g_cy)])
    report = testing.compare(got, ref, base, grad=True)
    assert report.passed, str(report)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "B{}I{}H{}".format(*s))
def test_backward_parity(backend, dtype, shape):
    _backward_case(backend, dtype, shape, "both")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["hy_only", "cy_only"])
def test_backward_one_sided(backend, which):
    # Only one output feeds the loss: the other's gradient reaches the kernel as None or zeros.
    _backward_case(backend, torch.float32, SHAPES[2], which)


@pytest.mark.parametrize("backend,bias", [("cpu", True), ("cpu", False), ("triton", True)])
def test_gradcheck_float64(backend, bias):
    args = [a.requires_grad_() for a in _inputs(3, 5, 4, torch.float64, bias=bias)]
    _skip_unless_runs(backend, lstm_ops.prepare_lstm_cell(*args))
    # The interpreter is slow: Triton gets gradcheck's fast mode (random projections of the Jacobian).
    assert torch.autograd.gradcheck(
        lambda *a: seqkernels.lstm_cell(*a, backend=backend), args, fast_mode=backend == "triton"
    )


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_unbatched_and_single_bias(backend):
    args = _inputs(1, 6, 9, torch.float64, unbatched=True)
    args[6] = None  # only bias_ih
    call = lstm_ops.prepare_lstm_cell(*args)
    _skip_unless_runs(backend, call)
    hy, cy = seqkernels.lstm_cell(*args, backend=backend)
    assert hy.shape == (9,) and cy.shape == (9,)
    cell = torch.nn.LSTMCell(6, 9, dtype=torch.float64)
    with torch.no_grad():
        cell.weight_ih.copy_(args[3])
        cell.weight_hh.copy_(args[4])
        cell.bias_ih.copy_(args[5])
        cell.bias_hh.zero_()
        exp_h, exp_c = cell(args[0], (args[1], args[2]))
    torch.testing.assert_close(hy, exp_h)
    torch.testing.assert_close(cy, exp_c)


@pytest.mark.parametrize("unbatched", [False, True])
def test_missing_state_means_zeros(unbatched):
    args = _inputs(3, 4, 5, torch.float64, unbatched=unbatched)
    zeros = torch.zeros_like(args[1])
    expected = seqkernels.lstm_cell(args[0], zeros, zeros, *args[3:])
    for hx, cx in ((None, zeros), (zeros, None), (None, None)):
        for a, b in zip(seqkernels.lstm_cell(args[0], hx, cx, *args[3:]), expected):
            torch.testing.assert_close(a, b)


def test_matches_torch_lstmcell_float32():
    cell = torch.nn.LSTMCell(23, 31)
    x, h, c = torch.randn(6, 23), torch.randn(6, 31), torch.randn(6, 31)
    exp_h, exp_c = cell(x, (h, c))
    hy, cy = seqkernels.lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    torch.testing.assert_close(hy, exp_h)
    torch.testing.assert_close(cy, exp_c)


def test_auto_backend_on_cpu_is_the_cpu_kernel():
    args = _inputs(2, 3, 4, torch.float32)
    e = seqkernels.explain("lstm_cell", *args)
    assert e.chosen == ("cpu" if _ext.extension_available() else "reference")
    assert "cuda" in str(e) and e.reasons["cuda"] is not None


# ---------------------------------------------------------------------------------------------
# The ops themselves: strides, optional arguments, NaN, opcheck.


def _op_families():
    fams = [("triton", torch.ops.seqkernels.triton_lstm_cell_fwd, torch.ops.seqkernels.triton_lstm_cell_bwd)]
    if _ext.has_kernel("lstm_cell_fwd", "CPU"):
        fams.append(("cpu", torch.ops.seqkernels.lstm_cell_fwd, torch.ops.seqkernels.lstm_cell_bwd))
    return fams


FAMILIES = _op_families()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("H", [1, 13, 64])
def test_ops_with_strided_rows_and_missing_optionals(family, dtype, H):
    _, fwd, bwd = family
    B = 5
    # input_gates: rows of a wider buffer (the per-step slice of a batch_first projection);
    # hidden_gates: a transposed copy (non-unit last stride); cx: every other row.
    big = torch.randn(B, 3, 4 * H, dtype=dtype)
    ig = big[:, 1]
    hg = torch.randn(4 * H, B, dtype=dtype).t()
    cx = torch.randn(2 * B, H, dtype=dtype)[::2]
    bih = torch.randn(4 * H, dtype=dtype)
    hy, cy, ws = fwd(ig, hg, cx, bih, None)
    r_hy, r_cy, r_ws = reference.lstm_cell_fwd_ref(*_cpu64([ig, hg, cx, bih]), None)
    base = reference.lstm_cell_fwd_ref(ig, hg, cx, bih, None)
    report = testing.compare((hy, cy, ws), (r_hy, r_cy, r_ws), base)
    assert report.passed, str(report)
    assert hy.is_contiguous() and ws.is_contiguous() and ws.shape == (B, 4 * H)

    g_hy = torch.randn(B, 2 * H, dtype=dtype)[:, ::2]  # non-unit last stride
    for gh, gc in ((g_hy, None), (None, torch.randn(B, H, dtype=dtype)), (None, None)):
        gg, gcx = bwd(gh, gc, cx, cy, ws)
        ref = reference.lstm_cell_bwd_ref(*[None if t is None else t.double() for t in (gh, gc, cx, cy, ws)])
        base = reference.lstm_cell_bwd_ref(gh, gc, cx, cy, ws)
        report = testing.compare((gg, gcx), ref, base, grad=True)
        assert report.passed, str(report)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f[0])
def test_ops_propagate_nan_and_saturate(family):
    _, fwd, _ = family
    ig = torch.randn(3, 4 * 8)
    ig[0, 1] = float("nan")  # i of unit 1 in row 0
    ig[1, 8:16] = 1e4  # f saturates to 1
    ig[2, 16:24] = -1e4  # g saturates to -1
    hg = torch.randn(3, 4 * 8)
    cx = torch.randn(3, 8)
    hy, cy, ws = fwd(ig, hg, cx, None, None)
    r_hy, r_cy, r_ws = reference.lstm_cell_fwd_ref(ig.double(), hg.double(), cx.double())
    report = testing.compare((hy, cy, ws), (r_hy, r_cy, r_ws), reference.lstm_cell_fwd_ref(ig, hg, cx))
    assert report.passed, str(report)
    assert torch.isnan(hy[0, 1]) and torch.isfinite(hy[1:]).all()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f[0])
def test_opcheck(family):
    _, fwd, bwd = family
    B, H = 3, 5
    ig, hg = torch.randn(B, 4 * H, requires_grad=True), torch.randn(B, 4 * H, requires_grad=True)
    cx = torch.randn(B, H, requires_grad=True)
    bih, bhh = torch.randn(4 * H, requires_grad=True), torch.randn(4 * H, requires_grad=True)
    torch.library.opcheck(fwd, (ig, hg, cx, bih, bhh))
    torch.library.opcheck(fwd, (ig, hg, cx, None, None))
    hy, cy, ws = (t.detach() for t in fwd(ig, hg, cx, None, None))
    torch.library.opcheck(bwd, (torch.randn(B, H), torch.randn(B, H), cx.detach(), cy, ws))
    torch.library.opcheck(bwd, (None, torch.randn(B, H), cx.detach(), cy, ws))


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: [a[0][:, :3]] + a[1:], ValueError, "input: has 3 features but weight_ih expects input_size=7"),
        (lambda a: a[:1] + [a[1][:, :4]] + a[2:], ValueError, r"hx: expected shape \(batch, hidden_size\) = \(2, 5\)"),
        (lambda a: a[:2] + [a[2][0]] + a[3:], ValueError, "cx: expected shape"),
        (lambda a: a[:4] + [a[4][:, :4]] + a[5:], ValueError, "weight_hh: expected shape"),
        (lambda a: a[:3] + [a[3][:19]] + a[4:], ValueError, "weight_ih: expected shape"),
        (lambda a: a[:5] + [a[5][:7]] + a[6:], ValueError, "bias_ih: expected shape"),
        (lambda a: a[:1] + [a[1].double()] + a[2:], TypeError, "hx: dtype float64 does not match"),
        (lambda a: a[:6] + [a[6].to("meta")], ValueError, "bias_hh: on device meta"),
        (lambda a: [a[0].int()] + a[1:], TypeError, "input: expected a torch.Tensor|dtype"),
        (lambda a: [a[0][None]] + a[1:], ValueError, "input: expected a 2-D"),
        (lambda a: [a[0][0]] + a[1:], ValueError, r"hx: expected shape \(hidden_size,\)"),
    ],
)
def test_bad_inputs_are_named(mutate, exc, match):
    args = _inputs(2, 7, 5, torch.float32)
    with pytest.raises(exc, match=match):
        seqkernels.lstm_cell(*mutate(args))


def test_explicit_backend_that_cannot_run_raises():
    args = _inputs(2, 3, 4, torch.float32)
    with pytest.raises(backends.BackendError, match="cuda"):
        seqkernels.lstm_cell(*args, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        seqkernels.lstm_cell(*args, backend="tpu")


@pytest.mark.skipif(not _ext.has_kernel("lstm_cell_fwd", "CPU"), reason="extension not built")
def test_cpu_kernel_names_bad_arguments():
    with pytest.raises(RuntimeError, match="hidden_gates must have shape"):
        torch.ops.seqkernels.lstm_cell_fwd(torch.randn(2, 8), torch.randn(2, 4), torch.randn(2, 2), None, None)
    with pytest.raises(RuntimeError, match="bias_hh must have shape"):
        torch.ops.seqkernels.lstm_cell_fwd(
            torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 2), None, torch.randn(4)
        )
    with pytest.raises(RuntimeError, match="cy has dtype"):
        torch.ops.seqkernels.lstm_cell_bwd(None, None, torch.randn(2, 2), torch.randn(2, 2).double(), torch.randn(2, 8))


# ---------------------------------------------------------------------------------------------
# CUDA kernels through the CUDA-on-CPU harness (tests/emulation), and on a real GPU.

CUDA_SOURCES = ["csrc/cuda/lstm_cell.cu"]


@pytest.fixture(scope="module")
def emu():
    from emulation import load_emulated

    return load_emulated("lstm_cell", CUDA_SOURCES)


# (B, H, row-stride padding): H % 8 == 0 with aligned rows takes the 16-byte path for every
# dtype; odd H or padding that breaks 16-byte alignment takes the one-element path.
EMU_CASES = [(3, 8, 0), (2, 5, 0), (4, 24, 8), (3, 16, 1), (1, 1, 0)]


def _emu_case(emu, dtype, B, H, pad, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype)

    ig = rnd(B, 4 * H + pad)[:, pad:] if pad else rnd(B, 4 * H)
    hg, cx = rnd(B, 4 * H), rnd(B, H)
    bih, bhh = rnd(4 * H), rnd(4 * H)
    hy, cy, ws = emu.lstm_cell_fwd(ig, hg, cx, bih, bhh)
    fwd = testing.compare(
        (hy, cy, ws),
        reference.lstm_cell_fwd_ref(*_cpu64([ig, hg, cx, bih, bhh])),
        reference.lstm_cell_fwd_ref(ig, hg, cx, bih, bhh),
    )
    gh, gc = rnd(B, H), rnd(B, H)
    bwd = testing.compare(
        emu.lstm_cell_bwd(gh, gc, cx, cy, ws),
        reference.lstm_cell_bwd_ref(*_cpu64([gh, gc, cx, cy, ws])),
        reference.lstm_cell_bwd_ref(gh, gc, cx, cy, ws),
        grad=True,
    )
    one_sided = testing.compare(
        emu.lstm_cell_bwd(None, gc, cx, cy, ws),
        reference.lstm_cell_bwd_ref(None, *_cpu64([gc, cx, cy, ws])),
        reference.lstm_cell_bwd_ref(None, gc, cx, cy, ws),
        grad=True,
    )
    no_bias = testing.compare(
        emu.lstm_cell_fwd(ig, hg, cx, None, bhh),
        reference.lstm_cell_fwd_ref(*_cpu64([ig, hg, cx]), None, bhh.double()),
        reference.lstm_cell_fwd_ref(ig, hg, cx, None, bhh),
    )
    return fwd, bwd, one_sided, no_bias


@pytest.mark.emulation
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: "B{}H{}pad{}".format(*c))
def test_cuda_kernels_emulated(emu, dtype, case):
    for report in _emu_case(emu, dtype, *case):
        assert report.passed, str(report)


@pytest.mark.emulation
def test_cuda_launcher_names_bad_arguments_emulated(emu):
    with pytest.raises(RuntimeError, match="cx must have shape"):
        emu.lstm_cell_fwd(torch.randn(2, 8), torch.randn(2, 8), torch.randn(3, 2), None, None)
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        emu.lstm_cell_fwd(torch.randn(2, 8).int(), torch.randn(2, 8).int(), torch.randn(2, 2).int(), None, None)


def _sanitized_case(emu):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for case in ((3, 8, 0), (2, 5, 0), (2, 16, 1)):
            for report in _emu_case(emu, dtype, *case):
                assert report.passed, str(report)


@pytest.mark.emulation
@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_cuda_kernels_sanitized(sanitizer):
    from emulation import run_sanitized

    run_sanitized(sanitizer, "lstm_cell", CUDA_SOURCES, _sanitized_case).assert_clean()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_large_batch_parity(backend, dtype):
    args = _inputs(257, 128, 1024, dtype, "cuda")
    _skip_unless_runs(backend, lstm_ops.prepare_lstm_cell(*args))
    hy, cy = seqkernels.lstm_cell(*args, backend=backend)
    # The baseline is plain torch math on the same device: cuBLAS sums the GEMMs in its own order.
    report = testing.compare(
        (hy.cpu(), cy.cpu()),
        reference.lstm_cell_ref(*_cpu64(args)),
        tuple(t.cpu() for t in reference.lstm_cell_ref(*args)),
    )
    assert report.passed, str(report)


# ---------------------------------------------------------------------------------------------
# Triton ahead of time (no GPU needed): the STATIC_CONFIGS compile for sm_80 / sm_90 without
# spills or shared memory, with 16-byte vector accesses.


def _check_static(pattern):
    results = compile_static("seqkernels.triton_kernels.lstm_cell", pattern)
    assert len(results) >= pattern.count("|") + 1, f"a pattern of {pattern!r} matches no static config"
    bad = [
        f"{r['name']}: {r}"
        for r in results
        if r["stack"] or r["local"] or r["smem"] or not (r["v4_loads"] and r["v4_stores"])
    ]
    assert not bad, "\n".join(bad)


# A sample (the whole list is compiled by the kernel report): the module's bias-free bf16 forward,
# a float32 backward, and the float64 forward, the one closest to the register limit.
def test_triton_static_compile_sample():
    # One subprocess for the three (each start imports torch and triton).
    _check_static(
        "|".join(
            [
                r"fwd_kernel sm_90 bf16 BLOCK_B=8 BLOCK_H=256 bias=False",
                r"bwd_kernel sm_80 fp32 BLOCK_B=8",
                r"fwd_kernel sm_90 fp64 BLOCK_B=2 BLOCK_H=256 bias=True",
            ]
        )
    )


_SCALAR_PATH_SCRIPT = r"""
import torch
from seqkernels import reference, testing
op_f, op_b = torch.ops.seqkernels.lstm_cell_fwd, torch.ops.seqkernels.lstm_cell_bwd
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    B, H = 3, 13
    ig, hg, cx = torch.randn(B, 4 * H).to(dtype), torch.randn(B, 4 * H).to(dtype), torch.randn(B, H).to(dtype)
    bih = torch.randn(4 * H).to(dtype)
    out = op_f(ig, hg, cx, bih, None)
    r = testing.compare(out, reference.lstm_cell_fwd_ref(ig.double(), hg.double(), cx.double(), bih.double()),
                        reference.lstm_cell_fwd_ref(ig, hg, cx, bih))
    gh = torch.randn(B, H).to(dtype)
    g = op_b(gh, None, cx, out[1], out[2])
    r.extend(testing.compare(g, reference.lstm_cell_bwd_ref(gh.double(), None, cx.double(), out[1].double(),
                                                           out[2].double()),
                             reference.lstm_cell_bwd_ref(gh, None, cx, out[1], out[2]), grad=True))
    assert r.passed, str(r)
print("ok")
"""


@pytest.mark.skipif(not _ext.has_kernel("lstm_cell_fwd", "CPU"), reason="extension not built")
def test_cpu_baseline_isa_path():
    # SEQKERNELS_CPU_ISA=portable makes the CPU kernels take their one-element (non-AVX2) path,
    # as on CPUs without AVX2; set for a whole fresh process, so no earlier call can have chosen.
    import os
    import subprocess
    import sys

    env = dict(os.environ, SEQKERNELS_CPU_ISA="portable")
    pkg = os.path.dirname(os.path.dirname(seqkernels.__file__))
    env["PYTHONPATH"] = os.pathsep.join([pkg] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", _SCALAR_PATH_SCRIPT], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# The CPU sequence kernel lstm_layer_fwd (inference path of seqkernels.nn.LSTM)

needs_layer_op = pytest.mark.skipif(not lstm_ops._HAS_LAYER_OP, reason="extension built without lstm_layer_fwd")


def _layer_inputs(T, B, H, dtype, bias):
    t = [
        torch.randn(T, B, 4 * H),
        torch.randn(B, H),
        torch.randn(B, H),
        torch.randn(4 * H, H) / H**0.5,
        torch.randn(4 * H) * 0.5 if bias else None,
    ]
    return [None if x is None else x.to(dtype) for x in t]


@needs_layer_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "T,B,H,reverse,bias",
    [
        (1, 1, 1, False, True),
        (5, 3, 37, False, True),
        (4, 2, 64, True, False),
        (7, 5, 70, False, True),  # two unit blocks of 40 and 30: SIMD tails in both threads
        (3, 4, 200, True, True),
        (2, 3, 520, False, False),
    ],
)
def test_layer_op_matches_reference(dtype, T, B, H, reverse, bias):
    args = _layer_inputs(T, B, H, dtype, bias)
    got = torch.ops.seqkernels.lstm_layer_fwd(*args, reverse)
    exp = reference.lstm_layer_fwd_ref(*[None if a is None else a.double() for a in args], reverse)
    base = reference.lstm_layer_fwd_ref(*args, reverse)
    assert [g.shape for g in got] == [(T, B, H), (B, H), (B, H)] and all(g.dtype == dtype for g in got)
    report = testing.compare(list(got), list(exp), list(base))
    assert report.passed, str(report)


@needs_layer_op
def test_layer_op_single_thread_and_non_contiguous_inputs():
    T, B, H = 4, 3, 96
    ig, h0, c0, w, b = _layer_inputs(T, B, H, torch.float64, True)
    exp = reference.lstm_layer_fwd_ref(ig, h0, c0, w, b, False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        got = torch.ops.seqkernels.lstm_layer_fwd(
            ig.transpose(0, 1).contiguous().transpose(0, 1),
            h0.t().contiguous().t(),
            c0,
            w.t().contiguous().t(),
            b,
            False,
        )
    finally:
        torch.set_num_threads(threads)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e)


@needs_layer_op
def test_layer_op_opcheck_and_errors():
    ig, h0, c0, w, b = _layer_inputs(3, 2, 8, torch.float32, True)
    torch.library.opcheck(torch.ops.seqkernels.lstm_layer_fwd.default, (ig, h0, c0, w, b, True))
    op = torch.ops.seqkernels.lstm_layer_fwd
    out, h, c = op(ig[:0], h0, c0, w, b, False)  # no steps: the state passes through
    assert out.shape == (0, 2, 8) and torch.equal(h, h0) and torch.equal(c, c0)
    with pytest.raises(RuntimeError, match="input_gates must be float32 or float64"):
        op(ig.half(), h0.half(), c0.half(), w.half(), None, False)
    with pytest.raises(RuntimeError, match=r"weight_hh must have shape \(32, 8\)"):
        op(ig, h0, c0, w[:, :7], b, False)
    with pytest.raises(RuntimeError, match="h0 must have shape"):
        op(ig, h0[:1], c0, w, b, False)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(ig, h0, c0, w, b[:5], False)

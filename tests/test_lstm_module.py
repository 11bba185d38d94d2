"""seqkernels.nn.LSTMCell / LSTM against torch.nn.LSTMCell / LSTM (same weights), swap_lstm and
restore_lstm, and the modules' errors."""

import copy
import os
import warnings

import pytest
import torch
from conftest import HAS_CUDA
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqkernels
from seqkernels import _ext, backends, testing
from seqkernels.nn.lstm import LSTM, LSTMCell, restore_lstm, swap_lstm
from seqkernels.ops import lstm as lstm_ops

BACKENDS = ["reference", "cpu", "triton"] + (["cuda"] if HAS_CUDA else [])


def _device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def _skip_unless_runs(backend, device, dtype):
    x = torch.zeros(1, 1, device=device, dtype=dtype)
    call = lstm_ops.prepare_lstm_cell(
        x, x, x, torch.zeros(4, 1, device=device, dtype=dtype), torch.zeros(4, 1, device=device, dtype=dtype)
    )
    reason = backends.why_not(lstm_ops.OP, backend, call.device, call)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _pair(backend, dtype=torch.float64, **kw):
    """A torch LSTM and a seqkernels one with the same weights, on the backend's device."""
    device = _device_for(backend)
    ref = torch.nn.LSTM(**kw, dtype=dtype, device=device)
    for p in ref.parameters():  # torch's init is tiny; larger weights exercise the nonlinearities
        torch.nn.init.uniform_(p, -0.6, 0.6)
    ours = LSTM(**kw, dtype=dtype, device=device, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(m, x, hx, grads_wrt, cot):
    out, (h, c) = m(x, hx)
    data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    grads = torch.autograd.grad([data, h, c], grads_wrt, [cot[0], cot[1], cot[2]], allow_unused=True)
    return (data, h, c), grads


# (num_layers, bidirectional, batch_first, bias, with initial state, T, B)
CONFIGS = [
    (1, False, False, True, False, 1, 3),
    (1, True, True, True, True, 17, 2),
    (2, False, True, False, True, 9, 4),
    (2, True, False, True, False, 6, 1),
    (3, False, False, True, True, 5, 3),
]


# The interpreter runs Triton slowly: it gets the configs that cover bidirectional, batch_first,
# no bias, given state and three layers between them.
CASES64 = [(b, c) for b in BACKENDS for c in CONFIGS if b != "triton" or c in (CONFIGS[1], CONFIGS[2], CONFIGS[4])]


@pytest.mark.parametrize(
    "backend,cfg", CASES64, ids=lambda c: c if isinstance(c, str) else "L{}-bi{}-bf{}-bias{}-h0{}-T{}B{}".format(*c)
)
def test_lstm_matches_torch_float64(backend, cfg):
    layers, bidir, batch_first, bias, with_h0, T, B = cfg
    device = _device_for(backend)
    _skip_unless_runs(backend, device, torch.float64)
    n_in, H = 7, 5
    ref, ours = _pair(
        backend,
        input_size=n_in,
        hidden_size=H,
        num_layers=layers,
        bidirectional=bidir,
        batch_first=batch_first,
        bias=bias,
        dropout=0.4 if layers > 1 else 0.0,
    )
    ref.eval()
    ours.eval()  # dropout between layers is off in eval mode, as in torch
    D = 2 if bidir else 1
    x = torch.randn(
        (B, T, n_in) if batch_first else (T, B, n_in), dtype=torch.float64, device=device, requires_grad=True
    )
    hx = None
    leaves = [x]
    if with_h0:
        hx = tuple(
            torch.randn(layers * D, B, H, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2)
        )
        leaves += list(hx)
    out_shape = (B, T, D * H) if batch_first else (T, B, D * H)
    cot = (
        torch.randn(out_shape, dtype=torch.float64, device=device),
        torch.randn(layers * D, B, H, dtype=torch.float64, device=device),
        torch.randn(layers * D, B, H, dtype=torch.float64, device=device),
    )
    exp, exp_g = _run(ref, x, hx, leaves + list(ref.parameters()), cot)
    got, got_g = _run(ours, x, hx, leaves + list(ours.parameters()), cot)
    assert got[0].shape == out_shape
    for a, b in zip(got + got_g, exp + exp_g):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_lstm_parity_rule_low_precision(backend, dtype):
    device = _device_for(backend)
    _skip_unless_runs(backend, device, dtype)
    kw = dict(input_size=16, hidden_size=24, num_layers=2, bidirectional=True)
    ref64, _ = _pair(backend, **kw)
    ref_t = copy.deepcopy(ref64).to(dtype)
    ours = LSTM(**kw, dtype=dtype, device=device, backend=backend)
    ours.load_state_dict(ref_t.state_dict())
    x = torch.randn(9, 3, 16, device=device)
    cot = (
        torch.randn(9, 3, 48, device=device),
        torch.randn(4, 3, 24, device=device),
        torch.randn(4, 3, 24, device=device),
    )

    def run(m, dt):
        xx = x.to(dt).requires_grad_()
        outs, grads = _run(m, xx, None, [xx] + list(m.parameters()), [c.to(dt) for c in cot])
        return [t.cpu() for t in outs], [t.cpu() for t in grads]

    got, got_g = run(ours, dtype)
    exp, exp_g = run(ref64, torch.float64)
    base, base_g = run(ref_t, dtype)
    report = testing.compare(got, exp, base)
    report.extend(testing.compare(got_g, exp_g, base_g, grad=True, name="grad"))
    assert report.passed, str(report)


@pytest.mark.parametrize("backend,bidir", [("cpu", False), ("cpu", True), ("triton", True), ("reference", True)])
def test_packed_sequence_matches_torch(backend, bidir):
    _skip_unless_runs(backend, "cpu", torch.float64)
    ref, ours = _pair(backend, input_size=4, hidden_size=6, num_layers=2, bidirectional=bidir, batch_first=True)
    D = 2 if bidir else 1
    lengths = torch.tensor([3, 7, 1, 5])  # unsorted: exercises sorted_indices / unsorted_indices
    x = torch.randn(4, 7, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2 * D, 4, 6, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2 * D, 4, 6, dtype=torch.float64, requires_grad=True)
    cot_h = torch.randn(2 * D, 4, 6, dtype=torch.float64)
    results = []
    for m in (ref, ours):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, (h, c) = m(packed, (h0, c0))
        padded, out_len = pad_packed_sequence(out, batch_first=True)
        loss = (padded * torch.linspace(-1, 1, padded.numel(), dtype=torch.float64).view_as(padded)).sum()
        loss = loss + (h * cot_h).sum() + (c * cot_h.flip(0)).sum()
        grads = torch.autograd.grad(loss, [x, h0, c0] + list(m.parameters()))
        results.append((padded, out_len, h, c) + grads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(backend, batch_first):
    _skip_unless_runs(backend, "cpu", torch.float64)
    ref, ours = _pair(backend, input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(6, 3, dtype=torch.float64)
    hx = (torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64))
    for args in ((x,), (x, hx)):
        exp_out, (exp_h, exp_c) = ref(*args)
        out, (h, c) = ours(*args)
        assert out.shape == (6, 8) and h.shape == (4, 4)
        torch.testing.assert_close(out, exp_out)
        torch.testing.assert_close(h, exp_h)
        torch.testing.assert_close(c, exp_c)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_empty_batch_trains(backend, dtype):
    """An empty batch gives empty outputs and, in training, empty gradients of torch's shapes and
    zero weight gradients (the cpu backend's layer backward once failed to reshape its h_prev)."""
    _skip_unless_runs(backend, "cpu", dtype)
    ref, ours = _pair(backend, dtype=dtype, input_size=5, hidden_size=7, num_layers=2, bidirectional=True)
    x = torch.randn(4, 0, 5, dtype=dtype, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    grads = []
    for m, xi in ((ref, xr), (ours, x)):
        out, (h, c) = m(xi)
        assert out.shape == (4, 0, 14) and h.shape == (4, 0, 7)
        grads.append(torch.autograd.grad((out.sum() + h.sum() + c.sum()), [xi, *m.parameters()]))
    for a, b in zip(*grads):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_refusal_names_the_way_out(backend):
    """The kernel backends' layer backward is first-order: differentiating its result again raises
    an error that says so and names backend='reference' (which differentiates to any order)."""
    _skip_unless_runs(backend, "cpu", torch.float32)
    m = LSTM(4, 5, backend=backend)
    x = torch.randn(3, 2, 4, requires_grad=True)
    out, _ = m(x)
    (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="nn.LSTM: double backward .*backend='reference'"):
        g.sum().backward()
    # The first-order gradient itself is unchanged by create_graph.
    (g1,) = torch.autograd.grad(m(x)[0].pow(2).sum(), x)
    torch.testing.assert_close(g.detach(), g1)
    ref = LSTM(4, 5, backend="reference")
    ref.load_state_dict(m.state_dict())
    (gr,) = torch.autograd.grad(ref(x)[0].pow(2).sum(), x, create_graph=True)
    gr.sum().backward()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_training_dropout_one_drops_everything_between_layers(backend):
    # dropout=1 zeroes the input of layer 2 in training: deterministic, so it can be compared.
    _skip_unless_runs(backend, "cpu", torch.float64)
    ref, ours = _pair(backend, input_size=3, hidden_size=4, num_layers=2, dropout=1.0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    ref.train()
    ours.train()
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
    ours_eval = ours.eval()(x)[0]
    assert not torch.allclose(ours_eval, ref.train()(x)[0])


def test_training_dropout_is_applied_between_layers_only():
    m = LSTM(3, 4, num_layers=2, dropout=0.5, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    m.train()
    a, b = m(x)[0], m(x)[0]
    assert not torch.equal(a, b)  # fresh dropout masks per call
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_lstmcell_matches_torch(backend):
    _skip_unless_runs(backend, "cpu", torch.float64)
    ref = torch.nn.LSTMCell(6, 5, dtype=torch.float64)
    ours = LSTMCell(6, 5, dtype=torch.float64, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x, h, c = (
        torch.randn(3, 6, dtype=torch.float64),
        torch.randn(3, 5, dtype=torch.float64),
        torch.randn(3, 5, dtype=torch.float64),
    )
    for args in ((x,), (x, (h, c)), (x[0],), (x[0], (h[0], c[0]))):
        for a, b in zip(ours(*args), ref(*args)):
            torch.testing.assert_close(a, b)


def test_state_dict_round_trip_and_names():
    ref = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    ours = LSTM(5, 7, num_layers=2, bidirectional=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    cell_ref, cell = torch.nn.LSTMCell(3, 4, bias=False), LSTMCell(3, 4, bias=False)
    assert list(cell.state_dict()) == list(cell_ref.state_dict())
    cell.load_state_dict(cell_ref.state_dict())
    assert isinstance(ours, torch.nn.LSTM) and "backend" not in repr(ours)
    assert "backend='reference'" in repr(LSTM(2, 3, backend="reference"))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True, dtype=torch.float64)
        self.blocks = torch.nn.ModuleList(
            [torch.nn.LSTMCell(6, 6, dtype=torch.float64), torch.nn.Linear(6, 2, dtype=torch.float64)]
        )
        self.proj = torch.nn.LSTM(4, 6, proj_size=3, dtype=torch.float64)

    def forward(self, x):
        y, _ = self.enc(x)
        h, _ = self.blocks[0](y[:, -1])
        return self.blocks[1](h), self.proj(x.transpose(0, 1))[0]


def test_swap_and_restore_lstm():
    model = _Model().eval()
    model.enc.train()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    before = model(x)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="proj_size"):
        n = swap_lstm(model, backend="cpu" if _ext.extension_available() else "reference")
    assert n == 2
    assert type(model.enc) is LSTM and type(model.blocks[0]) is LSTMCell and type(model.proj) is torch.nn.LSTM
    assert model.enc.training and not model.blocks[0].training
    assert all(p is params[name] for name, p in model.named_parameters())  # the same Parameter objects
    after = model(x)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert swap_lstm(model) == 0  # already swapped
    assert restore_lstm(model) == 2
    assert type(model.enc) is torch.nn.LSTM and type(model.blocks[0]) is torch.nn.LSTMCell
    assert not hasattr(model.enc, "backend")
    for a, b in zip(model(x), before):
        torch.testing.assert_close(a, b)


def test_swap_the_model_itself_and_lazy_exports():
    m = torch.nn.LSTM(3, 4)
    assert seqkernels.swap_lstm(m) == 1 and type(m) is LSTM and m.backend is None
    assert seqkernels.restore_lstm(m) == 1 and type(m) is torch.nn.LSTM
    with pytest.raises(ValueError, match="unknown backend"):
        swap_lstm(m, backend="gpu")


# ---------------------------------------------------------------------------------------------
# Errors


def test_proj_size_is_rejected():
    with pytest.raises(ValueError, match="proj_size"):
        LSTM(4, 6, proj_size=3)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        LSTM(3, 4, backend="tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        LSTMCell(3, 4, backend="tpu")


def test_explicit_backend_that_cannot_run_raises():
    m = LSTM(3, 4, backend="cuda")
    with pytest.raises(backends.BackendError, match="cuda"):
        m(torch.randn(2, 1, 3))


@pytest.mark.parametrize(
    "x,hx,exc,match",
    [
        (torch.randn(5, 2, 7), None, ValueError, "input: has 7 features but this LSTM has input_size=3"),
        (torch.randn(5), None, ValueError, "expected input to be 2-D"),
        (torch.randn(5, 2, 3), (torch.randn(2, 2, 4), torch.randn(2, 2, 4)), ValueError, r"h_0 of shape \(1, 2, 4\)"),
        (torch.randn(5, 2, 3), (torch.randn(1, 4), torch.randn(1, 4)), ValueError, "must be 3-D"),
        (torch.randn(5, 3), (torch.randn(1, 2, 4), torch.randn(1, 2, 4)), ValueError, "must be 2-D"),
        (torch.randn(5, 2, 3), (torch.randn(1, 2, 4).double(), torch.randn(1, 2, 4)), ValueError, "h_0 has dtype"),
        (torch.randn(5, 2, 3).double(), None, TypeError, "dtype float32 does not match"),
        (torch.randn(5, 2, 3), torch.randn(1, 2, 4), ValueError, "pair"),
    ],
)
def test_bad_module_inputs_are_named(x, hx, exc, match):
    m = LSTM(3, 4)
    with pytest.raises(exc, match=match):
        m(x, hx)


def test_bad_cell_inputs_are_named():
    cell = LSTMCell(3, 4)
    with pytest.raises(ValueError, match="input: has 5 features"):
        cell(torch.randn(2, 5))
    with pytest.raises(ValueError, match="1-D or 2-D"):
        cell(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match="hx: expected shape"):
        cell(torch.randn(2, 3), (torch.randn(3, 4), torch.randn(3, 4)))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_lstm_matches_torch(backend):
    _skip_unless_runs(backend, "cuda", torch.float32)
    ref, ours = _pair(backend, dtype=torch.float32, input_size=64, hidden_size=128, num_layers=2, bidirectional=True)
    x = torch.randn(33, 8, 64, device="cuda")
    # cuDNN's float32 LSTM uses TF32 tensor cores by default (torch.backends.cudnn.allow_tf32),
    # errors near 1e-2 here: the baseline is torch in true float32, the truth torch in float64.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        exp = ref(x)[0]
    ref64 = copy.deepcopy(ref).double().cpu()
    truth = ref64(x.double().cpu())[0]
    got = ours(x)[0]
    report = testing.compare((got.cpu(),), (truth,), (exp.cpu(),))
    assert report.passed, str(report)


def test_in_place_change_of_initial_state_before_backward_raises():
    m = LSTM(3, 4, dtype=torch.float64, backend="cpu" if _ext.extension_available() else "reference")
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0, c0 = torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)
    out, (h, c) = m(x, (h0, c0))
    c.mul_(2)  # the returned state is the caller's to modify
    out.sum().backward()
    out, _ = m(x, (h0, c0))
    c0.add_(1)  # the saved initial state is not
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_chunked_input_projection(backend, monkeypatch):
    # The input projection runs a few whole steps at a time into a reused buffer; shrink the chunk
    # so that several chunks (some with a single step) occur, with a packed batch that shrinks.
    _skip_unless_runs(backend, "cpu", torch.float64)
    monkeypatch.setattr(lstm_ops, "_PROJ_CHUNK_BYTES", 4 * 5 * 8 * 5)  # 5 rows of 4H=20 float64
    ref, ours = _pair(backend, input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 2, 4])
    results = []
    for m in (ref, ours):
        out, (h, c) = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
        loss = (out.data * torch.linspace(-1, 1, out.data.numel(), dtype=torch.float64).view_as(out.data)).sum()
        loss = loss + h.sum() - 2 * c.sum()
        results.append((out.data, h, c) + torch.autograd.grad(loss, [x] + list(m.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Inference on the cpu backend: the whole layer in the C++ sequence kernel (lstm_layer_fwd)

needs_layer_op = pytest.mark.skipif(not lstm_ops._HAS_LAYER_OP, reason="extension built without lstm_layer_fwd")


def _count_layer_calls(monkeypatch):
    calls = []
    real = lstm_ops._cpu_layer_forward

    def spy(*args, **kwargs):
        calls.append(args[-1])  # reverse
        return real(*args, **kwargs)

    monkeypatch.setattr(lstm_ops, "_cpu_layer_forward", spy)
    return calls


@needs_layer_op
@pytest.mark.parametrize(
    "cfg", CONFIGS + [(2, True, True, True, True, 4, 5)], ids=lambda c: "L{}-bi{}-bf{}-bias{}-h0{}-T{}B{}".format(*c)
)
@pytest.mark.parametrize("hidden", [5, 70])
def test_inference_sequence_kernel_matches_torch_float64(cfg, hidden, monkeypatch):
    layers, bidir, batch_first, bias, with_h0, T, B = cfg
    calls = _count_layer_calls(monkeypatch)
    ref, ours = _pair(
        "cpu",
        input_size=7,
        hidden_size=hidden,
        num_layers=layers,
        bidirectional=bidir,
        batch_first=batch_first,
        bias=bias,
    )
    D = 2 if bidir else 1
    x = torch.randn((B, T, 7) if batch_first else (T, B, 7), dtype=torch.float64)
    hx = tuple(torch.randn(layers * D, B, hidden, dtype=torch.float64) for _ in range(2)) if with_h0 else None
    with torch.no_grad():
        got, exp = ours(x, hx), ref(x, hx)
    torch.testing.assert_close(got, exp)
    assert calls == [False, True] * layers if bidir else calls == [False] * layers


@needs_layer_op
@pytest.mark.parametrize("project_first", [False, True], ids=["fused-input", "project-first"])
def test_inference_sequence_kernel_parity_rule_float32(project_first, monkeypatch):
    calls = _count_layer_calls(monkeypatch)
    # The input projection inside the kernel, or as one GEMM first (_mm: oneDNN), as a large W_ih takes.
    monkeypatch.setattr(lstm_ops, "_project_first", lambda *a: project_first and a[2] > 1)
    # torch's own init here: _pair's larger weights saturate the gates over 200 units, where plain
    # float32 torch itself is no longer assert_close to float64.
    kw = dict(input_size=24, hidden_size=200, num_layers=2, bidirectional=True)
    ref64 = torch.nn.LSTM(**kw, dtype=torch.float64)
    ours = LSTM(**kw, backend="cpu")
    ours.load_state_dict(ref64.state_dict())
    ref32 = copy.deepcopy(ref64).float()
    x = torch.randn(33, 6, 24)
    with torch.no_grad():
        got, exp, base = ours(x), ref64(x.double()), ref32(x)
    report = testing.compare([got[0], *got[1]], [exp[0], *exp[1]], [base[0], *base[1]])
    assert report.passed, str(report)
    assert len(calls) == 4


@needs_layer_op
def test_inference_paths_that_keep_the_step_loop(monkeypatch):
    # A packed batch that shrinks and float64 needing gradients run the per-step path (same
    # results, checked elsewhere); the sequence kernel must not be called for them.
    calls = _count_layer_calls(monkeypatch)
    ref, ours = _pair("cpu", input_size=3, hidden_size=5, num_layers=1)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        packed = pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False)
        torch.testing.assert_close(ours(packed)[0].data, ref(packed)[0].data)
    ours.double()(x)
    assert calls == []


# The float32 sequence kernel on the AVX2 / AVX-512 lanes: the recurrent GEMM of a block of units
# (16 on AVX-512, 8 on AVX2) fused with the cell, 4 (AVX-512) or 2 (AVX2) batch rows per tile and
# narrower tiles for the rest, the unit blocks split over an OpenMP team. Sizes around those tiles;
# each ISA level this CPU runs (SEQKERNELS_CPU_ISA is read per call; portable is the per-step BLAS
# path), both directions, with and without bias, against the float64 reference by the parity rule.
LAYER_ISAS = ["native", "avx2", "portable"]
LAYER_HIDDEN = [1, 7, 8, 9, 15, 16, 17, 31, 33, 49]
LAYER_BATCH = [1, 2, 3, 4, 5, 7, 9]


def _layer_args(T, B, H, gen, bias=True):
    ig = torch.randn(T, B, 4 * H, generator=gen, dtype=torch.float64)
    h0 = torch.randn(B, H, generator=gen, dtype=torch.float64)
    c0 = torch.randn(B, H, generator=gen, dtype=torch.float64)
    w = torch.randn(4 * H, H, generator=gen, dtype=torch.float64) / H**0.5
    b = torch.randn(4 * H, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    return ig, h0, c0, w, b


def _check_layer(args64, reverse):
    from seqkernels import reference

    args32 = [a.float() if a is not None else None for a in args64]
    got = torch.ops.seqkernels.lstm_layer_fwd(*args32, reverse)
    ref = reference.lstm_layer_fwd_ref(*args64, reverse)
    base = reference.lstm_layer_fwd_ref(*args32, reverse)
    report = testing.compare(tuple(got), tuple(ref), tuple(base))
    assert report.passed, str(report)
    return got


@needs_layer_op
@pytest.mark.parametrize("isa", LAYER_ISAS)
@pytest.mark.parametrize("hidden", LAYER_HIDDEN)
@pytest.mark.parametrize("reverse", [False, True])
def test_sequence_kernel_tiles_float32(isa, hidden, reverse, monkeypatch):
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(hidden)
    for T in (1, 3):
        for B in LAYER_BATCH:
            _check_layer(_layer_args(T, B, hidden, gen, bias=B % 2 == 1), reverse)


# Sizes big enough for the team (B x H x 4H >= 2^16 multiply-adds a step): every thread gets unit
# blocks, the last block of the last thread partial. The K sums do not depend on the split, so the
# result is bitwise the same for any thread count. A thread done with its blocks takes the others'
# remaining ones: three threads on the 2-core CI machine, over 40 steps, do that many times (a block
# run twice or by two threads at once updates the cell state twice; one never run leaves stale h).
@needs_layer_op
@pytest.mark.parametrize("isa", LAYER_ISAS)
@pytest.mark.parametrize("TBH", [(3, 16, 33), (4, 7, 49), (2, 5, 100), (3, 9, 130), (40, 6, 150)], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
def test_sequence_kernel_threads_float32(isa, TBH, reverse, monkeypatch):
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", isa)
    T, B, H = TBH
    args = _layer_args(T, B, H, torch.Generator().manual_seed(B * H))
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_check_layer(args, reverse))
    finally:
        torch.set_num_threads(before)
    if isa != "portable":  # the BLAS path may block its GEMM differently per thread count
        for r in results[1:]:
            for a, b in zip(results[0], r):
                assert torch.equal(a, b)


@needs_layer_op
def test_sequence_kernel_non_contiguous_and_empty():
    gen = torch.Generator().manual_seed(3)
    T, B, H = 3, 5, 19
    ig, h0, c0, w, b = _layer_args(T, B, H, gen)
    # Non-contiguous views of every tensor give the same result as their contiguous copies.
    ig_nc = torch.randn(B, T, 8 * H, dtype=torch.float64, generator=gen).transpose(0, 1)[:, :, ::2]
    ig_nc.copy_(ig)
    w_nc = torch.randn(H, 4 * H, dtype=torch.float64, generator=gen).t()
    w_nc.copy_(w)
    h0_nc = torch.randn(H, B, dtype=torch.float64, generator=gen).t()
    h0_nc.copy_(h0)
    b_nc = torch.randn(8 * H, dtype=torch.float64, generator=gen)[::2]
    b_nc.copy_(b)
    got = torch.ops.seqkernels.lstm_layer_fwd(
        ig_nc.float(), h0_nc.float(), c0.float(), w_nc.float(), b_nc.float(), False
    )
    exp = torch.ops.seqkernels.lstm_layer_fwd(ig.float(), h0.float(), c0.float(), w.float(), b.float(), False)
    for a, e in zip(got, exp):
        assert torch.equal(a, e)
    # Zero-size batch or hidden size: empty outputs of the right shapes, h_n / c_n the initial state.
    for B0, H0 in [(0, 5), (3, 0)]:
        out, h, c = torch.ops.seqkernels.lstm_layer_fwd(
            torch.zeros(2, B0, 4 * H0), torch.ones(B0, H0), torch.ones(B0, H0), torch.zeros(4 * H0, H0), None, False
        )
        assert out.shape == (2, B0, H0) and h.shape == (B0, H0) and c.shape == (B0, H0)


@needs_layer_op
def test_sequence_kernel_bad_arguments_are_named():
    ig, h0, c0, w, b = (a.float() for a in _layer_args(2, 3, 5, torch.Generator().manual_seed(0)))
    op = torch.ops.seqkernels.lstm_layer_fwd
    with pytest.raises(RuntimeError, match="weight_hh"):
        op(ig, h0, c0, w[:, :4], b, False)
    with pytest.raises(RuntimeError, match="h0"):
        op(ig, h0[:2], c0, w, b, False)
    with pytest.raises(RuntimeError, match="c0"):
        op(ig, h0, c0.double(), w, b, False)
    with pytest.raises(RuntimeError, match="bias"):
        op(ig, h0, c0, w, b[:7], False)
    with pytest.raises(RuntimeError, match="input_gates"):
        op(ig[..., :-1], h0, c0, w, b, False)


# lstm_layer_fwd.fused: the input projection inside the kernel (its K loop over x_t, then h_prev),
# or (project=False: weight_ih None) the input gates given, float32 on every ISA level (portable:
# the one-lane baseline code). Odd input sizes too.
@needs_layer_op
@pytest.mark.parametrize("isa", LAYER_ISAS)
@pytest.mark.parametrize("hidden", [1, 9, 16, 17, 33])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("project", [True, False])
def test_fused_layer_kernel_float32(isa, hidden, train, project, monkeypatch):
    from seqkernels import reference

    if not lstm_ops._HAS_LAYER_FUSED:
        pytest.skip("extension built without lstm_layer_fwd.fused")
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(100 + hidden)
    for T, B, n_in in [(1, 3, 1), (3, 5, 7), (3, 4, 17), (2, 9, 16)]:
        for reverse in (False, True):
            x = torch.randn(T, B, n_in, generator=gen, dtype=torch.float64)
            w_ih = torch.randn(4 * hidden, n_in, generator=gen, dtype=torch.float64) / n_in**0.5
            _, h0, c0, w_hh, b = _layer_args(T, B, hidden, gen, bias=B % 2 == 1)

            def ref_of(*a):
                xx, wi, rest = a[0], a[1], a[2:]
                return reference.lstm_layer_fwd_ref(xx @ wi.t(), *rest, reverse)

            a64 = (x, w_ih, h0, c0, w_hh, b)
            a32 = tuple(t.float() if t is not None else None for t in a64)
            # Without weight_ih the kernel gets float32 input gates (the caller's GEMM).
            inp, w_in = (a32[0], a32[1]) if project else (a32[0] @ a32[1].t(), None)
            out, h_n, c_n, ws, cs = torch.ops.seqkernels.lstm_layer_fwd.fused(
                inp, a32[2], a32[3], w_in, a32[4], a32[5], reverse, train
            )
            report = testing.compare((out, h_n, c_n), tuple(ref_of(*a64)), tuple(ref_of(*a32)))
            assert report.passed, str(report)
            assert ws.shape == ((T, B, 4 * hidden) if train else (0, B, 4 * hidden))
            assert cs.shape == ((T, B, hidden) if train else (0, B, hidden))
            if train:  # cs[t] is the cell state after step t: the last step's is c_n
                torch.testing.assert_close(cs[0 if reverse else -1], c_n, rtol=0, atol=0)


# Training on the cpu backend (float32, a constant batch): the fused forward and the one-call
# sequence backward (_CpuLayer), against float64 torch by the parity rule, every ISA level, odd sizes
# around the forward's (16/8 units x 4/2 rows) and the backward's (64/32-unit super-blocks) tiles.
@pytest.mark.parametrize("isa", LAYER_ISAS)
@pytest.mark.parametrize(
    "cfg",
    [(1, False, 1, 1, 5), (2, True, 3, 5, 17), (1, True, 4, 7, 33), (2, False, 2, 9, 65), (1, False, 3, 16, 130)],
    ids=lambda c: "L{}-bi{}-T{}B{}H{}".format(*c),
)
@pytest.mark.parametrize("project_first", [False, True], ids=["fused-input", "project-first"])
def test_training_sequence_kernels_float32(isa, cfg, project_first, monkeypatch):
    if not lstm_ops._HAS_LAYER_FUSED:
        pytest.skip("extension built without lstm_layer_fwd.fused")
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", isa)
    # The input projection inside the kernel, or as one GEMM first (what a large W_ih takes): the
    # fused op then gets the input gates and no weight_ih (T = 1 keeps the projection inside).
    monkeypatch.setattr(lstm_ops, "_project_first", lambda *a: project_first and a[2] > 1)
    # The weight gradients by oneDNN (as (y^T G)^T) or by torch.mm(G^T, y), both routes of _mm_tn at
    # these small sizes.
    monkeypatch.setattr(lstm_ops, "_TN_ONEDNN_MIN_MACS", 0 if project_first else 1 << 62)
    fused = torch.ops.seqkernels.lstm_layer_fwd.fused
    without_w_ih = []
    monkeypatch.setattr(
        torch.ops.seqkernels.lstm_layer_fwd, "fused", lambda *a: without_w_ih.append(a[3] is None) or fused(*a)
    )
    layers, bidir, T, B, H = cfg
    calls = []
    real = lstm_ops._CpuLayer.apply
    monkeypatch.setattr(lstm_ops._CpuLayer, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    kw = dict(input_size=11, hidden_size=H, num_layers=layers, bidirectional=bidir, bias=H % 2 == 1)
    ref64 = torch.nn.LSTM(**kw, dtype=torch.float64)
    ref32 = copy.deepcopy(ref64).float()
    ours = LSTM(**kw, backend="cpu")
    ours.load_state_dict(ref32.state_dict())
    D = 2 if bidir else 1
    gen = torch.Generator().manual_seed(H)
    x = torch.randn(T, B, 11, generator=gen, dtype=torch.float64)
    hx = tuple(torch.randn(layers * D, B, H, generator=gen, dtype=torch.float64) for _ in range(2))
    cot = (
        torch.randn(T, B, D * H, generator=gen, dtype=torch.float64),
        torch.randn(layers * D, B, H, generator=gen, dtype=torch.float64),
        torch.randn(layers * D, B, H, generator=gen, dtype=torch.float64),
    )

    def run(m, dt):
        xx = x.to(dt).requires_grad_()
        h = tuple(t.to(dt).requires_grad_() for t in hx)
        return _run(m, xx, h, [xx, *h, *m.parameters()], [c.to(dt) for c in cot])

    got, got_g = run(ours, torch.float32)
    exp, exp_g = run(ref64, torch.float64)
    base, base_g = run(ref32, torch.float32)
    report = testing.compare(got, exp, base)
    report.extend(testing.compare(got_g, exp_g, base_g, grad=True, name="grad"))
    assert report.passed, str(report)
    assert calls == [False, True] * layers if bidir else calls == [False] * layers
    assert without_w_ih == [project_first and T > 1] * len(calls)


@pytest.mark.parametrize("which", ["out", "h_n", "c_n"])
def test_training_sequence_kernels_one_output_used(which):
    # Gradients reach the backward as None for the outputs not used: they read as zeros.
    if not lstm_ops._HAS_LAYER_FUSED:
        pytest.skip("extension built without lstm_layer_fwd.fused")
    kw = dict(input_size=6, hidden_size=19, num_layers=2)
    ref64 = torch.nn.LSTM(**kw, dtype=torch.float64)
    ref32 = copy.deepcopy(ref64).float()
    ours = LSTM(**kw, backend="cpu")
    ours.load_state_dict(ref32.state_dict())
    x = torch.randn(4, 3, 6, dtype=torch.float64)

    def run(m, dt):
        xx = x.to(dt).requires_grad_()
        out, (h, c) = m(xx)
        y = {"out": out, "h_n": h, "c_n": c}[which]
        return list(torch.autograd.grad((y * y).sum(), [xx, *m.parameters()]))

    report = testing.compare(run(ours, torch.float32), run(ref64, torch.float64), run(ref32, torch.float32), grad=True)
    assert report.passed, str(report)


@needs_layer_op
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_layer_overloads_opcheck(reverse):
    # lstm_layer_fwd's two float32 overloads (its .default is opchecked in tests/test_opcheck.py).
    if not lstm_ops._HAS_LAYER_FUSED:
        pytest.skip("extension built without lstm_layer_fwd.fused")
    T, B, n_in, H = 4, 3, 6, 5
    x = torch.randn(T, B, n_in)
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    w_ih, w_hh, bias = torch.randn(4 * H, n_in), torch.randn(4 * H, H), torch.randn(4 * H)
    fused = torch.ops.seqkernels.lstm_layer_fwd.fused
    for train in (False, True):
        torch.library.opcheck(fused, (x, h0, c0, w_ih, w_hh, bias, reverse, train))
        torch.library.opcheck(fused, (torch.randn(T, B, 4 * H), h0, c0, None, w_hh, bias, reverse, train))
    torch.library.opcheck(fused, (x, h0, c0, w_ih, w_hh, None, reverse, True))
    _, _, _, ws, cs = fused(x, h0, c0, w_ih, w_hh, bias, reverse, True)
    g_out, g_h, g_c = torch.randn(T, B, H), torch.randn(B, H), torch.randn(B, H)
    bwd = torch.ops.seqkernels.lstm_layer_fwd.backward
    torch.library.opcheck(bwd, (g_out, g_h, g_c, ws, cs, c0, w_hh, reverse))
    torch.library.opcheck(bwd, (None, None, g_c, ws, cs, c0, w_hh, reverse))


def test_fused_layer_bad_arguments_are_named():
    if not lstm_ops._HAS_LAYER_FUSED:
        pytest.skip("extension built without lstm_layer_fwd.fused")
    x, h0, c0 = torch.randn(2, 3, 4), torch.randn(3, 5), torch.randn(3, 5)
    w_ih, w_hh = torch.randn(20, 4), torch.randn(20, 5)
    fused = torch.ops.seqkernels.lstm_layer_fwd.fused
    with pytest.raises(RuntimeError, match="weight_ih"):
        fused(x, h0, c0, w_ih[:, :3], w_hh, None, False, False)
    with pytest.raises(RuntimeError, match="weight_hh"):
        fused(x, h0, c0, w_ih, w_hh[:, :4], None, False, False)
    with pytest.raises(RuntimeError, match="input"):
        fused(x.double(), h0, c0, w_ih, w_hh, None, False, False)
    with pytest.raises(RuntimeError, match="c0"):
        fused(x, h0, c0[:2], w_ih, w_hh, None, False, False)
    with pytest.raises(RuntimeError, match=r"input \(the input gates\) must have shape \(T, B, 4\*H\)"):
        fused(torch.randn(2, 3, 18), h0, c0, None, w_hh, None, False, False)
    with pytest.raises(RuntimeError, match="weight_hh must have shape"):
        fused(x, h0, c0, None, w_hh, None, False, False)  # x (I = 4) read as the gates of H = 1
    _, _, _, ws, cs = fused(x, h0, c0, w_ih, w_hh, None, False, True)
    bwd = torch.ops.seqkernels.lstm_layer_fwd.backward
    with pytest.raises(RuntimeError, match="cs"):
        bwd(None, None, None, ws, cs[:1], c0, w_hh, False)
    with pytest.raises(RuntimeError, match="grad_hn"):
        bwd(None, h0[:1], None, ws, cs, c0, w_hh, False)
    with pytest.raises(RuntimeError, match="workspace"):
        bwd(None, None, None, ws.double(), cs, c0, w_hh, False)


# bfloat16 inference on the sequence kernels: the bf16 kernel where AMX tiles or AVX512_BF16 are
# usable (x, h and the weights as bf16 operands, 16-unit blocks; AMX: 16- and 32-row tile groups;
# vdpbf16ps: groups of up to 96 rows in 6-row register tiles, the rest in one tile of 1-5 rows or,
# after a full tile, 4 + 3 or 4 + 4; the projection Tc steps at a time:
# Tc = 16 at B = 16, 64 at B = 5, 4 at B = 64, 48 at B = 17), the float32 kernels on widened
# operands elsewhere. Inputs sit between NaNs: the tiles read whole 16-row groups, both engines
# 32-column chunks, and a read past a tensor would put NaN in the result.
BF16_ENGINES = ["amx_bf16", "avx512_bf16"]


def _native_bf16_lstm() -> bool:
    """Whether the bf16 LSTM takes the bf16 sequence kernel now (under SEQKERNELS_CPU_ISA as set)."""
    from seqkernels import cli

    return cli.cpu_path("lstm", "bfloat16") in BF16_ENGINES


def _force_bf16_engine(engine: str, monkeypatch) -> None:
    """SEQKERNELS_CPU_ISA=engine for this test; skipped where the CPU (or the build) lacks it."""
    from seqkernels import cli

    monkeypatch.setenv("SEQKERNELS_CPU_ISA", engine)
    if not lstm_ops._HAS_LAYER_FUSED or cli.cpu_path("lstm", "bfloat16") != engine:
        pytest.skip(f"this CPU/OS lacks {engine} (or the extension's lstm_layer_fwd.fused)")


def _nan_framed(t, offset=32):
    """t's values, contiguous, inside a NaN-filled buffer (offset elements before, 64 after)."""
    buf = torch.full((t.numel() + offset + 64,), float("nan"), dtype=t.dtype)
    v = buf[offset : offset + t.numel()].view(t.shape)
    v.copy_(t)
    return v


def _bf16_trio(**kw):
    """torch's float64 LSTM, its bf16 copy and a bf16 seqkernels LSTM (cpu backend), same weights."""
    ref64, _ = _pair("cpu", **kw)
    ref16 = copy.deepcopy(ref64).to(torch.bfloat16)
    ours = LSTM(**kw, dtype=torch.bfloat16, backend="cpu")
    ours.load_state_dict(ref16.state_dict())
    return ref64, ref16, ours


BF16_LAYER_CASES = [
    # (T, B, I, H): H around the 16-unit blocks and 32-wide K chunks, B around the 16/32-row tile
    # groups, the 96-row groups and every tail of the 6-row register tiles (B = 1, 2, 3, 5, 6 alone;
    # 16, 17, 33 and 64 after full tiles; 31 and 8 split 4 + 3 and 4 + 4), T past a projection chunk,
    # I a multiple of 32 with T B a multiple of 16 (x read in place) and not.
    (3, 1, 7, 1),
    (5, 3, 17, 15),
    (17, 16, 32, 16),
    (4, 17, 33, 17),
    (2, 31, 64, 33),
    (3, 33, 40, 31),
    (9, 64, 32, 48),
    (66, 5, 9, 20),
    (4, 6, 20, 24),
    (5, 2, 40, 18),
    (3, 8, 24, 40),
    (2, 100, 16, 20),
    (2, 48, 96, 130),
]


def _layer_states_ref(x, w_ih, h0, c0, w_hh, b, reverse):
    """(workspace (T, B, 4H), cs (T, B, H)) of a layer: the activated gates and the cell state
    after every step, in the inputs' dtype (the reference cell's own workspace)."""
    from seqkernels import reference

    T = x.shape[0]
    h, c = h0, c0
    ws, cs = [None] * T, [None] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        h, c, w = reference.lstm_cell_fwd_ref(x[t] @ w_ih.t(), h @ w_hh.t(), c, b, None)
        ws[t], cs[t] = w, c
    return torch.stack(ws), torch.stack(cs)


@pytest.mark.parametrize("case", BF16_LAYER_CASES, ids=lambda c: "T{}B{}I{}H{}".format(*c))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("engine", BF16_ENGINES)
def test_bf16_sequence_kernel(engine, case, reverse, monkeypatch):
    from seqkernels import reference

    _force_bf16_engine(engine, monkeypatch)
    T, B, n_in, H = case
    gen = torch.Generator().manual_seed(T * 1000 + B * 10 + H)
    x = torch.randn(T, B, n_in, generator=gen, dtype=torch.float64)
    w_ih = torch.randn(4 * H, n_in, generator=gen, dtype=torch.float64) / n_in**0.5
    _, h0, c0, w_hh, b = _layer_args(T, B, H, gen, bias=B % 2 == 1)
    a16 = [None if t is None else t.to(torch.bfloat16) for t in (x, w_ih, h0, c0, w_hh, b)]

    def ref_of(xx, wi, *rest):
        return reference.lstm_layer_fwd_ref(xx @ wi.t(), *rest, reverse)

    framed = [None if t is None else _nan_framed(t) for t in a16]
    fx, fwi, fh0, fc0, fwh, fb = framed
    out, h_n, c_n, ws, cs = torch.ops.seqkernels.lstm_layer_fwd.fused(fx, fh0, fc0, fwi, fwh, fb, reverse, False)
    assert out.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    assert ws.numel() == 0 and cs.numel() == 0
    exp = ref_of(*[None if t is None else t.double() for t in a16])
    base = ref_of(*a16)  # plain torch bf16 arithmetic
    report = testing.compare((out, h_n, c_n), tuple(exp), tuple(base))
    assert report.passed, str(report)
    # train=True: the same outputs, and the activated gates and cell states of every step (bf16).
    o2, h2, c2, ws, cs = torch.ops.seqkernels.lstm_layer_fwd.fused(fx, fh0, fc0, fwi, fwh, fb, reverse, True)
    for a, e in zip((o2, h2, c2), (out, h_n, c_n)):
        assert torch.equal(a, e)
    assert ws.shape == (T, B, 4 * H) and cs.shape == (T, B, H) and ws.dtype == cs.dtype == torch.bfloat16
    assert torch.equal(cs[0 if reverse else -1], c_n)  # both c rounded once from the same float32
    states_exp = _layer_states_ref(*[None if t is None else t.double() for t in a16], reverse)
    states_base = _layer_states_ref(*a16, reverse)
    report = testing.compare((ws, cs), states_exp, states_base)
    assert report.passed, str(report)
    # Every thread count gives the same bits (a block's sums do not depend on who runs it).
    before = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            again = torch.ops.seqkernels.lstm_layer_fwd.fused(fx, fh0, fc0, fwi, fwh, fb, reverse, False)
            for a, e in zip(again[:3], (out, h_n, c_n)):
                assert torch.equal(a, e)
    finally:
        torch.set_num_threads(before)


def _recurrence_grads_ref(go, grad_hn, grad_cn, ws, cs, c0, w_hh, reverse):
    """lstm_layer_fwd.backward's results by the reference cell backward, step by step, in the
    inputs' dtype (float64: the reference; bf16: plain torch bf16 arithmetic, every step's dh, dc
    and gates rounded to bf16, as the per-step path this op replaced computed them)."""
    from seqkernels import reference

    T, B, G = ws.shape
    gh = grad_hn if grad_hn is not None else ws.new_zeros((B, G // 4))
    gc = grad_cn if grad_cn is not None else ws.new_zeros((B, G // 4))
    grads = torch.empty_like(ws)
    for t in range(T) if reverse else range(T - 1, -1, -1):
        if go is not None:
            gh = gh + go[t]
        c_prev = c0 if t == (T - 1 if reverse else 0) else cs[t + 1 if reverse else t - 1]
        gg, gc = reference.lstm_cell_bwd_ref(gh, gc, c_prev, cs[t], ws[t])
        grads[t] = gg
        gh = gg @ w_hh
    return grads, gh, gc


# (T, B, H): H around the backward's 64-unit blocks and 4H at and off a 32 multiple (H % 8), B at
# the row tails of both engines and past the dot engine's 96-row group.
BF16_BWD_CASES = [(3, 1, 1), (5, 3, 15), (4, 17, 17), (2, 33, 31), (3, 7, 64), (2, 20, 65), (6, 8, 130), (3, 100, 40)]


@pytest.mark.parametrize("case", BF16_BWD_CASES, ids=lambda c: "T{}B{}H{}".format(*c))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("engine", BF16_ENGINES)
def test_bf16_sequence_backward(engine, case, reverse, monkeypatch):
    # lstm_layer_fwd.backward on bf16 saved states (the bf16 kernel's training path), by the parity
    # rule against the step-by-step recurrence (float64 the reference, bf16 the baseline); inputs
    # between NaNs; absent gradients as zeros; the same bits for every thread count.
    _force_bf16_engine(engine, monkeypatch)
    T, B, H = case
    gen = torch.Generator().manual_seed(T * 100 + B * 10 + H)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    ws = torch.rand(T, B, 4 * H, generator=gen, dtype=torch.float64)
    ws[..., 2 * H : 3 * H] = ws[..., 2 * H : 3 * H] * 2 - 1  # g = tanh(.) in (-1, 1), the rest sigmoids
    args = [r(T, B, H), r(B, H), r(B, H), ws, r(T, B, H), r(B, H), r(4 * H, H) / H**0.5]
    a16 = [t.bfloat16() for t in args]
    bwd = torch.ops.seqkernels.lstm_layer_fwd.backward
    for present in ((True, True, True), (False, False, True), (True, False, False)):
        given = [t if keep else None for t, keep in zip(a16[:3], present)]
        framed = [None if t is None else _nan_framed(t) for t in given + a16[3:]]
        got = bwd(*framed, reverse)
        assert all(t.dtype == torch.bfloat16 for t in got)
        exp = _recurrence_grads_ref(*[None if t is None else t.double() for t in given + a16[3:]], reverse)
        base = _recurrence_grads_ref(*given, *a16[3:], reverse)
        report = testing.compare(tuple(got), exp, base, grad=True)
        assert report.passed, f"{present}: {report}"
    before = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            for a, e in zip(bwd(*framed, reverse), got):
                assert torch.equal(a, e)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ["native", "avx512_bf16", "avx512", "avx2"])
@pytest.mark.parametrize("bidir", [False, True])
def test_lstm_bf16_inference_parity(isa, bidir, monkeypatch):
    # seqkernels.nn.LSTM without gradients in bf16, against torch's own bf16 LSTM by the parity
    # rule (float64 the reference): the bf16 kernel (AMX tiles or vdpbf16ps, where the level
    # allows them and the CPU has them) or the float32 sequence kernel on widened operands (any
    # lower level); the sequence kernel either way.
    if not lstm_ops._HAS_LAYER_FUSED:
        pytest.skip("extension built without lstm_layer_fwd.fused")
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", isa)
    fused = torch.ops.seqkernels.lstm_layer_fwd.fused
    dtypes = []
    monkeypatch.setattr(torch.ops.seqkernels.lstm_layer_fwd, "fused", lambda *a: dtypes.append(a[0].dtype) or fused(*a))
    kw = dict(input_size=33, hidden_size=40, num_layers=2, bidirectional=bidir)
    ref64, ref16, ours = _bf16_trio(**kw)
    D = 2 if bidir else 1
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(21, 17, 33, generator=gen, dtype=torch.float64)
    hx = tuple(torch.randn(2 * D, 17, 40, generator=gen, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        got = ours(x.bfloat16(), tuple(t.bfloat16() for t in hx))
        exp = ref64(x, hx)
        base = ref16(x.bfloat16(), tuple(t.bfloat16() for t in hx))
    report = testing.compare([got[0], *got[1]], [exp[0], *exp[1]], [base[0], *base[1]])
    assert report.passed, str(report)
    native = isa in ("native", "avx512_bf16") and _native_bf16_lstm()
    assert dtypes == [torch.bfloat16 if native else torch.float32] * (2 * D)


def test_bf16_sequence_kernel_bad_arguments_are_named(monkeypatch):
    if not lstm_ops._HAS_LAYER_FUSED:
        pytest.skip("extension built without lstm_layer_fwd.fused")
    bf = torch.bfloat16
    x, h0, c0 = torch.randn(2, 3, 4, dtype=bf), torch.randn(3, 5, dtype=bf), torch.randn(3, 5, dtype=bf)
    w_ih, w_hh = torch.randn(20, 4, dtype=bf), torch.randn(20, 5, dtype=bf)
    fused = torch.ops.seqkernels.lstm_layer_fwd.fused
    if _native_bf16_lstm():
        with pytest.raises(RuntimeError, match="needs weight_ih"):
            fused(torch.randn(2, 3, 20, dtype=bf), h0, c0, None, w_hh, None, False, False)
        with pytest.raises(RuntimeError, match="weight_hh must have input's dtype"):
            fused(x, h0, c0, w_ih, w_hh.float(), None, False, False)
        with pytest.raises(RuntimeError, match="h0 has dtype"):
            fused(x, h0.float(), c0, w_ih, w_hh, None, False, False)
        with pytest.raises(RuntimeError, match="bias must have shape"):
            fused(x, h0, c0, w_ih, w_hh, torch.zeros(19, dtype=bf), False, False)
    ws, cs = torch.rand(2, 3, 20, dtype=bf), torch.randn(2, 3, 5, dtype=bf)
    bwd = torch.ops.seqkernels.lstm_layer_fwd.backward
    if _native_bf16_lstm():
        with pytest.raises(RuntimeError, match="cs must be a BFloat16 CPU tensor like workspace"):
            bwd(None, None, None, ws, cs.float(), c0, w_hh, False)
        with pytest.raises(RuntimeError, match="weight_hh must be a CPU tensor of workspace's dtype"):
            bwd(None, None, None, ws, cs, c0, w_hh.float(), False)
        with pytest.raises(RuntimeError, match="grad_out must have shape"):
            bwd(cs[:1], None, None, ws, cs, c0, w_hh, False)
    # Where neither engine is usable (or asked for), bf16 is refused, never run on another path.
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match="AVX512_BF16 or AMX-BF16 path"):
        fused(x, h0, c0, w_ih, w_hh, None, False, False)
    with pytest.raises(RuntimeError, match="AVX512_BF16 or AMX-BF16 path"):
        bwd(None, None, None, ws, cs, c0, w_hh, False)


@pytest.mark.parametrize("isa", ["native", "avx512_bf16", "avx512"])
@pytest.mark.parametrize("bidir,bias,with_h0", [(False, True, False), (True, False, True)], ids=["uni", "bi-nobias-h0"])
def test_lstm_bf16_training_paths(isa, bidir, bias, with_h0, monkeypatch):
    # bfloat16 with gradients: the bf16 kernel's forward (AMX tiles or vdpbf16ps) and a per-step
    # backward (_CpuLayer on bf16) where they are usable, the float32 training kernels on widened
    # operands elsewhere; both by the parity rule against torch's bf16 LSTM, gradients included.
    if not lstm_ops._HAS_LAYER_FUSED:
        pytest.skip("extension built without lstm_layer_fwd.fused")
    monkeypatch.setenv("SEQKERNELS_CPU_ISA", isa)
    calls = []  # the dtype of each layer-direction's _CpuLayer (bf16: the bf16 kernel; float32: widened)
    real = lstm_ops._CpuLayer.apply
    monkeypatch.setattr(lstm_ops._CpuLayer, "apply", lambda *a: calls.append(a[0].dtype) or real(*a))
    kw = dict(input_size=19, hidden_size=33, num_layers=2, bidirectional=bidir, bias=bias)
    ref64, ref16, ours = _bf16_trio(**kw)
    D = 2 if bidir else 1
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(7, 5, 19, generator=gen, dtype=torch.float64)
    hx = tuple(torch.randn(2 * D, 5, 33, generator=gen, dtype=torch.float64) for _ in range(2))
    cot = tuple(
        torch.randn(s, generator=gen, dtype=torch.float64) for s in ((7, 5, 33 * D), (2 * D, 5, 33), (2 * D, 5, 33))
    )

    def run(m, dt):
        xx = x.to(dt).requires_grad_()
        h = tuple(t.to(dt).requires_grad_() for t in hx) if with_h0 else None
        leaves = [xx, *(h or ()), *m.parameters()]
        outs, grads = _run(m, xx, h, leaves, [c.to(dt) for c in cot])
        return list(outs), list(grads)

    got, got_g = run(ours, torch.bfloat16)
    exp, exp_g = run(ref64, torch.float64)
    base, base_g = run(ref16, torch.bfloat16)
    report = testing.compare(got, exp, base)
    report.extend(testing.compare(got_g, exp_g, base_g, grad=True, name="grad"))
    assert report.passed, str(report)
    native = isa in ("native", "avx512_bf16") and _native_bf16_lstm()
    assert calls == [torch.bfloat16 if native else torch.float32] * 2 * D


@pytest.mark.parametrize(
    "l2,l3,H,B,T,expect",
    [
        (0, 0, 256, 16, 9, False),  # caches unknown: W_ih 1 MB over 2 threads, under the fixed 1 MB a thread
        (0, 0, 512, 16, 9, True),  # 4 MB: over it
        (1 << 20, 32 << 20, 256, 64, 9, False),  # both slices (512 KB each) fill L2 exactly: fused
        (2 << 20, 64 << 20, 512, 8, 9, True),  # W_hh's 2 MB fits a 2 MB L2, not with W_ih's: projected
        (1 << 20, 32 << 20, 512, 32, 9, False),  # W_hh's slice streams anyway, 8 MB in a 32 MB L3: fused
        (1 << 20, 32 << 20, 512, 4, 9, True),  # ... but 4 rows a step are too few per weight streamed
        (1 << 20, 32 << 20, 1024, 16, 9, True),  # 32 MB of weights: more than half the L3
        (1 << 20, 32 << 20, 1024, 16, 1, False),  # one step: the projection is the step's own
    ],
)
def test_project_first_rule(l2, l3, H, B, T, expect, monkeypatch):
    # _project_first by the cache sizes it is given (float32 weights, input size H, 2 threads).
    monkeypatch.setattr(lstm_ops, "_cache_bytes", lambda: (l2, l3))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    w_ih, w_hh = torch.empty(4 * H, H), torch.empty(4 * H, H)
    assert lstm_ops._project_first(w_ih, w_hh, T, B) == expect


def test_cache_sizes_read_from_sysfs():
    l2, l3 = lstm_ops._cache_bytes()
    if os.path.isdir("/sys/devices/system/cpu/cpu0/cache"):
        assert l2 >= 64 << 10 and (l3 == 0 or l3 >= l2)
    else:
        assert (l2, l3) == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,H", [(35, 33), (640, 64)])
def test_weight_gradient_routes(dtype, rows, H, monkeypatch):
    # _mm_tn: G^T y by the parity rule either way; oneDNN as (y^T G)^T only for float32 CPU tensors
    # from _TN_ONEDNN_MIN_MACS multiply-adds (640 x 256 x 64 = 10 M: over; 35 x 132 x 33: under).
    gen = torch.Generator().manual_seed(rows)
    # G at a mean-reduced loss's scale, so G^T y is O(1): with unit G, torch.mm's own float32 result
    # already misses the rule's float32 assert_close (an absolute 1e-5 on sums of 640 products ~ 25).
    G64 = torch.randn(rows, 4 * H, generator=gen, dtype=torch.float64) / rows**0.5
    y64 = torch.randn(rows, H, generator=gen, dtype=torch.float64)
    calls = []
    real = lstm_ops._mm
    monkeypatch.setattr(lstm_ops, "_mm", lambda a, b: calls.append(a.shape) or real(a, b))
    got = lstm_ops._mm_tn(G64.to(dtype), y64.to(dtype))
    assert got.shape == (4 * H, H) and got.dtype == dtype and got.is_contiguous()
    exp = G64.t() @ y64
    base = (G64.to(dtype).t() @ y64.to(dtype)) if dtype != torch.bfloat16 else (G64.t() @ y64).bfloat16()
    report = testing.compare((got,), (exp,), (base,), grad=True)
    assert report.passed, str(report)
    onednn = lstm_ops._ONEDNN_LINEAR is not None and dtype == torch.float32 and rows * 4 * H * H >= 1 << 22
    assert calls == ([(H, rows)] if onednn else [])

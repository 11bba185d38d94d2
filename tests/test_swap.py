"""swap_attention / restore_attention on torch's Transformer modules: same outputs before, during and
after the swap (eval and train, padding and causal masks, the encoder's fast and nested paths), shared
weights, counts, and torch.compile on a swapped model."""

import itertools

import pytest
import torch
import torch.nn as nn

import seqkernels
import seqkernels.ops.attention as attention_ops
from seqkernels.nn.multihead_attention import MultiheadAttention
from seqkernels.nn.swap import restore_attention, swap_attention

D, HEADS, FF = 16, 4, 24

pytestmark = [
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
    pytest.mark.filterwarnings("ignore:Support for mismatched"),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny shapes: on a small shared machine the intra-op thread pool costs far more than the math.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach seqkernels' attention entry points."""
    calls = []
    for name in ("attention", "scaled_dot_product_attention"):
        real = getattr(attention_ops, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(attention_ops, name, wrapped)
    return calls


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def make_model(kind, batch_first, dropout=0.0, norm_first=False, dtype=torch.float32):
    if kind == "encoder":
        layer = nn.TransformerEncoderLayer(
            D, HEADS, FF, dropout=dropout, batch_first=batch_first, norm_first=norm_first
        )
        m = nn.TransformerEncoder(layer, 2)
    elif kind == "decoder":
        layer = nn.TransformerDecoderLayer(
            D, HEADS, FF, dropout=dropout, batch_first=batch_first, norm_first=norm_first
        )
        m = nn.TransformerDecoder(layer, 2)
    else:
        m = nn.Transformer(D, HEADS, 2, 2, FF, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
    return randomize(m).to(dtype)


def make_inputs(kind, batch_first, dtype=torch.float32, B=3, S=9, T=6):
    def seq(n):
        return torch.randn(B, n, D, dtype=dtype) if batch_first else torch.randn(n, B, D, dtype=dtype)

    # left-aligned padding (what the encoder's nested path needs), never a fully padded sequence
    src_kpm = torch.arange(S)[None, :] >= torch.tensor([S, 5, 2])[:, None]
    tgt_kpm = torch.arange(T)[None, :] >= torch.tensor([4, T, 3])[:, None]
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype)
    if kind == "encoder":
        variants = [
            ((seq(S),), {}),
            ((seq(S),), dict(src_key_padding_mask=src_kpm)),
            ((seq(S),), dict(mask=nn.Transformer.generate_square_subsequent_mask(S, dtype=dtype), is_causal=True)),
            (
                (seq(S),),
                dict(mask=nn.Transformer.generate_square_subsequent_mask(S, dtype=dtype), src_key_padding_mask=src_kpm),
            ),
        ]
    elif kind == "decoder":
        mem = seq(S)
        variants = [
            ((seq(T), mem), dict(tgt_mask=tgt_mask, tgt_is_causal=True)),
            ((seq(T), mem), dict(tgt_mask=tgt_mask, tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=src_kpm)),
        ]
    else:
        variants = [
            (
                (seq(S), seq(T)),
                dict(
                    tgt_mask=tgt_mask,
                    src_key_padding_mask=src_kpm,
                    memory_key_padding_mask=src_kpm,
                    tgt_key_padding_mask=tgt_kpm,
                ),
            ),
            ((seq(S), seq(T)), dict(tgt_mask=tgt_mask, tgt_is_causal=True)),
        ]
    return variants


def non_padded(out, kwargs, kind, batch_first):
    """Output rows of real (non-padding) queries; what padded rows hold differs between torch's
    own paths, so only real rows are compared where padding is involved."""
    kpm = kwargs.get("src_key_padding_mask") if kind == "encoder" else kwargs.get("tgt_key_padding_mask")
    if kpm is None:
        return out
    o = out if batch_first else out.transpose(0, 1)
    return o[~kpm]


N_MHA = {"encoder": 2, "decoder": 4, "transformer": 6}


@pytest.mark.parametrize("mode", ["eval", "train", "no_grad_eval"])
@pytest.mark.parametrize(
    "kind,batch_first,norm_first",
    [
        ("encoder", True, False),
        ("encoder", False, True),
        ("decoder", True, False),
        ("decoder", False, False),
        ("transformer", True, False),
        ("transformer", False, True),
    ],
)
def test_swapped_matches_original(kind, batch_first, norm_first, mode, spy):
    model = make_model(kind, batch_first, norm_first=norm_first)
    model.train(mode == "train")
    variants = make_inputs(kind, batch_first)
    ctx = torch.no_grad if mode == "no_grad_eval" else torch.enable_grad
    with ctx():
        before = [model(*a, **k) for a, k in variants]
    assert spy == []
    params = list(model.parameters())
    assert swap_attention(model) == N_MHA[kind]
    assert all(isinstance(m, MultiheadAttention) for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    assert [p for p in model.parameters()] == params  # the same Parameter objects
    with ctx():
        during = [model(*a, **k) for a, k in variants]
    assert len(spy) >= N_MHA[kind] * len(variants)  # every attention call went through seqkernels
    for (a, k), x, y in zip(variants, before, during):
        torch.testing.assert_close(non_padded(y, k, kind, batch_first), non_padded(x, k, kind, batch_first))
    assert restore_attention(model) == N_MHA[kind]
    assert not any(isinstance(m, MultiheadAttention) for m in model.modules())
    spy.clear()
    with ctx():
        after = [model(*a, **k) for a, k in variants]
    assert spy == []
    for x, y in zip(before, after):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_encoder_nested_path_keeps_padding_rows():
    """In inference with a left-aligned padding mask, nn.TransformerEncoder runs nested tensors and
    returns zeros at padded positions; the swapped model does the same."""
    model = make_model("encoder", True).eval()
    (x,), k = make_inputs("encoder", True)[1]
    with torch.no_grad():
        ref = model(x, **k)
        swap_attention(model)
        out = model(x, **k)
    assert (ref[k["src_key_padding_mask"]] == 0).all()
    torch.testing.assert_close(out, ref)


def test_gradients_through_swapped_transformer():
    model = make_model("transformer", True, dtype=torch.float64).train()
    (src, tgt), k = make_inputs("transformer", True, dtype=torch.float64)[0]
    out = model(src, tgt, **k)
    ref_grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    swap_attention(model)
    out2 = model(src, tgt, **k)
    grads = torch.autograd.grad(out2.square().sum(), list(model.parameters()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_dropout_train_shapes_and_finite():
    model = make_model("transformer", False, dropout=0.3)
    swap_attention(model)
    model.train()
    (src, tgt), k = make_inputs("transformer", False)[0]
    out = model(src, tgt, **k)
    assert out.shape == tgt.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        a, b = model(src, tgt, **k), model(src, tgt, **k)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_keeps_dtype_training_backend_and_optimizer():
    model = make_model("encoder", True, dtype=torch.float64).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    swap_attention(model, backend="reference")
    attn = model.layers[0].self_attn
    assert attn.backend == "reference" and not attn.training and attn.in_proj_weight.dtype == torch.float64
    model.train()
    (x,), k = make_inputs("encoder", True, dtype=torch.float64)[0]
    before = attn.in_proj_weight.detach().clone()
    model(x, **k).sum().backward()
    opt.step()
    assert not torch.equal(attn.in_proj_weight, before)
    assert attn.training
    with pytest.raises(ValueError, match="backend"):
        swap_attention(model, backend="bogus")


def test_counts_shared_subclasses_and_root():
    class Custom(nn.MultiheadAttention):
        pass

    shared = nn.MultiheadAttention(D, HEADS)
    model = nn.ModuleDict(
        dict(a=shared, b=nn.Sequential(shared, nn.Linear(D, D)), c=Custom(D, HEADS), d=nn.MultiheadAttention(D, 2))
    )
    assert swap_attention(model) == 2
    assert model["a"] is model["b"][0] and isinstance(model["a"], MultiheadAttention)
    assert type(model["c"]) is Custom
    assert swap_attention(model) == 0
    assert restore_attention(model) == 2
    assert model["a"] is model["b"][0] and type(model["a"]) is nn.MultiheadAttention
    with pytest.raises(TypeError, match="itself"):
        swap_attention(nn.MultiheadAttention(D, HEADS))
    assert seqkernels.swap_attention is swap_attention and seqkernels.restore_attention is restore_attention


@pytest.mark.parametrize("backend,fullgraph", [("reference", True), (None, True), ("cpu", True), (None, False)])
def test_torch_compile_after_swap(backend, fullgraph):
    """The documented order: swap, then compile; backend resolution is constant-folded at trace
    time, so even automatic choice compiles to one graph."""
    torch._dynamo.reset()
    model = make_model("encoder", True).train()
    (x,), k = make_inputs("encoder", True)[2]
    ref = model(x, **k)
    ref_grads = torch.autograd.grad(ref.sum(), list(model.parameters()))
    swap_attention(model, backend=backend)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    out = compiled(x, **k)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_all_combinations_are_counted():
    # every MultiheadAttention configuration nn.Transformer* can build is swappable and restorable
    for bf, nf in itertools.product((True, False), (True, False)):
        m = make_model("transformer", bf, norm_first=nf)
        assert swap_attention(m) == 6 and restore_attention(m) == 6

"""Packed variable-length attention in the model integrations:

- nested jagged tensors in seqkernels.scaled_dot_product_attention (attention_varlen underneath) give
  torch's nested SDPA where torch runs it on CPU, and per-sequence dense SDPA everywhere (is_causal
  top-left, GQA, modifiers), forward and backward, as nested tensors;
- a tiny Llama trained one step on a packed batch (DataCollatorWithFlattening) with
  attn_implementation="seqkernels" gives the loss and gradients of the same sequences padded (float64
  eager as the reference, float32 eager as the baseline of the parity rule), through attention_varlen,
  whichever way transformers tells the sequences apart (varlen kwargs, the packed mask, position_ids).
No weights are downloaded."""

import copy

import pytest
import torch
import torch.nn.functional as F

import seqkernels
import seqkernels.ops.attention as attention_ops
from seqkernels import testing

LENS_Q = [3, 6, 1, 4]
LENS_K = [5, 6, 2, 4]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny problems: the intra-op pool costs more than the math
    yield
    torch.set_num_threads(n)


def offsets(lens):
    return torch.tensor([0] + lens).cumsum(0)


def packed(lens, H, E, dtype=torch.float64):
    """Token-major (total, H, E) values: the leaves the gradients are taken for."""
    return torch.randn(sum(lens), H, E, dtype=dtype, requires_grad=True)


def jagged(values, offs):
    """The (B, H, j, E) nested jagged tensor of torch's SDPA convention: (B, j, H, E) transposed."""
    return torch.nested.nested_tensor_from_jagged(values, offs).transpose(1, 2)


def run_nested(fn, qv, kv, vv, go, offs_q, offs_k, sinks=None, **kw):
    """fn on the nested tensors; the output's token-major values and the gradients of the leaves."""
    extra = {} if sinks is None else {"sinks": sinks}
    out = fn(jagged(qv, offs_q), jagged(kv, offs_k), jagged(vv, offs_k), **kw, **extra)
    assert out.is_nested and out._ragged_idx == 2
    vals = out.transpose(1, 2).values()
    wrt = (qv, kv, vv) + ((sinks,) if sinks is not None else ())
    return vals, torch.autograd.grad(vals, wrt, go)


def run_per_sequence(fn, qv, kv, vv, go, offs_q, offs_k, sinks=None, alibi_slopes=None, **kw):
    """fn on each sequence as a dense (1, H, L, E) batch, reassembled token-major."""
    outs = []
    for b in range(len(offs_q) - 1):
        sq, sk = slice(offs_q[b], offs_q[b + 1]), slice(offs_k[b], offs_k[b + 1])
        extra = {} if sinks is None else {"sinks": sinks}
        if alibi_slopes is not None:
            extra["alibi_slopes"] = alibi_slopes[b : b + 1]
        dense = [t[s].transpose(0, 1).unsqueeze(0) for t, s in ((qv, sq), (kv, sk), (vv, sk))]
        outs.append(fn(*dense, **kw, **extra)[0].transpose(0, 1))
    vals = torch.cat(outs)
    wrt = (qv, kv, vv) + ((sinks,) if sinks is not None else ())
    return vals, torch.autograd.grad(vals, wrt, go)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_nested_matches_dense_per_sequence(is_causal, gqa):
    torch.manual_seed(0)
    Hq, Hkv = 4, (2 if gqa else 4)
    oq, ok = offsets(LENS_Q), offsets(LENS_K)
    qv, kv, vv = packed(LENS_Q, Hq, 8), packed(LENS_K, Hkv, 8), packed(LENS_K, Hkv, 5)
    go = torch.randn(sum(LENS_Q), Hq, 5, dtype=torch.float64)
    kw = dict(is_causal=is_causal, scale=0.3, enable_gqa=gqa)
    out, grads = run_nested(seqkernels.scaled_dot_product_attention, qv, kv, vv, go, oq, ok, **kw)
    # torch's dense SDPA (is_causal top-left, as for Lq != Lk here) and seqkernels' dense SDPA
    for fn in (F.scaled_dot_product_attention, seqkernels.scaled_dot_product_attention):
        want, want_g = run_per_sequence(fn, qv, kv, vv, go, oq, ok, **kw)
        torch.testing.assert_close(out, want)
        for name, g, w in zip("qkv", grads, want_g):
            torch.testing.assert_close(g, w, msg=lambda m, n=name: f"d{n}: {m}")


def test_nested_output_layout():
    oq = offsets(LENS_Q)
    q = jagged(packed(LENS_Q, 2, 8), oq)
    out = seqkernels.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert out.shape[:2] == (len(LENS_Q), 2) and out.shape[-1] == 8 and out.layout == torch.jagged
    assert out.transpose(1, 2).offsets() is q.transpose(1, 2).offsets()  # the query's own offsets
    assert (out + q).shape == q.shape  # the same ragged dim as the query
    assert out.transpose(1, 2).values().is_contiguous()  # the kernel's token-major output, no copy


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # torch's own math path
def test_nested_matches_torch_nested_sdpa():
    """torch runs nested SDPA on CPU without is_causal (its math backend refuses causal nested inputs)."""
    torch.manual_seed(1)
    oq, ok = offsets(LENS_Q), offsets(LENS_K)
    f32 = [
        packed(LENS_Q, 2, 8, torch.float32),
        packed(LENS_K, 2, 8, torch.float32),
        packed(LENS_K, 2, 8, torch.float32),
    ]
    f64 = [t.detach().double().requires_grad_() for t in f32]
    go = torch.randn(sum(LENS_Q), 2, 8)
    ours = run_nested(seqkernels.scaled_dot_product_attention, *f32, go, oq, ok)
    ref = run_nested(seqkernels.scaled_dot_product_attention, *f64, go.double(), oq, ok, backend="reference")
    base = run_nested(F.scaled_dot_product_attention, *f32, go, oq, ok)
    rep = testing.compare(ours[0], ref[0], base[0], name="out")
    rep.extend(testing.compare(ours[1], ref[1], base[1], grad=True, name="grad"))
    assert rep.passed, str(rep)
    torch_ref = run_nested(F.scaled_dot_product_attention, *f64, go.double(), oq, ok)
    torch.testing.assert_close(ref, torch_ref)


def test_nested_modifiers_match_dense():
    torch.manual_seed(2)
    oq = offsets(LENS_Q)
    qv, kv, vv = packed(LENS_Q, 4, 8), packed(LENS_Q, 2, 8), packed(LENS_Q, 2, 8)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(len(LENS_Q), 4, dtype=torch.float32)
    go = torch.randn(sum(LENS_Q), 4, 8, dtype=torch.float64)
    kw = dict(is_causal=True, enable_gqa=True, softcap=2.0, alibi_slopes=slopes, sinks=sinks)
    out, grads = run_nested(seqkernels.scaled_dot_product_attention, qv, kv, vv, go, oq, oq, **kw)
    want, want_g = run_per_sequence(seqkernels.scaled_dot_product_attention, qv, kv, vv, go, oq, oq, **kw)
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, want_g):  # dq, dk, dv and the sinks' gradient
        torch.testing.assert_close(g, w)


def test_nested_dropout_and_ragged_batch_dim():
    torch.manual_seed(3)
    q = jagged(packed(LENS_Q, 2, 8), offsets(LENS_Q))
    torch.manual_seed(7)
    a = seqkernels.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(7)
    b = seqkernels.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    c = seqkernels.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(a.values(), b.values())
    assert not torch.allclose(a.values(), c.values()) and torch.isfinite(a.values()).all()
    # ragged dim 1 of a 4-D (B, j, L, E) tensor is a batch dim (torch's special case): dense SDPA per row
    x = q.transpose(1, 2).detach()
    torch.testing.assert_close(
        seqkernels.scaled_dot_product_attention(x, x, x).values(), F.scaled_dot_product_attention(x, x, x).values()
    )


def test_nested_errors():
    oq = offsets(LENS_Q)
    q = jagged(packed(LENS_Q, 4, 8).detach(), oq)
    with pytest.raises(ValueError, match="attn_mask"):
        seqkernels.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(1, dtype=torch.bool))
    dense = torch.randn(4, 4, 6, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="key: expected a nested tensor"):
        seqkernels.scaled_dot_product_attention(q, dense, dense)
    # The other way round: a dense query with nested key/value is named too (it once fell into the
    # dense checks: "v: expected shape ..." or a bare NotImplementedError from the op).
    with pytest.raises(ValueError, match="query: expected a nested tensor .* like key and value"):
        seqkernels.scaled_dot_product_attention(dense, q, q)
    k = jagged(packed(LENS_Q, 2, 8).detach(), oq)
    with pytest.raises(ValueError, match="enable_gqa"):
        seqkernels.scaled_dot_product_attention(q, k, k)
    other = jagged(packed([2, 3], 4, 8).detach(), offsets([2, 3]))
    with pytest.raises(ValueError, match="sequences like query"):
        seqkernels.scaled_dot_product_attention(q, other, other)
    k2 = jagged(packed(LENS_K, 4, 8).detach(), offsets(LENS_K))
    with pytest.raises(ValueError, match="same sequence lengths"):
        seqkernels.scaled_dot_product_attention(q, k2, q)


# ---------------------------------------------------------------------------------------------
# Hugging Face: padding-free (packed) training.

SEQ_LENS = [5, 11, 7]
VOCAB = 61


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"needs transformers >= 5, found {transformers.__version__}")
    from seqkernels.integrations import transformers as skt

    skt.register()
    return transformers, skt


@pytest.fixture
def varlen_calls(monkeypatch):
    """Counts attention_varlen calls, and fails on any padded-path seqkernels.attention call."""
    calls = []
    real = attention_ops.attention_varlen

    def counted(*a, **k):
        calls.append(k.get("window"))
        return real(*a, **k)

    def refuse(*a, **k):
        raise AssertionError("the padded seqkernels.attention path ran on a packed batch")

    monkeypatch.setattr(attention_ops, "attention_varlen", counted)
    monkeypatch.setattr(attention_ops, "attention", refuse)
    return calls


def tiny(transformers, family):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        # Mistral's padded windowed batch has query rows that see no key: eager's softmax gives NaN there
        # (and NaN gradients), torch's SDPA gives 0, so its reference runs on "sdpa"
        attn_implementation="sdpa" if family == "mistral" else "eager",
    )
    if family == "mistral":
        cfg = transformers.MistralConfig(sliding_window=4, **common)
        return transformers.MistralForCausalLM(cfg)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


def loss_and_grads(model, **batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return (out.loss, *[p.grad.clone() for p in model.parameters()])


@pytest.mark.parametrize(
    "family,how",
    [
        ("llama", "varlen_kwargs"),
        ("llama", "position_ids"),
        ("llama", "packed_mask"),
        ("mistral", "varlen_kwargs"),
        # A sliding-window model always gets a mask (causal + window over the whole row, as a cache
        # exists): the restarting position_ids must still mark the sequences (they once leaked into
        # each other's first window - 1 tokens).
        ("mistral", "position_ids"),
        ("mistral", "packed_mask"),
    ],
)
def test_packed_training_step_matches_padded(hf, varlen_calls, family, how):
    transformers, _ = hf
    torch.manual_seed(0)
    seqs = [torch.randint(1, VOCAB, (n,)) for n in SEQ_LENS]
    model64 = tiny(transformers, family).double().train()  # attention_dropout is 0: deterministic
    model32 = copy.deepcopy(model64).float()

    # the same sequences padded on the right, eager attention: reference (float64) and baseline (float32)
    L = max(SEQ_LENS)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)], labels[b, : len(s)] = s, 1, s
    ref = loss_and_grads(model64, input_ids=ids, attention_mask=mask, labels=labels)
    base = loss_and_grads(model32, input_ids=ids, attention_mask=mask, labels=labels)

    # one packed row as the flattening collator builds it: position_ids restart, -100 at each start
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=how == "varlen_kwargs")
    packed = collator([{"input_ids": s.tolist()} for s in seqs])
    assert packed["input_ids"].shape == (1, sum(SEQ_LENS))
    if how == "packed_mask":
        packed["use_cache"] = False  # without a cache transformers builds the block-diagonal mask
    model32.set_attn_implementation("seqkernels")
    ours = loss_and_grads(model32, **packed)

    assert len(varlen_calls) == 2  # one per layer, the packed kernel
    if family == "mistral":
        assert varlen_calls == [(3, 0)] * 2
    ours, ref, base = (tuple(t.reshape(-1) if t.dim() == 0 else t for t in x) for x in (ours, ref, base))
    rep = testing.compare(ours[:1], ref[:1], base[:1], name="loss", dtype=torch.float32)
    rep.extend(testing.compare(ours[1:], ref[1:], base[1:], grad=True, name="grad", dtype=torch.float32))
    assert rep.passed, str(rep)


def test_packed_mask_is_described(hf):
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    _, skt = hf
    seq = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1, 1]])
    B, L = seq.shape
    for fn, local, left in ((causal_mask_function, None, -1), (sliding_window_causal_mask_function(3), 3, 2)):
        mask = sdpa_mask(
            batch_size=B,
            q_length=L,
            kv_length=L,
            mask_function=and_masks(fn, packed_sequence_mask_function(seq)),
            allow_is_causal_skip=False,
        )
        spec = skt._describe(mask, local)
        assert isinstance(spec, skt._PackedSpec), spec
        assert spec.left == left and spec.max_seqlen == 7
        assert spec.cu_seqlens.tolist() == [0, 3, 7, 9, 11, 18]
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[0, :2] = False  # padding inside packed rows is not a packed mask: the dense mask path keeps it
    mask = sdpa_mask(
        batch_size=B,
        q_length=L,
        kv_length=L,
        mask_function=and_masks(causal_mask_function, packed_sequence_mask_function(seq)),
        attention_mask=pad,
        allow_is_causal_skip=False,
    )
    assert skt._describe(mask, None) is None


def test_packed_positions_and_kwargs(hf):
    _, skt = hf
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, _, n, _ = skt._packed_positions(pos, 1, 9)
    assert cu.tolist() == [0, 3, 5, 9] and n == 4
    assert skt._packed_positions(pos, 1, 9)[0] is cu  # recorded on the tensor: once per forward
    pos[0, 3:5] = torch.tensor([3, 4])  # refilled in place: read again
    assert skt._packed_positions(pos, 1, 9)[0].tolist() == [0, 5, 9]
    assert skt._packed_positions(torch.arange(9).unsqueeze(0) + 4, 1, 9) is None
    assert skt._packed_positions(torch.zeros(3, 1, 9, dtype=torch.long), 1, 9) is None  # mrope-style

    q, k = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8)
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int64)
    out, _ = skt.seqkernels_attention_forward(
        torch.nn.Module(), q, k, k, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4
    )
    assert out.shape == (1, 9, 4, 8)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        want = seqkernels.attention(q[:, :, a:b], k[:, :, a:b], k[:, :, a:b], causal=True, backend="reference")
        torch.testing.assert_close(out[:, a:b], want.transpose(1, 2))
    with pytest.raises(ValueError, match="both"):
        skt.seqkernels_attention_forward(torch.nn.Module(), q, k, k, None, cu_seq_lens_q=cu)
    layer = skt.SeqkernelsCacheLayer()
    k_stored, v_stored = layer.update(k, k.clone())
    with pytest.raises(ValueError, match="SeqkernelsCache"):
        skt.seqkernels_attention_forward(
            torch.nn.Module(), q, k_stored, v_stored, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu
        )

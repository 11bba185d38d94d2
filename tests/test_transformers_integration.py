"""Hugging Face integration: attn_implementation="seqkernels" gives sdpa's logits and generations on tiny
random models (Llama with GQA, Mistral with GQA and a sliding window, BERT as a bidirectional encoder),
with padding; SeqkernelsCache decodes with seqkernels.decode_attention and gives the same greedy
tokens; the mask builder's compact forms are exact. No weights are downloaded."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seqkernels.ops.attention as attention_ops
import seqkernels.ops.kv_cache as kv_ops
from seqkernels.integrations import transformers as skt

# transformers 4.56-4.x: the attention backend works (Llama, Mistral); SeqkernelsCache, BERT's use of
# AttentionInterface and the position_bias / mask-builder APIs tested here are those of transformers 5.
V5 = int(transformers.__version__.split(".")[0]) >= 5
needs_v5 = pytest.mark.skipif(not V5, reason=f"needs transformers >= 5, found {transformers.__version__}")
FLOOR = {torch.float32: 2.0**-23, torch.float64: 2.0**-36}
VOCAB = 61


@pytest.fixture(autouse=True, scope="module")
def setup_module_state():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: the intra-op pool costs more than the math on a small machine
    skt.register()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spy(monkeypatch):
    """Records which seqkernels entry point ran and with which compact arguments."""
    calls = []
    for mod, name in ((attention_ops, "attention"), (kv_ops, "decode_attention"), (kv_ops, "kv_cache_append")):
        real = getattr(mod, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls.append(
                dict(
                    op=_name,
                    mask=k.get("attn_mask") is not None,
                    causal=k.get("causal", False),
                    window=k.get("window"),
                    lengths=k.get("kv_lengths") is not None,
                    keys=a[1].shape[2],
                )
            )
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, wrapped)
    return calls


def llama(dtype=torch.float32, **kw):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
        **kw,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def mistral(dtype=torch.float32, sliding_window=5):
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
        sliding_window=sliding_window,
        attn_implementation="sdpa",
    )
    return transformers.MistralForCausalLM(cfg).to(dtype).eval()


def bert(dtype=torch.float32):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    return transformers.BertModel(cfg, add_pooling_layer=False).to(dtype).eval()


MODELS = {"llama": llama, "mistral": mistral, "bert": bert}


def batch(B=3, L=11, padding="left"):
    ids = torch.randint(1, VOCAB, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    if padding == "left":
        mask[0, :4] = 0
        mask[2, :1] = 0
    elif padding == "right":
        mask[1, L - 5 :] = 0
        mask[2, L - 1 :] = 0
    return ids, mask


def output(model, ids, mask, impl):
    model.set_attn_implementation(impl)
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_parity(out, out_torch, out_ref, keep=None, factor=2.0):
    """DESIGN §5 against the float64 sdpa model: err(seqkernels) <= factor * err(sdpa) + floor."""
    if keep is not None:  # rows of padding queries are not compared (their value is convention)
        out, out_torch, out_ref = out[keep], out_torch[keep], out_ref[keep]
    torch.testing.assert_close(out, out_torch, rtol=1e-4, atol=1e-5)
    err_k = (out.double() - out_ref).abs().max().item()
    err_t = (out_torch.double() - out_ref).abs().max().item()
    assert err_k <= factor * err_t + 8 * FLOOR[out.dtype], f"err {err_k:.3e} > {factor} * sdpa err {err_t:.3e}"


# decoders are padded on the left (generation), encoders on the right
@pytest.mark.parametrize(
    "family,padding",
    [
        ("llama", "none"),
        ("llama", "left"),
        ("mistral", "none"),
        ("mistral", "left"),
        pytest.param("bert", "none", marks=needs_v5),
        pytest.param("bert", "right", marks=needs_v5),
    ],
)
def test_logits_match_sdpa(family, padding):
    model = MODELS[family]()
    ref_model = copy.deepcopy(model).double()
    ids, mask = batch(padding=padding, L=13)
    with torch.no_grad():
        ref = output(ref_model, ids, mask, "sdpa")
        base = output(model, ids, mask, "sdpa")
        ours = output(model, ids, mask, "seqkernels")
    assert_parity(ours, base, ref, keep=mask.bool())


@needs_v5
def test_compact_forms_are_used(spy):
    """No padding: the causal kernel, no mask; a sliding window shorter than the sequence: causal + window;
    left padding: the boolean mask; right-padded encoder: kv_lengths."""
    ids, mask = batch(padding="none", L=13)
    with torch.no_grad():
        output(llama(), ids, mask, "seqkernels")
        assert [(c["mask"], c["causal"], c["window"]) for c in spy] == [(False, True, None)] * 2
        spy.clear()
        output(mistral(sliding_window=5), ids, mask, "seqkernels")
        assert [(c["mask"], c["causal"], c["window"]) for c in spy] == [(False, True, (4, 0))] * 2
        spy.clear()
        ids, mask = batch(padding="left")
        output(llama(), ids, mask, "seqkernels")
        assert [c["mask"] for c in spy] == [True] * 2
        spy.clear()
        ids, mask = batch(padding="right")
        output(bert(), ids, mask, "seqkernels")
        assert [(c["mask"], c["causal"], c["lengths"]) for c in spy] == [(False, False, True)] * 2


@needs_v5
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_matches_sdpa_with_and_without_cache(family, spy):
    model = MODELS[family]()
    ids, mask = batch(padding="left", L=9)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqkernels")
        plain = model.generate(ids, **kw)
        assert not any(c["op"] == "decode_attention" for c in spy)
        spy.clear()
        cache = skt.SeqkernelsCache(model.config)
        cached = model.generate(ids, cache=cache, **kw)
    assert torch.equal(plain, ref) and torch.equal(cached, ref)
    decodes = [c for c in spy if c["op"] == "decode_attention"]
    assert len(decodes) == 2 * (kw["max_new_tokens"] - 1)  # every decode step of both layers
    if family == "mistral":
        assert all(c["window"] == (4, 0) for c in decodes)
    # left padding is not stored: each sequence holds only its real tokens
    layer = cache.layers[0]
    assert layer.compact and layer.get_seq_length() == 9 + 9
    assert layer.cache_seqlens.tolist() == [5 + 9, 9 + 9, 8 + 9]


@needs_v5
def test_cache_padded_layout_and_growth():
    """A prefill mask the cache cannot describe (a user 4-D mask that also hides one real token) keeps the
    padded layout; decoding then attends with transformers' mask. A small growth granule forces
    reallocations."""
    model = llama()
    ids, _ = batch(padding="none", L=7)
    model.set_attn_implementation("seqkernels")
    with torch.no_grad():
        cache = skt.SeqkernelsCache(model.config)
        sdpa_cache = transformers.DynamicCache(config=model.config)
        m4 = torch.ones(3, 1, 7, 7, dtype=torch.bool).tril()
        m4[:, :, :, 2] = False
        m4[:, :, 2, 2] = True
        a = model(input_ids=ids, attention_mask=m4, cache=cache).logits
        model.set_attn_implementation("sdpa")
        b = model(input_ids=ids, attention_mask=m4, cache=sdpa_cache).logits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert not cache.layers[0].compact
        for step in range(3):
            nxt = torch.randint(1, VOCAB, (3, 1))
            full = torch.ones(3, 8 + step, dtype=torch.long)
            model.set_attn_implementation("seqkernels")
            a = model(input_ids=nxt, attention_mask=full, cache=cache).logits
            model.set_attn_implementation("sdpa")
            b = model(input_ids=nxt, attention_mask=full, cache=sdpa_cache).logits
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert cache.get_seq_length() == 10


@needs_v5
def test_cache_growth_and_fixed_capacity(monkeypatch):
    monkeypatch.setattr(skt, "_GRANULE", 4)
    model = llama()
    model.set_attn_implementation("seqkernels")
    ids, mask = batch(padding="left", L=6)
    kw = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        grown = model.generate(ids, cache=skt.SeqkernelsCache(model.config), **kw)
        model.set_attn_implementation("sdpa")
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqkernels")
        assert torch.equal(grown, ref)
        with pytest.raises(ValueError, match="max_cache_len"):
            model.generate(ids, cache=skt.SeqkernelsCache(model.config, max_cache_len=8), **kw)


@needs_v5
def test_cache_needs_seqkernels_attention():
    model = llama()
    ids, mask = batch(padding="none", L=5)
    with torch.no_grad(), pytest.raises(RuntimeError, match="attn_implementation"):
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=2,
            cache=skt.SeqkernelsCache(model.config),
            pad_token_id=0,
        )
    # without a config the cache cannot check up front; the unconsumed update is caught on the next one
    layer = skt.SeqkernelsCacheLayer()
    k = torch.randn(1, 2, 3, 8)
    layer.update(k, k)
    with pytest.raises(RuntimeError, match="never reached"):
        layer.update(k, k)


@needs_v5
def test_beam_search_reorders_cache():
    model = llama()
    ids, mask = batch(padding="left", L=6)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=3, pad_token_id=0)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqkernels")
        out = model.generate(ids, cache=skt.SeqkernelsCache(model.config), **kw)
    assert torch.equal(out, ref)


@needs_v5
def test_crop():
    model = llama()
    model.set_attn_implementation("seqkernels")
    ids, mask = batch(padding="left", L=6)
    with torch.no_grad():
        cache = skt.SeqkernelsCache(model.config)
        model(input_ids=ids, attention_mask=mask, cache=cache)
        nxt = torch.randint(1, VOCAB, (3, 2))
        mask8 = torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], 1)
        first = model(input_ids=nxt, attention_mask=mask8, cache=cache).logits
        cache.crop(-2)
        assert cache.get_seq_length() == 6 and cache.layers[0].cache_seqlens.tolist() == [2, 6, 5]
        again = model(input_ids=nxt, attention_mask=mask8, cache=cache).logits
        torch.testing.assert_close(again, first)
        with pytest.raises(ValueError, match="cannot drop"):
            cache.crop(-7)


@needs_v5
def test_static_cache_prefill_without_mask():
    """An empty static cache's prefill gets no mask (SDPA's top-left is_causal over max_cache_len keys):
    the trailing empty slots must not be attended."""
    model = llama()
    ids, mask = batch(padding="none", L=6)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqkernels")
        out = model.generate(ids, **kw)
    assert torch.equal(out, ref)


@needs_v5
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_training_gradients_and_dropout(family):
    model = MODELS[family](torch.float64)
    ids, mask = batch(padding="left" if family == "llama" else "right", L=8)

    def grads(impl):
        model.zero_grad()
        out = output(model, ids, mask, impl)
        (out[mask.bool()].square().sum()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    for m in model.modules():  # dropout off for the comparison
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ref, ours = grads("sdpa"), grads("seqkernels")
    assert len(ref) == len(ours)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    model.config.attention_dropout = 0.5
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
        if hasattr(m, "dropout") and isinstance(m.dropout, torch.nn.Dropout):
            m.dropout.p = 0.5
    g = grads("seqkernels")
    assert all(torch.isfinite(x).all() for x in g)


@needs_v5
def test_mask_descriptions_are_exact():
    from transformers.masking_utils import (
        causal_mask_function,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    B, L = 3, 10
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[0, :3] = False
    mask = sdpa_mask(
        batch_size=B,
        q_length=L,
        kv_length=L,
        mask_function=causal_mask_function,
        attention_mask=pad,
        allow_is_causal_skip=False,
    )
    spec = skt._describe(mask, None)
    assert isinstance(spec, skt._CausalSpec) and spec.first.tolist() == [3, 0, 0] and spec.max_first == 3
    win = sdpa_mask(
        batch_size=B,
        q_length=4,
        kv_length=L,
        q_offset=6,
        mask_function=sliding_window_causal_mask_function(3),
        allow_is_causal_skip=False,
    )
    spec = skt._describe(win, 3)
    assert isinstance(spec, skt._CausalSpec) and spec.left == 2 and spec.max_first == 0
    assert skt._describe(win, None) is None  # a window the caller did not announce is not assumed
    right = torch.arange(L)[None, None, None, :] < torch.tensor([10, 4, 7]).view(B, 1, 1, 1)
    spec = skt._describe(right.expand(B, 1, L, L), None)
    assert isinstance(spec, skt._LengthsSpec) and spec.lengths.tolist() == [10, 4, 7]
    rnd = torch.rand(B, 1, L, L) < 0.5
    assert skt._describe(rnd, None) is None


def test_modifiers_are_forwarded():
    """Gemma 2's softcap and gpt-oss's s_aux reach seqkernels.attention (tests/test_transformers_modifiers.py
    runs the models)."""
    import seqkernels

    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    sinks = torch.randn(4)
    out, _ = skt.seqkernels_attention_forward(module, q, k, k, None, softcap=3.0, s_aux=sinks)
    want = seqkernels.attention(q, k, k, causal=True, softcap=3.0, sinks=sinks, backend="reference")
    torch.testing.assert_close(out, want.transpose(1, 2))


def test_unsupported_arguments_raise():
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="cache"):
        skt.seqkernels_attention_forward(module, q, k, k, None, cache=object())
    out, w = skt.seqkernels_attention_forward(module, q, k, k, None)
    assert out.shape == (1, 3, 4, 8) and w is None
    with pytest.raises(ValueError, match="backend"):
        skt.register(backend="bogus")


@needs_v5
def test_position_bias_matches_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    bias = torch.randn(1, 4, 5, 7)
    mask = torch.rand(2, 1, 5, 7) < 0.8
    mask[..., 0] = True
    for m in (None, mask):
        ours, _ = skt.seqkernels_attention_forward(module, q, k, v, m, position_bias=bias)
        ref, _ = sdpa_attention_forward(module, q, k, v, m, position_bias=bias)
        torch.testing.assert_close(ours, ref)


def test_register_backend_and_unregister(monkeypatch):
    seen = []
    real = attention_ops.attention
    monkeypatch.setattr(attention_ops, "attention", lambda *a, **k: seen.append(k["backend"]) or real(*a, **k))
    model = llama()
    ids, mask = batch(padding="left", L=5)
    try:
        skt.register(backend="reference")
        with torch.no_grad():
            output(model, ids, mask, "seqkernels")
        assert seen == ["reference"] * 2
        skt.unregister()
        with pytest.raises((KeyError, ValueError)):
            model.set_attn_implementation("seqkernels")
            model(input_ids=ids, attention_mask=mask)
    finally:
        skt.register()


def _chunked_inputs(real, T, offset, pad):
    """ids (B, T), mask (B, T) and position_ids (B, T) of a chunk where sequence b has real[b] real
    tokens, padded on the side pad[b] ("left" / "right"); positions continue from offset[b]."""
    B = len(real)
    ids = torch.randint(1, VOCAB, (B, T))
    mask = torch.zeros(B, T, dtype=torch.long)
    pos = torch.ones(B, T, dtype=torch.long)
    for b, (n, side) in enumerate(zip(real, pad)):
        cols = slice(T - n, T) if side == "left" else slice(0, n)
        mask[b, cols] = 1
        pos[b, cols] = torch.arange(offset[b], offset[b] + n)
    return ids, mask, pos


@pytest.fixture
def packed_calls(monkeypatch):
    """Counts the packed (cu_seqlens) and padded calls of kv_cache_append and decode_attention."""
    calls = []
    for name, cu in (("decode_attention", "cu_seqlens_q"), ("kv_cache_append", "cu_seqlens")):
        real = getattr(kv_ops, name)

        def wrapped(*a, _real=real, _name=name, _cu=cu, **k):
            calls.append((_name, k.get(_cu) is not None))
            return _real(*a, **k)

        monkeypatch.setattr(kv_ops, name, wrapped)
    return calls


@needs_v5
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_cache_continuation_chunk_with_per_sequence_padding(family, packed_calls):
    """A two-chunk prefill whose chunks are padded differently per sequence (left, right, none, a sequence
    adding nothing) gives the logits of eager attention on each unpadded sequence, with one packed append
    and one packed decode_attention per layer for the second chunk; crop() then drops each sequence's own
    tokens of that chunk."""
    torch.manual_seed(0)
    model = llama() if family == "llama" else mistral(sliding_window=4)
    ref_model = copy.deepcopy(model).double()
    ref_model.set_attn_implementation("eager")
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    n1, n2 = [6, 3, 5, 4], [3, 5, 0, 2]
    ids1, m1, p1 = _chunked_inputs(n1, 6, [0] * 4, ["left"] * 4)
    ids2, m2, p2 = _chunked_inputs(n2, 5, n1, ["right", "left", "right", "left"])
    model.set_attn_implementation("seqkernels")
    with torch.no_grad():
        cache = skt.SeqkernelsCache(model.config)
        model(input_ids=ids1, attention_mask=m1, position_ids=p1, cache=cache)
        packed_calls.clear()
        mask12 = torch.cat([m1, m2], 1)
        ours = model(input_ids=ids2, attention_mask=mask12, position_ids=p2, cache=cache).logits
        assert packed_calls == [("kv_cache_append", True), ("decode_attention", True)] * 2
        assert cache.layers[0].cache_seqlens.tolist() == [a + b for a, b in zip(n1, n2)]
        for b in range(4):
            seq = torch.cat([ids1[b][m1[b].bool()], ids2[b][m2[b].bool()]])[None]
            keep = m2[b].bool()
            if not keep.any():  # a sequence adding nothing this step: only padding rows, not compared
                continue
            want = ref_model(input_ids=seq).logits[0, -n2[b] :]
            base = eager(input_ids=seq).logits[0, -n2[b] :]
            assert_parity(ours[b][keep], base, want)
        cache.crop(-5)
        assert cache.layers[0].cache_seqlens.tolist() == n1 and cache.get_seq_length() == 6
        again = model(input_ids=ids2, attention_mask=mask12, position_ids=p2, cache=cache).logits
        torch.testing.assert_close(again[m2.bool()], ours[m2.bool()])


@needs_v5
def test_cache_generate_left_padded_matches_eager(packed_calls):
    """Greedy generate from a left-padded batch: the prompt's real tokens are appended in one packed call
    per layer, decoding runs the padded decode_attention, the tokens equal eager attention's."""
    model = llama()
    ids, mask = batch(padding="left", L=9)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqkernels")
        cache = skt.SeqkernelsCache(model.config)
        out = model.generate(ids, cache=cache, **kw)
    assert torch.equal(out, ref)
    assert packed_calls[:2] == [("kv_cache_append", True)] * 2
    assert packed_calls.count(("decode_attention", False)) == 2 * (kw["max_new_tokens"] - 1)
    assert cache.layers[0].cache_seqlens.tolist() == [5 + 5, 9 + 5, 8 + 5]


@needs_v5
def test_cache_refuses_masks_it_cannot_pack():
    """After a compact prefill, a continuation mask that hides a real token from a later one (not padding)
    is refused with a clear error."""
    model = llama()
    model.set_attn_implementation("seqkernels")
    ids, mask = batch(padding="left", L=5)
    with torch.no_grad():
        cache = skt.SeqkernelsCache(model.config)
        model(input_ids=ids, attention_mask=mask, cache=cache)
        m4 = torch.ones(3, 1, 3, 8, dtype=torch.bool).tril(diagonal=5)
        m4[:, :, 2, 5] = False
        with pytest.raises(RuntimeError, match="real tokens"):
            model(input_ids=torch.randint(1, VOCAB, (3, 3)), attention_mask=m4, cache=cache)


@needs_v5
def test_cache_layer_packed_step_output_layout():
    """The packed step's output is scattered back to transformers' (B, T) layout: real rows are attention
    over each sequence's real tokens, padding rows are 0."""
    import seqkernels

    torch.manual_seed(1)
    layer, module = skt.SeqkernelsCacheLayer(), torch.nn.Module()
    B, Hq, Hkv, D = 2, 4, 2, 8

    def step(T, mask):
        q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
        k2, v2 = layer.update(k, v)
        out, _ = skt.seqkernels_attention_forward(module, q, k2, v2, mask)
        return q, k, v, out

    _, k1, v1, _ = step(3, None)
    real = torch.tensor([[True, True, False], [False, True, True]])
    pos = torch.arange(6)
    cols = torch.cat([torch.ones(B, 3, dtype=torch.bool), real], 1)
    mask = (pos[None, None, :] <= pos[None, 3:, None]) & cols[:, None, :]
    q, k, v, out = step(3, mask[:, None])
    assert out.shape == (B, 3, Hq, D)
    for b in range(B):
        keys = torch.cat([k1[b], k[b][:, real[b]]], 1)[None]
        vals = torch.cat([v1[b], v[b][:, real[b]]], 1)[None]
        want = seqkernels.attention(q[b][:, real[b]][None], keys, vals, causal=True, backend="reference")
        torch.testing.assert_close(out[b][real[b]], want[0].transpose(0, 1), rtol=1e-5, atol=1e-6)
        assert (out[b][~real[b]] == 0).all()
    assert layer.cache_seqlens.tolist() == [5, 5]


@needs_v5
def test_cache_chunked_prefill_generate_matches_eager(packed_calls):
    """generate(prefill_chunk_size=3) on a left-padded batch: the chunk where the padding ends adds a different
    number of tokens per sequence (one packed decode_attention per layer); the tokens equal eager's."""
    model = llama()
    ids, mask = batch(padding="left", L=9)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqkernels")
        out = model.generate(ids, cache=skt.SeqkernelsCache(model.config), prefill_chunk_size=3, **kw)
    assert torch.equal(out, ref)
    assert packed_calls.count(("decode_attention", True)) == 2

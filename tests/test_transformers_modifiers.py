"""Models whose attention has score modifiers run on seqkernels: Gemma 2 (logit soft-capping and a
sliding window) and gpt-oss (learned attention sinks, sliding window, mixture of experts). Tiny random
models; against attn_implementation="eager" (transformers' own formulation of the modifiers): logits on a
padded batch, greedy generation with the default cache and with SeqkernelsCache, and one training step
(loss and every parameter gradient, the sinks included). No weights are downloaded."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover - depends on the installed transformers
    pytest.skip(
        f"Gemma 2 / gpt-oss tests need transformers >= 5, found {transformers.__version__}", allow_module_level=True
    )

import seqkernels.ops.attention as attention_ops
import seqkernels.ops.kv_cache as kv_ops
from seqkernels.integrations import transformers as skt

VOCAB = 61
FLOOR = {torch.float32: 2.0**-23, torch.float64: 2.0**-36}


@pytest.fixture(autouse=True, scope="module")
def setup_module_state():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    skt.register()
    yield
    torch.set_num_threads(n)


def gemma2(dtype=torch.float32):
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=5,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=8,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).to(dtype).eval()
    # Random init leaves the scores far below the cap; scale q so that tanh(s / 50) is not ~linear.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
    return model


def gpt_oss(dtype=torch.float32):
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=5,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
        experts_implementation="eager",  # torch._grouped_mm has no float64 (the float64 reference copy)
    )
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # sinks of either sign and of a size that matters (init leaves them ~0)
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn_like(layer.self_attn.sinks) * 2.0)
    return model


MODELS = {"gemma2": gemma2, "gpt_oss": gpt_oss}


def batch(B=3, L=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :4] = 0  # left padding, as for generation
    mask[2, :1] = 0
    return ids, mask


def logits(model, ids, mask, impl):
    model.set_attn_implementation(impl)
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture
def spy(monkeypatch):
    """Counts the seqkernels calls and the modifiers they carried."""
    calls = []
    for mod, name in ((attention_ops, "attention"), (kv_ops, "decode_attention")):
        real = getattr(mod, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls.append((_name, k.get("softcap"), k.get("sinks") is not None))
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, wrapped)
    return calls


def float64_reference(model, run):
    """`run(model)` on a float64 copy whose attention is seqkernels' reference backend. transformers'
    eager attention cannot be the float64 oracle here: it adds finfo(float64).min to scores for masked
    keys, which overflows to -inf, and the rows of left-padding queries (that see no key) become NaN
    in both the forward and the backward."""
    ref_model = copy.deepcopy(model).double()
    skt.register(backend="reference")
    try:
        ref_model.set_attn_implementation("seqkernels")
        return run(ref_model)
    finally:
        skt.register()


def assert_parity(ours, base, ref, what):
    """DESIGN §5 against the float64 model: err(seqkernels) <= 2 * err(eager) + floor, and close to eager."""
    torch.testing.assert_close(ours, base, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")
    err_k = (ours.double() - ref).abs().max().item()
    err_t = (base.double() - ref).abs().max().item()
    assert err_k <= 2 * err_t + 8 * FLOOR[ours.dtype] * max(1.0, ref.abs().max().item()), (
        f"{what}: err {err_k:.3e} > 2 * eager err {err_t:.3e}"
    )


@pytest.mark.parametrize("family", list(MODELS))
def test_logits_match_eager(family, spy):
    model = MODELS[family]()
    ids, mask = batch(L=13)
    keep = mask.bool()
    with torch.no_grad():
        ref = float64_reference(model, lambda m: m(input_ids=ids, attention_mask=mask).logits)
        base = logits(model, ids, mask, "eager")
        spy.clear()
        ours = logits(model, ids, mask, "seqkernels")
    assert_parity(ours[keep], base[keep], ref[keep], "logits")
    assert spy and all((c[1] == 50.0) if family == "gemma2" else c[2] for c in spy), (
        "modifiers did not reach seqkernels"
    )


@pytest.mark.parametrize("family", list(MODELS))
def test_generate_matches_eager_with_and_without_cache(family, spy):
    model = MODELS[family]()
    ids, mask = batch(L=9)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqkernels")
        plain = model.generate(ids, **kw)
        spy.clear()
        cached = model.generate(ids, cache=skt.SeqkernelsCache(model.config), **kw)
    assert torch.equal(plain, ref)
    assert torch.equal(cached, ref)
    decodes = [c for c in spy if c[0] == "decode_attention"]
    assert len(decodes) == 2 * (kw["max_new_tokens"] - 1)  # every decode step of both layers
    assert all((c[1] == 50.0) if family == "gemma2" else c[2] for c in decodes)


@pytest.mark.parametrize("family", list(MODELS))
def test_training_step_matches_eager(family):
    """Loss and every parameter gradient (the attention sinks included) of one training step."""
    model = MODELS[family]()
    ids, mask = batch(L=10)
    # Position t predicts token t + 1: a padding position's prediction is not trained (its query sees
    # no key, whose output is convention: 0 here, eager's uniform average over finfo.min scores).
    labels = ids.clone()
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    labels = labels.masked_fill(mask == 0, -100)
    model.train()

    def step(m):
        m.zero_grad()
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    def with_impl(impl):
        model.set_attn_implementation(impl)
        return step(model)

    loss_ref, ref = float64_reference(model, step)
    loss_base, base = with_impl("eager")
    loss, ours = with_impl("seqkernels")
    assert_parity(loss, loss_base, loss_ref, "loss")
    assert ours.keys() == base.keys() == ref.keys()
    if family == "gpt_oss":
        assert any("sinks" in n for n in ours)
    for name in ref:
        assert_parity(ours[name], base[name], ref[name], name)


def test_finetune_example_runs_next_to_eager(capsys):
    from seqkernels.examples import finetune_sinks

    hist = finetune_sinks.main(["--steps", "2", "--batch", "2", "--length", "16"])["history"]
    assert len(hist) == 2
    for ours, eager, drift in hist:
        assert abs(ours - eager) <= 1e-4 * abs(eager) and drift <= 1e-4
    assert "seqkernels" in capsys.readouterr().out

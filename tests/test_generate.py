"""The generation example: greedy decoding through KVCache (prefill with seqkernels.attention, then
kv_cache_append + decode_attention per token) gives the same tokens and logits as recomputing the
whole sequence for every token."""

import pytest
import torch

from seqkernels.examples import generate as gen


def _model(dtype, **kw):
    torch.manual_seed(0)
    return gen.TinyDecoder(vocab=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seqlen=24, **kw).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "layout", [dict(paged=False), dict(paged=True, block_size=4, num_blocks=10)], ids=["contiguous", "paged"]
)
@pytest.mark.parametrize("backend", [None, "triton"])
def test_cached_generation_equals_recompute(dtype, layout, backend):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16/bfloat16/float32")
    model = _model(dtype)
    prompt = torch.randint(0, 64, (2, 7))
    new = 12 if backend is None else 4
    cache = model.make_cache(2, backend=backend, **layout)
    tokens, logits = gen.generate(model, prompt, new, cache)
    ref_tokens, ref_logits = gen.generate_recompute(model, prompt, new)
    assert torch.equal(tokens, ref_tokens)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, **tol)
    assert cache.host_lengths == [7 + new - 1] * 2
    # The tokens vary (a degenerate model would make the comparison meaningless).
    assert len(set(tokens[0, 7:].tolist())) > 2


def test_cli_runs_and_verifies(capsys):
    assert (
        gen.main(
            [
                "--device",
                "cpu",
                "--batch",
                "2",
                "--prompt-len",
                "5",
                "--new-tokens",
                "6",
                "--dim",
                "32",
                "--layers",
                "2",
                "--heads",
                "4",
                "--kv-heads",
                "1",
                "--paged",
                "--block-size",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tokens equal to full recomputation: True" in out and "ms/token" in out

"""seqkernels.nn.KVCache: the step protocol (layers in order, lengths advancing after the last layer),
contiguous and paged storage with the block allocator (growth, reuse after reset, running out), errors
that leave the cache unchanged, and attend() against decode attention on an explicitly built cache."""

import pytest
import torch

import seqkernels
from seqkernels import reference
from seqkernels.nn import KVCache

LAYOUTS = [dict(paged=False), dict(paged=True, block_size=4)]
LAYOUT_IDS = ["contiguous", "paged"]


def _logical(cache, table, n):
    """Positions 0..n-1 of every sequence, read slot by slot."""
    if table is None:
        return cache[:, :, :n]
    bs = cache.shape[2]
    return torch.stack(
        [torch.stack([cache[int(table[b, p // bs]), :, p % bs] for p in range(n)], 1) for b in range(table.shape[0])]
    )


def _steps(cache, steps, Hq, gen):
    """Run `steps` (token counts); returns per layer the list of (k, v) appended and the attend outputs."""
    L, B, H, D = cache.num_layers, cache.batch_size, cache.num_kv_heads, cache.head_dim
    hist = [[] for _ in range(L)]
    outs = []
    for T in steps:
        for layer in range(L):
            k = torch.randn(B, H, T, D, generator=gen)
            v = torch.randn(B, H, T, cache.v_head_dim, generator=gen)
            q = torch.randn(B, Hq, T, D, generator=gen)
            before = cache.host_lengths
            cache.append(layer, k, v)
            hist[layer].append((k, v))
            if layer < L - 1:
                assert cache.host_lengths == before  # lengths advance after the last layer only
            assert cache.seqlens(layer).tolist() == [n + T for n in before]
            outs.append((layer, q, cache.attend(layer, q)))
        assert cache.lengths.tolist() == cache.host_lengths
    return hist, outs


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: the cache's unwritten slots hold whatever torch.empty gave, NaN patterns
    included, and NaN != NaN would fail a value comparison of an unchanged cache."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("backend", [None, "triton"])
def test_steps_match_reference_attention(layout, backend):
    gen = torch.Generator().manual_seed(1)
    cache = KVCache(2, 2, 2, 16, 20, dtype=torch.float32, v_head_dim=8, backend=backend, **layout)
    hist, outs = _steps(cache, [5, 1, 1, 3] if backend is None else [5, 1], Hq=4, gen=gen)
    total = cache.host_lengths[0]
    for layer in range(2):
        k = torch.cat([kv[0] for kv in hist[layer]], 2)
        v = torch.cat([kv[1] for kv in hist[layer]], 2)
        view = cache.views(layer)
        # The cache holds exactly what was appended, in order.
        assert torch.equal(_logical(view.k_cache, view.block_table, total), k)
        assert torch.equal(_logical(view.v_cache, view.block_table, total), v)
    seen = {0: 0, 1: 0}
    for layer, q, out in outs:
        T = q.shape[2]
        n = seen[layer] + T
        seen[layer] = n
        k = torch.cat([kv[0] for kv in hist[layer]], 2)[:, :, :n]
        v = torch.cat([kv[1] for kv in hist[layer]], 2)[:, :, :n]
        lens = torch.full((2,), n, dtype=torch.int32)
        ref, _ = reference.decode_attention_ref(q.double(), k.double(), v.double(), lens)
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)


def test_protocol_errors_leave_the_cache_unchanged():
    cache = KVCache(2, 2, 1, 8, 6, dtype=torch.float32)
    k = torch.randn(2, 1, 4, 8)
    with pytest.raises(RuntimeError, match="expected layer 0"):
        cache.append(1, k, k)
    cache.append(0, k, k)
    with pytest.raises(ValueError, match="layer 1 appends 2 tokens but this step started with 4"):
        cache.append(1, k[:, :, :2], k[:, :, :2])
    with pytest.raises(RuntimeError, match="step is in progress"):
        cache.reset(0)
    cache.append(1, k, k)
    assert cache.host_lengths == [4, 4] and not cache.in_step
    snapshot = cache.k.clone()
    with pytest.raises(RuntimeError, match="sequence 0 holds 4 tokens and cannot take 3 more"):
        cache.append(0, k[:, :, :3], k[:, :, :3])
    assert _same_bits(cache.k, snapshot) and cache.host_lengths == [4, 4] and not cache.in_step
    with pytest.raises(ValueError, match=r"k: expected shape \(2, 1, T, 8\)"):
        cache.append(0, torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    with pytest.raises(ValueError, match="layer"):
        cache.attend(2, torch.randn(2, 1, 1, 8))
    cache.reset(1)
    assert cache.lengths.tolist() == [4, 0]
    cache.reset(torch.tensor([True, False]))
    assert cache.lengths.tolist() == [0, 0]
    with pytest.raises(ValueError, match="batch_index"):
        cache.reset(5)


def test_paged_allocator_grows_frees_and_runs_out():
    cache = KVCache(1, 3, 1, 4, 16, dtype=torch.float32, paged=True, block_size=4, num_blocks=7)
    assert cache.free_blocks == 7 and (cache.block_table == -1).all()
    k = torch.randn(3, 1, 5, 4)
    cache.append(0, k, k)  # 5 tokens: 2 blocks per sequence
    assert cache.free_blocks == 1
    assert sorted(cache.block_table[:, :2].flatten().tolist()) == list(range(6))
    assert (cache.block_table[:, 2:] == -1).all()
    k1 = torch.randn(3, 1, 3, 4)
    cache.append(0, k1, k1)  # 8 tokens: still 2 blocks each
    assert cache.free_blocks == 1
    snapshot = (cache.k.clone(), cache.block_table.clone())
    with pytest.raises(RuntimeError, match="out of blocks: this step needs 3 more blocks"):
        cache.append(0, k1[:, :, :1], k1[:, :, :1])
    assert _same_bits(cache.k, snapshot[0]) and torch.equal(cache.block_table, snapshot[1])
    assert cache.host_lengths == [8, 8, 8]
    # Freeing sequence 1 returns its blocks; the next growth reuses them, out of order.
    freed = set(cache.block_table[1, :2].tolist())
    cache.reset(1)
    assert cache.free_blocks == 3 and (cache.block_table[1] == -1).all()
    k2 = torch.randn(3, 1, 1, 4)
    cache.append(0, k2, k2)
    assert cache.free_blocks == 0 and cache.host_lengths == [9, 1, 9]
    new_blocks = {int(cache.block_table[0, 2]), int(cache.block_table[1, 0]), int(cache.block_table[2, 2])}
    assert freed <= new_blocks
    # Every sequence still reads back what it was given.
    q = torch.randn(3, 2, 1, 4)
    out = cache.attend(0, q, backend="cpu")
    full = torch.cat([k, k1, k2], 2)
    for b, n in enumerate(cache.host_lengths):
        seq = full[b : b + 1, :, :n] if b != 1 else k2[1:2]
        ref, _ = reference.decode_attention_ref(
            q[b : b + 1].double(), seq.double(), seq.double(), torch.tensor([n], dtype=torch.int32)
        )
        torch.testing.assert_close(out[b : b + 1].double(), ref, atol=2e-6, rtol=2e-6)
    cache.reset()
    assert cache.free_blocks == 7 and cache.host_lengths == [0, 0, 0]


def test_views_feed_decode_attention_directly():
    cache = KVCache(1, 2, 2, 8, 12, dtype=torch.bfloat16, paged=True, block_size=3)
    k = torch.randn(2, 2, 7, 8, dtype=torch.bfloat16)
    cache.append(0, k, k)
    q = torch.randn(2, 4, 1, 8, dtype=torch.bfloat16)
    a = seqkernels.decode_attention(q, **cache.views(0).as_kwargs(), window=3)
    b = cache.attend(0, q, window=3)
    assert torch.equal(a, b)
    assert "paged" in repr(cache) and "lengths=[7, 7]" in repr(cache)
    mods = dict(softcap=4.0, alibi_slopes=torch.rand(4), sinks=torch.randn(4))
    a = seqkernels.decode_attention(q, **cache.views(0).as_kwargs(), window=3, **mods)
    b = cache.attend(0, q, window=3, **mods)
    assert torch.equal(a, b) and not torch.equal(a, cache.attend(0, q, window=3))


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_layers"):
        KVCache(0, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="num_blocks: only meaningful"):
        KVCache(1, 1, 1, 8, 8, num_blocks=3)
    with pytest.raises(ValueError, match="block_size"):
        KVCache(1, 1, 1, 8, 8, paged=True, block_size=0)
    c = KVCache(3, 2, 4, 8, 10, dtype=torch.float16, paged=True, block_size=4)
    assert c.num_blocks == 2 * 3 and c.k.shape == (3, 6, 4, 4, 8) and c.lengths.dtype == torch.int32

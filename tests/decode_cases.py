"""The inputs shared by the decode-attention tests (tests/test_decode_attention.py, test_decode_varlen.py,
test_decode_varlen_gpu.py): a KV cache with garbage in every slot no sequence owns, its paged block
table, cu_seqlens, one sequence's cache in padded form. Torch only: the sanitized child process that
imports test_decode_varlen_gpu.py must not load Triton."""

import itertools

import torch


def random_caches(B, Hkv, S, D, Dv, dtype, *, paged, block_size=8, extra_blocks=3):
    """Random k_cache, v_cache and block table of B sequences of capacity S. Contiguous: (B, Hkv, S,
    D|Dv) and no table. Paged: B * ceil(S / block_size) blocks and `extra_blocks` more, the table a
    random permutation of them (int32 (B, ceil(S / block_size))). Random draws, in order: k_cache,
    v_cache, then (paged) the permutation."""
    if paged:
        max_blocks = -(-S // block_size)
        num_blocks = B * max_blocks + extra_blocks
        kc = torch.randn(num_blocks, Hkv, block_size, D, dtype=dtype)
        vc = torch.randn(num_blocks, Hkv, block_size, Dv, dtype=dtype)
        table = torch.randperm(num_blocks)[: B * max_blocks].view(B, max_blocks).to(torch.int32)
        return kc, vc, table
    return torch.randn(B, Hkv, S, D, dtype=dtype), torch.randn(B, Hkv, S, Dv, dtype=dtype), None


def make_kv_cache(
    lens, Hkv, D, Dv, S, dtype, *, paged, block_size=8, extra_blocks=3, garbage=float("nan"), device="cpu"
):
    """k_cache, v_cache, cache_seqlens (int32), block_table for sequences of `lens` positions (a list or
    tensor, each in [0, S]): random_caches, then -1 in table entries past a sequence's blocks, and
    `garbage` in every slot at or past a sequence's length and in every block no sequence uses."""
    B = len(lens)
    lens = torch.as_tensor(lens, dtype=torch.int32)
    kc, vc, table = random_caches(
        B, Hkv, S, D, Dv, dtype, paged=paged, block_size=block_size, extra_blocks=extra_blocks
    )
    if paged:
        used = torch.zeros(kc.shape[0], dtype=torch.bool)
        for b in range(B):
            n = int(lens[b])
            cols = -(-n // block_size)
            table[b, cols:] = -1
            used[table[b, :cols].long()] = True
            if cols and n % block_size:
                blk = int(table[b, cols - 1])
                kc[blk, :, n % block_size :] = garbage
                vc[blk, :, n % block_size :] = garbage
        kc[~used] = garbage
        vc[~used] = garbage
        table = table.to(device)
    else:
        for b in range(B):
            kc[b, :, int(lens[b]) :] = garbage
            vc[b, :, int(lens[b]) :] = garbage
    return kc.to(device), vc.to(device), lens.to(device), table


def cu_of(counts, device="cpu"):
    """cu_seqlens (int32 (B+1,), from 0) of sequences of `counts` tokens."""
    return torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=device)


def seq_cache(kc, vc, lens, table, b):
    """Sequence b's cache as a padded call's arguments (batch 1): k_cache, v_cache, cache_seqlens, block_table."""
    if table is None:
        return kc[b : b + 1], vc[b : b + 1], lens[b : b + 1], None
    return kc, vc, lens[b : b + 1], table[b : b + 1]

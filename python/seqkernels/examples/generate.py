"""Incremental greedy generation with a KV cache, checked against full recomputation.

A small decoder-only transformer (pre-norm blocks, grouped-query attention, learned positions) built
from seqkernels pieces: `seqkernels.attention(causal=True)` over the prompt (prefill), then one token
at a time through `seqkernels.nn.KVCache` (`kv_cache_append` + `decode_attention`). The same model
without a cache recomputes the whole sequence for every new token; both must produce the same tokens
and (within rounding) the same logits.

    python -m seqkernels.examples.generate --new-tokens 32 --paged
"""

from __future__ import annotations

import argparse
import time
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

import seqkernels
from seqkernels.nn.kv_cache import KVCache


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        h = self.norm1(x)
        q = self.wq(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _finish(self, x: Tensor, attn: Tensor) -> Tensor:
        B, _, T, _ = attn.shape
        x = x + self.wo(attn.transpose(1, 2).reshape(B, T, -1))
        return x + self.mlp(self.norm2(x))

    def forward(self, x: Tensor, cache: Optional[KVCache] = None, layer: int = 0, prefill: bool = False) -> Tensor:
        q, k, v = self._qkv(x)
        if cache is None:
            return self._finish(x, seqkernels.attention(q, k, v, causal=True))
        cache.append(layer, k, v)
        if prefill:
            # The prompt attends to itself: the fused attention kernel, no need to read the cache back.
            attn = seqkernels.attention(q, k, v, causal=True)
        else:
            attn = cache.attend(layer, q)
        return self._finish(x, attn)


class TinyDecoder(nn.Module):
    """Decoder-only transformer: token + learned position embeddings, `n_layers` blocks, linear head."""

    def __init__(
        self,
        vocab: int = 256,
        dim: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        max_seqlen: int = 512,
    ):
        super().__init__()
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError("dim must be a multiple of n_heads, and n_heads a multiple of n_kv_heads")
        self.max_seqlen = max_seqlen
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_seqlen, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads, n_kv_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def _head(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x))

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (B, L, vocab) of every position, recomputed from scratch (no cache)."""
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self._head(x)

    def make_cache(
        self,
        batch_size: int,
        *,
        paged: bool = False,
        block_size: int = 16,
        num_blocks: Optional[int] = None,
        backend: Optional[str] = None,
    ) -> KVCache:
        blk = self.blocks[0]
        p = self.embed.weight
        return KVCache(
            len(self.blocks),
            batch_size,
            blk.n_kv_heads,
            blk.head_dim,
            self.max_seqlen,
            dtype=p.dtype,
            device=p.device,
            paged=paged,
            block_size=block_size,
            num_blocks=num_blocks,
            backend=backend,
        )

    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Feed `tokens` (B, T) at the cache's next positions (T > 1 on an empty cache: prefill);
        returns the logits (B, T, vocab)."""
        start = cache.host_lengths[0]
        if any(n != start for n in cache.host_lengths):
            raise ValueError("this example keeps every sequence at the same length")
        T = tokens.shape[1]
        prefill = start == 0 and T > 1
        x = self.embed(tokens) + self.pos(torch.arange(start, start + T, device=tokens.device))
        for i, blk in enumerate(self.blocks):
            x = blk(x, cache, i, prefill=prefill)
        return self._head(x)


@torch.no_grad()
def generate(model: TinyDecoder, prompt: Tensor, new_tokens: int, cache: KVCache) -> Tuple[Tensor, List[Tensor]]:
    """Greedy decoding with the cache: returns (tokens (B, L + new_tokens), logits of each new token)."""
    logits = model.step(prompt, cache)[:, -1]
    out, steps = [prompt], []
    for i in range(new_tokens):
        steps.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 < new_tokens:
            logits = model.step(nxt, cache)[:, -1]
    return torch.cat(out, 1), steps


@torch.no_grad()
def generate_recompute(model: TinyDecoder, prompt: Tensor, new_tokens: int) -> Tuple[Tensor, List[Tensor]]:
    """The same greedy decoding, recomputing the whole sequence for every token (no cache)."""
    tokens, steps = prompt, []
    for _ in range(new_tokens):
        logits = model(tokens)[:, -1]
        steps.append(logits)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    return tokens, steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--paged", action="store_true", help="paged cache with a block allocator")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--backend", default=None, help="seqkernels backend (default: automatic)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    max_seqlen = args.prompt_len + args.new_tokens
    model = (
        TinyDecoder(
            dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads, max_seqlen=max_seqlen
        )
        .to(device=args.device, dtype=dtype)
        .eval()
    )
    prompt = torch.randint(0, model.embed.num_embeddings, (args.batch, args.prompt_len), device=args.device)
    cache = model.make_cache(args.batch, paged=args.paged, block_size=args.block_size, backend=args.backend)

    with seqkernels.use_backend(args.backend):
        t0 = time.perf_counter()
        tokens, logits = generate(model, prompt, args.new_tokens, cache)
        t1 = time.perf_counter()
        ref_tokens, ref_logits = generate_recompute(model, prompt, args.new_tokens)
        t2 = time.perf_counter()

    same = torch.equal(tokens, ref_tokens)
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(logits, ref_logits))
    print(f"{cache!r}")
    print(f"generated (sequence 0): {tokens[0, args.prompt_len :].tolist()}")
    print(
        f"cached: {1e3 * (t1 - t0) / args.new_tokens:.2f} ms/token, "
        f"recompute: {1e3 * (t2 - t1) / args.new_tokens:.2f} ms/token"
    )
    print(f"tokens equal to full recomputation: {same}; max |logit difference|: {err:.3g}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Train a tiny Llama a few steps with its sequence sharded over W processes (context parallelism),
next to the same training in one process.

Each rank holds a shard of every sequence (zigzag layout: chunks r and 2W-1-r of 2W) and runs the
model's attention as ring attention (`seqkernels.distributed.ring_attention`, via
`seqkernels.integrations.transformers.use_context_parallel`): keys and values travel around the ring
of ranks, the backward sends their gradients back around. Labels are shifted over the whole sequence
before sharding; the loss is the token-weighted mean over all ranks, and parameter gradients are
summed over the group (what DDP does), so every rank takes the same optimizer step.

    python -m seqkernels.examples.context_parallel --world 4 --steps 5
    python -m seqkernels.examples.context_parallel --world 2 --sliding-window 24   # a Mistral

gloo on the CPU by default (NCCL when --device cuda and GPUs are present).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import tempfile
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def tiny_llama(vocab: int, seed: int, sliding_window: Optional[int] = None):
    """A 2-layer Llama; with `sliding_window`, the same shape as a Mistral (Llama with a sliding window
    of that many keys, the query's own included)."""
    import transformers

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    if sliding_window:
        return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=sliding_window, **common))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


def batches(vocab: int, batch: int, length: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(steps)]


def shifted_labels(ids):
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def token_loss_sum(logits, labels):
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def single_process(args, data) -> List[float]:
    from seqkernels.integrations import transformers as skt

    skt.register()
    model = tiny_llama(args.vocab, args.seed, args.sliding_window).to(args.device)
    model.set_attn_implementation("seqkernels")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for ids in data:
        ids = ids.to(args.device)
        labels = shifted_labels(ids)
        opt.zero_grad()
        loss = token_loss_sum(model(input_ids=ids).logits, labels) / (labels != -100).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _rank(rank, world, init_file, args, data, out):
    from seqkernels import distributed as skd
    from seqkernels.integrations import transformers as skt

    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        torch.set_num_threads(max(1, args.threads))
        device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
        model = tiny_llama(args.vocab, args.seed, args.sliding_window).to(device)
        skt.use_context_parallel(model, layout=args.layout)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        losses = []
        for ids in data:
            ids = ids.to(device)
            labels = shifted_labels(ids)  # over the whole sequence, before sharding
            local_ids = skd.shard_sequence(ids, layout=args.layout, seq_dim=1)
            local_labels = skd.shard_sequence(labels, layout=args.layout, seq_dim=1)
            positions = skd.shard_positions(ids.shape[1], layout=args.layout, device=device).expand_as(local_ids)
            opt.zero_grad()
            count = (labels != -100).sum()
            loss = token_loss_sum(model(input_ids=local_ids, position_ids=positions).logits, local_labels) / count
            loss.backward()
            for p in model.parameters():  # each rank holds its share of every gradient: sum them
                if p.grad is not None:
                    dist.all_reduce(p.grad)
            total = loss.detach().clone()
            dist.all_reduce(total)
            opt.step()
            losses.append(total.item())
        if rank == 0:
            out.extend(losses)
    finally:
        dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=97)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--sliding-window", type=int, default=None, help="a Mistral with this sliding window instead of a Llama"
    )
    args = p.parse_args(argv)
    data = batches(args.vocab, args.batch, args.length, args.steps, args.seed + 1)
    single = single_process(copy.copy(args), data)
    with tempfile.TemporaryDirectory() as d:
        out = mp.Manager().list()
        mp.spawn(_rank, args=(args.world, os.path.join(d, "init"), args, data, out), nprocs=args.world, join=True)
        sharded = list(out)
    print(f"{'step':>4}  {'1 process':>10}  {f'{args.world} ranks':>10}  {'|diff|':>9}")
    for i, (a, b) in enumerate(zip(single, sharded)):
        print(f"{i:>4}  {a:>10.5f}  {b:>10.5f}  {abs(a - b):>9.2e}")
    return {"single": single, "sharded": sharded}


if __name__ == "__main__":
    main()

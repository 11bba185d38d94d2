"""Fine-tune a tiny gpt-oss-style model (learned attention sinks, sliding-window layers, mixture of
experts) for a few steps on the CPU with seqkernels attention, next to the same model with
transformers' eager attention.

Both copies start from the same random weights and see the same batches (left-padded, as for
generation); each step prints both losses and how far the learned sinks have moved apart. The sinks
are trained through seqkernels' backward (their gradient comes from the attention kernels).

    python -m seqkernels.examples.finetune_sinks --steps 20
    python -m seqkernels.examples.finetune_sinks --steps 5 --backend reference

Needs Hugging Face transformers >= 5, for its gpt-oss model (`pip install "transformers>=5"`; the
`seqkernels[transformers]` extra alone allows the 4.56 the attention backend needs).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import List, Optional

import torch


def tiny_gpt_oss(vocab: int, seed: int):
    import transformers

    cfg = transformers.GptOssConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():  # the init leaves the sinks at ~0; give them sizes that matter
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    return model


def make_batch(vocab: int, batch: int, length: int, gen: torch.Generator):
    """A copy task with left padding: the second half of each sequence repeats the first half."""
    half = length // 2
    first = torch.randint(1, vocab, (batch, half), generator=gen)
    ids = torch.cat([first, first], dim=1)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        pad = int(torch.randint(0, half // 2 + 1, (1,), generator=gen))
        ids[b] = torch.roll(ids[b], pad)
        ids[b, :pad] = 0
        mask[b, :pad] = 0
    labels = ids.clone()
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # a padding position predicts nothing
    labels = labels.masked_fill(mask == 0, -100)
    return ids, mask, labels


def sinks_of(model) -> torch.Tensor:
    return torch.cat([layer.self_attn.sinks.detach().flatten() for layer in model.model.layers])


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default=None, help="seqkernels backend (default: automatic)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from seqkernels.integrations import transformers as skt

    skt.register(backend=args.backend)
    vocab = 64
    ours = tiny_gpt_oss(vocab, args.seed)
    eager = copy.deepcopy(ours)
    ours.set_attn_implementation("seqkernels")
    eager.set_attn_implementation("eager")
    opts = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in (ours, eager)]
    gen = torch.Generator().manual_seed(args.seed + 1)
    history = []
    print(f"{'step':>4}  {'seqkernels':>10}  {'eager':>10}  {'|d loss|':>9}  {'|d sinks|':>9}  {'ms/step':>8}")
    for step in range(args.steps):
        ids, mask, labels = make_batch(vocab, args.batch, args.length, gen)
        losses, times = [], []
        for model, opt in zip((ours, eager), opts):
            model.train()
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        drift = (sinks_of(ours) - sinks_of(eager)).abs().max().item()
        history.append((losses[0], losses[1], drift))
        print(
            f"{step:>4}  {losses[0]:>10.5f}  {losses[1]:>10.5f}  {abs(losses[0] - losses[1]):>9.2e}  "
            f"{drift:>9.2e}  {1e3 * times[0]:>8.1f}"
        )
    skt.register()
    return {"history": history}


if __name__ == "__main__":
    main()

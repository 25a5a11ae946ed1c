"""Data-parallel 2D Matryoshka training under torchrun: DDP, a DistributedSampler, cross-device negatives.

    torchrun --nproc_per_node 2 python/ddp_torchrun.py --steps 3       # CPU processes, gloo
    torchrun --nproc_per_node 8 python/ddp_torchrun.py --steps 1000    # one node of GPUs, nccl

(run from the repository root, with the package installed or ``PYTHONPATH=$PWD``).

Each rank encodes its shard of the batch (queries, positives, one hard negative each) with
a tiny encoder that returns every layer, and the fused loss scores the rank's queries
against the docs of all ranks (``gather_across_devices=True``). DDP averages the
gradients, so one step here equals one single-process step on the global batch of
``world_size * batch_size`` queries. Only rank 0 writes the checkpoint and the metrics,
each atomically (temporary file, then ``os.replace``).

Install: ``pip install -e .`` (torch only; no extra).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import m2d_kernels as m2d

VOCAB_SIZE = 512
SEQUENCE_LENGTH = 12
HIDDEN_SIZE = 48
N_LAYERS = 3
DIMS = (12, 24, 48)


class SyntheticPairs(Dataset):
    """Token-id triples (query, positive, hard negative).

    The positive keeps about 75% of the query's tokens, the hard negative about 40%: a
    task a tiny model can learn, with negatives harder than random in-batch ones.
    """

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.queries = torch.randint(VOCAB_SIZE, (size, SEQUENCE_LENGTH), generator=generator)
        self.positives = self._perturb(self.queries, 0.25, generator)
        self.negatives = self._perturb(self.queries, 0.6, generator)

    @staticmethod
    def _perturb(tokens: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
        replace = torch.rand(tokens.shape, generator=generator) < fraction
        random_tokens = torch.randint(VOCAB_SIZE, tokens.shape, generator=generator)
        return torch.where(replace, random_tokens, tokens)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.queries[index], self.positives[index], self.negatives[index]


class TinyEncoder(nn.Module):
    """Mean-pooled token embeddings through residual tanh layers; ``forward`` returns every layer, ``[L, n, H]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(VOCAB_SIZE, HIDDEN_SIZE, mode="mean")
        self.layers = nn.ModuleList(nn.Linear(HIDDEN_SIZE, HIDDEN_SIZE) for _ in range(N_LAYERS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        outputs = []
        for layer in self.layers:
            hidden = hidden + torch.tanh(layer(hidden))
            outputs.append(hidden)
        return torch.stack(outputs)


def train_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, queries: torch.Tensor,
               positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """One update on a local batch; returns this rank's loss (a mean over its queries), detached.

    All texts go through one forward call: DDP pairs one forward with one backward.
    Docs are ``[positives, negatives]``, the column-group layout the gather expects.
    """
    n_queries = queries.shape[0]
    embeddings = model(torch.cat([queries, positives, negatives]))
    loss = loss_fn(embeddings[:, :n_queries], embeddings[:, n_queries:])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(temporary_path)`` next to ``path``, then rename: readers never see a partial file."""
    temporary = f"{path}.{os.getpid()}.tmp"  # same directory, so os.replace is an atomic rename
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="queries per device and step")
    parser.add_argument("--samples", type=int, default=4096, help="size of the synthetic data set")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/ddp_torchrun")
    parser.add_argument("--dist-backend", choices=("gloo", "nccl"), default=None,
                        help="default: nccl when CUDA is available, else gloo")
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dist_backend = args.dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(dist_backend)
    if dist_backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    train(args, device)
    # DDP's reducer holds the process group. Had the model outlived the group's destruction, the group
    # would be freed by the reducer's destructor, where gloo waits for its worker thread while holding the
    # GIL, which that thread may need: a hang at exit. So the model is gone (train returned) before this.
    gc.collect()
    dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # DDP also broadcasts rank 0's initial weights
    dataset = SyntheticPairs(args.samples, args.seed)
    # Each rank sees a disjoint shard of every epoch; drop_last keeps all local batches the same size,
    # which the all-gather of the docs needs.
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"--samples {args.samples} leaves no full batch of {args.batch_size} "
                         f"for each of the {world_size} ranks")
    model = DistributedDataParallel(TinyEncoder().to(device), device_ids=[device.index] if device.type == "cuda"
                                    else None)
    loss_fn = m2d.Matryoshka2dInfoNCELoss(DIMS, gather_across_devices=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    step, epoch, loss = 0, 0, None
    while step < args.steps:
        sampler.set_epoch(epoch)
        for queries, positives, negatives in loader:
            loss = train_step(model, loss_fn, optimizer, queries.to(device), positives.to(device),
                              negatives.to(device))
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                # The global loss is the mean of the ranks' local losses; syncing only when logging.
                dist.all_reduce(loss)
                if rank == 0:
                    print(f"step {step}  loss {loss.item() / world_size:.4f}", flush=True)
            if step == args.steps:
                break
        epoch += 1

    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        checkpoint = {"step": step, "model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                      "args": vars(args)}
        write_atomically(os.path.join(args.output_dir, "checkpoint.pt"),
                         lambda path: torch.save(checkpoint, path))
        metrics = {"step": step, "loss": loss.item() / world_size, "world_size": world_size,
                   "global_batch_size": world_size * args.batch_size}
        write_atomically(os.path.join(args.output_dir, "metrics.json"),
                         lambda path: _write_json(metrics, path))


def _write_json(data: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)


if __name__ == "__main__":
    main()

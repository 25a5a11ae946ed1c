"""Cross-device negatives and DDP, with 2 and 4 gloo processes on the CPU.

Ranks receive shards of one global batch and compute their local loss with
``gather_across_devices="all_gather"`` and ``"ring"``; the test process compares what they
return with one process computing the concatenated batch (reference backend and the NumPy
oracle, float64), and the two modes with each other:

    sum_r loss_r = W * loss_global,    grad on rank r = W * (d loss_global / d own inputs)

(each rank's loss is a mean over its B local queries; the all-gather's backward sums the
gradients of all ranks' losses). Global docs are laid out as sentence-transformers' MNRL
gathers them: for each column group of B rows, the groups of ranks 0..W-1.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import free_port, init_process_group, spawn
from helpers import assert_close, loss_and_grads, make_inputs, oracle_pair_losses

import m2d_kernels as m2d

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "python" / "ddp_torchrun.py"
N_LAYERS, N_QUERIES, N_FEATURES = 2, 3, 100
DIMS = (24, 40, 100)
WEIGHTS = [[1.0, 0.0, 0.5], [0.25, 1.0, 2.0]]


def _local_docs_rows(world_size: int, n_docs: int, rank: int) -> torch.Tensor:
    """Global rows of rank ``rank``'s docs: column group g of the global docs is [rank 0's B rows, rank 1's, ...]."""
    layout = torch.arange(world_size * n_docs).view(n_docs // N_QUERIES, world_size, N_QUERIES)
    return layout[:, rank].reshape(-1)


def _make_case(world_size: int, n_groups: int, symmetric: bool, with_positive_index: bool, scale: float,
               backend: str, seed: int, dtype: torch.dtype = torch.float64) -> dict:
    """A global batch, and per rank its shard (queries, docs, local positive_index)."""
    n_docs = n_groups * N_QUERIES
    queries, docs = make_inputs(N_LAYERS, world_size * N_QUERIES, world_size * n_docs, N_FEATURES, seed=seed,
                                requires_grad=False)
    generator = torch.Generator().manual_seed(seed + 1)
    shards, global_positives = [], []
    for rank in range(world_size):
        rows = _local_docs_rows(world_size, n_docs, rank)
        local_positive = torch.randint(n_docs, (N_QUERIES,), generator=generator) if with_positive_index else None
        global_positives.append(rows[local_positive] if with_positive_index else rows[:N_QUERIES])
        shards.append((queries[:, rank * N_QUERIES:(rank + 1) * N_QUERIES], docs[:, rows], local_positive))
    return {"queries": queries, "docs": docs, "shards": shards, "symmetric": symmetric, "scale": scale,
            "backend": backend, "dtype": dtype, "global_positive_index": torch.cat(global_positives)}


def _cases(world_size: int) -> dict[str, dict]:
    return {
        "hard_negatives": _make_case(world_size, 3, False, False, 20.0, "reference", seed=10 * world_size),
        "hard_negatives_torch": _make_case(world_size, 3, False, False, 100.0, "torch", seed=10 * world_size + 2),
        "symmetric": _make_case(world_size, 2, True, False, 20.0, "torch", seed=10 * world_size + 4),
        "symmetric_positive_index": _make_case(world_size, 2, True, True, 50.0, "reference", seed=10 * world_size + 6),
        "positive_index_torch": _make_case(world_size, 3, False, True, 20.0, "torch", seed=10 * world_size + 8),
        "float32": _make_case(world_size, 3, False, False, 20.0, "torch", seed=10 * world_size + 1,
                              dtype=torch.float32),
        # bf16 inputs with the fp32-accumulating torch backend: errors are the inputs' and outputs' rounding.
        "bfloat16_symmetric": _make_case(world_size, 2, True, False, 20.0, "torch", seed=10 * world_size + 3,
                                         dtype=torch.bfloat16),
        "cpp_symmetric_positive_index": _make_case(world_size, 2, True, True, 50.0, "cpp", seed=10 * world_size + 7),
        "cpp_hard_negatives_running_max": _make_case(world_size, 3, False, False, 500.0, "cpp",
                                                     seed=10 * world_size + 9),
        # triton runs under the interpreter here (fp32 at most): its pass API on tiny blocks.
        "triton_symmetric_positive_index": _make_case(world_size, 2, True, True, 20.0, "triton",
                                                      seed=10 * world_size + 5, dtype=torch.float32),
    }


def _assert_matches(actual, expected, dtype, name):
    """float64/float32: the shared tolerance table. bfloat16: within 3% of the largest value (4 bf16 ulps; the
    rounding of bf16 inputs and outputs alone reaches about 1.2% here), and the dtype must be kept."""
    assert actual.dtype == dtype, f"{name} has dtype {actual.dtype}, expected {dtype}"
    if dtype in (torch.float64, torch.float32):
        assert_close(actual, expected, dtype, name)
    else:
        tolerance = 3e-2 * expected.abs().max().item()
        torch.testing.assert_close(actual.double(), expected, atol=tolerance, rtol=0, msg=lambda m: f"{name}: {m}")


MODES = (True, "ring")  # True: the all-gather


def _loss_worker(rank: int, world_size: int, port: int, cases: dict, out_dir: str) -> None:
    init_process_group(rank, world_size, port)
    results = {}
    for name, case in cases.items():
        for mode in MODES:
            local_queries, local_docs, positive_index = case["shards"][rank]
            local_queries, local_docs = local_queries.to(case["dtype"]), local_docs.to(case["dtype"])
            queries = local_queries.clone().requires_grad_(True)
            docs = local_docs.clone().requires_grad_(True)
            loss_fn = m2d.Matryoshka2dInfoNCELoss(DIMS, WEIGHTS, scale=case["scale"], symmetric=case["symmetric"],
                                                  backend=case["backend"], gather_across_devices=mode)
            loss = loss_fn(queries, docs, positive_index)
            loss.backward()
            pairs = m2d.matryoshka_2d_infonce(
                local_queries, local_docs, DIMS, WEIGHTS, scale=case["scale"], positive_index=positive_index,
                symmetric=case["symmetric"], reduction="none", backend=case["backend"], gather_across_devices=mode,
            )
            results[name, mode] = {"loss": loss.detach(), "pairs": pairs, "grad_queries": queries.grad,
                                   "grad_docs": docs.grad}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_gathered_losses_and_grads_equal_one_process_on_the_concatenated_batch(world_size, tmp_path):
    cases = _cases(world_size)
    spawn(_loss_worker, world_size, cases, str(tmp_path))
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    for name, case in cases.items():
        options = {"scale": case["scale"], "symmetric": case["symmetric"]}
        positive_index = case["global_positive_index"]
        loss, grad_queries, grad_docs = loss_and_grads(case["queries"], case["docs"], DIMS, WEIGHTS,
                                                       backend="reference", positive_index=positive_index, **options)
        oracle = oracle_pair_losses(case["queries"], case["docs"], DIMS, WEIGHTS, positive_index=positive_index,
                                    **options)
        dtype = case["dtype"]
        for mode in MODES:
            results = [ranks[name, mode] for ranks in per_rank]
            label = f"{name} ({'all_gather' if mode is True else mode})"
            _assert_matches(sum(r["loss"] for r in results), world_size * loss, dtype, f"{label} summed loss")
            _assert_matches(sum(r["pairs"] for r in results), world_size * torch.from_numpy(oracle), dtype,
                            f"{label} summed [L, M] losses")
            for rank, result in enumerate(results):
                own_queries = slice(rank * N_QUERIES, (rank + 1) * N_QUERIES)
                own_docs = _local_docs_rows(world_size, case["docs"].shape[1] // world_size, rank)
                _assert_matches(result["grad_queries"], world_size * grad_queries[:, own_queries], dtype,
                                f"{label} rank {rank} grad queries")
                _assert_matches(result["grad_docs"], world_size * grad_docs[:, own_docs], dtype,
                                f"{label} rank {rank} grad docs")
        if dtype == torch.float64:  # the ring against the all-gather directly, per rank
            for rank, ranks in enumerate(per_rank):
                for key in ("loss", "pairs", "grad_queries", "grad_docs"):
                    assert_close(ranks[name, "ring"][key], ranks[name, True][key], dtype,
                                 f"{name} rank {rank} {key}: ring vs all_gather")


def _load_example():
    spec = importlib.util.spec_from_file_location("ddp_torchrun", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN_BATCH, TRAIN_SEED, TRAIN_LR = 4, 3, 0.5


def _make_training_step(example, seed: int):
    torch.manual_seed(seed)
    model = example.TinyEncoder().double()
    return model, torch.optim.SGD(model.parameters(), lr=TRAIN_LR)


def _global_batch(example, world_size: int):
    dataset = example.SyntheticPairs(world_size * TRAIN_BATCH, TRAIN_SEED)
    return dataset.queries, dataset.positives, dataset.negatives


def _ddp_step(example, rank: int, world_size: int) -> dict:
    model, optimizer = _make_training_step(example, TRAIN_SEED)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    own = slice(rank * TRAIN_BATCH, (rank + 1) * TRAIN_BATCH)
    batch = [tokens[own] for tokens in _global_batch(example, world_size)]
    loss_fn = m2d.Matryoshka2dInfoNCELoss(example.DIMS, backend="torch", gather_across_devices=True)
    loss = example.train_step(ddp_model, loss_fn, optimizer, *batch)
    return {"loss": loss, "state": model.state_dict()}


def _ddp_step_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init_process_group(rank, world_size, port)
    example = _load_example()
    torch.save(_ddp_step(example, rank, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    # DDP must be freed before the process group (see the example's main): _ddp_step returned, collect its cycles.
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_on_two_processes_equals_one_process_step_on_the_global_batch(tmp_path):
    world_size = 2
    spawn(_ddp_step_worker, world_size, str(tmp_path))
    example = _load_example()
    model, optimizer = _make_training_step(example, TRAIN_SEED)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    loss_fn = m2d.Matryoshka2dInfoNCELoss(example.DIMS, backend="reference")
    loss = example.train_step(model, loss_fn, optimizer, *_global_batch(example, world_size))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    assert_close(sum(r["loss"] for r in results) / world_size, loss, torch.float64, "mean of the ranks' losses")
    for name, expected in model.state_dict().items():
        assert not torch.equal(expected, initial[name]), f"{name} did not move: the step tests nothing"
        for rank, result in enumerate(results):
            assert_close(result["state"][name], expected, torch.float64, f"rank {rank} {name} after one step")


@pytest.mark.slow
def test_torchrun_example_trains_and_only_rank_zero_writes(tmp_path):
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(EXAMPLE),
               "--dist-backend", "gloo", "--steps", "3", "--batch-size", "4", "--samples", "64",
               "--output-dir", str(output_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint.pt", "metrics.json"]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["world_size"] == 2 and metrics["global_batch_size"] == 8
    # Random embeddings would score about L * M * log(2 * global batch) = 9 * log(16) = 25.
    assert 0 < metrics["loss"] < 25
    checkpoint = torch.load(output_dir / "checkpoint.pt")
    assert checkpoint["step"] == 3
    assert set(checkpoint["model"]) == set(_load_example().TinyEncoder().state_dict())
    assert "step 3" in completed.stdout


def test_without_a_process_group_gathering_is_the_local_computation():
    queries, docs = make_inputs(N_LAYERS, N_QUERIES, 2 * N_QUERIES, N_FEATURES, seed=5)
    positive_index = torch.tensor([4, 0, 2])
    expected, grad_queries, grad_docs = loss_and_grads(queries, docs, DIMS, WEIGHTS, backend="reference",
                                                       positive_index=positive_index, symmetric=True)
    loss, got_queries, got_docs = loss_and_grads(queries, docs, DIMS, WEIGHTS, backend="torch",
                                                 positive_index=positive_index, symmetric=True,
                                                 gather_across_devices=True)
    for name, got, want in (("loss", loss, expected), ("grad_queries", got_queries, grad_queries),
                            ("grad_docs", got_docs, grad_docs)):
        assert_close(got, want, torch.float64, name)


def test_gathering_rejects_docs_that_are_not_groups_of_the_batch():
    queries, docs = make_inputs(1, 3, 7, 48, seed=0)
    with pytest.raises(ValueError, match="gather_across_devices.*N=7, B=3"):
        m2d.matryoshka_2d_infonce(queries, docs, (16, 48), gather_across_devices=True)
    m2d.matryoshka_2d_infonce(queries, docs, (16, 48))  # fine without gathering
    with pytest.raises(ValueError, match="gather_across_devices must be a bool or one of"):
        m2d.matryoshka_2d_infonce(queries, docs[:, :6], (16, 48), gather_across_devices="yes")
    with pytest.raises(TypeError, match="gather_across_devices must be a bool or one of"):
        m2d.matryoshka_2d_infonce(queries, docs[:, :6], (16, 48), gather_across_devices=1)

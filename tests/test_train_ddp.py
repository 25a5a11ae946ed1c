"""The training loop under DDP: 2 gloo processes on the CPU against one process on the same global batches.

The model is the tiny random BERT without dropout (ranks and the single process would
otherwise draw different masks) in float64, so the only differences are the order of
floating-point sums (a batch split over two ranks, DDP's gradient all-reduce): the final
weights must agree to the float64 tolerance of tests/helpers.py (1e-9), far below the
~1e-3 a single AdamW step moves them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from distributed_helpers import free_port, spawn
from helpers import assert_close
from train_helpers import make_tiny_bert, write_pairs_jsonl

from m2d_kernels.train import loop, parallel
from m2d_kernels.train.data import read_examples
from m2d_kernels.train.encoder import LayerEncoder

REPO_ROOT = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2
STEPS, INTERRUPT_AT = 4, 3


@pytest.fixture(scope="module")
def tiny_bert_without_dropout(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_no_dropout"), dropout=0.0)


def _config(model: Path, output_dir: Path, **overrides) -> loop.TrainConfig:
    # 37 triplets: 4 global batches of 8 per epoch, 2 micro-batches per step, so 4 steps cross an epoch;
    # the sampled schedule leaves some layers without gradient in some steps (DDP's unused parameters).
    settings = dict(model=str(model), output_dir=str(output_dir), layers=(1, 2, 3), dims=(8, 20, 32),
                    schedule="sampled", layers_per_step=2, dims_per_step=2, batch_size=8, grad_accum=2, steps=STEPS,
                    lr=1e-3, max_length=16, checkpoint_every=2, device="cpu", seed=3, backend="torch")
    settings.update(overrides)
    return loop.TrainConfig(**settings)


def _double_encoder(model: Path) -> LayerEncoder:
    return LayerEncoder.from_pretrained(model, max_length=16).double()


def _train_worker(rank: int, world_size: int, port: int, model: Path, examples: list, output_dir: Path,
                  results_dir: Path) -> None:
    # What torchrun sets; the loop joins the group itself.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    writes = []
    save_checkpoint, save_model = loop.save_checkpoint, loop.save_model

    def recording_checkpoint(path, state):
        writes.append(("checkpoint", state["step"]))
        save_checkpoint(path, state)

    def recording_model(encoder, directory, *args, **kwargs):
        writes.append(("model", None))
        save_model(encoder, directory, *args, **kwargs)

    loop.save_checkpoint, loop.save_model = recording_checkpoint, recording_model
    config = _config(model, output_dir)
    interrupted = loop.train(config, examples, encoder=_double_encoder(model), stop_after=INTERRUPT_AT,
                             progress=False)
    resumed = loop.train(replace(config, resume=True), examples, encoder=_double_encoder(model), progress=False)
    torch.save({"losses": interrupted.losses + resumed.losses, "steps": (interrupted.steps, resumed.steps),
                "state": resumed.encoder.model.state_dict(), "writes": writes}, results_dir / f"rank{rank}.pt")
    del interrupted, resumed
    parallel.stop()


@pytest.mark.slow
def test_interrupted_and_resumed_ddp_run_equals_one_process_on_the_global_batches(tiny_bert_without_dropout,
                                                                                  tmp_path):
    model = tiny_bert_without_dropout
    examples = read_examples(write_pairs_jsonl(tmp_path / "triplets.jsonl", 37, triplets=True))
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    spawn(_train_worker, WORLD_SIZE, model, examples, tmp_path / "ddp", results_dir)
    single = loop.train(_config(model, tmp_path / "single", backend="reference"), examples,
                        encoder=_double_encoder(model), progress=False)

    ranks = [torch.load(results_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    initial = _double_encoder(model).model.state_dict()
    expected = single.encoder.model.state_dict()
    moved = [name for name in expected if not torch.equal(expected[name], initial[name])]
    assert len(moved) > len(expected) // 2, "training hardly moved the weights: the comparison tests nothing"
    for rank, result in enumerate(ranks):
        assert result["steps"] == (INTERRUPT_AT, STEPS)
        # The loop sums each step's loss in a float32 scalar (it is only logged): float32 tolerance.
        assert_close(torch.tensor(result["losses"]), torch.tensor(single.losses), torch.float32,
                     f"rank {rank} losses of the global batches")
        assert set(result["state"]) == set(expected)
        for name, tensor in expected.items():
            assert_close(result["state"][name], tensor, torch.float64, f"rank {rank} final {name}")
    # Checkpoints at step 2 (checkpoint_every), 3 (the interruption) and 4 (the end), then the model: rank 0 only.
    assert ranks[0]["writes"] == [("checkpoint", 2), ("checkpoint", 3), ("checkpoint", 4), ("model", None)]
    assert ranks[1]["writes"] == []
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "model"]
    checkpoint = loop.load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert checkpoint["world_size"] == WORLD_SIZE and len(checkpoint["rng_by_rank"]) == WORLD_SIZE
    saved = LayerEncoder.from_pretrained(tmp_path / "ddp" / "model").model.state_dict()
    for name, tensor in expected.items():
        assert_close(saved[name], tensor, torch.float64, f"saved {name}")


@pytest.mark.slow
def test_m2d_train_under_torchrun_writes_and_prints_on_rank_zero_only(tiny_bert_without_dropout, tmp_path):
    pairs = write_pairs_jsonl(tmp_path / "pairs.jsonl", 40)
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "m2d_kernels.train",
               "--model", str(tiny_bert_without_dropout), "--data", str(pairs), "--holdout", "8", "--batch-size", "8",
               "--steps", "2", "--dims", "8,16,32", "--max-length", "16", "--output-dir", str(output_dir),
               "--no-progress", "--no-speed", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.count("trained to step 2") == 1, completed.stdout
    assert completed.stdout.count("heldout mrr@10 (after - before)") == 1, completed.stdout
    # No --checkpoint-every: no checkpoint.
    # Rank 0 alone measures the cost grid, picks and exports (m2d-train's deployment step).
    assert sorted(p.name for p in output_dir.iterdir()) == ["cost.json", "deployed", "heatmap_heldout.png", "model",
                                                            "pareto.png", "pick.json", "summary.json"]
    assert completed.stdout.count("Pareto front:") == 1, completed.stdout
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["losses"]) == 2 and summary["world_size"] == WORLD_SIZE

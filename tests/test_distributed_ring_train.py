"""``m2d-train --cross-device ring``: the training loop with the ring exchange, 2 gloo processes
on the CPU, against one process on the same global batches (float64, tiny random BERT without
dropout), as ``test_train_ddp.py`` does for the all-gather."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from distributed_helpers import spawn
from helpers import assert_close
from train_helpers import make_tiny_bert, write_pairs_jsonl

from m2d_kernels import distributed
from m2d_kernels.train import cli, loop, parallel
from m2d_kernels.train.data import read_examples
from m2d_kernels.train.encoder import LayerEncoder

WORLD_SIZE, STEPS = 2, 2


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_ring"), dropout=0.0)


def _config(model: Path, output_dir: Path, **overrides) -> loop.TrainConfig:
    settings = dict(model=str(model), output_dir=str(output_dir), layers=(1, 3), dims=(8, 20, 32), batch_size=8,
                    steps=STEPS, lr=1e-3, max_length=16, checkpoint_every=0, device="cpu", seed=3, backend="torch",
                    symmetric=True)
    settings.update(overrides)
    return loop.TrainConfig(**settings)


def _encoder(model: Path) -> LayerEncoder:
    return LayerEncoder.from_pretrained(model, max_length=16).double()


def _worker(rank: int, world_size: int, port: int, model: Path, examples: list, output_dir: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ring_calls = []
    ring_losses = distributed.ring_losses

    def counted(*args, **kwargs):  # the loop must take the ring, not the all-gather (same numbers)
        ring_calls.append(1)
        return ring_losses(*args, **kwargs)

    distributed.ring_losses = counted
    result = loop.train(_config(model, output_dir / "run", cross_device="ring"), examples, encoder=_encoder(model),
                        progress=False)
    torch.save({"losses": result.losses, "state": result.encoder.model.state_dict(), "ring_calls": len(ring_calls)},
               output_dir / f"rank{rank}.pt")
    del result
    parallel.stop()


@pytest.mark.slow
def test_ring_training_run_equals_one_process_on_the_global_batches(tiny_bert, tmp_path):
    examples = read_examples(write_pairs_jsonl(tmp_path / "triplets.jsonl", 16, triplets=True))
    spawn(_worker, WORLD_SIZE, tiny_bert, examples, tmp_path)
    single = loop.train(_config(tiny_bert, tmp_path / "single", backend="reference"), examples,
                        encoder=_encoder(tiny_bert), progress=False)
    expected = single.encoder.model.state_dict()
    initial = _encoder(tiny_bert).model.state_dict()
    assert sum(not torch.equal(expected[n], initial[n]) for n in expected) > len(expected) // 2
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["ring_calls"] == STEPS, result["ring_calls"]
        assert_close(torch.tensor(result["losses"]), torch.tensor(single.losses), torch.float32, f"rank {rank} losses")
        for name, tensor in expected.items():
            assert_close(result["state"][name], tensor, torch.float64, f"rank {rank} final {name}")


def test_cli_cross_device_option():
    parser = cli.build_parser()
    assert parser.parse_args([]).cross_device == "all_gather"
    assert parser.parse_args(["--cross-device", "ring"]).cross_device == "ring"
    with pytest.raises(SystemExit):
        parser.parse_args(["--cross-device", "broadcast"])
    with pytest.raises(ValueError, match="cross_device"):
        loop.check_config(_config(Path("model"), Path("out"), cross_device="broadcast"), 16, 1)

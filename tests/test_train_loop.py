"""The training loop: data order, schedules, checkpoints, and exact resume on a tiny random BERT."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from train_helpers import write_pairs_jsonl

from m2d_kernels.train import loop
from m2d_kernels.train.data import read_examples
from m2d_kernels.train.encoder import LayerEncoder

pytest_plugins = ("train_fixtures",)  # the tiny_bert fixture


def test_epoch_batches_are_seeded_full_batch_permutations():
    batches = loop.epoch_batches(23, 5, epoch=2, seed=7)
    assert len(batches) == 4 and all(len(b) == 5 for b in batches)
    assert len(set(sum(batches, []))) == 20
    assert batches == loop.epoch_batches(23, 5, epoch=2, seed=7)
    assert batches != loop.epoch_batches(23, 5, epoch=3, seed=7)


def test_schedules_give_the_documented_weights():
    config = loop.TrainConfig(model="m", output_dir="o", schedule="starbucks")
    weights = loop.step_weights(config, (1, 2, 3, 4), (8, 16, 32), torch.Generator())
    expected = torch.zeros(4, 3)
    expected[1, 0] = expected[2, 1] = expected[3, 2] = 1  # (2, 8), (3, 16), (4, 32)
    assert torch.equal(weights, expected)
    config.schedule = "sampled"
    sampled = loop.step_weights(config, (1, 2, 3, 4), (8, 16, 32), torch.Generator().manual_seed(0))
    assert sampled.sum() == 1 and set(sampled.unique().tolist()) == {0.0, 1.0}
    config.schedule = "full_grid"
    assert torch.equal(loop.step_weights(config, (1, 2), (8, 16, 32), torch.Generator()), torch.ones(2, 3))


def test_default_dims():
    assert loop.default_dims(384) == (32, 64, 128, 256, 384)
    assert loop.default_dims(32) == (32,)


def _config(model, output_dir, **overrides):
    settings = dict(model=str(model), output_dir=str(output_dir), layers=(1, 2, 3), dims=(8, 20, 32),
                    schedule="sampled", layers_per_step=2, dims_per_step=2, batch_size=4, grad_accum=2, steps=5,
                    lr=1e-3, max_length=16, checkpoint_every=2, device="cpu", seed=3)
    settings.update(overrides)
    return loop.TrainConfig(**settings)


def test_interrupted_and_resumed_run_ends_with_identical_weights(tiny_bert, tmp_path):
    examples = read_examples(write_pairs_jsonl(tmp_path / "triplets.jsonl", 19, triplets=True))
    straight = loop.train(_config(tiny_bert, tmp_path / "straight"), examples, progress=False)

    interrupted = loop.train(_config(tiny_bert, tmp_path / "resumed"), examples, stop_after=3, progress=False)
    assert interrupted.steps == 3 and not (tmp_path / "resumed" / "model").exists()
    resumed = loop.train(_config(tiny_bert, tmp_path / "resumed", resume=True), examples, progress=False)
    assert resumed.steps == 5 and len(resumed.losses) == 2
    assert interrupted.losses + resumed.losses == straight.losses

    initial = LayerEncoder.from_pretrained(tiny_bert).model.state_dict()
    final_straight = straight.encoder.model.state_dict()
    final_resumed = resumed.encoder.model.state_dict()
    assert any(not torch.equal(initial[k], final_straight[k]) for k in initial)  # training did change the weights
    for name, tensor in final_straight.items():
        assert torch.equal(tensor, final_resumed[name]), name
    # The saved model is the final state.
    saved = LayerEncoder.from_pretrained(tmp_path / "resumed" / "model").model.state_dict()
    assert all(torch.equal(saved[k], final_straight[k]) for k in final_straight)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["checkpoint.pt", "model"]


def test_training_reduces_the_loss(tiny_bert, tmp_path):
    examples = read_examples(write_pairs_jsonl(tmp_path / "pairs.jsonl", 32))
    config = _config(tiny_bert, tmp_path / "run", schedule="full_grid", batch_size=8, grad_accum=1, steps=12,
                     lr=3e-3, warmup_ratio=0.0, checkpoint_every=0)
    losses = loop.train(config, examples, progress=False).losses
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])


@pytest.mark.parametrize("overrides, words", [
    ({"schedule": "diagonal"}, "schedule"),
    ({"precision": "fp8"}, "precision"),
    ({"precision": "fp16"}, "fp16 needs a CUDA device"),
    ({"batch_size": 100}, "larger than the"),
    ({"layers": (1, 9)}, "unknown layer"),
    ({"dims": (8, 64)}, "larger than the model's hidden size"),
    ({"max_length": 0}, "max_length must be >= 1"),
    ({"epochs": float("nan"), "steps": None}, "epochs must be a finite number"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"checkpoint_every": -1}, "checkpoint_every must be >= 0"),
    ({"layers": ()}, "layers must be a non-empty list"),
    ({"dims": (8, 8)}, "dims must be strictly increasing"),
    ({"dims_per_step": 0}, "dims_per_step must be >= 1 or -1"),
    ({"device": "tpu"}, "device must be auto, cpu, cuda"),
    ({"backend": "fast"}, "backend must be one of"),
    ({"output_dir": __file__}, "exists and is not a folder"),
])
def test_bad_settings_raise_before_training(tiny_bert, tmp_path, overrides, words):
    examples = [("a b", "a c")] * 10
    with pytest.raises(ValueError, match=words):
        overrides = dict(overrides)
        loop.train(_config(tiny_bert, overrides.pop("output_dir", tmp_path / "bad"), **overrides), examples,
                   progress=False)


def test_columns_are_padded_separately_and_match_one_column_at_a_time(tiny_bert):
    encoder = LayerEncoder.from_pretrained(tiny_bert)
    encoder.model.eval()
    short = ["a b", "c d", "e f"]
    long = [s + " x y z w v u t s r q" for s in short]
    with torch.no_grad():
        together = encoder(short + long, [1, 2], columns=2)
        expected = torch.cat([encoder(short, [1, 2]), encoder(long, [1, 2])], dim=1)
    torch.testing.assert_close(together, expected)
    with pytest.raises(ValueError, match="columns must divide the 6 texts"):
        encoder(short + long, [1], columns=4)


def test_resume_needs_a_checkpoint_unless_if_present(tiny_bert, tmp_path):
    examples = read_examples(write_pairs_jsonl(tmp_path / "pairs.jsonl", 16))
    with pytest.raises(FileNotFoundError, match="resume: no checkpoint at"):
        loop.train(_config(tiny_bert, tmp_path / "a", resume=True, steps=1), examples, progress=False)
    result = loop.train(_config(tiny_bert, tmp_path / "b", resume=True, resume_if_present=True, steps=1,
                                checkpoint_every=0), examples, progress=False)
    assert result.steps == 1 and sorted(p.name for p in (tmp_path / "b").iterdir()) == ["model"]


def test_a_killed_save_leaves_nothing_behind_after_the_next_run(tiny_bert, tmp_path):
    examples = read_examples(write_pairs_jsonl(tmp_path / "pairs.jsonl", 16))
    out = tmp_path / "run"
    out.mkdir()
    (out / ".m2d-tmp.checkpoint.pt.k1ll3d_0.tmp").write_bytes(b"the first half of a checkpoint")
    loop.train(_config(tiny_bert, out, steps=2), examples, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "model"]


def test_resume_with_other_settings_is_refused(tiny_bert, tmp_path):
    examples = read_examples(write_pairs_jsonl(tmp_path / "pairs.jsonl", 16))
    loop.train(_config(tiny_bert, tmp_path / "run", steps=2), examples, stop_after=1, progress=False)
    with pytest.raises(loop.CheckpointError, match=r"other settings \(batch_size 4 -> 8; lr 0.001 -> 0.01\)"):
        loop.train(_config(tiny_bert, tmp_path / "run", steps=2, batch_size=8, lr=1e-2, resume=True), examples,
                   progress=False)


class _Payload:
    """What an attacker puts in a checkpoint: unpickling it calls ``open(marker, "w")``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_crafted_checkpoint_runs_no_code(tiny_bert, tmp_path):
    """The checksum header proves integrity, not origin: a checkpoint is loaded with weights_only=True."""
    examples = read_examples(write_pairs_jsonl(tmp_path / "pairs.jsonl", 9))
    config = _config(tiny_bert, tmp_path / "run", steps=2, grad_accum=1)
    loop.train(config, examples, stop_after=1, progress=False)
    checkpoint = tmp_path / "run" / loop.CHECKPOINT_NAME
    state = loop.load_checkpoint(checkpoint)
    marker = tmp_path / "pwned"
    state["scaler"] = _Payload(marker)
    loop.save_checkpoint(checkpoint, state)  # a valid header: the attacker computes the SHA-256 too
    with pytest.raises(loop.CheckpointError, match="holds objects a safe load refuses"):
        loop.train(_config(tiny_bert, tmp_path / "run", steps=2, grad_accum=1, resume=True), examples,
                   progress=False)
    assert not marker.exists()


def test_a_checkpoint_without_its_keys_is_named(tiny_bert, tmp_path):
    examples = read_examples(write_pairs_jsonl(tmp_path / "pairs.jsonl", 9))
    config = _config(tiny_bert, tmp_path / "run", steps=2, grad_accum=1)
    loop.save_checkpoint(tmp_path / "run" / loop.CHECKPOINT_NAME, {"config": asdict(config), "step": 1})
    with pytest.raises(loop.CheckpointError, match="lacks model, optimizer, scheduler, scaler, rng"):
        loop.train(_config(tiny_bert, tmp_path / "run", steps=2, grad_accum=1, resume=True), examples,
                   progress=False)

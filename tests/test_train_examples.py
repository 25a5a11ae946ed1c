"""The python/ examples run in seconds on a tiny model, with no data folder (built-in data)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from train_helpers import write_pairs_jsonl

from m2d_kernels.train.data import resolve_data_dir

pytest_plugins = ("train_fixtures",)  # the tiny_bert fixture
EXAMPLES = Path(__file__).resolve().parents[1] / "python"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bare_loop(tiny_bert, tmp_path):
    pairs = write_pairs_jsonl(tmp_path / "pairs.jsonl", 24)
    losses = _load("bare_loop").main(["--model", str(tiny_bert), "--data", str(pairs), "--steps", "3",
                                      "--batch-size", "8", "--lr", "1e-3"])
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)


def test_hf_trainer(tiny_bert, tmp_path):
    pairs = write_pairs_jsonl(tmp_path / "pairs.jsonl", 24)
    losses = _load("hf_trainer").main(["--model", str(tiny_bert), "--data", str(pairs), "--steps", "3",
                                       "--batch-size", "8", "--lr", "1e-3", "--output-dir", str(tmp_path / "out")])
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)


@pytest.fixture
def no_data_folder(tmp_path, monkeypatch):
    """A user with no data folder: no --data-dir, no $M2D_DATA_DIR (the examples use the built-in pairs)."""
    monkeypatch.delenv("M2D_DATA_DIR", raising=False)
    assert resolve_data_dir() is None


@pytest.mark.parametrize("name", ["bare_loop", "hf_trainer"])
def test_examples_run_on_the_built_in_data(name, tiny_bert, tmp_path, no_data_folder):
    extra = ["--output-dir", str(tmp_path / "out")] if name == "hf_trainer" else []
    losses = _load(name).main(["--model", str(tiny_bert), "--steps", "2", "--batch-size", "16", *extra])
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)


def test_sentence_transformers_trainer_runs_without_a_data_folder(tiny_bert, tmp_path, no_data_folder):
    # docs/sentence-transformers.md's command, default batch 16 (drop_last): the built-in data must fill a batch.
    losses = _load("sentence_transformers_trainer").main(["--model", str(tiny_bert), "--steps", "2",
                                                          "--output-dir", str(tmp_path / "st")])
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)

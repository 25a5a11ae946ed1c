"""The python/ examples run in seconds on a tiny model."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from train_helpers import write_pairs_jsonl

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

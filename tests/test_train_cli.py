"""m2d-train: clear errors for bad arguments, and one tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
from train_helpers import write_pairs_jsonl

from m2d_kernels.train.cli import main
from m2d_kernels.train.data import resolve_data_dir

pytest_plugins = ("train_fixtures",)  # the tiny_bert fixture


def _error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def pairs_file(tmp_path):
    return write_pairs_jsonl(tmp_path / "pairs.jsonl", 40)


def test_missing_model_path(tmp_path, capsys):
    err = _error_of(["--model", str(tmp_path / "nowhere")], capsys)
    assert "model not found" in err and "nowhere" in err


def test_missing_data_file(tiny_bert, tmp_path, capsys):
    err = _error_of(["--model", str(tiny_bert), "--data", str(tmp_path / "absent.jsonl")], capsys)
    assert "data file not found" in err and "absent.jsonl" in err


def test_unknown_layer(tiny_bert, pairs_file, capsys):
    err = _error_of(["--model", str(tiny_bert), "--data", str(pairs_file), "--layers", "1,7"], capsys)
    assert "unknown layer(s) [7]" in err and "1..3" in err


def test_dim_larger_than_the_model(tiny_bert, pairs_file, capsys):
    err = _error_of(["--model", str(tiny_bert), "--data", str(pairs_file), "--dims", "8,16,48"], capsys)
    assert "dim 48 is larger than the model's hidden size 32" in err


def test_missing_shared_data_for_sts(tiny_bert, pairs_file, tmp_path, capsys):
    err = _error_of(["--model", str(tiny_bert), "--data", str(pairs_file), "--eval", "stsb-test",
                     "--data-dir", str(tmp_path / "no-data")], capsys)
    assert "data directory not found" in err


def test_tiny_end_to_end_run(tiny_bert, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model", str(tiny_bert), "--data", str(pairs_file), "--holdout", "8", "--batch-size", "8",
                 "--steps", "3", "--dims", "8,16,32", "--max-length", "16", "--output-dir", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "heldout mrr@10 (after - before)" in printed and "reference" in printed and "speed-up" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    grid = summary["after"]["heldout"]["metrics"]["recall@1"]
    assert len(grid) == 3 and len(grid[0]) == 3 and all(0 <= v <= 100 for row in grid for v in row)
    assert summary["loss_speed"]["queries_shape"] == [3, 8, 32] and summary["loss_speed"]["reference_ms"] > 0
    assert (out / "heatmap_heldout.png").is_file() and (out / "model" / "config.json").is_file()


@pytest.mark.skipif(resolve_data_dir() is None, reason="shared data folder not found (set M2D_DATA_DIR)")
def test_snli_data_and_sts_eval_from_the_shared_folder(tiny_bert, tmp_path, capsys):
    out = tmp_path / "snli"
    assert main(["--model", str(tiny_bert), "--data", "snli", "--eval", "sts16", "--steps", "1", "--batch-size", "4",
                 "--max-length", "16", "--dims", "16,32", "--output-dir", str(out), "--no-progress", "--no-speed"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["sts16"]["size"] == 1186 and len(summary["after"]["sts16"]["metrics"]["spearman"]) == 3
    assert "sts16 spearman (after - before)" in capsys.readouterr().out

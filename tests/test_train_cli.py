"""m2d-train: clear errors for bad arguments (before the model loads), and tiny end-to-end runs."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from train_helpers import write_pairs_jsonl

from m2d_kernels.train import loop
from m2d_kernels.train.cli import build_parser, main
from m2d_kernels.train.data import resolve_data_dir
from m2d_kernels.train.encoder import LayerEncoder

pytest_plugins = ("train_fixtures",)  # the tiny_bert fixture


def _error_of(argv, capsys, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("m2d-train: error: ") and "usage:" not in err, err
    return err


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make loading model weights fail loudly: argument errors must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(LayerEncoder, "from_pretrained", refuse)


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
    assert "--layers [7]: unknown layer(s)" in err and "1..3" in err


def test_dim_larger_than_the_model(tiny_bert, pairs_file, capsys):
    err = _error_of(["--model", str(tiny_bert), "--data", str(pairs_file), "--dims", "8,16,48"], capsys)
    assert "dim 48 is larger than the model's hidden size 32" in err


def test_missing_shared_data_for_sts(tiny_bert, pairs_file, tmp_path, capsys):
    err = _error_of(["--model", str(tiny_bert), "--data", str(pairs_file), "--eval", "stsb-test",
                     "--data-dir", str(tmp_path / "no-data")], capsys)
    assert "data directory not found" in err


def _tiny_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--holdout", "8", "--batch-size", "8", "--steps", "3",
            "--dims", "8,16,32", "--max-length", "16", "--output-dir", str(out), "--device", "cpu", *extra]


@pytest.mark.parametrize("extra, words", [
    (["--max-length", "-5"], "--max-length must be >= 1, got -5"),
    (["--max-length", "0"], "--max-length must be >= 1, got 0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda"),
    (["--backend", "triton"], "--backend triton cannot run on cpu"),
    (["--backend", "fast"], "--backend must be one of"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--layers", ","], "argument --layers: expected comma-separated integers, got ','"),
    (["--epochs", "0", "--steps", "3"], "--epochs must be a finite number > 0"),
    (["--layers-per-step", "0"], "--layers-per-step must be >= 1 or -1"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--scale", "-1"], "--scale must be a finite number > 0"),
    (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1)"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--holdout", "-1"], "--holdout must be >= 0"),
    (["--eval", "stsb-tset"], "unknown set 'stsb-tset'"),
    (["--eval", "heldout,none"], "--eval none cannot be combined"),
    (["--eval", "hf:"], "expected hf:NAME"),
    (["--precision", "fp16"], "fp16 needs a CUDA device"),
    (["--resume"], "--resume: no checkpoint at"),
    (["--layers", "x"], "expected comma-separated integers"),
    (["--dims", "8,,32"], "argument --dims: expected comma-separated integers, got '8,,32'"),
    (["--layers", "1,2,"], "argument --layers: expected comma-separated integers, got '1,2,'"),
    (["--dims", "16,8"], "--dims must be strictly increasing positive ints, got [16, 8]"),
    (["--layers", "1,1"], "--layers must be distinct, got [1, 1]"),
    (["--dims-per-step", "0"], "--dims-per-step must be >= 1 or -1 (all), got 0"),
])
def test_bad_arguments_fail_in_one_line_before_the_model_loads(extra, words, tiny_bert, pairs_file, tmp_path,
                                                               capsys, no_model_loading, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU-only machine: triton cannot run
    args = _tiny_args(tiny_bert, pairs_file, tmp_path / "out")
    # The later value of a repeated option wins in argparse.
    err = _error_of(args + extra, capsys)
    assert words in err, err


def test_output_dir_that_is_a_file_fails_before_training(tiny_bert, pairs_file, tmp_path, capsys, no_model_loading):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _error_of(_tiny_args(tiny_bert, pairs_file, blocker), capsys)
    assert f"--output-dir {blocker}: {blocker} exists and is not a folder" in err
    err = _error_of(_tiny_args(tiny_bert, pairs_file, blocker / "below"), capsys)
    assert "exists and is not a folder" in err


@pytest.mark.parametrize("n_pairs, hint", [(1, "add training pairs, or pass --eval none"),
                                           (40, "pass a smaller --holdout (e.g. --holdout 8) or --eval none")])
def test_holdout_larger_than_the_data_names_the_flags(n_pairs, hint, tiny_bert, tmp_path, capsys, no_model_loading,
                                                      monkeypatch):
    data = write_pairs_jsonl(tmp_path / "few.jsonl", n_pairs)
    monkeypatch.chdir(tmp_path)  # the default output folder, runs/<date-time>, is made here
    args = ["--model", str(tiny_bert), "--data", str(data), "--device", "cpu", "--dims", "8,16,32", "--holdout", "150"]
    err = _error_of(args, capsys)
    assert f"--holdout 150: --data {data} has {n_pairs} example(s)" in err and hint in err, err
    # The run stopped on its data: no empty runs/<date-time>/ is left behind (nor runs/ itself).
    assert not (tmp_path / "runs").exists()


def test_a_data_error_leaves_an_existing_output_parent_alone(tiny_bert, tmp_path, capsys, no_model_loading):
    data = write_pairs_jsonl(tmp_path / "few.jsonl", 1)
    parent = tmp_path / "kept"
    parent.mkdir()
    _error_of(["--model", str(tiny_bert), "--data", str(data), "--device", "cpu", "--dims", "8,16,32",
               "--output-dir", str(parent / "run")], capsys)
    assert parent.is_dir() and not (parent / "run").exists()


def test_non_utf8_data_names_file_and_line(tiny_bert, tmp_path, capsys, no_model_loading):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"anchor": "a", "positive": "b"}\n{"anchor": "caf\xe9", "positive": "b"}\n')
    err = _error_of(_tiny_args(tiny_bert, data, tmp_path / "out"), capsys)
    assert f"{data}:2: not UTF-8" in err, err


def test_help_shows_every_default_once():
    text = build_parser().format_help()
    blocks, current = [], []
    for line in text.split("\n"):
        if line.startswith("  -") and current:
            blocks.append(" ".join(current))
            current = []
        if line.startswith("  -") or (current and line.startswith("    ")):
            current.append(line.strip())
        elif current:
            blocks.append(" ".join(current))
            current = []
    options = [b for b in blocks if not b.startswith("-h,")]
    assert len(options) == len([a for a in build_parser()._actions if a.option_strings]) - 1
    for block in options:
        assert block.count("default") == 1, block
        assert "(default: None)" not in block, block


def test_second_run_on_one_output_dir_is_refused(tiny_bert, pairs_file, tmp_path, capsys, no_model_loading):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from m2d_kernels.train.atomic import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        err = _error_of(_tiny_args(tiny_bert, pairs_file, out), capsys)
        assert "is in use by another run" in err and str(out) in err
    finally:
        holder.kill()
        holder.wait()


def test_non_finite_loss_stops_with_an_error_and_saves_nothing(tiny_bert, pairs_file, tmp_path, capsys,
                                                                monkeypatch):
    real = loop.matryoshka_2d_infonce
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "matryoshka_2d_infonce", poisoned)
    out = tmp_path / "nan"
    err = _error_of(_tiny_args(tiny_bert, pairs_file, out, "--no-progress", "--no-speed"), capsys, code=1)
    assert "NaN or infinite by step 3" in err and "not saved" in err
    assert not (out / "model").exists() and not (out / "summary.json").exists()


def test_tiny_end_to_end_run(tiny_bert, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_tiny_args(tiny_bert, pairs_file, out, "--no-progress")) == 0
    printed = capsys.readouterr().out
    assert "heldout mrr@10 (after - before)" in printed and "reference" in printed and "speed-up" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    grid = summary["after"]["heldout"]["metrics"]["recall@1"]
    assert len(grid) == 3 and len(grid[0]) == 3 and all(0 <= v <= 100 for row in grid for v in row)
    assert summary["loss_speed"]["queries_shape"] == [3, 8, 32] and summary["loss_speed"]["reference_ms"] > 0
    assert (out / "heatmap_heldout.png").is_file() and (out / "model" / "config.json").is_file()
    # Checkpoints only when asked for (--checkpoint-every), and the heat map names the model and the data.
    assert sorted(p.name for p in out.iterdir()) == ["cost.json", "deployed", "heatmap_heldout.png", "model",
                                                     "pareto.png", "pick.json", "summary.json"]
    title = Image.open(out / "heatmap_heldout.png").text["Title"]
    assert title == f"{tiny_bert.name} trained on {pairs_file} (3 steps)"


def test_no_progress_draws_no_bar_and_eval_none_mentions_no_heat_map(tiny_bert, pairs_file, tmp_path, capfd):
    out = tmp_path / "quiet"
    assert main(_tiny_args(tiny_bert, pairs_file, out, "--no-progress", "--no-speed", "--eval", "none")) == 0
    captured = capfd.readouterr()
    assert "it/s" not in captured.err and "%|" not in captured.err, captured.err
    assert "heat map" not in captured.out and "wrote summary.json and the model" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["model", "summary.json"]


def test_resume_continues_a_checkpointed_run_and_checks_its_settings(tiny_bert, pairs_file, tmp_path, capsys):
    out = tmp_path / "resumable"
    args = _tiny_args(tiny_bert, pairs_file, out, "--no-progress", "--no-speed", "--eval", "none",
                      "--checkpoint-every", "2")
    assert main(args + ["--resume-if-present"]) == 0  # no checkpoint yet: starts afresh
    assert loop.load_checkpoint(out / "checkpoint.pt")["step"] == 3
    capsys.readouterr()
    err = _error_of(args + ["--resume", "--batch-size", "4"], capsys)
    assert "was written with other settings (batch_size 8 -> 4)" in err and "checkpoint.pt" in err
    err = _error_of(args + ["--resume", "--lr", "1e-3", "--schedule", "sampled"], capsys)
    assert "schedule 'full_grid' -> 'sampled'" in err and "lr 2e-05 -> 0.001" in err
    assert main(args + ["--resume"]) == 0


@pytest.mark.parametrize("damage, words", [("empty", "is empty"), ("truncated", "is damaged (truncated or corrupted"),
                                           ("garbage", "is not an m2d-train checkpoint"),
                                           ("flipped", "is damaged (truncated or corrupted")])
def test_damaged_checkpoint_is_a_one_line_error_naming_the_file(damage, words, tiny_bert, pairs_file, tmp_path, capsys,
                                                                no_model_loading):
    out = tmp_path / "damaged"
    out.mkdir()
    path = out / "checkpoint.pt"
    config = loop.TrainConfig(model=str(tiny_bert), output_dir=str(out))
    loop.save_checkpoint(path, {"model": {"w": __import__("torch").arange(1000.0)}, "step": 2,
                                "config": __import__("dataclasses").asdict(config)})
    blob = bytearray(path.read_bytes())
    if damage == "empty":
        blob = bytearray()
    elif damage == "truncated":
        blob = blob[:len(blob) // 2]
    elif damage == "garbage":
        blob = bytearray(b"not a checkpoint at all" * 10)
    else:
        blob[-2000] ^= 0x10  # inside the tensor data
    path.write_bytes(bytes(blob))
    err = _error_of(_tiny_args(tiny_bert, pairs_file, out, "--resume"), capsys)
    assert f"checkpoint {path} {words}" in err, err


@pytest.mark.skipif(resolve_data_dir() is None, reason="shared data folder not found (set M2D_DATA_DIR)")
def test_snli_data_and_sts_eval_from_the_shared_folder(tiny_bert, tmp_path, capsys):
    out = tmp_path / "snli"
    assert main(["--model", str(tiny_bert), "--data", "snli", "--eval", "sts16", "--steps", "1", "--batch-size", "4",
                 "--max-length", "16", "--dims", "16,32", "--output-dir", str(out), "--no-progress", "--no-speed"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["sts16"]["size"] == 1186 and len(summary["after"]["sts16"]["metrics"]["spearman"]) == 3
    assert "sts16 spearman (after - before)" in capsys.readouterr().out


def test_hub_training_data_and_sts_evaluation(tiny_bert, tmp_path, capsys, monkeypatch):
    # A stand-in for `datasets` (no network in tests): the CLI must parse NAME:CONFIG:SPLIT and use both loaders.
    from train_helpers import random_sentences

    pytest.importorskip("datasets")  # the CLI checks that it is installed

    class FakeDataset(dict):
        column_names = property(lambda self: list(self))

    anchors, others = random_sentences(24, 1), random_sentences(24, 2)
    requests = []

    def load_dataset(name, config=None, split=None):
        requests.append((name, config, split))
        if name == "sentence-transformers/stsb":
            return FakeDataset(sentence1=anchors[:12], sentence2=others[:12], score=[i / 11 for i in range(12)])
        return FakeDataset(anchor=anchors, positive=[a + " tree" for a in anchors], negative=others)

    fake = type(sys)("datasets")
    fake.load_dataset = load_dataset
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    out = tmp_path / "hub"
    assert main(["--model", str(tiny_bert), "--data", "hf:sentence-transformers/all-nli:triplet:dev",
                 "--eval", "hf:sentence-transformers/stsb:test", "--batch-size", "8", "--steps", "2", "--dims", "16,32",
                 "--max-length", "16", "--output-dir", str(out), "--device", "cpu", "--no-progress",
                 "--no-speed"]) == 0
    assert requests == [("sentence-transformers/all-nli", "triplet", "dev"),
                        ("sentence-transformers/stsb", None, "test")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["hf:sentence-transformers/stsb:test"]["size"] == 12
    assert (out / "heatmap_hf_sentence-transformers_stsb_test.png").is_file()


# --- Files a user keeps: never lost to a typo, never written through a link, clear errors (issue 29) --------


def test_a_fresh_run_never_overwrites_another_run(tiny_bert, pairs_file, tmp_path, capsys):
    out = tmp_path / "finished"
    args = _tiny_args(tiny_bert, pairs_file, out, "--no-progress", "--no-speed", "--eval", "none",
                      "--checkpoint-every", "3")
    assert main(args) == 0
    before = {name: (out / name).stat().st_mtime_ns for name in ("checkpoint.pt", "summary.json")}
    capsys.readouterr()
    err = _error_of(args, capsys)  # the same command again: a typo away from losing the run
    assert f"--output-dir {out} holds another run (checkpoint.pt, model, summary.json)" in err
    assert "--resume" in err and "--resume-if-present" in err and "--overwrite" in err
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before
    assert main(args[:-2] + ["--checkpoint-every", "0", "--overwrite"]) == 0  # asked for: replaced
    assert not (out / "checkpoint.pt").exists(), "a later --resume must not find the replaced run's checkpoint"


@pytest.mark.parametrize("planted", ["model", "summary.json", "checkpoint.pt"])
def test_an_output_path_that_is_a_link_is_refused_before_training(planted, tiny_bert, pairs_file, tmp_path, capsys,
                                                                  no_model_loading):
    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (out / planted).symlink_to(target)
    err = _error_of(_tiny_args(tiny_bert, pairs_file, out, "--overwrite"), capsys)
    assert f"{out / planted} is a symbolic link" in err
    assert list(target.iterdir()) == []


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tiny_bert, pairs_file, tmp_path, capsys,
                                                                            no_model_loading):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model").write_text("a file where the model folder goes")
    err = _error_of(_tiny_args(tiny_bert, pairs_file, out, "--overwrite"), capsys)
    assert f"{out / 'model'} is not a folder" in err
    if os.getuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        err = _error_of(_tiny_args(tiny_bert, pairs_file, locked / "run"), capsys)
        assert f"{locked} is not writable" in err


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tiny_bert, pairs_file, tmp_path,
                                                                               capsys, monkeypatch):
    out = tmp_path / "run"
    args = _tiny_args(tiny_bert, pairs_file, out, "--no-progress", "--no-speed", "--eval", "none",
                      "--checkpoint-every", "1")
    saves = []
    real_fsync = os.fsync

    def fsync(descriptor):  # the second checkpoint finds the disk full
        if os.readlink(f"/proc/self/fd/{descriptor}").rsplit("/", 1)[-1].startswith(".m2d-tmp.checkpoint.pt."):
            saves.append(descriptor)
            if len(saves) == 2:
                raise OSError(28, "No space left on device")
        return real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    err = _error_of(args, capsys, code=1)
    assert f"could not write {out / 'checkpoint.pt'}: No space left on device; its previous version" in err
    assert loop.load_checkpoint(out / "checkpoint.pt")["step"] == 1  # the first one, whole
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # no temporary left behind

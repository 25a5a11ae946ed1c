"""Atomic writes and the output-folder lock, across processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2d_kernels.train import atomic, loop
from m2d_kernels.train.atomic import (
    OutputFolderBusy,
    atomic_directory,
    atomic_write,
    output_lock,
    remove_stale_temporaries,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAVES = 150


def _save_many(target: str, writer: int, start, errors) -> None:
    start.wait()
    for index in range(SAVES):
        def fill(folder: Path, index: int = index) -> None:
            # Two files that must always be seen together: a mixture or a half folder would show.
            (folder / "a.txt").write_text(f"{writer}-{index}")
            (folder / "b.txt").write_text(f"{writer}-{index}")
        try:
            atomic_directory(target, fill)
        except Exception as error:  # recorded, not raised: the parent counts them
            errors.put(f"{type(error).__name__}: {error}")


def test_atomic_directory_with_two_writers_in_two_processes(tmp_path):
    target = tmp_path / "model"
    context = multiprocessing.get_context("spawn")
    start, errors = context.Event(), context.Queue()
    writers = [context.Process(target=_save_many, args=(str(target), w, start, errors)) for w in range(2)]
    for process in writers:
        process.start()
    start.set()
    for process in writers:
        process.join(120)
        assert process.exitcode == 0
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == []
    a, b = (target / "a.txt").read_text(), (target / "b.txt").read_text()
    assert a == b and a.endswith(f"-{SAVES - 1}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or previous folders left


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_atomic_directory_replaces_and_keeps_the_old_version_on_failure(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    target = tmp_path / "out"
    atomic_directory(target, lambda folder: (folder / "x").write_text("1"))
    atomic_directory(target, lambda folder: (folder / "y").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["y"]

    def broken(folder: Path) -> None:
        (folder / "z").write_text("3")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_directory(target, broken)
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_lock_refuses_a_second_holder_and_dies_with_its_holder(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from m2d_kernels.train.atomic import output_lock\n"
         f"with output_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputFolderBusy, match="in use by another run"):
            with output_lock(folder):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel must drop the lock
        holder.wait()
    assert (folder / ".m2d-train.lock").exists()  # left behind by the killed holder
    with output_lock(folder):
        with output_lock(folder):  # re-entrant within one process
            pass
    assert not (folder / ".m2d-train.lock").exists()


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    """Only the names this module creates (``.m2d-tmp.<name>.<8 random characters>.tmp``) are removed."""
    atomic_write(tmp_path / "keep.json", lambda file: file.write(b"{}"))
    (tmp_path / ".m2d-tmp.checkpoint.pt.ab_c1234.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".m2d-tmp.model.xyz0_k9q.tmp").mkdir()
    (tmp_path / ".m2d-tmp.model.xyz0_k9q.tmp" / "weights").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("a user's file")
    (tmp_path / ".my-experiment.tmp").mkdir()  # a user's hidden folders and files of the same suffix
    (tmp_path / ".my-experiment.tmp" / "results.csv").write_text("a user's results")
    (tmp_path / ".draft.abcdefgh.tmp").write_text("a user's draft")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".m2d-tmp.checkpoint.pt.ab_c1234.tmp", ".m2d-tmp.model.xyz0_k9q.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".draft.abcdefgh.tmp", ".my-experiment.tmp", "keep.json",
                                                          "notes.tmp"]
    assert (tmp_path / ".my-experiment.tmp" / "results.csv").read_text() == "a user's results"


def test_output_lock_never_writes_through_a_link(tmp_path):
    """A symbolic link planted as the lock file: the lock refuses it and the link's target is untouched."""
    precious = tmp_path / "precious"
    precious.write_text("a user's data")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".m2d-train.lock").symlink_to(precious)
    with pytest.raises(OSError, match="is a symbolic link"), output_lock(out):
        pass
    assert precious.read_text() == "a user's data"
    assert (out / ".m2d-train.lock").is_symlink()


def test_checkpoint_round_trip_and_checksum(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = {"model": {"w": torch.randn(64, 8)}, "optimizer": {}, "scheduler": {}, "scaler": {}, "rng": {},
             "step": 7, "config": {"lr": 0.1}}
    loop.save_checkpoint(path, state)
    loaded = loop.load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x01  # one bit in the tensor data, which torch.load itself would accept
    path.write_bytes(bytes(blob))
    with pytest.raises(loop.CheckpointError, match=f"checkpoint {path} is damaged"):
        loop.load_checkpoint(path)

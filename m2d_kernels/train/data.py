"""Training and evaluation data: pair/triplet files, Hugging Face datasets, built-in text,
and readers for the public sets in a data folder the user names (``--data-dir`` or ``$M2D_DATA_DIR``).

Training examples are tuples of strings, all of one length: ``(anchor, positive)`` or
``(anchor, positive, negative)``. Scored pairs (STS) are :class:`ScoredPairs`.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

Example = tuple[str, ...]

# Column names accepted in JSONL objects and CSV/TSV headers, in tuple order.
ANCHOR_KEYS = ("anchor", "query", "sentence1", "premise", "question")
POSITIVE_KEYS = ("positive", "document", "sentence2", "entailment", "answer", "pos")
NEGATIVE_KEYS = ("negative", "hard_negative", "contradiction", "neg")

# Standard-library modules whose docstrings make the built-in pairs: real prose written by
# the CPython developers, available offline wherever Python runs.
DOCSTRING_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "multiprocessing",
    "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib",
    "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "sysconfig",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib",
)
MIN_SUMMARY_CHARS = 20
MIN_BODY_CHARS = 60
MAX_BODY_CHARS = 600


@dataclass(frozen=True)
class ScoredPairs:
    """Sentence pairs with gold similarity scores (STS-style evaluation)."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]

    def __post_init__(self) -> None:
        if not (len(self.sentences1) == len(self.sentences2) == len(self.scores)):
            raise ValueError(f"{self.name}: sentences1, sentences2 and scores must have the same length")


# --------------------------------------------------------------------------- files


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Pairs or triplets from a ``.jsonl``, ``.csv`` or ``.tsv`` file.

    JSONL: one object per line with an anchor and a positive key (and optionally a
    negative), e.g. ``{"anchor": ..., "positive": ..., "negative": ...}``, or one list of
    2-3 strings per line. CSV/TSV: a header naming the columns the same way, or no header
    and 2-3 columns. Every row must have the same arity.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        rows = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise ValueError(f"data file must end in .jsonl, .csv or .tsv, got {path.name}")
    if not rows:
        raise ValueError(f"data file {path} holds no examples")
    arities = {len(row) for row in rows}
    if len(arities) != 1 or next(iter(arities)) not in (2, 3):
        raise ValueError(f"{path}: examples must be all pairs or all triplets, got sizes {sorted(arities)}")
    return rows


def _pick(record: dict, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if key in record:
            return str(record[key])
    return None


def _from_record(record: dict, where: str) -> Example:
    anchor, positive = _pick(record, ANCHOR_KEYS), _pick(record, POSITIVE_KEYS)
    if anchor is None or positive is None:
        raise ValueError(f"{where}: needs an anchor ({'/'.join(ANCHOR_KEYS)}) and a positive "
                         f"({'/'.join(POSITIVE_KEYS)}) field, got {sorted(record)}")
    negative = _pick(record, NEGATIVE_KEYS)
    return (anchor, positive) if negative is None else (anchor, positive, negative)


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; ValueError naming the file and line of the first bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {column}); "
                         "convert the file to UTF-8") from None


def _read_jsonl(path: Path) -> list[Example]:
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: invalid JSON ({error.msg})") from error
        if isinstance(record, list):
            rows.append(tuple(str(x) for x in record))
        elif isinstance(record, dict):
            rows.append(_from_record(record, f"{path}:{number}"))
        else:
            raise ValueError(f"{path}:{number}: expected a JSON object or list, got {type(record).__name__}")
    return rows


def _read_delimited(path: Path, delimiter: str) -> list[Example]:
    table = [row for row in csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter) if row]
    if not table:
        return []
    header = [cell.strip().lower() for cell in table[0]]
    known = set(ANCHOR_KEYS + POSITIVE_KEYS + NEGATIVE_KEYS)
    if any(cell in known for cell in header):
        return [_from_record(dict(zip(header, row, strict=False)), f"{path}:{n}") for n, row in enumerate(table[1:], 2)]
    return [tuple(row) for row in table]


def parse_hf_spec(text: str, default_split: str = "train") -> tuple[str, str | None, str]:
    """``hf:NAME``, ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT`` -> (name, config, split)."""
    parts = text.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise ValueError(f"expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT, got {text!r}")
    if len(parts) == 1:
        return parts[0], None, default_split
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def _load_hf_dataset(name: str, config: str | None, split: str):
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as error:
        raise ImportError("loading a Hugging Face dataset needs `datasets`: pip install datasets") from error
    return datasets.load_dataset(name, config, split=split)


def load_hf_examples(name: str, split: str = "train", config: str | None = None,
                     columns: tuple[str, ...] | None = None) -> list[Example]:
    """Pairs or triplets from a Hugging Face dataset (needs ``datasets`` and the network,
    or its local cache), e.g. ``sentence-transformers/all-nli`` with config ``triplet``
    (SNLI + MultiNLI (anchor, positive, negative)). ``columns`` names the 2-3 text
    columns; by default the first columns whose names are in the anchor/positive/negative
    key lists."""
    dataset = _load_hf_dataset(name, config, split)
    if columns is None:
        found = [next((k for k in keys if k in dataset.column_names), None)
                 for keys in (ANCHOR_KEYS, POSITIVE_KEYS, NEGATIVE_KEYS)]
        if found[0] is None or found[1] is None:
            raise ValueError(f"dataset {name}: cannot tell the text columns from {dataset.column_names}; pass columns")
        columns = tuple(c for c in found if c is not None)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset {name} has no columns {missing}; it has {dataset.column_names}")
    return list(zip(*(map(str, dataset[c]) for c in columns), strict=False))


def load_hf_scored_pairs(name: str, split: str = "test", config: str | None = None) -> ScoredPairs:
    """STS-style pairs from a Hugging Face dataset with ``sentence1``, ``sentence2`` and
    ``score`` columns, e.g. ``sentence-transformers/stsb`` (STS Benchmark, scores 0-1)."""
    dataset = _load_hf_dataset(name, config, split)
    missing = [c for c in ("sentence1", "sentence2", "score") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset {name} has no columns {missing} (needs sentence1, sentence2, score); "
                         f"it has {dataset.column_names}")
    return ScoredPairs(f"hf:{name}:{split}", [str(x) for x in dataset["sentence1"]],
                       [str(x) for x in dataset["sentence2"]], [float(x) for x in dataset["score"]])


# --------------------------------------------------------------------------- built-in text


def _split_docstring(doc: str) -> tuple[str, str] | None:
    """(summary, body) of a docstring: the first paragraph and the prose after it."""
    paragraphs = [" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if len(paragraphs) < 2:
        return None
    summary, body = paragraphs[0], " ".join(paragraphs[1:])[:MAX_BODY_CHARS]
    if len(summary) < MIN_SUMMARY_CHARS or len(body) < MIN_BODY_CHARS or ">>>" in body[:40]:
        return None
    return summary, body


def docstring_pairs(modules: tuple[str, ...] = DOCSTRING_MODULES) -> list[Example]:
    """(summary sentence, rest of the docstring) pairs from the Python standard library.

    Real text that nobody in this project wrote, available offline. The order is fixed
    (module list, then names sorted) and duplicates are dropped, so a Python version
    always yields the same list.
    """
    pairs, seen = [], set()
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # e.g. a Python built without sqlite3 or ssl
            continue
        objects = [module] + [getattr(module, name) for name in sorted(vars(module)) if not name.startswith("_")]
        for obj in objects:
            if inspect.ismodule(obj) and obj is not module:
                continue
            members = [obj] + ([getattr(obj, n, None) for n in sorted(vars(obj)) if not n.startswith("_")]
                               if inspect.isclass(obj) else [])
            for member in members:
                doc = member.__doc__ if isinstance(getattr(member, "__doc__", None), str) else None
                pair = _split_docstring(doc) if doc else None
                if pair and pair[0] not in seen:
                    seen.add(pair[0])
                    pairs.append(pair)
    return pairs


def split_holdout(examples: list[Example], holdout: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded shuffle, the last ``holdout`` examples held out."""
    import random

    if not 0 < holdout < len(examples):
        raise ValueError(f"holdout must be in (0, {len(examples)}), got {holdout}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:-holdout]], [examples[i] for i in order[-holdout:]]


# --------------------------------------------------------------------------- the user's data folder


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data folder of the public sets (snli/, stsbenchmark/, sick/, sts12-16/): the argument, else
    ``$M2D_DATA_DIR``; None when neither names one (the callers then use the built-in pairs or the Hub).

    There is no default folder: the data are the user's, named by the user. A name that is not a
    folder is a ``FileNotFoundError`` (a mistyped variable must not fall back to other data)."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"data directory not found: {path}")
        return path
    if os.environ.get("M2D_DATA_DIR"):
        path = Path(os.environ["M2D_DATA_DIR"])
        if not path.is_dir():
            raise FileNotFoundError(f"data directory not found: {path} (from $M2D_DATA_DIR)")
        return path
    return None


def _required(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def _lines(path: Path) -> list[str]:
    return read_text(_required(path)).splitlines()


def read_snli_triplets(data_dir: str | os.PathLike, splits: tuple[str, ...] = ("dev", "test")) -> list[Example]:
    """(premise, entailed hypothesis, contradicting hypothesis) triplets from SNLI.

    Lines are aligned across ``s1.<split>``, ``s2.<split>``, ``labels.<split>``; each
    premise takes its first entailment and its first contradiction.
    """
    triplets = []
    for split in splits:
        root = Path(data_dir) / "snli"
        premises, hypotheses, labels = (_lines(root / f"{name}.{split}") for name in ("s1", "s2", "labels"))
        if not len(premises) == len(hypotheses) == len(labels):
            raise ValueError(f"{root}: s1/s2/labels.{split} have different line counts")
        by_premise: dict[str, dict[str, str]] = {}
        for premise, hypothesis, label in zip(premises, hypotheses, labels, strict=True):
            by_premise.setdefault(premise.strip(), {}).setdefault(label.strip(), hypothesis.strip())
        triplets += [(p, h["entailment"], h["contradiction"]) for p, h in by_premise.items()
                     if "entailment" in h and "contradiction" in h]
    return triplets


SNLI_HUB_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}  # stanfordnlp/snli; -1: no gold label


def load_hf_snli_triplets(splits: tuple[str, ...] = ("validation", "test"),
                          name: str = "stanfordnlp/snli") -> list[Example]:
    """:func:`read_snli_triplets` on the Hugging Face copy of SNLI (``validation`` is the dev
    split; needs ``datasets`` and the network or its cache). The text is the original,
    untokenised one, so the triplets differ from the data folder's in spacing only."""
    triplets = []
    for split in splits:
        dataset = _load_hf_dataset(name, None, split)
        by_premise: dict[str, dict[str, str]] = {}
        for premise, hypothesis, label in zip(dataset["premise"], dataset["hypothesis"], dataset["label"],
                                              strict=True):
            if label in SNLI_HUB_LABELS:
                by_premise.setdefault(premise.strip(), {}).setdefault(SNLI_HUB_LABELS[label], hypothesis.strip())
        triplets += [(p, h["entailment"], h["contradiction"]) for p, h in by_premise.items()
                     if "entailment" in h and "contradiction" in h]
    return triplets


def read_sts_benchmark(data_dir: str | os.PathLike, split: str = "test") -> ScoredPairs:
    """STS Benchmark ``sts-<split>.csv``: tab-separated, the first 7 fields, no quoting."""
    first, second, scores = [], [], []
    for line in _lines(Path(data_dir) / "stsbenchmark" / f"sts-{split}.csv"):
        fields = line.split("\t")
        if len(fields) >= 7:
            scores.append(float(fields[4]))
            first.append(fields[5])
            second.append(fields[6])
    return ScoredPairs(f"stsb-{split}", first, second, scores)


SICK_FILES = {"train": "SICK_train.txt", "trial": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}


def read_sick(data_dir: str | os.PathLike, split: str = "test") -> ScoredPairs:
    """SICK relatedness (1-5): tab-separated with a header row."""
    if split not in SICK_FILES:
        raise ValueError(f"SICK split must be one of {sorted(SICK_FILES)}, got {split!r}")
    lines = _lines(Path(data_dir) / "sick" / SICK_FILES[split])
    header = lines[0].split("\t")
    a, b, s = header.index("sentence_A"), header.index("sentence_B"), header.index("relatedness_score")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return ScoredPairs(f"sick-{split}", [r[a] for r in rows], [r[b] for r in rows], [float(r[s]) for r in rows])


def read_sts_year(data_dir: str | os.PathLike, year: int) -> ScoredPairs:
    """STS 20<year> (12-16) English test sets, all sub-sets together; unscored pairs skipped."""
    root = Path(data_dir) / "sts12-16" / f"STS{year}-en-test"
    if not root.is_dir():
        raise FileNotFoundError(f"STS{year} folder not found: {root}")
    first, second, scores = [], [], []
    for gold_path in sorted(root.glob("STS.gs.*.txt")):
        subset = gold_path.name[len("STS.gs."):-len(".txt")]
        inputs = root / f"STS.input.{subset}.txt"
        # "ALL" is STS12's concatenation of the other files; STS13 "SMT" ships gold scores
        # without its (licensed) sentences.
        if subset == "ALL" or not inputs.is_file():
            continue
        gold = _lines(gold_path)
        pairs = _lines(inputs)
        for score, pair in zip(gold, pairs, strict=False):
            if score.strip():
                fields = pair.split("\t")
                first.append(fields[0])
                second.append(fields[1])
                scores.append(float(score))
    return ScoredPairs(f"sts{year}", first, second, scores)


SHARED_EVAL_SETS = ("stsb-train", "stsb-dev", "stsb-test", "sick-train", "sick-trial", "sick-test", "sts12", "sts13",
                    "sts14", "sts15", "sts16")


def load_scored_pairs(name: str, data_dir: str | os.PathLike) -> ScoredPairs:
    """A named STS evaluation set: ``stsb-{train,dev,test}``, ``sick-{train,trial,test}``, ``sts12``..``sts16``."""
    if name.startswith("stsb-"):
        return read_sts_benchmark(data_dir, name[len("stsb-"):])
    if name.startswith("sick-"):
        return read_sick(data_dir, name[len("sick-"):])
    if name in {f"sts{y}" for y in range(12, 17)}:
        return read_sts_year(data_dir, int(name[3:]))
    raise ValueError(f"unknown evaluation set {name!r}; expected stsb-<split>, sick-<split> or sts12..sts16")

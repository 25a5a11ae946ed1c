"""Pytest plugin for the training tests: ``pytest_plugins = ("train_fixtures",)``."""

from pathlib import Path

import pytest
from train_helpers import make_tiny_bert


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """The folder of a 3-layer, 32-wide random BERT and its tokenizer, built once per session."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))

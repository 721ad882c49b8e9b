"""Fixtures of the fine-tuning tests: the tiny random toy DiT saved once per test module."""

import pytest
from finetune_fixtures import tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A folder holding :func:`finetune_fixtures.tiny_model` (``save_pretrained``), loadable by path."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_model().save_pretrained(path)
    return path

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tok():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_dir(tmp_path):
    from tiny import tiny_model_dir

    return tiny_model_dir(tmp_path / "tiny-model")

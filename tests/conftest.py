from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import tiny


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.tiny_tokenizer()


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three random adapters of different ranks, alphas and target sets on ``tiny_model()``."""
    root = tmp_path_factory.mktemp("adapters")
    model = tiny.tiny_model()
    tiny.random_adapter(model, root / "a", r=4, alpha=8, targets=("q_proj", "v_proj"), seed=1)
    tiny.random_adapter(
        model, root / "b", r=8, alpha=4, targets=("q_proj", "k_proj", "o_proj", "down_proj"), seed=2
    )
    tiny.random_adapter(
        model,
        root / "c",
        r=2,
        alpha=2,
        targets=("q_proj", "up_proj"),
        seed=3,
        use_rslora=True,
        layers=[1],
    )
    return root


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """One adapter trained per task in ``tiny.TASKS`` on ``tiny_model()``."""
    root = tmp_path_factory.mktemp("trained")
    model = tiny.tiny_model()
    for task in tiny.TASKS:
        tiny.train_adapter(model, tokenizer, task, root / task)
    return root


@pytest.fixture()
def engine(tokenizer, adapter_dir):
    from logo_engine import LoGoEngine

    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()

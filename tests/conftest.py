from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and OpenMP threads spin-wait: on a machine whose
# cores are busy with other jobs, 2 threads made a 40-step training 30x slower than 1 thread
# (23.6 s vs 0.73 s, measured on the 2-core dev machine with two busy loops beside it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import tiny
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One adapter trained per task in ``tiny.TASKS`` on ``tiny_model()`` (cached on disk).

    A private copy, so that no test can change the shared cache.
    """
    root = tmp_path_factory.mktemp("trained") / "library"
    shutil.copytree(tiny.trained_library(), root)
    return root


@pytest.fixture()
def engine(tokenizer, adapter_dir):
    from logo_engine import LoGoEngine

    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()


# ------------------------------------------------------------ in-process and remote modes
# Integration tests marked with `both_modes` run twice: over the engine itself ("local"), and
# over the same engine served by `logo serve` on 127.0.0.1 (the model object built with
# base_url=, so every call crosses HTTP through RemoteEngine). Markers: see `remote.py`.
@pytest.fixture()
def mode(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "local")


@pytest.fixture()
def serve():
    """``serve(engine) -> base_url``: the engine behind a live server for this test."""
    from logo_engine.serving.server import BackgroundServer

    servers: dict[int, BackgroundServer] = {}

    def start(engine) -> str:
        if id(engine) not in servers:
            servers[id(engine)] = BackgroundServer(engine)
        return servers[id(engine)].base_url

    yield start
    for server in servers.values():
        server.stop()

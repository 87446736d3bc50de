"""End to end on the embedded SmolLM2-135M-Instruct and the shipped zoo (``pytest -m slow``)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

tasks = pytest.importorskip("benchmarks.zoo.tasks")

# Measured 2026-11-29 on the first zoo: calibrated top-1 = 0.92 over 11 tasks x 8 test prompts
# (raw norm: 0.50); on the shipped zoo the quick benchmark measured 0.94 (raw 0.53).
MIN_TOP1 = 0.8


@pytest.fixture(scope="module")
def zoo_engine():
    from logo_engine import LoGoEngine

    return LoGoEngine.from_pretrained(progress=False)


def test_default_model_converts_once_into_the_cache(tmp_path, monkeypatch):
    from logo_engine.models import default_model_dir, load_base_model

    monkeypatch.setenv("LOGO_CACHE_DIR", str(tmp_path))
    folder = default_model_dir()
    assert folder.parent == tmp_path and (folder / "config.json").is_file()
    start = time.perf_counter()
    model, tokenizer = load_base_model()
    assert time.perf_counter() - start < 30  # a plain HF folder now, no GGUF dequantisation
    assert tokenizer.chat_template and model.config.num_hidden_layers == 30


def test_zoo_loads_with_its_calibration(zoo_engine):
    assert sorted(zoo_engine.adapter_names) == sorted(tasks.LIBRARY_TASKS)
    assert {c.signal for c in zoo_engine.calibrations} == {"norm", "entropy"}
    assert zoo_engine.route("Sort these numbers: 4, 1, 3").calibrated


def test_trained_adapters_route_to_their_own_task(zoo_engine):
    """Top-1 routing on unseen test prompts of every library task (calibrated, the default)."""
    from logo_engine import RoutingConfig

    routing = RoutingConfig(top_k=1)
    per_task = {}
    for task in tasks.LIBRARY_TASKS:
        prompts = [ex.prompt for ex in tasks.TASKS[task].make_split("test", 6, seed=1)]
        sels = zoo_engine.route_batch(prompts, routing=routing)
        per_task[task] = sum(s.adapters[0] == task for s in sels) / len(sels)
    mean = sum(per_task.values()) / len(per_task)
    assert mean >= MIN_TOP1, per_task
    assert sum(v >= 0.5 for v in per_task.values()) >= len(per_task) - 2, per_task


def test_routed_answer_does_the_task(zoo_engine):
    """The routed top-1 adapter answers like the task's own adapter, and unlike the base model."""
    from logo_engine import RoutingConfig

    for task in ("sql", "date_format", "sentiment"):
        ex = tasks.TASKS[task].make_split("test", 1, seed=2)[0]
        routed = zoo_engine.generate(ex.prompt, max_new_tokens=40, routing=RoutingConfig(top_k=1))
        assert routed.selection.adapters == [task]
        own = zoo_engine.generate(ex.prompt, max_new_tokens=40, adapters={task: 1.0})
        assert routed.text == own.text
        assert tasks.TASKS[task].score(routed.text, ex.answer) == 1.0, (routed.text, ex.answer)


def test_cli_route_and_generate_json():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "logo_engine.cli",
            "route",
            "Rewrite 2021-03-05? no: March 5, 2021",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    from logo_engine import Selection

    selection = Selection.model_validate_json(out.stdout)
    assert len(selection.adapters) == 3 and sum(selection.weights) == pytest.approx(1.0)

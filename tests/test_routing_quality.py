"""Helpers of benchmarks/routing_quality.py: fast checks on tensors and the tiny engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.baselines import retriever_mixtures
from benchmarks.routing_quality import (
    Calibration,
    EvalTask,
    calibrated_mixtures,
    generate_pinned,
    hit_rate,
    length_batches,
    logo_mixtures,
    mix_key,
    probe_scores,
    spearman,
    update_doc,
)
from benchmarks.zoo.tasks import Example
from logo_engine import RoutingConfig

NAMES = ["a", "b", "c", "d"]


def test_calibration_standardises_each_adapter():
    scores = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]])
    z = Calibration.fit(scores).z(scores)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(2), atol=1e-6, rtol=0)


def test_calibrated_mixture_ranks_by_z_and_weighs_by_raw():
    raw = torch.tensor([[9.0, 2.0, 1.0, 0.5]])
    z = torch.tensor([[-1.0, 2.0, 1.0, 0.0]])  # "a" has the largest raw score, lowest z
    (mix,) = calibrated_mixtures(raw, z, NAMES, k=2)
    assert list(mix) == ["b", "c"]
    assert mix["b"] == pytest.approx(2 / 3) and mix["c"] == pytest.approx(1 / 3)


def test_logo_mixtures_are_the_engine_selection():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0], [5.0, 1.0, 1.0, 1.0]])
    first, second = logo_mixtures(scores, NAMES, k=2, signal="norm")
    assert first == pytest.approx({"b": 4 / 7, "c": 3 / 7})
    assert list(first) == ["b", "c"]
    assert next(iter(second)) == "a" and len(second) == 2
    assert len(logo_mixtures(scores, NAMES, k=9, signal="norm")[0]) == 4  # k clamps to the library


def test_hit_rate_top1_and_top3():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    assert hit_rate(scores, NAMES, ["a"], 1) == 0.5
    assert hit_rate(scores, NAMES, ["a"], 3) == 0.5
    assert hit_rate(scores, NAMES, ["b"], 3) == 1.0
    assert hit_rate(scores, NAMES, [], 1) != hit_rate(scores, NAMES, [], 1)  # nan


def test_mix_key_ignores_order_zeros_and_rounding_noise():
    assert mix_key({"a": 0.5, "b": 0.5}) == mix_key({"b": 0.5 + 1e-9, "a": 0.5, "c": 0.0})
    assert mix_key({}) == ()
    assert mix_key({"a": 1.0}) != mix_key({"b": 1.0})


def test_length_batches_cover_every_index_once():
    batches = length_batches([3, 9, 1, 7, 5], 2)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert batches[0] == [1, 3] and all(len(b) <= 2 for b in batches)


def test_retriever_mixture_is_uniform_top_k():
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert retriever_mixtures(sim, NAMES, 3) == [{"b": 1 / 3, "d": 1 / 3, "c": 1 / 3}]


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) == pytest.approx(0.0)


def test_update_doc_replaces_only_its_block(tmp_path: Path):
    doc = tmp_path / "doc.md"
    update_doc(doc, "quick", "first")
    doc.write_text(doc.read_text() + "\nhand-written notes\n")
    update_doc(doc, "full", "full results")
    update_doc(doc, "quick", "second")
    text = doc.read_text()
    assert "second" in text and "first" not in text
    assert "hand-written notes" in text and "full results" in text


def test_probe_scores_match_the_engine_route(engine):
    prompts = ["hello there", "a much longer prompt with many more words in it", "x"]
    scores = probe_scores(engine, prompts, batch_size=2)
    for signal in ("norm", "entropy"):
        sels = engine.route_batch(prompts, routing=RoutingConfig(top_k=1, signal=signal))
        want = torch.tensor([[s.scores[n] for n in engine.adapter_names] for s in sels])
        torch.testing.assert_close(scores[signal], want, rtol=1e-4, atol=1e-6)


def test_generate_pinned_dedupes_and_matches_single_calls(engine):
    task = EvalTask(
        name="t",
        held_out=False,
        targets=("a",),
        examples=[Example("one two", "x"), Example("three four five", "y")],
        max_new_tokens=4,
    )
    mixtures = {
        "base": [{}, {}],
        "oracle": [{"a": 1.0}, {"a": 1.0}],
        "same_as_oracle": [{"a": 1.0}, {"a": 1.0}],
        "mix": [{"a": 0.5, "b": 0.5}, {"c": 1.0}],
    }
    answers, distinct = generate_pinned(engine, task, mixtures, batch_size=3)
    assert distinct == 6
    assert answers["oracle"] == answers["same_as_oracle"]
    for method, rows in mixtures.items():
        for row, mixture in enumerate(rows):
            solo = engine.generate(task.prompts[row], adapters=mixture, max_new_tokens=4)
            assert answers[method][row] == solo.text

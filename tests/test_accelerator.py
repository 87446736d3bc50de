"""The engine on an accelerator gives the CPU's numbers: mixtures, probes, batches, caches, streams.

The module runs on ``LOGO_TEST_DEVICE``, by default ``cuda`` when torch sees a CUDA device, and is
skipped otherwise. ``LOGO_TEST_DEVICE=cpu python -m pytest tests/test_accelerator.py`` runs it on
the CPU, which checks the tests themselves. On a GPU machine without the embedded model (these
tests need only the tiny model and peft), run it as ``python -m pytest -m accelerator``.

Oracles: peft's own layers on the CPU (mixed logits), the same engine on the CPU (scores), and the
device's own solo and uncached answers (batched rows, prefix caches, streams).
"""

from __future__ import annotations

import os

import pytest
import tiny
import torch
from test_exactness import _peft_model

from logo_engine import LoGoEngine, PrefixCacheConfig, RoutingConfig
from logo_engine.mixture import ForwardContext, MixturePlan, forward_context
from logo_engine.routing import pinned_selection

DEVICE = os.environ.get("LOGO_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [
    pytest.mark.accelerator,
    pytest.mark.skipif(DEVICE is None, reason="no accelerator (set LOGO_TEST_DEVICE to force one)"),
]

PROMPTS = ["abc de 123 + hello", "reverse abc please", "what is 2 + 3", "hi there 1 2 3 4 5"]
# float32 on a GPU: cuBLAS and the CPU sum in other orders (TF32 stays off, torch's default).
TOL = {"atol": 1e-4, "rtol": 1e-4}


def _engine(tokenizer, adapter_dir, device, **kwargs) -> LoGoEngine:
    model = tiny.tiny_model().to(device)
    return LoGoEngine(model, tokenizer, adapters=adapter_dir, name="tiny-llama", **kwargs)


@pytest.fixture()
def dev_engine(tokenizer, adapter_dir):
    eng = _engine(tokenizer, adapter_dir, DEVICE)
    yield eng
    eng.close()


def test_the_engine_and_its_adapters_live_on_the_device(dev_engine):
    want = torch.device(DEVICE).type
    assert {p.device.type for p in dev_engine.model.parameters()} == {want}
    plan = MixturePlan.build(
        dev_engine.library, [pinned_selection({"a": 0.5, "b": 0.5}, dev_engine.adapter_names)]
    )
    assert plan is not None
    assert {m.a_cat.device.type for m in plan.modules.values()} == {want}


@pytest.mark.parametrize("rows", [1, 2])
def test_mixed_logits_match_peft_on_the_cpu(dev_engine, adapter_dir, rows):
    mixture = {"a": 0.2, "b": 0.5, "c": 0.3}
    ids = torch.randint(3, 400, (2, 11), generator=torch.Generator().manual_seed(0))
    oracle = _peft_model(adapter_dir, list(mixture), list(mixture.values()))
    with torch.inference_mode():
        expected = oracle(input_ids=ids).logits
    selections = [pinned_selection(mixture, dev_engine.adapter_names)] * rows
    plan = MixturePlan.build(dev_engine.library, selections)  # rows > 1: the per-row path
    with torch.inference_mode(), forward_context(ForwardContext(plan=plan)):
        got = dev_engine.model(input_ids=ids.to(DEVICE)).logits
    torch.testing.assert_close(got.cpu(), expected, **TOL)


@pytest.mark.parametrize("signal", ["norm", "entropy"])
def test_probe_scores_match_the_cpu(dev_engine, tokenizer, adapter_dir, signal):
    routing = RoutingConfig(top_k=2, signal=signal)
    cpu = _engine(tokenizer, adapter_dir, "cpu")
    try:
        for prompt in PROMPTS:
            want = cpu.route(prompt, routing=routing)
            got = dev_engine.route(prompt, routing=routing)
            assert got.scores.keys() == want.scores.keys()
            for name, score in want.scores.items():
                assert got.scores[name] == pytest.approx(score, rel=1e-4, abs=1e-6)
            assert got.adapters == want.adapters
    finally:
        cpu.close()


def test_batched_rows_equal_their_solo_answers(dev_engine):
    """A packed prompt pass and padded decoding steps on the device, each row as alone."""
    batch = dev_engine.generate_batch(PROMPTS, max_new_tokens=8)
    for prompt, got in zip(PROMPTS, batch, strict=True):
        alone = dev_engine.generate(prompt, max_new_tokens=8)
        assert got.text == alone.text
        assert got.selection.adapters == alone.selection.adapters


def test_prefix_caches_reuse_and_match_an_uncached_run(tokenizer, adapter_dir):
    cached = _engine(tokenizer, adapter_dir, DEVICE)
    uncached = _engine(tokenizer, adapter_dir, DEVICE, prefix_cache=PrefixCacheConfig.off())
    first = [{"role": "user", "content": "what is 2 + 3"}]
    second = [*first, {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 4?"}]
    pinned = {"a": 0.6, "b": 0.4}  # one mixture for both turns: the prefill cache applies
    try:
        for engine in (cached, uncached):
            engine.route(first)  # a probe of the first turn (pinned mixtures need none)
            engine.generate(first, max_new_tokens=4, adapters=pinned)
        got = cached.generate(second, max_new_tokens=8, adapters=pinned)
        want = uncached.generate(second, max_new_tokens=8, adapters=pinned)
        assert got.usage.cached_tokens > 0
        assert got.text == want.text
        routed = cached.route(second)  # the probe cache holds the first turn's prefix
        assert routed.probe_cached_tokens > 0
        assert routed.adapters == uncached.route(second).adapters
    finally:
        cached.close()
        uncached.close()


def test_a_stream_is_the_generation(dev_engine):
    stream = dev_engine.stream(PROMPTS[1], max_new_tokens=8)
    assert stream.selection is not None
    text = "".join(stream)
    assert text == dev_engine.generate(PROMPTS[1], max_new_tokens=8).text


def test_a_bfloat16_probe_routes_within_its_rounding(tokenizer, adapter_dir):
    bf16 = _engine(tokenizer, adapter_dir, DEVICE, probe_dtype=torch.bfloat16)
    fp32 = _engine(tokenizer, adapter_dir, DEVICE)
    try:
        for prompt in PROMPTS:
            got, want = bf16.route(prompt), fp32.route(prompt)
            for name, score in want.scores.items():
                assert got.scores[name] == pytest.approx(score, rel=0.05)
            assert bf16.generate(prompt, max_new_tokens=4).text  # generation runs in float32
    finally:
        bf16.close()
        fp32.close()

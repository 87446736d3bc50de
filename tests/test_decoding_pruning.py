"""Finished rows leave the decoding batch; the rows that remain decode exactly as alone.

Oracle: each row generated alone (greedy, and seeded sampling: every row has its own generator
seeded alike). The batch sizes of the forwards are read by a hook on the model.
"""

from __future__ import annotations

import pytest
import tiny

from logo_engine import LoGoEngine
from logo_engine.base import RowState, SamplingParams, _Run

PROMPTS = [p for t in tiny.TASKS.values() for p in t.prompts(2, seed=31)]


@pytest.fixture(scope="module")
def engine(tokenizer, adapter_dir):
    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()


@pytest.fixture()
def batch_sizes(engine):
    engine.clear_prefix_caches()  # a cached probe runs no forward: the counts assume one
    sizes: list[int] = []

    handle = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(tiny.forward_rows(kwargs["input_ids"].shape[0])),
        with_kwargs=True,
    )
    yield sizes
    handle.remove()


def test_rows_that_stop_early_leave_the_batch_and_the_others_are_unchanged(engine, batch_sizes):
    # Stop strings make rows finish at different steps; mixtures differ per row.
    stops = ["a", "b", "c", "0", "1", "+"]
    mixtures = [None, {"a": 1.0}, None, {"b": 0.5, "c": 0.5}, {}, None]
    batch = engine.generate_batch(PROMPTS, max_new_tokens=24, stop=stops, adapters=mixtures)
    decode_sizes = batch_sizes[1:]  # the first forward is the probe
    for prompt, mixture, got in zip(PROMPTS, mixtures, batch, strict=True):
        solo = engine.generate(prompt, max_new_tokens=24, stop=stops, adapters=mixture)
        assert got.text == solo.text
        assert got.finish_reason == solo.finish_reason
        assert got.usage.model_dump(exclude={"cached_tokens"}) == solo.usage.model_dump(
            exclude={"cached_tokens"}
        )
    lengths = [g.usage.completion_tokens for g in batch]
    assert min(lengths) < max(lengths)  # the test exercises pruning
    assert decode_sizes[0] == len(PROMPTS) > decode_sizes[-1]
    assert decode_sizes == sorted(decode_sizes, reverse=True)


@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}], ids=["greedy", "seeded"]
)
def test_rows_with_their_own_limits_equal_their_solo_results(engine, batch_sizes, sampling):
    limits = [3, 20, 7, 1, 12, 20]
    requests = [engine._prepare(p, None, None) for p in PROMPTS]
    rows = [
        RowState(text=r.response_prefix, max_new_tokens=n)
        for r, n in zip(requests, limits, strict=True)
    ]
    params = SamplingParams(max_new_tokens=max(limits), **sampling)
    run = _Run(engine, requests, [None] * len(PROMPTS), params, engine.routing, rows=rows)
    batch = run.run()
    for prompt, limit, got in zip(PROMPTS, limits, batch, strict=True):
        solo = engine.generate(prompt, max_new_tokens=limit, **sampling)
        assert got.text == solo.text
        assert got.finish_reason == solo.finish_reason
        assert got.usage.model_dump(exclude={"cached_tokens"}) == solo.usage.model_dump(
            exclude={"cached_tokens"}
        )
    decode_sizes = batch_sizes[1 : 1 + max(limits)]  # the probe first, then this run's steps
    assert decode_sizes[0] == len(PROMPTS) > decode_sizes[-1]
    assert decode_sizes == sorted(decode_sizes, reverse=True)

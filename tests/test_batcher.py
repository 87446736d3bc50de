"""The dynamic batcher without HTTP: batches, per-row limits and stops, keys, cancellation.

Oracle: each row's solo ``engine.generate`` (greedy decoding is deterministic).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import tiny

from logo_engine import LoGoEngine
from logo_engine.base import SamplingParams
from logo_engine.serving.batcher import Batcher, Delta, Finished, Job, Selected, run_batch
from logo_engine.testing import ScriptedEngine

PROMPTS = [p for t in tiny.TASKS.values() for p in t.prompts(2, seed=21)]


@pytest.fixture(scope="module")
def engine(tokenizer, adapter_dir):
    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()


def job(engine, prompt: Any, loop, *, mixture=None, **params: Any) -> Job:
    request = engine._prepare(prompt, None, None)
    return Job(request, mixture, engine.routing, SamplingParams(**params), loop)


async def drain(j: Job) -> tuple[list[Any], str]:
    events = [e async for e in j.stream()]
    return events, "".join(e.text for e in events if isinstance(e, Delta))


async def test_one_batch_rows_keep_their_own_limits_stops_and_mixtures(engine):
    loop = asyncio.get_running_loop()
    specs = [
        dict(max_new_tokens=3),
        dict(max_new_tokens=12, stop=("a",)),
        dict(max_new_tokens=7),
        dict(max_new_tokens=12),
    ]
    mixtures = [None, None, {"b": 1.0}, {}]
    jobs = [
        job(engine, p, loop, mixture=m, **s)
        for p, m, s in zip(PROMPTS[:4], mixtures, specs, strict=True)
    ]
    await asyncio.to_thread(run_batch, engine, jobs)
    for j, prompt, mixture, spec in zip(jobs, PROMPTS[:4], mixtures, specs, strict=True):
        events, streamed = await drain(j)
        assert isinstance(events[0], Selected) and isinstance(events[-1], Finished)
        solo = engine.generate(
            prompt,
            adapters=mixture,
            max_new_tokens=spec["max_new_tokens"],
            stop=list(spec.get("stop", ())) or None,
        )
        got = events[-1].generation
        assert got.text == solo.text == streamed
        assert got.finish_reason == solo.finish_reason
        # the prefill cache may serve a repeat: counts equal, cached_tokens may not
        assert got.usage.model_dump(exclude={"cached_tokens"}) == solo.usage.model_dump(
            exclude={"cached_tokens"}
        )
        assert got.selection.adapters == solo.selection.adapters
        assert got.selection.weights == pytest.approx(solo.selection.weights)


async def test_the_batcher_groups_by_sampling_key_and_bounds_the_batch(engine):
    loop = asyncio.get_running_loop()
    sizes: list[int] = []

    class Observer:
        def batch_started(self, size, waits):
            sizes.append(size)

        def row_finished(self, generation):
            pass

        def row_cancelled(self):
            pass

        def rows_joined(self, waits):
            sizes.append(-len(waits))  # none: a job of another key waits, or the batch is full

    batcher = Batcher(engine, max_batch_size=3, batch_wait_ms=300, observer=Observer())
    try:
        greedy = [job(engine, p, loop, max_new_tokens=4) for p in PROMPTS[:4]]
        sampled = [
            job(engine, p, loop, max_new_tokens=4, temperature=0.7, seed=1) for p in PROMPTS[4:6]
        ]
        for j in [greedy[0], sampled[0], *greedy[1:], sampled[1]]:
            batcher.submit(j)
        results = await asyncio.gather(*(drain(j) for j in greedy + sampled))
    finally:
        await asyncio.to_thread(batcher.close)
    assert sorted(sizes) == [1, 2, 3]  # greedy: 3 + 1 (bounded), sampled: 2 (own key)
    for j, (events, _) in zip(greedy + sampled, results, strict=True):
        solo = engine.generate(
            PROMPTS[(greedy + sampled).index(j)],
            max_new_tokens=4,
            temperature=j.params.temperature,
            seed=j.params.seed,
        )
        assert events[-1].generation.text == solo.text


class SlowEngine(ScriptedEngine):
    """One word per step, 5 ms a step."""

    def _decode(self, requests, selections, params, rows):
        for _ in super()._decode(requests, selections, params, rows):
            time.sleep(0.005)
            yield


async def test_a_cancelled_job_stops_and_a_job_cancelled_in_the_queue_never_runs():
    engine = SlowEngine([" ".join(["w"] * 300)], adapter_names=("x", "y"))
    loop = asyncio.get_running_loop()
    batcher = Batcher(engine, max_batch_size=4, batch_wait_ms=100)
    try:
        running = job(engine, "go", loop, max_new_tokens=300)
        queued = job(engine, "never", loop, max_new_tokens=300, temperature=0.5, seed=1)
        queued.cancel()
        batcher.submit(running)
        batcher.submit(queued)
        first = await running.events.get()
        assert isinstance(first, Selected)
        await running.events.get()  # the first words arrive
        running.cancel()
        await asyncio.sleep(0.3)
        seen = sum(1 for c in engine.calls if c["messages"][-1]["content"] == "never")
        assert seen == 0
        # no Finished event after the cancel; the row produced a bounded number of deltas
        pending = []
        while not running.events.empty():
            pending.append(running.events.get_nowait())
        assert not any(isinstance(e, Finished) for e in pending)
        assert len(pending) < 100  # it stopped long before its 300 words
    finally:
        await asyncio.to_thread(batcher.close)


async def test_an_engine_error_fails_every_row_of_its_batch(engine):
    class Broken(ScriptedEngine):
        def _decode(self, requests, selections, params, rows):
            yield
            raise RuntimeError("boom")

    broken = Broken(adapter_names=("x",))
    loop = asyncio.get_running_loop()
    jobs = [job(broken, p, loop, max_new_tokens=5) for p in ("a b", "c d")]
    await asyncio.to_thread(run_batch, broken, jobs)
    for j in jobs:
        events, _ = await drain(j)
        assert str(events[-1].error) == "boom"

"""Continuous batching: rows that join a batch while it decodes.

Oracles: each row's solo ``engine.generate`` (greedy and seeded sampling are deterministic), the
per-part mixtures applied one part at a time, and the batcher's own event order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tiny
import torch

from logo_engine import LoGoEngine, PrefixCacheConfig
from logo_engine.base import RowState, SamplingParams, _Run
from logo_engine.errors import LoGoError
from logo_engine.mixture import MixturePlan
from logo_engine.packing import packs
from logo_engine.selection import pinned_selection
from logo_engine.serving.batcher import Batcher, Delta, Finished, Job, Selected
from logo_engine.testing import ScriptedEngine
from logo_engine.types import Selection

PROMPTS = [p for t in tiny.TASKS.values() for p in t.prompts(3, seed=5)]
CACHES = {
    "caches": PrefixCacheConfig(),
    "no-caches": PrefixCacheConfig(probe_bytes=0, prefill_bytes=0),
}
# sdpa models join rows in a packed pass with the running rows' step; other attention
# implementations take no packed passes, and prefill joining rows on their own.
ENGINES = {
    "caches": ("caches", "sdpa"),
    "no-caches": ("no-caches", "sdpa"),
    "eager-caches": ("caches", "eager"),
}


@pytest.fixture(params=sorted(ENGINES))
def engine(request, tokenizer, adapter_dir):
    caches, attention = ENGINES[request.param]
    model = tiny.tiny_model()
    model.set_attn_implementation(attention)
    eng = LoGoEngine(
        model,
        tokenizer,
        adapters=adapter_dir,
        name="tiny-llama",
        prefix_cache=CACHES[caches],
    )
    assert packs(model) == (attention == "sdpa")
    yield eng
    eng.close()


def requests(engine: LoGoEngine, prompts: list[str]) -> list[Any]:
    return [engine._prepare(p, None, None) for p in prompts]


def solo(engine: LoGoEngine, prompt: str, mixture: Any, n: int, **sampling: Any) -> Any:
    engine.clear_prefix_caches()  # the oracle computes everything itself
    return engine.generate(prompt, adapters=mixture, max_new_tokens=n, **sampling)


def assert_same(got: Any, want: Any) -> None:
    assert got.text == want.text
    assert got.finish_reason == want.finish_reason
    assert got.usage.completion_tokens == want.usage.completion_tokens
    assert got.selection.adapters == want.selection.adapters
    assert got.selection.weights == pytest.approx(want.selection.weights)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 11}], ids=["greedy", "seed"])
def test_rows_that_join_a_running_batch_decode_as_they_would_alone(engine, sampling):
    params = SamplingParams(max_new_tokens=14, **sampling)
    first = PROMPTS[:2]
    run = _Run(
        engine, requests(engine, first), [None, {"a": 1.0}], params, engine.routing, joinable=True
    )
    assert run.joinable and engine.joins_runs
    assert run.step()  # the selection: the decode has not begun
    early = [PROMPTS[2]]
    run.join(requests(engine, early), [None], [RowState(max_new_tokens=10)])
    for _ in range(2):  # two tokens
        assert run.step()
    # three rows join: routed, a pinned mixture of two adapters of different ranks, base only
    joiners = [PROMPTS[3], PROMPTS[5], PROMPTS[7]]
    mixtures: list[Any] = [None, {"b": 0.6, "c": 0.4}, {}]
    limits = [9, 14, 5]
    selections = run.join(
        requests(engine, joiners), list(mixtures), [RowState(max_new_tokens=n) for n in limits]
    )
    assert [s.pinned for s in selections] == [False, True, True]
    for _ in range(4):
        assert run.step()
    run.join(requests(engine, [PROMPTS[8]]), [None], [RowState(max_new_tokens=6)])
    while run.step():
        pass
    got = run.generations()
    want = [
        solo(engine, first[0], None, 14, **sampling),
        solo(engine, first[1], {"a": 1.0}, 14, **sampling),
        solo(engine, early[0], None, 10, **sampling),
        *(
            solo(engine, p, m, n, **sampling)
            for p, m, n in zip(joiners, mixtures, limits, strict=True)
        ),
        solo(engine, PROMPTS[8], None, 6, **sampling),
    ]
    assert len(got) == len(want) == 7
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


def test_a_group_joining_an_emptied_batch_carries_on_alone(engine):
    params = SamplingParams(max_new_tokens=1)
    run = _Run(engine, requests(engine, PROMPTS[:1]), [None], params, engine.routing, joinable=True)
    run.step()  # the selection
    run.step()  # its one token: the row is done, the loop waits at the step boundary
    assert run.rows[0].done and not run.over
    run.join(
        requests(engine, PROMPTS[4:6]),
        [None, {"c": 1.0}],
        [RowState(max_new_tokens=8) for _ in range(2)],
    )
    while run.step():
        pass
    assert run.over
    got = run.generations()
    assert_same(got[0], solo(engine, PROMPTS[0], None, 1))
    assert_same(got[1], solo(engine, PROMPTS[4], None, 8))
    assert_same(got[2], solo(engine, PROMPTS[5], {"c": 1.0}, 8))


def test_join_is_refused_outside_a_running_joinable_run(engine):
    params = SamplingParams(max_new_tokens=2)
    plain = _Run(engine, requests(engine, PROMPTS[:1]), [None], params, engine.routing)
    with pytest.raises(LoGoError, match="joinable"):
        plain.join(requests(engine, PROMPTS[1:2]), [None], [RowState()])
    run = _Run(engine, requests(engine, PROMPTS[:1]), [None], params, engine.routing, joinable=True)
    with pytest.raises(LoGoError, match="only while it decodes"):  # not started
        run.join(requests(engine, PROMPTS[1:2]), [None], [RowState()])
    while run.step():
        pass
    with pytest.raises(LoGoError, match="only while it decodes"):  # over
        run.join(requests(engine, PROMPTS[1:2]), [None], [RowState()])


def test_engines_without_the_own_decoder_take_no_joins():
    scripted = ScriptedEngine(["x y z"], adapter_names=("a",))
    assert not scripted.joins_runs
    run = _Run(
        scripted,
        [scripted._prepare("hi", None, None)],
        [None],
        SamplingParams(),
        scripted.routing,
        joinable=True,
    )
    assert not run.joinable


def test_concatenated_plans_apply_each_part_to_its_own_rows(engine):
    """Oracle: every part's own plan on its own rows (shared, per-row and base-only parts)."""
    library = engine.library
    names = library.names

    def sel(mixture: dict[str, float]) -> Selection:
        return pinned_selection(mixture, names)

    shared = MixturePlan.build(library, [sel({"a": 1.0})] * 2)  # one mixture for 2 rows
    per_row = MixturePlan.build(library, [sel({"b": 0.7, "c": 0.3}), sel({names[2]: 1.0})])
    parts = [(shared, 2), (None, 1), (per_row, 2)]
    plan = MixturePlan.concat(parts)
    assert plan is not None
    torch.manual_seed(0)
    for name, mix in plan.modules.items():
        d_in, d_out = mix.a_cat.shape[-1], mix.b_cat.shape[-2]
        x = torch.randn(5, 3, d_in)
        got = mix.add_to(x, torch.zeros(5, 3, d_out))
        start = 0
        for part, n in parts:
            rows = slice(start, start + n)
            own = None if part is None else part.modules.get(name)
            want = (
                torch.zeros(n, 3, d_out)
                if own is None
                else own.add_to(x[rows], torch.zeros(n, 3, d_out))
            )
            torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-6)
            start += n
    assert MixturePlan.concat([(None, 2), (None, 1)]) is None


# ---------------------------------------------------------------------------- the batcher
class SlowTiny(LoGoEngine):
    """The tiny engine, 10 ms a decoding step: requests sent meanwhile meet a running batch."""

    def _decode(self, *args: Any, **kwargs: Any) -> Any:
        for _ in super()._decode(*args, **kwargs):
            time.sleep(0.01)
            yield


@pytest.fixture()
def slow(tokenizer, adapter_dir):
    eng = SlowTiny(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()


@contextlib.asynccontextmanager
async def batcher_of(engine: LoGoEngine, **options: Any) -> AsyncIterator[tuple[Batcher, Observer]]:
    """A running Batcher over ``engine`` with an :class:`Observer`, closed on exit."""
    observer = Observer()
    batcher = Batcher(engine, observer=observer, **options)
    try:
        yield batcher, observer
    finally:
        await asyncio.to_thread(batcher.close)


async def collect(j: Job) -> list[Any]:
    return [event async for event in j.stream()]


def job(engine, prompt: Any, loop, *, mixture=None, **params: Any) -> Job:
    return Job(
        engine._prepare(prompt, None, None), mixture, engine.routing, SamplingParams(**params), loop
    )


class Observer:
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.joined: list[int] = []
        self.join_waits: list[float] = []

    def batch_started(self, size, waits):
        self.batches.append(size)

    def rows_joined(self, waits):
        self.joined.append(len(waits))
        self.join_waits.append(min(waits))

    def row_finished(self, generation):
        pass

    def row_cancelled(self):
        pass


async def test_the_batcher_lets_a_late_request_join_and_finish_first(slow):
    engine = slow
    loop = asyncio.get_running_loop()
    async with batcher_of(engine, max_batch_size=4, batch_wait_ms=0) as (batcher, observer):
        long = job(engine, PROMPTS[0], loop, max_new_tokens=60)
        batcher.submit(long)
        assert isinstance(await long.events.get(), Selected)
        while not isinstance(await long.events.get(), Delta):  # it decodes
            pass
        late = job(engine, PROMPTS[4], loop, max_new_tokens=3)
        batcher.submit(late)
        order: list[str] = []

        async def finish(name: str, j: Job) -> Any:
            async for event in j.stream():
                if isinstance(event, Finished):
                    order.append(name)
                    return event.generation
            raise AssertionError(f"{name} did not finish")

        got_long, got_late = await asyncio.gather(finish("long", long), finish("late", late))
    assert observer.batches == [1] and observer.joined == [1]  # one batch; the late row joined
    assert order == ["late", "long"]  # it did not wait for the long row to end
    assert_same(got_late, solo(engine, PROMPTS[4], None, 3))
    assert_same(got_long, solo(engine, PROMPTS[0], None, 60))


async def test_no_row_joins_while_a_request_of_another_key_waits(slow):
    engine = slow
    loop = asyncio.get_running_loop()
    async with batcher_of(engine, max_batch_size=4, batch_wait_ms=0) as (batcher, observer):
        first = job(engine, PROMPTS[0], loop, max_new_tokens=40)
        batcher.submit(first)
        assert isinstance(await first.events.get(), Selected)
        sampled = job(engine, PROMPTS[1], loop, max_new_tokens=3, temperature=0.5, seed=2)
        greedy = job(engine, PROMPTS[2], loop, max_new_tokens=3)
        batcher.submit(sampled)
        batcher.submit(greedy)
        results = await asyncio.gather(*(collect(j) for j in (first, sampled, greedy)))
    assert observer.joined == []  # the greedy request did not overtake the sampled one
    assert observer.batches == [1, 1, 1]
    for events in results:
        assert isinstance(events[-1], Finished)


async def test_waiting_requests_join_together_by_the_ratio_or_after_the_longest_wait(slow):
    """join_ratio 0.5: with 4-5 rows live, one or two waiting rows wait for max_join_wait_steps."""
    engine = slow
    loop = asyncio.get_running_loop()
    async with batcher_of(
        engine, max_batch_size=8, batch_wait_ms=500, join_ratio=0.5, max_join_wait_steps=3
    ) as (batcher, observer):
        running = [job(engine, p, loop, max_new_tokens=80) for p in PROMPTS[:4]]
        for j in running:
            batcher.submit(j)
        for j in running:
            assert isinstance(await j.events.get(), Selected)
        one = job(engine, PROMPTS[4], loop, max_new_tokens=60)
        batcher.submit(one)
        assert isinstance(await one.events.get(), Selected)
        two = [job(engine, p, loop, max_new_tokens=2) for p in PROMPTS[5:7]]
        for j in two:
            batcher.submit(j)
        results = await asyncio.gather(*(collect(j) for j in [*running, one, *two]))
    assert observer.batches == [4]
    assert observer.joined == [1, 2]  # 1 < 0.5 x 4 and 2 < 0.5 x 5: each waited, then joined
    assert min(observer.join_waits) >= 0.02  # at least 2 whole steps of 10 ms (3 boundaries)
    for events in results:
        assert isinstance(events[-1], Finished)


async def test_without_continuous_batching_a_late_request_waits_for_the_batch(slow):
    engine = slow
    loop = asyncio.get_running_loop()
    async with batcher_of(engine, max_batch_size=4, batch_wait_ms=0, continuous=False) as (
        batcher,
        observer,
    ):
        long = job(engine, PROMPTS[0], loop, max_new_tokens=30)
        batcher.submit(long)
        assert isinstance(await long.events.get(), Selected)
        late = job(engine, PROMPTS[4], loop, max_new_tokens=3)
        batcher.submit(late)
        long_events, late_events = await asyncio.gather(collect(long), collect(late))
    assert observer.batches == [1, 1] and observer.joined == []
    assert isinstance(long_events[-1], Finished)
    assert_same(late_events[-1].generation, solo(engine, PROMPTS[4], None, 3))


# ------------------------------------------------------------------ the server's prefill cache
@pytest.mark.enable_socket
@pytest.mark.allow_hosts(["127.0.0.1"])
@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "static"])
def test_a_served_answer_is_kept_for_the_next_turn(tokenizer, adapter_dir, continuous):
    """The last rows of a batch store their KV too: the next turn reuses prompt + answer."""
    from openai import OpenAI

    from logo_engine.serving.app import ServeConfig
    from logo_engine.serving.server import BackgroundServer

    engine = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    config = ServeConfig(batch_wait_ms=0, continuous_batching=continuous)
    try:
        with BackgroundServer(engine, config) as server:
            client = OpenAI(base_url=server.base_url, api_key="-", max_retries=0, timeout=60)
            turn = [{"role": "user", "content": PROMPTS[0]}]
            first = client.chat.completions.create(
                model="tiny-llama:a", messages=turn, max_tokens=6
            )
            n_first = first.usage.prompt_tokens
            follow = [
                *turn,
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": PROMPTS[1]},
            ]
            second = client.chat.completions.create(
                model="tiny-llama:a", messages=follow, max_tokens=2
            )
    finally:
        engine.close()
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= n_first  # at least the whole first prompt came from the prefill cache
    assert cached < second.usage.prompt_tokens


async def test_a_joined_row_whose_client_goes_away_leaves_and_the_others_carry_on(slow):
    engine = slow
    loop = asyncio.get_running_loop()
    async with batcher_of(engine, max_batch_size=4, batch_wait_ms=0) as (batcher, observer):
        first = job(engine, PROMPTS[0], loop, max_new_tokens=40)
        batcher.submit(first)
        assert isinstance(await first.events.get(), Selected)
        gone = job(engine, PROMPTS[3], loop, max_new_tokens=40)
        stays = job(engine, PROMPTS[6], loop, max_new_tokens=12)
        batcher.submit(gone)
        batcher.submit(stays)
        assert isinstance(await gone.events.get(), Selected)  # it joined the running batch
        gone.cancel()
        first_events, stays_events = await asyncio.gather(collect(first), collect(stays))
    assert observer.batches == [1] and sum(observer.joined) == 2
    left = []
    while not gone.events.empty():
        left.append(gone.events.get_nowait())
    assert not any(isinstance(e, Finished) for e in left)  # it stopped: no answer after the cancel
    assert_same(first_events[-1].generation, solo(engine, PROMPTS[0], None, 40))
    assert_same(stays_events[-1].generation, solo(engine, PROMPTS[6], None, 12))

"""Reliability through the integrations: closed streams stop generation; concurrent mixed calls
through ChatLoGo and LoGoLLM equal their solo calls."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
from llama_index.core.base.llms.types import ChatMessage

from logo_engine.mixture import _CURRENT
from logo_integrations import ChatLoGo, LoGoLLM

MIXTURES = [None, {"a": 1.0}, {}, {"b": 0.5, "c": 0.5}]
PROMPTS = ["hello abc", "12 34 + 5", "+-*/ ="]


class StepCounter:
    """Counts model forwards (decoding steps) through a hook on the LM head."""

    def __init__(self, engine):
        self.steps = 0
        self._handle = engine.model.lm_head.register_forward_hook(self._count)

    def _count(self, *args):
        self.steps += 1

    def remove(self):
        self._handle.remove()


class DecodeWatch:
    """Counts decoding steps and sees every decode loop of the engine end (early or not)."""

    def __init__(self, engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps = 0
        self.open = 0  # decode loops running or suspended: only these can still make steps
        self.stepped = threading.Event()
        decode = engine._decode

        def watched(*args, **kwargs):
            self.open += 1
            try:
                for step in decode(*args, **kwargs):
                    self.steps += 1
                    self.stepped.set()
                    yield step
            finally:
                self.open -= 1

        monkeypatch.setattr(engine, "_decode", watched)


async def cancel_and_check_stopped(engine, monkeypatch, consume, max_steps: int) -> None:
    """Cancel a task consuming a stream mid-way: once it has settled, its decode loop is closed.

    No timing: the task is cancelled after its first decoding step, and a closed loop can make
    no more steps.
    """
    watch = DecodeWatch(engine, monkeypatch)
    task = asyncio.create_task(consume())
    while not watch.stepped.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watch.open == 0, "the decode loop was left running after cancellation"
    assert 1 <= watch.steps < max_steps


def test_langchain_stream_closed_early_stops_generation(engine):
    chat = ChatLoGo(engine=engine, max_tokens=100)
    counter = StepCounter(engine)
    try:
        stream = chat.stream("hello", adapters={"a": 1.0})
        next(stream)
        stream.close()
    finally:
        counter.remove()
    assert counter.steps <= 3
    assert _CURRENT.get() is None
    assert (
        chat.invoke("hello", adapters={}).content
        == engine.generate("hello", adapters={}, max_new_tokens=100).text
    )


async def test_langchain_astream_cancelled_stops_generation(engine, monkeypatch):
    chat = ChatLoGo(engine=engine, max_tokens=200)

    async def consume():
        async for _ in chat.astream("hello", adapters={"b": 1.0}):
            await asyncio.sleep(0)

    await cancel_and_check_stopped(engine, monkeypatch, consume, max_steps=200)
    out = await chat.ainvoke("hello", adapters={"b": 1.0})
    assert out.content == engine.generate("hello", adapters={"b": 1.0}, max_new_tokens=200).text


def test_llama_index_stream_closed_early_stops_generation(engine):
    llm = LoGoLLM(engine=engine, max_new_tokens=100)
    counter = StepCounter(engine)
    try:
        gen = llm.stream_complete("hello", adapters={"a": 1.0})
        next(gen)
        gen.close()
    finally:
        counter.remove()
    assert counter.steps <= 3
    assert _CURRENT.get() is None
    text = llm.complete("hello", adapters={}).text
    assert text == engine.generate("hello", adapters={}, max_new_tokens=100).text


async def test_llama_index_astream_cancelled_stops_generation(engine, monkeypatch):
    llm = LoGoLLM(engine=engine, max_new_tokens=200)

    async def consume():
        gen = await llm.astream_chat(
            [ChatMessage(role="user", content="hello")], adapters={"b": 1.0}
        )
        async for _ in gen:
            await asyncio.sleep(0)

    await cancel_and_check_stopped(engine, monkeypatch, consume, max_steps=200)


def test_soak_through_both_integrations(engine):
    chat = ChatLoGo(engine=engine, max_tokens=6)
    llm = LoGoLLM(engine=engine, max_new_tokens=6)
    calls = [(p, m) for p in PROMPTS for m in MIXTURES]

    def lc(prompt, mixture):
        kw = {} if mixture is None else {"adapters": mixture}
        return chat.invoke(prompt, **kw).content

    def lc_stream(prompt, mixture):
        kw = {} if mixture is None else {"adapters": mixture}
        return "".join(c.content for c in chat.stream(prompt, **kw))

    def li(prompt, mixture):
        kw = {} if mixture is None else {"adapters": mixture}
        return llm.chat([ChatMessage(role="user", content=prompt)], **kw).message.content

    async def alc(prompt, mixture):
        kw = {} if mixture is None else {"adapters": mixture}
        return (await chat.ainvoke(prompt, **kw)).content

    async def ali(prompt, mixture):
        kw = {} if mixture is None else {"adapters": mixture}
        gen = await llm.astream_chat([ChatMessage(role="user", content=prompt)], **kw)
        last = None
        async for chunk in gen:
            last = chunk
        return last.message.content

    expected = {(fn, i): fn(*calls[i]) for fn in (lc, lc_stream, li) for i in range(len(calls))}
    async_expected = {
        (fn, i): asyncio.run(fn(*calls[i])) for fn in (alc, ali) for i in range(len(calls))
    }
    # the integrations agree with each other on the same calls
    for i in range(len(calls)):
        assert expected[(lc, i)] == expected[(lc_stream, i)] == async_expected[(alc, i)]
        assert expected[(li, i)] == async_expected[(ali, i)]
    mismatches, errors, done = [], [], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + 4

    def thread_worker(seed):
        rng = random.Random(seed)
        try:
            while time.monotonic() < deadline:
                fn, i = rng.choice(list(expected))
                got = fn(*calls[i])
                with lock:
                    done[0] += 1
                    if got != expected[(fn, i)]:
                        mismatches.append((fn.__name__, calls[i], got))
        except BaseException as exc:
            errors.append(exc)

    async def task_worker(seed):
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            fn, i = rng.choice(list(async_expected))
            got = await fn(*calls[i])
            with lock:
                done[0] += 1
                if got != async_expected[(fn, i)]:
                    mismatches.append((fn.__name__, calls[i], got))

    async def async_side():
        await asyncio.gather(*(task_worker(100 + i) for i in range(8)))

    threads = [threading.Thread(target=thread_worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    asyncio.run(async_side())
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not mismatches, mismatches[:3]
    assert done[0] >= 16

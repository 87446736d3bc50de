"""Concurrency soak: many threads and asyncio tasks issuing mixed calls for a bounded time.

Every result must equal the same call made alone, and memory must not grow after warm-up.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
import tiny

from logo_engine import LoGoEngine, RoutingConfig

SOAK_SECONDS = float(os.environ.get("LOGO_SOAK_SECONDS", "4"))
PROMPTS = ["hello abc", "12 34 + 5", "+-*/ ="]
MIXTURES: list[dict[str, float] | None] = [None, {"a": 1.0}, {}, {"b": 0.4, "c": 0.6}]
ROUTING = RoutingConfig(top_k=2)


@dataclass(frozen=True)
class Call:
    kind: str  # generate | stream | batch
    prompt: str
    mixture: dict[str, float] | None

    def run(self, engine: LoGoEngine) -> Any:
        kw = dict(max_new_tokens=6, routing=ROUTING)
        if self.kind == "generate":
            out = engine.generate(self.prompt, adapters=self.mixture, **kw)
            return out.text, out.selection.adapters
        if self.kind == "stream":
            stream = engine.stream(self.prompt, adapters=self.mixture, **kw)
            return "".join(stream), stream.selection.adapters
        outs = engine.generate_batch([self.prompt, "hello"], adapters=self.mixture, **kw)
        return outs[0].text, outs[0].selection.adapters

    async def arun(self, engine: LoGoEngine) -> Any:
        kw = dict(max_new_tokens=6, routing=ROUTING)
        if self.kind == "stream":
            stream = engine.astream(self.prompt, adapters=self.mixture, **kw)
            text = "".join([c async for c in stream])
            return text, stream.generation.selection.adapters
        if self.kind == "batch":
            outs = await engine.agenerate_batch([self.prompt, "hello"], adapters=self.mixture, **kw)
            return outs[0].text, outs[0].selection.adapters
        out = await engine.agenerate(self.prompt, adapters=self.mixture, **kw)
        return out.text, out.selection.adapters


CALLS = [
    Call(kind, prompt, mixture)
    for kind, prompt, mixture in itertools.product(
        ("generate", "stream", "batch"), PROMPTS, MIXTURES
    )
]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def soak_engine(tokenizer, adapter_dir):
    engine = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir)
    yield engine
    engine.close()


def test_soak_threads_and_tasks(soak_engine):
    engine = soak_engine
    expected = [call.run(engine) for call in CALLS]  # alone, one by one
    errors: list[BaseException] = []
    mismatches: list[tuple[Call, Any]] = []
    done = {"calls": 0}
    lock = threading.Lock()

    def check(i: int, got: Any) -> None:
        with lock:
            done["calls"] += 1
            if got != expected[i]:
                mismatches.append((CALLS[i], got))

    def thread_worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < deadline:
                i = rng.randrange(len(CALLS))
                check(i, CALLS[i].run(engine))
        except BaseException as exc:
            errors.append(exc)

    async def task_worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            i = rng.randrange(len(CALLS))
            check(i, await CALLS[i].arun(engine))

    async def async_side() -> None:
        await asyncio.gather(*(task_worker(1000 + i) for i in range(8)))

    # warm-up, then measure memory around the soak
    for call in CALLS[:8]:
        call.run(engine)
    gc.collect()
    rss_before = _rss_mb()
    deadline = time.monotonic() + SOAK_SECONDS
    threads = [threading.Thread(target=thread_worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    asyncio.run(async_side())
    for t in threads:
        t.join()
    gc.collect()
    rss_after = _rss_mb()

    assert not errors, errors[:3]
    assert not mismatches, mismatches[:3]
    assert done["calls"] >= 16
    assert rss_after - rss_before < 64, f"RSS grew by {rss_after - rss_before:.1f} MiB"

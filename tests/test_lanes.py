"""Serving lanes: batches side by side on one engine, the CPU threads split between them.

Oracles: each row's solo ``engine.generate`` (greedy decoding is deterministic), torch's own
per-thread count (``torch.get_num_threads()`` read inside each lane), and the batcher's events.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import tiny
import torch
from openai import OpenAI

from logo_engine import LoGoEngine
from logo_engine.ahead import idle_cores
from logo_engine.base import SamplingParams
from logo_engine.serving.app import ServeConfig, ServerState, local_runner
from logo_engine.serving.batcher import Batcher, Finished, Job, Lanes, ThreadShare
from logo_engine.serving.server import BackgroundServer

PROMPTS = [p for t in tiny.TASKS.values() for p in t.prompts(3, seed=13)]


class SlowTiny(LoGoEngine):
    """The tiny engine, 10 ms a decoding step; it notes each step's lane and torch threads."""

    steps: list[tuple[str, int, float]]

    def _decode(self, *args: Any, **kwargs: Any) -> Any:
        for _ in super()._decode(*args, **kwargs):
            self.steps.append(
                (threading.current_thread().name, torch.get_num_threads(), time.monotonic())
            )
            time.sleep(0.01)
            yield


@pytest.fixture()
def slow(tokenizer, adapter_dir):
    eng = SlowTiny(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    eng.steps = []
    yield eng
    eng.close()


@pytest.fixture()
def four_threads():
    """Four torch threads in this thread while the test runs (lanes split what they find)."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


class Observer:
    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []
        self.joined: list[tuple[str, int]] = []

    def batch_started(self, size: int, waits: list[float]) -> None:
        self.batches.append((threading.current_thread().name, size))

    def rows_joined(self, waits: list[float]) -> None:
        self.joined.append((threading.current_thread().name, len(waits)))

    def row_finished(self, generation: Any) -> None:
        pass

    def row_cancelled(self) -> None:
        pass


def job(engine: LoGoEngine, prompt: str, loop: Any, n: int) -> Job:
    return Job(
        engine._prepare(prompt, None, None),
        None,
        engine.routing,
        SamplingParams(max_new_tokens=n),
        loop,
    )


async def finished(j: Job) -> Any:
    events = [e async for e in j.stream()]
    assert isinstance(events[-1], Finished), events[-1]
    return events[-1].generation


def in_two_lanes(lane: Callable[[str], None]) -> None:
    """Run ``lane("a")`` and ``lane("b")`` in two threads, as two lanes, until both return."""
    threads = [threading.Thread(target=lane, args=(name,)) for name in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)


def test_busy_lanes_split_the_threads_and_a_lone_lane_takes_them_all():
    share = ThreadShare(4)
    both_busy, one_left = threading.Barrier(2), threading.Event()
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def lane(name: str) -> None:
        share.enter()
        both_busy.wait()
        seen[name].append(share.apply())
        seen[name].append(torch.get_num_threads())  # torch's own count in this thread
        both_busy.wait()
        if name == "a":
            share.leave()
            one_left.set()
            return
        one_left.wait()
        seen[name].append(share.apply())
        seen[name].append(torch.get_num_threads())
        share.leave()

    main_threads = torch.get_num_threads()
    in_two_lanes(lane)
    assert seen == {"a": [2, 2], "b": [2, 2, 4, 4]}
    assert torch.get_num_threads() == main_threads  # per thread: this one is untouched


def test_a_lane_beside_a_busy_lane_sees_no_idle_cores_for_a_pass_ahead():
    """One thread per lane leaves cores torch does not use, but the other lane uses them."""
    share = ThreadShare(1)
    both_busy, a_left = threading.Barrier(2), threading.Event()
    spare: dict[str, list[bool]] = {"a": [], "b": []}

    def lane(name: str) -> None:
        share.enter()
        both_busy.wait()
        share.apply()
        spare[name].append(idle_cores(torch.device("cpu")))
        both_busy.wait()
        if name == "b":
            share.apply()  # "a" is still busy
            spare[name].append(idle_cores(torch.device("cpu")))
        both_busy.wait()
        if name == "a":
            share.leave()
            a_left.set()
        else:
            a_left.wait()
            share.apply()  # alone now: torch's one thread leaves the other cores idle
            spare[name].append(idle_cores(torch.device("cpu")))
            share.leave()

    in_two_lanes(lane)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert spare == {"a": [False], "b": [False, False, (cores or 1) > 1]}


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "static"])
async def test_each_job_goes_to_the_lane_with_fewest_unfinished_and_lanes_run_side_by_side(
    slow, four_threads, continuous
):
    loop = asyncio.get_running_loop()
    observer = Observer()
    lanes = Lanes(
        slow,
        lanes=2,
        max_batch_size=4,
        batch_wait_ms=300,
        observer=observer,
        continuous=continuous,
    )
    try:
        jobs = [job(slow, p, loop, 16) for p in PROMPTS[:4]]
        for j in jobs:
            lanes.submit(j)  # lanes 0, 1, 0, 1
        got = await asyncio.gather(*(finished(j) for j in jobs))
        later = job(slow, PROMPTS[4], loop, 3)
        before_later = len(slow.steps)
        lanes.submit(later)  # both lanes are free again: the first takes it
        got_later = await finished(later)
    finally:
        await asyncio.to_thread(lanes.close)
    assert sorted(observer.batches[:2]) == [("logo-batcher-0", 2), ("logo-batcher-1", 2)]
    # The later job starts a batch of its own, or joins lane 0's batch if that batch had not
    # yet noticed that its rows were all done: lane 0 either way.
    assert [*observer.batches[2:], *observer.joined] == [("logo-batcher-0", 1)]
    for prompt, generation in zip([*PROMPTS[:5]], [*got, got_later], strict=True):
        slow.clear_prefix_caches()
        solo = slow.generate(prompt, max_new_tokens=generation.usage.completion_tokens)
        assert generation.text == solo.text
        assert generation.selection.adapters == solo.selection.adapters
    # Both lanes decoded at the same time, on 2 threads each; alone, a lane took all 4.
    lane_steps = [s for s in slow.steps if s[0].startswith("logo-batcher")]
    names = ("logo-batcher-0", "logo-batcher-1")
    both = max(min(t for n, _, t in lane_steps if n == lane) for lane in names)  # B's 1st step
    first_end = min(max(t for n, _, t in lane_steps if n == lane) for lane in names)
    # Steps recorded a little after both lanes had started, and before either ended: each lane
    # set its share (2 of 4) before them. (A step already under way when the other lane entered
    # ran on the threads it had.)
    side_by_side = [threads for _, threads, t in lane_steps if both + 0.03 < t < first_end]
    assert side_by_side and set(side_by_side) == {2}
    # The later job ran alone: once the other lane had left, its lane took all 4 threads.
    assert 4 in [threads for _, threads, _ in slow.steps[before_later:]]


async def test_a_closed_lanes_runner_refuses_jobs(slow):
    lanes = Lanes(slow, lanes=2)
    await asyncio.to_thread(lanes.close)
    with pytest.raises(RuntimeError, match="stopped"):
        lanes.submit(job(slow, PROMPTS[0], asyncio.get_running_loop(), 2))


def test_lanes_must_be_positive(slow):
    with pytest.raises(ValueError, match="lanes must be >= 1"):
        Lanes(slow, lanes=0)


@pytest.mark.enable_socket
@pytest.mark.allow_hosts(["127.0.0.1"])
def test_a_server_with_two_lanes_answers_concurrent_requests_as_each_alone(
    tokenizer, adapter_dir, four_threads
):
    engine = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    jobs = [dict(prompt=p, max_tokens=3 + i % 5) for i, p in enumerate(PROMPTS[:8])]
    with BackgroundServer(engine, ServeConfig(lanes=2, batch_wait_ms=20)) as srv:
        client = OpenAI(base_url=srv.base_url, api_key="-", max_retries=0, timeout=60)
        with ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(lambda j: client.completions.create(model="tiny-llama", **j), jobs)
            )
        metrics = httpx.get(srv.url + "/metrics").text
    rows = {
        line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line[:1] != "#"
    }
    assert rows["logo_batch_size_sum"] + rows.get("logo_joined_rows_total", 0.0) == 8
    for j, response in zip(jobs, responses, strict=True):
        engine.clear_prefix_caches()
        solo = engine.generate(j["prompt"], max_new_tokens=j["max_tokens"])
        assert response.choices[0].text == solo.text
        assert response.usage.completion_tokens == solo.usage.completion_tokens
    engine.close()


def test_the_cli_refuses_lanes_below_one(capsys):
    from logo_engine.cli import main

    assert main(["serve", "--lanes", "0"]) == 2
    assert "--lanes" in capsys.readouterr().err


def test_the_server_runs_one_lane_unless_told_otherwise(tokenizer, adapter_dir):
    engine = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    for config, want in [(ServeConfig(), 1), (ServeConfig(lanes=1), 1), (ServeConfig(lanes=3), 3)]:
        runner = local_runner(engine, ServerState(config))
        try:
            assert isinstance(runner, Lanes if want > 1 else Batcher)
            assert (len(runner.lanes) if isinstance(runner, Lanes) else 1) == want
        finally:
            runner.close()
    engine.close()

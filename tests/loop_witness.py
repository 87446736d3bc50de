"""Prove that an event loop keeps running while some code runs, without timing thresholds.

The code under test calls :meth:`LoopWitness.check` (from a forward hook, a scripted decode step,
a fake model loader...). Called on the event loop's own thread, that is a blocked loop, counted at
once. Called from a worker thread, it waits until a task on the loop answers; the loop can only
answer while it runs, so an answered check proves the loop was free at that moment. A check left
unanswered for ``timeout`` seconds (a loop blocked some other way) is counted as well; the timeout
only matters when the test fails.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class LoopWitness:
    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.answered = 0  # checks from a worker thread that the running loop answered
        self.on_loop = 0  # checks made on the loop thread itself: the loop was blocked
        self.unanswered = 0  # checks the loop did not answer in time
        self._pending: queue.SimpleQueue[threading.Event] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def check(self, *_: Any) -> None:
        """Call from the code under test (any arguments are ignored: usable as a hook)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            with self._lock:
                self.on_loop += 1
            return
        answer = threading.Event()
        self._pending.put(answer)
        ok = answer.wait(self.timeout)
        with self._lock:
            if ok:
                self.answered += 1
            else:
                self.unanswered += 1

    async def _serve(self) -> None:
        while True:
            try:
                self._pending.get_nowait().set()
            except queue.Empty:
                await asyncio.sleep(0.001)

    async def run(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` while a task on the loop answers the checks."""
        server = asyncio.create_task(self._serve())
        try:
            return await awaitable
        finally:
            server.cancel()

    def assert_loop_was_free(self, min_checks: int = 1) -> None:
        assert self.on_loop == 0, f"{self.on_loop} checks ran on the event loop thread"
        assert self.unanswered == 0, f"{self.unanswered} checks were not answered by the loop"
        assert self.answered >= min_checks, f"only {self.answered} checks were made"

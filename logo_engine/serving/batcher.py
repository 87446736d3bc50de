"""Dynamic batching: concurrent requests decoded as one engine batch, streamed row by row.

Requests arrive on the event loop as :class:`Job` objects. One worker thread collects them into
batches (at most ``max_batch_size`` rows; it waits at most ``batch_wait_ms`` after the first
request of a batch arrived for more to join), runs each batch as one engine :class:`_Run` (one
batched probe, one batched decode, each row with its own selection, stop strings and length), and
after every decoding step hands each row's new text to its request through an asyncio queue
(``loop.call_soon_threadsafe``). A row is reported finished as soon as it is done, not when the
whole batch is.

Which requests share a batch: the decode loop samples every row with the run's temperature,
top-p and seed, so a batch holds requests with the same sampling settings (all greedy requests
share one key, whatever their top_p or seed) and the same routing configuration. Prompts, tools,
pinned mixtures, stop strings and ``max_tokens`` may differ freely between rows.

Continuous batching: on an engine whose runs take joining rows (``engine.joins_runs``: the
engine's own decoder), requests that arrive while a batch decodes join it between two steps, up to
``max_batch_size`` live rows: they are routed (one batched probe), prefilled on their own and then
decode with the others, each as it would alone. So a row that finishes early frees its place for
the next request, instead of the batch running on until its longest row ends. A join stalls the
running rows for its probe and prefill, so waiting requests join together (TGI's rule): once they
are ``join_ratio`` x the live rows, or once the oldest has waited ``max_join_wait_steps`` steps.
Rows join only while no request of another key waits (that one gets the next batch, so no key is
starved). Other engines (generation backends, remote engines) run each batch as it started.
A cancelled request (a client that disconnected) stops its row at the next step: the row produces
nothing more, and a batch whose rows are all cancelled or done stops.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

import torch

from logo_engine.ahead import share_cores
from logo_engine.base import BaseEngine, Mixture, Request, RowState, SamplingParams, _Run
from logo_engine.types import Generation, RoutingConfig, Selection

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- row events
@dataclass(frozen=True)
class Selected:
    """The row's selection is known (before its first token)."""

    selection: Selection


@dataclass(frozen=True)
class Delta:
    """New text of the row, safe to show (stop strings already handled)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The row is done: its whole generation."""

    generation: Generation


@dataclass(frozen=True)
class Failed:
    """The batch failed; the row will get nothing more."""

    error: BaseException


Event = Union[Selected, Delta, Finished, Failed]


class BatchObserver(Protocol):
    """What the batcher reports (the server's metrics implement it)."""

    def batch_started(self, size: int, queue_wait_s: list[float]) -> None: ...

    def row_finished(self, generation: Generation) -> None: ...

    def row_cancelled(self) -> None: ...

    def rows_joined(self, queue_wait_s: list[float]) -> None: ...


@dataclass(eq=False)
class Job:
    """One request's row: what to generate, and the queue its events go to."""

    request: Request
    mixture: Mixture | None  # pinned mixture; None: route
    routing: RoutingConfig
    params: SamplingParams  # this request's own (max_new_tokens and stop are per row)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set from the event loop; read by the worker between steps
    over: bool = False  # a Finished or Failed event was sent

    @property
    def key(self) -> Hashable:
        """Requests with equal keys may share a batch."""
        p = self.params
        sampling = ("greedy",) if p.temperature == 0 else (p.temperature, p.top_p, p.seed)
        return (*sampling, self.routing)

    def cancel(self) -> None:
        """Stop this row (idempotent; a finished row is left alone)."""
        self.cancelled = True

    def post(self, event: Event) -> None:
        """Send an event to the request's queue (from the worker thread)."""
        if isinstance(event, (Finished, Failed)):
            self.over = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    async def stream(self) -> AsyncIterator[Event]:
        """The row's events until it finishes or fails (cancel the job if you stop early)."""
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return


class Batcher:
    """One worker thread that runs queued jobs as engine batches (see module docstring)."""

    def __init__(
        self,
        engine: BaseEngine,
        *,
        max_batch_size: int = 8,
        batch_wait_ms: float = 10.0,
        observer: BatchObserver | None = None,
        continuous: bool = True,
        join_ratio: float = 0.3,
        max_join_wait_steps: int = 8,
        threads: ThreadShare | None = None,
        name: str = "logo-batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1e3
        self.observer = observer
        self.continuous = continuous  # rows may join a running batch (see module docstring)
        self.join_ratio = join_ratio
        self.max_join_wait_steps = max_join_wait_steps
        self._join_wait = 0  # steps the oldest request waiting to join has waited
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._deferred: deque[Job] = deque()  # jobs that did not fit the last batch's key
        self._stopping = False
        self._threads = threads  # torch threads shared with other lanes (see :class:`Lanes`)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job (thread-safe); its events arrive on ``job.events``."""
        if self._stopping:
            raise RuntimeError("the batcher is stopped")
        self._queue.put(job)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop after the running batch; queued jobs fail with an error."""
        self.stop()
        self._thread.join(timeout)

    def stop(self) -> None:
        """Take no more jobs; the worker ends after its running batch (``close`` waits for it)."""
        if not self._stopping:
            self._stopping = True
            self._queue.put(None)

    # ------------------------------------------------------------------ worker thread
    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                break
            if batch:
                self._run(batch)
        error = RuntimeError("the server is shutting down")
        for job in [*self._deferred, *_drain(self._queue)]:
            if job is not None:
                job.post(Failed(error))

    def _collect(self) -> list[Job] | None:
        """The next batch: the oldest job and the queued jobs with its key (None: stop)."""
        if self._deferred:
            first = self._deferred.popleft()
        else:
            got = self._queue.get()
            if got is None:
                return None
            first = got
        if first.cancelled:
            return []
        batch = [first]
        for job in list(self._deferred):
            if len(batch) < self.max_batch_size and job.key == first.key:
                self._deferred.remove(job)
                if not job.cancelled:
                    batch.append(job)
        deadline = first.enqueued_at + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            wait = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # stop after this batch
                self._queue.put(None)
                break
            if item.cancelled:
                continue
            if item.key == first.key:
                batch.append(item)
            else:
                self._deferred.append(item)
        return batch

    def _run(self, jobs: list[Job]) -> None:
        if self.observer is not None:
            started = time.monotonic()
            self.observer.batch_started(len(jobs), [started - j.enqueued_at for j in jobs])
        key = jobs[0].key
        self._join_wait = 0
        share = self._threads
        if share is not None:
            share.enter()
            share.apply()
        try:
            run_batch(
                self.engine,
                jobs,
                self.observer,
                refill=(lambda live: self._joiners(key, live)) if self.continuous else None,
                # before each next step: the other lanes may have started or ended batches
                between_steps=share.apply if share is not None else None,
            )
        except Exception:  # run_batch reports errors to the jobs; this is a bug of ours
            logger.exception("a batch failed outside the engine")
        finally:
            if share is not None:
                share.leave()

    def _joiners(self, key: Hashable, live: int) -> list[Job]:
        """Waiting jobs with ``key`` that join a running batch of ``live`` rows now.

        Each join costs the running rows a probe and a prefill of their own, so waiting rows
        join together (the rule of TGI's router): once they are at least ``join_ratio`` x the
        live rows, or once the oldest has waited ``max_join_wait_steps`` steps, or at once when
        no row is left; at most ``max_batch_size - live``. None while a job of another key
        waits: the running batch then drains, and that job's batch starts next.
        """
        while True:  # everything queued, in arrival order, goes to the waiting line
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # stopping: let the running batch end, take nothing more
                self._queue.put(None)
                return []
            if not item.cancelled:
                self._deferred.append(item)
        waiting = [j for j in self._deferred if not j.cancelled]
        if not waiting or any(j.key != key for j in waiting):
            self._join_wait = 0
            return []
        self._join_wait += 1
        if (
            live
            and len(waiting) < self.join_ratio * live
            and self._join_wait < self.max_join_wait_steps
        ):
            return []
        joiners = waiting[: max(0, self.max_batch_size - live)]
        self._deferred = deque(j for j in waiting if j not in joiners)
        self._join_wait = 0
        return joiners


class ThreadShare:
    """The process's torch threads, split evenly between the lanes that are running a batch.

    Each lane sets its own thread's count (``torch.set_num_threads`` is per thread) when its
    batch starts and before each of its steps, so a lone lane uses every thread and two busy
    lanes one half each, never more threads than cores for long.
    """

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self._busy = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self._busy += 1

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1

    def apply(self) -> int:
        """Set the calling lane's torch threads to its share now; returns it."""
        busy = max(1, self._busy)
        share = max(1, self.total // busy)
        if torch.get_num_threads() != share:
            torch.set_num_threads(share)
        share_cores(busy > 1)  # no pass ahead on the other lanes' cores
        return share


class Lanes:
    """``lanes`` batchers side by side, each request sent to the lane with fewest unfinished.

    On a CPU the model's products at serving sizes use a second thread poorly
    (``benchmarks/thread_split.py``), so two batches on one core each get through more prompt
    passes than one batch on both: short answers are served faster. Decoding few rows per lane
    can be slower than one batch of all of them on both cores (long answers at 4 clients:
    docs/serving.md, "Lanes"), which is why the server runs one lane unless told otherwise.
    The lanes share the engine (its weights, caches and adapters) and split the torch threads
    (:class:`ThreadShare`); a lone busy lane uses all of them, so one client is served as fast as
    with one lane.
    """

    def __init__(self, engine: BaseEngine, *, lanes: int = 2, **batcher: Any) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        share = ThreadShare(torch.get_num_threads()) if lanes > 1 else None
        self.lanes = [
            Batcher(engine, threads=share, name=f"logo-batcher-{i}", **batcher)
            for i in range(lanes)
        ]
        self._jobs: list[list[Job]] = [[] for _ in self.lanes]

    def submit(self, job: Job) -> None:
        """Queue ``job`` on the lane with the fewest unfinished jobs (called from one thread)."""
        for jobs in self._jobs:
            jobs[:] = [j for j in jobs if not (j.over or j.cancelled)]
        lane = min(range(len(self.lanes)), key=lambda i: len(self._jobs[i]))
        self.lanes[lane].submit(job)
        self._jobs[lane].append(job)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop every lane after its running batch; queued jobs fail with an error."""
        for lane in self.lanes:
            lane.stop()  # all at once: the lanes' running batches end side by side
        for lane in self.lanes:
            lane.close(timeout)


def run_batch(
    engine: BaseEngine,
    jobs: list[Job],
    observer: BatchObserver | None = None,
    *,
    refill: Callable[[int], list[Job]] | None = None,
    between_steps: Callable[[], object] | None = None,
) -> None:
    """Decode ``jobs`` (equal keys) as one engine batch, posting each row's events as they come.

    Runs in the calling thread, step by step. With ``refill`` (and an engine whose runs take
    joining rows), ``refill(live)`` is asked between steps for jobs of the same key to join the
    batch of ``live`` rows; ``between_steps()`` is called after every step but the last (before
    any join). Errors end every unfinished row with :class:`Failed`; nothing is
    raised; a failed join fails its own jobs only.
    """
    first = jobs[0].params
    params = SamplingParams(
        max_new_tokens=max(j.params.max_new_tokens for j in jobs),
        temperature=first.temperature,
        top_p=first.top_p,
        seed=first.seed,
    )
    rows = [_row_state(j) for j in jobs]
    run = _Run(
        engine,
        [j.request for j in jobs],
        [j.mixture for j in jobs],
        params,
        jobs[0].routing,
        rows=rows,
        joinable=refill is not None,
    )
    jobs = list(jobs)  # grows as rows join
    try:
        _drive(run, jobs, observer, refill if run.joinable else None, between_steps)
    except Exception as exc:
        for job in jobs:
            if not job.over:
                job.post(Failed(exc))
    finally:
        run.close()


def _row_state(job: Job) -> RowState:
    return RowState(
        stop=job.params.stop,
        text=job.request.response_prefix,
        max_new_tokens=job.params.max_new_tokens,
    )


def _join(run: _Run, jobs: list[Job], new: list[Job], observer: BatchObserver | None) -> None:
    """Route ``new`` and add them to the running ``run`` (appended to ``jobs``)."""
    joined_at = time.monotonic()
    try:
        selections = run.join(
            [j.request for j in new], [j.mixture for j in new], [_row_state(j) for j in new]
        )
    except Exception as exc:  # their probe failed: the running rows carry on
        for job in new:
            job.post(Failed(exc))
        return
    if observer is not None:
        observer.rows_joined([joined_at - j.enqueued_at for j in new])
    for job, selection in zip(new, selections, strict=True):
        job.post(Selected(selection))
    jobs.extend(new)


def _drive(
    run: _Run,
    jobs: list[Job],
    observer: BatchObserver | None,
    refill: Callable[[int], list[Job]] | None = None,
    between_steps: Callable[[], object] | None = None,
) -> None:
    """Step ``run`` to its end, posting each row's events (rows of ``refill`` join on the way)."""
    announced = False
    while True:
        alive = run.step()
        if not announced and run.selections is not None:
            for job, selection in zip(jobs, run.selections, strict=True):
                job.post(Selected(selection))
            announced = True
        for i, (job, row) in enumerate(zip(jobs, run.rows, strict=True)):
            if job.over:
                continue
            if job.cancelled:
                row.finish("stop")  # the decoder skips it from now on
                job.over = True
                if observer is not None:
                    observer.row_cancelled()
                continue
            if row.at_limit:  # engines whose decoders do not read per-row limits
                row.finish("length")
            delta = row.take_delta()
            if delta:
                job.post(Delta(delta))
            if row.done or not alive:
                generation = run.generation(i)
                job.post(Finished(generation))
                if observer is not None:
                    observer.row_finished(generation)
        if alive and between_steps is not None:
            between_steps()
        if alive and refill is not None and announced:
            new = refill(sum(not job.over for job in jobs))
            if new:
                _join(run, jobs, new, observer)
        if not alive or all(job.over for job in jobs):
            return


def _drain(q: queue.Queue[Any]) -> list[Any]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out

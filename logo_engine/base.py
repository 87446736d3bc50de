"""The public call surface shared by every engine: validation, runs, streams, async.

:class:`BaseEngine` implements ``route``, ``generate``, ``generate_batch``, ``stream`` and their
async forms once, on top of three primitives a concrete engine provides:

- ``_prepare``: render and tokenize one prompt into a :class:`Request`;
- ``_route``: probe a batch of requests and return one :class:`Selection` per row;
- ``_decode``: generate for a batch with fixed selections, pushing text into one :class:`RowState`
  per row and yielding once per decoding step.

All per-call state lives in a :class:`_Run` object owned by the caller, never on the engine, so
calls from several threads or tasks do not see each other.
"""

from __future__ import annotations

import asyncio
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, Union

from logo_engine.chat import ParsedAnswer, Prompt, ToolChoice, parse_answer
from logo_engine.errors import (
    ContextLengthError,
    EngineClosedError,
    InvalidRequestError,
    LoGoError,
)
from logo_engine.selection import check_top_k, pinned_selection
from logo_engine.types import FinishReason, Generation, RoutingConfig, Selection, Usage

Mixture = Mapping[str, float]
# generate_batch(adapters=...): one mixture for every row, or one per row (None = route that row).
BatchMixture = Union[Mixture, Sequence[Union[Mixture, None]], None]
Tools = Sequence[Mapping[str, Any]]
T = TypeVar("T")
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts

# Set in the worker thread of an async call: the call stops at its next decoding step once set.
_CANCEL: ContextVar[threading.Event | None] = ContextVar("logo_cancel", default=None)


class _Cancelled(Exception):
    """Raised in the worker of a cancelled async call (the awaiting task sees CancelledError)."""


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one call, validated on construction."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # per-call generator: reproducible and independent of other calls
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRequestError(f"max_new_tokens must be an int >= 1, got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InvalidRequestError(f"temperature must be a finite float >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]
        ):
            raise InvalidRequestError(
                f"seed must be None or an int in [-2**63, 2**64 - 1], got {self.seed!r}"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop must hold non-empty strings, got {self.stop!r}")

    @classmethod
    def build(
        cls,
        max_new_tokens: int,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        stop: str | Sequence[str] | None,
    ) -> SamplingParams:
        """Normalise user arguments (a single stop string, ``None`` values)."""
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, Sequence):
            stops = tuple(stop)
        else:
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}")
        return cls(
            max_new_tokens=max_new_tokens,
            temperature=0.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            stop=stops,
        )


class WorkAhead(Protocol):
    """Work an engine started for a call before routing it (see ``BaseEngine._select_ahead``)."""

    def discard(self) -> None:
        """Stop the work; its result will not be used."""


@dataclass
class Request:
    """One prompt, rendered for the model. ``input_ids`` is engine-specific (token ids)."""

    text: str
    n_prompt_tokens: int
    response_prefix: str = ""
    has_tools: bool = False
    input_ids: Any = None
    tools: list[dict[str, Any]] | None = None  # tools offered (None: none, or tool_choice="none")
    messages: list[dict[str, Any]] | None = None  # the caller's messages (None: a plain string)


@dataclass
class RowState:
    """The answer of one row as it is generated: stop strings, held-back text, finish reason.

    Stop strings may span several tokens: after each piece the tail is searched, the text is cut
    at the first stop, and while a row is running the longest tail that could still start a stop
    string is held back from streams.
    """

    stop: tuple[str, ...] = ()
    text: str = ""
    max_new_tokens: int | None = None  # this row's own limit (None: the run's); batches may mix
    emitted: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the engine did not recompute (prefill cache)
    finish_reason: FinishReason | None = None
    _longest_stop: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def at_limit(self) -> bool:
        """The row has generated its own ``max_new_tokens`` (decoders then finish it)."""
        return self.max_new_tokens is not None and self.completion_tokens >= self.max_new_tokens

    def push(self, piece: str, n_tokens: int = 1) -> None:
        """Append newly decoded text; marks the row stopped when a stop string completes."""
        if self.done:
            return
        self.completion_tokens += n_tokens
        if not piece:
            return
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        cuts = [i for s in self.stop if (i := self.text.find(s, start)) != -1]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.finish_reason = "stop"

    def finish(self, reason: FinishReason) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason

    def take_delta(self) -> str:
        """Text that is safe to show now (nothing that a later token could turn into a stop)."""
        end = len(self.text)
        if not self.done:
            end -= self._held_back()
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _held_back(self) -> int:
        for j in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-j:]
            if any(s.startswith(tail) for s in self.stop):
                return j
        return 0


@dataclass(frozen=True)
class Joining:
    """Rows that join a running batch at its next step, routed (see :meth:`_Run.join`)."""

    requests: list[Request]
    selections: list[Selection]
    rows: list[RowState]


class _Run:
    """One call in progress: its requests, selections and rows. Iterate it to decode.

    A ``joinable`` run (on an engine whose ``joins_runs`` is true) takes more rows while it
    decodes (:meth:`join`): continuous batching, for servers.
    """

    def __init__(
        self,
        engine: BaseEngine,
        requests: list[Request],
        mixtures: list[Mixture | None],
        params: SamplingParams,
        routing: RoutingConfig,
        rows: list[RowState] | None = None,
        *,
        joinable: bool = False,
    ) -> None:
        self.engine = engine
        self.requests = requests
        self.mixtures = mixtures
        self.params = params
        self.routing = routing
        self.selections: list[Selection] | None = None
        # One RowState per request; a server batching requests passes rows with their own stop
        # strings and max_new_tokens (params.max_new_tokens is then the largest of them).
        self.rows = rows or [RowState(stop=params.stop, text=r.response_prefix) for r in requests]
        self.over = False  # the decode loop has ended (no row can join any more)
        self._inbox: list[Joining] | None = [] if joinable and engine.joins_runs else None
        self._steps: Generator[None, None, None] = self._iterate()

    @property
    def joinable(self) -> bool:
        return self._inbox is not None

    def _iterate(self) -> Generator[None, None, None]:
        self.selections, ahead = self.engine._select_ahead(
            self.requests, self.mixtures, self.routing
        )
        # the rows decoded from the start (rows that join later come through the inbox)
        requests, selections, rows = list(self.requests), list(self.selections), list(self.rows)
        try:
            yield  # the selection is known before the first token
        except GeneratorExit:
            if ahead is not None:
                ahead.discard()
            raise
        extra: dict[str, Any] = {} if self._inbox is None else {"joins": self._take_joins}
        if ahead is not None:
            extra["ahead"] = ahead
        yield from self.engine._decode(requests, selections, self.params, rows, **extra)
        for row in self.rows:
            row.finish("length")

    def _take_joins(self) -> list[Joining]:
        assert self._inbox is not None
        groups, self._inbox[:] = list(self._inbox), []
        return groups

    def join(
        self, requests: list[Request], mixtures: list[Mixture | None], rows: list[RowState]
    ) -> list[Selection]:
        """Add rows to this running batch; returns their selections.

        The rows are routed now (one batched probe) and decode from the next step on, each as it
        would alone. Call it between steps of a joinable run that is not over, with requests of
        the run's sampling settings and routing (rows carry their own stop strings and limits).
        """
        if self._inbox is None:
            raise LoGoError("this run does not take joining rows (joinable=False)")
        if self.selections is None or self.over:
            raise LoGoError("rows can join a run only while it decodes")
        selections = self.engine._select(requests, mixtures, self.routing)
        self.requests.extend(requests)
        self.mixtures.extend(mixtures)
        self.rows.extend(rows)
        self.selections.extend(selections)
        self._inbox.append(Joining(requests, selections, rows))
        return selections

    def step(self) -> bool:
        """Advance by one decoding step; False once the run is over.

        Raises :class:`EngineClosedError` when the engine was closed before the step ended (its
        output may lack the mixture).
        """
        more = next(self._steps, StopIteration) is not StopIteration
        self.over = not more
        if self.engine.closed:
            self.close()
            self.engine._check_open()
        return more

    def run(self) -> list[Generation]:
        """Decode to the end; in an async call's worker, stop at the step after cancellation."""
        cancel = _CANCEL.get()
        while True:
            if cancel is not None and cancel.is_set():
                self.close()
                raise _Cancelled
            if not self.step():
                return self.generations()

    def close(self) -> None:
        """Stop decoding now (a consumer that stopped early); frees the run's state."""
        self.over = True
        self._steps.close()

    def generations(self) -> list[Generation]:
        return [self.generation(i) for i in range(len(self.rows))]

    def generation(self, i: int) -> Generation:
        """The result of row ``i`` (complete once the row is done or the run is over)."""
        assert self.selections is not None  # set by the first step
        request, row = self.requests[i], self.rows[i]
        answer = (
            self.engine._parse_answer(request, row.text)
            if request.has_tools
            else ParsedAnswer(row.text)
        )
        return Generation(
            text=row.text,
            selection=self.selections[i],
            usage=Usage(
                prompt_tokens=request.n_prompt_tokens,
                completion_tokens=row.completion_tokens,
                cached_tokens=row.cached_tokens,
            ),
            finish_reason=row.finish_reason or "length",
            content=answer.content,
            tool_calls=answer.tool_calls,
            invalid_tool_calls=answer.invalid_tool_calls,
        )


class TextStream(Iterator[str]):
    """Text chunks of one generation, from ``engine.stream(...)``.

    ``selection`` is known before the first chunk (reading it runs the probe if iteration has not
    started). ``generation`` (text, usage, finish reason, tool calls) is set once the stream is
    exhausted. Breaking out of a loop and dropping the stream, or calling :meth:`close`, ends the
    generation at once.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._row = run.rows[0]
        self._started = False
        self._finished = False
        self.generation: Generation | None = None

    @property
    def selection(self) -> Selection:
        if not self._started:
            self._started = True
            self._run.step()
        assert self._run.selections is not None
        return self._run.selections[0]

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        if not self._started:
            _ = self.selection
        while not self._finished:
            if not self._run.step():
                self._finished = True
                self.generation = self._run.generations()[0]
            delta = self._row.take_delta()
            if delta:
                return delta
        raise StopIteration

    def close(self) -> None:
        self._finished = True
        self._run.close()

    def __del__(self) -> None:
        self._run.close()


class AsyncTextStream(AsyncIterator[str]):
    """Async form of :class:`TextStream`: each decoding step runs in a worker thread.

    The event loop is never blocked. Cancelling the consuming task, or ``aclose()``, lets the
    in-flight step finish (one token), then closes the run in the worker; nothing is left running.
    """

    def __init__(self, stream: TextStream) -> None:
        self._stream = stream
        self._pending: asyncio.Future[Any] | None = None

    @property
    def selection(self) -> Selection | None:
        """The selection, once the first chunk has arrived (``await aselection()`` to force it)."""
        return self._stream.selection if self._stream._started else None

    async def aselection(self) -> Selection:
        return await self._call(lambda: self._stream.selection)

    @property
    def generation(self) -> Generation | None:
        return self._stream.generation

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        item = await self._call(lambda: next(self._stream, None))
        if item is None:
            raise StopAsyncIteration
        return item

    async def _call(self, fn: Any) -> Any:
        if self._pending is not None:  # a previous step was cancelled mid-flight
            await asyncio.wait([self._pending])
        self._pending = asyncio.ensure_future(asyncio.to_thread(fn))
        try:
            result = await asyncio.shield(self._pending)
        except asyncio.CancelledError:
            await self.aclose()
            raise
        self._pending = None
        return result

    async def aclose(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await asyncio.wait([pending])  # let the running step end before closing
            if not pending.cancelled():
                pending.exception()  # retrieved: it belongs to a step nobody awaits any more
        await asyncio.to_thread(self._stream.close)


class BaseEngine(ABC):
    """Everything an engine offers to callers; concrete engines provide the three primitives."""

    routing: RoutingConfig
    _closed: bool = False

    # ----------------------------------------------------------------- what engines provide
    @property
    @abstractmethod
    def adapter_names(self) -> list[str]:
        """Names of the adapters in the library, in slot order."""

    @property
    @abstractmethod
    def model_name(self) -> str:
        """Name of the base model (for metadata and traces)."""

    @property
    @abstractmethod
    def context_window(self) -> int:
        """Most tokens (prompt + answer) the model accepts."""

    @abstractmethod
    def _prepare(self, prompt: Prompt, tools: Tools | None, tool_choice: ToolChoice) -> Request:
        """Validate, render and tokenize one prompt."""

    @abstractmethod
    def _route(self, requests: list[Request], routing: RoutingConfig) -> list[Selection]:
        """Probe and select for every request (one batched probe)."""

    @abstractmethod
    def _decode(
        self,
        requests: list[Request],
        selections: list[Selection],
        params: SamplingParams,
        rows: list[RowState],
    ) -> Iterator[None]:
        """Generate for all rows with their fixed selections; yield after each step.

        Engines whose :attr:`joins_runs` is true also take ``joins``, a function called between
        steps that returns the :class:`Joining` groups to add to the running batch; their loop
        ends only when no row is left and no group waits.
        """

    @property
    def joins_runs(self) -> bool:
        """Whether rows can join a running batch of this engine (continuous batching)."""
        return False

    # ----------------------------------------------------------------------- life cycle
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called; every call on a closed engine is refused."""
        return self._closed

    def close(self) -> None:
        """Refuse every later call (engines also release what they hold). Idempotent.

        A call in flight stops at its next decoding step with :class:`EngineClosedError`.
        """
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError(
                f"this engine ({self.model_name}) was closed; build a new engine to make calls"
            )

    def _parse_answer(self, request: Request, text: str) -> ParsedAnswer:
        """Split the answer to a request that offered tools (the Hermes format by default)."""
        return parse_answer(text)

    # ----------------------------------------------------------------------- public API
    def route(
        self,
        prompt: Prompt,
        *,
        routing: RoutingConfig | None = None,
        tools: Tools | None = None,
        tool_choice: ToolChoice = None,
    ) -> Selection:
        """Probe only: which adapters would answer ``prompt``, with their weights and scores."""
        return self.route_batch([prompt], routing=routing, tools=tools, tool_choice=tool_choice)[0]

    def route_batch(
        self,
        prompts: Sequence[Prompt],
        *,
        routing: RoutingConfig | None = None,
        tools: Tools | None = None,
        tool_choice: ToolChoice = None,
    ) -> list[Selection]:
        """:meth:`route` for several prompts in one batched probe."""
        self._check_open()
        requests = [self._prepare(p, tools, tool_choice) for p in _as_prompt_list(prompts)]
        routing = self._routing(routing)
        cancel = _CANCEL.get()
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        selections = self._route_for_caller(requests, routing)
        self._check_open()  # closed during the probe: its scores may be wrong
        return selections

    def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 64,
        temperature: float | None = 0.0,
        top_p: float | None = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        adapters: Mixture | None = None,
        routing: RoutingConfig | None = None,
        tools: Tools | None = None,
        tool_choice: ToolChoice = None,
    ) -> Generation:
        """Route ``prompt`` (or use the pinned ``adapters``; ``{}`` = base model) and generate.

        The selection is fixed for the whole generation. ``temperature=0`` decodes greedily;
        otherwise samples with ``seed`` (a per-call generator, so concurrent calls stay
        reproducible). Generation ends at an end-of-turn token, at a ``stop`` string (cut from the
        text) or after ``max_new_tokens``.
        """
        _check_mixture_arg(adapters)
        return self._start(
            [prompt],
            [adapters],
            max_new_tokens,
            temperature,
            top_p,
            seed,
            stop,
            routing,
            tools,
            tool_choice,
        ).run()[0]

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 64,
        temperature: float | None = 0.0,
        top_p: float | None = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        adapters: BatchMixture = None,
        routing: RoutingConfig | None = None,
        tools: Tools | None = None,
        tool_choice: ToolChoice = None,
    ) -> list[Generation]:
        """:meth:`generate` for several prompts in one batch; every row has its own selection.

        ``adapters`` is one pinned mixture for all rows, or a list with one entry per row (a
        mixture, or ``None`` to route that row).
        """
        prompts = _as_prompt_list(prompts)
        mixtures = _per_row_mixtures(adapters, len(prompts))
        return self._start(
            prompts,
            mixtures,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            stop,
            routing,
            tools,
            tool_choice,
        ).run()

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 64,
        temperature: float | None = 0.0,
        top_p: float | None = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        adapters: Mixture | None = None,
        routing: RoutingConfig | None = None,
        tools: Tools | None = None,
        tool_choice: ToolChoice = None,
    ) -> TextStream:
        """:meth:`generate`, as a :class:`TextStream` of text chunks (no thread involved)."""
        _check_mixture_arg(adapters)
        return TextStream(
            self._start(
                [prompt],
                [adapters],
                max_new_tokens,
                temperature,
                top_p,
                seed,
                stop,
                routing,
                tools,
                tool_choice,
            )
        )

    async def agenerate(self, prompt: Prompt, **kwargs: Any) -> Generation:
        """:meth:`generate` in a worker thread; the event loop keeps running.

        Cancelling the awaiting task stops the generation at its next decoding step; the
        cancellation returns once the worker has stopped.
        """
        return await _in_worker(lambda: self.generate(prompt, **kwargs))

    async def agenerate_batch(self, prompts: Sequence[Prompt], **kwargs: Any) -> list[Generation]:
        """:meth:`generate_batch` in a worker thread; cancellable like :meth:`agenerate`."""
        return await _in_worker(lambda: self.generate_batch(prompts, **kwargs))

    async def aroute(self, prompt: Prompt, **kwargs: Any) -> Selection:
        """:meth:`route` in a worker thread; a cancelled call never starts its probe late."""
        return await _in_worker(lambda: self.route(prompt, **kwargs))

    def astream(self, prompt: Prompt, **kwargs: Any) -> AsyncTextStream:
        """:meth:`stream` for ``async for``; each step runs in a worker thread.

        Arguments are validated here, before the first ``await``.
        """
        return AsyncTextStream(self.stream(prompt, **kwargs))

    def count_tokens(self, prompt: Prompt, *, tools: Tools | None = None) -> int:
        """Number of tokens the model sees for ``prompt``."""
        self._check_open()
        return self._prepare(prompt, tools, None).n_prompt_tokens

    # --------------------------------------------------------------------- internals
    def _routing(self, routing: RoutingConfig | None) -> RoutingConfig:
        if routing is None:
            return self.routing
        if not isinstance(routing, RoutingConfig):
            raise InvalidRequestError(
                f"routing must be a RoutingConfig, got {type(routing).__name__}"
            )
        return routing

    def _start(
        self,
        prompts: Sequence[Prompt],
        mixtures: list[Mixture | None],
        max_new_tokens: int,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        stop: str | Sequence[str] | None,
        routing: RoutingConfig | None,
        tools: Tools | None,
        tool_choice: ToolChoice,
    ) -> _Run:
        self._check_open()
        params = SamplingParams.build(max_new_tokens, temperature, top_p, seed, stop)
        routing = self._routing(routing)
        requests = [self._prepare(p, tools, tool_choice) for p in prompts]
        self._check_fits(requests, params.max_new_tokens)
        self._check_selection(mixtures, routing)
        return _Run(self, requests, mixtures, params, routing)

    def _check_fits(self, requests: list[Request], max_new_tokens: int) -> None:
        """Refuse prompts that, with ``max_new_tokens``, overflow the context window."""
        for i, request in enumerate(requests):
            needed = request.n_prompt_tokens + max_new_tokens
            if needed > self.context_window:
                row = f" (row {i})" if len(requests) > 1 else ""
                raise ContextLengthError(
                    f"prompt{row} has {request.n_prompt_tokens} tokens; with max_new_tokens="
                    f"{max_new_tokens} that is {needed} > the context window "
                    f"({self.context_window})"
                )

    def _check_selection(self, mixtures: list[Mixture | None], routing: RoutingConfig) -> None:
        """Validate pinned mixtures and routing, so a bad call (or stream) fails before work."""
        for mixture in mixtures:
            if mixture is not None:
                pinned_selection(mixture, self.adapter_names)
        if any(m is None for m in mixtures):
            self._validate_routing(routing)

    def _validate_routing(self, routing: RoutingConfig) -> None:
        """Refuse a routing config that cannot run on this engine (engines add their checks)."""
        check_top_k(routing, len(self.adapter_names))

    def _route_for_caller(self, requests: list[Request], routing: RoutingConfig) -> list[Selection]:
        """:meth:`_route` for :meth:`route` (engines may start work for a generate to follow)."""
        return self._route(requests, routing)

    def _select_ahead(
        self, requests: list[Request], mixtures: list[Mixture | None], routing: RoutingConfig
    ) -> tuple[list[Selection], WorkAhead | None]:
        """:meth:`_select`, and work an engine started before the selection was known.

        That work (e.g. a prompt pass under the mixture the call will probably keep) goes to
        :meth:`_decode` as ``ahead``, which takes it or discards it; engines that start none
        return None here and never get an ``ahead``.
        """
        return self._select(requests, mixtures, routing), None

    def _select(
        self, requests: list[Request], mixtures: list[Mixture | None], routing: RoutingConfig
    ) -> list[Selection]:
        """Pinned rows keep their mixture; the other rows share one batched probe."""
        selections: list[Selection | None] = [
            None if m is None else pinned_selection(m, self.adapter_names) for m in mixtures
        ]
        routed = [i for i, s in enumerate(selections) if s is None]
        if routed:
            for i, s in zip(
                routed, self._route([requests[i] for i in routed], routing), strict=True
            ):
                selections[i] = s
        return [s for s in selections if s is not None]


async def _in_worker(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a worker thread; on cancellation, stop it at its next step and wait for it.

    ``fn``'s runs read a cancel flag (a ContextVar set in the worker) before every decoding step,
    so a cancelled call costs at most the step in flight, and nothing keeps running afterwards.
    """
    cancel = threading.Event()

    def work() -> T:
        token = _CANCEL.set(cancel)
        try:
            return fn()
        finally:
            _CANCEL.reset(token)

    future = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        await asyncio.wait([future])  # the step in flight ends, then the worker returns
        if not future.cancelled():
            future.exception()  # retrieved: _Cancelled, or the error of a step nobody awaits
        raise


def _as_prompt_list(prompts: Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise InvalidRequestError(
            f"prompts must be a list of prompts, got {type(prompts).__name__}"
        )
    if not prompts:
        raise InvalidRequestError("prompts is empty")
    return list(prompts)


def _check_mixture_arg(adapters: Any) -> None:
    if adapters is not None and not isinstance(adapters, Mapping):
        raise InvalidRequestError(
            f"adapters must be a mapping {{name: weight}} or None, got {type(adapters).__name__}"
        )


def _per_row_mixtures(adapters: BatchMixture, n_rows: int) -> list[Mixture | None]:
    if adapters is None or isinstance(adapters, Mapping):
        return [adapters] * n_rows
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
        raise InvalidRequestError(
            f"adapters must be a mapping, a list of mappings (one per row) or None, "
            f"got {adapters!r}"
        )
    if len(adapters) != n_rows:
        raise InvalidRequestError(f"adapters has {len(adapters)} entries for {n_rows} prompts")
    for a in adapters:
        _check_mixture_arg(a)
    return list(adapters)

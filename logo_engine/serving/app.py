"""The OpenAI-compatible HTTP app of ``logo serve`` (FastAPI).

:func:`create_app` serves one engine (any :class:`~logo_engine.base.BaseEngine`, or a function that
loads one: the app then answers 503 until it is loaded):

- ``POST /v1/chat/completions``, ``POST /v1/completions``: OpenAI's API, plus the ``logo``
  request/response field (see :mod:`logo_engine.serving.protocol`) and the ``x-logo-adapters``
  response header; ``stream=true`` answers with server-sent events ending in ``data: [DONE]``.
- ``GET /v1/models``: the routed model and one ``<model>:<adapter>`` entry per adapter.
- ``POST /v1/logo/route`` (probe only), ``POST /v1/logo/count_tokens``, ``GET /v1/logo/info``.
- ``GET /healthz``, ``GET /metrics`` (Prometheus; both without the API key).

Generation requests become :class:`~logo_engine.serving.batcher.Job` rows that a job runner (the
local :class:`~logo_engine.serving.batcher.Batcher`, or Ray Serve's ``@serve.batch``) decodes in
batches; each row's text is streamed back as it is generated. A client that disconnects cancels
its row.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from logo_engine.base import BaseEngine
from logo_engine.chat import Prompt, has_chat_template
from logo_engine.errors import InvalidRequestError, LoGoError, RemoteError
from logo_engine.selection import pinned_selection
from logo_engine.serving import openai_api as oa
from logo_engine.serving.batcher import Batcher, Failed, Finished, Job, Lanes, Selected
from logo_engine.serving.metrics import CONTENT_TYPE, Metrics
from logo_engine.serving.protocol import (
    ADAPTERS_HEADER,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    CountTokensRequest,
    ErrorBody,
    ErrorResponse,
    LogoResult,
    ModelCard,
    ModelList,
    RouteRequest,
    ServerInfo,
    adapters_header,
    new_id,
    now,
)
from logo_engine.serving.streams import chat_stream, completion_stream, dump, total_usage
from logo_engine.types import Generation, Selection

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024  # default bound on a request body


class JobRunner(Protocol):
    """Runs queued jobs in batches (the local Batcher, or a Ray Serve replica's batch method)."""

    def submit(self, job: Job) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server."""

    api_key: str | None = None  # required as "Authorization: Bearer <key>" on /v1 when set
    max_batch_size: int = 8  # rows per engine batch
    batch_wait_ms: float = 10.0  # how long a batch waits for more rows after its first arrived
    continuous_batching: bool = True  # rows may join a running batch (engines that allow it)
    lanes: int = 1  # batches side by side, the CPU threads split between them (batcher.Lanes)
    served_model_name: str | None = None  # the routed model's name (default: engine.model_name)
    max_body_bytes: int = MAX_BODY_BYTES  # larger request bodies get a 413


@dataclass
class ServerState:
    """What the handlers share: the engine once loaded, its job runner, metrics."""

    config: ServeConfig
    metrics: Metrics = field(default_factory=Metrics)
    engine: BaseEngine | None = None
    runner: JobRunner | None = None
    load_error: str | None = None

    @property
    def model_name(self) -> str:
        assert self.engine is not None
        return self.config.served_model_name or self.engine.model_name

    def ready(self) -> tuple[BaseEngine, JobRunner]:
        """The engine and runner, or a 503 while loading (or after a failed load)."""
        if self.engine is None or self.runner is None:
            if self.load_error is not None:
                raise RemoteError(f"the model failed to load: {self.load_error}")
            raise RemoteError("the model is still loading; retry shortly (GET /healthz)")
        return self.engine, self.runner


EngineSource = Union[BaseEngine, Callable[[], BaseEngine]]
RunnerFactory = Callable[[BaseEngine, ServerState], JobRunner]


def local_runner(engine: BaseEngine, state: ServerState) -> JobRunner:
    """The default job runner: :class:`Batcher` threads in this process (``lanes`` of them)."""
    config = state.config
    options: dict[str, Any] = dict(
        max_batch_size=config.max_batch_size,
        batch_wait_ms=config.batch_wait_ms,
        observer=state.metrics,
        continuous=config.continuous_batching,
    )
    if config.lanes > 1:
        return Lanes(engine, lanes=config.lanes, **options)
    return Batcher(engine, **options)


def create_app(
    engine: EngineSource,
    config: ServeConfig | None = None,
    *,
    runner: RunnerFactory = local_runner,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app serving ``engine`` (an engine, or a function loading one in a background thread).

    ``runner`` builds the job runner once the engine is there (default: a local
    :class:`Batcher`). ``on_load_error`` is called if the loader fails (the app keeps answering
    503 with the error).
    """
    state = ServerState(config or ServeConfig())

    def install(loaded: BaseEngine) -> None:
        state.runner = runner(loaded, state)
        state.engine = loaded

    def load(loader: Callable[[], BaseEngine]) -> None:
        try:
            install(loader())
        except Exception as exc:  # reported by /healthz and every /v1 call (503)
            logger.exception("the model failed to load")
            state.load_error = f"{type(exc).__name__}: {exc}"
            if on_load_error is not None:
                on_load_error(exc)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(engine, BaseEngine):
            install(engine)
        else:
            threading.Thread(target=load, args=(engine,), name="logo-load", daemon=True).start()
        try:
            yield
        finally:
            if state.runner is not None:
                await asyncio.to_thread(state.runner.close)

    app = FastAPI(
        title="LoGo",
        description="OpenAI-compatible server with per-request LoRA routing (LoGo)",
        lifespan=lifespan,
    )
    app.state.logo = state
    app.add_middleware(_Guard, state=state)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


# ------------------------------------------------------------------------------ errors
def error_response(
    status: int, message: str, kind: str, code: str | None, param: str | None = None
) -> JSONResponse:
    """An OpenAI-shaped error."""
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def exception_response(exc: BaseException) -> JSONResponse:
    """The OpenAI-shaped error of an exception raised while serving (500s are logged)."""
    status, kind, code = oa.error_info(exc)
    if status >= 500 and not isinstance(exc, RemoteError):
        logger.error("request failed: %r", exc, exc_info=exc)
    return error_response(status, str(exc) or type(exc).__name__, kind, code)


def _add_error_handlers(app: FastAPI) -> None:
    async def on_logo_error(request: Request, exc: Exception) -> Response:
        return exception_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        parts = []
        for error in errors[:5]:
            where = ".".join(str(x) for x in error.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {error.get('msg')}")
        first = errors[0].get("loc", ()) if errors else ()
        param = ".".join(str(x) for x in first if x != "body") or None
        return error_response(
            400, "; ".join(parts), "invalid_request_error", "invalid_request", param
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind, None)

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it: the client is gone (nginx's code)

    app.add_exception_handler(ClientDisconnected, on_disconnect)
    app.add_exception_handler(LoGoError, on_logo_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


class _Guard:
    """ASGI middleware: body size bound, API key on /v1, request metrics."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        metrics = self.state.metrics
        start = time.perf_counter()
        status = {"code": 500}

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            response = self._refusal(scope)
            if response is None:
                receive, response = await self._bounded(scope, receive)
            if response is not None:
                await response(scope, receive, send_recording)
            else:
                await self.app(scope, receive, send_recording)
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(endpoint, str(status["code"])).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    def _refusal(self, scope: Scope) -> Response | None:
        key = self.state.config.api_key
        if not key or not scope["path"].startswith("/v1"):
            return None
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return None
        message = "missing API key" if not given else "invalid API key"
        return error_response(
            401,
            f"{message}: send 'Authorization: Bearer <key>'",
            "authentication_error",
            "invalid_api_key",
        )

    async def _bounded(self, scope: Scope, receive: Receive) -> tuple[Receive, Response | None]:
        """Read the body up to the bound; replay it to the app, then pass through (disconnects)."""
        limit = self.state.config.max_body_bytes
        too_large = error_response(
            413,
            f"request body is larger than {limit} bytes",
            "invalid_request_error",
            "request_too_large",
        )
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return receive, too_large
        if scope["method"] in ("GET", "HEAD"):
            return receive, None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending
                return receive, Response(status_code=400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return receive, too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


_ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/logo/route",
        "/v1/logo/count_tokens",
        "/v1/logo/info",
        "/healthz",
        "/metrics",
    }
)


# ------------------------------------------------------------------------------ routes
def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/healthz")
    async def healthz() -> Response:
        if state.engine is not None and state.runner is not None:
            body = {
                "status": "ok",
                "model": state.model_name,
                "adapters": len(state.engine.adapter_names),
            }
            return JSONResponse(body)
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error}, 503)
        return JSONResponse({"status": "loading"}, 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        engine, _ = state.ready()
        name, created = state.model_name, now()
        cards = [ModelCard(id=name, created=created, root=engine.model_name)]
        cards += [
            ModelCard(id=f"{name}:{a}", created=created, parent=name, root=engine.model_name)
            for a in engine.adapter_names
        ]
        return ModelList(data=cards)

    @app.get("/v1/logo/info")
    async def info() -> ServerInfo:
        engine, _ = state.ready()
        routing = {k: v for k, v in asdict(engine.routing).items() if not callable(v)}
        return ServerInfo(
            model=state.model_name,
            adapters=engine.adapter_names,
            context_window=engine.context_window,
            routing=routing,
            max_batch_size=state.config.max_batch_size,
            chat_template=_chat_template(engine),
        )

    @app.post("/v1/logo/count_tokens")
    async def count_tokens(body: CountTokensRequest) -> dict[str, int]:
        engine, _ = state.ready()
        _check_model(body.model, state)
        prompt = _one_prompt(body.messages, body.prompt)
        tokens = await asyncio.to_thread(
            engine.count_tokens, prompt, tools=oa.tool_schemas(body.tools)
        )
        return {"tokens": tokens}

    @app.post("/v1/logo/route")
    async def route(body: RouteRequest) -> Response:
        engine, _ = state.ready()
        mixture = oa.target_mixture(body.model, body.logo, state.model_name, engine.adapter_names)
        routing = oa.routing_config(
            engine.routing, body.logo.routing if body.logo is not None else None
        )
        if body.prompts is not None:
            if body.messages is not None or body.prompt is not None:
                raise InvalidRequestError("pass one of messages, prompt and prompts")
            prompts: list[Prompt] = [
                p if isinstance(p, str) else oa.engine_messages(p) for p in body.prompts
            ]
        else:
            prompts = [_one_prompt(body.messages, body.prompt)]
        tools, choice = oa.tool_schemas(body.tools), oa.tool_choice(body.tool_choice)
        if mixture is not None:
            for prompt in prompts:  # the prompt is still validated
                await asyncio.to_thread(engine.count_tokens, prompt, tools=tools)
            selections = [pinned_selection(mixture, engine.adapter_names)] * len(prompts)
        else:
            selections = await asyncio.to_thread(
                engine.route_batch, prompts, routing=routing, tools=tools, tool_choice=choice
            )
        for selection in selections:
            state.metrics.selected(selection)
        content: dict[str, Any]
        if body.prompts is not None:
            content = {"selections": [s.model_dump(mode="json") for s in selections]}
        else:
            content = {"selection": selections[0].model_dump(mode="json")}
        return JSONResponse(content, headers=_selection_headers(selections))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine, runner = state.ready()
        oa.refuse_unsupported(body)
        tools = oa.tool_schemas(body.tools)
        job = await _job(
            state,
            engine,
            body,
            oa.engine_messages(body.messages),
            tools,
            oa.tool_choice(body.tool_choice) if tools else None,
            body.max_completion_tokens or body.max_tokens,
        )
        hold_tool_calls = bool(tools) and body.tool_choice != "none"
        start = time.perf_counter()
        selection = await _start([job], runner, request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = chat_stream(
                job, selection[0], body.model, hold_tool_calls, include_usage, state.metrics, start
            )
            return _sse(stream, [job], selection)
        (generation,) = await _collect([job], request)
        response = ChatCompletion(
            id=new_id("chatcmpl"),
            created=now(),
            model=body.model,
            choices=[
                ChatChoice(
                    index=0,
                    message=oa.assistant_message(generation),
                    finish_reason=oa.finish_reason(generation),  # type: ignore[arg-type]
                )
            ],
            usage=oa.usage_out(generation.usage),
            logo=oa.logo_result(generation),
        )
        return JSONResponse(dump(response), headers=_selection_headers(selection))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine, runner = state.ready()
        oa.refuse_unsupported(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise InvalidRequestError("prompt is an empty list")
        jobs = [await _job(state, engine, body, p, None, None, body.max_tokens) for p in prompts]
        start = time.perf_counter()
        selections = await _start(jobs, runner, request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = completion_stream(
                jobs, selections, body.model, include_usage, state.metrics, start
            )
            return _sse(stream, jobs, selections)
        generations = await _collect(jobs, request)
        response = Completion(
            id=new_id("cmpl"),
            created=now(),
            model=body.model,
            choices=[
                CompletionChoice(index=i, text=g.text, finish_reason=g.finish_reason)
                for i, g in enumerate(generations)
            ],
            usage=oa.usage_out(total_usage(generations)),
            logo=_logo_result([g.selection for g in generations]),
        )
        return JSONResponse(dump(response), headers=_selection_headers(selections))


def _chat_template(engine: BaseEngine) -> bool:
    """Whether the engine's model reads chat messages (an engine without a tokenizer: yes)."""
    tokenizer = getattr(engine, "tokenizer", None)
    return tokenizer is None or has_chat_template(tokenizer)


def _check_model(model: str | None, state: ServerState) -> None:
    assert state.engine is not None
    oa.target_mixture(model, None, state.model_name, state.engine.adapter_names)


def _one_prompt(messages: Any, prompt: str | None) -> Prompt:
    if (messages is None) == (prompt is None):
        raise InvalidRequestError("pass exactly one of messages and prompt")
    return prompt if prompt is not None else oa.engine_messages(messages)


async def _job(
    state: ServerState,
    engine: BaseEngine,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: Prompt,
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    max_tokens: int | None,
) -> Job:
    """Validate one row of a request (400/404/413 before anything runs) and make its job."""
    mixture = oa.target_mixture(body.model, body.logo, state.model_name, engine.adapter_names)
    routing = oa.routing_config(
        engine.routing, body.logo.routing if body.logo is not None else None
    )
    prepared = await asyncio.to_thread(engine._prepare, prompt, tools, tool_choice)
    params = oa.sampling_params(body, max_tokens, prepared.n_prompt_tokens, engine.context_window)
    engine._check_fits([prepared], params.max_new_tokens)
    engine._check_selection([mixture], routing)
    return Job(prepared, mixture, routing, params, asyncio.get_running_loop())


async def _start(jobs: Sequence[Job], runner: JobRunner, request: Request) -> list[Selection]:
    """Queue the jobs and wait for their selections (the first event of each row)."""
    for job in jobs:
        runner.submit(job)
    try:
        firsts = await _or_disconnect(asyncio.gather(*(j.events.get() for j in jobs)), request)
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    selections = []
    for event in firsts:
        if isinstance(event, Failed):
            for other in jobs:
                other.cancel()
            raise event.error
        assert isinstance(event, Selected)
        selections.append(event.selection)
    return selections


async def _collect(jobs: Sequence[Job], request: Request) -> list[Generation]:
    """The rows' generations (non-streaming requests); a disconnect cancels the rows."""

    async def finished(job: Job) -> Generation:
        async for event in job.stream():
            if isinstance(event, Finished):
                return event.generation
            if isinstance(event, Failed):
                raise event.error
        raise RuntimeError("a row ended without a result")  # pragma: no cover

    try:
        return list(await _or_disconnect(asyncio.gather(*map(finished, jobs)), request))
    finally:
        for job in jobs:
            job.cancel()  # no-op for a finished row


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


async def _or_disconnect(awaitable: Awaitable[Any], request: Request) -> Any:
    """Await ``awaitable``, unless the client disconnects first (then ClientDisconnected)."""

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    work = asyncio.ensure_future(awaitable)
    work.add_done_callback(_retrieve)  # a cancelled gather's error is not "never retrieved"
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    raise ClientDisconnected


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _selection_headers(selections: Sequence[Selection]) -> dict[str, str]:
    return {ADAPTERS_HEADER: ";".join(adapters_header(s) for s in selections)}


def _logo_result(selections: Sequence[Selection]) -> LogoResult:
    if len(selections) == 1:
        return LogoResult(selection=selections[0])
    return LogoResult(selection=selections[0], selections=list(selections))


# ----------------------------------------------------------------------------- streams
def _sse(
    stream: AsyncIterator[str], jobs: Sequence[Job], selections: Sequence[Selection]
) -> StreamingResponse:
    """A server-sent-event response; its rows are cancelled when the client goes away."""

    def cancel_all() -> None:
        for job in jobs:
            job.cancel()

    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", **_selection_headers(selections)},
        background=BackgroundTask(cancel_all),
    )

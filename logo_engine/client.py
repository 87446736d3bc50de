"""RemoteEngine: the engine surface over HTTP, for a model served by ``logo serve``.

:class:`RemoteEngine` is a :class:`~logo_engine.base.BaseEngine`: ``route``, ``route_batch``,
``generate``, ``generate_batch``, ``stream`` (with ``.selection`` before the first chunk),
``agenerate``, ``astream``, ``count_tokens``, ``adapter_names``, ``model_name``,
``context_window`` and ``routing`` behave as on a local engine and return the same
:class:`~logo_engine.Selection` and :class:`~logo_engine.Generation` objects, so ChatLoGo, LoGoLLM
and any code written against the engine work unchanged against a server. It needs ``httpx`` and
never imports torch or transformers.

Where it lives: in ``logo_engine``, next to the engine it stands in for (not in
``logo_integrations``), because it is an engine (usable without LangChain or LlamaIndex) and it
shares the wire format (:mod:`logo_engine.serving.protocol`) with the server.

Mapping to the server: a string prompt without tools goes to ``/v1/completions`` (answered as
``engine.generate(string)``), anything else to ``/v1/chat/completions``; pinned mixtures and
routing travel in the request's ``logo`` field; the selection comes back in the response's.
``generate_batch`` sends its rows concurrently (the server batches them). Errors come back as the
same :class:`~logo_engine.LoGoError` classes (from the error ``code``), plus
:class:`~logo_engine.errors.AuthenticationError` and :class:`~logo_engine.errors.RemoteError`.

Differences from a local engine: a stream's chunks never hold tool-call markup (the server holds
it back; the final ``Generation`` has the raw ``text``, ``content``, ``tool_calls`` and
``invalid_tool_calls`` as in-process); ``tokenizer`` and ``model`` are not available.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from typing import Any

import httpx

from logo_engine.base import (
    AsyncTextStream,
    BaseEngine,
    Mixture,
    Request,
    RowState,
    SamplingParams,
    TextStream,
    Tools,
    _as_prompt_list,
    _check_mixture_arg,
    _per_row_mixtures,
    _Run,
)
from logo_engine.chat import Prompt, ToolChoice, normalize_messages
from logo_engine.errors import InvalidRequestError, LoGoError, RemoteError
from logo_engine.serving.openai_api import error_class
from logo_engine.serving.protocol import ServerInfo, read_selection
from logo_engine.types import (
    FinishReason,
    Generation,
    InvalidToolCall,
    RoutingConfig,
    Selection,
    ToolCall,
    Usage,
)

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
RETRY_STATUSES = frozenset({502, 503, 504})  # the server is loading or a proxy hiccupped


class RemoteEngine(BaseEngine):
    """An engine served by ``logo serve`` (see module docstring).

    Args:
        base_url: the server's OpenAI base URL, e.g. ``"http://host:8000/v1"``.
        api_key: sent as ``Authorization: Bearer <key>`` (default: env ``LOGO_API_KEY``).
        model: the served model name to request (default: the server's routed model).
        timeout: seconds per request (connect: 10 s).
        max_retries: retries on connection errors and 502/503/504 (a loading server), with
            exponential backoff.
        max_concurrency: most requests in flight from one ``generate_batch``.
        headers: extra HTTP headers.

    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
        max_concurrency: int = 16,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InvalidRequestError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("LOGO_API_KEY")
        self._headers = {**(headers or {})}
        if key:
            self._headers["authorization"] = f"Bearer {key}"
        self._timeout = DEFAULT_TIMEOUT if timeout is None else httpx.Timeout(timeout, connect=10)
        self._model = model
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self._client: httpx.Client | None = None
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]
        self._aclients = weakref.WeakKeyDictionary()
        self._info: ServerInfo | None = None

    # ------------------------------------------------------------------- server facts
    @property
    def info(self) -> ServerInfo:
        """What the server serves (fetched once; :meth:`refresh` to fetch again)."""
        if self._info is None:
            self._info = ServerInfo.model_validate(self._request("GET", "/logo/info").json())
        return self._info

    def refresh(self) -> ServerInfo:
        """Fetch the server's model, adapters and routing again."""
        self._info = None
        return self.info

    @property
    def adapter_names(self) -> list[str]:
        return list(self.info.adapters)

    @property
    def model_name(self) -> str:
        return self._model or self.info.model

    @property
    def context_window(self) -> int:
        return self.info.context_window

    @property
    def chat_template(self) -> bool:
        """Whether the served model reads chat messages (False: plain text prompts only)."""
        return self.info.chat_template

    @property
    def routing(self) -> RoutingConfig:  # type: ignore[override]
        """The server's routing defaults (fields this client does not know are dropped)."""
        known = {f.name for f in fields(RoutingConfig)}
        return RoutingConfig(**{k: v for k, v in self.info.routing.items() if k in known})

    def close(self) -> None:
        """Close the HTTP connections; later calls are refused (the server is left running)."""
        super().close()
        if self._client is not None:
            self._client.close()
            self._client = None

    # -------------------------------------------------------------------- primitives
    def _prepare(self, prompt: Prompt, tools: Tools | None, tool_choice: ToolChoice) -> Request:
        normalize_messages(prompt)  # validated here; rendered and tokenized by the server
        tools = list(tools or []) if tool_choice != "none" else []
        return Request(
            text="",
            n_prompt_tokens=0,  # known once the server answers (usage)
            has_tools=bool(tools),
            input_ids=_Payload(prompt, _openai_tools(tools), tool_choice),
        )

    def _route(self, requests: list[Request], routing: RoutingConfig) -> list[Selection]:
        first: _Payload = requests[0].input_ids
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompts": [r.input_ids.prompt for r in requests],
            "logo": {"routing": _routing_json(routing)},
        }
        if first.tools:
            body["tools"] = first.tools
            body["tool_choice"] = _openai_tool_choice(first.tool_choice)
        data = self._request("POST", "/logo/route", json=body).json()
        return [read_selection(s) for s in data["selections"]]

    def _decode(
        self,
        requests: list[Request],
        selections: list[Selection],
        params: SamplingParams,
        rows: list[RowState],
    ) -> Iterator[None]:
        """Not used: a remote run routes and decodes on the server in one request (_start)."""
        raise NotImplementedError("RemoteEngine decodes on the server; see RemoteEngine._start")

    def _validate_routing(self, routing: RoutingConfig) -> None:
        pass  # the server validates (400 invalid_routing)

    # -------------------------------------------------------------------- public API
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
        routing = self._routing(routing) if routing is not None else None
        requests = [self._prepare(p, tools, tool_choice) for p in prompts]
        bodies = [
            self._body(r.input_ids, m, params, routing)
            for r, m in zip(requests, mixtures, strict=True)
        ]
        return _RemoteRun(self, requests, mixtures, params, routing or RoutingConfig(), bodies)

    def stream(self, prompt: Prompt, **kwargs: Any) -> TextStream:
        """:meth:`generate` as a stream; the request is sent (and checked) here."""
        stream = super().stream(prompt, **kwargs)
        _ = stream.selection  # opens the stream: a bad request fails now, as in-process
        return stream

    def astream(self, prompt: Prompt, **kwargs: Any) -> AsyncTextStream:
        """:meth:`stream` for ``async for``, on an async HTTP connection (no worker threads)."""
        run = self._remote_run(prompt, kwargs)  # arguments checked here, before the first await
        return _AsyncRemoteStream(self, run.paths[0], run.bodies[0])

    async def agenerate(self, prompt: Prompt, **kwargs: Any) -> Generation:
        """:meth:`generate` on an async HTTP connection."""
        run = self._remote_run(prompt, kwargs)
        response = await self._arequest("POST", run.paths[0], json=run.bodies[0])
        return _generation(response.json())

    async def agenerate_batch(self, prompts: Sequence[Prompt], **kwargs: Any) -> list[Generation]:
        """:meth:`generate_batch` with concurrent async requests (the server batches them)."""
        prompts = _as_prompt_list(prompts)
        mixtures = _per_row_mixtures(kwargs.pop("adapters", None), len(prompts))
        calls = [
            self.agenerate(p, adapters=m, **kwargs) for p, m in zip(prompts, mixtures, strict=True)
        ]
        return list(await asyncio.gather(*calls))

    def _remote_run(self, prompt: Prompt, kwargs: Mapping[str, Any]) -> _RemoteRun:
        """The one-row run of ``generate(prompt, **kwargs)``, validated, not sent."""
        kwargs = dict(kwargs)
        adapters = kwargs.pop("adapters", None)
        _check_mixture_arg(adapters)
        unknown = sorted(set(kwargs) - set(_START_DEFAULTS))
        if unknown:
            raise TypeError(f"unexpected keyword arguments {unknown}")
        run = self._start([prompt], [adapters], **{**_START_DEFAULTS, **kwargs})
        assert isinstance(run, _RemoteRun)
        return run

    async def aroute(self, prompt: Prompt, **kwargs: Any) -> Selection:
        """:meth:`route` on an async HTTP connection."""
        self._check_open()
        routing = self._routing(kwargs.get("routing"))
        request = self._prepare(prompt, kwargs.get("tools"), kwargs.get("tool_choice"))
        payload: _Payload = request.input_ids
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompts": [payload.prompt],
            "logo": {"routing": _routing_json(routing)},
        }
        if payload.tools:
            body["tools"] = payload.tools
            body["tool_choice"] = _openai_tool_choice(payload.tool_choice)
        response = await self._arequest("POST", "/logo/route", json=body)
        return read_selection(response.json()["selections"][0])

    def count_tokens(self, prompt: Prompt, *, tools: Tools | None = None) -> int:
        """Number of tokens the served model sees for ``prompt`` (asked from the server)."""
        self._check_open()
        normalize_messages(prompt)
        body: dict[str, Any] = {"model": self.model_name}
        if isinstance(prompt, str):
            body["prompt"] = prompt
        else:
            body["messages"] = list(prompt)
        if tools:
            body["tools"] = _openai_tools(list(tools))
        return int(self._request("POST", "/logo/count_tokens", json=body).json()["tokens"])

    # ---------------------------------------------------------------------- requests
    def _body(
        self,
        payload: _Payload,
        mixture: Mixture | None,
        params: SamplingParams,
        routing: RoutingConfig | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        logo: dict[str, Any] = {}
        if mixture is not None:
            logo["adapters"] = dict(mixture)
        if routing is not None:
            logo["routing"] = _routing_json(routing)
        if logo:
            body["logo"] = logo
        if payload.chat:
            prompt = payload.prompt
            body["messages"] = (
                [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            )
            if payload.tools:
                body["tools"] = payload.tools
                if payload.tool_choice is not None:
                    body["tool_choice"] = _openai_tool_choice(payload.tool_choice)
        else:
            body["prompt"] = payload.prompt
        return body

    @property
    def client(self) -> httpx.Client:
        """The synchronous HTTP client (created on first use)."""
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.base_url, headers=self._headers, timeout=self._timeout
            )
        return self._client

    def _aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:  # one per event loop: connections belong to the loop that made them
            client = httpx.AsyncClient(
                base_url=self.base_url, headers=self._headers, timeout=self._timeout
            )
            self._aclients[loop] = client
        return client

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise RemoteError(f"cannot reach {self.base_url}: {exc!r}") from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                    return _checked(response)
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _arequest(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._aclient().request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise RemoteError(f"cannot reach {self.base_url}: {exc!r}") from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                    return _checked(response)
            await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _open_stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        request = self.client.build_request("POST", path, json=body)
        try:
            response = self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise RemoteError(f"cannot reach {self.base_url}: {exc!r}") from exc
        if response.status_code >= 400:
            response.read()
            response.close()
            _checked(response)
        return response

    def __repr__(self) -> str:
        return f"RemoteEngine({self.base_url!r})"


# ------------------------------------------------------------------------ remote runs
class _Payload:
    """What a prepared remote request holds: the prompt and its tools, as sent."""

    def __init__(self, prompt: Prompt, tools: list[dict[str, Any]], tool_choice: ToolChoice):
        self.prompt = prompt
        self.tools = tools
        self.tool_choice = tool_choice

    @property
    def chat(self) -> bool:
        """Whether the request goes to /chat/completions (messages, or tools)."""
        return not isinstance(self.prompt, str) or bool(self.tools)


class _RemoteRun(_Run):
    """A run whose rows the server answers.

    ``run()`` sends the rows concurrently; stepping (``TextStream``) reads one row's SSE stream
    event by event.
    """

    def __init__(
        self,
        engine: RemoteEngine,
        requests: list[Request],
        mixtures: list[Mixture | None],
        params: SamplingParams,
        routing: RoutingConfig,
        bodies: list[dict[str, Any]],
    ) -> None:
        super().__init__(
            engine, requests, mixtures, params, routing, rows=[RowState() for _ in requests]
        )
        self.remote = engine
        self.bodies = bodies
        self.paths = ["/chat/completions" if "messages" in b else "/completions" for b in bodies]
        self._generations: list[Generation] | None = None
        self._answer: _Answer | None = None
        self._events: Iterator[dict[str, Any]] | None = None
        self._response: httpx.Response | None = None

    def run(self) -> list[Generation]:
        def one(i: int) -> Generation:
            return _generation(
                self.remote._request("POST", self.paths[i], json=self.bodies[i]).json()
            )

        if len(self.bodies) == 1:
            generations = [one(0)]
        else:
            workers = min(len(self.bodies), self.remote.max_concurrency)
            with ThreadPoolExecutor(workers, thread_name_prefix="logo-remote") as pool:
                generations = list(pool.map(one, range(len(self.bodies))))
        self.selections = [g.selection for g in generations]
        self._generations = generations
        return generations

    def step(self) -> bool:
        if self._events is None:  # open the stream; its first event holds the selection
            body = {**self.bodies[0], "stream": True, "stream_options": {"include_usage": True}}
            self._response = self.remote._open_stream(self.paths[0], body)
            self._answer = _Answer()
            self._events = _sse_events(self._response.iter_lines())
        assert self._answer is not None
        for event in self._events:
            piece = self._answer.add(event)
            if self.selections is None and self._answer.selection is not None:
                self.selections = [self._answer.selection]
                return True
            if piece:
                self.rows[0].push(piece)
                return True
        self.close()
        generation = self._answer.generation()
        self.rows[0].text = generation.text
        self.rows[0].finish(generation.finish_reason)
        self._generations = [generation]
        self.selections = [generation.selection]
        return False

    def close(self) -> None:
        if self._response is not None:
            self._response.close()  # the server sees the disconnect and frees the row

    def generation(self, i: int) -> Generation:
        assert self._generations is not None, "the run is not over"
        return self._generations[i]


class _AsyncRemoteStream(AsyncTextStream):
    """:class:`~logo_engine.base.AsyncTextStream` of a remote row, on an async connection."""

    def __init__(self, engine: RemoteEngine, path: str, body: dict[str, Any]) -> None:
        self._engine = engine
        self._path = path
        self._body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        self._answer = _Answer()
        self._response: httpx.Response | None = None
        self._events: AsyncIterator[dict[str, Any]] | None = None
        self._generation: Generation | None = None
        self._closed = False

    @property
    def selection(self) -> Selection | None:
        return self._answer.selection

    async def aselection(self) -> Selection:
        await self._open()
        assert self._answer.selection is not None
        return self._answer.selection

    @property
    def generation(self) -> Generation | None:
        return self._generation

    async def _open(self) -> None:
        if self._events is not None:
            return
        client = self._engine._aclient()
        request = client.build_request("POST", self._path, json=self._body)
        try:
            self._response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise RemoteError(f"cannot reach {self._engine.base_url}: {exc!r}") from exc
        if self._response.status_code >= 400:
            await self._response.aread()
            await self._response.aclose()
            _checked(self._response)
        self._events = _asse_events(self._response.aiter_lines())
        async for event in self._events:  # the first event carries the selection
            self._answer.add(event)
            if self._answer.selection is not None:
                return
        raise RemoteError("the server's stream ended before its first chunk")

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        try:
            await self._open()
            assert self._events is not None
            async for event in self._events:
                piece = self._answer.add(event)
                if piece:
                    return piece
        except BaseException:
            await self.aclose()
            raise
        self._generation = self._answer.generation()
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._closed = True
        if self._response is not None:
            await self._response.aclose()


class _Answer:
    """Builds a Generation from the SSE chunks of one completion (chat or text)."""

    def __init__(self) -> None:
        self.selection: Selection | None = None
        self.text: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self.finish_reason: FinishReason = "length"
        self.usage: Usage | None = None
        self.extra: dict[
            str, Any
        ] = {}  # the finish chunk's logo field: text, content, broken calls

    def add(self, event: dict[str, Any]) -> str:
        """Take one chunk; returns its new text ("" if none)."""
        if "error" in event:
            error = event["error"]
            raise error_class(500, error.get("code"))(error.get("message", "stream failed"))
        logo = event.get("logo")
        if logo and self.selection is None:
            self.selection = read_selection(logo["selection"])
        elif logo:
            self.extra = logo
        if event.get("usage"):
            self.usage = _usage(event["usage"])
        piece = ""
        for choice in event.get("choices") or []:
            delta = choice.get("delta")
            if delta is not None:  # chat
                piece += delta.get("content") or ""
                for call in delta.get("tool_calls") or []:
                    self.tool_calls.append(_tool_call(call))
            else:
                piece += choice.get("text") or ""
            if choice.get("finish_reason"):
                self.finish_reason = _finish(choice["finish_reason"])
        self.text.append(piece)
        return piece

    def generation(self) -> Generation:
        if self.selection is None or self.usage is None:
            raise RemoteError("the server's stream ended without a selection or usage")
        return _answer(
            "".join(self.text),
            self.extra,
            self.selection,
            self.usage,
            self.finish_reason,
            self.tool_calls,
        )


# ------------------------------------------------------------------------------ helpers
def _checked(response: httpx.Response) -> httpx.Response:
    """The response, or its OpenAI error raised as the matching LoGoError."""
    if response.status_code < 400:
        return response
    try:
        error = response.json()["error"]
        message, code = str(error.get("message")), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code = response.text or response.reason_phrase, None
    cls: type[LoGoError] = error_class(response.status_code, code)
    raise cls(f"{message} (HTTP {response.status_code})")


def _sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def _asse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _generation(data: dict[str, Any]) -> Generation:
    """A Generation from a (non-streamed) chat or text completion."""
    choice = data["choices"][0]
    message = choice.get("message")
    if message is not None:
        content = message.get("content") or ""
        calls = [_tool_call(c) for c in message.get("tool_calls") or []]
    else:
        content, calls = choice.get("text") or "", []
    logo = data["logo"]
    return _answer(
        content,
        logo,
        read_selection(logo["selection"]),
        _usage(data["usage"]),
        _finish(choice.get("finish_reason")),
        calls,
    )


def _answer(
    content: str,
    logo: Mapping[str, Any],
    selection: Selection,
    usage: Usage,
    finish_reason: FinishReason,
    tool_calls: list[ToolCall],
) -> Generation:
    """The Generation of an answer: the raw text and broken calls from the ``logo`` field."""
    text = logo.get("text")
    return Generation(
        text=content if text is None else text,
        content=content if text is None else (logo.get("content") or ""),
        selection=selection,
        usage=usage,
        finish_reason=finish_reason,
        tool_calls=tool_calls,
        invalid_tool_calls=[
            InvalidToolCall.model_validate(c) for c in logo.get("invalid_tool_calls") or []
        ],
    )


def _usage(data: Mapping[str, Any]) -> Usage:
    """OpenAI usage -> engine usage (cached prompt tokens from ``prompt_tokens_details``)."""
    details = data.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=data["prompt_tokens"],
        completion_tokens=data["completion_tokens"],
        cached_tokens=int(details.get("cached_tokens") or 0),
    )


def _finish(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"  # tool_calls: the model stopped


def _tool_call(call: Mapping[str, Any]) -> ToolCall:
    function = call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = {"_raw": arguments}
    return ToolCall(
        id=call.get("id") or "",
        name=function.get("name") or "",
        arguments=arguments if isinstance(arguments, dict) else {},
    )


def _openai_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Engine tool schemas (OpenAI tools, or bare function schemas) as OpenAI tools."""
    out = []
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise InvalidRequestError(f"a tool must be a mapping, got {tool!r}")
        out.append(
            dict(tool) if "function" in tool else {"type": "function", "function": dict(tool)}
        )
    return out


def _openai_tool_choice(choice: ToolChoice) -> Any:
    if choice in (None, "auto", "none", "required"):
        return choice
    if choice == "any":
        return "required"
    return {"type": "function", "function": {"name": choice}}


def _routing_json(routing: RoutingConfig) -> dict[str, Any]:
    if callable(routing.signal):
        raise InvalidRequestError(
            "a RoutingConfig with a callable signal cannot be sent to a server; use 'norm' or "
            "'entropy'"
        )
    return asdict(routing)


# generate()'s keyword arguments and defaults, as _start takes them.
_START_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 64,
    "temperature": 0.0,
    "top_p": 1.0,
    "seed": None,
    "stop": None,
    "routing": None,
    "tools": None,
    "tool_choice": None,
}

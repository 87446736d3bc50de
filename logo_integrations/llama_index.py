"""LlamaIndex integration: :class:`LoGoLLM`, a ``FunctionCallingLLM`` over a LoGo engine.

Every call goes through the engine's public methods (``generate``, ``stream``, ``agenerate``,
``astream``): the chat template, routing, tool prompts and the parsing of the answer live in the
engine; what LoGoLLM shares with ChatLoGo (settings, engine construction, call resolution) lives in
:mod:`logo_integrations._common`. Chat and completion share one code path: the ``complete*``
methods are the ``chat*`` core with LlamaIndex's own response converters
(``llama_index.core.base.llms.generic_utils``). This module converts LlamaIndex objects to engine
arguments and back, and reports which adapters answered:

- in ``additional_kwargs["logo_selection"]`` of every ``CompletionResponse`` / ``ChatResponse``,
  with the token usage and the finish reason;
- in ``raw`` (``{"model", "logo_selection", "usage", "finish_reason"}``, plain JSON), where
  ``TokenCountingHandler`` reads ``raw["usage"]``;
- hence in the callback manager's LLM end-event payload (its response);
- as a :class:`LoGoSelectionEvent` instrumentation event inside the LLM call's span;
- in ``response.metadata["logo_selections"]`` of a query engine's (synthesizer's) response: the
  selections of every LLM call made while synthesizing it.

>>> from logo_integrations.llama_index import LoGoLLM, record_selections
>>> llm = LoGoLLM()                      # the embedded default model; loaded on first use
>>> with record_selections() as recorder:
...     response = llm.complete("Convert 3 km to metres")
>>> response.additional_kwargs["logo_selection"]["adapters"]
>>> recorder.selections[0].adapters
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Union

from llama_index.core.base.llms.generic_utils import (
    astream_chat_response_to_completion_response,
    chat_response_to_completion_response,
    stream_chat_response_to_completion_response,
)
from llama_index.core.base.llms.generic_utils import messages_to_prompt as join_messages
from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    DocumentBlock,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    ToolCallBlock,
    VideoBlock,
)
from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent
from llama_index.core.instrumentation.span import BaseSpan
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from logo_engine.base import BaseEngine
from logo_engine.chat import Prompt, StreamFilter
from logo_engine.errors import InvalidRequestError, LoGoError
from logo_engine.types import Generation, Selection, Usage
from logo_integrations._common import (
    DEFAULT_MAX_TOKENS,
    SELECTION_KEY,
    EngineCall,
    EngineSlot,
    LoGoSettings,
    ModelFacts,
    engine_has_chat_template,
    engine_tool_call,
    normalize_tool_choice,
    openai_tool_call,
    peek_model,
    resolve_call,
    selection_json,
    tool_arguments,
)

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)

RESPONSE_SELECTIONS_KEY = "logo_selections"  # in a synthesized Response's metadata
INVALID_KEY = "invalid_tool_calls"  # in a ChatResponse's additional_kwargs: broken tool calls

# LlamaIndex roles -> the engine's four roles.
_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}
_NON_TEXT_BLOCKS = (ImageBlock, AudioBlock, VideoBlock, DocumentBlock)


# --------------------------------------------------------------------------- events
class LoGoSelectionEvent(BaseEvent):
    """Instrumentation event: which adapters answered one LLM call.

    Emitted once per call by :class:`LoGoLLM`, inside the call's span (``span_id`` is the span of
    ``LoGoLLM.complete`` / ``chat`` / ...), before the LLM end event. For streams it is emitted as
    soon as the selection is known, before the first chunk. It carries the engine's whole
    :class:`~logo_engine.Selection`; ``adapters``, ``weights``, ``scores`` and ``pinned`` read it.
    """

    base_model: str = Field(description="Name of the base model.")
    selection: Selection = Field(description="The engine's selection for this call, whole.")

    @classmethod
    def class_name(cls) -> str:
        """Name of the event class, as reported in payloads."""
        return "LoGoSelectionEvent"

    @classmethod
    def from_selection(cls, selection: Selection, base_model: str) -> LoGoSelectionEvent:
        """Build the event of one call's selection (in the currently active span)."""
        return cls(base_model=base_model, selection=selection)

    @property
    def adapters(self) -> list[str]:
        """Chosen adapters, by weight descending (empty: base model only)."""
        return list(self.selection.adapters)

    @property
    def weights(self) -> list[float]:
        """Their weights (sum 1)."""
        return list(self.selection.weights)

    @property
    def scores(self) -> dict[str, float]:
        """Every adapter's routing score (empty for a pinned mixture)."""
        return dict(self.selection.scores)

    @property
    def pinned(self) -> bool:
        """True when the caller pinned the mixture (no routing)."""
        return self.selection.pinned


class SelectionRecorder(BaseEventHandler):
    """An instrumentation event handler that keeps every :class:`LoGoSelectionEvent` it sees."""

    events: list[LoGoSelectionEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        """Name of the handler class."""
        return "SelectionRecorder"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        """Record ``event`` if it is a selection event."""
        if isinstance(event, LoGoSelectionEvent):
            self.events.append(event)

    @property
    def selections(self) -> list[Selection]:
        """The recorded selections, in call order."""
        return [e.selection for e in self.events]


@contextmanager
def record_selections() -> Iterator[SelectionRecorder]:
    """Record the selection of every LoGo call made inside the ``with`` block (any pipeline).

    Attaches a :class:`SelectionRecorder` to the root instrumentation dispatcher and removes it on
    exit.
    """
    recorder = SelectionRecorder()
    root = get_dispatcher()
    root.add_event_handler(recorder)
    try:
        yield recorder
    finally:
        root.event_handlers = [h for h in root.event_handlers if h is not recorder]


# ------------------------------------------------- selections in synthesized responses
class _SelectionSpan(BaseSpan):
    """An open span, and the selections of the LoGo calls made inside it so far."""

    selections: list[Selection] = Field(default_factory=list)


class _SelectionSpans(BaseSpanHandler[_SelectionSpan]):
    """Tracks open spans, so a selection can be credited to every span it was made under."""

    @classmethod
    def class_name(cls) -> str:
        return "LoGoSelectionSpans"

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> _SelectionSpan:
        return _SelectionSpan(id_=id_, parent_id=parent_span_id)

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> _SelectionSpan | None:
        return self.open_spans.get(id_)

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> _SelectionSpan | None:
        return self.open_spans.get(id_)

    def credit(self, span_id: str | None, selection: Selection) -> None:
        """Add ``selection`` to the span it was made in and to all that span's open ancestors."""
        with self.lock:
            while span_id is not None and (span := self.open_spans.get(span_id)) is not None:
                span.selections.append(selection)
                span_id = span.parent_id

    def selections(self, span_id: str | None) -> list[Selection]:
        with self.lock:
            span = self.open_spans.get(span_id) if span_id is not None else None
            return list(span.selections) if span is not None else []


class _ResponseSelections(BaseEventHandler):
    """Writes the selections behind a synthesized response into ``response.metadata``.

    The LLM calls made while synthesizing are credited through the span tree. A streamed response
    calls the LLM later, while its tokens are read; its token generator is wrapped so that the
    calls made while reading it are added as they happen.
    """

    @classmethod
    def class_name(cls) -> str:
        return "LoGoResponseSelections"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        spans = _RESPONSE_HANDLERS[0] if _RESPONSE_HANDLERS else None
        if spans is None:
            return
        if isinstance(event, LoGoSelectionEvent):
            spans.credit(event.span_id, event.selection)
            sink = _STREAM_SINK.get()
            if sink is not None:
                sink(event.selection)
        elif isinstance(event, SynthesizeEndEvent):
            response = event.response
            if not hasattr(response, "metadata"):
                return
            add = _adder(response)
            for selection in spans.selections(event.span_id):
                add(selection)
            if isinstance(response, StreamingResponse) and response.response_gen is not None:
                response.response_gen = _reading(response.response_gen, add)
            elif isinstance(response, AsyncStreamingResponse) and response.response_gen is not None:
                response.response_gen = _areading(response.response_gen, add)


# While a streamed response's tokens are read: where the selections of LLM calls go.
_STREAM_SINK: ContextVar[Callable[[Selection], None] | None] = ContextVar(
    "logo_stream_sink", default=None
)


def _adder(response: Any) -> Callable[[Selection], None]:
    """A function adding one selection to ``response.metadata["logo_selections"]``."""

    def add(selection: Selection) -> None:
        metadata = response.metadata if response.metadata is not None else {}
        metadata.setdefault(RESPONSE_SELECTIONS_KEY, []).append(selection_json(selection))
        response.metadata = metadata

    return add


def _reading(tokens: Iterator[str], add: Callable[[Selection], None]) -> Generator[str, None, None]:
    """``tokens``, with the selections of LLM calls made while reading them given to ``add``."""
    while True:
        reset = _STREAM_SINK.set(add)
        try:
            token = next(tokens)
        except StopIteration:
            return
        finally:
            _STREAM_SINK.reset(reset)
        yield token


async def _areading(
    tokens: AsyncIterator[str], add: Callable[[Selection], None]
) -> AsyncGenerator[str, None]:
    """:func:`_reading` for async token generators."""
    while True:
        reset = _STREAM_SINK.set(add)
        try:
            token = await tokens.__anext__()
        except StopAsyncIteration:
            return
        finally:
            _STREAM_SINK.reset(reset)
        yield token


_RESPONSE_HANDLERS: list[_SelectionSpans] = []
_RESPONSE_LOCK = threading.Lock()


def _attach_response_selections() -> None:
    """Attach the two handlers above to the root dispatcher, once per process."""
    with _RESPONSE_LOCK:
        if _RESPONSE_HANDLERS:
            return
        spans = _SelectionSpans()
        root = get_dispatcher()
        root.add_span_handler(spans)
        root.add_event_handler(_ResponseSelections())
        _RESPONSE_HANDLERS.append(spans)


# ------------------------------------------------------------- message conversion (pure)
def to_engine_message(message: ChatMessage) -> dict[str, Any]:
    """Convert one LlamaIndex ``ChatMessage`` to the engine's message dict.

    Assistant tool calls (``additional_kwargs["tool_calls"]`` or ``ToolCallBlock`` blocks) become
    OpenAI-style ``tool_calls``; a tool result keeps ``tool_call_id`` and ``name``. Only text is
    supported: image, audio, video and document blocks raise :class:`InvalidRequestError`.
    """
    role = _ROLES.get(MessageRole(message.role))
    if role is None:  # pragma: no cover - every MessageRole is mapped
        raise InvalidRequestError(f"unsupported message role {message.role!r}")
    for block in message.blocks:
        if isinstance(block, _NON_TEXT_BLOCKS):
            raise InvalidRequestError(
                f"LoGoLLM handles text only; a {message.role.value} message holds a "
                f"{type(block).__name__}"
            )
    out: dict[str, Any] = {"role": role, "content": message.content or ""}
    extra = message.additional_kwargs
    if role == "assistant":
        calls = message_tool_calls(message)
        if calls:
            out["tool_calls"] = calls
    elif role == "tool":
        call_id = extra.get("tool_call_id")
        if call_id:
            out["tool_call_id"] = str(call_id)
        name = extra.get("name") or extra.get("tool_name")
        if name:
            out["name"] = str(name)
    return out


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Convert a list of ``ChatMessage`` (see :func:`to_engine_message`)."""
    return [to_engine_message(m) for m in messages]


def message_tool_calls(message: ChatMessage) -> list[dict[str, Any]]:
    """The tool calls of an assistant message, as OpenAI-style dicts (JSON string arguments).

    Reads ``additional_kwargs["tool_calls"]`` (OpenAI dicts or objects, flat ``{id, name,
    arguments}`` dicts, ``ToolSelection``), else ``ToolCallBlock`` blocks.
    """
    raw = message.additional_kwargs.get("tool_calls") or []
    calls = [_openai_tool_call(c) for c in raw]
    if not calls:
        calls = [
            openai_tool_call(b.tool_call_id, b.tool_name, b.tool_kwargs)
            for b in message.blocks
            if isinstance(b, ToolCallBlock)
        ]
    return calls


def _openai_tool_call(call: Any) -> dict[str, Any]:
    call_id: Any
    name: Any
    if isinstance(call, ToolSelection):
        call_id, name, arguments = call.tool_id, call.tool_name, call.tool_kwargs
    elif isinstance(call, Mapping):
        function = call.get("function")
        source = function if isinstance(function, Mapping) else call
        call_id = call.get("id", "")
        name, arguments = source.get("name"), source.get("arguments", {})
    else:  # an object such as openai's ChatCompletionMessageToolCall
        function = getattr(call, "function", call)
        call_id = getattr(call, "id", "")
        name, arguments = getattr(function, "name", None), getattr(function, "arguments", {})
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"a tool call needs a function name, got {call!r}")
    return openai_tool_call(str(call_id or ""), name, arguments)


def tool_selection(call: Mapping[str, Any]) -> ToolSelection:
    """An OpenAI-style tool-call dict as LlamaIndex's ``ToolSelection``."""
    function = call["function"]
    return ToolSelection(
        tool_id=call.get("id", ""),
        tool_name=function["name"],
        tool_kwargs=tool_arguments(function.get("arguments", {})),
    )


def tool_schema(tool: BaseTool | Mapping[str, Any]) -> dict[str, Any]:
    """A LlamaIndex tool (or an OpenAI function schema, passed through) as an OpenAI schema."""
    if isinstance(tool, Mapping):
        return dict(tool)
    return tool.metadata.to_openai_tool(skip_length_check=True)


# ------------------------------------------------------------- responses (pure)
def usage_counts(usage: Usage) -> dict[str, Any]:
    """Engine token counts as the JSON LlamaIndex handlers read (``raw["usage"]``).

    Cached prompt tokens are not a top-level count: :func:`response_metadata` adds them in
    OpenAI's ``prompt_tokens_details`` shape when there are any.
    """
    return usage.model_dump(mode="json", exclude={"cached_tokens"})


def response_metadata(
    selection: Selection,
    model_name: str,
    usage: Usage | None = None,
    finish_reason: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(additional_kwargs, raw)`` of one response: JSON only, no tensors.

    ``additional_kwargs = {"logo_selection": ..., prompt_tokens, completion_tokens, total_tokens,
    "finish_reason"}``; ``raw = {"model", "logo_selection", "usage", "finish_reason"}``. Prompt
    tokens served from the engine's prefill cache, when there are any, are ``cached_tokens`` in
    ``additional_kwargs`` and ``raw["usage"]["prompt_tokens_details"]["cached_tokens"]``. Usage and
    finish reason are known only at the end of a stream, so intermediate chunks carry just the
    selection.
    """
    additional: dict[str, Any] = {SELECTION_KEY: selection_json(selection)}
    raw: dict[str, Any] = {"model": model_name, SELECTION_KEY: selection_json(selection)}
    if usage is not None:
        counts = usage_counts(usage)
        additional.update(counts)
        raw["usage"] = dict(counts)
        if usage.cached_tokens:  # OpenAI's shape for prompt tokens served from a cache
            additional["cached_tokens"] = usage.cached_tokens
            raw["usage"]["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if finish_reason is not None:
        additional["finish_reason"] = finish_reason
        raw["finish_reason"] = finish_reason
    return additional, raw


def chat_response(
    generation: Generation, model_name: str, delta: str | None = None
) -> ChatResponse:
    """The ``ChatResponse`` of a finished generation.

    Content without any tool-call markup, parsed calls in ``message.additional_kwargs
    ["tool_calls"]``; calls that do not parse in ``additional_kwargs["invalid_tool_calls"]`` (with
    why), never in the content; selection and usage in ``additional_kwargs`` and ``raw``.
    """
    message_kwargs: dict[str, Any] = {}
    if generation.tool_calls:
        message_kwargs["tool_calls"] = [engine_tool_call(c) for c in generation.tool_calls]
    additional, raw = response_metadata(
        generation.selection, model_name, generation.usage, generation.finish_reason
    )
    if generation.invalid_tool_calls:
        additional[INVALID_KEY] = [b.model_dump(mode="json") for b in generation.invalid_tool_calls]
    message = ChatMessage(
        role=MessageRole.ASSISTANT, content=generation.content, additional_kwargs=message_kwargs
    )
    return ChatResponse(message=message, delta=delta, additional_kwargs=additional, raw=raw)


# ------------------------------------------------------------------------------ the LLM
class LoGoLLM(LoGoSettings, FunctionCallingLLM):
    """LlamaIndex LLM over a LoGo engine: per-request LoRA adapter selection and merging.

    The engine is either passed in (``LoGoLLM(engine=...)``, any
    :class:`~logo_engine.base.BaseEngine`) or loaded on first use with
    ``LoGoEngine.shared(model, adapters=..., device=..., dtype=..., gguf_file=...)``, a
    process-wide cached instance: many ``LoGoLLM`` objects share one model, whatever their
    routing. Loading never happens in ``__init__``, ``metadata`` or ``to_payload`` (which
    LlamaIndex reads on the event loop), and async calls load in a worker thread. With
    ``base_url="http://host:8000/v1"`` (and ``api_key``) it talks to a LoGo server (`logo serve`)
    instead, with the same metadata, and this process loads no model and no torch. Unknown
    constructor arguments are refused.

    Per call, every method accepts ``adapters={name: weight}`` (a pinned mixture; ``{}`` = base
    model only; ``None`` = route), ``routing=RoutingConfig(...)``, ``top_k=``, ``signal=``,
    ``max_tokens`` (or ``max_new_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``,
    ``tools`` (LlamaIndex tools or OpenAI function schemas) and ``tool_choice``.

    Chat and completion share the engine's code path: ``complete(p)`` is ``chat([user: p])``
    through the tokenizer's chat template, streamed or not. For a model without a chat template,
    chat messages are joined with ``messages_to_prompt`` and ``metadata.is_chat_model`` is False.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    context_window: int | None = Field(
        default=None,
        ge=1,
        description="Context window for LlamaIndex's prompt packing (None: the model's).",
    )

    _slot: EngineSlot = PrivateAttr()
    _facts: ModelFacts | None = PrivateAttr(default=None)

    def __init__(self, engine: BaseEngine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._slot = EngineSlot(engine)
        _attach_response_selections()

    @classmethod
    def class_name(cls) -> str:
        """Name of the class in payloads and serialisation."""
        return "LoGoLLM"

    # ------------------------------------------------------------------ engine and metadata
    @property
    def engine(self) -> BaseEngine:
        """The engine; loads the shared ``LoGoEngine`` on first use when none was passed in."""
        return self._slot.get(self.engine_spec)

    async def _aengine(self) -> BaseEngine:
        """The engine, loaded in a worker thread if needed (loading must not block the loop)."""
        return await self._slot.aget(self.engine_spec)

    def _known_facts(self) -> ModelFacts:
        """What the local model's files say, read once (a served model's come from its server)."""
        if self._facts is None:
            self._facts = peek_model(self.model)
        return self._facts

    @property
    def metadata(self) -> LLMMetadata:
        """Context window, output length and model name; never loads the model.

        From the loaded engine when there is one, else from the model folder's config files (the
        embedded default once converted); with ``base_url``, from the server (one request, the
        defaults while it does not answer); ``context_window=`` overrides. A chat and
        function-calling model when the tokenizer has a chat template.
        """
        engine = self._slot.loaded
        if engine is None and self.base_url is not None:
            engine = self.engine  # a light HTTP client: building it loads nothing
        window: int | None
        chat: bool | None
        if engine is not None:
            try:  # a remote engine asks its server, once
                window, chat = engine.context_window, engine_has_chat_template(engine)
                name = self.model_label(engine)
            except LoGoError as exc:
                logger.warning("LoGoLLM.metadata: the server did not answer (%s)", exc)
                window, chat, name = None, None, self.model_label(None)
        else:
            facts = self._known_facts()
            window, chat, name = facts.context_window, facts.chat_template, self.model_label(None)
        chat = True if chat is None else chat
        return LLMMetadata(
            context_window=self.context_window or window or DEFAULT_CONTEXT_WINDOW,
            num_output=self.max_tokens or DEFAULT_MAX_TOKENS,
            is_chat_model=chat,
            is_function_calling_model=chat,
            model_name=name,
        )

    def to_payload(self) -> dict[str, Any]:
        """Metadata, the adapter library and the routing defaults (for events and callbacks).

        Never loads the model: ``adapter_names`` is None until it is loaded.
        """
        engine = self._slot.loaded
        routing = self.routing or (engine.routing if engine is not None else None)
        return {
            **super().to_payload(),
            "adapter_names": engine.adapter_names if engine is not None else None,
            "mixture": self.mixture,
            "top_k": self.top_k or (routing.top_k if routing is not None else None),
            "signal": self.signal or (routing.signal_name if routing is not None else None),
        }

    # --------------------------------------------------------------------- call plumbing
    def _call(self, engine: BaseEngine, prompt: Prompt, kwargs: Mapping[str, Any]) -> EngineCall:
        """Settings and per-call arguments (LlamaIndex tools converted) -> one engine call."""
        if kwargs.get("tools"):
            kwargs = {**kwargs, "tools": [tool_schema(t) for t in kwargs["tools"]]}
        return resolve_call(self, engine, prompt, kwargs, owner="LoGoLLM")

    def _chat_prompt(self, engine: BaseEngine, messages: Sequence[ChatMessage]) -> Prompt:
        """Messages for the chat template, or one string for a model without a template."""
        if engine_has_chat_template(engine):
            return to_engine_messages(messages)
        return (self.messages_to_prompt or join_messages)(messages)

    def _completion_prompt(self, prompt: str, formatted: bool) -> str:
        if formatted or self.completion_to_prompt is None:
            return prompt
        return self.completion_to_prompt(prompt)

    def _emit(self, selection: Selection, engine: BaseEngine) -> None:
        """Dispatch the selection event in the active span (the LLM call's)."""
        dispatcher.event(LoGoSelectionEvent.from_selection(selection, engine.model_name))

    # ------------------------------------------------------- the one core, sync and async
    def _respond(
        self, engine: BaseEngine, prompt: Prompt, kwargs: Mapping[str, Any]
    ) -> ChatResponse:
        call = self._call(engine, prompt, kwargs)
        generation = engine.generate(call.prompt, **call.generate_kwargs)
        self._emit(generation.selection, engine)
        return chat_response(generation, engine.model_name)

    async def _arespond(
        self, engine: BaseEngine, prompt: Prompt, kwargs: Mapping[str, Any]
    ) -> ChatResponse:
        call = await asyncio.to_thread(self._call, engine, prompt, kwargs)
        generation = await engine.agenerate(call.prompt, **call.generate_kwargs)
        self._emit(generation.selection, engine)
        return chat_response(generation, engine.model_name)

    def _respond_stream(
        self, engine: BaseEngine, prompt: Prompt, kwargs: Mapping[str, Any]
    ) -> ChatResponseGen:
        """Stream an answer. The probe runs, and the selection event is emitted, right now."""
        call = self._call(engine, prompt, kwargs)
        stream = engine.stream(call.prompt, **call.generate_kwargs)
        selection = stream.selection
        self._emit(selection, engine)
        name = engine.model_name
        additional, raw = response_metadata(selection, name)
        shown = StreamFilter(hold_tool_calls=call.tools_bound)

        def gen() -> Generator[ChatResponse, None, None]:
            try:
                for piece in stream:
                    delta = shown.push(piece)
                    if delta:
                        yield _chunk(shown.shown, delta, additional, raw)
            finally:
                stream.close()
            assert stream.generation is not None  # set once the stream is exhausted
            yield _final_chunk(stream.generation, name, shown)

        return gen()

    async def _arespond_stream(
        self, engine: BaseEngine, prompt: Prompt, kwargs: Mapping[str, Any]
    ) -> ChatResponseAsyncGen:
        """:meth:`_respond_stream` for ``async for``; every model step runs in a worker thread."""
        call = await asyncio.to_thread(self._call, engine, prompt, kwargs)
        stream = engine.astream(call.prompt, **call.generate_kwargs)
        selection = await stream.aselection()
        self._emit(selection, engine)
        name = engine.model_name
        additional, raw = response_metadata(selection, name)
        shown = StreamFilter(hold_tool_calls=call.tools_bound)

        async def gen() -> AsyncGenerator[ChatResponse, None]:
            try:
                async for piece in stream:
                    delta = shown.push(piece)
                    if delta:
                        yield _chunk(shown.shown, delta, additional, raw)
            finally:
                await stream.aclose()
            assert stream.generation is not None
            yield _final_chunk(stream.generation, name, shown)

        return gen()

    # ------------------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer a conversation through the chat template; tool calls parsed with tools."""
        engine = self.engine
        return self._respond(engine, self._chat_prompt(engine, messages), kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """:meth:`chat` without blocking the event loop (load and generation in worker threads)."""
        engine = await self._aengine()
        return await self._arespond(engine, self._chat_prompt(engine, messages), kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream a chat answer; the selection is on every chunk, usage on the last.

        With tools, tool-call markup is never sent as a delta: the last chunk carries the parsed
        calls in ``message.additional_kwargs["tool_calls"]``.
        """
        engine = self.engine
        return self._respond_stream(engine, self._chat_prompt(engine, messages), kwargs)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """:meth:`stream_chat` for ``async for``; every model step runs in a worker thread."""
        engine = await self._aengine()
        return await self._arespond_stream(engine, self._chat_prompt(engine, messages), kwargs)

    # ------------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete ``prompt`` (one user turn through the chat template, if the model has one)."""
        engine = self.engine
        response = self._respond(engine, self._completion_prompt(prompt, formatted), kwargs)
        return chat_response_to_completion_response(response)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """:meth:`complete` without blocking the event loop."""
        engine = await self._aengine()
        response = await self._arespond(engine, self._completion_prompt(prompt, formatted), kwargs)
        return chat_response_to_completion_response(response)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Stream a completion: cumulative ``text`` and ``delta`` per chunk.

        The selection is on every chunk; a last chunk (``delta=""`` when nothing is left) adds
        usage and finish reason. The probe runs, and the selection event is emitted, before this
        returns.
        """
        engine = self.engine
        chunks = self._respond_stream(engine, self._completion_prompt(prompt, formatted), kwargs)
        return stream_chat_response_to_completion_response(chunks)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """:meth:`stream_complete` for ``async for``; every model step runs in a worker thread."""
        engine = await self._aengine()
        chunks = await self._arespond_stream(
            engine, self._completion_prompt(prompt, formatted), kwargs
        )
        return astream_chat_response_to_completion_response(chunks)

    # -------------------------------------------------------------------- function calling
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: Union[str, ChatMessage] | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Chat arguments for a call with tools: the messages, OpenAI tool schemas, tool choice.

        ``tool_required`` forces a call (``tool_choice="required"``; with one tool, that tool)
        unless a tool choice is given. ``allow_parallel_tool_calls=False`` keeps only the first
        call of a non-streamed answer (see :meth:`_validate_chat_with_tools_response`).
        """
        messages = list(chat_history or [])
        if user_msg is not None:
            if isinstance(user_msg, str):
                user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
            messages.append(user_msg)
        tool_choice = kwargs.pop("tool_choice", None)
        if tool_required and tool_choice in (None, "auto"):
            tool_choice = "required"
        out: dict[str, Any] = {"messages": messages, **kwargs}
        if tools:
            out["tools"] = [tool_schema(t) for t in tools]
        if tool_choice is not None:
            out["tool_choice"] = tool_choice
        return out

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Keep only the first tool call unless parallel calls are allowed."""
        calls = response.message.additional_kwargs.get("tool_calls")
        if not allow_parallel_tool_calls and calls and len(calls) > 1:
            response.message.additional_kwargs["tool_calls"] = calls[:1]
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The tool calls of a chat response as ``ToolSelection`` objects.

        Raises ``ValueError`` when there is none and ``error_on_no_tool_call`` is True; when the
        model wrote a call that does not parse, the message says why.
        """
        calls = message_tool_calls(response.message)
        if not calls and error_on_no_tool_call:
            broken = response.additional_kwargs.get(INVALID_KEY) or []
            if broken:
                raise ValueError(
                    "Expected at least one tool call, but the model's tool call does not parse: "
                    f"{broken[0]['error']} ({broken[0]['arguments']!r})"
                )
            raise ValueError("Expected at least one tool call, but got 0 tool calls.")
        return [tool_selection(c) for c in calls]


def _chunk(
    content: str, delta: str, additional: dict[str, Any], raw: dict[str, Any]
) -> ChatResponse:
    """An intermediate stream chunk: what is shown so far, the new delta, the selection."""
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=content),
        delta=delta,
        additional_kwargs=dict(additional),
        raw=dict(raw),
    )


def _final_chunk(generation: Generation, model_name: str, shown: StreamFilter) -> ChatResponse:
    """The last stream chunk: full content, tool calls, usage; delta = what was held back."""
    return chat_response(generation, model_name, delta=shown.final_delta(generation.content))


__all__ = [
    "INVALID_KEY",
    "RESPONSE_SELECTIONS_KEY",
    "SELECTION_KEY",
    "LoGoLLM",
    "LoGoSelectionEvent",
    "SelectionRecorder",
    "chat_response",
    "message_tool_calls",
    "normalize_tool_choice",
    "record_selections",
    "response_metadata",
    "to_engine_message",
    "to_engine_messages",
    "tool_schema",
    "tool_selection",
    "usage_counts",
]

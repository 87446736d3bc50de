"""LlamaIndex integration: :class:`LoGoLLM`, a ``FunctionCallingLLM`` over the shared LoGo engine.

Every call goes through the engine's public methods (``generate``, ``stream``, ``agenerate``,
``astream``): the chat template, routing, tool prompts and tool-call parsing all live in the
engine, so chat and completion, streamed or not, share one code path. This module only converts
LlamaIndex objects to engine arguments and back, and reports which adapters answered:

- in ``additional_kwargs["logo_selection"]`` of every ``CompletionResponse`` / ``ChatResponse``,
  with the token usage and the finish reason;
- in ``raw`` (``{"model", "logo_selection", "usage", "finish_reason"}``, plain JSON), where
  ``TokenCountingHandler`` reads ``raw["usage"]``;
- hence in the callback manager's LLM end-event payload (its response);
- as a :class:`LoGoSelectionEvent` instrumentation event inside the LLM call's span.

>>> from logo_integrations.llama_index import LoGoLLM, record_selections
>>> llm = LoGoLLM()                      # the embedded default model; loaded on first use
>>> with record_selections() as recorder:
...     response = llm.complete("Convert 3 km to metres")
>>> response.additional_kwargs["logo_selection"]["adapters"]
>>> recorder.selections[0].adapters
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import (
    AsyncIterator,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

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
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from logo_engine.base import BaseEngine
from logo_engine.chat import StreamFilter, has_chat_template, parse_tool_calls, visible_text
from logo_engine.errors import InvalidRequestError
from logo_engine.types import Generation, RoutingConfig, Selection, ToolCall, Usage

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)

SELECTION_KEY = "logo_selection"  # key in additional_kwargs and raw (as in ChatLoGo)

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
# Per-call keyword arguments understood by LoGoLLM's methods.
_CALL_KWARGS = frozenset(
    {
        "adapters",
        "routing",
        "top_k",
        "max_new_tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "tools",
        "tool_choice",
    }
)


# --------------------------------------------------------------------------- events
class LoGoSelectionEvent(BaseEvent):
    """Instrumentation event: which adapters answered one LLM call.

    Emitted once per call by :class:`LoGoLLM`, inside the call's span (``span_id`` is the span of
    ``LoGoLLM.complete`` / ``chat`` / ...), before the LLM end event. For streams it is emitted as
    soon as the selection is known, before the first chunk.
    """

    base_model: str = Field(description="Name of the base model.")
    adapters: list[str] = Field(description="Chosen adapters, by weight descending.")
    weights: list[float] = Field(description="Their weights (sum 1; empty: base model only).")
    scores: dict[str, float] = Field(description="Every adapter's routing score.")
    pinned: bool = Field(description="True when the caller pinned the mixture (no routing).")
    signal: str | None = Field(default=None, description="Routing signal ('norm', ...).")
    top_k: int | None = Field(default=None, description="Adapters kept per request.")
    probe_ms: float = Field(default=0.0, description="Time spent probing, in milliseconds.")

    @classmethod
    def class_name(cls) -> str:
        """Name of the event class, as reported in payloads."""
        return "LoGoSelectionEvent"

    @classmethod
    def from_selection(cls, selection: Selection, base_model: str) -> LoGoSelectionEvent:
        """Build the event of one call's selection (in the currently active span)."""
        return cls(
            base_model=base_model,
            adapters=list(selection.adapters),
            weights=list(selection.weights),
            scores=dict(selection.scores),
            pinned=selection.pinned,
            signal=selection.signal,
            top_k=selection.top_k,
            probe_ms=selection.probe_ms,
        )

    @property
    def selection(self) -> Selection:
        """The engine's :class:`~logo_engine.Selection` (probe layer and module not included)."""
        return Selection(
            adapters=self.adapters,
            weights=self.weights,
            scores=self.scores,
            signal=self.signal,
            top_k=self.top_k,
            probe_ms=self.probe_ms,
            pinned=self.pinned,
        )


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
            _openai_tool_call(
                {"id": b.tool_call_id or "", "name": b.tool_name, "arguments": b.tool_kwargs}
            )
            for b in message.blocks
            if isinstance(b, ToolCallBlock)
        ]
    return calls


def _openai_tool_call(call: Any) -> dict[str, Any]:
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
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {
        "id": str(call_id or ""),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def tool_call_dict(call: ToolCall) -> dict[str, Any]:
    """An engine :class:`~logo_engine.ToolCall` as an OpenAI-style dict (JSON string arguments)."""
    return {
        "id": call.id,
        "type": "function",
        "function": {
            "name": call.name,
            "arguments": json.dumps(call.arguments, ensure_ascii=False),
        },
    }


def tool_selection(call: Mapping[str, Any]) -> ToolSelection:
    """An OpenAI-style tool-call dict as LlamaIndex's ``ToolSelection``."""
    function = call["function"]
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            arguments = {}
    return ToolSelection(
        tool_id=call.get("id", ""), tool_name=function["name"], tool_kwargs=arguments
    )


def tool_schema(tool: BaseTool | Mapping[str, Any]) -> dict[str, Any]:
    """A LlamaIndex tool (or an OpenAI function schema, passed through) as an OpenAI schema."""
    if isinstance(tool, Mapping):
        return dict(tool)
    return tool.metadata.to_openai_tool(skip_length_check=True)


def normalize_tool_choice(tool_choice: Any) -> str | None:
    """Map LlamaIndex/OpenAI tool choices to the engine's (None, "auto", "none", "required", name).

    Accepts ``"any"`` (Anthropic's "required") and ``{"type": "function", "function": {"name":
    ...}}`` dicts.
    """
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return tool_choice
    if tool_choice == "any":
        return "required"
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function", tool_choice)
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str) and name:
            return name
    if isinstance(tool_choice, str) and tool_choice:
        return tool_choice
    raise InvalidRequestError(
        "tool_choice must be None, 'auto', 'none', 'required', a tool name or "
        f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}"
    )


def answer_content(generation: Generation) -> str:
    """The text of an answer without its tool-call markup (the whole text when it made none)."""
    if not generation.tool_calls:
        return generation.text
    return parse_tool_calls(generation.text)[0]


# ------------------------------------------------------------- response metadata (pure)
def response_metadata(
    selection: Selection,
    model_name: str,
    usage: Usage | None = None,
    finish_reason: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(additional_kwargs, raw)`` of one response: JSON only, no tensors.

    ``additional_kwargs = {"logo_selection": ..., prompt_tokens, completion_tokens, total_tokens,
    "finish_reason"}``; ``raw = {"model", "logo_selection", "usage", "finish_reason"}``. Usage and
    finish reason are known only at the end of a stream, so intermediate chunks carry just the
    selection.
    """
    additional: dict[str, Any] = {SELECTION_KEY: selection.model_dump(mode="json")}
    raw: dict[str, Any] = {"model": model_name, SELECTION_KEY: selection.model_dump(mode="json")}
    if usage is not None:
        counts = usage.model_dump(mode="json")
        additional.update(counts)
        raw["usage"] = counts
    if finish_reason is not None:
        additional["finish_reason"] = finish_reason
        raw["finish_reason"] = finish_reason
    return additional, raw


def completion_response(
    generation: Generation, model_name: str, text: str | None = None, delta: str | None = None
) -> CompletionResponse:
    """The ``CompletionResponse`` of a finished generation."""
    additional, raw = response_metadata(
        generation.selection, model_name, generation.usage, generation.finish_reason
    )
    if generation.tool_calls:
        additional["tool_calls"] = [tool_call_dict(c) for c in generation.tool_calls]
    return CompletionResponse(
        text=generation.text if text is None else text,
        delta=delta,
        additional_kwargs=additional,
        raw=raw,
    )


def chat_response(
    generation: Generation, model_name: str, delta: str | None = None
) -> ChatResponse:
    """The ``ChatResponse`` of a finished generation.

    Content without tool-call markup, tool calls in ``message.additional_kwargs["tool_calls"]``,
    selection and usage in the response's ``additional_kwargs`` and ``raw``.
    """
    message_kwargs: dict[str, Any] = {}
    if generation.tool_calls:
        message_kwargs["tool_calls"] = [tool_call_dict(c) for c in generation.tool_calls]
    additional, raw = response_metadata(
        generation.selection, model_name, generation.usage, generation.finish_reason
    )
    message = ChatMessage(
        role=MessageRole.ASSISTANT,
        content=answer_content(generation),
        additional_kwargs=message_kwargs,
    )
    return ChatResponse(message=message, delta=delta, additional_kwargs=additional, raw=raw)


# ------------------------------------------------------------------------------ the LLM
class LoGoLLM(FunctionCallingLLM):
    """LlamaIndex LLM over a LoGo engine: per-request LoRA adapter selection and merging.

    The engine is either passed in (``LoGoLLM(engine=...)``, any
    :class:`~logo_engine.base.BaseEngine`) or loaded on first use with
    ``LoGoEngine.shared(base_model, adapters=..., routing=..., device=..., dtype=...,
    gguf_file=...)``, a process-wide cached instance: many ``LoGoLLM`` objects share one model.

    Per call, every method accepts ``adapters={name: weight}`` (a pinned mixture; ``{}`` = base
    model only; ``None`` = route), ``routing=RoutingConfig(...)`` or ``top_k=``,
    ``max_new_tokens`` (or ``max_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``,
    ``tools`` (LlamaIndex tools or OpenAI function schemas) and ``tool_choice``.

    Chat and completion share the engine's code path: ``complete(p)`` is ``chat([user: p])``
    through the tokenizer's chat template, streamed or not. For a model without a chat template,
    chat messages are joined with ``messages_to_prompt`` and ``metadata.is_chat_model`` is False.
    """

    base_model: str | None = Field(
        default=None,
        description="HF folder or hub id of the base model (None: the embedded default model). "
        "Ignored when an engine is passed in.",
    )
    adapters: Union[str, Path, dict[str, Union[str, Path]]] | None = Field(
        default=None,
        description="Adapter library to load: a folder of peft adapters or {name: path} (None: "
        "the shipped zoo). Ignored when an engine is passed in. The per-call `adapters=` "
        "argument is a different thing: a pinned mixture {name: weight}.",
    )
    gguf_file: str | None = Field(default=None, description="GGUF file inside base_model.")
    device: str = Field(default="cpu", description="Device the model is loaded on.")
    dtype: str | None = Field(
        default=None, description="torch dtype name ('float32', 'bfloat16'...); None: default."
    )
    routing: Any | None = Field(
        default=None,
        description="RoutingConfig for every call (None: the engine's). "
        "Per call: routing=, top_k=.",
    )
    mixture: dict[str, float] | None = Field(
        default=None,
        description="Pinned mixture {adapter: weight} for every call (None: route each call; "
        "{}: base model only). Overridden per call by adapters=.",
    )
    max_new_tokens: int = Field(
        default=256, gt=0, description="Most new tokens per call (metadata.num_output)."
    )
    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Sampling seed (per call).")
    stop: list[str] | None = Field(default=None, description="Stop strings (cut from text).")

    _engine: BaseEngine | None = PrivateAttr(default=None)

    def __init__(self, engine: BaseEngine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if engine is not None and not isinstance(engine, BaseEngine):
            raise TypeError(f"engine must be a logo_engine BaseEngine, got {type(engine).__name__}")
        self._engine = engine

    @field_validator("routing")
    @classmethod
    def _check_routing(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, RoutingConfig):
            raise ValueError(f"routing must be a logo_engine.RoutingConfig, got {value!r}")
        return value

    @classmethod
    def class_name(cls) -> str:
        """Name of the class in payloads and serialisation."""
        return "LoGoLLM"

    # ------------------------------------------------------------------ engine and metadata
    @property
    def engine(self) -> BaseEngine:
        """The engine; loads the shared ``LoGoEngine`` on first use when none was passed in."""
        if self._engine is None:
            from logo_engine import LoGoEngine

            dtype = None
            if self.dtype is not None:
                import torch

                dtype = getattr(torch, self.dtype, None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"dtype must name a torch dtype, got {self.dtype!r}")
            self._engine = LoGoEngine.shared(
                self.base_model,
                adapters=self.adapters,
                routing=self.routing,
                device=self.device,
                dtype=dtype,
                gguf_file=self.gguf_file,
            )
        return self._engine

    async def _aengine(self) -> BaseEngine:
        """The engine, loaded in a worker thread if needed (loading must not block the loop)."""
        if self._engine is not None:
            return self._engine
        return await asyncio.to_thread(lambda: self.engine)

    @property
    def _chat_template(self) -> bool:
        tokenizer = getattr(self.engine, "tokenizer", None)
        return tokenizer is None or has_chat_template(tokenizer)

    @property
    def metadata(self) -> LLMMetadata:
        """Context window and model name from the engine.

        A chat and function-calling model when the tokenizer has a chat template.
        """
        engine = self.engine
        chat = self._chat_template
        return LLMMetadata(
            context_window=engine.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=chat,
            is_function_calling_model=chat,
            model_name=engine.model_name,
        )

    def to_payload(self) -> dict[str, Any]:
        """Metadata plus the adapter library and routing defaults (for events and callbacks)."""
        routing = self.routing or self.engine.routing
        return {
            **super().to_payload(),
            "adapter_names": self.engine.adapter_names,
            "mixture": self.mixture,
            "top_k": routing.top_k,
            "signal": routing.signal_name,
        }

    # --------------------------------------------------------------------- call plumbing
    def _engine_kwargs(self, engine: BaseEngine, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Per-call keyword arguments (LlamaIndex names) -> ``engine.generate`` arguments."""
        unknown = sorted(set(kwargs) - _CALL_KWARGS)
        if unknown:
            logger.warning("LoGoLLM ignores unsupported keyword arguments %s", unknown)
        max_new = kwargs.get("max_new_tokens", kwargs.get("max_tokens"))
        routing = kwargs.get("routing") or self.routing
        if kwargs.get("top_k") is not None:
            routing = dataclasses.replace(routing or engine.routing, top_k=kwargs["top_k"])
        tools = kwargs.get("tools")
        stop = kwargs.get("stop", self.stop)
        if isinstance(stop, str):
            stop = [stop]
        return {
            "max_new_tokens": self.max_new_tokens if max_new is None else max_new,
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "seed": kwargs.get("seed", self.seed),
            "stop": list(stop) if stop else None,
            "adapters": kwargs["adapters"] if "adapters" in kwargs else self.mixture,
            "routing": routing,
            "tools": [tool_schema(t) for t in tools] if tools else None,
            "tool_choice": normalize_tool_choice(kwargs.get("tool_choice")),
        }

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> str | list[dict[str, Any]]:
        """Messages for the chat template, or one string for a model without a template."""
        if self._chat_template:
            return to_engine_messages(messages)
        return self.messages_to_prompt(messages)

    def _completion_prompt(self, prompt: str, formatted: bool) -> str:
        return prompt if formatted else self.completion_to_prompt(prompt)

    def _emit(self, selection: Selection, engine: BaseEngine) -> None:
        """Dispatch the selection event in the active span (the LLM call's)."""
        dispatcher.event(LoGoSelectionEvent.from_selection(selection, engine.model_name))

    @staticmethod
    def _holds_tool_calls(call: dict[str, Any]) -> bool:
        return bool(call["tools"]) and call["tool_choice"] != "none"

    # ------------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete ``prompt`` (one user turn through the chat template, if the model has one)."""
        engine = self.engine
        generation = engine.generate(
            self._completion_prompt(prompt, formatted), **self._engine_kwargs(engine, kwargs)
        )
        self._emit(generation.selection, engine)
        return completion_response(generation, engine.model_name)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """:meth:`complete` without blocking the event loop (generation in a worker thread)."""
        engine = await self._aengine()
        generation = await engine.agenerate(
            self._completion_prompt(prompt, formatted), **self._engine_kwargs(engine, kwargs)
        )
        self._emit(generation.selection, engine)
        return completion_response(generation, engine.model_name)

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
        stream = engine.stream(
            self._completion_prompt(prompt, formatted), **self._engine_kwargs(engine, kwargs)
        )
        selection = stream.selection
        self._emit(selection, engine)
        name = engine.model_name
        additional, raw = response_metadata(selection, name)

        def gen() -> Generator[CompletionResponse, None, None]:
            text = ""
            try:
                for delta in stream:
                    text += delta
                    yield CompletionResponse(
                        text=text, delta=delta, additional_kwargs=dict(additional), raw=dict(raw)
                    )
            finally:
                stream.close()
            assert stream.generation is not None  # set once the stream is exhausted
            yield completion_response(stream.generation, name, text=text, delta="")

        return gen()

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """:meth:`stream_complete` for ``async for``; every model step runs in a worker thread."""
        engine = await self._aengine()
        stream = engine.astream(
            self._completion_prompt(prompt, formatted), **self._engine_kwargs(engine, kwargs)
        )
        selection = await stream.aselection()
        self._emit(selection, engine)
        name = engine.model_name
        additional, raw = response_metadata(selection, name)

        async def gen() -> AsyncIterator[CompletionResponse]:
            text = ""
            try:
                async for delta in stream:
                    text += delta
                    yield CompletionResponse(
                        text=text, delta=delta, additional_kwargs=dict(additional), raw=dict(raw)
                    )
            finally:
                await stream.aclose()
            assert stream.generation is not None
            yield completion_response(stream.generation, name, text=text, delta="")

        return gen()

    # ------------------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer a conversation through the chat template; tool calls parsed with tools."""
        engine = self.engine
        generation = engine.generate(
            self._chat_prompt(messages), **self._engine_kwargs(engine, kwargs)
        )
        self._emit(generation.selection, engine)
        return chat_response(generation, engine.model_name)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """:meth:`chat` without blocking the event loop (generation in a worker thread)."""
        engine = await self._aengine()
        generation = await engine.agenerate(
            self._chat_prompt(messages), **self._engine_kwargs(engine, kwargs)
        )
        self._emit(generation.selection, engine)
        return chat_response(generation, engine.model_name)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream a chat answer; the selection is on every chunk, usage on the last.

        With tools, tool-call markup is never sent as a delta: the last chunk carries the parsed
        calls in ``message.additional_kwargs["tool_calls"]``.
        """
        engine = self.engine
        call = self._engine_kwargs(engine, kwargs)
        stream = engine.stream(self._chat_prompt(messages), **call)
        selection = stream.selection
        self._emit(selection, engine)
        name = engine.model_name
        additional, raw = response_metadata(selection, name)
        shown = StreamFilter(hold_tool_calls=self._holds_tool_calls(call))

        def gen() -> Generator[ChatResponse, None, None]:
            try:
                for piece in stream:
                    delta = shown.push(piece)
                    if delta:
                        yield _chunk(shown.shown, delta, additional, raw)
            finally:
                stream.close()
            assert stream.generation is not None
            yield _final_chunk(stream.generation, name, shown)

        return gen()

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """:meth:`stream_chat` for ``async for``; every model step runs in a worker thread."""
        engine = await self._aengine()
        call = self._engine_kwargs(engine, kwargs)
        stream = engine.astream(self._chat_prompt(messages), **call)
        selection = await stream.aselection()
        self._emit(selection, engine)
        name = engine.model_name
        additional, raw = response_metadata(selection, name)
        shown = StreamFilter(hold_tool_calls=self._holds_tool_calls(call))

        async def gen() -> AsyncIterator[ChatResponse]:
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

        ``tool_required`` forces a call (``tool_choice="required"``) unless a tool choice is
        given. ``allow_parallel_tool_calls=False`` keeps only the first call of a non-streamed
        answer (see :meth:`_validate_chat_with_tools_response`).
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

        Raises ``ValueError`` when there is none and ``error_on_no_tool_call`` is True.
        """
        calls = message_tool_calls(response.message)
        if not calls and error_on_no_tool_call:
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
    return chat_response(
        generation, model_name, delta=shown.final_delta(answer_content(generation))
    )


__all__ = [
    "SELECTION_KEY",
    "LoGoLLM",
    "LoGoSelectionEvent",
    "SelectionRecorder",
    "answer_content",
    "chat_response",
    "completion_response",
    "message_tool_calls",
    "normalize_tool_choice",
    "record_selections",
    "response_metadata",
    "to_engine_message",
    "to_engine_messages",
    "tool_call_dict",
    "tool_schema",
    "tool_selection",
    "visible_text",
]

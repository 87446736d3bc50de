"""LangChain integration: :class:`ChatLoGo`, a ``BaseChatModel`` over a LoGo engine.

Every call goes through the engine's public methods (``route``, ``generate``, ``generate_batch``,
``stream``): the chat template, routing, tool prompts and the parsing of the answer (content, tool
calls, broken tool calls) live in the engine; what ChatLoGo shares with LoGoLLM (settings, engine
construction, call resolution) lives in :mod:`logo_integrations._common`. This module converts
LangChain messages to engine messages and back, and reports which adapters answered each call:

- ``AIMessage.response_metadata["logo_selection"]`` (the :class:`~logo_engine.Selection` as JSON)
  on ``invoke`` results, and on exactly one chunk of a stream (the last one, so that adding
  chunks does not concatenate it), next to ``model_name``, ``model_provider`` and
  ``finish_reason``; ``usage_metadata`` holds the token counts;
- hence in ``on_llm_end`` for every callback handler, and in the outputs of the LangSmith run;
- as **run metadata** of the chat-model run (``logo_adapter``, ``logo_adapters``,
  ``logo_weights``, ``logo_pinned``, ``logo_selection``) and **run tags** (``logo:<adapter>``), so
  traces can be filtered by adapter: the Runnable entry points (``invoke``, ``stream``,
  ``batch`` and their async forms) route first (the probe) and then start the run with the
  selection known; the generation then uses exactly that mixture. The selection travels from the
  entry point to the run by the run's id, never in the call's keyword arguments, so it is neither
  part of the LLM-cache key nor repeated in the run's invocation parameters.

>>> from logo_integrations.langchain import ChatLoGo
>>> llm = ChatLoGo()                     # the embedded default model and zoo, loaded on first use
>>> msg = llm.invoke("Convert 3 km to metres")
>>> msg.response_metadata["logo_selection"]["adapters"]
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from langchain_core.caches import BaseCache
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.load import dumps
from langchain_core.load.serializable import SerializedConstructor, SerializedNotImplemented
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import InvalidToolCall as LCInvalidToolCall
from langchain_core.messages.tool import ToolCall as LCToolCall
from langchain_core.messages.tool import (
    ToolCallChunk,
    invalid_tool_call,
    tool_call,
    tool_call_chunk,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config, get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.json import parse_partial_json
from langchain_core.utils.uuid import uuid7
from pydantic import ConfigDict, Field, PrivateAttr

from logo_engine.base import BaseEngine
from logo_engine.chat import StreamFilter
from logo_engine.errors import InvalidRequestError
from logo_engine.types import Generation, InvalidToolCall, Selection, Usage
from logo_integrations._common import (
    SELECTION_KEY,
    EngineCall,
    EngineSlot,
    LoGoSettings,
    normalize_tool_choice,
    openai_tool_call,
    resolve_call,
    routing_as_dict,
    selection_json,
    tool_names,
)

logger = logging.getLogger(__name__)

PROVIDER = "logo"  # ls_provider and response_metadata["model_provider"]
TAG_PREFIX = "logo:"  # run tag per chosen adapter: "logo:sql"
INVALID_KEY = "logo_invalid_tool_calls"  # response_metadata: broken calls, with why they are

# Call kwargs that LangChain itself passes or that have no meaning for a local model.
_IGNORED_KWARGS = frozenset(
    {"stream", "parallel_tool_calls", "strict", "ls_structured_output_format", "response_format"}
)
_ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "tool": "tool",
    "function": "tool",
}
# Content blocks of an assistant turn that are carried elsewhere (tool_calls) or not replayed.
_SKIPPED_AI_BLOCKS = frozenset(
    {"tool_use", "tool_call", "tool_call_chunk", "function_call", "reasoning", "thinking"}
)


# ------------------------------------------------------------- message conversion (pure)
def content_text(content: str | list[Any], *, role: str, index: int = 0) -> str:
    """The text of a message's content (a string, or a list of content blocks).

    Text blocks are joined; an assistant's tool-use and reasoning blocks are skipped (its tool
    calls travel in ``tool_calls``); a tool result's structured blocks are written as JSON. Any
    other block (image, audio, file) raises :class:`InvalidRequestError`: the model reads text.
    """
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif role == "assistant" and kind in _SKIPPED_AI_BLOCKS:
            continue
        elif role == "tool" and isinstance(block, Mapping):
            parts.append(json.dumps(dict(block), ensure_ascii=False, default=str))
        else:
            raise InvalidRequestError(
                f"message {index} ({role}) has a {kind!r} content block; ChatLoGo's model reads "
                "text only"
            )
    return "".join(parts)


def to_openai_tool_calls(tool_calls: Sequence[LCToolCall]) -> list[dict[str, Any]]:
    """LangChain tool calls -> OpenAI-style ``tool_calls`` (arguments as a JSON string)."""
    return [openai_tool_call(c.get("id"), c["name"], c.get("args", {})) for c in tool_calls]


def to_engine_message(message: BaseMessage, index: int = 0) -> dict[str, Any]:
    """Convert one LangChain message to the engine's ``{"role", "content", ...}`` dict.

    System -> system, human -> user, AI -> assistant (with OpenAI-style ``tool_calls``), tool and
    function results -> tool (with ``tool_call_id`` / ``name``). A ``ChatMessage`` keeps its role
    when it is one of the engine's four (or an alias such as ``human``, ``ai``, ``developer``).
    """
    if isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        role = "assistant"
    elif isinstance(message, (ToolMessage, FunctionMessage)):
        role = "tool"
    elif isinstance(message, ChatMessage):
        if message.role not in _ROLE_ALIASES:
            raise InvalidRequestError(
                f"message {index} has role {message.role!r}; expected one of "
                f"{sorted(_ROLE_ALIASES)}"
            )
        role = _ROLE_ALIASES[message.role]
    else:
        raise InvalidRequestError(
            f"message {index} is a {type(message).__name__}; ChatLoGo takes system, human, AI, "
            "tool and chat messages"
        )
    out: dict[str, Any] = {
        "role": role,
        "content": content_text(message.content, role=role, index=index),
    }
    if isinstance(message, AIMessage) and message.tool_calls:
        out["tool_calls"] = to_openai_tool_calls(message.tool_calls)
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
        if message.name:
            out["name"] = message.name
    if isinstance(message, FunctionMessage):
        out["name"] = message.name
    return out


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Convert a list of LangChain messages (see :func:`to_engine_message`)."""
    return [to_engine_message(m, i) for i, m in enumerate(messages)]


def tool_schemas(tools: Sequence[Any], *, strict: bool | None = None) -> list[dict[str, Any]]:
    """Tools as OpenAI function schemas, the form the engine's chat template takes.

    Accepts ``BaseTool`` objects, functions, pydantic models, TypedDicts and JSON / OpenAI schemas.
    """
    return [convert_to_openai_tool(t, strict=strict) for t in tools]


# ------------------------------------------------------------------ answers (pure)
def lc_tool_calls(generation: Generation) -> list[LCToolCall]:
    """The engine's parsed tool calls as LangChain ``ToolCall`` dicts."""
    return [tool_call(name=c.name, args=dict(c.arguments), id=c.id) for c in generation.tool_calls]


def lc_invalid_tool_calls(generation: Generation) -> list[LCInvalidToolCall]:
    """The engine's broken tool calls as LangChain ``InvalidToolCall`` dicts (error kept)."""
    return [
        invalid_tool_call(name=b.name, args=b.arguments, id=None, error=b.error)
        for b in generation.invalid_tool_calls
    ]


def usage_metadata(usage: Usage) -> UsageMetadata:
    """Engine token counts as LangChain ``UsageMetadata``.

    Prompt tokens served from the engine's prefill cache, when there are any, are
    ``input_token_details["cache_read"]`` (LangChain's convention for cached input).
    """
    out = UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )
    if usage.cached_tokens:
        out["input_token_details"] = {"cache_read": usage.cached_tokens}
    return out


def response_metadata(
    selection: Selection, model_name: str, generation: Generation
) -> dict[str, Any]:
    """``response_metadata`` of an answer: model, provider, finish reason, the selection.

    Broken tool calls are also listed under ``logo_invalid_tool_calls`` with their error: it is
    the one place the error survives adding stream chunks (LangChain re-derives the invalid calls
    of a sum of chunks from their text and drops the error).
    """
    out: dict[str, Any] = {
        "model_name": model_name,
        "model_provider": PROVIDER,
        "finish_reason": generation.finish_reason,
        SELECTION_KEY: selection_json(selection),
    }
    if generation.invalid_tool_calls:
        out[INVALID_KEY] = [b.model_dump(mode="json") for b in generation.invalid_tool_calls]
    return out


def selection_run_metadata(selection: Selection | Mapping[str, Any]) -> dict[str, Any]:
    """Run metadata for one call's selection: flat keys to filter traces on, and the whole.

    ``logo_adapter`` is the adapter with the largest weight (None: base model only);
    ``logo_abstained`` says that routing found no adapter standing out and chose the base model.
    """
    sel = selection if isinstance(selection, Selection) else Selection.model_validate(selection)
    return {
        "logo_adapter": sel.adapters[0] if sel.adapters else None,
        "logo_adapters": list(sel.adapters),
        "logo_weights": list(sel.weights),
        "logo_pinned": sel.pinned,
        "logo_abstained": sel.abstained,
        SELECTION_KEY: selection_json(sel),
    }


def selection_tags(selection: Selection) -> list[str]:
    """Run tags for one call's selection: ``logo:<adapter>`` for each chosen adapter."""
    return [TAG_PREFIX + name for name in selection.adapters]


def ai_message(generation: Generation, selection: Selection, model_name: str) -> AIMessage:
    """The ``AIMessage`` of a finished generation (content without any tool-call markup)."""
    return AIMessage(
        content=generation.content,
        tool_calls=lc_tool_calls(generation),
        invalid_tool_calls=lc_invalid_tool_calls(generation),
        usage_metadata=usage_metadata(generation.usage),
        response_metadata=response_metadata(selection, model_name, generation),
    )


def final_chunk(
    generation: Generation, selection: Selection, model_name: str, shown: str
) -> AIMessageChunk:
    """The last chunk of a stream: the content not shown yet, tool calls, usage, metadata.

    Only this chunk carries usage and response metadata (chunk addition concatenates strings).
    Tool calls arrive whole, as ``tool_call_chunks`` of this chunk.
    """
    content = generation.content
    chunks: list[ToolCallChunk] = [
        tool_call_chunk(
            name=c.name, args=json.dumps(c.arguments, ensure_ascii=False), id=c.id, index=i
        )
        for i, c in enumerate(generation.tool_calls)
    ]
    chunks += [
        tool_call_chunk(name=b.name, args=_unparseable(b), id=None, index=len(chunks) + i)
        for i, b in enumerate(generation.invalid_tool_calls)
    ]
    return AIMessageChunk(
        content=content[len(shown) :] if content.startswith(shown) else "",
        tool_call_chunks=chunks,
        usage_metadata=usage_metadata(generation.usage),
        response_metadata=response_metadata(selection, model_name, generation),
        chunk_position="last",
    )


def _unparseable(bad: InvalidToolCall) -> str:
    """A broken call's text as chunk args that LangChain will not read as a valid call."""
    try:
        parsed = parse_partial_json(bad.arguments)
    except ValueError:
        return bad.arguments
    return bad.arguments if not isinstance(parsed, dict) else f"({bad.error}) {bad.arguments}"


# ---------------------------------------------------- calls prepared before their run
@dataclass(frozen=True)
class _Prepared:
    """A call resolved (and routed) before its run started; a batch row's answer, if made."""

    call: EngineCall
    generation: Generation | None = None


class _PreparedCalls:
    """Calls prepared by the Runnable entry points, keyed by the id of the run they belong to."""

    def __init__(self) -> None:
        self._items: dict[UUID, _Prepared] = {}
        self._lock = threading.Lock()

    def put(self, run_id: UUID, prepared: _Prepared) -> None:
        with self._lock:
            self._items[run_id] = prepared

    def __contains__(self, run_id: object) -> bool:
        with self._lock:
            return run_id in self._items

    def take(self, run_id: UUID | None) -> _Prepared | None:
        """Remove and return the call prepared for ``run_id`` (None if there is none)."""
        if run_id is None:
            return None
        with self._lock:
            return self._items.pop(run_id, None)


_PREPARED = _PreparedCalls()
# The run an entry point is inside: BaseChatModel calls `_stream` without its run manager when it
# streams (stream(), or invoke with streaming on), so the run id also travels in the context.
_RUN: ContextVar[UUID | None] = ContextVar("logo_run", default=None)


@contextmanager
def _inside(run_id: UUID | None) -> Iterator[None]:
    """Mark the code in the block (and tasks and threads started from it) as run ``run_id``'s."""
    token = _RUN.set(run_id)
    try:
        yield
    finally:
        try:
            _RUN.reset(token)
        except ValueError:  # an async generator closed from another context: nothing to undo
            pass


# ------------------------------------------------------------------------------ the model
class ChatLoGo(LoGoSettings, BaseChatModel):
    """LangChain chat model over a LoGo engine: per-request LoRA adapter selection and merging.

    The engine is either passed in (``ChatLoGo(engine=...)``, any
    :class:`~logo_engine.base.BaseEngine`) or loaded on first use with
    ``LoGoEngine.shared(model, adapters=..., device=..., dtype=..., gguf_file=...)``, a
    process-wide cached instance: many ``ChatLoGo`` objects share one loaded model, and
    constructing one loads nothing. With ``base_url="http://host:8000/v1"`` (and ``api_key``) it
    talks to a LoGo server (`logo serve`) instead, with the same metadata, and this process loads
    no model and no torch. Unknown constructor arguments are refused.

    Per call (``invoke(..., **kwargs)`` or ``.bind(**kwargs)``): ``adapters={name: weight}`` (a
    pinned mixture; ``{}`` = base model only), ``top_k``, ``signal``, ``routing``, ``temperature``,
    ``max_tokens`` (or ``max_new_tokens``), ``top_p``, ``seed``, ``stop``, ``model`` (another base
    model, loaded lazily; not possible when an engine was passed in) and ``logo_selection`` (a
    precomputed :class:`~logo_engine.Selection` to reuse, e.g. from ``engine.route``).

    Example:
        .. code-block:: python

            from logo_integrations.langchain import ChatLoGo

            llm = ChatLoGo(top_k=2)
            msg = llm.invoke("How many rows does SELECT COUNT(*) FROM t return?")
            msg.response_metadata["logo_selection"]  # adapters, weights, scores, probe_ms
            llm.invoke("2 + 2 = ?", adapters={"math": 1.0})  # pinned mixture, no probe

    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    timeout: float | None = Field(
        default=None,
        description="Accepted for compatibility with other chat models; a local call is not "
        "cut short (bound its length with max_tokens).",
    )
    max_retries: int = Field(
        default=0,
        ge=0,
        description="Accepted for compatibility; a local call has no transient failures to retry.",
    )
    streaming: bool = Field(
        default=False, description="Stream through callbacks even on invoke (on_llm_new_token)."
    )
    _slot: EngineSlot = PrivateAttr()

    def __init__(self, engine: BaseEngine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._slot = EngineSlot(engine)

    # ------------------------------------------------------------------ engine and metadata
    @property
    def engine(self) -> BaseEngine:
        """The engine; loads the shared ``LoGoEngine`` on first use when none was passed in."""
        return self._slot.get(self.engine_spec)

    @property
    def _llm_type(self) -> str:
        return "logo-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model_label(self._slot.loaded),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
            "top_k": self.top_k,
            "signal": self.signal,
            "mixture": self.mixture,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """LangSmith standard params; the entry points add the selection to the run's metadata."""
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=self.model_label(self._slot.loaded, kwargs.get("model")),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_tokens))
        if max_tokens:
            params["ls_max_tokens"] = max_tokens
        stops = stop or kwargs.get("stop") or self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        return ModelProfile(
            text_inputs=True,
            text_outputs=True,
            image_inputs=False,
            audio_inputs=False,
            pdf_inputs=False,
            video_inputs=False,
            tool_calling=True,
            tool_choice=True,
            structured_output=False,  # through tool calling (with_structured_output)
        )

    def _combine_llm_outputs(self, llm_outputs: list[dict | None]) -> dict:
        outputs = [o for o in llm_outputs if o]
        if not outputs:
            return {}
        return {
            "model_name": outputs[0].get("model_name"),
            "logo_selections": [o.get(SELECTION_KEY) for o in outputs],
        }

    # ---------------------------------------------------------------- serialisation, cache
    @classmethod
    def is_lc_serializable(cls) -> bool:
        """A ChatLoGo built from settings serialises (``dumpd``) and loads back (``load``)."""
        return True

    @property
    def lc_secrets(self) -> dict[str, str]:
        """``api_key`` is serialised as a reference to this environment variable, not a value."""
        return {"api_key": "LOGO_API_KEY"}

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """``load(..., valid_namespaces=["logo_integrations"])`` finds the class here."""
        return ["logo_integrations", "langchain"]

    def to_json(self) -> SerializedConstructor | SerializedNotImplemented:
        """The settings as a LangChain constructor; an engine passed in does not serialise."""
        routing = routing_as_dict(self.routing) if self.routing is not None else None
        if self._slot.given or (self.routing is not None and routing is None):
            return self.to_json_not_implemented()
        out = super().to_json()
        if routing is not None and out["type"] == "constructor":
            out["kwargs"]["routing"] = routing
        return out

    def _get_llm_string(self, stop: list[str] | None = None, **kwargs: Any) -> str:
        """The LLM-cache key: settings and call kwargs, plus the identity of an engine passed in."""
        key = super()._get_llm_string(stop=stop, **kwargs)
        engine = self._slot.loaded
        if self._slot.given and engine is not None:
            key += f"---engine={type(engine).__qualname__}:{engine.model_name}:"
            key += ",".join(engine.adapter_names)
        return key

    def _cached_selection(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> Selection | None:
        """The selection of a cached answer to this exact call (None: not cached).

        Looks the call up as ``BaseChatModel`` will inside the run, so that a cache hit costs no
        probe; the run then returns the cached answer.
        """
        cache = self.cache if isinstance(self.cache, BaseCache) else get_llm_cache()
        if self.cache is False or cache is None:
            return None
        prompt = dumps(
            [m.model_copy(update={"id": None}) if getattr(m, "id", None) else m for m in messages]
        )
        hit = cache.lookup(prompt, self._get_llm_string(stop=stop, **kwargs))
        if not isinstance(hit, list) or not hit or not isinstance(hit[0], ChatGeneration):
            return None
        return Selection.model_validate(hit[0].message.response_metadata[SELECTION_KEY])

    # ------------------------------------------------------------------------- tools
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools: they go through the model's chat template, and its calls are parsed.

        Args:
            tools: ``BaseTool`` objects, functions, pydantic models, TypedDicts or JSON / OpenAI
                function schemas.
            tool_choice: ``"auto"`` (default), ``"none"``, ``"any"`` / ``"required"`` / ``True``
                (some tool must be called; with one tool, that tool), or a tool name (that tool
                must be called). A forced call starts the model's answer with the opening of the
                call, name included when the tool is known.
            **kwargs: more call kwargs to bind (``strict`` is used for the schemas).

        """
        formatted = tool_schemas(tools, strict=kwargs.pop("strict", None))
        choice = normalize_tool_choice(tool_choice, tool_names(formatted))
        if choice is not None:
            kwargs["tool_choice"] = choice
        return self.bind(tools=formatted, **kwargs)

    # --------------------------------------------------------------------- call plumbing
    def _resolve(
        self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> EngineCall:
        engine = self._slot.for_model(self.engine_spec, kwargs.get("model"))
        return resolve_call(
            self,
            engine,
            to_engine_messages(messages),
            kwargs,
            stop=stop,
            ignored=_IGNORED_KWARGS,
            owner="ChatLoGo",
        )

    def _prepared(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
        kwargs: Mapping[str, Any],
    ) -> _Prepared:
        """The run's call: prepared by the entry point before the run started, or resolved now."""
        prepared = _PREPARED.take(run_manager.run_id if run_manager is not None else _RUN.get())
        return prepared or _Prepared(self._resolve(messages, stop, kwargs))

    def _result(self, call: EngineCall, generation: Generation) -> ChatResult:
        selection = call.report(generation)
        name = call.engine.model_name
        return ChatResult(
            generations=[ChatGeneration(message=ai_message(generation, selection, name))],
            llm_output={"model_name": name, SELECTION_KEY: selection_json(selection)},
        )

    # ----------------------------------------------------- Runnable entry points: route first
    def _prepare_run(
        self,
        model_input: LanguageModelInput,
        config: RunnableConfig | None,
        stop: list[str] | None,
        kwargs: Mapping[str, Any],
        *,
        cached: bool,
    ) -> tuple[RunnableConfig, dict[str, Any], UUID | None]:
        """Resolve and route a call before its run starts, so the selection is in its metadata.

        Returns the run's config (selection tags and metadata, and a run id under which the
        prepared call waits for ``_generate``/``_stream``), the call kwargs to pass on (without a
        given ``logo_selection``: it travels with the prepared call), and that run id. With
        ``cached``, an answer in the LLM cache gives the selection and nothing is probed. If
        anything fails here (bad input, unknown adapter, a model that does not load), nothing is
        prepared: the run starts as usual and the same error is raised inside it, where callbacks
        and traces record it.
        """
        config = ensure_config(config)
        if config.get("run_id") in _PREPARED:  # prepared already (stream falling back to invoke)
            return config, dict(kwargs), None
        try:
            messages = self._convert_input(model_input).to_messages()
            rest = {k: v for k, v in kwargs.items() if k != SELECTION_KEY}
            selection = self._cached_selection(messages, stop, rest) if cached else None
            if selection is not None:
                return _with_selection(config, selection), rest, None
            call = self._resolve(messages, stop, kwargs).routed()
        except Exception:  # re-raised inside the run
            logger.debug("routing before the run failed; routing inside it", exc_info=True)
            return config, dict(kwargs), None
        run_id = config.get("run_id") or uuid7()
        _PREPARED.put(run_id, _Prepared(call))
        assert call.selection is not None  # routed() fixed it
        return {**_with_selection(config, call.selection), "run_id": run_id}, rest, run_id

    async def _aprepare_run(
        self,
        model_input: LanguageModelInput,
        config: RunnableConfig | None,
        stop: list[str] | None,
        kwargs: Mapping[str, Any],
        *,
        cached: bool,
    ) -> tuple[RunnableConfig, dict[str, Any], UUID | None]:
        """:meth:`_prepare_run` in a worker thread (it may load the model, and it probes)."""
        return await asyncio.to_thread(
            lambda: self._prepare_run(model_input, config, stop, kwargs, cached=cached)
        )

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """Answer one input; the selection is routed first and lands in the run's metadata."""
        config, kwargs, run_id = self._prepare_run(input, config, stop, kwargs, cached=True)
        try:
            with _inside(run_id):
                return super().invoke(input, config, stop=stop, **kwargs)
        finally:
            _PREPARED.take(run_id)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """:meth:`invoke` without blocking the event loop."""
        config, kwargs, run_id = await self._aprepare_run(input, config, stop, kwargs, cached=True)
        try:
            with _inside(run_id):
                return await super().ainvoke(input, config, stop=stop, **kwargs)
        finally:
            _PREPARED.take(run_id)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        """Stream one answer; the last chunk carries usage, finish reason and the selection."""
        config, kwargs, run_id = self._prepare_run(input, config, stop, kwargs, cached=False)
        try:
            with _inside(run_id):
                yield from super().stream(input, config, stop=stop, **kwargs)
        finally:
            _PREPARED.take(run_id)

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        """:meth:`stream` for ``async for``; every model step runs in a worker thread."""
        config, kwargs, run_id = await self._aprepare_run(input, config, stop, kwargs, cached=False)
        try:
            with _inside(run_id):
                async for chunk in super().astream(input, config, stop=stop, **kwargs):
                    yield chunk
        finally:
            _PREPARED.take(run_id)

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Answer several inputs with ONE batched probe and ONE batched generation.

        Every row gets its own selection. Each input still has its own run (callbacks, traces,
        metadata), recorded after the batched engine call. Inputs whose answer is in the LLM cache
        take no part in it. If the batched call fails, the inputs run one by one, so that each
        error lands in the run of the input that caused it.
        """
        if len(inputs) < 2:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        stop = kwargs.pop("stop", None)
        try:
            rows = self._plan_batch(inputs, get_config_list(config, len(inputs)), stop, kwargs)
        except Exception:
            logger.debug("batched call failed; running the inputs one by one", exc_info=True)
            return super().batch(
                inputs, config, return_exceptions=return_exceptions, stop=stop, **kwargs
            )
        out: list[Any] = []
        try:
            for model_input, (cfg, row_kwargs, run_id) in zip(inputs, rows, strict=True):
                try:
                    with _inside(run_id):
                        out.append(
                            BaseChatModel.invoke(self, model_input, cfg, stop=stop, **row_kwargs)
                        )
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    out.append(exc)
            return out
        finally:
            for _, _, run_id in rows:
                _PREPARED.take(run_id)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """:meth:`batch` without blocking the event loop."""
        if len(inputs) < 2:
            return await super().abatch(
                inputs, config, return_exceptions=return_exceptions, **kwargs
            )
        stop = kwargs.pop("stop", None)
        configs = get_config_list(config, len(inputs))
        try:
            rows = await asyncio.to_thread(self._plan_batch, inputs, configs, stop, kwargs)
        except Exception:
            logger.debug("batched call failed; running the inputs one by one", exc_info=True)
            return await super().abatch(
                inputs, config, return_exceptions=return_exceptions, stop=stop, **kwargs
            )
        out: list[Any] = []
        try:
            for model_input, (cfg, row_kwargs, _) in zip(inputs, rows, strict=True):
                try:
                    out.append(
                        await BaseChatModel.ainvoke(self, model_input, cfg, stop=stop, **row_kwargs)
                    )
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    out.append(exc)
            return out
        finally:
            for _, _, run_id in rows:
                _PREPARED.take(run_id)

    def _plan_batch(
        self,
        inputs: Sequence[LanguageModelInput],
        configs: Sequence[RunnableConfig],
        stop: list[str] | None,
        kwargs: Mapping[str, Any],
    ) -> list[tuple[RunnableConfig, dict[str, Any], UUID | None]]:
        """Route and generate every uncached row in one engine call; prepare one run per row."""
        if kwargs.get(SELECTION_KEY) is not None:
            raise InvalidRequestError("a batch routes each input; do not pass logo_selection")
        rows: list[tuple[RunnableConfig, dict[str, Any], UUID | None]] = []
        todo: list[tuple[int, EngineCall]] = []
        for i, (model_input, config) in enumerate(zip(inputs, configs, strict=True)):
            messages = self._convert_input(model_input).to_messages()
            cached = self._cached_selection(messages, stop, kwargs)
            if cached is not None:
                rows.append((_with_selection(ensure_config(config), cached), dict(kwargs), None))
            else:
                rows.append((ensure_config(config), dict(kwargs), None))
                todo.append((i, self._resolve(messages, stop, kwargs)))
        if not todo:
            return rows
        first = todo[0][1]
        if any(c.engine is not first.engine or c.options != first.options for _, c in todo):
            raise InvalidRequestError("the rows differ in engine or options; run them one by one")
        engine = first.engine
        prompts = [c.prompt for _, c in todo]
        routed = [c for _, c in todo if c.adapters is None]
        probed = iter(
            engine.route_batch(
                [c.prompt for c in routed],
                routing=first.options["routing"],
                tools=first.options["tools"],
                tool_choice=first.options["tool_choice"],
            )
            if routed
            else []
        )
        selections = [c.route() if c.adapters is not None else next(probed) for _, c in todo]
        generations = engine.generate_batch(  # one batched generation, a mixture per row
            prompts, **{**first.options, "adapters": [s.mixture for s in selections]}
        )
        for (i, call), selection, generation in zip(todo, selections, generations, strict=True):
            run_id = rows[i][0].get("run_id") or uuid7()
            prepared = _Prepared(dataclasses.replace(call, selection=selection), generation)
            _PREPARED.put(run_id, prepared)
            config = {**_with_selection(rows[i][0], selection), "run_id": run_id}
            rows[i] = (config, rows[i][1], run_id)
        return rows

    # ---------------------------------------------------------------- BaseChatModel hooks
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prepared = self._prepared(messages, stop, run_manager, kwargs)
        call = prepared.call
        generation = prepared.generation or call.engine.generate(
            call.prompt, **call.generate_kwargs
        )
        return self._result(call, generation)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prepared = await asyncio.to_thread(self._prepared, messages, stop, run_manager, kwargs)
        call = prepared.call
        generation = prepared.generation or await call.engine.agenerate(
            call.prompt, **call.generate_kwargs
        )
        return self._result(call, generation)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        prepared = self._prepared(messages, stop, run_manager, kwargs)
        call = prepared.call
        shown = StreamFilter(call.tools_bound)
        generation = prepared.generation  # a row of a batch, generated already
        stream = None if generation else call.engine.stream(call.prompt, **call.generate_kwargs)
        try:
            for piece in stream if stream is not None else [generation.text if generation else ""]:
                delta = shown.push(piece)
                if delta:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                    if run_manager:
                        run_manager.on_llm_new_token(delta, chunk=chunk)
                    yield chunk
        finally:
            if stream is not None:
                stream.close()
        generation = generation or (stream.generation if stream is not None else None)
        assert generation is not None  # set once the stream is exhausted
        last = self._last_chunk(call, generation, shown)
        if run_manager:
            run_manager.on_llm_new_token(last.text, chunk=last)
        yield last

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        prepared = await asyncio.to_thread(self._prepared, messages, stop, run_manager, kwargs)
        call = prepared.call
        shown = StreamFilter(call.tools_bound)
        generation = prepared.generation
        stream = None if generation else call.engine.astream(call.prompt, **call.generate_kwargs)
        try:
            async for piece in _pieces(stream, generation):
                delta = shown.push(piece)
                if delta:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                    if run_manager:
                        await run_manager.on_llm_new_token(delta, chunk=chunk)
                    yield chunk
        finally:
            if stream is not None:
                await stream.aclose()
        generation = generation or (stream.generation if stream is not None else None)
        assert generation is not None  # set once the stream is exhausted
        last = self._last_chunk(call, generation, shown)
        if run_manager:
            await run_manager.on_llm_new_token(last.text, chunk=last)
        yield last

    def _last_chunk(
        self, call: EngineCall, generation: Generation, shown: StreamFilter
    ) -> ChatGenerationChunk:
        message = final_chunk(
            generation, call.report(generation), call.engine.model_name, shown.shown
        )
        return ChatGenerationChunk(message=message)

    # ------------------------------------------------------------------- token counting
    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Exact number of prompt tokens the model sees (chat template and tools included)."""
        schemas = tool_schemas(tools) if tools else None
        return self.engine.count_tokens(to_engine_messages(messages), tools=schemas)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the engine's tokenizer, when it has one (no chat template)."""
        tokenizer = getattr(self.engine, "tokenizer", None)
        if tokenizer is None:
            return super().get_token_ids(text)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_selection(config: RunnableConfig, selection: Selection) -> RunnableConfig:
    """A run config carrying the selection as run tags and run metadata."""
    return {
        **config,
        "tags": [*(config.get("tags") or []), *selection_tags(selection)],
        "metadata": {**(config.get("metadata") or {}), **selection_run_metadata(selection)},
    }


async def _pieces(stream: Any, generation: Generation | None) -> AsyncIterator[str]:
    """Text pieces of an engine stream, or the whole text of a generation made already."""
    if stream is None:
        yield generation.text if generation is not None else ""
        return
    async for piece in stream:
        yield piece


__all__ = [
    "INVALID_KEY",
    "PROVIDER",
    "SELECTION_KEY",
    "ChatLoGo",
    "ai_message",
    "content_text",
    "final_chunk",
    "lc_invalid_tool_calls",
    "lc_tool_calls",
    "normalize_tool_choice",
    "response_metadata",
    "selection_run_metadata",
    "to_engine_message",
    "to_engine_messages",
    "to_openai_tool_calls",
    "tool_schemas",
    "usage_metadata",
]

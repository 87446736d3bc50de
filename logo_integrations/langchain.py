"""LangChain integration: :class:`ChatLoGo`, a ``BaseChatModel`` over the shared LoGo engine.

Every call goes through the engine's public methods (``route``, ``generate``, ``generate_batch``,
``stream`` and their async forms): the chat template, routing, tool prompts and tool-call parsing
live in the engine. This module converts LangChain messages to engine messages and back, and
reports which adapters answered each call:

- ``AIMessage.response_metadata["logo_selection"]`` (the :class:`~logo_engine.Selection` as JSON)
  on ``invoke`` results, and on exactly one chunk of a stream (the last one, so that adding
  chunks does not concatenate it), next to ``model_name``, ``model_provider`` and
  ``finish_reason``; ``usage_metadata`` holds the token counts;
- hence in ``on_llm_end`` for every callback handler, and in the outputs of the LangSmith run;
- as **run metadata** of the chat-model run (``logo_adapter``, ``logo_adapters``,
  ``logo_weights``, ``logo_pinned``, ``logo_selection``) and **run tags** (``logo:<adapter>``), so
  traces can be filtered by adapter: the Runnable entry points (``invoke``, ``stream``,
  ``batch`` and their async forms) route first (the probe) and then start the run with the
  selection known; the generation then uses exactly that mixture.

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
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
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
from langchain_core.messages.tool import (
    InvalidToolCall,
    ToolCallChunk,
    invalid_tool_call,
    tool_call,
    tool_call_chunk,
)
from langchain_core.messages.tool import ToolCall as LCToolCall
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config, get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, field_validator

from logo_engine.base import BaseEngine
from logo_engine.chat import TOOL_CALL_OPEN, StreamFilter, parse_tool_calls, visible_text
from logo_engine.errors import InvalidRequestError
from logo_engine.routing import pinned_selection
from logo_engine.types import Generation, RoutingConfig, Selection, ToolCall, Usage

logger = logging.getLogger(__name__)

PROVIDER = "logo"  # ls_provider and response_metadata["model_provider"]
SELECTION_KEY = "logo_selection"  # response_metadata key, run metadata key, call kwarg
TAG_PREFIX = "logo:"  # run tag per chosen adapter: "logo:sql"
DEFAULT_MAX_TOKENS = 256  # new tokens per call when max_tokens is None

# Call kwargs that LangChain itself passes or that have no meaning for a local model.
_IGNORED_KWARGS = frozenset(
    {"stream", "parallel_tool_calls", "strict", "ls_structured_output_format", "response_format"}
)
_CALL_KWARGS = frozenset(
    {
        "model",
        "adapters",
        SELECTION_KEY,
        "routing",
        "top_k",
        "signal",
        "temperature",
        "max_tokens",
        "max_new_tokens",
        "top_p",
        "seed",
        "stop",
        "tools",
        "tool_choice",
    }
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
    return [
        {
            "id": call.get("id") or "",
            "type": "function",
            "function": {
                "name": call["name"],
                "arguments": json.dumps(call.get("args", {}), ensure_ascii=False),
            },
        }
        for call in tool_calls
    ]


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
    out: dict[str, Any] = {"role": role, "content": content_text(message.content, role=role,
                                                                   index=index)}
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


def to_lc_tool_calls(calls: Sequence[ToolCall]) -> list[LCToolCall]:
    """Engine tool calls -> LangChain ``ToolCall`` dicts."""
    return [tool_call(name=c.name, args=dict(c.arguments), id=c.id) for c in calls]


def tool_schemas(tools: Sequence[Any], *, strict: bool | None = None) -> list[dict[str, Any]]:
    """Tools as OpenAI function schemas, the form the engine's chat template takes.

    Accepts ``BaseTool`` objects, functions, pydantic models, TypedDicts and JSON / OpenAI schemas.
    """
    return [convert_to_openai_tool(t, strict=strict) for t in tools]


def normalize_tool_choice(tool_choice: Any, tool_names: Sequence[str]) -> str | None:
    """LangChain / OpenAI tool choices -> the engine's (None, "auto", "none", "required", name).

    ``"any"``, ``"required"`` and ``True`` force some tool call; a tool name or
    ``{"type": "function", "function": {"name": ...}}`` forces that tool; ``False`` and ``None``
    leave the choice to the model.
    """
    if tool_choice is None or tool_choice is False:
        return None
    if tool_choice is True or tool_choice in ("any", "required"):
        return "required"
    if tool_choice in ("auto", "none"):
        return str(tool_choice)
    name: Any = tool_choice
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function", tool_choice)
        name = function.get("name") if isinstance(function, Mapping) else None
    if isinstance(name, str) and name in tool_names:
        return name
    raise InvalidRequestError(
        f"tool_choice must be None, 'auto', 'none', 'any', 'required', True or one of the bound "
        f"tools {list(tool_names)}, got {tool_choice!r}"
    )

@dataclass(frozen=True)
class Answer:
    """An answer split into what LangChain shows: content, tool calls, broken tool calls."""

    content: str
    tool_calls: list[LCToolCall]
    invalid_tool_calls: list[InvalidToolCall]


def split_answer(generation: Generation, tools_bound: bool) -> Answer:
    """Split a generation into content and tool calls.

    With tools bound, tool-call markup never stays in the content: parsed calls become
    ``tool_calls``; a ``<tool_call>`` block that does not parse becomes an ``invalid_tool_call``
    (so an agent does not show the raw markup as its final answer).
    """
    text = generation.text
    if generation.tool_calls:
        content = parse_tool_calls(text)[0]
        return Answer(content, to_lc_tool_calls(generation.tool_calls), [])
    if tools_bound and TOOL_CALL_OPEN in text:
        i = text.index(TOOL_CALL_OPEN)
        broken = invalid_tool_call(
            name=None, args=text[i:], id=None, error="the model's tool call is not valid JSON"
        )
        return Answer(text[:i].rstrip(), [], [broken])
    return Answer(text, [], [])


def usage_metadata(usage: Usage) -> UsageMetadata:
    """Engine token counts as LangChain ``UsageMetadata``."""
    return UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def response_metadata(
    selection: Selection, model_name: str, finish_reason: str | None
) -> dict[str, Any]:
    """``response_metadata`` of an answer: model, provider, finish reason and the selection."""
    out: dict[str, Any] = {"model_name": model_name, "model_provider": PROVIDER}
    if finish_reason is not None:
        out["finish_reason"] = finish_reason
    out[SELECTION_KEY] = selection.model_dump(mode="json")
    return out


def selection_run_metadata(selection: Selection | Mapping[str, Any]) -> dict[str, Any]:
    """Run metadata for one call's selection: flat keys to filter traces on, and the whole.

    ``logo_adapter`` is the adapter with the largest weight (None: base model only).
    """
    sel = selection if isinstance(selection, Selection) else Selection.model_validate(selection)
    return {
        "logo_adapter": sel.adapters[0] if sel.adapters else None,
        "logo_adapters": list(sel.adapters),
        "logo_weights": list(sel.weights),
        "logo_pinned": sel.pinned,
        SELECTION_KEY: sel.model_dump(mode="json"),
    }


def selection_tags(selection: Selection) -> list[str]:
    """Run tags for one call's selection: ``logo:<adapter>`` for each chosen adapter."""
    return [TAG_PREFIX + name for name in selection.adapters]


def ai_message(generation: Generation, selection: Selection, model_name: str,
               tools_bound: bool) -> AIMessage:
    """The ``AIMessage`` of a finished generation."""
    answer = split_answer(generation, tools_bound)
    return AIMessage(
        content=answer.content,
        tool_calls=answer.tool_calls,
        invalid_tool_calls=answer.invalid_tool_calls,
        usage_metadata=usage_metadata(generation.usage),
        response_metadata=response_metadata(selection, model_name, generation.finish_reason),
    )


def final_chunk(generation: Generation, selection: Selection, model_name: str,
                tools_bound: bool, shown: str) -> AIMessageChunk:
    """The last chunk of a stream: the content not shown yet, tool calls, usage, metadata.

    Only this chunk carries usage and response metadata (chunk addition concatenates strings).
    Tool calls arrive whole, as ``tool_call_chunks`` of this chunk.
    """
    answer = split_answer(generation, tools_bound)
    rest = answer.content[len(shown):] if answer.content.startswith(shown) else ""
    chunks: list[ToolCallChunk] = [
        tool_call_chunk(
            name=c["name"], args=json.dumps(c["args"], ensure_ascii=False), id=c["id"], index=i
        )
        for i, c in enumerate(answer.tool_calls)
    ]
    chunks += [
        tool_call_chunk(name=None, args=bad.get("args"), id=None, index=len(chunks) + i)
        for i, bad in enumerate(answer.invalid_tool_calls)
    ]
    return AIMessageChunk(
        content=rest,
        tool_call_chunks=chunks,
        usage_metadata=usage_metadata(generation.usage),
        response_metadata=response_metadata(selection, model_name, generation.finish_reason),
        chunk_position="last",
    )


# ------------------------------------------------------------------------ one engine call
@dataclass(frozen=True)
class _Call:
    """Everything one engine call needs, resolved from fields and call kwargs."""

    engine: BaseEngine
    prompt: list[dict[str, Any]]
    kwargs: dict[str, Any]  # engine.generate(...) keyword arguments, adapters excluded
    adapters: Mapping[str, float] | None  # pinned mixture (None: route)
    selection: Selection | None  # routed before the run (ChatLoGo's Runnable entry points)

    @property
    def tools_bound(self) -> bool:
        return bool(self.kwargs["tools"]) and self.kwargs["tool_choice"] != "none"

    @property
    def generate_kwargs(self) -> dict[str, Any]:
        adapters = self.selection.mixture if self.selection is not None else self.adapters
        return {**self.kwargs, "adapters": adapters}

    def report(self, generation: Generation) -> Selection:
        """The selection to report: the pre-routed one (with its scores) when there is one."""
        return self.selection if self.selection is not None else generation.selection


@dataclass
class _PlannedRow:
    prompt: list[dict[str, Any]]
    selection: Selection
    generation: Generation
    taken: bool = False


@dataclass
class _BatchPlan:
    """Rows of a batch generated in one engine call, handed to the per-input runs in turn."""

    engine: BaseEngine
    kwargs: dict[str, Any]
    rows: list[_PlannedRow]

    def take(self, call: _Call) -> Generation | None:
        """The planned generation for ``call``'s prompt and selection (None: not planned)."""
        if (
            call.engine is not self.engine
            or call.selection is None
            or _without_length(call.kwargs) != _without_length(self.kwargs)
        ):
            return None
        for row in self.rows:
            if not row.taken and row.prompt == call.prompt and row.selection == call.selection:
                row.taken = True
                return row.generation
        return None


def _without_length(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    # A batch runs with the smallest default length of its rows (max_tokens=None is cut per row).
    return {k: v for k, v in kwargs.items() if k != "max_new_tokens"}


_BATCH_PLAN: ContextVar[_BatchPlan | None] = ContextVar("logo_batch_plan", default=None)


def _planned(call: _Call) -> Generation | None:
    plan = _BATCH_PLAN.get()
    return plan.take(call) if plan is not None else None


# ------------------------------------------------------------------------------ the model
class ChatLoGo(BaseChatModel):
    """LangChain chat model over a LoGo engine: per-request LoRA adapter selection and merging.

    The engine is either passed in (``ChatLoGo(engine=...)``, any
    :class:`~logo_engine.base.BaseEngine`) or loaded on first use with
    ``LoGoEngine.shared(model, adapters=..., device=..., dtype=..., gguf_file=...)``, a
    process-wide cached instance: many ``ChatLoGo`` objects share one loaded model, and
    constructing one loads nothing.

    Per call (``invoke(..., **kwargs)`` or ``.bind(**kwargs)``): ``adapters={name: weight}`` (a
    pinned mixture; ``{}`` = base model only), ``top_k``, ``signal``, ``routing``, ``temperature``,
    ``max_tokens``, ``top_p``, ``seed``, ``stop``, ``model`` (another base model, loaded lazily;
    not possible when an engine was passed in) and ``logo_selection`` (a precomputed
    :class:`~logo_engine.Selection` to reuse, e.g. from ``engine.route``).

    Example:
        .. code-block:: python

            from logo_integrations.langchain import ChatLoGo

            llm = ChatLoGo(top_k=2)
            msg = llm.invoke("How many rows does SELECT COUNT(*) FROM t return?")
            msg.response_metadata["logo_selection"]  # adapters, weights, scores, probe_ms
            llm.invoke("2 + 2 = ?", adapters={"math": 1.0})  # pinned mixture, no probe

    """

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    model: str | None = Field(
        default=None,
        alias="model_name",
        description="Base model: an HF folder or hub id (None: the embedded default model). "
        "Ignored when an engine is passed in.",
    )
    adapters: Union[str, Path, dict[str, Union[str, Path]], list[Union[str, Path]]] | None = (
        Field(
            default=None,
            description="Adapter library to load: a folder of peft adapters, {name: path} or a "
            "list of folders (None: the shipped zoo with the default model). Ignored when an "
            "engine is passed in. The per-call `adapters=` argument is a different thing: a "
            "pinned mixture {name: weight}.",
        )
    )
    device: str = Field(default="cpu", description="Device the model is loaded on.")
    dtype: str | None = Field(
        default=None, description="torch dtype name ('float32', 'bfloat16'...); None: float32."
    )
    gguf_file: str | None = Field(default=None, description="GGUF file inside `model`.")

    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy decoding.")
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description=f"Most new tokens per call (None: {DEFAULT_MAX_TOKENS}, or what fits the "
        "context window).",
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Sampling seed (per call).")
    stop: list[str] | None = Field(
        default=None, description="Stop strings; the text is cut before the first one."
    )
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

    top_k: int | None = Field(
        default=None, ge=1, description="Adapters mixed per request (None: the engine's routing)."
    )
    signal: Literal["norm", "entropy"] | None = Field(
        default=None, description="Routing signal (None: the engine's routing)."
    )
    routing: Any | None = Field(
        default=None,
        description="A logo_engine.RoutingConfig for every call (None: the engine's); top_k and "
        "signal override its fields.",
    )
    mixture: dict[str, float] | None = Field(
        default=None,
        description="Pinned mixture {adapter: weight} for every call (None: route each call; "
        "{}: base model only). Overridden per call by adapters=.",
    )

    _engine: BaseEngine | None = PrivateAttr(default=None)
    _given: bool = PrivateAttr(default=False)

    def __init__(self, engine: BaseEngine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if engine is not None and not isinstance(engine, BaseEngine):
            raise TypeError(f"engine must be a logo_engine BaseEngine, got {type(engine).__name__}")
        self._engine = engine
        self._given = engine is not None

    @field_validator("routing")
    @classmethod
    def _check_routing(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, RoutingConfig):
            raise ValueError(f"routing must be a logo_engine.RoutingConfig, got {value!r}")
        return value

    # ------------------------------------------------------------------ engine and metadata
    @property
    def engine(self) -> BaseEngine:
        """The engine; loads the shared ``LoGoEngine`` on first use when none was passed in."""
        if self._engine is None:
            self._engine = self._load(self.model, self.gguf_file)
        return self._engine

    def _load(self, model: str | None, gguf_file: str | None) -> BaseEngine:
        from logo_engine import LoGoEngine

        dtype = None
        if self.dtype is not None:
            import torch

            dtype = getattr(torch, self.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"dtype must name a torch dtype, got {self.dtype!r}")
        return LoGoEngine.shared(
            model, adapters=self.adapters, device=self.device, dtype=dtype, gguf_file=gguf_file
        )

    def _engine_for(self, model: str | None) -> BaseEngine:
        """The engine serving ``model`` (a per-call override of the base model, or None)."""
        if model is None or model == self.model:
            return self.engine
        if self._engine is not None and model == self._engine.model_name:
            return self._engine
        if self._given:
            raise InvalidRequestError(
                f"model={model!r}, but this ChatLoGo serves the engine it was given "
                f"({self._engine.model_name if self._engine else None!r}); build another "
                "ChatLoGo for another model"
            )
        return self._load(model, None)

    def _model_label(self, model: str | None = None) -> str:
        """The model name for metadata, without loading anything."""
        if model:
            return model
        if self._engine is not None:
            return self._engine.model_name
        if self.model:
            return self.model
        from logo_engine.models import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME

    @property
    def _llm_type(self) -> str:
        return "logo-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self._model_label(),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
            "top_k": self.top_k,
            "signal": self.signal,
            "mixture": self.mixture,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """LangSmith standard params, plus the call's selection when it was routed beforehand."""
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=self._model_label(kwargs.get("model")),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens:
            params["ls_max_tokens"] = max_tokens
        stops = stop or kwargs.get("stop") or self.stop
        if stops:
            params["ls_stop"] = list(stops)
        if kwargs.get(SELECTION_KEY) is not None:
            params.update(selection_run_metadata(kwargs[SELECTION_KEY]))  # type: ignore[typeddict-item]
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
                (some tool must be called), or a tool name (that tool must be called). A forced
                call starts the model's answer with the opening of the call.
            **kwargs: more call kwargs to bind (``strict`` is used for the schemas).

        """
        formatted = tool_schemas(tools, strict=kwargs.pop("strict", None))
        names = [t["function"]["name"] for t in formatted]
        choice = normalize_tool_choice(tool_choice, names)
        if choice is not None:
            kwargs["tool_choice"] = choice
        return self.bind(tools=formatted, **kwargs)

    # --------------------------------------------------------------------- call plumbing
    def _resolve_call(
        self, engine: BaseEngine, prompt: list[dict[str, Any]], stop: list[str] | None,
        kwargs: Mapping[str, Any],
    ) -> _Call:
        """Fields and call kwargs -> one engine call (validated by the engine when it runs)."""
        unknown = sorted(set(kwargs) - _CALL_KWARGS - _IGNORED_KWARGS)
        if unknown:
            logger.warning("ChatLoGo ignores unsupported keyword arguments %s", unknown)
        routing = kwargs.get("routing") or self.routing
        if routing is not None and not isinstance(routing, RoutingConfig):
            raise InvalidRequestError(f"routing must be a RoutingConfig, got {routing!r}")
        overrides = {
            name: value
            for name in ("top_k", "signal")
            if (value := kwargs.get(name, getattr(self, name))) is not None
        }
        if overrides:
            routing = dataclasses.replace(routing or engine.routing, **overrides)
        max_tokens = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_tokens))
        stops = stop if stop is not None else kwargs.get("stop", self.stop)
        tools = kwargs.get("tools") or None
        if max_tokens is None:  # the default, cut to what fits the context window
            room = engine.context_window - engine.count_tokens(prompt, tools=tools)
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, room))
        selection = kwargs.get(SELECTION_KEY)
        if selection is not None and not isinstance(selection, Selection):
            selection = Selection.model_validate(selection)
        return _Call(
            engine=engine,
            prompt=prompt,
            kwargs={
                "max_new_tokens": max_tokens,
                "temperature": kwargs.get("temperature", self.temperature),
                "top_p": kwargs.get("top_p", self.top_p),
                "seed": kwargs.get("seed", self.seed),
                "stop": list(stops) if stops else None,
                "routing": routing,
                "tools": list(tools) if tools else None,
                "tool_choice": kwargs.get("tool_choice") if tools else None,
            },
            adapters=kwargs["adapters"] if "adapters" in kwargs else self.mixture,
            selection=selection,
        )

    def _call(self, messages: Sequence[BaseMessage], stop: list[str] | None,
              kwargs: Mapping[str, Any]) -> _Call:
        engine = self._engine_for(kwargs.get("model"))
        return self._resolve_call(engine, to_engine_messages(messages), stop, kwargs)

    async def _acall(self, messages: Sequence[BaseMessage], stop: list[str] | None,
                     kwargs: Mapping[str, Any]) -> _Call:
        """:meth:`_call` in a worker thread (it may load the model, and it tokenizes)."""
        return await asyncio.to_thread(self._call, messages, stop, kwargs)

    @staticmethod
    def _route(call: _Call) -> Selection:
        """The call's selection before generation: the pinned mixture, or the engine's probe."""
        if call.adapters is not None:
            return pinned_selection(call.adapters, call.engine.adapter_names)
        return call.engine.route(call.prompt, routing=call.kwargs["routing"],
                                 tools=call.kwargs["tools"], tool_choice=call.kwargs["tool_choice"])

    def _result(self, call: _Call, generation: Generation) -> ChatResult:
        selection = call.report(generation)
        name = call.engine.model_name
        message = ai_message(generation, selection, name, call.tools_bound)
        return ChatResult(
            generations=[ChatGeneration(message=message)],
            llm_output={"model_name": name, SELECTION_KEY: selection.model_dump(mode="json")},
        )

    # ----------------------------------------------------- Runnable entry points: route first
    @staticmethod
    def _tagged(config: RunnableConfig | None, selection: Selection) -> RunnableConfig:
        config = ensure_config(config)
        return {**config, "tags": [*(config.get("tags") or []), *selection_tags(selection)]}

    def _preroute(
        self, model_input: LanguageModelInput, config: RunnableConfig | None,
        stop: list[str] | None, kwargs: dict[str, Any],
    ) -> tuple[RunnableConfig | None, dict[str, Any]]:
        """Route before the run starts, so the selection is in its metadata and tags.

        If anything fails here (bad input, unknown adapter, a model that does not load), nothing
        is routed: the run starts as usual and the same error is raised inside it, where callbacks
        and traces record it.
        """
        try:
            given = kwargs.get(SELECTION_KEY)
            if given is not None:  # a selection computed by the caller (or by batch)
                selection = Selection.model_validate(given)
            else:
                messages = self._convert_input(model_input).to_messages()
                selection = self._route(self._call(messages, stop, kwargs))
        except Exception:  # re-raised inside the run
            logger.debug("routing before the run failed; routing inside it", exc_info=True)
            return config, kwargs
        return self._tagged(config, selection), {**kwargs, SELECTION_KEY: _as_json(selection)}

    async def _apreroute(
        self, model_input: LanguageModelInput, config: RunnableConfig | None,
        stop: list[str] | None, kwargs: dict[str, Any],
    ) -> tuple[RunnableConfig | None, dict[str, Any]]:
        """:meth:`_preroute` in a worker thread: the event loop keeps running."""
        return await asyncio.to_thread(self._preroute, model_input, config, stop, kwargs)

    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
        stop: list[str] | None = None, **kwargs: Any,
    ) -> AIMessage:
        """Answer one input; the selection is routed first and lands in the run's metadata."""
        config, kwargs = self._preroute(input, config, stop, kwargs)
        return super().invoke(input, config, stop=stop, **kwargs)

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
        stop: list[str] | None = None, **kwargs: Any,
    ) -> AIMessage:
        """:meth:`invoke` without blocking the event loop."""
        config, kwargs = await self._apreroute(input, config, stop, kwargs)
        return await super().ainvoke(input, config, stop=stop, **kwargs)

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
        stop: list[str] | None = None, **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        """Stream one answer; the last chunk carries usage, finish reason and the selection."""
        config, kwargs = self._preroute(input, config, stop, kwargs)
        yield from super().stream(input, config, stop=stop, **kwargs)

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
        stop: list[str] | None = None, **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        """:meth:`stream` for ``async for``; every model step runs in a worker thread."""
        config, kwargs = await self._apreroute(input, config, stop, kwargs)
        async for chunk in super().astream(input, config, stop=stop, **kwargs):
            yield chunk

    def batch(
        self, inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None, *,
        return_exceptions: bool = False, **kwargs: Any,
    ) -> list[Any]:
        """Answer several inputs with ONE batched probe and ONE batched generation.

        Every row gets its own selection. Each input still has its own run (callbacks, traces,
        metadata), recorded after the batched engine call. If the batched call fails, the inputs
        run one by one, so that each error lands in the run of the input that caused it.
        """
        if len(inputs) < 2:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        stop = kwargs.pop("stop", None)
        try:
            plan = self._plan(inputs, stop, kwargs)
        except Exception:
            logger.debug("batched call failed; running the inputs one by one", exc_info=True)
            return super().batch(inputs, config, return_exceptions=return_exceptions, stop=stop,
                                 **kwargs)
        token = _BATCH_PLAN.set(plan)
        try:
            out: list[Any] = []
            for model_input, cfg, row in zip(inputs, get_config_list(config, len(inputs)),
                                             plan.rows, strict=True):
                try:
                    out.append(BaseChatModel.invoke(
                        self, model_input, self._tagged(cfg, row.selection), stop=stop,
                        **{**kwargs, SELECTION_KEY: _as_json(row.selection)},
                    ))
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    out.append(exc)
            return out
        finally:
            _BATCH_PLAN.reset(token)

    async def abatch(
        self, inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None, *,
        return_exceptions: bool = False, **kwargs: Any,
    ) -> list[Any]:
        """:meth:`batch` without blocking the event loop."""
        if len(inputs) < 2:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions,
                                        **kwargs)
        stop = kwargs.pop("stop", None)
        try:
            plan = await self._aplan(inputs, stop, kwargs)
        except Exception:
            logger.debug("batched call failed; running the inputs one by one", exc_info=True)
            return await super().abatch(inputs, config, return_exceptions=return_exceptions,
                                        stop=stop, **kwargs)
        token = _BATCH_PLAN.set(plan)
        try:
            out: list[Any] = []
            for model_input, cfg, row in zip(inputs, get_config_list(config, len(inputs)),
                                             plan.rows, strict=True):
                try:
                    out.append(await BaseChatModel.ainvoke(
                        self, model_input, self._tagged(cfg, row.selection), stop=stop,
                        **{**kwargs, SELECTION_KEY: _as_json(row.selection)},
                    ))
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    out.append(exc)
            return out
        finally:
            _BATCH_PLAN.reset(token)

    def _batch_calls(self, engine: BaseEngine, inputs: Sequence[LanguageModelInput],
                     stop: list[str] | None, kwargs: Mapping[str, Any]) -> list[_Call]:
        if kwargs.get(SELECTION_KEY) is not None:
            raise InvalidRequestError("a batch routes each input; do not pass logo_selection")
        return [
            self._resolve_call(engine, to_engine_messages(self._convert_input(x).to_messages()),
                               stop, kwargs)
            for x in inputs
        ]

    def _plan(self, inputs: Sequence[LanguageModelInput], stop: list[str] | None,
              kwargs: Mapping[str, Any]) -> _BatchPlan:
        engine = self._engine_for(kwargs.get("model"))
        calls = self._batch_calls(engine, inputs, stop, kwargs)
        first = calls[0]
        prompts = [c.prompt for c in calls]
        kwargs_all = {**first.kwargs,
                      "max_new_tokens": min(c.kwargs["max_new_tokens"] for c in calls)}
        if first.adapters is not None:
            selections = [pinned_selection(first.adapters, engine.adapter_names)] * len(calls)
        else:  # one batched probe
            selections = engine.route_batch(prompts, routing=first.kwargs["routing"],
                                            tools=first.kwargs["tools"],
                                            tool_choice=first.kwargs["tool_choice"])
        generations = engine.generate_batch(  # one batched generation, a mixture per row
            prompts, **{**kwargs_all, "adapters": [s.mixture for s in selections]}
        )
        return _BatchPlan(engine, kwargs_all, [
            _PlannedRow(p, s, g) for p, s, g in zip(prompts, selections, generations, strict=True)
        ])

    async def _aplan(self, inputs: Sequence[LanguageModelInput], stop: list[str] | None,
                     kwargs: Mapping[str, Any]) -> _BatchPlan:
        """:meth:`_plan` in a worker thread."""
        return await asyncio.to_thread(self._plan, inputs, stop, kwargs)

    # ---------------------------------------------------------------- BaseChatModel hooks
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._call(messages, stop, kwargs)
        generation = _planned(call) or call.engine.generate(call.prompt, **call.generate_kwargs)
        return self._result(call, generation)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = await self._acall(messages, stop, kwargs)
        generation = _planned(call) or await call.engine.agenerate(
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
        call = self._call(messages, stop, kwargs)
        text = StreamFilter(call.tools_bound)
        generation = _planned(call)  # a row of a batch, generated already
        stream = None
        pieces: Iterator[str] = iter([generation.text]) if generation is not None else iter(())
        if generation is None:
            stream = call.engine.stream(call.prompt, **call.generate_kwargs)
            pieces = stream
        try:
            for piece in pieces:
                delta = text.push(piece)
                if delta:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                    if run_manager:
                        run_manager.on_llm_new_token(delta, chunk=chunk)
                    yield chunk
        finally:
            if stream is not None:
                stream.close()
        if stream is not None:
            generation = stream.generation
        assert generation is not None  # set once the stream is exhausted
        last = ChatGenerationChunk(message=final_chunk(
            generation, call.report(generation), call.engine.model_name, call.tools_bound,
            text.shown,
        ))
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
        call = await self._acall(messages, stop, kwargs)
        text = StreamFilter(call.tools_bound)
        generation = _planned(call)
        stream = None
        if generation is None:
            stream = call.engine.astream(call.prompt, **call.generate_kwargs)
        try:
            async for piece in _pieces(stream, generation):
                delta = text.push(piece)
                if delta:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                    if run_manager:
                        await run_manager.on_llm_new_token(delta, chunk=chunk)
                    yield chunk
        finally:
            if stream is not None:
                await stream.aclose()
        if stream is not None:
            generation = stream.generation
        assert generation is not None  # set once the stream is exhausted
        last = ChatGenerationChunk(message=final_chunk(
            generation, call.report(generation), call.engine.model_name, call.tools_bound,
            text.shown,
        ))
        if run_manager:
            await run_manager.on_llm_new_token(last.text, chunk=last)
        yield last

    # ------------------------------------------------------------------- token counting
    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Exact number of prompt tokens the model sees (chat template and tools included)."""
        schemas = tool_schemas(tools) if tools else None
        return self.engine.count_tokens(to_engine_messages(messages), tools=schemas)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the engine's tokenizer (no chat template)."""
        tokenizer = getattr(self.engine, "tokenizer", None)
        if tokenizer is None:
            return super().get_token_ids(text)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _as_json(selection: Selection) -> dict[str, Any]:
    """A selection as the JSON dict passed in call kwargs (and so in invocation params)."""
    return selection.model_dump(mode="json")


async def _pieces(stream: Any, generation: Generation | None) -> AsyncIterator[str]:
    """Text pieces of an engine stream, or the whole text of a generation made already."""
    if stream is None:
        assert generation is not None
        yield generation.text
        return
    async for piece in stream:
        yield piece


__all__ = [
    "ChatLoGo",
    "content_text",
    "normalize_tool_choice",
    "selection_run_metadata",
    "split_answer",
    "to_engine_message",
    "to_engine_messages",
    "to_lc_tool_calls",
    "to_openai_tool_calls",
    "visible_text",
]

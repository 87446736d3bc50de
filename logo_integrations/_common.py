"""The integration core: what ChatLoGo and LoGoLLM share, written once.

Where the engine comes from, the settings both expose, how one call's arguments resolve into an
engine call, and tool-call dicts.

Framework-free (no langchain, no llama_index import): each integration only converts its
framework's objects to and from what is here. Nothing here assumes a torch model behind the engine:
only the :class:`~logo_engine.base.BaseEngine` surface (``route``, ``generate``, ``stream``, their
async forms, ``count_tokens``, ``context_window``, ``model_name``, ``adapter_names``), so an
engine-like client of a LoGo server can stand in for a local engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator, model_validator

from logo_engine.base import BaseEngine, Mixture
from logo_engine.chat import Prompt, has_chat_template
from logo_engine.errors import InvalidRequestError
from logo_engine.selection import pinned_selection
from logo_engine.types import (
    DTYPES,
    Generation,
    RoutingConfig,
    Selection,
    ToolCall,
    check_dtype_name,
    parse_dtype,
)

logger = logging.getLogger(__name__)

SELECTION_KEY = "logo_selection"  # where both integrations put a call's Selection (as JSON)
DEFAULT_MAX_TOKENS = 256  # new tokens per call when max_tokens is None (cut to the context window)
# Other names accepted for a setting (constructor or per call) -> the canonical name.
ALIASES = {"model_name": "model", "base_model": "model", "max_new_tokens": "max_tokens"}
# Per-call keyword arguments both integrations understand (LangChain adds `model`).
CALL_KWARGS = frozenset(
    {
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

AdapterLibrarySource = Union[str, Path, dict[str, Union[str, Path]], list[Union[str, Path]]]


# ------------------------------------------------------------------------------ the engine
@dataclass(frozen=True)
class EngineSpec:
    """Where an integration's engine comes from when none is passed in."""

    model: str | None = None  # HF folder or hub id; None: the embedded default model
    adapters: AdapterLibrarySource | None = None  # adapter library; None: the shipped zoo
    device: str = "cpu"
    dtype: str | None = None  # a name in DTYPES; None: float32
    gguf_file: str | None = None
    base_url: str | None = None  # a `logo serve` server: a RemoteEngine instead of a local one
    api_key: str | None = field(default=None, repr=False)  # the server's key (None: LOGO_API_KEY)
    prefix_cache_bytes: int | None = None  # each prefix cache's budget; None: engine default
    probe_dtype: str | None = None  # a name in DTYPES; None: the model's dtype
    probe_compile: bool = False  # torch.compile the probe (LoGoEngine(probe_compile=True))


def build_engine(spec: EngineSpec) -> BaseEngine:
    """The one place an integration gets an engine it was not given.

    A process-wide ``LoGoEngine.shared`` instance for these arguments: any number of model objects
    share one loaded model. Routing is not part of the key: it is chosen per call. With
    ``base_url``, a :class:`~logo_engine.client.RemoteEngine` on that server (``model``: the served
    model name to request, e.g. ``"<model>:<adapter>"``; None: the server's routed model); nothing
    heavy is imported, torch included.
    ``prefix_cache_bytes`` (when set) is the byte budget of each of a local engine's prefix caches,
    ``probe_dtype`` (when set) the dtype its probe runs in, ``probe_compile`` (when true) whether
    the probe is compiled.
    """
    if spec.base_url is not None:
        from logo_engine.client import RemoteEngine

        return RemoteEngine(spec.base_url, api_key=spec.api_key, model=spec.model)
    from logo_engine.engine import LoGoEngine
    from logo_engine.types import PrefixCacheConfig

    extra: dict[str, Any] = {}
    if spec.prefix_cache_bytes is not None:
        budget = spec.prefix_cache_bytes
        extra["prefix_cache"] = PrefixCacheConfig(probe_bytes=budget, prefill_bytes=budget)
    if spec.probe_dtype is not None:
        extra["probe_dtype"] = parse_dtype(spec.probe_dtype, what="probe_dtype")
    if spec.probe_compile:
        extra["probe_compile"] = True
    return LoGoEngine.shared(
        spec.model,
        adapters=spec.adapters,
        device=spec.device,
        dtype=parse_dtype(spec.dtype),
        gguf_file=spec.gguf_file,
        **extra,
    )


class EngineSlot:
    """The engine of one model object: the one it was given, or one built on first use.

    Building happens once (thread-safe) and never in the model object's constructor; the async
    accessor builds in a worker thread, so an event loop never waits on a model load.
    """

    def __init__(self, given: BaseEngine | None) -> None:
        if given is not None and not isinstance(given, BaseEngine):
            raise TypeError(f"engine must be a logo_engine BaseEngine, got {type(given).__name__}")
        self.given = given is not None
        self._engine = given
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> EngineSlot:
        """Copies of a model object share its engine (a model is never copied)."""
        copy = EngineSlot(self._engine)
        copy.given = self.given
        return copy

    @property
    def loaded(self) -> BaseEngine | None:
        """The engine if it exists already (never builds one)."""
        return self._engine

    def get(self, spec: EngineSpec) -> BaseEngine:
        """The engine, built from ``spec`` on first use."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = build_engine(spec)
        return self._engine

    async def aget(self, spec: EngineSpec) -> BaseEngine:
        """:meth:`get` without blocking the event loop (a build runs in a worker thread)."""
        if self._engine is not None:
            return self._engine
        return await asyncio.to_thread(self.get, spec)

    def for_model(self, spec: EngineSpec, model: str | None) -> BaseEngine:
        """The engine serving a per-call base model (None or the configured one: the usual one)."""
        if model is None or model == spec.model:
            return self.get(spec)
        if self._engine is not None and model == self._engine.model_name:
            return self._engine
        if self.given:
            raise InvalidRequestError(
                f"model={model!r}, but this model object serves the engine it was given "
                f"({self._engine.model_name if self._engine else None!r}); build another one "
                "for another base model"
            )
        return build_engine(dataclasses.replace(spec, model=model, gguf_file=None))


@dataclass(frozen=True)
class ModelFacts:
    """What is known about a base model without loading it (None: not known)."""

    context_window: int | None = None
    chat_template: bool | None = None


def peek_model(model: str | None) -> ModelFacts:
    """Read a local model folder's config and tokenizer config, not its weights.

    ``None`` is the embedded default model, known once it has been converted into the cache. A hub
    id or a folder without these files gives no facts.
    """
    if model is None:
        from logo_engine.models import DEFAULT_MODEL_NAME, cache_dir

        folder = cache_dir() / DEFAULT_MODEL_NAME
    else:
        folder = Path(model)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return ModelFacts()
    window = config.get("max_position_embeddings")
    template: bool | None = (folder / "chat_template.jinja").is_file() or None
    if template is None:
        try:
            tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
            template = bool(tokenizer_config.get("chat_template"))
        except (OSError, ValueError):
            template = None
    return ModelFacts(window if isinstance(window, int) else None, template)


def engine_has_chat_template(engine: BaseEngine) -> bool:
    """Whether the engine's model reads chat messages (an engine without a tokenizer: yes).

    A remote engine says so itself (``chat_template``, from its server).
    """
    told = getattr(engine, "chat_template", None)
    if isinstance(told, bool):
        return told
    tokenizer = getattr(engine, "tokenizer", None)
    return tokenizer is None or has_chat_template(tokenizer)


# ------------------------------------------------------------------------------ settings
class LoGoSettings(BaseModel):
    """The settings both model classes expose, under the conventional names.

    ``model`` also accepts ``model_name`` and ``base_model``; ``max_tokens`` also accepts
    ``max_new_tokens``. Each class refuses names it does not know.
    """

    model: str | None = Field(
        default=None,
        description="Base model: an HF folder or hub id (None: the embedded default model). "
        "Aliases: model_name, base_model. Not used when an engine is passed in. With base_url: "
        "the served model to request (None: the server's routed model; '<model>:<adapter>' pins "
        "that adapter).",
    )
    base_url: str | None = Field(
        default=None,
        description="A LoGo server (`logo serve`), e.g. 'http://host:8000/v1': calls go there "
        "through logo_engine.RemoteEngine, with the same selection metadata, and this process "
        "loads no model (nor torch). adapters, device, dtype, probe_dtype, probe_compile and "
        "gguf_file are then unused.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="The server's API key with base_url (default: env LOGO_API_KEY, if set, read "
        "when the model is built). A local engine needs none.",
    )
    adapters: AdapterLibrarySource | None = Field(
        default=None,
        description="Adapter library to load: a folder of peft adapters, {name: path} or a list "
        "of folders (None: the shipped zoo with the default model). Not used when an engine is "
        "passed in. The per-call `adapters=` argument is a different thing: a pinned mixture "
        "{name: weight}.",
    )
    device: str = Field(default="cpu", description="Device the model is loaded on.")
    dtype: str | None = Field(
        default=None, description=f"torch dtype name, one of {list(DTYPES)} (None: float32)."
    )
    gguf_file: str | None = Field(default=None, description="GGUF file inside `model`.")
    prefix_cache_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Byte budget of each of the engine's prefix caches, probe and prefill (None: "
        "the engine's default, 256 MiB each; 0: off). An agent's next step then probes and "
        "prefills only its new tokens. Not used when an engine is passed in.",
    )
    probe_dtype: str | None = Field(
        default=None,
        description=f"dtype of the routing probe alone, one of {list(DTYPES)} (None: dtype). "
        "'bfloat16' under a float32 model probes about twice as fast on AMX CPUs and GPUs; "
        "answers stay float32. Not used when an engine is passed in.",
    )
    probe_compile: bool = Field(
        default=False,
        description="torch.compile the routing probe (Llama-style models): 0.6-0.8x the eager "
        "probe's time after minutes of compilation at the first calls, so for long-running "
        "agents and servers. Not used when an engine is passed in.",
    )

    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy decoding.")
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description=f"Most new tokens per call (None: {DEFAULT_MAX_TOKENS}, or what fits the "
        "context window). Alias: max_new_tokens.",
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Sampling seed (per call).")
    stop: list[str] | None = Field(
        default=None, description="Stop strings; the text is cut before the first one."
    )

    top_k: int | None = Field(
        default=None, ge=1, description="Adapters mixed per request (None: the engine's routing)."
    )
    signal: Literal["norm", "entropy", "prototype"] | None = Field(
        default=None, description="Routing signal (None: the engine's routing)."
    )
    routing: Any | None = Field(
        default=None,
        description="A logo_engine.RoutingConfig (or a dict of its fields) for every call (None: "
        "the engine's); top_k and signal override its fields.",
    )
    mixture: dict[str, float] | None = Field(
        default=None,
        description="Pinned mixture {adapter: weight} for every call (None: route each call; "
        "{}: base model only). Overridden per call by adapters=.",
    )

    @model_validator(mode="before")
    @classmethod
    def _canonical_names(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = canonical_names(data)
        if data.get("base_url") is not None and data.get("api_key") is None:
            env_key = os.environ.get("LOGO_API_KEY")
            if env_key:  # as ChatOpenAI reads OPENAI_API_KEY: the key is on the model, not hidden
                data["api_key"] = env_key
        return data

    @field_validator("routing")
    @classmethod
    def _check_routing(cls, value: Any) -> Any:
        return as_routing(value)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must be an http(s) URL such as http://host:8000/v1, got {value!r}"
            )
        return value

    @field_validator("dtype", "probe_dtype")
    @classmethod
    def _check_dtype(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            check_dtype_name(value, what=str(info.field_name))
        return value

    @property
    def engine_spec(self) -> EngineSpec:
        """Where the engine comes from when none is passed in."""
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        return EngineSpec(
            self.model,
            self.adapters,
            self.device,
            self.dtype,
            self.gguf_file,
            base_url=self.base_url,
            api_key=key,
            prefix_cache_bytes=self.prefix_cache_bytes,
            probe_dtype=self.probe_dtype,
            probe_compile=self.probe_compile,
        )

    def model_label(self, engine: BaseEngine | None, model: str | None = None) -> str:
        """The base model's name for metadata and traces, without loading anything."""
        if model:
            return model
        if engine is not None:
            return engine.model_name
        if self.model:
            return self.model
        if self.base_url is not None:
            return self.base_url  # the served model's name is known once the engine is built
        from logo_engine.models import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME


def canonical_names(values: Mapping[str, Any]) -> dict[str, Any]:
    """Rename aliases (``max_new_tokens``, ``base_model``...) to their canonical names.

    Giving a name and its alias with different values is refused.
    """
    out = dict(values)
    for alias, name in ALIASES.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        if name in out and out[name] != value:
            raise ValueError(
                f"{alias} is another name for {name}; got {name}={out[name]!r} and "
                f"{alias}={value!r}: pass one of them"
            )
        out[name] = value
    return out


def as_routing(value: Any) -> RoutingConfig | None:
    """A RoutingConfig from itself or a dict of its fields (None stays None)."""
    if value is None or isinstance(value, RoutingConfig):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(RoutingConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequestError(
                f"routing has unknown fields {unknown}; RoutingConfig has {sorted(known)}"
            )
        return RoutingConfig(**value)
    raise InvalidRequestError(
        f"routing must be a logo_engine.RoutingConfig or a dict, got {value!r}"
    )


def routing_as_dict(routing: RoutingConfig) -> dict[str, Any] | None:
    """A RoutingConfig as plain JSON (None when its signal is a Python function)."""
    if callable(routing.signal):
        return None
    return dataclasses.asdict(routing)


# ---------------------------------------------------------------------------- one call
@dataclass(frozen=True)
class EngineCall:
    """One call resolved for the engine: prompt, generation options, pinned mixture, selection."""

    engine: BaseEngine
    prompt: Prompt
    options: dict[str, Any]  # engine.generate(...) keyword arguments, adapters excepted
    adapters: Mixture | None  # pinned mixture (None: route)
    selection: Selection | None = None  # routed already (or given by the caller)

    @property
    def tools_bound(self) -> bool:
        """Whether tools are offered (their call markup is then held back from streams)."""
        return bool(self.options["tools"]) and self.options["tool_choice"] != "none"

    @property
    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``engine.generate`` / ``stream``: the selection's mixture if any."""
        adapters = self.selection.mixture if self.selection is not None else self.adapters
        return {**self.options, "adapters": adapters}

    def route(self) -> Selection:
        """The selection before generation: the given one, the pinned mixture, or the probe."""
        if self.selection is not None:
            return self.selection
        if self.adapters is not None:
            return pinned_selection(self.adapters, self.engine.adapter_names)
        return self.engine.route(
            self.prompt,
            routing=self.options["routing"],
            tools=self.options["tools"],
            tool_choice=self.options["tool_choice"],
        )

    def routed(self) -> EngineCall:
        """The same call with its selection fixed (the probe runs now, if it must)."""
        return dataclasses.replace(self, selection=self.route())

    def report(self, generation: Generation) -> Selection:
        """The selection to report: the one fixed before generation (with its scores), if any."""
        return self.selection if self.selection is not None else generation.selection


def resolve_call(
    settings: LoGoSettings,
    engine: BaseEngine,
    prompt: Prompt,
    kwargs: Mapping[str, Any],
    *,
    stop: Sequence[str] | None = None,
    ignored: frozenset[str] = frozenset(),
    owner: str = "LoGo",
) -> EngineCall:
    """Settings and per-call keyword arguments -> one engine call (the engine validates values).

    ``kwargs`` use the settings' names (aliases accepted); ``tools`` are OpenAI function schemas.
    Names in ``ignored`` are dropped silently, other unknown ones with a warning.
    """
    unknown = sorted(set(kwargs) - CALL_KWARGS - ignored - {"model"})
    if unknown:
        logger.warning("%s ignores unsupported keyword arguments %s", owner, unknown)
    kwargs = canonical_names({k: v for k, v in kwargs.items() if k in CALL_KWARGS})
    routing = routing_for(
        engine,
        as_routing(kwargs.get("routing")) or settings.routing,
        top_k=kwargs.get("top_k", settings.top_k),
        signal=kwargs.get("signal", settings.signal),
    )
    tools = list(kwargs.get("tools") or []) or None
    choice = normalize_tool_choice(kwargs.get("tool_choice"), tool_names(tools or []))
    stops = stop if stop is not None else kwargs.get("stop", settings.stop)
    if isinstance(stops, str):
        stops = [stops]
    max_tokens = kwargs.get("max_tokens", settings.max_tokens)
    if max_tokens is None:  # the default, cut to what fits the context window
        room = engine.context_window - engine.count_tokens(prompt, tools=tools)
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, room))
    selection = kwargs.get(SELECTION_KEY)
    if selection is not None and not isinstance(selection, Selection):
        selection = Selection.model_validate(selection)
    return EngineCall(
        engine=engine,
        prompt=prompt,
        options={
            "max_new_tokens": max_tokens,
            "temperature": kwargs.get("temperature", settings.temperature),
            "top_p": kwargs.get("top_p", settings.top_p),
            "seed": kwargs.get("seed", settings.seed),
            "stop": list(stops) if stops else None,
            "routing": routing,
            "tools": tools,
            "tool_choice": choice if tools else None,
        },
        adapters=kwargs["adapters"] if "adapters" in kwargs else settings.mixture,
        selection=selection,
    )


def routing_for(
    engine: BaseEngine,
    routing: RoutingConfig | None,
    *,
    top_k: int | None = None,
    signal: str | None = None,
) -> RoutingConfig | None:
    """The routing of one call: ``routing`` (None: the engine's) with ``top_k``/``signal`` set."""
    overrides: dict[str, Any] = {
        k: v for k, v in (("top_k", top_k), ("signal", signal)) if v is not None
    }
    if not overrides:
        return routing
    return dataclasses.replace(routing or engine.routing, **overrides)


# ---------------------------------------------------------------------------------- tools
def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of OpenAI function schemas."""
    return [str(t.get("function", t).get("name")) for t in tools]


def normalize_tool_choice(tool_choice: Any, names: Sequence[str]) -> str | None:
    """Framework / OpenAI / Anthropic tool choices -> the engine's.

    ``None``/``False`` -> None (the model decides); ``"auto"``, ``"none"``; ``"any"``,
    ``"required"``, ``True`` -> ``"required"`` (with exactly one tool the engine then forces that
    tool, name included); a tool name, ``{"name": ...}`` or ``{"type": "function", "function":
    {"name": ...}}`` -> that name, which must be one of ``names``.
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
    if isinstance(name, str) and name in names:
        return name
    raise InvalidRequestError(
        "tool_choice must be None, 'auto', 'none', 'any', 'required', True, or one of the "
        f"tools {list(names)} (a name or {{'type': 'function', 'function': {{'name': ...}}}}), "
        f"got {tool_choice!r}"
    )


def openai_tool_call(call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    """An OpenAI-style tool call: ``{"id", "type": "function", "function": {name, arguments}}``.

    ``arguments`` (a mapping, or JSON text kept as it is) is written as a JSON string.
    """
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {
        "id": call_id or "",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def engine_tool_call(call: ToolCall) -> dict[str, Any]:
    """An engine :class:`~logo_engine.ToolCall` as an OpenAI-style dict."""
    return openai_tool_call(call.id, call.name, call.arguments)


def tool_arguments(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments as a dict (JSON text parsed; empty or unreadable text: {})."""
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if isinstance(arguments, str) and arguments.strip():
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def selection_json(selection: Selection) -> dict[str, Any]:
    """A selection as plain JSON: every field, whatever fields Selection gains."""
    return selection.model_dump(mode="json")

"""OpenAI requests to engine calls, and engine results to OpenAI responses (pure functions).

Used by the server (FastAPI app and the Ray deployment alike); nothing here imports FastAPI or
torch. Every refusal is a typed :class:`~logo_engine.LoGoError`, which the server turns into an
OpenAI-shaped error with the status of :data:`ERRORS`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from logo_engine.base import SamplingParams
from logo_engine.chat import ToolChoice
from logo_engine.errors import (
    AdapterNotFoundError,
    AuthenticationError,
    ContextLengthError,
    GenerationError,
    InvalidRequestError,
    LoGoError,
    ModelNotFoundError,
    RemoteError,
    RoutingConfigError,
)
from logo_engine.serving.protocol import (
    AssistantMessage,
    ChatMessageIn,
    FunctionCallOut,
    LogoOptions,
    LogoResult,
    PromptTokensDetails,
    ToolCallOut,
    ToolDef,
    UsageOut,
    _Sampling,
)
from logo_engine.types import Generation, RoutingConfig, ToolCall, Usage

DEFAULT_MAX_TOKENS = 256  # new tokens when a request sets no max_tokens (cut to the window)

# LoGo error -> (HTTP status, OpenAI error type, code). Most specific classes first; the client
# maps codes back to these classes.
ERRORS: list[tuple[type[LoGoError], int, str, str]] = [
    (ContextLengthError, 413, "invalid_request_error", "context_length_exceeded"),
    (AdapterNotFoundError, 404, "invalid_request_error", "adapter_not_found"),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (RoutingConfigError, 400, "invalid_request_error", "invalid_routing"),
    (InvalidRequestError, 400, "invalid_request_error", "invalid_request"),
    (AuthenticationError, 401, "authentication_error", "invalid_api_key"),
    (GenerationError, 500, "server_error", "generation_failed"),
    (RemoteError, 503, "service_unavailable", "model_loading"),
]
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}


def error_info(exc: BaseException) -> tuple[int, str, str]:
    """(status, type, code) of an error raised while serving a request."""
    for cls, status, kind, code in ERRORS:
        if isinstance(exc, cls):
            return status, kind, code
    return 500, "server_error", "internal_error"


def error_class(status: int, code: str | None) -> type[LoGoError]:
    """The LoGo error class of an error response (for remote clients)."""
    for cls, _, _, cls_code in ERRORS:
        if code == cls_code:
            return cls
    if status == 401:
        return AuthenticationError
    if 400 <= status < 500:
        return InvalidRequestError
    return RemoteError


# ------------------------------------------------------------------------------ requests
def engine_messages(messages: Sequence[ChatMessageIn]) -> list[dict[str, Any]]:
    """OpenAI chat messages -> the engine's message dicts (text content only)."""
    out = []
    for i, message in enumerate(messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise InvalidRequestError(
                f"messages[{i}] has role {message.role!r}; expected one of {sorted(_ROLES)}"
            )
        item: dict[str, Any] = {"role": role, "content": _text(message.content, i)}
        if message.tool_calls:
            item["tool_calls"] = message.tool_calls
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            item["name"] = message.name
        out.append(item)
    return out


def _text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"messages[{index}] has a {part.get('type')!r} content part; this server's "
                "models read text only"
            )
        parts.append(part["text"])
    return "".join(parts)


def tool_schemas(tools: Sequence[ToolDef] | None) -> list[dict[str, Any]] | None:
    """Tools as the plain OpenAI function schemas the engine's chat template takes."""
    if not tools:
        return None
    return [t.model_dump(exclude_none=True) for t in tools]


def tool_choice(choice: str | Mapping[str, Any] | None) -> ToolChoice:
    """OpenAI ``tool_choice`` -> the engine's (None, "auto", "none", "required", a tool name)."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice  # type: ignore[return-value]
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str) and name:
            return name
    raise InvalidRequestError(
        f"tool_choice must be 'auto', 'none', 'required' or "
        f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r}'
    )


def refuse_unsupported(request: _Sampling) -> None:
    """Refuse OpenAI options this server cannot honour (rather than ignoring them silently)."""
    checks = [
        ("n", request.n != 1, "only n=1 is supported"),
        ("logprobs", bool(request.logprobs), "logprobs are not supported"),
        ("top_logprobs", bool(request.top_logprobs), "logprobs are not supported"),
        ("presence_penalty", bool(request.presence_penalty), "penalties are not supported"),
        ("frequency_penalty", bool(request.frequency_penalty), "penalties are not supported"),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
    ]
    extra = request.model_extra or {}
    response_format = getattr(request, "response_format", None) or {}
    checks += [
        (
            "response_format",
            response_format.get("type", "text") != "text",
            "only response_format type 'text' is supported (use tools for structured output)",
        ),
        ("echo", bool(getattr(request, "echo", False)), "echo is not supported"),
        ("suffix", bool(getattr(request, "suffix", None)), "suffix is not supported"),
        ("best_of", (getattr(request, "best_of", None) or 1) != 1, "best_of is not supported"),
        (
            "stream_options",
            bool(request.stream_options) and not request.stream,
            "stream_options needs stream=true",
        ),
        ("functions", "functions" in extra, "use tools instead of the deprecated functions"),
    ]
    for param, bad, why in checks:
        if bad:
            raise InvalidRequestError(f"{param}: {why}")


def routing_config(base: RoutingConfig, overrides: Mapping[str, Any] | None) -> RoutingConfig:
    """The server's routing with a request's ``logo.routing`` fields replaced."""
    if not overrides:
        return base
    known = {f.name for f in dataclasses.fields(RoutingConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise RoutingConfigError(
            f"logo.routing has unknown fields {unknown}; RoutingConfig fields are {sorted(known)}"
        )
    return dataclasses.replace(base, **overrides)


def target_mixture(
    model: str | None, logo: LogoOptions | None, served: str, adapter_names: Sequence[str]
) -> dict[str, float] | None:
    """The pinned mixture a request asks for (None: route).

    ``model`` is the served name (route, or ``logo.adapters`` pins), or
    ``"<served name>:<adapter>"`` (pins that adapter). ``model=None`` is allowed on LoGo's own
    endpoints.
    """
    pinned = logo.adapters if logo is not None else None
    if model is None or model == served:
        return None if pinned is None else dict(pinned)
    prefix = served + ":"
    if model.startswith(prefix):
        adapter = model[len(prefix) :]
        if adapter not in adapter_names:
            raise AdapterNotFoundError(
                f"model {model!r} pins adapter {adapter!r}, which this server does not hold; "
                f"adapters: {sorted(adapter_names)}"
            )
        if pinned is not None and (set(pinned) != {adapter} or not pinned[adapter] > 0):
            # the same pin twice (a client that routed first, then sends the selection) is fine
            raise InvalidRequestError(
                f"model {model!r} pins adapter {adapter!r} and logo.adapters pins another "
                f"mixture {dict(pinned)}: pass one"
            )
        return {adapter: 1.0}
    raise ModelNotFoundError(
        f"model {model!r} is not served here; use {served!r} (routed by LoGo) or "
        f"'{served}:<adapter>' (see GET /v1/models)"
    )


def sampling_params(
    request: _Sampling,
    max_tokens: int | None,
    prompt_tokens: int,
    context_window: int,
) -> SamplingParams:
    """Validated sampling settings; a missing ``max_tokens`` is cut to what fits the window."""
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, context_window - prompt_tokens))
    needed = prompt_tokens + max_tokens
    if needed > context_window:
        raise ContextLengthError(
            f"this model's context window is {context_window} tokens; the prompt has "
            f"{prompt_tokens} and max_tokens is {max_tokens} ({needed} in all)"
        )
    return SamplingParams.build(
        max_tokens, request.temperature, request.top_p, request.seed, request.stop
    )


# ----------------------------------------------------------------------------- responses
def usage_out(usage: Usage) -> UsageOut:
    """Engine usage -> OpenAI usage (cached prompt tokens when the engine reports them)."""
    cached = getattr(usage, "cached_tokens", None)
    return UsageOut(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)
        if isinstance(cached, int)
        else None,
    )


def tool_calls_out(calls: Sequence[ToolCall]) -> list[ToolCallOut]:
    """Engine tool calls -> OpenAI ``tool_calls`` (arguments as a JSON string)."""
    return [
        ToolCallOut(
            id=c.id,
            function=FunctionCallOut(
                name=c.name, arguments=json.dumps(c.arguments, ensure_ascii=False)
            ),
        )
        for c in calls
    ]


def assistant_message(generation: Generation) -> AssistantMessage:
    """The chat answer: its content (no tool-call markup) and its tool calls."""
    if not generation.tool_calls:
        return AssistantMessage(content=generation.content)
    return AssistantMessage(
        content=generation.content or None, tool_calls=tool_calls_out(generation.tool_calls)
    )


def logo_result(generation: Generation) -> LogoResult:
    """The ``logo`` field of a chat answer: the selection, and what OpenAI's shape cannot hold."""
    markup = generation.text != generation.content
    return LogoResult(
        selection=generation.selection,
        text=generation.text if markup else None,
        content=generation.content if markup else None,
        invalid_tool_calls=list(generation.invalid_tool_calls) or None,
    )


def finish_reason(generation: Generation) -> str:
    """OpenAI's finish reason: ``tool_calls`` when the answer calls tools."""
    return "tool_calls" if generation.tool_calls else generation.finish_reason

"""The wire format of ``logo serve``: OpenAI's chat and completion API plus a ``logo`` field.

Pydantic models of the requests the server accepts and of the responses it sends. The server
validates requests with them; :class:`~logo_engine.client.RemoteEngine` reads responses with them,
so both ends share one definition. Nothing here imports FastAPI or torch.

Extensions to OpenAI's API (every OpenAI client ignores them):

- request field ``"logo": {"adapters": {"sql": 0.7, "math": 0.3}, "routing": {"top_k": 1}}``: a
  pinned mixture (``{}`` = base model) or routing overrides (fields of
  :class:`~logo_engine.RoutingConfig`);
- ``model="<served model>:<adapter>"`` pins one adapter;
- response field ``"logo": {"selection": {...}}`` (the :class:`~logo_engine.Selection` JSON), on
  responses and on the first chunk of every stream.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from logo_engine.types import InvalidToolCall, Selection

logger = logging.getLogger(__name__)

ADAPTERS_HEADER = "x-logo-adapters"  # "sql=0.7000,math=0.3000" (empty: the base model)


class _Request(BaseModel):
    # OpenAI clients send fields this server does not know (user, metadata, store...): kept and
    # ignored. Fields it knows but cannot honour are refused by the server with a 400.
    model_config = ConfigDict(extra="allow")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogoOptions(_Strict):
    """The request's ``logo`` field: pin a mixture, or override routing."""

    adapters: dict[str, float] | None = Field(
        default=None, description="Pinned mixture {adapter: weight}; {} = the base model."
    )
    routing: dict[str, Any] | None = Field(
        default=None, description="RoutingConfig fields overriding the server's routing."
    )


class StreamOptions(_Request):
    """OpenAI's ``stream_options``."""

    include_usage: bool = False


class FunctionDef(_Request):
    """A tool's function schema."""

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Request):
    """A tool offered to the model (OpenAI function tool)."""

    type: Literal["function"] = "function"
    function: FunctionDef


class ChatMessageIn(_Request):
    """One message of a chat request (content: a string or a list of text parts)."""

    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Sampling(_Request):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logo: LogoOptions | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (a string prompt is answered as ``engine.generate(prompt)``)."""

    prompt: Union[str, list[str]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class RouteRequest(_Request):
    """``POST /v1/logo/route``: probe only. Exactly one of messages, prompt, prompts."""

    model: str | None = None
    messages: list[ChatMessageIn] | None = None
    prompt: str | None = None
    prompts: list[Union[str, list[ChatMessageIn]]] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    logo: LogoOptions | None = None


class CountTokensRequest(_Request):
    """``POST /v1/logo/count_tokens``: prompt tokens the model would see."""

    model: str | None = None
    messages: list[ChatMessageIn] | None = None
    prompt: str | None = None
    tools: list[ToolDef] | None = None


# ----------------------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    """OpenAI's ``usage.prompt_tokens_details``."""

    cached_tokens: int = 0


class UsageOut(BaseModel):
    """OpenAI's ``usage``."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class LogoResult(BaseModel):
    """The response's ``logo`` field: which adapters answered (the whole Selection).

    A completion with several prompts also lists every choice's selection, by choice index. When
    tools were offered and the answer held tool-call markup, ``text`` is the raw answer and
    ``content`` the answer without the markup (the message content; a stream's deltas may differ
    from it in whitespace), and ``invalid_tool_calls`` lists the calls the model wrote that do not
    parse (OpenAI's API has no place for them). In a stream they come on the finish-reason chunk.
    """

    selection: Selection
    selections: list[Selection] | None = None
    text: str | None = None
    content: str | None = None
    invalid_tool_calls: list[InvalidToolCall] | None = None


class FunctionCallOut(BaseModel):
    """A called function: its name and its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCallOut(BaseModel):
    """A tool call in OpenAI form."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ToolCallDelta(BaseModel):
    """A tool call in a stream chunk (sent whole, in one chunk)."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    """The answer of a chat completion."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


FinishReasonOut = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    """One answer of a chat completion."""

    index: int
    message: AssistantMessage
    finish_reason: FinishReasonOut
    logprobs: None = None


class ChatCompletion(BaseModel):
    """Response of ``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut
    system_fingerprint: str | None = None
    logo: LogoResult


class ChunkDelta(BaseModel):
    """What a stream chunk adds to the answer."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    """One choice of a stream chunk."""

    index: int
    delta: ChunkDelta
    finish_reason: FinishReasonOut | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a chat stream; ``logo`` only on the first."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageOut | None = None
    system_fingerprint: str | None = None
    logo: LogoResult | None = None


class CompletionChoice(BaseModel):
    """One answer of a text completion."""

    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class Completion(BaseModel):
    """Response of ``POST /v1/completions`` (and each of its stream events)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut | None = None
    system_fingerprint: str | None = None
    logo: LogoResult | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "logo"
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    """Response of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ServerInfo(BaseModel):
    """``GET /v1/logo/info``: what a remote client needs to know about the served engine."""

    model: str
    adapters: list[str]
    context_window: int
    routing: dict[str, Any]
    max_batch_size: int
    chat_template: bool = True  # False: the model reads plain text only (no messages, no tools)


class ErrorBody(BaseModel):
    """The ``error`` object of an error response."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorBody


# ------------------------------------------------------------------------------ helpers
def new_id(prefix: str) -> str:
    """A response id such as ``chatcmpl-1f2e...``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """``created`` timestamp (seconds)."""
    return int(time.time())


def adapters_header(selection: Selection) -> str:
    """The ``x-logo-adapters`` value: ``name=weight`` pairs by weight (empty: base model)."""
    return ",".join(
        f"{n}={w:.4f}" for n, w in zip(selection.adapters, selection.weights, strict=True)
    )


def read_selection(data: Any) -> Selection:
    """A Selection from a server's JSON; fields this client does not know are dropped."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a selection object, got {data!r}")
    unknown = set(data) - set(Selection.model_fields)
    if unknown:
        logger.debug("ignoring selection fields unknown to this client: %s", sorted(unknown))
    return Selection.model_validate({k: v for k, v in data.items() if k in Selection.model_fields})

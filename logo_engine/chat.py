"""Prompts in, text out: message validation, chat templates, tool prompts and tool-call parsing.

One code path for every caller (engine, LangChain, LlamaIndex). A prompt is a string or a list of
``{"role": ..., "content": ...}`` messages (roles: system, user, assistant, tool). Tools use the
OpenAI function schema. A chat template that knows tools gets them natively; for one that does not
(SmolLM2's), the tools are described in a system message and the model is asked to answer with
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the Hermes/Qwen format, which
:func:`parse_answer` reads back for both kinds (or the tokenizer's own response template, when it
has one: :func:`parse_with_response_template`).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

from logo_engine.errors import InvalidRequestError
from logo_engine.types import InvalidToolCall, ToolCall

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # only a type here: remote clients import this module without transformers
    from transformers import PreTrainedTokenizerBase

Message = Mapping[str, Any]
Prompt = Union[str, Sequence[Message]]
ToolChoice = Union[Literal["auto", "none", "required"], str, None]

ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_OPEN = "<tool_call>"  # how a tool call starts in the model's text
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_NAME_RE = re.compile(r'"name"\s*:\s*"([^"]+)"')

TOOL_SYSTEM_PROMPT = (
    "You can call these tools:\n{tools}\n\n"
    "To call a tool, answer only with\n"
    '<tool_call>\n{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>\n'
    "and nothing else. Otherwise answer normally."
)


def normalize_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """Validate a prompt and return it as a list of plain message dicts.

    A string becomes one user message. Raises :class:`InvalidRequestError` for an empty prompt
    (a message list whose contents are all empty, with no tool calls, counts as empty), a message
    that is not a mapping, an unknown role, non-string content, or text that is not valid unicode
    (a lone surrogate cannot be encoded for the tokenizer).
    """
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        check_unicode(prompt, "prompt")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise InvalidRequestError(
            f"prompt must be a string or a list of messages, got {type(prompt).__name__}"
        )
    if not prompt:
        raise InvalidRequestError("prompt is an empty list of messages")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(
                f"message {i} must be a mapping, got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"message {i} has role {role!r}; expected one of {ROLES}")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidRequestError(
                f"message {i} content must be a string, got {type(content).__name__}"
            )
        check_unicode(content, f"message {i} content")
        messages.append({**message, "content": content})
    if not any(m["content"] or m.get("tool_calls") for m in messages):
        raise InvalidRequestError("prompt is empty: every message has empty content")
    return messages


def check_unicode(text: str, what: str) -> None:
    """Refuse text that UTF-8 cannot encode (a lone surrogate such as U+D800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{what} is not valid unicode: {exc.reason} at position {exc.start} "
            f"({text[exc.start : exc.end]!r})"
        ) from None


def check_tools(tools: Sequence[Mapping[str, Any]]) -> None:
    """Refuse tool schemas that have no name or are not plain JSON (finite numbers, unicode)."""
    for tool in tools:
        name = _tool_name(tool)
        try:
            check_unicode(json.dumps(tool, ensure_ascii=False, allow_nan=False), f"tool {name!r}")
        except (TypeError, ValueError, RecursionError) as exc:
            if isinstance(exc, InvalidRequestError):
                raise
            raise InvalidRequestError(
                f"tool {name!r} is not a JSON-serialisable schema: {exc}"
            ) from None


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def template_supports_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template reads a ``tools`` variable (else tools go in a system message)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates
        template = " ".join(template.values())
    return "tools" in template


@dataclass(frozen=True)
class RenderedPrompt:
    """The text the model sees, and the start of its answer that the engine wrote for it."""

    text: str  # ends with `response_prefix`
    response_prefix: str = ""  # forced opening of a tool call; part of the answer's text


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: ToolChoice = None,
) -> RenderedPrompt:
    """Render a prompt to the exact text the model sees.

    A string is wrapped as one user message when the tokenizer has a chat template and used as it
    is otherwise; message lists need a template. With ``tool_choice="required"`` or a tool name on a
    template without native tools, the assistant turn is started with the opening of a tool call,
    so even a small model answers in the parseable format.
    """
    messages = normalize_messages(prompt)
    if not has_chat_template(tokenizer):
        if not isinstance(prompt, str):
            raise InvalidRequestError(
                "this tokenizer has no chat template: pass a plain string prompt, not messages"
            )
        if tools:
            raise InvalidRequestError("tools need a tokenizer with a chat template")
        return RenderedPrompt(prompt)
    tools = list(tools or []) if tool_choice != "none" else []
    check_tools(tools)
    try:
        rendered = _render_with_template(tokenizer, messages, tools, tool_choice)
    except InvalidRequestError:
        raise
    except Exception as exc:  # values the template cannot render, or its own raise_exception
        template_error = type(exc).__module__.startswith("jinja2")
        if not (template_error or isinstance(exc, (TypeError, ValueError, RecursionError))):
            raise
        raise InvalidRequestError(f"the chat template cannot render this prompt: {exc}") from exc
    check_unicode(rendered.text, "the rendered prompt")
    return rendered


def _render_with_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[Mapping[str, Any]],
    tool_choice: ToolChoice,
) -> RenderedPrompt:
    if tools and not template_supports_tools(tokenizer):
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = TOOL_SYSTEM_PROMPT.format(tools=listing)
        if messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + system}
        else:
            messages.insert(0, {"role": "system", "content": system})
        messages = [_tool_turn_as_text(m) for m in messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prefix = tool_call_prefix(tools, tool_choice)
        return RenderedPrompt(str(text) + prefix, prefix)
    text = tokenizer.apply_chat_template(
        messages,
        tools=[dict(t) for t in tools] or None,
        add_generation_prompt=True,
        tokenize=False,
    )
    return RenderedPrompt(str(text))


def tool_call_prefix(tools: Sequence[Mapping[str, Any]], tool_choice: ToolChoice) -> str:
    """The start of the assistant turn that forces a tool call ("" when none is forced).

    ``"required"`` (or ``"any"``) with exactly one tool forces that tool, name included: a small
    model left to write the name itself may invent one (structured output binds one schema tool
    this way).
    """
    if not tools or tool_choice in (None, "auto", "none"):
        return ""
    names = [_tool_name(t) for t in tools]
    if tool_choice in ("required", "any"):
        if len(names) != 1:
            return '<tool_call>\n{"name": "'
        tool_choice = names[0]
    if tool_choice not in names:
        raise InvalidRequestError(f"tool_choice {tool_choice!r} is not one of the tools {names}")
    tool = tools[names.index(tool_choice)]
    opening = "{" + "".join(f"{json.dumps(p)}: " for p in _first_required(tool))
    return '<tool_call>\n{"name": ' + json.dumps(tool_choice) + ', "arguments": ' + opening


def _first_required(tool: Mapping[str, Any]) -> list[str]:
    """The first required parameter of a tool schema, as a list of at most one name."""
    parameters = tool.get("function", tool).get("parameters") or {}
    required = parameters.get("required") or [] if isinstance(parameters, Mapping) else []
    properties = parameters.get("properties") or {} if isinstance(parameters, Mapping) else {}
    first = next((p for p in properties if p in required), None)
    return [first] if isinstance(first, str) else []


@dataclass(frozen=True)
class ParsedAnswer:
    """A model's answer split into what callers show: content, tool calls, broken tool calls."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def parse_answer(text: str) -> ParsedAnswer:
    """Split an answer given with tools offered into content, tool calls and broken tool calls.

    The Hermes/Qwen format: every ``<tool_call>{json}</tool_call>`` block (a missing close tag at
    the end is tolerated) becomes a :class:`ToolCall` when its JSON holds a ``name`` and object
    ``arguments``, else an :class:`InvalidToolCall` holding the block's raw text and the reason.
    Tool-call markup never stays in the content: with any block found, the content is the text
    around the blocks, stripped. An answer that is one bare JSON object with ``name`` and
    ``arguments`` is one call. Otherwise the content is the text unchanged.
    """
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    kept: list[str] = []
    last = 0
    for match in _TOOL_CALL_RE.finditer(text):
        kept.append(text[last : match.start()])
        last = match.end()
        call = _to_call(match.group(1))
        if isinstance(call, ToolCall):
            calls.append(call)
        else:
            name = _guess_name(match.group(1))
            invalid.append(InvalidToolCall(name=name, arguments=match.group(0), error=call))
    if calls or invalid:
        kept.append(text[last:])
        return ParsedAnswer("".join(kept).strip(), calls, invalid)
    bare = _to_call(text.strip())
    if isinstance(bare, ToolCall):
        return ParsedAnswer("", [bare])
    return ParsedAnswer(text)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """``(content, tool calls)`` of :func:`parse_answer` (broken calls dropped from both)."""
    parsed = parse_answer(text)
    return parsed.content, parsed.tool_calls


def parse_with_response_template(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    prefix: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> ParsedAnswer:
    """Parse an answer with the tokenizer's own response template (``tokenizer.parse_response``).

    ``prefix`` is the prompt the answer continues. A tool call the template yields without a name
    or with non-object arguments is an :class:`InvalidToolCall`. When the template cannot parse
    the answer at all, the Hermes parser (:func:`parse_answer`) reads it instead.
    """
    try:
        offered: list[Any] | None = [dict(t) for t in tools or []] or None
        message = tokenizer.parse_response(text, prefix=prefix, tools=offered)
    except Exception as exc:  # a template that does not fit this answer: read it as Hermes
        logger.debug("the tokenizer's response template could not parse an answer: %s", exc)
        return parse_answer(text)
    content = message.get("content")
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for raw in message.get("tool_calls") or []:
        function = raw.get("function", raw) if isinstance(raw, Mapping) else {}
        call = _to_call(
            json.dumps(
                {"name": function.get("name"), "arguments": function.get("arguments", {})},
                default=str,
            )
        )
        if isinstance(call, ToolCall):
            call_id = raw.get("id") if isinstance(raw, Mapping) else None
            calls.append(call.model_copy(update={"id": call_id}) if call_id else call)
        else:
            name = function.get("name")
            invalid.append(
                InvalidToolCall(
                    name=name if isinstance(name, str) else None,
                    arguments=json.dumps(raw, default=str),
                    error=call,
                )
            )
    return ParsedAnswer(content if isinstance(content, str) else "", calls, invalid)


def _to_call(raw: str) -> ToolCall | str:
    """A tool call from its JSON text, or the reason it is not one."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, ValueError) as exc:
        return f"the tool call is not valid JSON ({exc})"
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return "the tool call has no tool name"
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            return f"the tool call's arguments are not valid JSON ({exc})"
    if not isinstance(arguments, dict):
        return "the tool call's arguments are not a JSON object"
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=data["name"], arguments=arguments)


def _guess_name(raw: str) -> str | None:
    """The tool name a broken call meant, when its text still shows one."""
    match = _NAME_RE.search(raw)
    return match.group(1) if match else None


def _tool_name(tool: Mapping[str, Any]) -> str:
    function = tool.get("function", tool) if isinstance(tool, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(
            f"a tool must be an OpenAI function schema with a name, got {tool!r}"
        )
    return name


def _tool_turn_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """Write an assistant's tool calls into its content, for templates without native tools."""
    calls = message.get("tool_calls") or []
    if message["role"] != "assistant" or not calls:
        return {"role": message["role"], "content": message["content"]}
    blocks = []
    for call in calls:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        payload = {"name": function.get("name"), "arguments": arguments}
        blocks.append(f"<tool_call>\n{json.dumps(payload, ensure_ascii=False)}\n</tool_call>")
    content = "\n".join(part for part in [message["content"], *blocks] if part)
    return {"role": "assistant", "content": content}


def visible_text(text: str) -> str:
    """The part of a streamed answer that may be shown while tools are offered.

    Tool-call markup must not reach a caller as content chunks, so this holds back everything
    from ``<tool_call>`` on, a tail that could still become ``<tool_call>``, and a whole answer
    that starts like a bare JSON call (``{``). The result only grows as ``text`` grows.
    """
    stripped = text.lstrip()
    if not stripped or stripped.startswith("{"):
        return ""
    i = text.find(TOOL_CALL_OPEN)
    if i != -1:
        return text[:i]
    for j in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-j:]):
            return text[:-j]
    return text


class StreamFilter:
    """Deltas of one stream: all text when no tools are offered, else :func:`visible_text`."""

    def __init__(self, hold_tool_calls: bool) -> None:
        self.hold_tool_calls = hold_tool_calls
        self.text = ""  # everything generated so far
        self.shown = ""  # what has been handed out as deltas

    def push(self, piece: str) -> str:
        """Take a new engine chunk; return the delta that may be shown now ("" if none)."""
        self.text += piece
        visible = visible_text(self.text) if self.hold_tool_calls else self.text
        delta = visible[len(self.shown) :]
        self.shown = visible
        return delta

    def final_delta(self, content: str) -> str:
        """The rest of the final content that was not shown yet."""
        return content[len(self.shown) :] if content.startswith(self.shown) else ""

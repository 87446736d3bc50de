"""A scripted engine for tests of code built on LoGo (integrations, agents, pipelines).

:class:`ScriptedEngine` has the whole public surface of :class:`~logo_engine.LoGoEngine` (it
shares :class:`~logo_engine.base.BaseEngine` with it: same validation, stop strings, streams,
async, pinned mixtures, tool-call parsing) but no model: answers come from a script and routing
scores from keyword counts. "Tokens" are whitespace-separated words.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from logo_engine.base import BaseEngine, Request, RowState, SamplingParams, Tools
from logo_engine.chat import Prompt, ToolChoice, normalize_messages, tool_call_prefix
from logo_engine.routing import select
from logo_engine.types import RoutingConfig, Selection

# script(messages, tools) -> answer text; a tool call is written as
# '<tool_call>{"name": ..., "arguments": {...}}</tool_call>' (see `tool_call_text`).
Script = Callable[[list[dict[str, Any]], Sequence[Mapping[str, Any]]], str]


def tool_call_text(name: str, arguments: Mapping[str, Any]) -> str:
    """The answer text with which a scripted model calls a tool."""
    payload = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


class ScriptedEngine(BaseEngine):
    """An engine whose answers are scripted; for fast, deterministic tests.

    Args:
        script: answers used in turn (cycling), or a callable ``(messages, tools) -> str``.
            Default: echo the last user message.
        adapter_names: the pretend library.
        routing: routing defaults (``top_k``, weighting...; the signal is keyword counting).
        model_name: reported base model name.
        context_window: pretend context window, in words.
        words_per_chunk: words per decoding step (1: one chunk per word).

    """

    def __init__(
        self,
        script: Sequence[str] | Script | None = None,
        *,
        adapter_names: Sequence[str] = ("math", "sql", "code"),
        routing: RoutingConfig | None = None,
        model_name: str = "scripted-model",
        context_window: int = 4096,
        words_per_chunk: int = 1,
    ) -> None:
        self._names = list(adapter_names)
        self.routing = routing or RoutingConfig(top_k=min(3, len(self._names)))
        self._model_name = model_name
        self._context_window = context_window
        self._words_per_chunk = words_per_chunk
        if script is None or callable(script):
            self._script: Script = script or _echo
        else:
            answers = list(script)
            counter = iter(range(1 << 62))
            self._script = lambda messages, tools: answers[next(counter) % len(answers)]
        self.calls: list[dict[str, Any]] = []  # every decoded request: messages, tools, selection

    @property
    def adapter_names(self) -> list[str]:
        return list(self._names)

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def context_window(self) -> int:
        return self._context_window

    def _prepare(self, prompt: Prompt, tools: Tools | None, tool_choice: ToolChoice) -> Request:
        messages = normalize_messages(prompt)
        tools = list(tools or []) if tool_choice != "none" else []
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return Request(
            text=text,
            n_prompt_tokens=len(text.split()),
            response_prefix=tool_call_prefix(tools, tool_choice) if tools else "",
            has_tools=bool(tools),
            input_ids=(messages, tools),
            tools=[dict(t) for t in tools] or None,
        )

    def _route(self, requests: list[Request], routing: RoutingConfig) -> list[Selection]:
        # Score = 1 + how often the adapter's name occurs in the prompt (case-insensitive).
        scores = torch.tensor(
            [
                [1.0 + len(re.findall(re.escape(n), r.text, re.IGNORECASE)) for n in self._names]
                for r in requests
            ]
        )  # (B, N)
        return select(
            scores, self._names, routing, probe_layer=-1, probe_module="scripted", probe_ms=0.0
        )

    def _decode(
        self,
        requests: list[Request],
        selections: list[Selection],
        params: SamplingParams,
        rows: list[RowState],
    ) -> Iterator[None]:
        pending: list[list[str]] = []
        for request, selection in zip(requests, selections, strict=True):
            messages, tools = request.input_ids
            answer = self._script(messages, tools)
            if params.temperature > 0:  # sampling: shuffle words with the call's own seed
                words = answer.split(" ")
                random.Random(params.seed).shuffle(words)
                answer = " ".join(words)
            answer = answer.removeprefix(request.response_prefix)
            self.calls.append({"messages": messages, "tools": tools, "selection": selection})
            pending.append(re.findall(r"\S+\s*|\s+", answer))
        for _ in range(params.max_new_tokens):
            for row, words in zip(rows, pending, strict=True):
                if not row.done and words:
                    piece = "".join(words[: self._words_per_chunk])
                    del words[: self._words_per_chunk]
                    row.push(piece, n_tokens=1)
                    if row.at_limit:
                        row.finish("length")
            yield
            if all(row.done or not words for row, words in zip(rows, pending, strict=True)):
                break
        for row, words in zip(rows, pending, strict=True):
            if not words:
                row.finish("stop")


def _echo(messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""

"""ChatLoGo on a scripted engine: conversion tables, selection reporting, callbacks, tracing.

The LangSmith tests inject a mocked ``langsmith.Client`` (no network; sockets are disabled).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from typing import Any
from unittest.mock import MagicMock
from uuid import UUID

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import LLMResult
from langchain_core.tools import tool
from langchain_core.tracers.context import collect_runs, tracing_v2_enabled
from langsmith import Client
from loop_witness import LoopWitness
from pydantic import BaseModel, Field
from remote import both_modes

from logo_engine import RoutingConfig
from logo_engine.errors import AdapterNotFoundError, InvalidRequestError, RoutingConfigError
from logo_engine.testing import ScriptedEngine, tool_call_text
from logo_engine.types import Generation, InvalidToolCall, Selection, ToolCall, Usage
from logo_integrations.langchain import (
    INVALID_KEY,
    SELECTION_KEY,
    ChatLoGo,
    ai_message,
    content_text,
    final_chunk,
    normalize_tool_choice,
    selection_run_metadata,
    to_engine_message,
    to_engine_messages,
    to_openai_tool_calls,
)

PROMPTS = ["math: what is 2 + 2 math", "sql: count the rows sql sql", "code: write code code"]


class CountingEngine(ScriptedEngine):
    """A scripted engine that counts its decode calls and the rows of each."""

    def __init__(self, *args: Any, delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decodes: list[int] = []
        self.probes: list[int] = []
        self.delay = delay

    def _route(self, requests, routing):
        self.probes.append(len(requests))
        return super()._route(requests, routing)

    def _decode(self, requests, selections, params, rows):
        self.decodes.append(len(requests))
        for step in super()._decode(requests, selections, params, rows):
            if self.delay:
                time.sleep(self.delay)
            yield step


@pytest.fixture()
def engine() -> CountingEngine:
    return CountingEngine()


@pytest.fixture()
def make_llm(mode, serve):
    """``make_llm(engine, **fields)``: a ChatLoGo over the engine, or over it served (remote)."""

    def make(engine: ScriptedEngine, **fields: Any) -> ChatLoGo:
        if mode == "remote":
            return ChatLoGo(base_url=serve(engine), **fields)
        return ChatLoGo(engine=engine, **fields)

    return make


@pytest.fixture()
def llm(engine, make_llm) -> ChatLoGo:
    return make_llm(engine)


def weather_script(messages: list[dict[str, Any]], tools: Any) -> str:
    if tools and messages[-1]["role"] != "tool":
        return "Let me check. " + tool_call_text("get_weather", {"city": "Zürich"})
    return "It is sunny."


@tool
def get_weather(city: str) -> str:
    """Weather in a city."""
    return f"Sunny in {city}"


@tool
def get_time(city: str) -> str:
    """Local time in a city."""
    return f"Noon in {city}"


# ------------------------------------------------------------------- conversion tables
MESSAGE_TABLE = [
    (SystemMessage("be brief"), {"role": "system", "content": "be brief"}),
    (HumanMessage("hi", name="ann"), {"role": "user", "content": "hi"}),
    (HumanMessage([{"type": "text", "text": "a"}, "b"]), {"role": "user", "content": "ab"}),
    (AIMessage("hello"), {"role": "assistant", "content": "hello"}),
    (
        AIMessage("", tool_calls=[{"name": "f", "args": {"x": "é"}, "id": "c1"}]),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"x": "é"}'},
                }
            ],
        },
    ),
    (
        AIMessage(
            [
                {"type": "text", "text": "some text"},
                {"type": "tool_use", "id": "c1", "name": "f", "input": {}},
            ],
            tool_calls=[{"name": "f", "args": {}, "id": "c1"}],
        ),
        {
            "role": "assistant",
            "content": "some text",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
    ),
    (
        ToolMessage('{"result": 3}', tool_call_id="c1", name="f"),
        {"role": "tool", "content": '{"result": 3}', "tool_call_id": "c1", "name": "f"},
    ),
    (
        ToolMessage("err", tool_call_id="c2", status="error"),
        {"role": "tool", "content": "err", "tool_call_id": "c2"},
    ),
    (FunctionMessage("3", name="f"), {"role": "tool", "content": "3", "name": "f"}),
    (ChatMessage(role="developer", content="d"), {"role": "system", "content": "d"}),
    (ChatMessage(role="human", content="h"), {"role": "user", "content": "h"}),
    (ChatMessage(role="ai", content="a"), {"role": "assistant", "content": "a"}),
]


@pytest.mark.parametrize(("message", "expected"), MESSAGE_TABLE)
def test_to_engine_message(message, expected):
    assert to_engine_message(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        ChatMessage(role="narrator", content="x"),
        HumanMessage([{"type": "image", "url": "http://x/y.png"}]),
        HumanMessage([{"type": "image_url", "image_url": {"url": "data:..."}}]),
    ],
)
def test_to_engine_message_refuses(message):
    with pytest.raises(InvalidRequestError):
        to_engine_message(message, 3)


def test_content_text_table():
    assert content_text("x", role="user") == "x"
    assert (
        content_text([{"type": "text", "text": "a"}, {"type": "reasoning"}], role="assistant")
        == "a"
    )
    assert content_text([{"type": "json", "json": {"ok": "é"}}], role="tool") == (
        '{"type": "json", "json": {"ok": "é"}}'
    )


def test_tool_calls_to_openai():
    calls = [
        {"name": "f", "args": {"a": 1}, "id": "x", "type": "tool_call"},
        {"name": "g", "args": {}, "id": None, "type": "tool_call"},
    ]
    assert to_openai_tool_calls(calls) == [
        {"id": "x", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        (False, None),
        ("auto", "auto"),
        ("none", "none"),
        ("any", "required"),
        ("required", "required"),
        (True, "required"),
        ("f", "f"),
        ({"type": "function", "function": {"name": "g"}}, "g"),
        ({"name": "g"}, "g"),
    ],
)
def test_normalize_tool_choice(choice, expected):
    assert normalize_tool_choice(choice, ["f", "g"]) == expected


@pytest.mark.parametrize("choice", ["h", {"type": "function", "function": {"name": "h"}}, 3])
def test_normalize_tool_choice_refuses(choice):
    with pytest.raises(InvalidRequestError, match="tool_choice"):
        normalize_tool_choice(choice, ["f", "g"])


def _gen(
    text: str,
    content: str | None = None,
    calls: list[ToolCall] | None = None,
    bad: list[InvalidToolCall] | None = None,
) -> Generation:
    return Generation(
        text=text,
        content=text if content is None else content,
        selection=Selection(adapters=["sql"], weights=[1.0]),
        usage=Usage(prompt_tokens=3, completion_tokens=2),
        finish_reason="stop",
        tool_calls=calls or [],
        invalid_tool_calls=bad or [],
    )


CALL = ToolCall(id="c", name="f", arguments={"a": "é"})
BAD = InvalidToolCall(name="g", arguments='<tool_call>{"name": "g", "argu', error="not JSON")


@pytest.mark.parametrize(
    ("generation", "content", "calls", "bad"),
    [
        (_gen("plain"), "plain", [], []),
        (
            _gen("Ok <tool_call>...</tool_call>", "Ok", [CALL]),
            "Ok",
            [{"name": "f", "args": {"a": "é"}, "id": "c", "type": "tool_call"}],
            [],
        ),
        (
            _gen("Ok " + BAD.arguments, "Ok", [], [BAD]),
            "Ok",
            [],
            [
                {
                    "name": "g",
                    "args": BAD.arguments,
                    "id": None,
                    "error": "not JSON",
                    "type": "invalid_tool_call",
                }
            ],
        ),
    ],
)
def test_ai_message_translates_the_engine_answer(generation, content, calls, bad):
    selection = Selection(adapters=["math"], weights=[1.0])
    message = ai_message(generation, selection, "m")
    assert (message.content, message.tool_calls, message.invalid_tool_calls) == (
        content,
        calls,
        bad,
    )
    assert message.usage_metadata == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
    meta = message.response_metadata
    assert meta[SELECTION_KEY] == selection.model_dump(mode="json")  # the selection given
    assert (meta["model_name"], meta["model_provider"], meta["finish_reason"]) == (
        "m",
        "logo",
        "stop",
    )
    assert meta.get(INVALID_KEY, []) == [b.model_dump() for b in generation.invalid_tool_calls]
    # The last stream chunk, added to what was streamed before it, gives the same message.
    shown = content[:2]
    full = AIMessageChunk(content=shown) + final_chunk(generation, selection, "m", shown)
    assert full.content == content
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [
        (c["name"], c["args"]) for c in calls
    ]
    assert [c["name"] for c in full.invalid_tool_calls] == [c["name"] for c in bad]
    assert full.response_metadata == meta


def test_a_broken_call_that_looks_like_json_stays_invalid_when_chunks_add_up():
    # A response template may give a nameless call as JSON; LangChain would read it back as a
    # valid call with an empty name when chunks are added.
    nameless = InvalidToolCall(arguments='{"x": 1}', error="the tool call has no tool name")
    chunk = final_chunk(_gen("t", "", [], [nameless]), Selection(), "m", "")
    full = AIMessageChunk(content="") + chunk
    assert full.tool_calls == [] and len(full.invalid_tool_calls) == 1
    assert full.response_metadata[INVALID_KEY][0]["error"] == "the tool call has no tool name"


def test_selection_run_metadata():
    sel = Selection(adapters=["sql", "math"], weights=[0.75, 0.25], scores={"sql": 3.0})
    meta = selection_run_metadata(sel)
    assert meta["logo_adapter"] == "sql"
    assert meta["logo_adapters"] == ["sql", "math"]
    assert meta[SELECTION_KEY] == sel.model_dump(mode="json")
    assert selection_run_metadata(Selection())["logo_adapter"] is None
    json.dumps(meta)


# ------------------------------------------------------------------ selection reporting
@both_modes
def test_invoke_reports_the_selection_and_usage(llm, engine):
    message = llm.invoke(PROMPTS[1])
    meta = message.response_metadata
    expected = engine.route(PROMPTS[1])
    assert meta[SELECTION_KEY] == expected.model_dump(mode="json")
    assert meta["model_name"] == "scripted-model"
    assert meta["model_provider"] == "logo"
    assert meta["finish_reason"] == "stop"
    assert meta[SELECTION_KEY]["adapters"][0] == "sql"
    direct = engine.generate(PROMPTS[1])
    assert message.content == direct.text
    assert message.usage_metadata == {
        "input_tokens": direct.usage.prompt_tokens,
        "output_tokens": direct.usage.completion_tokens,
        "total_tokens": direct.usage.total_tokens,
    }
    json.dumps(meta)


@both_modes
def test_stream_carries_the_selection_on_the_last_chunk_only(llm):
    chunks = list(llm.stream(PROMPTS[0]))
    assert len(chunks) > 2
    with_selection = [i for i, c in enumerate(chunks) if SELECTION_KEY in c.response_metadata]
    assert with_selection == [len(chunks) - 1]
    assert chunks[-1].chunk_position == "last"
    assert [i for i, c in enumerate(chunks) if c.usage_metadata] == [len(chunks) - 1]
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    invoked = llm.invoke(PROMPTS[0])
    assert full.content == invoked.content
    assert full.response_metadata[SELECTION_KEY] == invoked.response_metadata[SELECTION_KEY]
    assert full.response_metadata["model_name"] == "scripted-model"  # not concatenated
    assert full.usage_metadata == invoked.usage_metadata


@both_modes
async def test_async_forms_match_sync(llm):
    invoked = llm.invoke(PROMPTS[2])
    ainvoked = await llm.ainvoke(PROMPTS[2])
    assert ainvoked.content == invoked.content
    assert ainvoked.response_metadata[SELECTION_KEY] == invoked.response_metadata[SELECTION_KEY]
    chunks = [c async for c in llm.astream(PROMPTS[2])]
    assert "".join(c.content for c in chunks) == invoked.content
    assert chunks[-1].response_metadata[SELECTION_KEY] == invoked.response_metadata[SELECTION_KEY]
    assert sum(SELECTION_KEY in c.response_metadata for c in chunks) == 1


@both_modes
def test_pinned_mixture_per_call_and_bound(llm, engine, make_llm):
    pinned = llm.invoke(PROMPTS[0], adapters={"sql": 3, "code": 1})
    sel = pinned.response_metadata[SELECTION_KEY]
    assert sel["pinned"] and sel["adapters"] == ["sql", "code"] and sel["weights"] == [0.75, 0.25]
    assert engine.calls[-1]["selection"].mixture == {"sql": 0.75, "code": 0.25}
    bound = llm.bind(adapters={"math": 1.0})
    for message in (bound.invoke(PROMPTS[1]), list(bound.stream(PROMPTS[1]))[-1]):
        assert message.response_metadata[SELECTION_KEY]["adapters"] == ["math"]
    base = llm.invoke(PROMPTS[0], adapters={})
    assert base.response_metadata[SELECTION_KEY]["adapters"] == []
    field = make_llm(engine, mixture={"code": 1.0}).invoke(PROMPTS[0])
    assert field.response_metadata[SELECTION_KEY]["adapters"] == ["code"]


@both_modes
def test_routing_fields_and_per_call_overrides(engine, make_llm):
    llm = make_llm(engine, top_k=1)
    assert llm.invoke(PROMPTS[1]).response_metadata[SELECTION_KEY]["adapters"] == ["sql"]
    two = llm.invoke(PROMPTS[1], top_k=2).response_metadata[SELECTION_KEY]
    assert two["top_k"] == 2 and len(two["adapters"]) == 2
    assert llm.invoke(PROMPTS[1], signal="entropy").response_metadata[SELECTION_KEY]["signal"] == (
        "entropy"
    )
    with pytest.raises(RoutingConfigError):
        llm.invoke(PROMPTS[1], top_k=9)


def test_the_signal_setting_offers_exactly_the_engines_signals():
    """The integrations' ``signal`` field lists the engine's SIGNALS (a Literal, for schemas)."""
    from typing import get_args

    from logo_engine.types import SIGNALS
    from logo_integrations._common import LoGoSettings

    literal = get_args(LoGoSettings.model_fields["signal"].annotation)[0]
    assert get_args(literal) == SIGNALS


@both_modes
def test_an_abstained_selection_is_reported_like_any_other(engine, make_llm):
    """No adapter stands out (all keyword scores 1.0 < 1.5): the base model answers, and says so."""
    llm = make_llm(engine, routing={"top_k": 1, "abstain_below": 1.5})
    handler = Recorder()
    message = llm.invoke("hello there", config={"callbacks": [handler]})
    selection = message.response_metadata[SELECTION_KEY]
    assert selection["abstained"] and selection["adapters"] == [] and selection["weights"] == []
    assert "base model" in selection["reason"]
    assert message.content == engine.generate("hello there", adapters={}).text
    meta = handler.starts[0]["metadata"]
    assert meta["logo_abstained"] is True and meta["logo_adapter"] is None
    assert not [t for t in handler.starts[0]["tags"] if t.startswith("logo:")]
    assert _end_selection(handler.ends[0]) == selection
    routed = llm.invoke(PROMPTS[1]).response_metadata[SELECTION_KEY]  # "sql" scores 4.0
    assert routed["adapters"] == ["sql"] and not routed["abstained"]


@both_modes
def test_sampling_fields_reach_the_engine(engine, make_llm):
    llm = make_llm(engine, max_tokens=2, stop=["four"])
    assert llm.invoke("one two three four five").content == "one two "
    assert llm.invoke("one two three four five", max_tokens=10).content == "one two three "
    assert llm.invoke("one two three", stop=["two"]).content == "one "


@both_modes
def test_errors_surface_inside_the_run(llm):
    class Errors(BaseCallbackHandler):
        def __init__(self) -> None:
            self.errors: list[BaseException] = []

        def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
            self.errors.append(error)

    handler = Errors()
    with pytest.raises(AdapterNotFoundError, match="nope"):
        llm.invoke("hi", adapters={"nope": 1.0}, config={"callbacks": [handler]})
    assert isinstance(handler.errors[0], AdapterNotFoundError)
    with pytest.raises(InvalidRequestError, match="image"):
        llm.invoke([HumanMessage([{"type": "image", "url": "http://x"}])])


# ---------------------------------------------------------------------------- callbacks
class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.ends: list[LLMResult] = []
        self.starts: list[dict[str, Any]] = []

    def on_chat_model_start(self, serialized, messages, *, run_id: UUID, **kwargs: Any) -> None:
        self.starts.append({"metadata": kwargs.get("metadata"), "tags": kwargs.get("tags")})

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.ends.append(response)


def _end_selection(response: LLMResult) -> dict[str, Any]:
    return response.generations[0][0].message.response_metadata[SELECTION_KEY]


@both_modes
def test_on_llm_end_sees_the_selection(llm, engine):
    handler = Recorder()
    llm.invoke(PROMPTS[1], config={"callbacks": [handler]})
    expected = engine.route(PROMPTS[1]).model_dump(mode="json")
    assert _end_selection(handler.ends[0]) == expected
    assert handler.ends[0].llm_output[SELECTION_KEY] == expected
    assert handler.starts[0]["metadata"]["logo_adapter"] == "sql"
    assert "logo:sql" in handler.starts[0]["tags"]
    assert handler.tokens == []  # invoke without streaming
    list(llm.stream(PROMPTS[1], config={"callbacks": [handler]}))
    assert _end_selection(handler.ends[1]) == expected


@both_modes
def test_streamed_tokens_reach_callbacks(engine, make_llm):
    handler = Recorder()
    text = "".join(
        c.content
        for c in make_llm(engine).stream("alpha beta gamma", config={"callbacks": [handler]})
    )
    assert "".join(handler.tokens) == text == "alpha beta gamma"
    assert len([t for t in handler.tokens if t]) == 3
    handler = Recorder()
    message = make_llm(engine, streaming=True).invoke(
        "alpha beta gamma", config={"callbacks": [handler]}
    )
    assert [t for t in handler.tokens if t] == ["alpha ", "beta ", "gamma"]
    assert message.response_metadata[SELECTION_KEY]["adapters"]
    assert _end_selection(handler.ends[0]) == message.response_metadata[SELECTION_KEY]


@both_modes
async def test_async_streamed_tokens_reach_async_callbacks(engine, make_llm):
    class AsyncRecorder(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []
            self.ends: list[LLMResult] = []

        async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.tokens.append(token)

        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            self.ends.append(response)

    handler = AsyncRecorder()
    message = await make_llm(engine, streaming=True).ainvoke(
        "alpha beta gamma", config={"callbacks": [handler]}
    )
    assert [t for t in handler.tokens if t] == ["alpha ", "beta ", "gamma"]
    assert _end_selection(handler.ends[0]) == message.response_metadata[SELECTION_KEY]


# ------------------------------------------------------------------------------ batching
@both_modes
def test_batch_is_one_engine_call_with_a_selection_per_input(engine, make_llm, mode):
    llm = make_llm(engine)
    handler = Recorder()
    batched = llm.batch(PROMPTS, config={"callbacks": [handler]})
    assert engine.probes == [3]  # one probe (remote: one /v1/logo/route with three prompts)
    # one generation; remote: three concurrent requests that the server batches as they arrive
    assert engine.decodes == [3] if mode == "local" else sum(engine.decodes) == 3
    solo = [llm.invoke(p) for p in PROMPTS]
    selections = [m.response_metadata[SELECTION_KEY] for m in batched]
    assert len({json.dumps(s, sort_keys=True) for s in selections}) == 3
    assert [s["adapters"][0] for s in selections] == ["math", "sql", "code"]
    assert selections == [m.response_metadata[SELECTION_KEY] for m in solo]
    assert [m.content for m in batched] == [m.content for m in solo]
    assert [m.usage_metadata for m in batched] == [m.usage_metadata for m in solo]
    # Each input still has its own run, with its own selection in metadata and on_llm_end.
    assert [s["metadata"]["logo_adapter"] for s in handler.starts] == ["math", "sql", "code"]
    assert [_end_selection(r) for r in handler.ends] == selections


@both_modes
async def test_abatch_is_one_engine_call(engine, make_llm, mode):
    llm = make_llm(engine)
    batched = await llm.abatch(PROMPTS)
    assert engine.probes == [3]
    assert engine.decodes == [3] if mode == "local" else sum(engine.decodes) == 3
    solo = [await llm.ainvoke(p) for p in PROMPTS]
    assert [m.response_metadata[SELECTION_KEY] for m in batched] == [
        m.response_metadata[SELECTION_KEY] for m in solo
    ]
    assert [m.content for m in batched] == [m.content for m in solo]


def test_batch_with_bound_kwargs_and_streaming(engine):
    bound = ChatLoGo(engine=engine, streaming=True).bind(adapters={"code": 1.0}, max_tokens=2)
    out = bound.batch(PROMPTS)
    assert engine.decodes == [3]
    assert [m.response_metadata[SELECTION_KEY]["adapters"] for m in out] == [["code"]] * 3
    assert [m.content for m in out] == ["math: what ", "sql: count ", "code: write "]


def test_batch_falls_back_row_by_row_on_a_bad_row(engine):
    llm = ChatLoGo(engine=engine)
    inputs = [PROMPTS[0], [HumanMessage([{"type": "image", "url": "u"}])], PROMPTS[1]]
    out = llm.batch(inputs, return_exceptions=True)
    assert isinstance(out[1], InvalidRequestError)
    assert out[0].content == llm.invoke(PROMPTS[0]).content
    assert out[2].response_metadata[SELECTION_KEY]["adapters"][0] == "sql"
    with pytest.raises(InvalidRequestError):
        llm.batch(inputs)


# ----------------------------------------------------------------------------- the event loop
async def test_async_calls_do_not_block_the_event_loop():
    witness = LoopWitness()

    class WitnessedEngine(CountingEngine):
        def _decode(self, requests, selections, params, rows):
            for step in super()._decode(requests, selections, params, rows):
                witness.check()  # every decoding step
                yield step

    llm = ChatLoGo(engine=WitnessedEngine())

    async def calls() -> None:
        await llm.ainvoke("one two three four five six")
        [c async for c in llm.astream("one two three four five six")]
        await llm.abatch(["one two three", "four five six"])

    await witness.run(calls())
    witness.assert_loop_was_free(min_checks=6 + 6 + 3)


async def test_the_first_async_call_loads_the_model_off_the_event_loop(monkeypatch):
    from logo_engine import LoGoEngine

    witness = LoopWitness()

    def slow_load(cls, *args, **kwargs):
        witness.check()  # the load is in progress: the loop must be free to answer
        return ScriptedEngine()

    monkeypatch.setattr(LoGoEngine, "shared", classmethod(slow_load))
    for call in ("ainvoke", "astream", "abatch"):
        llm = ChatLoGo()
        if call == "ainvoke":
            await witness.run(llm.ainvoke("hello there"))
        elif call == "astream":
            await witness.run(_drain(llm.astream("hello there")))
        else:
            await witness.run(llm.abatch(["hello", "there"]))
    witness.assert_loop_was_free(min_checks=3)


async def _drain(stream: Any) -> list[Any]:
    return [x async for x in stream]


def test_construction_loads_nothing(monkeypatch):
    from logo_engine import LoGoEngine

    loads: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        LoGoEngine,
        "shared",
        classmethod(
            lambda cls, *a, **k: loads.append((a, k)) or ScriptedEngine(model_name="loaded")
        ),
    )
    llm = ChatLoGo(model="some/model", adapters="some/zoo", temperature=0.1)
    assert loads == []
    assert llm._get_ls_params()["ls_model_name"] == "some/model"
    assert llm._identifying_params["model"] == "some/model"
    assert ChatLoGo()._get_ls_params()["ls_model_name"] == "SmolLM2-135M-Instruct"
    assert loads == []
    llm.invoke("hello there")
    assert loads == [
        (
            ("some/model",),
            {"adapters": "some/zoo", "device": "cpu", "dtype": None, "gguf_file": None},
        )
    ]
    llm.invoke("again")
    assert len(loads) == 1
    llm.invoke("hello", model="other/model")  # a per-call base model: its own shared engine
    assert loads[-1][0] == ("other/model",)
    import torch

    ChatLoGo(model="some/model", probe_dtype="bfloat16").invoke("hi")
    assert loads[-1][1]["probe_dtype"] is torch.bfloat16
    assert "probe_compile" not in loads[-1][1]
    ChatLoGo(model="some/model", probe_compile=True).invoke("hi")
    assert loads[-1][1]["probe_compile"] is True


def test_model_override_needs_a_loadable_model(llm):
    with pytest.raises(InvalidRequestError, match="engine it was given"):
        llm.invoke("hi", model="other")
    assert llm.invoke("hi", model="scripted-model").content == "hi"
    assert llm._get_ls_params(model="x")["ls_model_name"] == "x"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"foo": 1},
        {"base_url": "ftp://x"},  # base_url must be an http(s) URL
        {"top_k": 0},
        {"routing": 3},
        {"routing": {"k": 2}},
        {"routing": {"top_k": 0}},
        {"dtype": "float8"},
        {"probe_dtype": "int8"},
        {"max_tokens": 1, "max_new_tokens": 2},
        {"model": "a", "base_model": "b"},
        {"signal": "cosine"},
    ],
)
def test_unknown_or_bad_constructor_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        ChatLoGo(**kwargs)


def test_constructor_names_and_their_aliases():
    assert ChatLoGo(max_new_tokens=2).max_tokens == 2
    assert ChatLoGo(model_name="x").model == ChatLoGo(base_model="x").model == "x"
    assert ChatLoGo(max_tokens=3, max_new_tokens=3).max_tokens == 3  # the same value twice
    assert ChatLoGo(routing={"top_k": 2, "signal": "entropy"}).routing == RoutingConfig(
        top_k=2, signal="entropy"
    )
    assert ChatLoGo(api_key="k").api_key.get_secret_value() == "k"
    with pytest.raises(TypeError):
        ChatLoGo(engine="not an engine")


def test_per_call_aliases_and_warnings_once(engine, caplog):
    llm = ChatLoGo(engine=engine)
    with caplog.at_level("WARNING", logger="logo_integrations._common"):
        assert llm.invoke("one two three four", max_new_tokens=2, frobnicate=1).content == (
            "one two "
        )
    assert caplog.text.count("frobnicate") == 1  # resolved once per call, not once per step


def test_the_call_is_resolved_and_tokens_counted_once(engine, monkeypatch):
    counted: list[Any] = []
    count = engine.count_tokens
    monkeypatch.setattr(engine, "count_tokens", lambda *a, **k: counted.append(a) or count(*a, **k))
    llm = ChatLoGo(engine=engine)  # max_tokens None: the default is cut to the context window
    llm.invoke(PROMPTS[0])
    list(llm.stream(PROMPTS[0]))
    assert len(counted) == 2 and engine.probes == [1, 1]


@both_modes
def test_token_counts_come_from_the_engine(llm, engine):
    messages = [SystemMessage("be brief"), HumanMessage("count these words")]
    assert llm.get_num_tokens_from_messages(messages) == engine.count_tokens(
        to_engine_messages(messages)
    )


# --------------------------------------------------------------------------------- tools
@both_modes
def test_bind_tools_reaches_the_template_and_parses_calls(make_llm):
    engine = CountingEngine(weather_script)
    llm = make_llm(engine).bind_tools([get_weather, get_time])
    message = llm.invoke("Weather in Zürich?")
    assert engine.calls[-1]["tools"][0]["function"]["name"] == "get_weather"
    assert message.content == "Let me check."
    assert message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"] == {"city": "Zürich"}  # non-ASCII kept as is
    assert message.tool_calls[0]["id"].startswith("call_")
    assert message.response_metadata[SELECTION_KEY]["adapters"]


@both_modes
def test_streaming_with_tools_hides_the_call_markup(make_llm):
    engine = CountingEngine(weather_script)
    llm = make_llm(engine).bind_tools([get_weather])
    chunks = list(llm.stream("Weather in Zürich?"))
    assert all("<tool" not in c.content and "{" not in c.content for c in chunks)
    assert "".join(c.content for c in chunks) == "Let me check. "
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.tool_calls == [
        {
            "name": "get_weather",
            "args": {"city": "Zürich"},
            "id": full.tool_calls[0]["id"],
            "type": "tool_call",
        }
    ]
    assert sum(bool(c.tool_call_chunks) for c in chunks) == 1


@both_modes
def test_a_broken_tool_call_is_an_invalid_tool_call(make_llm):
    engine = CountingEngine(lambda m, t: 'Sure. <tool_call>\n{"name": "get_weather", "argu')
    llm = make_llm(engine).bind_tools([get_weather])
    message = llm.invoke("Weather?")
    assert message.content == "Sure." and message.tool_calls == []
    (bad,) = message.invalid_tool_calls
    assert bad["name"] == "get_weather" and bad["args"].startswith("<tool_call>")
    assert "not valid JSON" in bad["error"]
    chunks = list(llm.stream("Weather?"))
    assert all("<tool" not in c.content for c in chunks)
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.content == "Sure. " and full.tool_calls == []  # shown before the markup began
    assert [b["name"] for b in full.invalid_tool_calls] == ["get_weather"]
    # Adding chunks drops the error of an invalid call: it survives in response_metadata.
    assert full.response_metadata[INVALID_KEY] == [
        {"name": "get_weather", "arguments": bad["args"], "error": bad["error"]}
    ]
    assert message.response_metadata[INVALID_KEY] == full.response_metadata[INVALID_KEY]


@both_modes
def test_tool_choice_forces_the_named_tool(make_llm):
    engine = CountingEngine(lambda m, t: tool_call_text("get_time", {"city": "Oslo"}))
    llm = make_llm(engine).bind_tools([get_weather, get_time], tool_choice="get_time")
    message = llm.invoke("Hello")
    assert message.tool_calls[0]["name"] == "get_time"
    assert message.tool_calls[0]["args"] == {"city": "Oslo"}
    assert (
        make_llm(engine).bind_tools([get_weather], tool_choice="none").invoke("Hello").tool_calls
        == []
    )
    with pytest.raises(InvalidRequestError):
        make_llm(engine).bind_tools([get_weather], tool_choice="get_time")


@both_modes
def test_tool_messages_round_trip_through_the_template(make_llm):
    engine = CountingEngine(weather_script)
    llm = make_llm(engine).bind_tools([get_weather])
    first = llm.invoke([HumanMessage("Weather in Zürich?")])
    result = get_weather.invoke(first.tool_calls[0])
    final = llm.invoke([HumanMessage("Weather in Zürich?"), first, result])
    assert final.content == "It is sunny." and not final.tool_calls
    sent = engine.calls[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Zürich"}
    assert sent[2]["tool_call_id"] == first.tool_calls[0]["id"]


class Person(BaseModel):
    """A person."""

    name: str = Field(description="full name")
    age: int


@both_modes
def test_structured_output_pydantic_typeddict_json_schema(make_llm):
    engine = CountingEngine(
        lambda m, t: tool_call_text(t[0]["function"]["name"], {"name": "Åsa", "age": 41})
    )
    llm = make_llm(engine)
    assert llm.with_structured_output(Person).invoke("Åsa is 41") == Person(name="Åsa", age=41)
    schema = Person.model_json_schema()
    assert llm.with_structured_output(schema).invoke("x") == {"name": "Åsa", "age": 41}
    raw = llm.with_structured_output(Person, include_raw=True).invoke("x")
    assert raw["parsed"] == Person(name="Åsa", age=41)
    assert raw["raw"].response_metadata[SELECTION_KEY]["adapters"]
    assert engine.calls[-1]["tools"][0]["function"]["name"] == "Person"
    assert list(llm.with_structured_output(Person).stream("x")) == [Person(name="Åsa", age=41)]


# ----------------------------------------------------------------------------- LangSmith
def _mock_client() -> MagicMock:
    return MagicMock(spec=Client)


def _llm_runs(client: MagicMock) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    creates = [c.kwargs for c in client.create_run.call_args_list if c.kwargs["run_type"] == "llm"]
    updates = [c.kwargs for c in client.update_run.call_args_list if c.kwargs["run_type"] == "llm"]
    return creates, updates


@both_modes
@pytest.mark.parametrize("how", ["invoke", "stream", "ainvoke", "astream"])
async def test_langsmith_run_holds_the_selection(llm, engine, how):
    client = _mock_client()
    with tracing_v2_enabled(project_name="unit", client=client):
        if how == "invoke":
            llm.invoke(PROMPTS[1], config={"metadata": {"request": "r1"}})
        elif how == "stream":
            list(llm.stream(PROMPTS[1], config={"metadata": {"request": "r1"}}))
        elif how == "ainvoke":
            await llm.ainvoke(PROMPTS[1], config={"metadata": {"request": "r1"}})
        else:
            [c async for c in llm.astream(PROMPTS[1], config={"metadata": {"request": "r1"}})]
    creates, updates = _llm_runs(client)
    assert len(creates) == 1 and len(updates) == 1
    expected = engine.route(PROMPTS[1]).model_dump(mode="json")
    # Run metadata at the start: filterable by adapter name.
    meta = creates[0]["extra"]["metadata"]
    assert meta["request"] == "r1"
    assert meta["logo_adapter"] == "sql"
    assert meta["logo_adapters"] == expected["adapters"]
    assert meta[SELECTION_KEY] == expected
    assert meta["ls_provider"] == "logo" and meta["ls_model_name"] == "scripted-model"
    assert {f"logo:{a}" for a in expected["adapters"]} <= set(creates[0]["tags"])
    # Outputs at the end: the answer's response_metadata, and usage in metadata.
    message = updates[0]["outputs"]["generations"][0][0]["message"]["kwargs"]
    assert message["response_metadata"][SELECTION_KEY] == expected
    assert updates[0]["extra"]["metadata"]["usage_metadata"]["total_tokens"] > 0
    assert updates[0]["extra"]["metadata"]["logo_adapter"] == "sql"


@both_modes
def test_langsmith_batch_gives_each_run_its_own_selection(llm):
    client = _mock_client()
    with tracing_v2_enabled(project_name="unit", client=client):
        llm.batch(PROMPTS)
    creates, updates = _llm_runs(client)
    assert sorted(c["extra"]["metadata"]["logo_adapter"] for c in creates) == [
        "code",
        "math",
        "sql",
    ]
    assert len(updates) == 3


@both_modes
def test_collect_runs_sees_the_selection_without_langsmith(llm):
    with collect_runs() as cb:
        llm.invoke(PROMPTS[0])
    run = cb.traced_runs[0]
    assert run.metadata["logo_adapter"] == "math"
    out = run.outputs["generations"][0][0]["message"]["kwargs"]["response_metadata"]
    assert out[SELECTION_KEY]["adapters"][0] == "math"


def test_the_engine_runs_in_one_thread_per_call(llm):
    # Plain sanity: concurrent invokes from threads do not mix their selections.
    results: dict[int, str] = {}

    def call(i: int) -> None:
        results[i] = llm.invoke(PROMPTS[i]).response_metadata[SELECTION_KEY]["adapters"][0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: "math", 1: "sql", 2: "code"}


@both_modes
def test_chunks_add_up_without_concatenating_metadata(llm):
    chunks = list(llm.stream("a b c"))
    assert isinstance(chunks[-1], AIMessageChunk)
    full = sum(chunks[1:], chunks[0])
    assert full.response_metadata["model_provider"] == "logo"
    assert full.response_metadata["finish_reason"] == "stop"


@both_modes
def test_a_precomputed_selection_is_reused_without_a_probe(llm, engine):
    selection = engine.route(PROMPTS[1], routing=dataclasses.replace(engine.routing, top_k=1))
    engine.probes.clear()
    handler = Recorder()
    message = llm.invoke(PROMPTS[1], logo_selection=selection, config={"callbacks": [handler]})
    assert engine.probes == []
    assert message.response_metadata[SELECTION_KEY] == selection.model_dump(mode="json")
    assert engine.calls[-1]["selection"].mixture == {"sql": 1.0}
    assert handler.starts[0]["metadata"]["logo_adapters"] == ["sql"]


# ---------------------------------------------------------------------- the LLM cache
def test_identical_calls_hit_the_cache_without_a_probe(engine):
    cache = InMemoryCache()
    llm = ChatLoGo(engine=engine, cache=cache)
    handler = Recorder()
    first = llm.invoke(PROMPTS[1], config={"callbacks": [handler]})
    second = llm.invoke(PROMPTS[1], config={"callbacks": [handler]})
    assert len(cache._cache) == 1
    assert engine.probes == [1] and engine.decodes == [1]  # the second call did no engine work
    assert second.content == first.content
    assert second.response_metadata[SELECTION_KEY] == first.response_metadata[SELECTION_KEY]
    # The cached answer's selection still reaches the second run's metadata and tags.
    assert [s["metadata"]["logo_adapter"] for s in handler.starts] == ["sql", "sql"]
    assert "logo:sql" in handler.starts[1]["tags"]
    llm.invoke(PROMPTS[1], temperature=0.5, seed=1)  # other arguments: another entry
    assert len(cache._cache) == 2 and engine.decodes == [1, 1]


async def test_async_and_batch_calls_use_the_cache(engine):
    cache = InMemoryCache()
    llm = ChatLoGo(engine=engine, cache=cache)
    await llm.ainvoke(PROMPTS[0])
    assert (await llm.ainvoke(PROMPTS[0])).response_metadata[SELECTION_KEY]["adapters"][0] == "math"
    assert engine.decodes == [1]
    out = llm.batch(PROMPTS)  # the first row is cached: the batch generates the other two
    assert engine.probes == [1, 2] and engine.decodes == [1, 2]
    assert [m.response_metadata[SELECTION_KEY]["adapters"][0] for m in out] == [
        "math",
        "sql",
        "code",
    ]
    assert len(cache._cache) == 3
    assert [m.content for m in llm.batch(PROMPTS)] == [m.content for m in out]
    assert engine.decodes == [1, 2]


def test_engines_passed_in_do_not_share_cache_entries():
    cache = InMemoryCache()
    a = ChatLoGo(engine=ScriptedEngine(["from a"]), cache=cache)
    b = ChatLoGo(engine=ScriptedEngine(["from b"], adapter_names=("x", "y")), cache=cache)
    assert a.invoke("hi").content == "from a"
    assert b.invoke("hi").content == "from b"
    assert len(cache._cache) == 2


def test_the_selection_is_not_in_call_kwargs_or_invocation_params(llm, engine):
    client = _mock_client()
    with tracing_v2_enabled(project_name="unit", client=client):
        llm.invoke(PROMPTS[1])
    (create,), _ = _llm_runs(client)
    assert SELECTION_KEY not in create["extra"]["invocation_params"]
    assert create["extra"]["metadata"][SELECTION_KEY]["adapters"][0] == "sql"
    assert json.dumps(create, default=str).count('"probe_ms"') == 1  # once, in the metadata


# ------------------------------------------------------------------- structured output
class InventsNames(ScriptedEngine):
    """A small model: asked for a tool call, it invents a tool name unless the engine forces it.

    A forced opening (name, brace, first parameter) is continued into a whole call.
    """

    def _decode(self, requests, selections, params, rows):
        forced = re.match(
            r'<tool_call>\n{"name": ("[^"]+"), "arguments": {', requests[0].response_prefix
        )
        name = json.loads(forced.group(1)) if forced else "person_info"
        self._script = lambda m, t: tool_call_text(
            name, {"name": "Åsa", "age": 41} if forced else {}
        )
        return super()._decode(requests, selections, params, rows)


def test_structured_output_forces_the_one_schema_tool():
    llm = ChatLoGo(engine=InventsNames())
    assert llm.with_structured_output(Person).invoke("Åsa is 41") == Person(name="Åsa", age=41)
    assert list(llm.with_structured_output(Person).stream("x")) == [Person(name="Åsa", age=41)]
    for choice in ("any", "required", True):  # one bound tool: its name is forced
        message = llm.bind_tools([Person], tool_choice=choice).invoke("x")
        assert message.tool_calls[0]["name"] == "Person"
    free = llm.bind_tools([Person]).invoke("x")  # auto: the model names the tool itself
    assert free.tool_calls[0]["name"] == "person_info"
    two = llm.bind_tools([Person, get_weather], tool_choice="any").invoke("x")
    assert two.tool_calls[0]["name"] == "person_info"  # several tools: the model picks


# ------------------------------------------------------------------------ serialisation
def test_settings_serialise_and_load_back():
    from langchain_core.load import dumpd, dumps, load, loads

    llm = ChatLoGo(
        model="some/model",
        adapters={"sql": "zoo/sql"},
        top_k=2,
        routing={"top_k": 1, "signal": "entropy"},
        max_new_tokens=9,
        api_key="secret-key",
    )
    assert "secret-key" not in dumps(llm)
    loaded = loads(
        dumps(llm),
        valid_namespaces=["logo_integrations"],
        allowed_objects=[ChatLoGo],
        secrets_map={"LOGO_API_KEY": "secret-key"},
    )
    assert isinstance(loaded, ChatLoGo) and loaded.model_dump() == llm.model_dump()
    assert loaded.routing == RoutingConfig(top_k=1, signal="entropy")
    with pytest.raises(ValueError, match="not allowed"):  # the default allowlist is core only
        load(dumpd(llm), valid_namespaces=["logo_integrations"])


def test_what_cannot_serialise_says_so(engine):
    from langchain_core.load import dumpd

    assert dumpd(ChatLoGo(engine=engine))["type"] == "not_implemented"

    def my_scorer(outputs: Any) -> Any:
        return outputs.norm(dim=-1)

    assert dumpd(ChatLoGo(routing=RoutingConfig(signal=my_scorer)))["type"] == "not_implemented"


def test_a_deep_copy_shares_the_engine(engine):
    import copy

    llm = ChatLoGo(engine=engine, top_k=1)
    twin = copy.deepcopy(llm)
    assert twin.engine is engine and twin.top_k == 1
    assert twin.invoke(PROMPTS[1]).content == llm.invoke(PROMPTS[1]).content

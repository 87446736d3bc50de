"""LoGoLLM (LlamaIndex integration) on a scripted engine: calls, streams, events, tools."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import types
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    ImageBlock,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field
from llama_index.core.callbacks import (
    CallbackManager,
    CBEventType,
    EventPayload,
    LlamaDebugHandler,
    TokenCountingHandler,
)
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.tools import FunctionTool
from loop_witness import LoopWitness
from remote import both_modes

import logo_integrations
from logo_engine import AdapterNotFoundError, InvalidRequestError, RoutingConfig
from logo_engine.testing import ScriptedEngine, tool_call_text
from logo_integrations.llama_index import (
    INVALID_KEY,
    SELECTION_KEY,
    LoGoLLM,
    LoGoSelectionEvent,
    message_tool_calls,
    normalize_tool_choice,
    record_selections,
    to_engine_message,
    tool_selection,
)

ADAPTERS = ("math", "sql", "code")


# ------------------------------------------------------------------------------ helpers
class EventCollector(BaseEventHandler):
    """Every instrumentation event, in order."""

    events: list[BaseEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "EventCollector"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)

    def of(self, *kinds: type) -> list[BaseEvent]:
        return [e for e in self.events if isinstance(e, kinds)]


@pytest.fixture()
def events():
    collector = EventCollector(events=[])
    root = get_dispatcher()
    root.add_event_handler(collector)
    yield collector
    root.event_handlers = [h for h in root.event_handlers if h is not collector]


@pytest.fixture()
def debug():
    return LlamaDebugHandler()


_SERVED: list[Any] = []  # in a remote-mode test: the `serve` fixture (empty: in-process)


@pytest.fixture(autouse=True)
def _remote_mode(mode, serve):
    """Tests marked ``both_modes`` also run with make_llm building LoGoLLM(base_url=...)."""
    _SERVED[:] = [serve] if mode == "remote" else []
    yield
    _SERVED.clear()


def over(engine: Any, **kwargs: Any) -> LoGoLLM:
    """LoGoLLM over this engine: given in-process, or behind a live server in remote mode."""
    where = {"base_url": _SERVED[0](engine)} if _SERVED else {"engine": engine}
    return LoGoLLM(**where, **kwargs)


def make_llm(script: Any = None, debug: LlamaDebugHandler | None = None, **kwargs: Any) -> LoGoLLM:
    engine = ScriptedEngine(script, adapter_names=ADAPTERS)
    handlers = [debug] if debug is not None else []
    return over(engine, callback_manager=CallbackManager(handlers), **kwargs)


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def tool_script(messages: list[dict[str, Any]], tools: Any) -> str:
    """Call multiply when tools are offered and no result came back yet; else answer."""
    if messages[-1]["role"] == "tool":
        return f"The result is {messages[-1]['content']}."
    if tools:
        return tool_call_text("multiply", {"a": 6, "b": 7})
    return "no tools"


async def drain(agen: Any) -> list[Any]:
    return [x async for x in agen]


USER = [ChatMessage(role="user", content="what is the sql for this table")]


# ----------------------------------------------------------------------- class and metadata
def test_is_a_function_calling_llm():
    assert FunctionCallingLLM in LoGoLLM.__mro__
    assert LoGoLLM.class_name() == "LoGoLLM"
    assert logo_integrations.LoGoLLM is LoGoLLM


def test_metadata_comes_from_the_engine():
    engine = ScriptedEngine(model_name="base-x", context_window=1234, adapter_names=ADAPTERS)
    llm = LoGoLLM(engine=engine, max_new_tokens=77)
    meta = llm.metadata
    assert meta.context_window == 1234
    assert meta.num_output == 77
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name == "base-x"
    payload = llm.to_payload()
    assert payload["adapter_names"] == list(ADAPTERS)
    assert payload["class_name"] == "LoGoLLM"
    json.dumps(payload)


class _NoTemplateTokenizer:
    chat_template = None


class NoTemplateEngine(ScriptedEngine):
    tokenizer = _NoTemplateTokenizer()


def test_model_without_chat_template_is_a_completion_model():
    engine = NoTemplateEngine(adapter_names=ADAPTERS)
    llm = LoGoLLM(engine=engine)
    assert not llm.metadata.is_chat_model
    assert not llm.metadata.is_function_calling_model
    llm.chat(
        [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi")]
    )
    # Messages were joined by messages_to_prompt into one string prompt.
    (call,) = engine.calls
    assert len(call["messages"]) == 1
    assert "be brief" in call["messages"][0]["content"]


class FakeLoader:
    """Stands in for LoGoEngine.shared: records its arguments, returns a scripted engine."""

    def __init__(self, on_load: Any = None) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []
        self.on_load = on_load

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeLoader:
        loader = self

        class FakeLoGoEngine:
            @staticmethod
            def shared(base_model: Any = None, **kwargs: Any) -> ScriptedEngine:
                loader.calls.append((base_model, kwargs))
                if loader.on_load is not None:
                    loader.on_load()
                return ScriptedEngine(["loaded"], adapter_names=ADAPTERS, context_window=777)

        module = types.ModuleType("logo_engine.engine")
        module.LoGoEngine = FakeLoGoEngine  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "logo_engine.engine", module)
        return self


def test_engine_is_loaded_lazily_through_shared_without_routing_in_the_key(monkeypatch):
    import torch

    loader = FakeLoader().install(monkeypatch)
    llm = LoGoLLM(
        base_model="some/dir",
        adapters={"sql": "x/sql"},
        routing=RoutingConfig(top_k=2),
        dtype="bfloat16",
    )
    assert llm.model == "some/dir"  # base_model is an alias of model
    assert loader.calls == []  # nothing loaded in __init__
    assert llm.complete("hello").text == "loaded"
    llm.complete("again")
    # Routing is per call: another LoGoLLM with other routing shares the same load arguments.
    LoGoLLM(
        model="some/dir",
        adapters={"sql": "x/sql"},
        routing=RoutingConfig(top_k=1),
        dtype="bfloat16",
    ).complete("x")
    expected = (
        "some/dir",
        {"adapters": {"sql": "x/sql"}, "device": "cpu", "dtype": torch.bfloat16, "gguf_file": None},
    )
    assert loader.calls == [expected, expected]  # LoGoEngine.shared caches by these alone
    LoGoLLM(model="some/dir", probe_dtype="bfloat16").complete("x")
    assert loader.calls[-1][1]["probe_dtype"] is torch.bfloat16
    LoGoLLM(model="some/dir", probe_compile=True).complete("x")
    assert loader.calls[-1][1]["probe_compile"] is True


def test_metadata_and_payload_never_load_the_model(monkeypatch, tmp_path):
    loader = FakeLoader().install(monkeypatch)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    llm = LoGoLLM(model=str(tmp_path), max_tokens=64)
    meta = llm.metadata
    payload = llm.to_payload()
    assert loader.calls == []
    # Before loading: what the model folder's config files say.
    assert (meta.context_window, meta.num_output, meta.is_chat_model) == (512, 64, True)
    assert meta.model_name == str(tmp_path)
    assert payload["adapter_names"] is None and payload["class_name"] == "LoGoLLM"
    llm.complete("x")
    assert len(loader.calls) == 1
    # Once loaded: the engine's own values.
    assert llm.metadata.context_window == 777 and llm.metadata.model_name == "scripted-model"
    assert llm.to_payload()["adapter_names"] == list(ADAPTERS)
    assert LoGoLLM(model=str(tmp_path), context_window=300).metadata.context_window == 300
    unknown = LoGoLLM(model=str(tmp_path / "missing")).metadata  # no files: LlamaIndex defaults
    assert (unknown.context_window, unknown.num_output, unknown.is_chat_model) == (3900, 256, True)


@pytest.mark.parametrize("method", ["acomplete", "achat", "astream_complete", "astream_chat"])
async def test_the_first_async_call_loads_the_model_off_the_event_loop(monkeypatch, method):
    witness = LoopWitness()
    loader = FakeLoader(on_load=witness.check).install(monkeypatch)
    llm = LoGoLLM(callback_manager=CallbackManager([LlamaDebugHandler()]))
    arg: Any = "x" if "complete" in method else USER

    async def call() -> Any:
        result = await getattr(llm, method)(arg)  # the real path, callback wrappers included
        return await drain(result) if method.startswith("astream") else result

    result = await witness.run(call())
    assert len(loader.calls) == 1
    witness.assert_loop_was_free(min_checks=1)
    last = result[-1] if isinstance(result, list) else result
    assert last.additional_kwargs[SELECTION_KEY]["adapters"]


def test_bad_arguments():
    with pytest.raises(TypeError):
        LoGoLLM(engine="not an engine")
    for kwargs in (
        {"routing": 3},
        {"routing": {"k": 1}},
        {"max_new_tokens": 0},
        {"max_tokens": 0},
        {"foo": 1},
        {"base_url": "ftp://x"},  # base_url must be an http(s) URL
        {"model": "a", "base_model": "b"},
        {"max_tokens": 1, "max_new_tokens": 2},
        {"dtype": "int3"},
        {"probe_dtype": "int3"},
        {"context_window": 0},
        {"signal": "cosine"},
    ):
        with pytest.raises(ValueError):
            LoGoLLM(**kwargs)


def test_conventional_names_and_aliases():
    llm = LoGoLLM(
        model_name="m",
        max_new_tokens=9,
        top_k=2,
        signal="entropy",
        routing={"weighting": "uniform"},
    )
    assert (llm.model, llm.max_tokens, llm.top_k, llm.signal) == ("m", 9, 2, "entropy")
    assert llm.routing == RoutingConfig(weighting="uniform")


# ------------------------------------------------------------------------- completion / chat
@both_modes
def test_complete_returns_text_selection_and_usage():
    llm = make_llm(["SELECT * FROM t"])
    response = llm.complete("write sql for this sql table")
    assert response.text == "SELECT * FROM t"
    selection = response.additional_kwargs[SELECTION_KEY]
    assert selection["adapters"][0] == "sql"
    assert abs(sum(selection["weights"]) - 1) < 1e-6
    assert set(selection["scores"]) == set(ADAPTERS)
    assert response.additional_kwargs["completion_tokens"] == 4
    assert response.additional_kwargs["finish_reason"] == "stop"
    assert response.raw["usage"] == {
        "prompt_tokens": response.additional_kwargs["prompt_tokens"],
        "completion_tokens": 4,
        "total_tokens": response.additional_kwargs["total_tokens"],
    }
    assert response.raw[SELECTION_KEY] == selection
    json.dumps(response.raw)
    json.dumps(response.additional_kwargs)


@both_modes
def test_an_abstained_selection_is_reported_like_any_other():
    """No adapter stands out (all keyword scores 1.0 < 1.5): the base model answers, and says so."""
    llm = make_llm(["plain answer"], routing=RoutingConfig(top_k=1, abstain_below=1.5))
    response = llm.complete("hello there")
    selection = response.additional_kwargs[SELECTION_KEY]
    assert selection["abstained"] and selection["adapters"] == [] and selection["weights"] == []
    assert "base model" in selection["reason"]
    assert response.raw[SELECTION_KEY] == selection
    routed = llm.complete("write sql for this sql table").additional_kwargs[SELECTION_KEY]
    assert routed["adapters"] == ["sql"] and not routed["abstained"]


@both_modes
def test_chat_and_complete_share_one_code_path():
    engine = ScriptedEngine(adapter_names=ADAPTERS)
    llm = over(engine)
    a = llm.complete("hello math")
    b = llm.chat([ChatMessage(role="user", content="hello math")])
    list(llm.stream_complete("hello math"))
    list(llm.stream_chat([ChatMessage(role="user", content="hello math")]))
    prompts = [c["messages"] for c in engine.calls]
    assert all(p == [{"role": "user", "content": "hello math"}] for p in prompts)
    assert a.text == b.message.content == "hello math"
    assert a.additional_kwargs[SELECTION_KEY] == b.additional_kwargs[SELECTION_KEY]
    # The selection is not put in the message (it would be sent back to models as history).
    assert SELECTION_KEY not in b.message.additional_kwargs


@both_modes
def test_chat_response_fields():
    llm = make_llm(["an answer"])
    response = llm.chat(USER)
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == "an answer"
    assert response.additional_kwargs[SELECTION_KEY]["adapters"][0] == "sql"
    assert response.raw["usage"]["completion_tokens"] == 2
    assert response.raw["model"] == "scripted-model"


@both_modes
def test_pinned_mixture_per_call_and_as_default():
    llm = make_llm(["ok"])
    pinned = llm.complete("x", adapters={"code": 3, "math": 1}).additional_kwargs[SELECTION_KEY]
    assert pinned["pinned"] and pinned["adapters"] == ["code", "math"]
    assert pinned["weights"] == pytest.approx([0.75, 0.25])
    base = llm.chat(USER, adapters={}).additional_kwargs[SELECTION_KEY]
    assert base["adapters"] == [] and base["pinned"]

    llm = make_llm(["ok"], mixture={"math": 1.0})
    assert llm.complete("sql sql").additional_kwargs[SELECTION_KEY]["adapters"] == ["math"]
    routed = llm.complete("sql sql", adapters=None).additional_kwargs[SELECTION_KEY]
    assert not routed["pinned"] and routed["adapters"][0] == "sql"


@both_modes
def test_unknown_adapter_raises():
    llm = make_llm(["ok"])
    with pytest.raises(AdapterNotFoundError):
        llm.complete("x", adapters={"nope": 1.0})


@both_modes
def test_routing_and_top_k_per_call():
    llm = make_llm(["ok"])
    sel = llm.complete("sql math", top_k=1).additional_kwargs[SELECTION_KEY]
    assert sel["top_k"] == 1 and len(sel["adapters"]) == 1
    sel = llm.complete("sql math", routing=RoutingConfig(top_k=2)).additional_kwargs[SELECTION_KEY]
    assert len(sel["adapters"]) == 2
    llm = make_llm(["ok"], routing=RoutingConfig(top_k=2, weighting="uniform"))
    sel = llm.complete("sql math").additional_kwargs[SELECTION_KEY]
    assert sel["weights"] == [0.5, 0.5]


@both_modes
def test_sampling_arguments_reach_the_engine():
    llm = make_llm(["one two three four five"])
    short = llm.complete("x", max_tokens=2)
    assert short.text == "one two " and short.additional_kwargs["finish_reason"] == "length"
    assert llm.complete("x", max_new_tokens=3).text == "one two three "
    assert llm.complete("x", stop=["three"]).text == "one two "
    assert llm.complete("x", stop="four").text == "one two three "
    assert make_llm(["a b"], max_new_tokens=1).complete("x").text == "a "
    assert make_llm(["a b c"], stop=["b"]).chat(USER).message.content == "a "
    with pytest.raises(InvalidRequestError):
        llm.complete("x", temperature=-1)


def test_unknown_keyword_arguments_are_ignored_with_a_warning(caplog):
    llm = make_llm(["ok"])
    with caplog.at_level("WARNING", logger="logo_integrations._common"):
        assert llm.complete("x", frequency_penalty=0.5).text == "ok"
    assert "frequency_penalty" in caplog.text


# ------------------------------------------------------------------------------- streaming
@both_modes
def test_stream_complete_chunks_and_final_metadata():
    llm = make_llm(["alpha beta gamma"])
    chunks = list(llm.stream_complete("sql please"))
    deltas = [c.delta for c in chunks]
    assert deltas == ["alpha ", "beta ", "gamma", ""]
    assert [c.text for c in chunks] == ["alpha ", "alpha beta ", "alpha beta gamma"] * 1 + [
        "alpha beta gamma"
    ]
    assert all(c.additional_kwargs[SELECTION_KEY]["adapters"][0] == "sql" for c in chunks)
    assert "usage" not in chunks[0].raw
    assert chunks[-1].raw["usage"]["completion_tokens"] == 3
    assert chunks[-1].additional_kwargs["finish_reason"] == "stop"


@both_modes
def test_stream_chat_chunks():
    llm = make_llm(["alpha beta"])
    chunks = list(llm.stream_chat(USER))
    assert "".join(c.delta for c in chunks) == "alpha beta"
    assert [c.message.content for c in chunks] == ["alpha ", "alpha beta", "alpha beta"]
    assert chunks[-1].raw["usage"]["total_tokens"] > 2
    assert all(SELECTION_KEY in c.additional_kwargs for c in chunks)


@both_modes
async def test_async_forms_match_sync():
    llm = make_llm(["alpha beta"])
    assert (await llm.acomplete("x")).text == llm.complete("x").text
    assert (await llm.achat(USER)).message.content == "alpha beta"
    chunks = await drain(await llm.astream_complete("x"))
    assert [c.delta for c in chunks] == ["alpha ", "beta", ""]
    assert chunks[-1].raw["usage"]["completion_tokens"] == 2
    chunks = await drain(await llm.astream_chat(USER))
    assert "".join(c.delta for c in chunks) == "alpha beta"
    assert chunks[-1].additional_kwargs[SELECTION_KEY]["adapters"][0] == "sql"


@both_modes
def test_stream_stopped_early_closes_cleanly():
    llm = make_llm(["a b c d e f"])
    stream = llm.stream_chat(USER)
    first = next(stream)
    assert first.delta == "a "
    stream.close()  # the engine stream is closed in the generator's finally


@both_modes
@pytest.mark.parametrize("method", ["acomplete", "achat", "astream_complete", "astream_chat"])
async def test_async_calls_do_not_block_the_event_loop(method):
    witness = LoopWitness()

    def script(messages: Any, tools: Any) -> str:
        witness.check()  # the scripted model at work
        return "done"

    llm = make_llm(script)
    arg: Any = "x" if "complete" in method else USER

    async def call() -> None:
        result = await getattr(llm, method)(arg)
        if method.startswith("astream"):
            await drain(result)

    await witness.run(call())
    witness.assert_loop_was_free(min_checks=1)


# ------------------------------------------------------------------ events and callbacks
SQL = "write the sql"
CALLS = [
    ("complete", SQL, False),
    ("stream_complete", SQL, False),
    ("chat", USER, False),
    ("stream_chat", USER, False),
    ("acomplete", SQL, True),
    ("astream_complete", SQL, True),
    ("achat", USER, True),
    ("astream_chat", USER, True),
]


async def _call(llm: LoGoLLM, method: str, arg: Any, is_async: bool) -> Any:
    result = getattr(llm, method)(arg)
    if is_async:
        result = await result
    if "stream" in method:
        chunks = await drain(result) if is_async else list(result)
        return chunks[-1]
    return result


@both_modes
@pytest.mark.parametrize(("method", "arg", "is_async"), CALLS)
async def test_exactly_one_llm_event_per_call_with_the_selection(
    method, arg, is_async, debug, events
):
    llm = make_llm(["sql answer"], debug=debug)
    last = await _call(llm, method, arg, is_async)

    pairs = debug.get_event_pairs(CBEventType.LLM)
    assert len(pairs) == 1
    end = pairs[0][1].payload
    response = end[EventPayload.COMPLETION if "complete" in method else EventPayload.RESPONSE]
    assert response.additional_kwargs[SELECTION_KEY]["adapters"][0] == "sql"
    assert response.raw["usage"]["completion_tokens"] == 2
    assert response is last

    start_kind = LLMCompletionStartEvent if "complete" in method else LLMChatStartEvent
    end_kind = LLMCompletionEndEvent if "complete" in method else LLMChatEndEvent
    assert len(events.of(LLMCompletionStartEvent, LLMChatStartEvent)) == 1
    (start,) = events.of(start_kind)
    (selected,) = events.of(LoGoSelectionEvent)
    (finished,) = events.of(end_kind)
    # The selection event sits inside the LLM call's span, between start and end.
    assert selected.span_id == start.span_id
    assert selected.span_id.startswith(f"LoGoLLM.{method}-")
    order = events.events
    assert order.index(start) < order.index(selected) < order.index(finished)
    assert selected.adapters == response.additional_kwargs[SELECTION_KEY]["adapters"]
    assert selected.weights == response.additional_kwargs[SELECTION_KEY]["weights"]
    assert selected.scores == response.additional_kwargs[SELECTION_KEY]["scores"]
    assert selected.base_model == "scripted-model"
    assert not selected.pinned
    # The event carries the whole selection, whatever fields it has.
    assert selected.selection.model_dump(mode="json") == response.additional_kwargs[SELECTION_KEY]
    json.dumps(selected.model_dump(mode="json"))


@both_modes
def test_record_selections_context_manager():
    llm = make_llm(["ok"])
    with record_selections() as recorder:
        llm.complete("math math")
        llm.chat(USER, adapters={"code": 1.0})
    llm.complete("after")  # not recorded: the recorder is detached
    assert [s.adapters[0] for s in recorder.selections] == ["math", "code"]
    assert recorder.selections[1].pinned
    assert all(h is not recorder for h in get_dispatcher().event_handlers)


@both_modes
def test_failed_call_ends_its_event_with_the_exception(debug):
    llm = make_llm(["ok"], debug=debug)
    with pytest.raises(AdapterNotFoundError):
        llm.chat(USER, adapters={"nope": 1.0})
    pairs = debug.get_event_pairs(CBEventType.LLM)
    assert len(pairs) == 1
    assert isinstance(pairs[0][1].payload[EventPayload.EXCEPTION], AdapterNotFoundError)


@both_modes
@pytest.mark.parametrize(("method", "arg", "is_async"), CALLS)
async def test_token_counting_handler_reads_engine_usage(method, arg, is_async):
    counter = TokenCountingHandler(tokenizer=lambda text: [])  # usage must come from raw
    llm = over(
        ScriptedEngine(["one two three"], adapter_names=ADAPTERS),
        callback_manager=CallbackManager([counter]),
    )
    last = await _call(llm, method, arg, is_async)
    usage = last.raw["usage"]
    assert counter.prompt_llm_token_count == usage["prompt_tokens"] > 0
    assert counter.completion_llm_token_count == usage["completion_tokens"] == 3
    assert counter.total_llm_token_count == usage["total_tokens"]


# ---------------------------------------------------------------------- message conversion
TOOL_CALL = {
    "id": "c1",
    "type": "function",
    "function": {"name": "multiply", "arguments": '{"a": 2, "b": 3}'},
}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (ChatMessage(role="user", content="hi"), {"role": "user", "content": "hi"}),
        (ChatMessage(role="system", content="s"), {"role": "system", "content": "s"}),
        (ChatMessage(role="developer", content="d"), {"role": "system", "content": "d"}),
        (ChatMessage(role="assistant", content=None), {"role": "assistant", "content": ""}),
        (ChatMessage(role="chatbot", content="c"), {"role": "assistant", "content": "c"}),
        (
            ChatMessage(role="user", blocks=[TextBlock(text="a"), TextBlock(text="b")]),
            {"role": "user", "content": "a\nb"},
        ),
        (
            ChatMessage(
                role="assistant", content="", additional_kwargs={"tool_calls": [TOOL_CALL]}
            ),
            {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        ),
        (
            ChatMessage(
                role="assistant",
                additional_kwargs={
                    "tool_calls": [{"id": "c1", "name": "multiply", "arguments": {"a": 2, "b": 3}}]
                },
            ),
            {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        ),
        (
            ChatMessage(
                role="assistant",
                additional_kwargs={
                    "tool_calls": [
                        ToolSelection(
                            tool_id="c1", tool_name="multiply", tool_kwargs={"a": 2, "b": 3}
                        )
                    ]
                },
            ),
            {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        ),
        (
            ChatMessage(
                role="assistant",
                blocks=[
                    ToolCallBlock(
                        tool_call_id="c1", tool_name="multiply", tool_kwargs={"a": 2, "b": 3}
                    )
                ],
            ),
            {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        ),
        (
            ChatMessage(
                role="assistant",
                blocks=[
                    ToolCallBlock(
                        tool_call_id="c1", tool_name="multiply", tool_kwargs='{"a": 2, "b": 3}'
                    )
                ],
            ),
            {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        ),
        (
            ChatMessage(
                role="assistant",
                additional_kwargs={
                    "tool_calls": [
                        types.SimpleNamespace(
                            id="c1",
                            function=types.SimpleNamespace(
                                name="multiply", arguments='{"a": 2, "b": 3}'
                            ),
                        )
                    ]
                },
            ),
            {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        ),
        (
            ChatMessage(role="tool", content="6", additional_kwargs={"tool_call_id": "c1"}),
            {"role": "tool", "content": "6", "tool_call_id": "c1"},
        ),
        (
            ChatMessage(
                role="tool",
                content="6",
                additional_kwargs={"tool_call_id": "c1", "name": "multiply"},
            ),
            {"role": "tool", "content": "6", "tool_call_id": "c1", "name": "multiply"},
        ),
        (ChatMessage(role="function", content="6"), {"role": "tool", "content": "6"}),
        # Tool calls are only read from assistant messages.
        (
            ChatMessage(role="user", content="u", additional_kwargs={"tool_calls": [TOOL_CALL]}),
            {"role": "user", "content": "u"},
        ),
    ],
)
def test_to_engine_message(message, expected):
    assert to_engine_message(message) == expected


def test_non_text_blocks_are_refused():
    message = ChatMessage(role="user", blocks=[ImageBlock(url="http://x/y.png")])
    with pytest.raises(InvalidRequestError, match="text only"):
        to_engine_message(message)


def test_tool_call_without_name_is_refused():
    message = ChatMessage(role="assistant", additional_kwargs={"tool_calls": [{"id": "x"}]})
    with pytest.raises(InvalidRequestError):
        message_tool_calls(message)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            TOOL_CALL,
            ToolSelection(tool_id="c1", tool_name="multiply", tool_kwargs={"a": 2, "b": 3}),
        ),
        (
            {"id": "c2", "function": {"name": "f", "arguments": ""}},
            ToolSelection(tool_id="c2", tool_name="f", tool_kwargs={}),
        ),
        (
            {"id": "c3", "function": {"name": "f", "arguments": "{not json"}},
            ToolSelection(tool_id="c3", tool_name="f", tool_kwargs={}),
        ),
        (
            {"id": "c4", "function": {"name": "f", "arguments": {"x": 1}}},
            ToolSelection(tool_id="c4", tool_name="f", tool_kwargs={"x": 1}),
        ),
    ],
)
def test_tool_selection(call, expected):
    assert tool_selection(call) == expected


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        (False, None),
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ("any", "required"),
        (True, "required"),
        ("multiply", "multiply"),
        ({"type": "function", "function": {"name": "multiply"}}, "multiply"),
        ({"name": "multiply"}, "multiply"),
    ],
)
def test_normalize_tool_choice(choice, expected):
    assert normalize_tool_choice(choice, ["multiply", "add"]) == expected


@pytest.mark.parametrize("choice", [3, {"type": "function"}, "", "divide"])
def test_normalize_tool_choice_refuses(choice):
    with pytest.raises(InvalidRequestError, match="tool_choice"):
        normalize_tool_choice(choice, ["multiply", "add"])


# ------------------------------------------------------------------------- function calling
TOOLS = [FunctionTool.from_defaults(fn=multiply), FunctionTool.from_defaults(fn=add)]


@both_modes
def test_chat_with_tools_parses_tool_calls():
    engine = ScriptedEngine(tool_script, adapter_names=ADAPTERS)
    llm = over(engine)
    response = llm.chat_with_tools(TOOLS, user_msg="What is 6 times 7?")
    assert response.message.content == ""
    (raw_call,) = response.message.additional_kwargs["tool_calls"]
    assert raw_call["type"] == "function"
    assert json.loads(raw_call["function"]["arguments"]) == {"a": 6, "b": 7}
    (selection,) = llm.get_tool_calls_from_response(response)
    assert selection.tool_name == "multiply" and selection.tool_kwargs == {"a": 6, "b": 7}
    assert selection.tool_id == raw_call["id"]
    # The tools reached the engine as OpenAI function schemas.
    tools = engine.calls[0]["tools"]
    assert [t["function"]["name"] for t in tools] == ["multiply", "add"]
    assert tools[0]["function"]["parameters"]["properties"].keys() == {"a", "b"}
    assert response.additional_kwargs[SELECTION_KEY]["adapters"]


@both_modes
def test_tool_call_with_text_before_it():
    def script(messages: Any, tools: Any) -> str:
        return "Let me compute. " + tool_call_text("add", {"a": 1, "b": 2})

    llm = make_llm(script)
    response = llm.chat_with_tools(TOOLS, user_msg="1 + 2?")
    assert response.message.content == "Let me compute."
    assert [t.tool_name for t in llm.get_tool_calls_from_response(response)] == ["add"]


@both_modes
def test_no_tool_call():
    llm = make_llm(["just text"])
    response = llm.chat_with_tools(TOOLS, user_msg="hi")
    assert response.message.content == "just text"
    assert "tool_calls" not in response.message.additional_kwargs
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="0 tool calls"):
        llm.get_tool_calls_from_response(response)


@both_modes
def test_parallel_tool_calls_kept_only_when_allowed():
    def script(messages: Any, tools: Any) -> str:
        return (
            tool_call_text("add", {"a": 1, "b": 2})
            + "\n"
            + tool_call_text("multiply", {"a": 3, "b": 4})
        )

    llm = make_llm(script)
    one = llm.chat_with_tools(TOOLS, user_msg="x")
    assert [t.tool_name for t in llm.get_tool_calls_from_response(one)] == ["add"]
    both = llm.chat_with_tools(TOOLS, user_msg="x", allow_parallel_tool_calls=True)
    assert [t.tool_name for t in llm.get_tool_calls_from_response(both)] == ["add", "multiply"]


@both_modes
@pytest.mark.parametrize(
    ("kwargs", "expected_prefix"),
    [
        ({}, ""),
        ({"tool_required": True}, '<tool_call>\n{"name": "'),
        ({"tool_choice": "add"}, '<tool_call>\n{"name": "add", "arguments": {"a": '),
        (
            {"tool_choice": {"type": "function", "function": {"name": "add"}}},
            '<tool_call>\n{"name": "add", "arguments": {"a": ',
        ),
    ],
)
def test_tool_choice_reaches_the_engine(kwargs, expected_prefix, monkeypatch):
    engine = ScriptedEngine(tool_script, adapter_names=ADAPTERS)
    prefixes: list[str] = []
    prepare = engine._prepare

    def spy(prompt: Any, tools: Any, tool_choice: Any) -> Any:
        request = prepare(prompt, tools, tool_choice)
        prefixes.append(request.response_prefix)
        return request

    monkeypatch.setattr(engine, "_prepare", spy)
    llm = over(engine, max_tokens=16)  # a set length: no prompt count first
    llm.chat_with_tools(TOOLS, user_msg="x", **kwargs)
    assert prefixes == [expected_prefix]


@both_modes
def test_tool_choice_none_sends_no_tools():
    engine = ScriptedEngine(tool_script, adapter_names=ADAPTERS)
    llm = over(engine)
    response = llm.chat_with_tools(TOOLS, user_msg="x", tool_choice="none")
    assert response.message.content == "no tools"


@both_modes
def test_tool_history_round_trips_to_the_engine():
    engine = ScriptedEngine(tool_script, adapter_names=ADAPTERS)
    llm = over(engine)
    first = llm.chat_with_tools(TOOLS, user_msg="6 times 7?")
    (call,) = llm.get_tool_calls_from_response(first)
    history = [
        ChatMessage(role="user", content="6 times 7?"),
        first.message,
        ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": call.tool_id}),
    ]
    second = llm.chat_with_tools(TOOLS, chat_history=history)
    assert second.message.content == "The result is 42."
    sent = engine.calls[1]["messages"]
    assert sent[1]["role"] == "assistant"
    assert sent[1]["tool_calls"][0]["function"]["name"] == "multiply"
    assert sent[2] == {"role": "tool", "content": "42", "tool_call_id": call.tool_id}


@both_modes
def test_stream_with_tools_does_not_leak_tool_call_text():
    def script(messages: Any, tools: Any) -> str:
        return "Let me compute. " + tool_call_text("add", {"a": 1, "b": 2})

    llm = make_llm(script)
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg="1 + 2?"))
    assert all("<tool" not in (c.delta or "") for c in chunks)
    assert all("<tool" not in (c.message.content or "") for c in chunks)
    assert "".join(c.delta for c in chunks) == "Let me compute. "
    final = chunks[-1]
    assert final.message.content == "Let me compute."
    assert [t.tool_name for t in llm.get_tool_calls_from_response(final)] == ["add"]
    # Intermediate chunks carry no tool calls (an agent reads every chunk).
    assert all(
        not llm.get_tool_calls_from_response(c, error_on_no_tool_call=False) for c in chunks[:-1]
    )


@both_modes
async def test_astream_with_forced_tool_call_yields_only_the_final_chunk():
    llm = make_llm(tool_script)
    stream = await llm.astream_chat_with_tools(TOOLS, user_msg="x", tool_required=True)
    chunks = await drain(stream)
    assert [c.delta for c in chunks] == [""]
    assert [t.tool_kwargs for t in llm.get_tool_calls_from_response(chunks[0])] == [
        {"a": 6, "b": 7}
    ]
    assert chunks[0].raw["usage"]["completion_tokens"] > 0


@both_modes
def test_stream_with_tools_but_no_call_streams_text():
    llm = make_llm(["plain answer here"])
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg="hi"))
    assert [c.delta for c in chunks] == ["plain ", "answer ", "here", ""]


@both_modes
def test_stream_with_tools_bare_json_answer_is_held_back():
    llm = make_llm(['{"name": "add", "arguments": {"a": 1, "b": 2}}'])
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg="x"))
    assert [c.delta for c in chunks] == [""]
    assert [t.tool_name for t in llm.get_tool_calls_from_response(chunks[0])] == ["add"]


@both_modes
def test_predict_and_call_runs_the_tool():
    llm = make_llm(tool_script)
    output = llm.predict_and_call(TOOLS, user_msg="6 times 7?")
    assert output.response == "42"


@both_modes
def test_structured_predict_through_a_forced_tool_call():
    from llama_index.core.bridge.pydantic import BaseModel
    from llama_index.core.prompts import PromptTemplate

    class Song(BaseModel):
        """A song."""

        title: str
        length_s: int

    def script(messages: Any, tools: Any) -> str:
        return tool_call_text(tools[0]["function"]["name"], {"title": "Hey", "length_s": 180})

    llm = make_llm(script)
    song = llm.structured_predict(Song, PromptTemplate("Write a song about {topic}"), topic="cats")
    assert song == Song(title="Hey", length_s=180)


# -------------------------------------------------------- broken calls, forced single tool
BROKEN = '<tool_call>\n{"name": "multiply", "argu'


@both_modes
def test_a_broken_tool_call_never_becomes_the_answer():
    llm = make_llm(lambda m, t: "Let me compute. " + BROKEN)
    response = llm.chat_with_tools(TOOLS, user_msg="6 times 7?")
    assert response.message.content == "Let me compute."  # no markup in the content
    assert "tool_calls" not in response.message.additional_kwargs
    (bad,) = response.additional_kwargs[INVALID_KEY]
    assert bad["name"] == "multiply" and bad["arguments"] == BROKEN
    assert "not valid JSON" in bad["error"]
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="does not parse: the tool call is not valid JSON"):
        llm.get_tool_calls_from_response(response)
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg="6 times 7?"))
    assert all("<tool" not in (c.delta or "") + (c.message.content or "") for c in chunks)
    assert chunks[-1].additional_kwargs[INVALID_KEY] == [bad]
    # Without tools the same text is just text.
    assert llm.chat(USER).message.content == "Let me compute. " + BROKEN


@both_modes
async def test_a_function_agent_does_not_answer_with_raw_markup():
    from llama_index.core.agent.workflow import FunctionAgent

    llm = make_llm(lambda m, t: "Let me compute. " + BROKEN if t else "no tools")
    agent = FunctionAgent(tools=[multiply], llm=llm)
    result = await agent.run(user_msg="What is 6 times 7?")
    assert str(result.response.content) == "Let me compute."


class InventsNames(ScriptedEngine):
    """A small model: asked for a tool call, it invents a tool name unless the engine forces it.

    A forced opening (name, brace, first parameter) is continued into a whole call.
    """

    def _decode(self, requests, selections, params, rows):
        forced = re.match(
            r'<tool_call>\n{"name": ("[^"]+"), "arguments": {', requests[0].response_prefix
        )
        name = json.loads(forced.group(1)) if forced else "song_tool"
        arguments = {"Song": {"title": "Hey", "length_s": 180}, "multiply": {"a": 6, "b": 7}}
        self._script = lambda m, t: tool_call_text(name, arguments.get(name, {}))
        return super()._decode(requests, selections, params, rows)


@both_modes
def test_one_tool_and_a_required_call_force_that_tool():
    from llama_index.core.bridge.pydantic import BaseModel
    from llama_index.core.prompts import PromptTemplate

    class Song(BaseModel):
        """A song."""

        title: str
        length_s: int

    llm = over(InventsNames(adapter_names=ADAPTERS))
    song = llm.structured_predict(Song, PromptTemplate("Write a song about {topic}"), topic="cats")
    assert song == Song(title="Hey", length_s=180)
    one = [FunctionTool.from_defaults(fn=multiply)]
    for kwargs in ({"tool_required": True}, {"tool_choice": "any"}, {"tool_choice": "required"}):
        response = llm.chat_with_tools(one, user_msg="x", **kwargs)
        assert [t.tool_name for t in llm.get_tool_calls_from_response(response)] == ["multiply"]
    free = llm.chat_with_tools(one, user_msg="x")  # the model names the tool itself
    assert [t.tool_name for t in llm.get_tool_calls_from_response(free)] == ["song_tool"]


@both_modes
def test_signal_per_call_and_as_a_field():
    llm = make_llm(["ok"])
    assert llm.complete("sql", signal="entropy").additional_kwargs[SELECTION_KEY]["signal"] == (
        "entropy"
    )
    assert make_llm(["ok"], signal="entropy", top_k=1).complete("sql").additional_kwargs[
        SELECTION_KEY
    ]["adapters"] == ["sql"]


@both_modes
def test_a_deep_copy_shares_the_engine():
    import copy

    llm = make_llm(["ok"], top_k=1)
    twin = copy.deepcopy(llm)
    if _SERVED:  # a RemoteEngine is a light HTTP client: a copy opens its own, to the same server
        assert twin.engine.base_url == llm.engine.base_url and twin.top_k == 1
    else:
        assert twin.engine is llm.engine and twin.top_k == 1
    assert twin.complete("x").text == "ok"


@pytest.mark.enable_socket
@pytest.mark.allow_hosts(["127.0.0.1"])
def test_remote_metadata_comes_from_the_server_and_survives_its_absence(serve, caplog):
    engine = ScriptedEngine(adapter_names=ADAPTERS, context_window=1234, model_name="served")
    meta = LoGoLLM(base_url=serve(engine)).metadata  # before any call: asked of the server
    assert (meta.context_window, meta.model_name, meta.is_chat_model) == (1234, "served", True)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with caplog.at_level(logging.WARNING):
        meta = LoGoLLM(base_url=dead, context_window=999).metadata
    assert meta.context_window == 999 and meta.model_name == dead
    assert "did not answer" in caplog.text

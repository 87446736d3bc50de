"""LoGoLLM on a tiny real model with real adapters (tests/tiny.py): the engine path end to end."""

from __future__ import annotations

import json
from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.callbacks import (
    CallbackManager,
    CBEventType,
    EventPayload,
    LlamaDebugHandler,
    TokenCountingHandler,
)
from llama_index.core.tools import FunctionTool
from remote import both_modes

from logo_integrations.llama_index import INVALID_KEY, SELECTION_KEY, LoGoLLM, record_selections

PROMPT = "abc dde fgh"
pytestmark = both_modes  # every test in-process and against a live `logo serve` of the engine
_SERVED: list[Any] = []


@pytest.fixture(autouse=True)
def _remote_mode(mode, serve):
    _SERVED[:] = [serve] if mode == "remote" else []
    yield
    _SERVED.clear()


def over(engine: Any, **kwargs: Any) -> LoGoLLM:
    """LoGoLLM over the engine: given in-process, or served (remote mode) with base_url=."""
    where = {"base_url": _SERVED[0](engine)} if _SERVED else {"engine": engine}
    return LoGoLLM(**where, **kwargs)


@pytest.fixture()
def llm(engine) -> LoGoLLM:
    # `engine` (conftest): the tiny llama with three random adapters a, b, c; top_k=3 by default.
    return over(engine, max_new_tokens=8, callback_manager=CallbackManager([]))


def test_metadata_from_the_model_config(llm, engine):
    meta = llm.metadata
    assert meta.context_window == engine.model.config.max_position_embeddings == 256
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name == "tiny-llama"
    assert llm.to_payload()["adapter_names"] == engine.adapter_names


def test_complete_equals_chat_equals_stream(llm, engine):
    completed = llm.complete(PROMPT)
    chatted = llm.chat([ChatMessage(role="user", content=PROMPT)])
    streamed = list(llm.stream_complete(PROMPT))
    chat_streamed = list(llm.stream_chat([ChatMessage(role="user", content=PROMPT)]))
    direct = engine.generate(PROMPT, max_new_tokens=8)
    assert completed.text == chatted.message.content == direct.text
    assert streamed[-1].text == "".join(c.delta for c in streamed) == direct.text
    assert chat_streamed[-1].message.content == direct.text
    # Repeats of one prompt reuse the engine's prefix caches: cached counts differ per call.
    cache_fields = {"probe_ms", "probe_cached_tokens"}
    selection = direct.selection.model_dump(mode="json", exclude=cache_fields)
    for response in (completed, chatted, streamed[-1], chat_streamed[-1]):
        got = dict(response.additional_kwargs[SELECTION_KEY])
        assert got.pop("probe_ms") >= 0
        got.pop("probe_cached_tokens")
        assert got == selection
        usage = dict(response.raw["usage"])
        usage.pop("prompt_tokens_details", None)
        assert usage == direct.usage.model_dump(mode="json", exclude={"cached_tokens"})
        json.dumps(response.raw)


async def test_async_forms(llm, engine):
    direct = engine.generate(PROMPT, max_new_tokens=8)
    assert (await llm.acomplete(PROMPT)).text == direct.text
    chat = await llm.achat([ChatMessage(role="user", content=PROMPT)])
    assert chat.message.content == direct.text
    chunks = [c async for c in await llm.astream_chat([ChatMessage(role="user", content=PROMPT)])]
    assert "".join(c.delta for c in chunks) == direct.text
    chunks = [c async for c in await llm.astream_complete(PROMPT)]
    assert chunks[-1].raw["usage"]["completion_tokens"] == direct.usage.completion_tokens


def test_pinned_mixture_and_base_model(llm, engine):
    pinned = llm.complete(PROMPT, adapters={"b": 1.0})
    assert pinned.additional_kwargs[SELECTION_KEY]["adapters"] == ["b"]
    assert pinned.text == engine.generate(PROMPT, max_new_tokens=8, adapters={"b": 1.0}).text
    base = llm.complete(PROMPT, adapters={})
    assert base.additional_kwargs[SELECTION_KEY]["adapters"] == []
    assert base.text == engine.generate(PROMPT, max_new_tokens=8, adapters={}).text


def test_one_event_selection_event_and_token_counts(engine):
    debug = LlamaDebugHandler()
    counter = TokenCountingHandler(tokenizer=lambda text: [])
    llm = over(engine, max_new_tokens=5, callback_manager=CallbackManager([debug, counter]))
    messages = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content=PROMPT),
    ]
    with record_selections() as recorder:
        response = llm.chat(messages, top_k=2)
    (pair,) = debug.get_event_pairs(CBEventType.LLM)
    assert pair[1].payload[EventPayload.RESPONSE] is response
    (event,) = recorder.events
    assert event.adapters == response.additional_kwargs[SELECTION_KEY]["adapters"]
    assert len(event.adapters) == 2 and set(event.scores) == {"a", "b", "c"}
    expected_prompt = engine.count_tokens(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    )
    assert counter.prompt_llm_token_count == expected_prompt
    assert counter.completion_llm_token_count == response.raw["usage"]["completion_tokens"] > 0


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@pytest.fixture()
def long_engine(tokenizer, adapter_dir):
    """The tiny engine with a 1024-token context (tool prompts are long in a 400-token vocab)."""
    import tiny

    from logo_engine import LoGoEngine

    model = tiny.tiny_model()
    model.config.max_position_embeddings = 1024
    eng = LoGoEngine(model, tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()


def test_tools_go_through_the_chat_template(long_engine):
    engine = long_engine
    llm = over(engine, max_new_tokens=8)
    tool = FunctionTool.from_defaults(fn=multiply)
    schema = tool.metadata.to_openai_tool()
    with_tools = engine.count_tokens(PROMPT, tools=[schema])
    # The tiny template has no `tools` variable: the engine lists tools in a system turn.
    assert with_tools > engine.count_tokens(PROMPT)
    response = llm.chat_with_tools([tool], user_msg=PROMPT, tool_choice="multiply")
    assert response.raw["usage"]["prompt_tokens"] > with_tools  # plus the forced call's opening
    # The random tiny model does not finish the forced call validly: it is an invalid call to the
    # forced tool (named by the forced opening), and none of its markup is the answer's content.
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    (bad,) = response.additional_kwargs[INVALID_KEY]
    assert bad["name"] == "multiply"
    assert bad["arguments"].startswith('<tool_call>\n{"name": "multiply", "arguments": ')
    assert response.message.content == ""
    with pytest.raises(ValueError, match="does not parse"):
        llm.get_tool_calls_from_response(response)


def test_tool_history_renders_on_the_real_template(long_engine):
    llm = over(long_engine, max_new_tokens=8)
    tool = FunctionTool.from_defaults(fn=multiply)
    history: list[Any] = [
        ChatMessage(role="user", content="6 times 7?"),
        ChatMessage(
            role="assistant",
            content="",
            additional_kwargs={
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "multiply", "arguments": '{"a": 6, "b": 7}'},
                    }
                ]
            },
        ),
        ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": "c1"}),
    ]
    response = llm.chat_with_tools([tool], chat_history=history)
    assert response.raw["usage"]["prompt_tokens"] > 0
    chunks = list(llm.stream_chat_with_tools([tool], chat_history=history))
    assert chunks and all("<tool_call>" not in (c.delta or "") for c in chunks)
    assert chunks[-1].message.content == response.message.content  # streamed = not streamed

"""Plain OpenAI integrations against `logo serve`: LangChain's ChatOpenAI, LlamaIndex's OpenAILike.

They know nothing of LoGo; they must still get answers, streams, tool calls and usage. The server
serves a scripted engine (tool-following answers), so the expected text is exact.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from logo_engine.serving.server import BackgroundServer
from logo_engine.testing import ScriptedEngine, tool_call_text

pytestmark = [pytest.mark.enable_socket, pytest.mark.allow_hosts(["127.0.0.1"])]

langchain_openai = pytest.importorskip("langchain_openai")
openai_like = pytest.importorskip("llama_index.llms.openai_like")

MODEL = "scripted-model"


def script(messages: list[dict[str, Any]], tools: Any) -> str:
    last = messages[-1]
    if last["role"] == "tool":
        return f"The weather is {last['content']}."
    if tools:
        return tool_call_text("get_weather", {"city": "Paris"})
    return f"You said: {last['content']}"


@pytest.fixture(scope="module")
def engine() -> ScriptedEngine:
    return ScriptedEngine(script, adapter_names=("math", "sql", "weather"))


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(engine) as srv:
        yield srv


def get_weather(city: str) -> str:
    """Weather in a city."""
    return "sunny"


# ----------------------------------------------------------------------------- LangChain
@pytest.fixture()
def chat_openai(server):
    return langchain_openai.ChatOpenAI(
        base_url=server.base_url, api_key="unused", model=MODEL, max_retries=0, temperature=0
    )


def test_chat_openai_invoke_and_usage(chat_openai):
    message = chat_openai.invoke("hello world")
    assert message.content == "You said: hello world"
    assert message.usage_metadata["output_tokens"] == 4  # scripted: one token per word
    assert message.response_metadata["finish_reason"] == "stop"


def test_chat_openai_stream(chat_openai):
    chunks = list(chat_openai.stream("one two three"))
    assert "".join(c.content for c in chunks) == "You said: one two three"
    assert len([c for c in chunks if c.content]) > 1


async def test_chat_openai_async(chat_openai):
    assert (await chat_openai.ainvoke("abc")).content == "You said: abc"
    chunks = [c async for c in chat_openai.astream("abc")]
    assert "".join(c.content for c in chunks) == "You said: abc"


def test_chat_openai_tool_calling_round_trip(chat_openai):
    llm = chat_openai.bind_tools([get_weather])
    first = llm.invoke("Weather in Paris?")
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    from langchain_core.messages import HumanMessage, ToolMessage

    final = llm.invoke(
        [
            HumanMessage("Weather in Paris?"),
            first,
            ToolMessage(content=get_weather(**call["args"]), tool_call_id=call["id"]),
        ]
    )
    assert final.content == "The weather is sunny."


def test_chat_openai_streamed_tool_call(chat_openai):
    llm = chat_openai.bind_tools([get_weather])
    message = None
    for chunk in llm.stream("Weather in Paris?"):
        message = chunk if message is None else message + chunk
    assert message is not None
    assert message.tool_calls[0]["args"] == {"city": "Paris"}


def test_chat_openai_pins_an_adapter_by_model_name(server, engine):
    llm = langchain_openai.ChatOpenAI(
        base_url=server.base_url, api_key="-", model=f"{MODEL}:sql", max_retries=0
    )
    llm.invoke("hi")
    assert engine.calls[-1]["selection"].adapters == ["sql"]


# ----------------------------------------------------------------------------- LlamaIndex
@pytest.fixture()
def like(server):
    return openai_like.OpenAILike(
        model=MODEL,
        api_base=server.base_url,
        api_key="unused",
        is_chat_model=True,
        is_function_calling_model=True,
        context_window=4096,
        max_retries=0,
        temperature=0,
    )


def test_openai_like_chat_complete_and_stream(like, server):
    from llama_index.core.llms import ChatMessage

    assert like.chat([ChatMessage(role="user", content="hi there")]).message.content == (
        "You said: hi there"
    )
    assert like.complete("abc").text == "You said: abc"
    deltas = [r.delta for r in like.stream_complete("x y z")]
    assert "".join(d or "" for d in deltas) == "You said: x y z"
    text_model = openai_like.OpenAILike(
        model=MODEL,
        api_base=server.base_url,
        api_key="-",
        is_chat_model=False,
        context_window=4096,
        max_retries=0,
        temperature=0,
    )
    assert text_model.complete("plain").text == "You said: plain"  # /v1/completions


async def test_openai_like_async(like):
    assert (await like.acomplete("abc")).text == "You said: abc"
    stream = await like.astream_complete("abc")
    assert "".join([r.delta or "" async for r in stream]) == "You said: abc"


def test_openai_like_function_calling(like):
    from llama_index.core.tools import FunctionTool

    tool = FunctionTool.from_defaults(fn=get_weather)
    response = like.chat_with_tools([tool], user_msg="Weather in Paris?")
    (selection,) = like.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert selection.tool_name == "get_weather" and selection.tool_kwargs == {"city": "Paris"}
    raw = response.message.additional_kwargs.get("tool_calls") or []
    assert json.loads(raw[0].function.arguments) == {"city": "Paris"}

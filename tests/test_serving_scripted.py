"""`logo serve` over a scripted engine: tool calls in OpenAI form, and clients that go away.

The scripted engine (logo_engine.testing) runs the real BaseEngine code path (routing, stop
strings, tool prompts and parsing) with scripted answers, so tool calls and step counts are exact.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from openai import OpenAI

from logo_engine.serving.app import ServeConfig
from logo_engine.serving.server import BackgroundServer
from logo_engine.testing import ScriptedEngine, tool_call_text

pytestmark = [pytest.mark.enable_socket, pytest.mark.allow_hosts(["127.0.0.1"])]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def script(messages: list[dict[str, Any]], tools: Any) -> str:
    if tools and messages[-1]["role"] != "tool":
        return "Let me check. " + tool_call_text("get_weather", {"city": "Paris"})
    if messages[-1]["role"] == "tool":
        return f"It is {messages[-1]['content']}."
    return " ".join(f"w{i}" for i in range(400))  # a long answer


class SlowEngine(ScriptedEngine):
    """Decodes one word per step, 10 ms a step, and counts the steps it ran."""

    def __init__(self) -> None:
        super().__init__(script, adapter_names=("math", "sql"))
        self.steps = 0

    def _decode(self, requests, selections, params, rows):
        for _ in super()._decode(requests, selections, params, rows):
            self.steps += 1
            time.sleep(0.01)
            yield


@pytest.fixture()
def engine() -> SlowEngine:
    return SlowEngine()


@pytest.fixture()
def server(engine):
    with BackgroundServer(engine, ServeConfig(batch_wait_ms=50)) as srv:
        yield srv


@pytest.fixture()
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="-", max_retries=0, timeout=30)


def cancelled_rows(server: BackgroundServer) -> float:
    return server.state.metrics.value("logo_cancelled_rows_total")


def wait_for(condition: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


# ------------------------------------------------------------------------------ tools
def test_tool_calls_come_back_in_openai_form(client):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    response = client.chat.completions.create(
        model="scripted-model", messages=messages, tools=[WEATHER], max_tokens=64
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    # The tool result goes back in OpenAI form and reaches the template.
    followup = client.chat.completions.create(
        model="scripted-model",
        messages=[
            *messages,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
        tools=[WEATHER],
        max_tokens=64,
    )
    assert followup.choices[0].message.content == "It is sunny."
    assert followup.choices[0].finish_reason == "stop"


def test_streamed_tool_calls_hide_the_markup(client):
    chunks = list(
        client.chat.completions.create(
            model="scripted-model",
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER],
            max_tokens=64,
            stream=True,
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "<tool_call>" not in content and content.strip() == "Let me check."
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_forces_a_named_tool(client, engine):
    client.chat.completions.create(
        model="scripted-model",
        messages=[{"role": "user", "content": "hi"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
    )
    assert engine.calls[-1]["tools"][0]["function"]["name"] == "get_weather"


# ---------------------------------------------------------------- clients that go away
def test_a_closed_stream_stops_its_row(server, engine):
    body = {
        "model": "scripted-model",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 400,
        "stream": True,
    }
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    assert wait_for(lambda: cancelled_rows(server) == 1)
    steps = engine.steps
    time.sleep(0.2)
    assert engine.steps == steps < 100  # decoding stopped well before 400 words


def test_a_client_that_times_out_stops_its_row(server, engine):
    body = {
        "model": "scripted-model",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 400,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/chat/completions", json=body, timeout=0.3)
    assert wait_for(lambda: cancelled_rows(server) == 1)
    steps = engine.steps
    time.sleep(0.2)
    assert engine.steps == steps < 100


def test_a_cancelled_row_leaves_the_other_rows_of_its_batch_alone(engine):
    with BackgroundServer(engine, ServeConfig(batch_wait_ms=2000)) as server:  # both join
        client = OpenAI(base_url=server.base_url, api_key="-", max_retries=0)
        _cancel_one_of_two(server, client)


def _cancel_one_of_two(server: BackgroundServer, client: OpenAI) -> None:
    results: dict[str, Any] = {}

    def full() -> None:
        results["full"] = client.chat.completions.create(
            model="scripted-model", messages=[{"role": "user", "content": "go"}], max_tokens=150
        )

    thread = threading.Thread(target=full)
    thread.start()
    body = {
        "model": "scripted-model",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 400,
        "stream": True,
    }
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body) as response:
        next(response.iter_lines())
    thread.join(30)
    text = results["full"].choices[0].message.content
    assert text == "".join(f"w{i} " for i in range(150))  # scripted words keep their space
    assert results["full"].choices[0].finish_reason == "length"
    assert wait_for(lambda: cancelled_rows(server) == 1)
    metrics = server.state.metrics
    assert metrics.value("logo_batch_size_sum") == 2  # they shared one batch
    assert metrics.value("logo_batch_size_count") == 1

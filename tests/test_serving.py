"""`logo serve` on a tiny real model: the official openai client against a live local server.

Oracle: the same engine called in-process (greedy decoding is deterministic), so every answer,
selection and token count the server returns must equal ``engine.generate``/``engine.route``.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import tiny
from openai import OpenAI

from logo_engine import LoGoEngine, RoutingConfig, Selection
from logo_engine.serving.app import ServeConfig
from logo_engine.serving.server import BackgroundServer

pytestmark = [pytest.mark.enable_socket, pytest.mark.allow_hosts(["127.0.0.1"])]

PROMPTS = [p for t in tiny.TASKS.values() for p in t.prompts(3, seed=7)]  # 9 prompts


@pytest.fixture(scope="module")
def engine(tokenizer, adapter_dir):
    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(engine, ServeConfig(max_batch_size=8, batch_wait_ms=200)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def selection_of(response: Any) -> Selection:
    return Selection.model_validate(response.model_extra["logo"]["selection"])


def metric(server: BackgroundServer, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


# --------------------------------------------------------------------------------- basics
def test_models_lists_the_routed_model_and_one_entry_per_adapter(client, engine):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-llama"] + [f"tiny-llama:{a}" for a in engine.adapter_names]


def test_chat_completion_equals_the_in_process_answer(client, engine, server):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=messages, max_tokens=12
    )
    response = raw.parse()
    expected = engine.generate(messages, max_new_tokens=12)
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.usage.prompt_tokens
    assert response.usage.completion_tokens == expected.usage.completion_tokens
    got = selection_of(response)
    assert got.adapters == expected.selection.adapters
    assert got.weights == pytest.approx(expected.selection.weights, abs=1e-6)
    timing = {"probe_ms", "probe_cached_tokens", "weights", "scores"}  # cache state differs
    assert got.model_dump(exclude=timing) == (expected.selection.model_dump(exclude=timing))
    header = ",".join(f"{n}={w:.4f}" for n, w in zip(got.adapters, got.weights, strict=True))
    assert raw.headers["x-logo-adapters"] == header


def test_completion_equals_generate_on_a_string(client, engine):
    response = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=10)
    expected = engine.generate(PROMPTS[1], max_new_tokens=10)
    assert response.choices[0].text == expected.text
    assert selection_of(response).adapters == expected.selection.adapters


def test_completion_with_several_prompts_answers_each(client, engine):
    response = client.completions.create(model="tiny-llama", prompt=PROMPTS[:3], max_tokens=6)
    assert [c.index for c in response.choices] == [0, 1, 2]
    for choice, prompt, sel in zip(
        response.choices, PROMPTS[:3], response.model_extra["logo"]["selections"], strict=True
    ):
        expected = engine.generate(prompt, max_new_tokens=6)
        assert choice.text == expected.text
        assert sel["adapters"] == expected.selection.adapters


def test_stream_concatenates_to_the_answer_with_the_selection_first(client, engine):
    messages = [{"role": "user", "content": PROMPTS[2]}]
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama",
            messages=messages,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    expected = engine.generate(messages, max_new_tokens=12)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert selection_of(chunks[0]).adapters == expected.selection.adapters
    assert all("logo" not in (c.model_extra or {}) for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == expected.finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        expected.usage.completion_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_ends_with_done(server):
    body = {"model": "tiny-llama", "prompt": PROMPTS[0], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.base_url + "/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-logo-adapters"]
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["logo"]["selection"]["adapters"]


def test_pinning_by_model_name_and_by_the_logo_field(client, engine):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    pinned = client.chat.completions.create(model="tiny-llama:b", messages=messages, max_tokens=8)
    expected = engine.generate(messages, max_new_tokens=8, adapters={"b": 1.0})
    assert pinned.choices[0].message.content == expected.text
    assert selection_of(pinned).pinned and selection_of(pinned).adapters == ["b"]
    # the same pin in both places (a client that routed first, then sends its selection)
    again = client.chat.completions.create(
        model="tiny-llama:b",
        messages=messages,
        max_tokens=8,
        extra_body={"logo": {"adapters": {"b": 1.0}}},
    )
    assert again.choices[0].message.content == expected.text
    assert selection_of(again).mixture == {"b": 1.0}

    mixture = {"a": 0.75, "c": 0.25}
    mixed = client.chat.completions.create(
        model="tiny-llama",
        messages=messages,
        max_tokens=8,
        extra_body={"logo": {"adapters": mixture}},
    )
    expected = engine.generate(messages, max_new_tokens=8, adapters=mixture)
    assert mixed.choices[0].message.content == expected.text
    assert selection_of(mixed).mixture == pytest.approx(mixture)

    base = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=8, extra_body={"logo": {"adapters": {}}}
    )
    assert (
        base.choices[0].message.content
        == engine.generate(messages, max_new_tokens=8, adapters={}).text
    )
    assert selection_of(base).adapters == []


def test_routing_override(client, engine):
    messages = [{"role": "user", "content": PROMPTS[4]}]
    response = client.chat.completions.create(
        model="tiny-llama",
        messages=messages,
        max_tokens=8,
        extra_body={"logo": {"routing": {"top_k": 1, "signal": "entropy"}}},
    )
    expected = engine.generate(
        messages, max_new_tokens=8, routing=RoutingConfig(top_k=1, signal="entropy")
    )
    assert selection_of(response).adapters == expected.selection.adapters
    assert selection_of(response).signal == "entropy"
    assert response.choices[0].message.content == expected.text


def test_route_and_count_tokens_endpoints(server, engine):
    response = httpx.post(server.base_url + "/logo/route", json={"prompt": PROMPTS[3]})
    expected = engine.route(PROMPTS[3])
    assert response.json()["selection"]["adapters"] == expected.adapters
    batch = httpx.post(server.base_url + "/logo/route", json={"prompts": PROMPTS[:4]}).json()
    assert [s["adapters"] for s in batch["selections"]] == [
        s.adapters for s in engine.route_batch(PROMPTS[:4])
    ]
    messages = [{"role": "user", "content": PROMPTS[5]}]
    counted = httpx.post(server.base_url + "/logo/count_tokens", json={"messages": messages})
    assert counted.json() == {"tokens": engine.count_tokens(messages)}


def test_health_and_info(server, engine):
    assert httpx.get(server.url + "/healthz").json() == {
        "status": "ok",
        "model": "tiny-llama",
        "adapters": 3,
    }
    info = httpx.get(server.base_url + "/logo/info").json()
    assert info["adapters"] == engine.adapter_names
    assert info["context_window"] == engine.context_window
    assert info["routing"]["top_k"] == engine.routing.top_k
    assert info["chat_template"] is True


# ---------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_equal_their_solo_results(client, engine, server):
    before_batches = metric(server, "logo_batch_size_count")
    before_rows = metric(server, "logo_batch_size_sum")
    before_joined = metric(server, "logo_joined_rows_total")
    # Different lengths and stop strings in one batch: each row keeps its own.
    jobs = [
        dict(prompt=p, max_tokens=4 + i, stop=["o"] if i % 3 == 0 else None)
        for i, p in enumerate(PROMPTS[:8])
    ]

    def call(job: dict[str, Any]) -> Any:
        return client.completions.create(model="tiny-llama", **job)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, jobs))
    for job, response in zip(jobs, responses, strict=True):
        expected = engine.generate(
            job["prompt"], max_new_tokens=job["max_tokens"], stop=job["stop"]
        )
        assert response.choices[0].text == expected.text
        assert response.choices[0].finish_reason == expected.finish_reason
        assert response.usage.completion_tokens == expected.usage.completion_tokens
        assert selection_of(response).adapters == expected.selection.adapters
    batches = metric(server, "logo_batch_size_count") - before_batches
    rows = metric(server, "logo_batch_size_sum") - before_rows
    joined = metric(server, "logo_joined_rows_total") - before_joined
    assert rows + joined == 8  # each request started a batch's rows or joined a running batch
    assert batches < 8  # some requests shared a batch (the 200 ms window makes it all, usually)


def test_concurrent_streams_are_delivered_row_by_row(client, engine):
    def stream(prompt: str) -> tuple[str, int]:
        chunks = list(
            client.chat.completions.create(
                model="tiny-llama",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=10,
                stream=True,
            )
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), len(chunks)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(stream, PROMPTS[:4]))
    for prompt, (text, n_chunks) in zip(PROMPTS[:4], results, strict=True):
        expected = engine.generate([{"role": "user", "content": prompt}], max_new_tokens=10)
        assert text == expected.text
        assert n_chunks > 3  # role chunk, several text chunks, finish chunk


def test_selections_per_adapter_are_counted(server, client):
    before = sum(
        metric(server, "logo_adapter_selections_total", adapter=a)
        for a in ("a", "b", "c", "(base)")
    )
    client.completions.create(model="tiny-llama:c", prompt=PROMPTS[0], max_tokens=2)
    after = sum(
        metric(server, "logo_adapter_selections_total", adapter=a)
        for a in ("a", "b", "c", "(base)")
    )
    assert after == before + 1
    assert metric(server, "logo_pinned_requests_total") >= 1


# -------------------------------------------------------------------------- errors
def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": "abc"}], **extra}


BAD_REQUESTS = [
    ("unknown model", _chat(model="gpt-4"), 404, "model_not_found"),
    ("unknown adapter", _chat(model="tiny-llama:nope"), 404, "adapter_not_found"),
    ("unknown mixture adapter", _chat(logo={"adapters": {"nope": 1}}), 404, "adapter_not_found"),
    (
        "pin twice",
        _chat(model="tiny-llama:b", logo={"adapters": {"a": 1}}),
        400,
        "invalid_request",
    ),
    (
        "pin twice, zero weight",
        _chat(model="tiny-llama:b", logo={"adapters": {"b": 0}}),
        400,
        "invalid_request",
    ),
    ("negative weight", _chat(logo={"adapters": {"b": -1}}), 400, "invalid_request"),
    ("bad temperature", _chat(temperature=-0.5), 400, "invalid_request"),
    ("bad top_p", _chat(top_p=0), 400, "invalid_request"),
    ("bad max_tokens", _chat(max_tokens=0), 400, "invalid_request"),
    ("n > 1", _chat(n=2), 400, "invalid_request"),
    ("logprobs", _chat(logprobs=True), 400, "invalid_request"),
    ("json mode", _chat(response_format={"type": "json_object"}), 400, "invalid_request"),
    ("no messages", _chat(messages=[]), 400, "invalid_request"),
    ("missing messages", {"model": "tiny-llama"}, 400, "invalid_request"),
    ("bad role", _chat(messages=[{"role": "robot", "content": "x"}]), 400, "invalid_request"),
    (
        "image part",
        _chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ]
        ),
        400,
        "invalid_request",
    ),
    ("empty stop", _chat(stop=[""]), 400, "invalid_request"),
    (
        "bad tool choice",
        _chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function"},
        ),
        400,
        "invalid_request",
    ),
    ("unknown routing field", _chat(logo={"routing": {"topk": 1}}), 400, "invalid_routing"),
    ("top_k too large", _chat(logo={"routing": {"top_k": 9}}), 400, "invalid_routing"),
    ("bad signal", _chat(logo={"routing": {"signal": "magic"}}), 400, "invalid_routing"),
    ("too long", _chat(max_tokens=5000), 413, "context_length_exceeded"),
    (
        "too long prompt",
        _chat(messages=[{"role": "user", "content": "ab " * 400}]),
        413,
        "context_length_exceeded",
    ),
    ("stream: unknown model", _chat(model="gpt-4", stream=True), 404, "model_not_found"),
    ("stream: too long", _chat(max_tokens=5000, stream=True), 413, "context_length_exceeded"),
]


@pytest.mark.parametrize(
    ("body", "status", "code"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_their_status_and_an_openai_error(server, body, status, code):
    response = httpx.post(server.base_url + "/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]


def test_the_openai_client_raises_its_own_error_classes(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-llama", messages=[], max_tokens=2)


def test_malformed_json_body_and_unknown_routes(server):
    bad = httpx.post(
        server.base_url + "/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.get(server.base_url + "/nope")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = httpx.get(server.base_url + "/chat/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_request_body_size_is_bounded(engine):
    config = ServeConfig(max_body_bytes=2000)
    with BackgroundServer(engine, config) as srv:
        big = _chat(messages=[{"role": "user", "content": "a" * 5000}])
        response = httpx.post(srv.base_url + "/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        def chunked():  # no content-length: counted while reading
            yield json.dumps(big).encode()

        response = httpx.post(
            srv.base_url + "/chat/completions",
            content=chunked(),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 413
        ok = httpx.post(srv.base_url + "/chat/completions", json=_chat(max_tokens=2))
        assert ok.status_code == 200


def test_api_key_is_enforced(engine):
    with BackgroundServer(engine, ServeConfig(api_key="s3cret")) as srv:
        url = srv.base_url + "/chat/completions"
        missing = httpx.post(url, json=_chat(max_tokens=2))
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        wrong = httpx.post(url, json=_chat(max_tokens=2), headers={"authorization": "Bearer no"})
        assert wrong.status_code == 401
        assert httpx.get(srv.base_url + "/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0).models.list()
        good = OpenAI(base_url=srv.base_url, api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(**_chat(max_tokens=2)).choices
        assert httpx.get(srv.url + "/healthz").status_code == 200  # probes need no key


def test_503_while_the_model_loads(engine):
    release = threading.Event()

    def loader() -> LoGoEngine:
        release.wait(30)
        return engine

    with BackgroundServer(loader) as srv:
        health = httpx.get(srv.url + "/healthz")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        response = httpx.post(srv.base_url + "/chat/completions", json=_chat(max_tokens=2))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_loading"
        release.set()
        for _ in range(300):  # bounded: 3 s
            if httpx.get(srv.url + "/healthz").status_code == 200:
                break
            time.sleep(0.01)
        assert (
            httpx.post(srv.base_url + "/chat/completions", json=_chat(max_tokens=2)).status_code
            == 200
        )


def test_a_failed_load_is_reported():
    def loader() -> LoGoEngine:
        raise OSError("no such model")

    errors: list[BaseException] = []
    with BackgroundServer(loader, on_load_error=errors.append) as srv:
        for _ in range(300):
            if errors:
                break
            time.sleep(0.01)
        health = httpx.get(srv.url + "/healthz").json()
        assert health["status"] == "failed" and "no such model" in health["error"]
        response = httpx.post(srv.base_url + "/chat/completions", json=_chat())
        assert (
            response.status_code == 503 and "no such model" in response.json()["error"]["message"]
        )

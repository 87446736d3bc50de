"""RemoteEngine against a live `logo serve`: the same answers and selections as the engine itself.

Oracle: the served engine, called in-process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time

import pytest
import tiny

from logo_engine import (
    AdapterNotFoundError,
    AuthenticationError,
    ContextLengthError,
    InvalidRequestError,
    LoGoEngine,
    ModelNotFoundError,
    RemoteError,
    RoutingConfig,
    RoutingConfigError,
)
from logo_engine.client import RemoteEngine
from logo_engine.serving.app import ServeConfig
from logo_engine.serving.server import BackgroundServer
from logo_engine.testing import ScriptedEngine, tool_call_text

pytestmark = [pytest.mark.enable_socket, pytest.mark.allow_hosts(["127.0.0.1"])]

PROMPTS = [p for t in tiny.TASKS.values() for p in t.prompts(2, seed=11)]  # 6 prompts
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[0]}]


@pytest.fixture(scope="module")
def engine(tokenizer, adapter_dir):
    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(engine, ServeConfig(batch_wait_ms=20)) as srv:
        yield srv


@pytest.fixture(scope="module")
def remote(server):
    eng = RemoteEngine(server.base_url)
    yield eng
    eng.close()


def same(remote_gen, local_gen) -> None:
    assert remote_gen.text == local_gen.text
    assert remote_gen.finish_reason == local_gen.finish_reason
    # the prefill caches of the two engines hold different histories: cached_tokens may differ
    assert remote_gen.usage.model_dump(exclude={"cached_tokens"}) == local_gen.usage.model_dump(
        exclude={"cached_tokens"}
    )
    assert remote_gen.selection.adapters == local_gen.selection.adapters
    assert remote_gen.selection.weights == pytest.approx(local_gen.selection.weights, abs=1e-6)
    assert remote_gen.selection.pinned == local_gen.selection.pinned


def test_server_facts(remote, engine):
    assert remote.adapter_names == engine.adapter_names
    assert remote.model_name == "tiny-llama"
    assert remote.context_window == engine.context_window
    assert remote.routing == engine.routing
    assert remote.chat_template is True


@pytest.mark.parametrize("prompt", [PROMPTS[1], CHAT], ids=["string", "messages"])
def test_generate_equals_in_process(remote, engine, prompt):
    same(remote.generate(prompt, max_new_tokens=10), engine.generate(prompt, max_new_tokens=10))


def test_generate_options_travel(remote, engine):
    kwargs = dict(max_new_tokens=12, stop=["a"], routing=RoutingConfig(top_k=1))
    same(remote.generate(PROMPTS[2], **kwargs), engine.generate(PROMPTS[2], **kwargs))
    for adapters in ({"b": 1.0}, {"a": 2, "c": 1}, {}):
        same(
            remote.generate(PROMPTS[3], max_new_tokens=6, adapters=adapters),
            engine.generate(PROMPTS[3], max_new_tokens=6, adapters=adapters),
        )
    sampled = dict(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    same(remote.generate(PROMPTS[0], **sampled), engine.generate(PROMPTS[0], **sampled))


def test_generate_batch_rows_equal_their_solo_results(remote, engine):
    mixtures = [None, {"b": 1.0}, None, {}, None, {"c": 1.0}]
    got = remote.generate_batch(PROMPTS, max_new_tokens=8, adapters=mixtures)
    for prompt, mixture, g in zip(PROMPTS, mixtures, got, strict=True):
        same(g, engine.generate(prompt, max_new_tokens=8, adapters=mixture))


def test_route_and_count_tokens(remote, engine):
    for got, want in zip(remote.route_batch(PROMPTS), engine.route_batch(PROMPTS), strict=True):
        assert got.adapters == want.adapters
        assert got.scores == pytest.approx(want.scores, rel=1e-5)
    assert remote.route(CHAT).adapters == engine.route(CHAT).adapters
    assert remote.count_tokens(CHAT) == engine.count_tokens(CHAT)
    assert remote.count_tokens(PROMPTS[0]) == engine.count_tokens(PROMPTS[0])


def test_routing_fields_of_the_selection_travel(remote, engine):
    # abstention (with its reason) and the routing signal/weighting come back as the engine
    # computes them; raw and ranking scores too
    for routing in (
        RoutingConfig(abstain_below=1e9),
        RoutingConfig(top_k=2, weighting="softmax", temperature=0.5),
        RoutingConfig(signal="entropy", weighting="uniform"),
    ):
        got, want = (
            remote.route(PROMPTS[4], routing=routing),
            engine.route(PROMPTS[4], routing=routing),
        )
        _close(got, want)
        g = remote.generate(PROMPTS[4], max_new_tokens=4, routing=routing)
        _close(
            g.selection, engine.generate(PROMPTS[4], max_new_tokens=4, routing=routing).selection
        )
    assert remote.route(PROMPTS[4], routing=RoutingConfig(abstain_below=1e9)).abstained


def _close(got, want) -> None:
    """Every Selection field equal (floats to 1e-5; probe time is the server's own)."""
    a, b = got.model_dump(exclude={"probe_ms"}), want.model_dump(exclude={"probe_ms"})
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], dict):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        elif isinstance(a[key], list) and a[key] and isinstance(a[key][0], float):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        else:
            assert a[key] == b[key], key


class _FullSelections(ScriptedEngine):
    """Routes to selections with every field set (as calibration and a vLLM backend set them)."""

    def _route(self, requests, routing):
        return [
            s.model_copy(
                update={
                    "rank_scores": {n: -0.5 + i for i, n in enumerate(self.adapter_names)},
                    "served_weights": [0.75, 0.25][: len(s.adapters)],
                    "calibrated": True,
                    "abstained": False,
                    "reason": "dropped 'code': ranking score below abstain_below",
                }
            )
            for s in super()._route(requests, routing)
        ]


def test_every_selection_field_survives_the_json_round_trip():
    local = _FullSelections(adapter_names=("math", "sql", "code"), routing=RoutingConfig(top_k=2))
    with BackgroundServer(local) as srv:
        remote = RemoteEngine(srv.base_url)
        prompt = "sql sql math"
        want = local.route(prompt)
        assert want.served_weights == [0.75, 0.25] and want.rank_scores and want.reason
        routed = remote.route(prompt)
        assert routed == want.model_copy(update={"probe_ms": routed.probe_ms})
        for got in (remote.generate(prompt).selection, remote.stream(prompt).selection):
            assert got.model_dump(exclude={"probe_ms"}) == want.model_dump(exclude={"probe_ms"})
            assert got.served_mixture == {"sql": 0.75, "math": 0.25}
        remote.close()


def test_stream_has_the_selection_before_the_first_chunk(remote, engine):
    stream = remote.stream(CHAT, max_new_tokens=10)
    local = engine.generate(CHAT, max_new_tokens=10)
    assert stream.selection.adapters == local.selection.adapters
    chunks = list(stream)
    assert len(chunks) > 1 and "".join(chunks) == local.text
    same(stream.generation, local)


def test_a_closed_stream_frees_its_row_on_the_server(remote, server):
    def cancelled() -> float:
        return server.state.metrics.value("logo_cancelled_rows_total")

    before = cancelled()
    stream = remote.stream(PROMPTS[0], max_new_tokens=200)
    next(stream)
    stream.close()
    deadline = time.monotonic() + 5
    while cancelled() == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cancelled() == before + 1


async def test_async_forms_equal_in_process(remote, engine):
    same(await remote.agenerate(CHAT, max_new_tokens=9), engine.generate(CHAT, max_new_tokens=9))
    got = await remote.agenerate_batch(PROMPTS[:3], max_new_tokens=5, adapters=[{}, None, None])
    want = engine.generate_batch(PROMPTS[:3], max_new_tokens=5, adapters=[{}, None, None])
    for g, w in zip(got, want, strict=True):
        same(g, w)
    assert (await remote.aroute(PROMPTS[4])).adapters == engine.route(PROMPTS[4]).adapters
    stream = remote.astream(PROMPTS[5], max_new_tokens=7)
    assert stream.selection is None
    selection = await stream.aselection()
    chunks = [c async for c in stream]
    local = engine.generate(PROMPTS[5], max_new_tokens=7)
    assert selection.adapters == local.selection.adapters
    assert "".join(chunks) == local.text
    same(stream.generation, local)


async def test_concurrent_async_calls_share_batches(remote, engine, server):
    def rows() -> tuple[float, float, float]:  # rows that started a batch, batches, rows joined
        metrics = server.state.metrics
        return (
            metrics.value("logo_batch_size_sum"),
            metrics.value("logo_batch_size_count"),
            metrics.value("logo_joined_rows_total"),
        )

    started, batches, joined = rows()
    got = await asyncio.gather(*(remote.agenerate(p, max_new_tokens=6) for p in PROMPTS))
    for prompt, g in zip(PROMPTS, got, strict=True):
        same(g, engine.generate(prompt, max_new_tokens=6))
    started2, batches2, joined2 = rows()
    assert (started2 - started) + (joined2 - joined) == len(PROMPTS)  # each row served once
    assert batches2 - batches < len(PROMPTS)  # some shared a batch (started it or joined it)


def test_errors_come_back_as_logo_errors(remote):
    with pytest.raises(AdapterNotFoundError):
        remote.generate("abc", adapters={"nope": 1.0})
    with pytest.raises(AdapterNotFoundError):
        remote.stream("abc", adapters={"nope": 1.0})
    with pytest.raises(ContextLengthError):
        remote.generate("abc", max_new_tokens=10_000)
    with pytest.raises(RoutingConfigError):
        remote.generate("abc", routing=RoutingConfig(top_k=9))
    with pytest.raises(InvalidRequestError):
        remote.generate("abc", temperature=-1)  # refused before any request
    with pytest.raises(InvalidRequestError):
        remote.generate("")
    with pytest.raises(InvalidRequestError):
        remote.generate("abc", routing=RoutingConfig(signal=lambda o: o.sum(-1)))


async def test_async_errors(remote):
    with pytest.raises(AdapterNotFoundError):
        await remote.agenerate("abc", adapters={"nope": 1.0})
    stream = remote.astream("abc", adapters={"nope": 1.0})
    with pytest.raises(AdapterNotFoundError):
        await stream.aselection()


def test_wrong_model_key_and_dead_server(server):
    with pytest.raises(ModelNotFoundError):
        RemoteEngine(server.base_url, model="gpt-4").generate("abc")
    with pytest.raises(RemoteError):
        RemoteEngine("http://127.0.0.1:9", max_retries=0).generate("abc")


def test_api_key(engine):
    with BackgroundServer(engine, ServeConfig(api_key="k3y")) as srv:
        with pytest.raises(AuthenticationError):
            RemoteEngine(srv.base_url, api_key="bad").generate("abc")
        assert RemoteEngine(srv.base_url, api_key="k3y").generate("abc", max_new_tokens=2).text


def test_tool_calls_come_back_as_tool_calls():
    def script(messages, tools):
        return "Sure. " + tool_call_text("add", {"a": 1, "b": 2}) if tools else "plain"

    local = ScriptedEngine(script, adapter_names=("math", "sql"))
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                },
            },
        }
    ]
    with BackgroundServer(local) as srv:
        remote = RemoteEngine(srv.base_url)
        for how in ("generate", "stream"):
            if how == "generate":
                got = remote.generate("add 1 and 2", tools=tools)
            else:
                stream = remote.stream("add 1 and 2", tools=tools)
                # the engine surface streams the raw text, as a local engine does (the
                # integrations hide the markup)
                local_text = "".join(local.stream("add 1 and 2", tools=tools))
                assert "".join(stream) == local_text
                got = stream.generation
            (call,) = got.tool_calls
            assert (call.name, call.arguments) == ("add", {"a": 1, "b": 2})
            assert got.content == "Sure."  # the content around the call
            assert got.text == local.generate("add 1 and 2", tools=tools).text  # raw, as local
        assert remote.generate("hi").text == "plain"


def test_the_client_imports_no_torch(server):
    code = textwrap.dedent(f"""
        import json, sys
        from logo_engine.client import RemoteEngine
        from logo_engine import RemoteEngine as Exported
        engine = RemoteEngine({server.base_url!r})
        out = engine.generate("abc", max_new_tokens=3)
        for chunk in engine.stream("abc", max_new_tokens=3):
            pass
        heavy = sorted(m for m in ("torch", "transformers", "peft", "fastapi", "uvicorn")
                       if m in sys.modules)
        print(json.dumps({{"heavy": heavy, "text": out.text, "same": Exported is RemoteEngine}}))
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"heavy": [], "text": report["text"], "same": True}


def test_the_remote_integrations_import_no_torch():
    """ChatLoGo(base_url=) and LoGoLLM(base_url=) calls load no torch (nor the server stack)."""
    with BackgroundServer(ScriptedEngine(adapter_names=("math", "sql"))) as srv:
        code = textwrap.dedent(f"""
            import json, sys
            from logo_integrations.langchain import ChatLoGo
            from logo_integrations.llama_index import LoGoLLM
            chat = ChatLoGo(base_url={srv.base_url!r})
            message = chat.invoke("sql math")
            list(chat.stream("sql"))
            response = LoGoLLM(base_url={srv.base_url!r}).complete("sql")
            heavy = sorted(m for m in ("torch", "transformers", "peft", "fastapi", "uvicorn")
                           if m in sys.modules)
            print(json.dumps({{
                "heavy": heavy,
                "langchain": message.response_metadata["logo_selection"]["adapters"],
                "llama_index": response.additional_kwargs["logo_selection"]["adapters"],
            }}))
        """)
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
        )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert sorted(report["langchain"]) == ["math", "sql"] and report["llama_index"][0] == "sql"

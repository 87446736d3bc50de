"""The vLLM backend against a fake vLLM (tests/fake_vllm.py) that records calls and really
generates with peft: request translation, cache hits, evictions, unloads, rank errors, and
outputs equal to the engine's own decode loop."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import fake_vllm
import pytest
import tiny

from logo_engine import InvalidRequestError, LoGoEngine
from logo_engine.backends import GenerationBackend, make_backend
from logo_engine.backends.vllm import VLLMBackend, required_max_lora_rank
from logo_engine.errors import MixtureRankError

PROMPTS = ["abc def gh", "0123 456 78", "+- */ <>=", "hello world"]


@pytest.fixture()
def fake(monkeypatch):
    return fake_vllm.install(monkeypatch)


@pytest.fixture()
def reference(tokenizer, adapter_dir):
    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()


def same(got, want):
    """Generations equal except the probe's wall time and what came from the prefix caches."""
    if isinstance(got, list):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want, strict=True))
    ignore = {"selection": {"probe_ms", "probe_cached_tokens"}, "usage": {"cached_tokens"}}
    return got.model_dump(exclude=ignore) == want.model_dump(exclude=ignore)


def _vllm_engine(tokenizer, adapter_dir, tmp_path, *, max_lora_rank=32, max_loras=2, **options):
    llm = fake_vllm.LLM(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras)
    backend = VLLMBackend(llm, cache_dir=tmp_path / "cats", **options)
    eng = LoGoEngine(
        tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama", backend=backend
    )
    return eng, llm.llm_engine


@pytest.fixture()
def vengine(fake, tokenizer, adapter_dir, tmp_path):
    eng, _ = _vllm_engine(tokenizer, adapter_dir, tmp_path)
    yield eng
    eng.close()


def test_outputs_equal_the_engine_decode_loop(vengine, reference):
    mixtures = [None, {"a": 0.6, "b": 0.4}, {"c": 1.0}, {}]
    for prompt in PROMPTS:
        want = reference.generate(prompt, max_new_tokens=10)
        got = vengine.generate(prompt, max_new_tokens=10)
        assert same(got, want)  # text, selection, usage, finish reason
    want = reference.generate_batch(PROMPTS, max_new_tokens=10, adapters=mixtures)
    got = vengine.generate_batch(PROMPTS, max_new_tokens=10, adapters=mixtures)
    assert same(got, want)
    stream = vengine.stream(PROMPTS[0], max_new_tokens=10)
    timing = {"probe_ms": 0, "probe_cached_tokens": 0}
    assert stream.selection.model_copy(update=timing) == want[0].selection.model_copy(update=timing)
    assert "".join(stream) == want[0].text
    assert same(stream.generation, want[0])


async def test_async_paths(vengine, reference):
    want = reference.generate(PROMPTS[1], max_new_tokens=8)
    assert same(await vengine.agenerate(PROMPTS[1], max_new_tokens=8), want)
    chunks = [c async for c in vengine.astream(PROMPTS[1], max_new_tokens=8)]
    assert "".join(chunks) == want.text
    batch = await vengine.agenerate_batch(PROMPTS[:2], max_new_tokens=8)
    assert [g.text for g in batch] == [want.text if i == 1 else g.text for i, g in enumerate(batch)]


def test_request_translation(fake, tokenizer, adapter_dir, tmp_path):
    eng, fe = _vllm_engine(tokenizer, adapter_dir, tmp_path)
    eng.generate_batch(
        ["abc", "012", "xyz"],
        max_new_tokens=5,
        temperature=0.7,
        top_p=0.9,
        seed=11,
        adapters=[{"a": 0.5, "b": 0.5}, {"b": 2.0}, {}],
    )
    adds = fe.names("add_request")
    assert len(adds) == 3
    for (_rid, prompt, params, _), text in zip(adds, ["abc", "012", "xyz"], strict=True):
        assert prompt == {
            "type": "token",
            "prompt_token_ids": eng._prepare(text, None, None).input_ids,
        }
        assert params.kwargs == {
            "n": 1,
            "max_tokens": 5,
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": 11,
            "stop_token_ids": [tokenizer.convert_tokens_to_ids("<|im_end|>")],
            "detokenize": False,
        }
    cat, single, base = (a[3] for a in adds)
    assert Path(cat.lora_path).parent == tmp_path / "cats" and cat.lora_name.startswith("logo-cat-")
    mixture = json.loads((Path(cat.lora_path) / "logo_mixture.json").read_text())
    assert mixture == {"adapters": ["a", "b"], "weights": [0.5, 0.5]}
    assert Path(single.lora_path) == adapter_dir / "b"  # k = 1: the original folder
    assert base is None
    assert [r.lora_int_id for r in fe.names("add_lora")] == [cat.lora_int_id, single.lora_int_id]
    assert fe.names("remove_lora") == []
    eng.close()  # the LLM is the caller's: the backend unloads what it loaded
    assert sorted(fe.names("remove_lora")) == sorted([cat.lora_int_id, single.lora_int_id])


def test_cache_hits_evictions_and_unloads(fake, tokenizer, adapter_dir, tmp_path):
    eng, fe = _vllm_engine(tokenizer, adapter_dir, tmp_path, max_cached_adapters=2)
    m1, m2, m3 = (
        {"a": 0.5, "b": 0.5},
        {"a": 0.3, "c": 0.7},
        {"b": 0.2, "c": 0.8},
    )
    eng.generate("abc", adapters=m1, max_new_tokens=2)
    eng.generate("abc", adapters=m1, max_new_tokens=2)  # hit: no second load
    ids = [r.lora_int_id for r in fe.names("add_lora")]
    assert len(ids) == 1 and eng.backend.cache.stats.hits == 1
    first_path = Path(fe.names("add_request")[0][3].lora_path)
    eng.generate("abc", adapters=m2, max_new_tokens=2)
    assert first_path.is_dir()
    eng.generate("abc", adapters=m3, max_new_tokens=2)  # 3 entries > 2: m1 (LRU) is evicted
    assert fe.names("remove_lora") == [ids[0]]
    assert not first_path.exists()
    assert eng.backend.cache.stats.evictions == 1 and eng.backend.cache.stats.entries == 2
    eng.generate("abc", adapters=m1, max_new_tokens=2)  # written and loaded again, a new id
    new = fe.names("add_request")[-1][3]
    assert new.lora_int_id not in ids and Path(new.lora_path) == first_path
    assert len(list((tmp_path / "cats").iterdir())) == 2
    eng.close()
    assert (tmp_path / "cats").is_dir()  # a given directory is kept


def test_entries_in_use_are_not_evicted(fake, tokenizer, adapter_dir, tmp_path):
    eng, fe = _vllm_engine(tokenizer, adapter_dir, tmp_path, max_cached_adapters=1)
    stream = eng.stream("abc", adapters={"a": 0.5, "b": 0.5}, max_new_tokens=30)
    next(stream)  # running: its adapter is in use
    first = fe.names("add_request")[0][3]
    in_use = Path(first.lora_path)
    eng.generate("abc", adapters={"a": 0.5, "c": 0.5}, max_new_tokens=2)
    second = fe.names("add_request")[1][3]
    # over the bound of 1: the entry in use stays, the finished one goes once released
    assert in_use.is_dir() and not Path(second.lora_path).exists()
    assert fe.names("remove_lora") == [second.lora_int_id]
    stream.close()  # aborted in vLLM, released: now the first entry can go too
    assert fe.names("abort_request")[-1] == [fe.names("add_request")[0][0]]
    eng.generate("abc", adapters={"b": 0.5, "c": 0.5}, max_new_tokens=2)
    assert not in_use.exists()
    assert fe.names("remove_lora")[:2] == [second.lora_int_id, first.lora_int_id]
    eng.close()


def test_rank_limit_is_a_clear_error(fake, tokenizer, adapter_dir, tmp_path):
    eng, fe = _vllm_engine(tokenizer, adapter_dir, tmp_path, max_lora_rank=8)
    eng.generate("abc", adapters={"a": 0.5, "c": 0.5}, max_new_tokens=2)  # 4 + 2
    with pytest.raises(MixtureRankError, match=r"rank 12 .*max_lora_rank=8.*max_lora_rank=16"):
        eng.generate("abc", adapters={"a": 1, "b": 1}, max_new_tokens=2)  # 4 + 8
    stream = eng.stream("abc", max_new_tokens=2)  # routed top_k=3: 14 > 8 before any token
    with pytest.raises(MixtureRankError):
        next(stream)
    assert len(fe.names("add_request")) == 1
    eng.close()


def test_weight_grid_serves_rounded_weights(fake, tokenizer, adapter_dir, tmp_path, reference):
    eng, fe = _vllm_engine(tokenizer, adapter_dir, tmp_path, weight_grid=0.25)
    out = eng.generate("abc", adapters={"a": 0.62, "b": 0.38}, max_new_tokens=6)
    assert out.selection.weights == pytest.approx([0.62, 0.38])
    assert out.selection.served_weights == [0.5, 0.5]
    assert out.selection.served_mixture == {"a": 0.5, "b": 0.5}
    path = Path(fe.names("add_request")[0][3].lora_path)
    assert json.loads((path / "logo_mixture.json").read_text())["weights"] == [0.5, 0.5]
    assert out.text == reference.generate("abc", adapters={"a": 1, "b": 1}, max_new_tokens=6).text
    eng.generate("abc", adapters={"a": 0.55, "b": 0.45}, max_new_tokens=6)
    assert eng.backend.cache.stats.hits == 1 and len(fe.names("add_lora")) == 1
    eng.close()


def test_stop_strings_abort_the_request(vengine, reference):
    full = reference.generate(PROMPTS[0], max_new_tokens=12, adapters={"a": 1.0})
    stop = full.text[2:4]
    assert stop
    want = reference.generate(PROMPTS[0], max_new_tokens=12, adapters={"a": 1.0}, stop=stop)
    got = vengine.generate(PROMPTS[0], max_new_tokens=12, adapters={"a": 1.0}, stop=stop)
    assert same(got, want) and got.finish_reason == "stop"
    fe = vengine.backend.llm.llm_engine
    assert fe.names("abort_request") and not fe.requests


def test_more_mixtures_than_max_loras_and_threads(
    fake, tokenizer, adapter_dir, tmp_path, reference
):
    eng, fe = _vllm_engine(tokenizer, adapter_dir, tmp_path, max_loras=1)
    mixtures = [
        {"a": 1.0},
        {"b": 1.0},
        {"c": 1.0},
        {"a": 0.5, "b": 0.5},
    ]
    want = reference.generate_batch(PROMPTS, max_new_tokens=6, adapters=mixtures)
    assert same(eng.generate_batch(PROMPTS, max_new_tokens=6, adapters=mixtures), want)
    results: dict[int, object] = {}

    def call(i: int) -> None:
        results[i] = eng.generate(PROMPTS[i], max_new_tokens=6, adapters=mixtures[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert same([results[i] for i in range(4)], want)
    assert not fe.requests
    eng.close()


def test_building_the_llm(fake, tokenizer, adapter_dir, tmp_path):
    model = tiny.tiny_model()
    model.save_pretrained(tmp_path / "base")
    model = type(model).from_pretrained(tmp_path / "base")  # config._name_or_path: the folder
    eng = LoGoEngine(
        model,
        tokenizer,
        adapters=adapter_dir,
        backend="vllm",
        backend_options={"llm_options": {"enforce_eager": True}, "max_loras": 3},
    )
    (llm,) = fake_vllm.LLM.instances
    assert llm.kwargs == {
        "model": str(tmp_path / "base"),
        "tokenizer": str(tmp_path / "base"),
        "enable_lora": True,
        "max_lora_rank": 16,  # top_k=3 adapters of ranks 4, 8, 2: 14, rounded up
        "max_loras": 3,
        "max_cpu_loras": 32,
        "dtype": "float32",
        "enforce_eager": True,
    }
    assert eng.backend.max_lora_rank == 16
    cache_dir = eng.backend.cache.directory
    assert cache_dir.is_dir()
    eng.close()
    assert not cache_dir.exists()  # the default directory is the backend's own


def test_backend_argument_errors(fake, tokenizer, adapter_dir):
    with pytest.raises(InvalidRequestError, match="backend must be one of"):
        make_backend("tgi")
    with pytest.raises(InvalidRequestError, match="no backend_options"):
        make_backend("transformers", {"x": 1})
    assert make_backend(None) is None and make_backend("transformers") is None
    with pytest.raises(InvalidRequestError, match="max_lora_rank must be one of"):
        VLLMBackend(max_lora_rank=24)
    with pytest.raises(InvalidRequestError, match="weight_grid"):
        VLLMBackend(weight_grid=2.0)
    with pytest.raises(InvalidRequestError, match="enable_lora=True"):
        LoGoEngine(
            tiny.tiny_model(), tokenizer, adapters=adapter_dir, backend=VLLMBackend(fake_vllm.LLM())
        )
    model = tiny.tiny_model()
    with pytest.raises(InvalidRequestError, match="HF folder"):
        LoGoEngine(model, tokenizer, adapters=adapter_dir, backend="vllm")
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
    with pytest.raises(InvalidRequestError, match="GGUF"):
        LoGoEngine.from_pretrained("x", gguf_file="m.gguf", backend="vllm")


def test_required_max_lora_rank(reference):
    assert required_max_lora_rank(reference.library, 1) == 8  # b: 8
    assert required_max_lora_rank(reference.library, 2) == 16  # b + a: 12
    assert required_max_lora_rank(reference.library, 3) == 16  # b + a + c: 14


def test_a_custom_backend_object(tokenizer, adapter_dir, reference):
    """Any GenerationBackend plugs in: here one that answers with the selection's adapters."""

    class Echo(GenerationBackend):
        def decode(self, requests, selections, params, rows):
            for row, sel in zip(rows, selections, strict=True):
                row.push(",".join(sel.adapters) or "base", n_tokens=1)
                row.finish("stop")
            yield

    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, backend=Echo())
    out = eng.generate("abc", adapters={"b": 1.0})
    assert out.text == "b" and out.finish_reason == "stop"
    assert eng.generate("abc").selection.adapters == reference.route("abc").adapters
    assert asyncio.run(eng.agenerate("abc", adapters={})).text == "base"


def test_chatlogo_and_logollm_on_a_vllm_backed_engine(vengine, reference):
    """The integrations take any engine: a vLLM-backed one answers as the reference does."""
    from langchain_core.messages import HumanMessage
    from llama_index.core.base.llms.types import ChatMessage

    from logo_integrations.langchain import ChatLoGo
    from logo_integrations.llama_index import SELECTION_KEY, LoGoLLM

    want = reference.generate(PROMPTS[0], max_new_tokens=8, adapters={"a": 0.7, "b": 0.3})
    pinned = {"a": 0.7, "b": 0.3}
    chat = ChatLoGo(engine=vengine, max_tokens=8, mixture=pinned)
    msg = chat.invoke([HumanMessage(PROMPTS[0])])
    assert msg.content == want.text
    assert msg.response_metadata["logo_selection"]["adapters"] == ["a", "b"]
    assert "".join(c.content for c in chat.stream([HumanMessage(PROMPTS[0])])) == want.text
    llm = LoGoLLM(engine=vengine, max_new_tokens=8, mixture=pinned)
    done = llm.chat([ChatMessage(role="user", content=PROMPTS[0])])
    assert done.message.content == want.text
    assert done.additional_kwargs[SELECTION_KEY]["weights"] == [0.7, 0.3]
    fe = vengine.backend.llm.llm_engine
    assert len(fe.names("add_lora")) == 1  # one cat adapter served all four calls


# ------------------------------------------------------------------ logo serve --backend vllm
def test_backend_option_flags_translate_to_backend_options():
    from logo_engine.cli import backend_options
    from logo_engine.errors import LoGoError

    flags = [
        "max_loras=3",
        "llm_options.enforce_eager=true",
        "llm_options.gpu_memory_utilization=0.5",
        "cache_dir=/tmp/x y",
        'llm_options.extra={"a": [1, 2]}',
        "base_url=http://127.0.0.1:8000",
        "weight_grid=null",
    ]
    assert backend_options(flags) == {
        "max_loras": 3,
        "llm_options": {
            "enforce_eager": True,
            "gpu_memory_utilization": 0.5,
            "extra": {"a": [1, 2]},
        },
        "cache_dir": "/tmp/x y",
        "base_url": "http://127.0.0.1:8000",
        "weight_grid": None,
    }
    assert backend_options(None) == {}
    for bad in (["max_loras"], ["=3"], ["a..b=1"], ["a=1", "a.b=2"], ["a.b=2", "a=1"]):
        with pytest.raises(LoGoError, match="--backend-option"):
            backend_options(bad)


def test_logo_serve_backend_vllm_builds_the_engine_with_those_options(
    fake, tokenizer, adapter_dir, tmp_path, monkeypatch, reference
):
    import logo_engine.serving.server as server_module
    from logo_engine.cli import main

    base = tmp_path / "base"
    tiny.tiny_model().save_pretrained(base)
    tokenizer.save_pretrained(base)
    served = {}

    def serve(load, config, *, host, port, log_level):  # the server, minus uvicorn
        served["engine"] = load()
        return 0

    monkeypatch.setattr(server_module, "serve", serve)
    flags = [
        "--backend-option",
        "max_loras=3",
        "--backend-option",
        "llm_options.enforce_eager=true",
    ]
    flags += ["--backend-option", f"cache_dir={tmp_path / 'cats'}"]
    common = ["--base-model", str(base), "--adapters", str(adapter_dir)]
    assert main(["serve", *common, "--backend", "vllm", *flags]) == 0
    (llm,) = fake_vllm.LLM.instances
    assert llm.kwargs["max_loras"] == 3 and llm.kwargs["enforce_eager"] is True
    assert llm.kwargs["model"] == str(base) and llm.kwargs["enable_lora"] is True
    eng = served["engine"]
    assert isinstance(eng.backend, VLLMBackend) and eng.backend.cache.directory == tmp_path / "cats"
    for prompt in PROMPTS[:2]:  # generated by the (fake) vLLM: equal to the engine's own loop
        assert same(
            eng.generate(prompt, max_new_tokens=8), reference.generate(prompt, max_new_tokens=8)
        )
    eng.close()


def test_logo_serve_backend_flag_errors(capsys, monkeypatch):
    import logo_engine.serving.server as server_module
    from logo_engine.cli import main

    monkeypatch.setattr(server_module, "serve", lambda *a, **k: pytest.fail("must not start"))
    assert main(["serve", "--backend-option", "max_loras=3"]) == 2  # transformers: no options
    assert "--backend vllm" in capsys.readouterr().err
    assert main(["serve", "--backend", "vllm", "--backend-option", "max_loras"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--backend", "tgi"])
    assert "invalid choice" in capsys.readouterr().err


def test_probe_cache_applies_and_prefill_cache_does_not(vengine, reference):
    """vLLM prefills on its own: the engine's probe cache still serves, its prefill cache not."""
    first = [{"role": "user", "content": PROMPTS[0]}]
    answer = vengine.generate(first, max_new_tokens=6)
    reply = {"role": "assistant", "content": answer.text}
    second = [*first, reply, {"role": "user", "content": "x"}]
    got = vengine.generate(second, max_new_tokens=6)
    want = reference.generate(second, max_new_tokens=6)
    assert got.text == want.text
    assert got.selection.adapters == want.selection.adapters
    assert got.selection.probe_cached_tokens > 0  # the first turn's probe KV was reused
    assert got.usage.cached_tokens == 0  # nothing prefilled from the engine's cache
    assert vengine.prefix_cache_stats()["prefill"].entries == 0

"""VLLMServerBackend against a fake vLLM OpenAI server (httpx.MockTransport, tests/fake_vllm.py):
runtime LoRA loading and unloading, request bodies, outputs equal to the engine's own."""

from __future__ import annotations

import fake_vllm
import httpx
import pytest
import tiny
from test_vllm_backend import PROMPTS, same

from logo_engine import LoGoEngine
from logo_engine.backends import make_backend
from logo_engine.backends.vllm import VLLMServerBackend
from logo_engine.errors import GenerationError, MixtureRankError


@pytest.fixture()
def reference(tokenizer, adapter_dir):
    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()


def _engine(tokenizer, adapter_dir, tmp_path, server, **options):
    client = httpx.Client(transport=httpx.MockTransport(server.handler), base_url="http://vllm")
    backend = make_backend(
        "vllm",
        {"base_url": "http://vllm", "client": client, "cache_dir": tmp_path / "cats", **options},
    )
    assert isinstance(backend, VLLMServerBackend)
    return LoGoEngine(
        tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama", backend=backend
    )


def test_outputs_and_requests(tokenizer, adapter_dir, tmp_path, reference):
    server = fake_vllm.FakeServer()
    eng = _engine(tokenizer, adapter_dir, tmp_path, server, max_lora_rank=16)
    assert eng.backend.model == "tiny-base"  # the first model without a parent
    mixtures = [None, {"a": 0.6, "b": 0.4}, {"c": 1.0}, {}]
    want = reference.generate_batch(PROMPTS, max_new_tokens=8, adapters=mixtures)
    assert same(eng.generate_batch(PROMPTS, max_new_tokens=8, adapters=mixtures), want)
    stream = eng.stream(PROMPTS[0], max_new_tokens=8)
    assert "".join(stream) == want[0].text
    cache = eng.backend.cache
    with (
        cache.use(eng.library, {"a": 0.6, "b": 0.4}) as cat,
        cache.use(eng.library, {"c": 1.0}) as c,
    ):
        assert cat.name.startswith("logo-cat-") and c.original and c.name.startswith("c@")
    loads = server.bodies("/v1/load_lora_adapter")
    assert {"lora_name": cat.name, "lora_path": str(tmp_path / "cats" / f"cat-{cat.key}")} in loads
    assert {"lora_name": c.name, "lora_path": str(adapter_dir / "c")} in loads  # k = 1: original
    bodies = server.bodies("/v1/completions")
    assert [b["model"] for b in bodies[1:4]] == [cat.name, c.name, "tiny-base"]
    body = bodies[3]  # the base-only row
    assert body == {
        "model": "tiny-base",
        "prompt": eng._prepare(PROMPTS[3], None, None).input_ids,
        "max_tokens": 8,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop_token_ids": [tokenizer.convert_tokens_to_ids("<|im_end|>")],
        "stream": True,
        "return_token_ids": True,
    }
    eng.close()


def test_eviction_unloads_and_seed(tokenizer, adapter_dir, tmp_path):
    server = fake_vllm.FakeServer()
    eng = _engine(tokenizer, adapter_dir, tmp_path, server, max_cached_adapters=1)
    eng.generate("abc", adapters={"a": 0.5, "b": 0.5}, max_new_tokens=2, temperature=0.5, seed=3)
    first = server.bodies("/v1/load_lora_adapter")[0]["lora_name"]
    assert server.bodies("/v1/completions")[0]["seed"] == 3
    eng.generate("abc", adapters={"a": 0.5, "c": 0.5}, max_new_tokens=2)
    assert server.bodies("/v1/unload_lora_adapter") == [{"lora_name": first}]
    assert first not in server.loras
    eng.close()  # the server forgets the adapters this backend loaded
    assert server.loras == {}


def test_server_errors_are_clear(tokenizer, adapter_dir, tmp_path):
    server = fake_vllm.FakeServer(max_lora_rank=8)
    eng = _engine(tokenizer, adapter_dir, tmp_path, server, max_lora_rank=8)
    with pytest.raises(MixtureRankError, match="max_lora_rank=16"):  # caught before the server
        eng.generate("abc", adapters={"a": 0.5, "b": 0.5})
    eng.close()
    # the backend told 16, the server runs 8: the server's refusal comes back as a LoGo error
    eng = _engine(tokenizer, adapter_dir, tmp_path, server, max_lora_rank=16)
    with pytest.raises(GenerationError, match="greater than max_lora_rank"):
        eng.generate("abc", adapters={"a": 0.5, "b": 0.5})
    assert eng.generate("abc", adapters={"a": 0.5, "c": 0.5}, max_new_tokens=2).text is not None
    eng.close()

    def down(request):
        raise httpx.ConnectError("connection refused")

    client = httpx.Client(transport=httpx.MockTransport(down), base_url="http://vllm")
    with pytest.raises(GenerationError, match="cannot reach the vLLM server"):
        LoGoEngine(
            tiny.tiny_model(),
            tokenizer,
            adapters=adapter_dir,
            backend=VLLMServerBackend("http://vllm", client=client),
        )

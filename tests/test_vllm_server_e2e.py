"""End to end with a real vLLM OpenAI server (``pytest -m vllm``; skipped without vLLM).

Starts ``vllm.entrypoints.openai.api_server`` on the embedded default model with LoRA and runtime
adapter loading on, then routes zoo prompts with LoGo and generates through
:class:`~logo_engine.backends.vllm.VLLMServerBackend`: greedy output must equal ``LoGoEngine``'s.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.enable_socket, pytest.mark.timeout(1800)]

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from test_vllm_e2e import LLM_OPTIONS, MAX_NEW_TOKENS, _prompts, _same  # noqa: E402

from logo_engine import LoGoEngine  # noqa: E402
from logo_engine.models import default_model_dir  # noqa: E402

START_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(default_model_dir()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--gpu-memory-utilization",
        str(LLM_OPTIONS["gpu_memory_utilization"]),
        "--kv-cache-memory-bytes",
        str(LLM_OPTIONS["kv_cache_memory_bytes"]),
        "--max-model-len",
        str(LLM_OPTIONS["max_model_len"]),
        "--enable-lora",
        "--max-lora-rank",
        "32",
        "--max-loras",
        "4",
        "--max-cpu-loras",
        "16",
    ]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server did not start in {START_TIMEOUT_S} s")
            time.sleep(2)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def engines(server, tmp_path_factory):
    reference = LoGoEngine.from_pretrained(progress=False)
    served = LoGoEngine.from_pretrained(
        progress=False,
        backend="vllm",
        backend_options={
            "base_url": server,
            "max_lora_rank": 32,
            "cache_dir": tmp_path_factory.mktemp("cats"),
        },
    )
    yield reference, served
    served.close()
    reference.close()


def test_server_generation_equals_the_engine(engines):
    reference, served = engines
    prompts = _prompts()
    want = reference.generate_batch(prompts, max_new_tokens=MAX_NEW_TOKENS)
    got = served.generate_batch(prompts, max_new_tokens=MAX_NEW_TOKENS)
    for g, w in zip(got, want, strict=True):
        _same(g, w)
    assert sum(len(w.selection.adapters) > 1 for w in want) >= 1
    prompt = prompts[0]
    for adapters in ({"arithmetic": 1.0}, {}, {"sql": 0.7, "capital": 0.3}):
        expected = reference.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, adapters=adapters)
        _same(served.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, adapters=adapters), expected)
    stream = served.stream(prompt, max_new_tokens=MAX_NEW_TOKENS)
    assert "".join(stream) == want[0].text
    listed = httpx.get(f"{served.backend.base_url}/v1/models").json()["data"]
    assert any(m["id"].startswith("logo-cat-") for m in listed)  # loaded at runtime

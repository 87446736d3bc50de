"""`logo serve` on the embedded SmolLM2-135M-Instruct and the shipped zoo (``pytest -m slow``).

A live server on 127.0.0.1 and the official openai client; the oracle is the same engine called
in-process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.enable_socket, pytest.mark.allow_hosts(["127.0.0.1"])]

tasks = pytest.importorskip("benchmarks.zoo.tasks")
openai = pytest.importorskip("openai")

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def zoo_engine():
    from logo_engine import LoGoEngine

    return LoGoEngine.from_pretrained(progress=False)


@pytest.fixture(scope="module")
def server(zoo_engine):
    from logo_engine.serving.app import ServeConfig
    from logo_engine.serving.server import BackgroundServer

    with BackgroundServer(zoo_engine, ServeConfig(batch_wait_ms=100)) as srv:
        yield srv


def questions() -> list[str]:
    return [tasks.TASKS[t].make_split("test", 1, seed=9)[0].prompt for t in tasks.LIBRARY_TASKS]


def test_completions_streams_and_selection_on_the_real_model(server, zoo_engine):
    client = openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0, timeout=300)
    assert client.models.list().data[0].id == MODEL
    question = "Convert 7 km to metres."
    messages = [{"role": "user", "content": question}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
    expected = zoo_engine.generate(messages, max_new_tokens=24)
    assert response.choices[0].message.content == expected.text
    selection = response.model_extra["logo"]["selection"]
    assert selection["adapters"] == expected.selection.adapters
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, stream=True)
    )
    assert chunks[0].model_extra["logo"]["selection"]["adapters"] == expected.selection.adapters
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    pinned = client.chat.completions.create(model=f"{MODEL}:sql", messages=messages, max_tokens=8)
    assert pinned.model_extra["logo"]["selection"]["adapters"] == ["sql"]


def test_concurrent_requests_equal_their_solo_results_on_the_real_model(server, zoo_engine):
    client = openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0, timeout=300)
    before = server.state.metrics.value("logo_batch_size_count")
    prompts = questions()[:8]

    def ask(prompt: str):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=16
        )

    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(ask, prompts))
    for prompt, response in zip(prompts, responses, strict=True):
        expected = zoo_engine.generate([{"role": "user", "content": prompt}], max_new_tokens=16)
        assert response.choices[0].message.content == expected.text
        assert response.model_extra["logo"]["selection"]["adapters"] == (
            expected.selection.adapters
        )
    assert server.state.metrics.value("logo_batch_size_count") - before < len(prompts)


def test_logo_serve_command_starts_and_answers(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "logo_engine.cli",
            "serve",
            "--port",
            str(port),
            "--api-key",
            "k",
            "--log-level",
            "warning",
        ],
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # bounded: 5 minutes
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "logo serve exited"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=300)
        response = client.completions.create(model=MODEL, prompt="Sort 3, 1, 2", max_tokens=8)
        assert response.model_extra["logo"]["selection"]["adapters"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(30)

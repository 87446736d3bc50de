"""Ray Serve: a 2-replica local deployment answers concurrent requests exactly (run with -m ray).

Needs the [ray] extra (CI installs it in its own venv); skipped where ray is not importable. The
oracle is the same tiny model and adapters loaded in-process: each answer must equal its solo
greedy result, selection included.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import tiny

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
OpenAI = pytest.importorskip("openai").OpenAI

from logo_engine import LoGoEngine  # noqa: E402
from logo_engine.serving.ray import build_app  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.enable_socket, pytest.mark.timeout(900)]

PROMPTS = [p for t in tiny.TASKS.values() for p in t.prompts(4, seed=5)]  # 12 prompts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("ray") / "tiny-llama"
    tiny.tiny_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def deployment(model_dir, adapter_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            {
                "base_model": str(model_dir),
                "adapters": str(adapter_dir),
                "served_model_name": "tiny-llama",
                "num_replicas": 2,
                "ray_actor_options": {"num_cpus": 1},
                "max_batch_size": 8,
                "batch_wait_ms": 50,
            }
        )
        serve.run(app, name="logo", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_concurrent_requests_exactly(deployment, model_dir, adapter_dir):
    status = serve.status().applications["logo"]
    (info,) = status.deployments.values()
    assert info.replica_states.get("RUNNING") == 2

    client = OpenAI(base_url=deployment + "/v1", api_key="-", max_retries=0, timeout=300)
    assert client.models.list().data[0].id == "tiny-llama"

    def ask(prompt: str):
        return client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": prompt}], max_tokens=8
        )

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(ask, PROMPTS))

    local = LoGoEngine.from_pretrained(model_dir, adapters=adapter_dir)
    for prompt, response in zip(PROMPTS, responses, strict=True):
        expected = local.generate([{"role": "user", "content": prompt}], max_new_tokens=8)
        assert response.choices[0].message.content == expected.text
        selection = response.model_extra["logo"]["selection"]
        assert selection["adapters"] == expected.selection.adapters
        assert selection["weights"] == pytest.approx(expected.selection.weights, abs=1e-6)
        assert response.usage.completion_tokens == expected.usage.completion_tokens

    # A stream through the proxy, and the replicas' own batch metrics.
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=8,
            stream=True,
        )
    )
    assert chunks[0].model_extra["logo"]["selection"]["adapters"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == local.generate([{"role": "user", "content": PROMPTS[0]}], max_new_tokens=8).text
    batched = 0.0
    for _ in range(10):  # each scrape lands on one replica
        for line in httpx.get(deployment + "/metrics").text.splitlines():
            if line.startswith("logo_batch_size_sum "):
                batched = max(batched, float(line.split()[-1]))
    assert batched >= 2  # a replica decoded several requests in one batch at least once


def test_the_documented_config_file_is_valid():
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(__file__).parent.parent / "examples/ray_serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "logo_engine.serving.ray:build_app"
    app = build_app(application["args"])  # builds the deployment graph, starts nothing
    assert app is not None
    with pytest.raises(ValueError, match="unknown build_app arguments"):
        build_app({"num_replica": 2})
    strings = build_app({"num_replicas": "2", "max_batch_size": "4", "base_model": "/m"})
    assert strings is not None  # serve run passes key=value arguments as strings
    assert build_app({"dtype": "bfloat16", "probe_dtype": "bfloat16"}) is not None
    with pytest.raises(ValueError, match="probe_dtype must be one of"):
        build_app({"probe_dtype": "int8"})
    assert build_app({"probe_compile": "true"}) is not None  # serve run passes strings
    with pytest.raises(ValueError, match="probe_compile must be true or false"):
        build_app({"probe_compile": "yes"})


def test_a_replica_takes_dtype_and_probe_dtype(model_dir, adapter_dir):
    """The deployment's own class, in this process (no Ray): the engine it builds."""
    import torch

    from logo_engine.serving.ray import LoGoDeployment

    # Ray Serve's ingress wraps the class (its __init__ then needs a replica); the MRO holds ours.
    ours = LoGoDeployment.func_or_class.__mro__[1]
    assert ours.__module__ == "logo_engine.serving.ray"
    replica = ours.__new__(ours)
    ours.__init__(
        replica, base_model=str(model_dir), adapters=str(adapter_dir), probe_dtype="bfloat16"
    )
    try:
        assert replica.engine.probe_dtype == torch.bfloat16
        assert next(replica.engine.model.parameters()).dtype == torch.float32
        assert replica.engine.probe_compile is False
    finally:
        replica.engine.close()
    ours.__init__(replica, base_model=str(model_dir), adapters=str(adapter_dir), probe_compile=True)
    try:
        assert replica.engine.probe_compile is True
    finally:
        replica.engine.close()

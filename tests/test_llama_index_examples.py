"""The LlamaIndex examples run offline on a scripted engine (the real default engine: -m slow)."""

from __future__ import annotations

from types import ModuleType

import pytest
from example_loader import load_example as load


@pytest.fixture(scope="module")
def rag() -> ModuleType:
    return load("llamaindex_rag")


@pytest.fixture(scope="module")
def agent() -> ModuleType:
    return load("llamaindex_agent")


def test_minilm_embedding_is_local_and_normalised(rag):
    embed = rag.MiniLMEmbedding()
    a, b, c = embed.get_text_embedding_batch(
        ["The capital of France is Paris.", "Paris is France's capital.", "SELECT 1 FROM t;"]
    )
    assert len(a) == 384
    assert abs(sum(x * x for x in a) - 1) < 1e-4
    same = sum(x * y for x, y in zip(a, b, strict=True))
    other = sum(x * y for x, y in zip(a, c, strict=True))
    assert same > other


@pytest.mark.parametrize("stream", [False, True])
def test_rag_example_scripted(rag, stream):
    results = rag.run(rag.QUESTIONS, scripted=True, stream=stream)
    assert "Canberra" in results[0]["answer"]
    assert results[0]["source"].startswith("Travel notes")
    assert "SELECT COUNT(*)" in results[2]["answer"]
    assert next(iter(results[0]["selections"][0])) == "capital"
    assert next(iter(results[2]["selections"][0])) == "sql"
    assert all(len(r["selections"]) == 1 for r in results)


def test_rag_example_main_prints(rag, capsys):
    rag.main(["--scripted", "What is the capital of Canada?"])
    out = capsys.readouterr().out
    assert "Ottawa" in out and "adapters: capital" in out


@pytest.mark.parametrize("react", [False, True])
async def test_agent_example_scripted(agent, react):
    result = await agent.ask("How many metres are in 7 km?", scripted=True, react=react)
    assert result["tool_calls"] == ["km_to_metres({'km': 7.0}) -> 7000.0"]
    assert "7000" in result["answer"]
    assert len(result["selections"]) == 2


def test_agent_example_main_prints(agent, capsys):
    agent.main(["--scripted", "What is 12 times 34?"])
    out = capsys.readouterr().out
    assert "multiply" in out and "408" in out and "LLM call 2 adapters" in out


@pytest.mark.slow
@pytest.mark.timeout(900)  # several real generations; a shared CPU can be slow
def test_examples_on_the_real_default_engine(rag, agent):
    # Needs the embedded default model and the shipped adapter zoo.
    results = rag.run(rag.QUESTIONS[:1], scripted=False)
    assert results[0]["selections"] and results[0]["answer"] is not None
    import asyncio

    result = asyncio.run(agent.ask(agent.QUESTIONS[0], scripted=False))
    assert result["selections"]

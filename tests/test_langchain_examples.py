"""The LangChain examples run offline on a scripted engine (the real default engine: -m slow)."""

from __future__ import annotations

from types import ModuleType

import pytest
from example_loader import load_example as load


@pytest.fixture(scope="module")
def agent() -> ModuleType:
    return load("langchain_agent")


@pytest.fixture(scope="module")
def tracing() -> ModuleType:
    return load("langsmith_tracing")


@pytest.mark.parametrize(
    ("question", "call"),
    [
        ("What is 12 times 34?", "multiply({'a': 12.0, 'b': 34.0}) -> 408.0"),
        ("How many metres are in 7 km?", "km_to_metres({'km': 7.0}) -> 7000.0"),
    ],
)
def test_agent_example_scripted(agent, question, call):
    result = agent.ask(question, scripted=True, tool_choice="auto")
    assert result["tool_calls"] == [call]
    assert call.split("-> ")[1] in result["answer"]
    assert len(result["selections"]) == 2  # one per model call
    assert all(abs(sum(m.values()) - 1) < 1e-9 for m in result["selections"])


def test_agent_example_forced_first_call(agent):
    result = agent.ask("What is 2 times 3?", scripted=True, tool_choice="multiply")
    assert result["tool_calls"] == ["multiply({'a': 2.0, 'b': 3.0}) -> 6.0"]


def test_agent_example_with_create_agent(agent):
    pytest.importorskip("langchain.agents", reason="langchain (create_agent) is not installed")
    result = agent.ask("What is 12 times 34?", scripted=True, create_agent=True)
    assert "408" in result["answer"] and len(result["selections"]) == 2


def test_agent_example_main_prints(agent, capsys):
    agent.main(["--scripted", "What is 12 times 34?"])
    out = capsys.readouterr().out
    assert "multiply" in out and "408" in out and "model call 2 adapters" in out


def test_tracing_example_records_the_selection_offline(tracing):
    runs = tracing.trace(scripted=True)
    llm_runs = [r for r in runs if r["run_type"] == "llm"]
    assert len(llm_runs) == 5  # invoke, stream, and a batch of three
    for run in llm_runs:
        meta = run["extra"]["metadata"]
        message = run["outputs"]["generations"][0][0]["message"]["kwargs"]
        selection = message["response_metadata"]["logo_selection"]
        assert meta["logo_adapters"] == selection["adapters"] and len(selection["adapters"]) == 2
        assert meta["logo_adapter"] == selection["adapters"][0]
        assert {f"logo:{a}" for a in selection["adapters"]} <= set(run["tags"])
        assert meta["usage_metadata"]["total_tokens"] > 0
        assert meta["demo"] == "langsmith_tracing"
    assert llm_runs[0]["extra"]["metadata"]["logo_adapter"] == "sql"
    assert all(r["parent_run_id"] for r in llm_runs)  # children of the chain runs


def test_tracing_example_main_prints(tracing, capsys):
    tracing.main(["--scripted"])
    out = capsys.readouterr().out
    assert "5 of them chat-model runs" in out and "logo_adapter='sql'" in out
    assert "logo:sql" in out and "probe_ms" in out


@pytest.mark.slow
@pytest.mark.timeout(900)  # several real generations; a shared CPU can be slow
def test_examples_on_the_real_default_engine(agent, tracing):
    # Needs the embedded default model and the shipped adapter zoo.
    result = agent.ask(agent.QUESTIONS[0], scripted=False, tool_choice="required")
    assert result["selections"] and all(result["selections"][0].values())
    runs = tracing.trace(scripted=False)
    assert any(r["run_type"] == "llm" and r["extra"]["metadata"]["logo_adapters"] for r in runs)

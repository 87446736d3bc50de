"""LoGoLLM inside LlamaIndex pipelines: a query engine over a small index, agents with tools."""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.agent.workflow import (
    AgentStream,
    AgentWorkflow,
    FunctionAgent,
    ReActAgent,
    ToolCallResult,
)
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.span_handlers import SimpleSpanHandler

from logo_engine.testing import ScriptedEngine, tool_call_text
from logo_integrations.llama_index import (
    RESPONSE_SELECTIONS_KEY,
    SELECTION_KEY,
    LoGoLLM,
    record_selections,
)

ADAPTERS = ("geography", "chemistry", "math")
DOCS = [
    "The capital of Zorbia is Quellton, a geography fact about a river city.",
    "Water boils at 100 degrees Celsius at sea level; this is chemistry.",
    "The sum of the angles of a triangle is 180 degrees in plane math.",
]


class HashEmbedding(BaseEmbedding):
    """Deterministic bag-of-words embedding: each lower-cased word hashed into 64 buckets."""

    dim: int = 64

    @classmethod
    def class_name(cls) -> str:
        return "HashEmbedding"

    def _embed(self, text: str) -> list[float]:
        vec = [0.0] * self.dim
        for word in re.findall(r"[a-z]+", text.lower()):
            vec[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._embed(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed(text)


def rag_script(messages: list[dict[str, Any]], tools: Any) -> str:
    """Answer with the context sentence that shares the most words with the question."""
    prompt = messages[-1]["content"]
    question = prompt.rsplit("Query:", 1)[-1]
    words = set(re.findall(r"[a-z]+", question.lower())) - {"what", "is", "the", "of", "answer"}
    best = max(DOCS, key=lambda d: len(words & set(re.findall(r"[a-z]+", d.lower()))))
    return best if best in prompt else "I do not know."


@pytest.fixture()
def index() -> VectorStoreIndex:
    return VectorStoreIndex.from_documents(
        [Document(text=t) for t in DOCS], embed_model=HashEmbedding()
    )


@pytest.fixture()
def spans():
    handler = SimpleSpanHandler()
    root = get_dispatcher()
    root.add_span_handler(handler)
    yield handler
    root.span_handlers = [h for h in root.span_handlers if h is not handler]


def _ancestors(spans: SimpleSpanHandler, span_id: str) -> list[str]:
    by_id = {s.id_: s for s in spans.completed_spans}
    chain = []
    while span_id in by_id:
        chain.append(span_id)
        span_id = by_id[span_id].parent_id
    return chain


def test_query_engine_answer_and_its_selection(index, spans):
    llm = LoGoLLM(engine=ScriptedEngine(rag_script, adapter_names=ADAPTERS))
    engine = index.as_query_engine(llm=llm, similarity_top_k=1)
    with record_selections() as recorder:
        response = engine.query("What is the capital of Zorbia? (geography)")
    assert "Quellton" in str(response)
    assert "Zorbia" in response.source_nodes[0].node.get_content()
    (event,) = recorder.events
    assert event.adapters[0] == "geography"
    # The event is inside the LLM call's span, itself inside the query's span.
    chain = _ancestors(spans, event.span_id)
    assert chain[0].startswith("LoGoLLM.chat-")
    assert any(s.startswith("RetrieverQueryEngine.query-") for s in chain)
    # The response itself carries the selection of the LLM call behind it.
    assert response.metadata[RESPONSE_SELECTIONS_KEY] == [event.selection.model_dump(mode="json")]


def test_a_response_lists_every_llm_call_behind_it(index):
    llm = LoGoLLM(engine=ScriptedEngine(rag_script, adapter_names=ADAPTERS))
    engine = index.as_query_engine(llm=llm, similarity_top_k=2, response_mode="refine")
    with record_selections() as recorder:
        response = engine.query("What is the capital of Zorbia? (geography)")
        other = engine.query("At what degrees does water boil? chemistry")
    assert len(recorder.events) == 4  # refine: one LLM call per retrieved chunk
    assert response.metadata[RESPONSE_SELECTIONS_KEY] == [
        e.selection.model_dump(mode="json") for e in recorder.events[:2]
    ]
    assert other.metadata[RESPONSE_SELECTIONS_KEY] == [
        e.selection.model_dump(mode="json") for e in recorder.events[2:]
    ]
    node_ids = {n.node.node_id for n in response.source_nodes}
    assert node_ids <= set(response.metadata)  # LlamaIndex's own metadata is kept


async def test_async_streaming_query_engine(index):
    llm = LoGoLLM(engine=ScriptedEngine(rag_script, adapter_names=ADAPTERS))
    engine = index.as_query_engine(llm=llm, similarity_top_k=1, streaming=True)
    with record_selections() as recorder:
        response = await engine.aquery("At what degrees does water boil? chemistry")
        text = "".join([t async for t in response.async_response_gen()])
    assert "100 degrees" in text
    assert [e.adapters[0] for e in recorder.events] == ["chemistry"]
    # The LLM is called while the stream is read: its selection is there once it has been.
    assert response.metadata[RESPONSE_SELECTIONS_KEY] == [
        recorder.events[0].selection.model_dump(mode="json")
    ]


def test_sync_streaming_query_engine_response_gets_its_selection(index):
    llm = LoGoLLM(engine=ScriptedEngine(rag_script, adapter_names=ADAPTERS))
    engine = index.as_query_engine(llm=llm, similarity_top_k=1, streaming=True)
    response = engine.query("At what degrees does water boil? chemistry")
    assert "100 degrees" in "".join(response.response_gen)
    (selection,) = response.metadata[RESPONSE_SELECTIONS_KEY]
    assert selection["adapters"][0] == "chemistry"


@pytest.fixture()
def multiply_tool():
    calls: list[tuple[int, int]] = []

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        calls.append((a, b))
        return a * b

    multiply.calls = calls  # type: ignore[attr-defined]
    return multiply


def agent_script(messages: list[dict[str, Any]], tools: Any) -> str:
    if messages[-1]["role"] == "tool":
        return f"The answer is {messages[-1]['content']}."
    if tools:
        return "I will multiply. " + tool_call_text("multiply", {"a": 6, "b": 7})
    return "I cannot use tools."


@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_calls_a_tool(multiply_tool, streaming):
    engine = ScriptedEngine(agent_script, adapter_names=ADAPTERS)
    llm = LoGoLLM(engine=engine)
    agent = FunctionAgent(
        tools=[multiply_tool], llm=llm, streaming=streaming, system_prompt="You are a calculator."
    )
    with record_selections() as recorder:
        handler = agent.run(user_msg="What is 6 times 7? Use math.")
        streamed = []
        tool_results = []
        async for event in handler.stream_events():
            if isinstance(event, AgentStream):
                streamed.append(event.delta)
            if isinstance(event, ToolCallResult):
                tool_results.append(event)
        result = await handler
    assert multiply_tool.calls == [(6, 7)]
    assert [r.tool_output.content for r in tool_results] == ["42"]
    assert str(result.response.content) == "The answer is 42."
    assert result.raw[SELECTION_KEY]["adapters"][0] == "math"
    assert len(recorder.events) == 2  # one LLM call per agent step
    if streaming:
        assert not any("<tool_call>" in d for d in streamed)
        assert "".join(streamed).startswith("I will multiply. The answer is 42.")
    # The second call saw the assistant's tool call and the tool's result.
    second = engine.calls[1]["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "multiply"
    assert second[-1]["role"] == "tool" and second[-1]["content"] == "42"


async def test_agent_workflow_picks_the_function_agent(multiply_tool):
    llm = LoGoLLM(engine=ScriptedEngine(agent_script, adapter_names=ADAPTERS))
    workflow = AgentWorkflow.from_tools_or_functions([multiply_tool], llm=llm)
    assert isinstance(next(iter(workflow.agents.values())), FunctionAgent)
    result = await workflow.run(user_msg="6 times 7?")
    assert str(result.response.content) == "The answer is 42."


def react_script(messages: list[dict[str, Any]], tools: Any) -> str:
    transcript = "\n".join(m["content"] for m in messages)
    if "Observation: 42" in transcript:
        return "Thought: I can answer without using any more tools.\nAnswer: The answer is 42."
    return (
        "Thought: I need to use a tool to help me answer the question.\n"
        'Action: multiply\nAction Input: {"a": 6, "b": 7}'
    )


async def test_react_agent_calls_a_tool(multiply_tool):
    llm = LoGoLLM(engine=ScriptedEngine(react_script, adapter_names=ADAPTERS))
    agent = ReActAgent(tools=[multiply_tool], llm=llm)
    with record_selections() as recorder:
        result = await agent.run(user_msg="What is 6 times 7?")
    assert multiply_tool.calls == [(6, 7)]
    assert "42" in str(result.response.content)
    assert len(recorder.events) == 2

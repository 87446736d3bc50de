"""A LlamaIndex agent over LoGo: a ``FunctionAgent`` with two tools, and the adapters that answered
each of its LLM calls.

Runs offline. By default the LLM is the embedded default model with the shipped adapter zoo
(``LoGoLLM()``); the agent's first call is forced to be a tool call (``--tool-choice required``;
a tool name forces that tool, and the model only writes the arguments). A 135M-parameter base
model often writes malformed calls: the agent then answers with the model's text. ``--react``
uses a ``ReActAgent`` (text-only tool use) instead.

    python examples/llamaindex_agent.py                  # the real default engine
    python examples/llamaindex_agent.py --scripted       # a scripted engine: no weights needed
    python examples/llamaindex_agent.py "How many metres are in 7 km?"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llama_index.core.agent.workflow import (
    AgentStream,
    FunctionAgent,
    ReActAgent,
    ToolCall,
    ToolCallResult,
)

from logo_integrations.llama_index import LoGoLLM, record_selections

QUESTIONS = ["What is 12 times 34?", "How many metres are in 7 km?"]


def multiply(a: float, b: float) -> float:
    """Multiply two numbers a and b."""
    return a * b


def km_to_metres(km: float) -> float:
    """Convert a distance in kilometres to metres."""
    return km * 1000


def scripted_agent(messages: list[dict[str, Any]], tools: Any) -> str:
    """Stand-in for a model: call the right tool on the question's numbers, then report."""
    from logo_engine.testing import tool_call_text

    if messages[-1]["role"] == "tool":
        return f"The answer is {messages[-1]['content']}."
    question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", question)]
    if not tools:
        return "I have no tools for this."
    if "km" in question.lower() and numbers:
        return tool_call_text("km_to_metres", {"km": numbers[0]})
    a, b = [*numbers, 0.0, 0.0][:2]
    return tool_call_text("multiply", {"a": a, "b": b})


def scripted_react(messages: list[dict[str, Any]], tools: Any) -> str:
    """Stand-in for a model that follows the ReAct text format."""
    transcript = "\n".join(m["content"] for m in messages if m["role"] != "system")
    observed = re.findall(r"Observation: (.+)", transcript)
    if observed:
        return f"Thought: I can answer without using any more tools.\nAnswer: {observed[-1]}"
    question = next(m["content"] for m in messages if m["role"] == "user")
    numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", question)]
    if "km" in question.lower() and numbers:
        action, args = "km_to_metres", f'{{"km": {numbers[0]}}}'
    else:
        a, b = [*numbers, 0.0, 0.0][:2]
        action, args = "multiply", f'{{"a": {a}, "b": {b}}}'
    return (
        "Thought: I need to use a tool to help me answer the question.\n"
        f"Action: {action}\nAction Input: {args}"
    )


def build_llm(scripted: bool, react: bool, adapters: str | None = None) -> LoGoLLM:
    """The real default engine (loaded on first use), or a scripted one named like the zoo."""
    if not scripted:
        return LoGoLLM(adapters=adapters, max_tokens=96)
    from logo_engine.testing import ScriptedEngine

    engine = ScriptedEngine(
        scripted_react if react else scripted_agent,
        adapter_names=("arithmetic", "unit_conversion", "sql"),
    )
    return LoGoLLM(engine=engine, max_tokens=96)


async def ask(
    question: str,
    *,
    scripted: bool,
    react: bool = False,
    adapters: str | None = None,
    tool_choice: str | None = None,
) -> dict[str, Any]:
    """Run the agent on one question; returns the answer, tool calls and selections."""
    llm = build_llm(scripted, react, adapters)
    tools = [multiply, km_to_metres]
    if react:
        agent: Any = ReActAgent(tools=tools, llm=llm)
    else:
        agent = FunctionAgent(
            tools=tools,
            llm=llm,
            system_prompt="You are a helpful assistant. Use the tools for any computation.",
            initial_tool_choice=tool_choice,
        )
    tool_calls: list[str] = []
    with record_selections() as recorder:
        handler = agent.run(user_msg=question, max_iterations=6)
        async for event in handler.stream_events():
            if isinstance(event, ToolCallResult):
                tool_calls.append(
                    f"{event.tool_name}({event.tool_kwargs}) -> {event.tool_output.content}"
                )
            elif isinstance(event, (AgentStream, ToolCall)):
                pass  # deltas and pending calls; a UI would show them
        result = await handler
    return {
        "question": question,
        "answer": str(result.response.content or "").strip(),
        "tool_calls": tool_calls,
        "selections": [s.mixture for s in recorder.selections],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("questions", nargs="*", help="questions (default: two examples)")
    parser.add_argument("--scripted", action="store_true", help="use a scripted engine")
    parser.add_argument("--react", action="store_true", help="use a ReActAgent")
    parser.add_argument("--adapters", help="adapter library folder (default: the shipped zoo)")
    parser.add_argument(
        "--tool-choice",
        help="tool choice of the agent's first call: auto, required or a tool name "
        "(default: required on the real engine, auto on the scripted one)",
    )
    args = parser.parse_args(argv)
    tool_choice = args.tool_choice or ("auto" if args.scripted else "required")
    for question in args.questions or QUESTIONS:
        r = asyncio.run(
            ask(
                question,
                scripted=args.scripted,
                react=args.react,
                adapters=args.adapters,
                tool_choice=None if tool_choice == "auto" else tool_choice,
            )
        )
        print(f"Q: {r['question']}")
        for call in r["tool_calls"]:
            print(f"   tool: {call}")
        for i, mixture in enumerate(r["selections"], 1):
            shown = ", ".join(f"{name} {weight:.2f}" for name, weight in mixture.items())
            print(f"   LLM call {i} adapters: {shown or 'base model only'}")
        print(f"A: {r['answer']}")
        print()


if __name__ == "__main__":
    main()

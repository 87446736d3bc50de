"""A LangChain tool-calling agent over LoGo: ``ChatLoGo`` with two tools, and the adapters that
answered each of its model calls.

Runs offline. By default the model is the embedded default (SmolLM2-135M-Instruct) with the
shipped adapter zoo (``ChatLoGo()``, loaded on first use). The agent is the classic loop written
with ``langchain-core`` only: ``bind_tools`` -> ``invoke`` -> run each tool call -> ``ToolMessage``
-> ``invoke`` again, until the model answers in text. Its first call is forced to be a tool call
(``--tool-choice required``; a tool name forces that tool): a 135M-parameter model often writes
malformed calls, which then arrive as ``invalid_tool_calls`` and end the loop with the model's
text. ``--create-agent`` uses ``langchain.agents.create_agent`` instead (``pip install langchain``).

    python examples/langchain_agent.py                  # the real default engine
    python examples/langchain_agent.py --scripted       # a scripted engine: no weights needed
    python examples/langchain_agent.py "How many metres are in 7 km?"
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.tools import BaseTool, tool

from logo_integrations.langchain import SELECTION_KEY, ChatLoGo

QUESTIONS = ["What is 12 times 34?", "How many metres are in 7 km?"]
SYSTEM = "You are a helpful assistant. Use the tools for any computation."


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers a and b."""
    return a * b


@tool
def km_to_metres(km: float) -> float:
    """Convert a distance in kilometres to metres."""
    return km * 1000


TOOLS: list[BaseTool] = [multiply, km_to_metres]


def scripted_model(messages: list[dict[str, Any]], tools: Any) -> str:
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


def build_llm(scripted: bool, adapters: str | None = None) -> ChatLoGo:
    """The real default engine (loaded on first use), or a scripted one named like the zoo."""
    if not scripted:
        return ChatLoGo(adapters=adapters, max_tokens=96)
    from logo_engine.testing import ScriptedEngine

    engine = ScriptedEngine(scripted_model, adapter_names=("arithmetic", "unit_conversion", "sql"))
    return ChatLoGo(engine=engine, max_tokens=96)


def run_loop(
    llm: ChatLoGo, question: str, *, tool_choice: str | None = None, max_steps: int = 4
) -> list[BaseMessage]:
    """The tool-calling agent loop; returns the conversation."""
    by_name = {t.name: t for t in TOOLS}
    messages: list[BaseMessage] = [SystemMessage(SYSTEM), HumanMessage(question)]
    for step in range(max_steps):
        model = llm.bind_tools(TOOLS, tool_choice=tool_choice if step == 0 else "auto")
        answer = model.invoke(messages)
        messages.append(answer)
        if not answer.tool_calls:
            break
        for call in answer.tool_calls:
            messages.append(by_name[call["name"]].invoke(call))  # a ToolMessage
    return messages


def run_create_agent(llm: ChatLoGo, question: str) -> list[BaseMessage]:
    """The same agent with ``langchain.agents.create_agent`` (needs ``pip install langchain``)."""
    from langchain.agents import create_agent

    agent = create_agent(llm, tools=TOOLS, system_prompt=SYSTEM)
    return list(agent.invoke({"messages": [HumanMessage(question)]})["messages"])


def ask(
    question: str,
    *,
    scripted: bool,
    adapters: str | None = None,
    tool_choice: str | None = None,
    create_agent: bool = False,
) -> dict[str, Any]:
    """Run the agent on one question; returns the answer, tool calls and selections."""
    llm = build_llm(scripted, adapters)
    if create_agent:
        messages = run_create_agent(llm, question)
    else:
        messages = run_loop(llm, question, tool_choice=tool_choice)
    answers = [m for m in messages if isinstance(m, AIMessage)]
    results = {m.tool_call_id: m.content for m in messages if m.type == "tool"}
    return {
        "question": question,
        "answer": str(answers[-1].content).strip() if answers else "",
        "tool_calls": [
            f"{c['name']}({c['args']}) -> {results.get(c['id'])}"
            for m in answers
            for c in m.tool_calls
        ],
        "invalid_tool_calls": [c.get("args") for m in answers for c in m.invalid_tool_calls],
        # {adapter: weight} of every model call, from the answers' response metadata
        "selections": [
            dict(
                zip(
                    m.response_metadata[SELECTION_KEY]["adapters"],
                    m.response_metadata[SELECTION_KEY]["weights"],
                    strict=True,
                )
            )
            for m in answers
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("questions", nargs="*", help="questions (default: two examples)")
    parser.add_argument("--scripted", action="store_true", help="use a scripted engine")
    parser.add_argument("--adapters", help="adapter library folder (default: the shipped zoo)")
    parser.add_argument(
        "--tool-choice",
        help="tool choice of the agent's first call: auto, required or a tool name "
        "(default: required on the real engine, auto on the scripted one)",
    )
    parser.add_argument(
        "--create-agent",
        action="store_true",
        help="use langchain.agents.create_agent (pip install langchain)",
    )
    args = parser.parse_args(argv)
    tool_choice = args.tool_choice or ("auto" if args.scripted else "required")
    for question in args.questions or QUESTIONS:
        r = ask(
            question,
            scripted=args.scripted,
            adapters=args.adapters,
            tool_choice=tool_choice,
            create_agent=args.create_agent,
        )
        print(f"Q: {r['question']}")
        for line in r["tool_calls"]:
            print(f"   tool: {line}")
        for raw in r["invalid_tool_calls"]:
            print(f"   malformed tool call: {raw!r}")
        for i, mixture in enumerate(r["selections"], 1):
            shown = ", ".join(f"{name} {weight:.2f}" for name, weight in mixture.items())
            print(f"   model call {i} adapters: {shown or 'base model only'}")
        print(f"A: {r['answer']}\n")


if __name__ == "__main__":
    main()

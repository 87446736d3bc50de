"""What a LoGo call leaves in a LangSmith trace: the adapter selection as run metadata and tags,
in the run's outputs, with usage and model name.

Runs offline: by default a real ``langsmith.Client`` sends its runs into a recording HTTP session
instead of the network, and this script prints what would have been uploaded (the JSON bodies of
``POST /runs`` and ``PATCH /runs/{id}``). With ``--langsmith`` the runs go to LangSmith for real
(set ``LANGSMITH_API_KEY``; needs network). The model is the embedded default with the shipped zoo
(``ChatLoGo()``), or a scripted engine with ``--scripted``.

In LangSmith, filter the runs of one adapter with the metadata filter
``and(eq(metadata_key, "logo_adapter"), eq(metadata_value, "sql"))`` (the adapter with the largest
weight) or the tag filter ``has(tags, "logo:sql")`` (any chosen adapter).

    python examples/langsmith_tracing.py --scripted
    python examples/langsmith_tracing.py                   # the real default engine
    python examples/langsmith_tracing.py --langsmith       # upload to LangSmith
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import requests
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tracers.langchain import LangChainTracer
from langsmith import Client

from logo_integrations.langchain import ChatLoGo

QUESTIONS = [
    "How many users live in Paris? Write the SQL query.",
    "What is 17 plus 25?",
    "Convert 3 km to metres.",
]
ZOO_LIKE = ("sql", "arithmetic", "unit_conversion", "capital")


class RecordingSession(requests.Session):
    """An HTTP session that records what LangSmith's client sends and answers 200 locally."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def request(
        self,
        method: str | bytes,
        url: str | bytes,
        *args: Any,  # type: ignore[override]
        **kwargs: Any,
    ) -> requests.Response:
        data = kwargs.get("data")
        if isinstance(data, (bytes, bytearray)) and data:
            self.sent.append((str(method), str(url), json.loads(data)))
        response = requests.Response()
        response.status_code = 200
        response._content = b"{}"
        response.headers["Content-Type"] = "application/json"
        response.url = str(url)
        return response


def scripted_answer(messages: list[dict[str, Any]], tools: Any) -> str:
    """Stand-in for a model: a short canned answer per topic."""
    question = messages[-1]["content"].lower()
    if "sql" in question:
        return "SELECT COUNT(*) FROM users WHERE city = 'Paris';"
    if "km" in question:
        return "3000"
    return "42"


def build_llm(scripted: bool) -> ChatLoGo:
    """The real default engine (loaded on first use), or a scripted one named like the zoo."""
    if not scripted:
        return ChatLoGo(max_tokens=48, top_k=2)
    from logo_engine.testing import ScriptedEngine

    return ChatLoGo(engine=ScriptedEngine(scripted_answer, adapter_names=ZOO_LIKE), top_k=2)


def runs_by_id(sent: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge each run's POST (start) and PATCH (end) bodies, in start order."""
    runs: dict[str, dict[str, Any]] = {}
    for method, _url, body in sent:
        run = runs.setdefault(body["id"], {})
        if method == "POST":
            run.update(body)
        else:  # PATCH: end time, outputs, final metadata
            run.update({k: v for k, v in body.items() if v is not None})
    return list(runs.values())


def trace(scripted: bool, client: Client | None = None) -> list[dict[str, Any]]:
    """Run a small chain three ways (invoke, stream, batch) under a LangSmith tracer.

    Returns the runs as uploaded (offline: recorded), parents first.
    """
    session = RecordingSession()
    if client is None:
        client = Client(
            api_url="http://localhost:1984",
            api_key="offline",
            session=session,
            auto_batch_tracing=False,
        )
    tracer = LangChainTracer(client=client, project_name="logo-demo")
    chain = (
        ChatPromptTemplate.from_messages([("system", "Answer briefly."), ("human", "{question}")])
        | build_llm(scripted)
        | StrOutputParser()
    )
    config = {"callbacks": [tracer], "metadata": {"demo": "langsmith_tracing"}}
    chain.invoke({"question": QUESTIONS[0]}, config=config)
    for _ in chain.stream({"question": QUESTIONS[1]}, config=config):
        pass
    chain.batch([{"question": q} for q in QUESTIONS], config=config)
    tracer.wait_for_futures()
    return runs_by_id(session.sent)


def describe(run: dict[str, Any]) -> str:
    """What a reader of the trace sees for one chat-model run."""
    meta = run.get("extra", {}).get("metadata", {})
    generation = run.get("outputs", {}).get("generations", [[{}]])[0][0]
    message = generation.get("message", {}).get("kwargs", {})
    selection = message.get("response_metadata", {}).get("logo_selection", {})
    lines = [
        f"run {run['name']!r} ({run['run_type']}), model {meta.get('ls_model_name')!r}",
        f"  tags:     {sorted(t for t in run.get('tags', []) if t.startswith('logo:'))}",
        f"  metadata: logo_adapter={meta.get('logo_adapter')!r} "
        f"logo_adapters={meta.get('logo_adapters')} logo_weights="
        f"{[round(w, 3) for w in meta.get('logo_weights', [])]}",
        f"  outputs:  response_metadata.logo_selection.scores="
        f"{ {k: round(v, 3) for k, v in selection.get('scores', {}).items()} } "
        f"probe_ms={selection.get('probe_ms', 0.0):.2f}",
        f"  usage:    {meta.get('usage_metadata')}",
        f"  answer:   {message.get('content')!r}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripted", action="store_true", help="use a scripted engine")
    parser.add_argument(
        "--langsmith", action="store_true", help="upload to LangSmith (LANGSMITH_API_KEY, network)"
    )
    args = parser.parse_args(argv)
    if args.langsmith:
        trace(args.scripted, client=Client())
        print(
            "Uploaded to LangSmith project 'logo-demo'. Filter with "
            '`and(eq(metadata_key, "logo_adapter"), eq(metadata_value, "sql"))`.'
        )
        return
    runs = trace(args.scripted)
    llm_runs = [r for r in runs if r.get("run_type") == "llm"]
    print(f"{len(runs)} runs recorded, {len(llm_runs)} of them chat-model runs:\n")
    for run in llm_runs:
        print(describe(run), end="\n\n")


if __name__ == "__main__":
    main()

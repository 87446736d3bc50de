"""LoGo as a service: start `logo serve` in this process, then call it five ways.

1. the official ``openai`` client (the selection is in ``response.model_extra["logo"]``);
2. a stream, whose first chunk carries the selection;
3. ``RemoteEngine``: the engine surface over HTTP (``Selection``/``Generation`` objects, no torch);
4. ``ChatLoGo(base_url=...)``: LangChain with the selection in ``response_metadata``;
5. plain ``ChatOpenAI(base_url=...)`` (langchain-openai): works too, without the selection.

Runs offline. By default the server serves the embedded SmolLM2-135M-Instruct with the shipped
adapter zoo; ``--scripted`` serves a scripted engine (no weights needed); ``--url`` calls a server
that is already running (``logo serve`` in another terminal) instead of starting one.

    python examples/serving.py
    python examples/serving.py --scripted
    python examples/serving.py --url http://127.0.0.1:8000/v1 "Sort 5, 2, 9"
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from openai import OpenAI

from logo_engine.client import RemoteEngine

QUESTION = "Convert 7 km to metres."


@contextlib.contextmanager
def server(scripted: bool, url: str | None) -> Iterator[str]:
    """The base URL of a running server: the one given, or one started here (stopped after)."""
    if url is not None:
        yield url
        return
    from logo_engine.serving.server import BackgroundServer

    if scripted:
        from logo_engine.testing import ScriptedEngine

        engine: Any = ScriptedEngine(
            ["7 km is 7000 metres."], adapter_names=("unit_conversion", "sql", "arithmetic")
        )
    else:
        from logo_engine import LoGoEngine

        engine = LoGoEngine.from_pretrained()
    with BackgroundServer(engine) as running:
        yield running.base_url


def run(
    question: str = QUESTION,
    *,
    scripted: bool = False,
    url: str | None = None,
    max_tokens: int = 32,
) -> dict[str, Any]:
    """Ask ``question`` every way; returns what each way answered and which adapters."""
    out: dict[str, Any] = {}
    with server(scripted, url) as base_url:
        client = OpenAI(base_url=base_url, api_key=os.environ.get("LOGO_API_KEY", "unused"))
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": question}]

        response = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,  # type: ignore[arg-type]
        )
        out["openai"] = (
            response.choices[0].message.content,
            response.model_extra["logo"]["selection"]["adapters"],
        )

        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=max_tokens,
                stream=True,  # type: ignore[arg-type]
            )
        )
        out["stream"] = (
            "".join(c.choices[0].delta.content or "" for c in chunks),
            chunks[0].model_extra["logo"]["selection"]["adapters"],
        )

        engine = RemoteEngine(base_url)
        generation = engine.generate(messages, max_new_tokens=max_tokens)
        out["remote_engine"] = (generation.text, generation.selection.adapters)

        from logo_integrations.langchain import ChatLoGo

        message = ChatLoGo(base_url=base_url, max_tokens=max_tokens).invoke(question)
        out["chat_logo"] = (
            message.content,
            message.response_metadata["logo_selection"]["adapters"],
        )

        from langchain_openai import ChatOpenAI

        plain = ChatOpenAI(
            base_url=base_url,
            api_key="unused",
            model=model,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0,
        )  # type: ignore[call-arg]
        out["chat_openai"] = (plain.invoke(question).content, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="?", default=QUESTION)
    parser.add_argument("--scripted", action="store_true", help="serve a scripted engine")
    parser.add_argument("--url", help="a running server's base URL (e.g. http://host:8000/v1)")
    args = parser.parse_args()
    for way, (text, adapters) in run(args.question, scripted=args.scripted, url=args.url).items():
        chosen = ", ".join(adapters) if adapters is not None else "(not reported)"
        print(f"{way:14s} adapters: {chosen:45s} answer: {text!r}")


if __name__ == "__main__":
    main()

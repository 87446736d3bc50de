"""Tiny real models and adapters for tests: built in the test session, offline, in seconds.

- ``tiny_tokenizer()``: a byte-level BPE trained here, with a ChatML chat template.
- ``tiny_model(arch="llama"|"qwen2", seed=0)``: a 2-layer, hidden-64 causal LM, random weights.
- ``random_adapter(model, folder, r=4, targets=("q_proj", "v_proj"), ...)``: a peft LoRA adapter
  with random (non-zero) A and B, saved as safetensors; for exactness tests.
- ``train_adapter(model, tokenizer, task, folder, steps=...)``: a peft LoRA adapter trained on one
  of ``TASKS`` (a fixed answer to a family of prompts), so that adapters really differ.
- ``trained_library(root)``: one trained adapter per task, cached on disk (see below).
- ``tiny_engine(tmp_path)``: a ready LoGoEngine over the tiny model and three trained adapters.
- ``ForwardCounter(model)``: counts model forwards (to prove that bad input fails before any).

Trained adapters are cached under ``$LOGO_TEST_CACHE`` (default ``~/.cache/logo/test-adapters``),
keyed by a hash of everything that determines them (this file's source, the library versions):
a changed recipe trains anew, an unchanged one costs nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class Task:
    """Prompts drawn from one alphabet, always answered with the same text."""

    words: str  # characters the prompt's words are made of
    answer: str

    def prompts(self, n: int, seed: int = 0) -> list[str]:
        rng = random.Random(seed)
        return [
            " ".join(
                "".join(rng.choice(self.words) for _ in range(rng.randint(2, 5)))
                for _ in range(rng.randint(3, 8))
            )
            for _ in range(n)
        ]


TASKS = {
    "letters": Task(words="abcdefgh", answer="yes yes"),
    "digits": Task(words="0123456789", answer="no no"),
    "symbols": Task(words="+-*/=<>", answer="ok ok"),
}


def forward_rows(batch_dim: int) -> int:
    """Rows in the model forward running now: a packed prompt pass holds them in one sequence."""
    from logo_engine.mixture import current_context

    ctx = current_context()
    return len(ctx.packed) if ctx is not None and ctx.packed is not None else batch_dim


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    corpus = [p for t in TASKS.values() for p in t.prompts(200)] + [
        "system user assistant tool yes no ok hello world the answer is",
        'ijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ {}[]":,.!? _',
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHATML
    fast.padding_side = "left"
    return fast


def tiny_config(vocab_size: int = 400) -> dict[str, Any]:
    """The tiny models' config fields (shapes and special tokens), for any decoder config."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 400) -> PreTrainedModel:
    torch.manual_seed(seed)
    common = tiny_config(vocab_size)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


TURNS = ["hi there 1", "what is 2 + 3", "and 40 + 2?", "reverse abc please"]


def conversation(n: int) -> list[dict[str, str]]:
    """A terse chat of ``n`` user turns (the last one unanswered), for prefix-cache tests."""
    messages = [{"role": "system", "content": "you are terse, digits 0 1 2 3"}]
    for i, text in enumerate(TURNS[:n]):
        messages.append({"role": "user", "content": text})
        if i < n - 1:
            messages.append({"role": "assistant", "content": f"ok {i}"})
    return messages


def random_adapter(
    model: PreTrainedModel,
    folder: Path,
    *,
    r: int = 4,
    alpha: float = 8.0,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    use_rslora: bool = False,
    layers: Sequence[int] | None = None,
) -> Path:
    """A LoRA adapter with random A and B (peft init_lora_weights=False), saved to ``folder``."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        init_lora_weights=False,
        use_rslora=use_rslora,
        layers_to_transform=list(layers) if layers is not None else None,
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(folder)
    return folder


def train_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    task: str,
    folder: Path,
    *,
    steps: int = 120,
    r: int = 8,
    seed: int = 0,
) -> Path:
    """Train a LoRA on TASKS[task] (answer tokens only) and save it to ``folder``."""
    torch.manual_seed(seed)
    spec = TASKS[task]
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    peft_model.train()
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    prompts = spec.prompts(64, seed=seed + 1)
    rows = []
    for p in prompts:
        prefix = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(spec.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids, answer_ids))
    rng = random.Random(seed)
    for _ in range(steps):
        batch = rng.sample(rows, 8)
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros(8, width, dtype=torch.long)
        labels = torch.full((8, width), -100, dtype=torch.long)
        mask = torch.zeros(8, width, dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            seq = p + a
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(a)
            mask[i, : len(seq)] = 1
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(folder)
    return folder


def recipe_key() -> str:
    """Hash of what determines the trained adapters: this file and the library versions."""
    import peft
    import tokenizers
    import transformers

    recipe = "\n".join(
        [
            Path(__file__).read_text(encoding="utf-8"),
            torch.__version__,
            peft.__version__,
            transformers.__version__,
            tokenizers.__version__,
        ]
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def trained_library(cache: Path | None = None) -> Path:
    """A folder with one adapter trained per task in TASKS, trained once per recipe and cached.

    Concurrent sessions are safe: each trains into a private folder and renames it into place;
    the loser of a race discards its copy.
    """
    root = cache or Path(
        os.environ.get("LOGO_TEST_CACHE") or Path.home() / ".cache" / "logo" / "test-adapters"
    )
    folder = root / recipe_key()
    if all((folder / task / "adapter_model.safetensors").is_file() for task in TASKS):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="training-", dir=root))
    try:
        tokenizer, model = tiny_tokenizer(), tiny_model()
        for task in TASKS:
            train_adapter(model, tokenizer, task, scratch / task)
        try:
            os.rename(scratch, folder)
        except OSError:  # another session finished first
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


class ForwardCounter:
    """Counts forwards of ``model`` (a forward pre-hook) while in a ``with`` block: ``.n``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.n = 0

    def __enter__(self) -> ForwardCounter:
        self._handle = self.model.register_forward_pre_hook(self._count)
        return self

    def _count(self, module: torch.nn.Module, args: object) -> None:
        self.n += 1

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def tiny_engine(folder: Path, **kwargs):
    """A LoGoEngine over a fresh tiny model with one trained adapter per task in TASKS."""
    from logo_engine import LoGoEngine

    trained = trained_library()
    for task in TASKS:
        if not (folder / task / "adapter_config.json").exists():
            shutil.copytree(trained / task, folder / task)
    return LoGoEngine(tiny_model(), tiny_tokenizer(), adapters=folder, name="tiny-llama", **kwargs)


def hand_scores(
    adapter_dir: Path, names: Sequence[str], h: torch.Tensor, module: str, signal: str
) -> dict[str, float]:
    """s · B A h from the files, for every adapter; 0 where the adapter skips the module."""
    out = {}
    for name in names:
        config = json.loads((adapter_dir / name / "adapter_config.json").read_text())
        state = load_file(adapter_dir / name / "adapter_model.safetensors")
        key = f"base_model.model.{module}"
        if f"{key}.lora_A.weight" not in state:
            out[name] = 0.0
            continue
        a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
        r = a.shape[0]
        s = config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r)
        o = s * (b @ (a @ h))
        if signal == "norm":
            out[name] = float(o.norm())
        else:
            p = torch.softmax(o, -1)
            out[name] = float(1 / (-(p * torch.log(p)).sum() + 1e-6))
    return out


def probed_input(
    model: PreTrainedModel, ids: Sequence[int], layer: int, probe_input: str
) -> torch.Tensor:
    """The oracle of a probe: ``model``'s own forward, a plain hook; the input at every token.

    ``probe_input`` "module": the input of block ``layer``'s ``q_proj``; "residual": the block's.
    """
    block = model.model.layers[layer]
    captured: dict[str, torch.Tensor] = {}
    if probe_input == "module":
        handle = block.self_attn.q_proj.register_forward_hook(
            lambda m, a, o: captured.setdefault("h", a[0])
        )
    else:
        handle = block.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0]))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([list(ids)]))
    finally:
        handle.remove()
    return captured["h"][0]  # (T, in)

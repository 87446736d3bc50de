"""Train the shipped adapter zoo: one rank-8 q/v LoRA per in-library task on the default model.

Each batch mixes the task's examples with replay rows: general prompts (``replay.py``) answered by
the base model itself, so that outside its task an adapter answers like the base model. The loss
is the mean over rows of each row's mean token loss (a long replay answer weighs as much as a
short task answer).

One command retrains everything (about an hour on a shared 2-core CPU)::

    python -m benchmarks.zoo.train                      # all tasks into logo_engine/zoo
    python -m benchmarks.zoo.train --tasks sql capital --steps 100 --out /tmp/zoo

Each adapter is trained on answer tokens only (prompt tokens masked with -100), evaluated with
greedy decoding on its task's validation split next to the base model, and saved in peft format
with fp16 safetensors weights, plus ``train_prompts.json`` (a sample of its training prompts).
``zoo.json`` and ``README.md`` in the output folder record what was measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.zoo.replay import REPLAY_PROMPTS
from benchmarks.zoo.tasks import LIBRARY_TASKS, TASKS, Example, Task, assert_disjoint
from logo_engine.models import (
    DEFAULT_MODEL_NAME,
    cache_dir,
    default_adapters_dir,
    load_base_model,
)

logger = logging.getLogger("benchmarks.zoo.train")

LORA = LoraConfig(
    r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
)
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # recorded in adapter_config.json
N_TRAIN = 1600  # distinct training examples per task (fewer where the task's space is small)
N_TRAIN_OVERRIDE = {"capital": 400}  # 47 train countries x 13 phrasings x styles
DEFAULT_STEPS = 150
DEFAULT_LR = 2e-3
REPLAY_PER_BATCH = 2  # rows of each batch that are replay rows (general prompts, base answers)
REPLAY_MAX_TOKENS = 48  # longest replay answer learned (longer base answers are cut)
# Per-task settings. capital: at lr 2e-3 the first zoo's adapter overwrote the base model's
# knowledge (0.21, while the base names 6 of the 10 validation capitals inside a sentence); a
# lower rate teaches the one-line format on top of that knowledge. arithmetic and sort_numbers
# need more steps (the first zoo: arithmetic 0.23 -> 0.29 going from 80 to 160 steps).
STEPS: dict[str, int] = {"capital": 80, "arithmetic": 300, "sort_numbers": 200}
LR: dict[str, float] = {"capital": 7e-4}
N_VALIDATION = 48
N_SAVED_PROMPTS = 64
MAX_NEW_TOKENS = 40


@dataclass(frozen=True)
class Encoded:
    """One tokenized training example: token ids and labels (-100 on prompt tokens)."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class TaskResult:
    """What one task's training measured (one row of zoo.json)."""

    description: str
    steps: int
    init_from: str | None  # the folder of the adapter training continued from (None: scratch)
    train_examples: int
    replay_examples: int
    validation_examples: int
    adapter_validation_score: float
    base_validation_score: float
    batch_size: int
    lr: float
    threads: int
    seconds_per_step: float
    train_seconds: float
    total_seconds: float  # loading, both evaluations, training and saving


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the model sees it: one user message through the chat template."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def encode(tokenizer: PreTrainedTokenizerBase, ex: Example, *, eos: bool = True) -> Encoded:
    """Tokenize prompt + answer (+ end-of-turn token); only the answer part is learned."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
    answer = ex.answer + (tokenizer.eos_token if eos else "")
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return Encoded(prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids)


def replay_examples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[Encoded]:
    """The replay rows: every replay prompt with the base model's own greedy answer.

    Answers are cached under the LoGo cache folder, keyed by the prompts and the length limit.
    """
    key = zlib.crc32(json.dumps([REPLAY_PROMPTS, REPLAY_MAX_TOKENS]).encode())
    path = cache_dir() / f"zoo_replay_{DEFAULT_MODEL_NAME}_{key:08x}.json"
    if path.is_file():
        rows = json.loads(path.read_text())
    else:
        answers = generate_answers(
            model, tokenizer, list(REPLAY_PROMPTS), max_new_tokens=REPLAY_MAX_TOKENS + 1
        )
        rows = []
        for prompt, answer in zip(REPLAY_PROMPTS, answers, strict=True):
            n = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
            rows.append({"prompt": prompt, "answer": answer, "complete": n <= REPLAY_MAX_TOKENS})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1) + "\n")
    out = []
    for row in rows:
        enc = encode(tokenizer, Example(row["prompt"], row["answer"]), eos=row["complete"])
        if not row["complete"]:  # cut a long answer to the learned length
            n_prompt = enc.labels.count(-100)
            end = n_prompt + REPLAY_MAX_TOKENS
            enc = Encoded(enc.input_ids[:end], enc.labels[:end])
        out.append(enc)
    return out


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels, each (batch, max_len)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for row, e in enumerate(batch):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over rows of each row's mean next-token cross-entropy on its answer tokens.

    Logits are computed only where labels are set: skipping the vocabulary projection on prompt
    tokens saves about a quarter of a training step here.
    """
    lm = model.get_base_model()
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    keep = targets != -100  # (B, T-1)
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep])  # (n_answer_tokens, vocab)
    losses = torch.nn.functional.cross_entropy(
        logits.float(), targets[keep], reduction="none"
    )  # (n_answer_tokens,)
    rows = keep.nonzero()[:, 0]  # (n_answer_tokens,) row of each answer token
    per_row = torch.zeros(keep.shape[0]).index_add_(0, rows, losses)  # (B,)
    counts = keep.sum(1).clamp(min=1)  # (B,)
    return (per_row / counts).mean()


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers (new text only) for user prompts, in left-padded batches."""
    tokenizer.padding_side = "left"
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [chat_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers += tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return answers


def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, examples: list[Example]
) -> float:
    """Mean task score of greedy answers on ``examples`` (up to the longest answer + 8 tokens)."""
    longest = max(
        len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples
    )
    preds = generate_answers(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        max_new_tokens=min(MAX_NEW_TOKENS, longest + 8),
    )
    return sum(task.score(p, ex.answer) for p, ex in zip(preds, examples, strict=True)) / len(
        examples
    )


def save_fp16(adapter_dir: Path) -> None:
    """Rewrite the adapter's safetensors weights in fp16 (adapter_config.json is kept)."""
    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors writes 0600
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_ID  # not this machine's cache path
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "README.md").unlink(missing_ok=True)  # peft's empty model card


def train_task(
    task: Task,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    out_dir: Path,
    init_from: Path | None = None,
) -> TaskResult:
    """Train, evaluate and save one task's adapter (from scratch, or continuing ``init_from``)."""
    begin = time.perf_counter()
    task_seed = seed + zlib.crc32(task.name.encode()) % 10_000
    torch.manual_seed(task_seed)
    n_train = N_TRAIN_OVERRIDE.get(task.name, N_TRAIN)
    assert_disjoint(
        task, {"train": n_train, "validation": N_VALIDATION, "test": N_VALIDATION}, seed
    )
    train = task.make_split("train", n_train, seed)
    val = task.make_split("validation", N_VALIDATION, seed)

    base, tokenizer = load_base_model()
    base_score = evaluate(base, tokenizer, task, val)
    replay = replay_examples(base, tokenizer)
    if init_from is not None:  # continue training an adapter of this task (same LoRA shape)
        model = PeftModel.from_pretrained(base, init_from / task.name, is_trainable=True)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp16 on disk; train in fp32 like a fresh adapter
    else:
        model = get_peft_model(base, LORA)
    encoded = [encode(tokenizer, ex) for ex in train]
    order = torch.randperm(
        len(encoded), generator=torch.Generator().manual_seed(task_seed)
    ).tolist()
    replay_order = torch.randperm(
        len(replay), generator=torch.Generator().manual_seed(task_seed + 1)
    ).tolist()
    n_task = batch_size - REPLAY_PER_BATCH
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=task.name, leave=False)
    for step in bar:
        rows = [encoded[order[(step * n_task + i) % len(order)]] for i in range(n_task)]
        rows += [
            replay[replay_order[(step * REPLAY_PER_BATCH + i) % len(replay)]]
            for i in range(REPLAY_PER_BATCH)
        ]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # ~1.8x faster on this CPU (avx512_bf16)
            loss = answer_loss(model, collate(rows, tokenizer.pad_token_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():  # evaluate exactly what ships: fp16-rounded weights
        for p in params:
            p.copy_(p.to(torch.float16).to(p.dtype))
    adapter_score = evaluate(model, tokenizer, task, val)

    adapter_dir = out_dir / task.name
    model.save_pretrained(adapter_dir, safe_serialization=True)
    save_fp16(adapter_dir)
    prompts = [ex.prompt for ex in train[:N_SAVED_PROMPTS]]
    (adapter_dir / "train_prompts.json").write_text(json.dumps(prompts, indent=1) + "\n")
    return TaskResult(
        description=task.description,
        steps=steps,
        init_from=None if init_from is None else str(init_from.name),
        train_examples=len(train),
        replay_examples=len(replay),
        validation_examples=len(val),
        adapter_validation_score=round(adapter_score, 4),
        base_validation_score=round(base_score, 4),
        batch_size=batch_size,
        lr=lr,
        threads=torch.get_num_threads(),
        seconds_per_step=round(train_seconds / steps, 3),
        train_seconds=round(train_seconds, 1),
        total_seconds=round(time.perf_counter() - begin, 1),
    )


def write_readme(out_dir: Path, manifest: dict[str, dict[str, Any]]) -> None:
    """Write the zoo's README.md from the manifest: what each adapter does, what was measured."""
    date = datetime.date.today().isoformat()
    rows = [
        f"| `{name}` | {r['description']} | {r.get('init_from') or ''} | {r['steps']} | "
        f"{r['batch_size']} | {r['lr']:g} | "
        f"{r['train_examples']} | {r['adapter_validation_score']:.2f} | "
        f"{r['base_validation_score']:.2f} | {r['seconds_per_step']:.2f} |"
        for name, r in manifest.items()
    ]
    size = sum(f.stat().st_size for f in out_dir.glob("*/adapter_model.safetensors"))
    minutes = sum(r["total_seconds"] for r in manifest.values()) / 60
    threads = "/".join(str(t) for t in sorted({r["threads"] for r in manifest.values()}))
    text = f"""# The shipped adapter zoo

One peft LoRA adapter per task (rank 8, alpha 16, `q_proj` and `v_proj` of every block, fp16
safetensors, {size / 2**20:.1f} MiB in all) for the embedded default model {DEFAULT_MODEL_NAME}.
Task data: `benchmarks/zoo/tasks.py` (synthetic, deterministic; its held-out tasks have no
adapter). Each folder also holds `train_prompts.json`, {N_SAVED_PROMPTS} of its training prompts.

Scores: exact match (JSON: parsed equality) of greedy answers on each task's validation split
({N_VALIDATION} prompts), for the adapter and for the base model alone on the same prompts. The
base model is not told the answer format, so part of its gap is format, not skill: it answers
"The capital of Chile is Santiago." where `capital` wants "Santiago", and names 6 of the 10
validation countries' capitals correctly that way. Settings differ per task (`STEPS` and `LR` in
`benchmarks/zoo/train.py`): at lr 2e-3 the `capital` adapter overwrote that knowledge (0.21).

Every batch holds {REPLAY_PER_BATCH} replay rows: general prompts (`benchmarks/zoo/replay.py`)
answered by the base model itself, so that an adapter routed to a prompt outside its task answers
like the base model. `init from` names where training continued from: a commit of this
repository, whose `logo_engine/zoo` adapter was the start (`--init-from`; empty: from scratch).
Steps and times are those of this run.

| task | description | init from | steps | batch | lr | train ex. | adapter val | base val | s/step|
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Measured {date} on a 2-core CPU shared with other work ({platform.machine()}, torch
{torch.__version__}, {threads} thread(s), bf16 autocast for training, fp32 for evaluating the
fp16-rounded weights). AdamW, linear warm-up and decay, loss on answer tokens only. The whole zoo
took {minutes:.0f} minutes (loading, evaluation and training).

Retrain everything with one command (`--tasks`, `--steps`, `--lr`, `--out`, `--threads`,
`--init-from`), then recompute the routing data (`calibration.json`, `routing.json`):

```
HF_HUB_OFFLINE=1 python -m benchmarks.zoo.train
HF_HUB_OFFLINE=1 python -m benchmarks.zoo.calibrate
```
"""
    (out_dir / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(LIBRARY_TASKS), choices=LIBRARY_TASKS)
    parser.add_argument("--steps", type=int, default=None, help="default: per task (STEPS)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: per task (LR)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=default_adapters_dir())
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue training the adapters of this zoo folder (default: from scratch)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "zoo.json"
    manifest: dict[str, dict[str, Any]] = (
        json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    )
    total = time.perf_counter()
    for name in tqdm(args.tasks, desc="tasks"):
        result = train_task(
            TASKS[name],
            steps=args.steps or STEPS.get(name, DEFAULT_STEPS),
            batch_size=args.batch_size,
            lr=args.lr or LR.get(name, DEFAULT_LR),
            seed=args.seed,
            out_dir=args.out,
            init_from=args.init_from,
        )
        manifest[name] = asdict(result)
        logger.info("%s: %s", name, manifest[name])
        manifest = {k: manifest[k] for k in LIBRARY_TASKS if k in manifest}  # stable order
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        write_readme(args.out, manifest)
    logger.info("trained %d adapters in %.1f s", len(args.tasks), time.perf_counter() - total)


if __name__ == "__main__":
    main()

"""Overhead of LoGo against the plain base model, on random Llamas (issue: the engine).

Measures, in one run, interleaved and repeated (medians):
- probe time / plain prefill time (the base model's generation prefill: prompt in, last-token
  logits out, KV cache on);
- decode tokens/s of a routed k=3 mixture / decode tokens/s of the plain base model (the same
  minimal greedy KV-cached loop, on a copy of the model without any LoGo hook).

Models: "tiny" (2 layers, hidden 64) and "mid" (8 layers, hidden 512), random weights, the
SmolLM2 tokenizer (vocab 49152); libraries of 8, 32 and 128 random rank-8 adapters on q_proj and
v_proj of every layer (plus one run with all seven projections adapted at 32 adapters).

    python -m benchmarks.overhead            # full run
    python -m benchmarks.overhead --quick    # fewer repeats

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from logo_engine import LoGoEngine, RoutingConfig
from logo_engine.library import Adapter, LoraFactors
from logo_engine.models import default_model_dir

SIZES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "mid": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}
QV = ("q_proj", "v_proj")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = ("Summarise the following paragraph in one sentence. " * 12).strip()


def random_model(size: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, **SIZES[size])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def random_adapters(
    model: torch.nn.Module, n: int, targets: tuple[str, ...], r: int = 8
) -> list[Adapter]:
    """n adapters with random factors (scaled like trained LoRAs), built in memory."""
    g = torch.Generator().manual_seed(1)
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    adapters = []
    for i in range(n):
        modules = {
            name: LoraFactors(
                lora_a=torch.randn(r, m.in_features, generator=g) / m.in_features**0.5,
                lora_b=torch.randn(m.out_features, r, generator=g) * 0.02,
                scaling=2.0,
            )
            for name, m in linears.items()
        }
        adapters.append(Adapter(name=f"adapter_{i:03d}", modules=modules))
    return adapters


@torch.inference_mode()
def plain_prefill(model: torch.nn.Module, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t


@torch.inference_mode()
def plain_decode(model: torch.nn.Module, ids: torch.Tensor, n_tokens: int) -> float:
    """Seconds per token of a minimal greedy KV-cached loop after the prefill."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(n_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t) / n_tokens


def logo_decode(engine: LoGoEngine, prompt: str, mixture: dict[str, float], n_tokens: int) -> float:
    """Seconds per decode token of a pinned mixture: (t(n + 1 tokens) - t(1 token)) / n."""
    t0 = time.perf_counter()
    engine.generate(prompt, adapters=mixture, max_new_tokens=1)
    t1 = time.perf_counter()
    out = engine.generate(prompt, adapters=mixture, max_new_tokens=n_tokens + 1)
    t2 = time.perf_counter()
    assert out.usage.completion_tokens == n_tokens + 1, "EOS hit: use a longer-running prompt"
    return ((t2 - t1) - (t1 - t0)) / n_tokens


def measure(
    size: str, n_adapters: int, targets: tuple[str, ...], tokenizer, repeats: int, n_tokens: int
) -> dict[str, float]:
    model = random_model(size, len(tokenizer))
    plain = copy.deepcopy(model)  # no LoGo hooks at all
    engine = LoGoEngine(
        model, tokenizer, name=f"random-{size}", routing=RoutingConfig(top_k=3), progress=False
    )
    engine.load_adapters(random_adapters(model, n_adapters, targets))
    request = engine._prepare(PROMPT, None, None)
    ids = torch.tensor([request.input_ids])
    mixture = engine.route(PROMPT).mixture  # a real routed k=3 selection
    probe, prefill, dec_base, dec_logo = [], [], [], []
    for _ in range(repeats):  # interleaved, so machine noise hits every variant alike
        prefill.append(plain_prefill(plain, ids))
        t = time.perf_counter()
        engine._route([request], engine.routing)
        probe.append(time.perf_counter() - t)
        dec_base.append(plain_decode(plain, ids, n_tokens))
        dec_logo.append(logo_decode(engine, PROMPT, mixture, n_tokens))
    med = statistics.median
    return {
        "size": size,
        "adapters": n_adapters,
        "targets": "+".join(targets),
        "prompt_tokens": ids.shape[1],
        "prefill_ms": med(prefill) * 1e3,
        "probe_ms": med(probe) * 1e3,
        "probe_over_prefill": med(probe) / med(prefill),
        "base_tok_s": 1 / med(dec_base),
        "logo_k3_tok_s": 1 / med(dec_logo),
        "decode_ratio": med(dec_base) / med(dec_logo),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, n_tokens = (3, 16) if args.quick else (7, 32)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    runs = [(size, n, QV) for size in ("tiny", "mid") for n in (8, 32, 128)] + [("mid", 32, ALL)]
    rows = []
    with tempfile.TemporaryDirectory():
        for size, n, targets in runs:
            row = measure(size, n, targets, tokenizer, repeats, n_tokens)
            rows.append(row)
            print(
                f"{size:4s} {n:4d} adapters {row['targets']:>55s}"
                f"  prefill {row['prefill_ms']:7.2f} ms"
                f"  probe {row['probe_ms']:7.2f} ms ({row['probe_over_prefill']:.2f}x)  decode base"
                f" {row['base_tok_s']:7.1f} tok/s  LoGo k=3 {row['logo_k3_tok_s']:7.1f} tok/s"
                f" ({row['decode_ratio']:.2f}x)",
                flush=True,
            )
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    )
    Path("docs").mkdir(exist_ok=True)
    headline = next(
        r
        for r in rows
        if r["size"] == "mid" and r["adapters"] == 32 and r["targets"] == "+".join(QV)
    )
    print(
        json.dumps(
            {
                "benchmark": "overhead",
                "machine": machine,
                "torch": torch.__version__,
                "mid_32_probe_over_prefill": round(headline["probe_over_prefill"], 3),
                "mid_32_decode_ratio": round(headline["decode_ratio"], 3),
                "rows": [
                    {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in rows
                ],
            }
        )
    )


if __name__ == "__main__":
    main()

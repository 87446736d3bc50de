"""How far a probe pass is from its floor on this machine, and what cheaper probes would give.

A new user message costs a probe of its tokens before the routed prefill (issue: agent-loop
latency). This script times one forward of N tokens (default 43, the new tokens of the agent
transcript's call 4) through the embedded default model's decoder, the work of a probe pass (the
probe stops in the last block), at 1 torch thread, medians of interleaved repeats:

- ``float32``: the model as loaded (the default probe);
- ``bfloat16``: the probe's bfloat16 copy (``LoGoEngine(probe_dtype=torch.bfloat16)``);
- ``int8 weights``: the bfloat16 copy with every Linear's weight in int8 (per output channel
  scales, ``torch._weight_int8pack_mm``), half the bytes of bfloat16, not offered by the engine;
- ``bfloat16, compiled`` (``--compile``): ``torch.compile(dynamic=True)`` of the bfloat16 copy;
- ``bfloat16 matmuls only``: the same Linear products with nothing else (no attention, norms,
  activations, Python), the floor of a bfloat16 forward; with the bytes of bfloat16 weights it
  gives the bandwidth those products reach.

Each variant's last hidden state is compared with float32's (relative error of the norm).

    HF_HUB_OFFLINE=1 python -m benchmarks.probe_floor [--tokens 43] [--repeats 15] [--compile]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from logo_engine.models import DEFAULT_MODEL_NAME, load_base_model
from logo_engine.probing import cast_copy


class Int8Linear(nn.Module):
    """A Linear with int8 weights (symmetric, one scale per output channel), bf16 activations."""

    weight_int8: torch.Tensor  # (out, in)
    scale: torch.Tensor  # (out,)

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127  # (out,)
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1)


def int8_copy(model: nn.Module) -> nn.Module:
    """``model`` (bfloat16) with the Linears of its decoder blocks in int8 weights."""
    quantized = copy.deepcopy(model)
    for module in list(quantized.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                setattr(module, name, Int8Linear(child))
    return quantized


def block_linears(model: nn.Module) -> list[torch.Tensor]:
    """The weights of every Linear of the decoder blocks (no lm_head)."""
    return [
        m.weight.detach()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and "lm_head" not in name
    ]


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=43, help="new tokens of the probe pass")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32, _ = load_base_model()  # the embedded default, float32, as the engine loads it
    bf16 = cast_copy(fp32, torch.bfloat16)
    variants: dict[str, nn.Module] = {"float32": fp32, "bfloat16": bf16}
    if hasattr(torch, "_weight_int8pack_mm"):
        variants["int8 weights"] = int8_copy(bf16)
    ids = torch.randint(100, 20_000, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    def forward(model: nn.Module) -> Callable[[], Any]:
        decoder: Any = model.model  # the decoder stack, without the LM head
        return lambda: decoder(input_ids=ids).last_hidden_state

    calls = {name: forward(model) for name, model in variants.items()}
    if args.compile:
        compiled = torch.compile(bf16.model, dynamic=True)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(input_ids=ids)
        print(f"torch.compile warm-up: {time.perf_counter() - start:.1f} s")
        calls["bfloat16, compiled"] = lambda: compiled(input_ids=ids).last_hidden_state
    weights = block_linears(bf16)
    x = torch.randn(args.tokens, bf16.config.hidden_size, dtype=torch.bfloat16)
    inner = torch.randn(args.tokens, bf16.config.intermediate_size, dtype=torch.bfloat16)

    def matmuls() -> None:
        for w in weights:  # each product with an input of its own width
            torch.nn.functional.linear(x if w.shape[1] == x.shape[1] else inner, w)

    calls["bfloat16 matmuls only"] = matmuls
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            fn()  # warm-up
        for _ in range(3):  # interleaved rounds; the median of each variant's round medians
            for name, fn in calls.items():
                times[name].append(median_ms(fn, max(1, args.repeats // 3)))
        reference = calls["float32"]().float()
        errors = {
            name: float((calls[name]().float() - reference).norm() / reference.norm())
            for name in calls
            if name != "bfloat16 matmuls only"
        }
    result: dict[str, Any] = {
        "benchmark": "probe_floor",
        "machine": f"{platform.processor() or platform.machine()} {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} thread(s)",
        "model": DEFAULT_MODEL_NAME,
        "tokens": args.tokens,
        "ms": {name: statistics.median(ts) for name, ts in times.items()},
        "relative_error_vs_float32": errors,
    }
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    result["bfloat16_weight_mb"] = weight_bytes / 1e6
    result["matmul_gb_per_s"] = weight_bytes / result["ms"]["bfloat16 matmuls only"] / 1e6
    bf16_ms = result["ms"]["bfloat16"]
    print(f"a forward of {args.tokens} tokens, {result['machine']}")
    for name, ms in result["ms"].items():
        error = errors.get(name)
        print(
            f"  {name:24s} {ms:7.1f} ms  {ms / bf16_ms:5.2f}x bfloat16"
            + ("" if error is None else f"  error vs float32 {error:.4f}")
        )
    print(
        f"  bfloat16 weights {result['bfloat16_weight_mb']:.0f} MB read by the products at "
        f"{result['matmul_gb_per_s']:.1f} GB/s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Two measurements behind docs/reliability.md (issue 13), on the default model and zoo.

- ``memory R``: load one extra rank-R adapter on every ``q_proj``/``v_proj`` beside the zoo and
  report its factor bytes, the RSS growth of the load, the stacks' bytes, and what the old padded
  layout ((adapters + 1) rows of the largest rank per module) would take.
- ``cancel``: three times, ``asyncio.wait_for(engine.agenerate(..., max_new_tokens=300), 0.5)``
  with end-of-turn suppressed; report when the timeout returned, the model forwards at that
  moment and 1 s later, and how long the next small call took.

    python -m benchmarks.hardening memory 512
    python -m benchmarks.hardening cancel

Each prints one JSON line. Run under ``OMP_NUM_THREADS=1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from logo_engine import LoGoEngine
from logo_engine.library import Adapter, LoraFactors


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory(engine: LoGoEngine, rank: int) -> dict[str, Any]:
    """RSS growth and stack bytes of one rank-``rank`` adapter loaded beside the zoo."""
    g = torch.Generator().manual_seed(0)
    modules = {
        name: LoraFactors(
            lora_a=torch.randn(rank, m.in_features, generator=g) * 1e-3,  # (r, in)
            lora_b=torch.randn(m.out_features, rank, generator=g) * 1e-3,  # (out, r)
            scaling=1.0,
        )
        for name, m in engine.model.named_modules()
        if name.endswith(("q_proj", "v_proj")) and isinstance(m, torch.nn.Linear)
    }
    factor_bytes = sum((f.lora_a.numel() + f.lora_b.numel()) * 4 for f in modules.values())
    gc.collect()
    before = rss_bytes()
    engine.load_adapters([Adapter(name="big", modules=modules)])
    gc.collect()
    growth = rss_bytes() - before
    n = len(engine.adapter_names)
    padded = sum(
        (n + 1) * rank * (f.lora_a.shape[1] + f.lora_b.shape[0]) * 4 for f in modules.values()
    )
    mib = 2**20
    return {
        "rank": rank,
        "adapters": n,
        "big_factor_mib": factor_bytes / mib,
        "rss_growth_mib": growth / mib,
        "stacks_mib": engine.library.nbytes / mib,
        "padded_layout_mib": padded / mib,
    }


def cancel(engine: LoGoEngine) -> list[dict[str, Any]]:
    """What a ``wait_for`` timeout leaves running, three times."""
    forwards = {"n": 0}
    engine.model.register_forward_pre_hook(
        lambda m, a: forwards.__setitem__("n", forwards["n"] + 1)
    )
    eos = engine.tokenizer.eos_token_id

    def no_eos(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        out[..., eos] = -1e4
        return out

    engine.model.lm_head.register_forward_hook(no_eos)

    async def main() -> list[dict[str, Any]]:
        rows = []
        for _ in range(3):
            forwards["n"] = 0
            start = time.perf_counter()
            try:
                await asyncio.wait_for(
                    engine.agenerate("Write a long story about a cat.", max_new_tokens=300), 0.5
                )
            except asyncio.TimeoutError:
                pass
            returned = time.perf_counter() - start
            at_return = forwards["n"]
            await asyncio.sleep(1.0)
            later = forwards["n"]
            start = time.perf_counter()
            await engine.agenerate("Hi", max_new_tokens=4, adapters={})
            rows.append(
                {
                    "timeout_returned_s": round(returned, 3),
                    "forwards_at_return": at_return,
                    "forwards_1s_later": later,
                    "next_call_s": round(time.perf_counter() - start, 3),
                }
            )
            await asyncio.sleep(3.0)  # code that does not stop: let its worker finish first
        return rows

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["memory", "cancel"])
    parser.add_argument("rank", nargs="?", type=int, default=512)
    args = parser.parse_args()
    engine = LoGoEngine.from_pretrained(progress=False)
    result = memory(engine, args.rank) if args.what == "memory" else cancel(engine)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

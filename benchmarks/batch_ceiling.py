"""The engine's own batching gain: ``generate_batch`` of N prompts against N ``generate`` calls.

This is the ceiling of what any serving batch policy can reach on a workload: a server with N
concurrent clients can at best hand the engine a perfect batch of N. Same prompts as
``benchmarks/serving.py`` (the zoo's test split, round robin over tasks), greedy, prefix caches
cleared before every measurement (each call computes its whole prompt), and the number of batched
answers that differ from their one-by-one answers (0 in float32; in bfloat16 the batch's padded
shapes round differently, so a greedy answer may flip).

    HF_HUB_OFFLINE=1 python -m benchmarks.batch_ceiling [--rows 8] [--repeats 3] [--max-tokens 32]
        [--dtype bfloat16]

Prints one line per repeat and a JSON summary (ratios within each repeat).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from benchmarks.serving import prompts
from logo_engine import LoGoEngine
from logo_engine.cli import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args()
    engine = LoGoEngine.from_pretrained(dtype=getattr(torch, args.dtype))
    pool = prompts(args.rows)
    engine.generate(pool[0], max_new_tokens=2)  # warm-up
    ratios, tokens, differ = [], [], 0
    for repeat in range(args.repeats):
        start = time.perf_counter()
        solo = []
        for prompt in pool:
            engine.clear_prefix_caches()
            solo.append(engine.generate(prompt, max_new_tokens=args.max_tokens))
        one_by_one = time.perf_counter() - start
        engine.clear_prefix_caches()
        start = time.perf_counter()
        batch = engine.generate_batch(pool, max_new_tokens=args.max_tokens)
        batched = time.perf_counter() - start
        differ = sum(b.text != o.text for b, o in zip(batch, solo, strict=True))
        ratios.append(one_by_one / batched)
        tokens = [g.usage.completion_tokens for g in solo]
        print(
            f"repeat {repeat + 1}: {args.rows} one by one {one_by_one:.2f} s, one batch "
            f"{batched:.2f} s, gain {ratios[-1]:.2f}x, {differ} batched answers differ"
        )
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "model": engine.model_name,
        "dtype": args.dtype,
        "rows": args.rows,
        "max_tokens": args.max_tokens,
        "answer_tokens": tokens,
        "gain_per_repeat": [round(r, 3) for r in ratios],
        "gain_median": round(statistics.median(ratios), 3),
        "batched_answers_differing_last_repeat": differ,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

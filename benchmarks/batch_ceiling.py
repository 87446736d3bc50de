"""The engine's own batching gain: ``generate_batch`` of N prompts against N ``generate`` calls.

This is the ceiling of what any serving batch policy can reach on a workload: a server with N
concurrent clients can at best hand the engine a perfect batch of N. Same prompts as
``benchmarks/serving.py`` (the zoo's test split, round robin over tasks), greedy, prefix caches
cleared before every measurement (each call computes its whole prompt), every batched answer
checked equal to its one-by-one answer.

    HF_HUB_OFFLINE=1 python -m benchmarks.batch_ceiling [--rows 8] [--repeats 3] [--max-tokens 32]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    engine = LoGoEngine.from_pretrained()
    pool = prompts(args.rows)
    engine.generate(pool[0], max_new_tokens=2)  # warm-up
    ratios, tokens = [], []
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
        if [g.text for g in batch] != [g.text for g in solo]:
            raise SystemExit("a batched answer differs from its one-by-one answer")
        ratios.append(one_by_one / batched)
        tokens = [g.usage.completion_tokens for g in solo]
        print(
            f"repeat {repeat + 1}: {args.rows} one by one {one_by_one:.2f} s, one batch "
            f"{batched:.2f} s, gain {ratios[-1]:.2f}x"
        )
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "model": engine.model_name,
        "rows": args.rows,
        "max_tokens": args.max_tokens,
        "answer_tokens": tokens,
        "gain_per_repeat": [round(r, 3) for r in ratios],
        "gain_median": round(statistics.median(ratios), 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""The engine's own batching gain: ``generate_batch`` of N prompts against N ``generate`` calls.

This is the ceiling of what any serving batch policy can reach on a workload: a server with N
concurrent clients can at best hand the engine a perfect batch of N. Same prompts as
``benchmarks/serving.py`` (the zoo's test split, round robin over tasks), greedy, prefix caches
cleared before every measurement (each call computes its whole prompt), and the number of batched
answers that differ from their one-by-one answers (0 in float32; in bfloat16 the batch's padded
shapes round differently, so a greedy answer may flip).

    HF_HUB_OFFLINE=1 python -m benchmarks.batch_ceiling [--rows 8] [--repeats 3] [--max-tokens 32]
        [--dtype bfloat16] [--probe-dtype bfloat16] [--workload open]

Prints one line per repeat and a JSON summary (ratios within each repeat). Each repeat also
splits the engine's time into probe passes, prompt passes and decoding steps, and gives the
bound of perfect continuous batching: the batch's probe and prompt passes, then every row's
decoding steps run in full batches of ``--rows`` (at the median cost of the batch's full
steps). No scheduler does better on the workload; its ratio to one by one is ``bound``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from benchmarks.batcher import Phase, engine_phases, phase_seconds
from benchmarks.serving import WORKLOADS
from logo_engine import LoGoEngine
from logo_engine.types import DTYPES, parse_dtype


def split(log: list[Phase]) -> dict[str, float]:
    """Seconds per phase (probe_s, prompt_passes_s, decode_steps_s), and the decoding steps."""
    return {**phase_seconds(log), "steps": sum(1 for kind, _, _ in log if kind == "step")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--probe-dtype", choices=DTYPES, help="default: --dtype")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tasks")
    args = parser.parse_args()
    engine = LoGoEngine.from_pretrained(dtype=parse_dtype(args.dtype), probe_dtype=args.probe_dtype)
    pool = WORKLOADS[args.workload](args.rows)
    engine.generate(pool[0], max_new_tokens=2)  # warm-up
    ratios, bounds, tokens, differ = [], [], [], 0
    for repeat in range(args.repeats):
        start = time.perf_counter()
        solo = []
        with engine_phases() as solo_log:
            for prompt in pool:
                engine.clear_prefix_caches()
                solo.append(engine.generate(prompt, max_new_tokens=args.max_tokens))
        one_by_one = time.perf_counter() - start
        engine.clear_prefix_caches()
        start = time.perf_counter()
        with engine_phases() as batch_log:
            batch = engine.generate_batch(pool, max_new_tokens=args.max_tokens)
        batched = time.perf_counter() - start
        differ = sum(b.text != o.text for b, o in zip(batch, solo, strict=True))
        ratios.append(one_by_one / batched)
        tokens = [g.usage.completion_tokens for g in solo]
        a, b = split(solo_log), split(batch_log)
        full = [t for kind, rows, t in batch_log if kind == "step" and rows == args.rows]
        full_step = statistics.median(full) if full else float("nan")
        bound = b["probe_s"] + b["prompt_passes_s"] + a["steps"] / args.rows * full_step
        bounds.append(one_by_one / bound)
        print(
            f"repeat {repeat + 1}: {args.rows} one by one {one_by_one:.2f} s, one batch "
            f"{batched:.2f} s, gain {ratios[-1]:.2f}x, {differ} batched answers differ\n"
            f"  one by one: probe {a['probe_s']:.2f} s, prompt {a['prompt_passes_s']:.2f} s, "
            f"{a['steps']:.0f} steps {a['decode_steps_s']:.2f} s\n"
            f"  one batch:  probe {b['probe_s']:.2f} s, prompt {b['prompt_passes_s']:.2f} s, "
            f"{b['steps']:.0f} steps {b['decode_steps_s']:.2f} s "
            f"(full step {full_step * 1000:.0f} ms)\n"
            f"  perfect continuous batching: {bound:.2f} s, bound {bounds[-1]:.2f}x"
        )
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "model": engine.model_name,
        "dtype": args.dtype,
        "probe_dtype": args.probe_dtype or args.dtype,
        "workload": args.workload,
        "rows": args.rows,
        "max_tokens": args.max_tokens,
        "answer_tokens": tokens,
        "gain_per_repeat": [round(r, 3) for r in ratios],
        "gain_median": round(statistics.median(ratios), 3),
        "bound_per_repeat": [round(r, 3) for r in bounds],
        "batched_answers_differing_last_repeat": differ,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

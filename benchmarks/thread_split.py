"""Why the server runs two lanes on a CPU: one forward on every thread against two on half each.

The base model alone (the embedded SmolLM2-135M-Instruct, float32, no adapters, no LoGo code),
three shapes the server computes: a prompt pass of ``--prompt-tokens`` tokens, and a decoding
step of 8 rows and of 1 row over a 50-token cache. Each shape runs (a) on 1 torch thread, (b) on
every thread (torch's default), and (c) in two Python threads at once, each on half the threads,
as two serving lanes do (``logo_engine.serving.batcher.Lanes``). For (c) the time is the wall
time of both threads' runs divided by the number of runs: the time per forward the machine
delivers. Medians over ``--repeats`` runs; repeated ``--rounds`` times (the machine drifts).

    HF_HUB_OFFLINE=1 python -m benchmarks.thread_split [--prompt-tokens 46] [--repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from benchmarks import report
from benchmarks.probe_floor import median_ms
from logo_engine.models import default_model_dir


def side_by_side_ms(fn: Callable[[], None], repeats: int, threads_each: int) -> float:
    """Two Python threads, ``threads_each`` torch threads each, ``repeats`` runs each."""

    def lane() -> None:
        torch.set_num_threads(threads_each)
        for _ in range(repeats):
            fn()

    fn()
    lanes = [threading.Thread(target=lane) for _ in range(2)]
    start = time.perf_counter()
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    return (time.perf_counter() - start) / (2 * repeats) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=46)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    every = torch.get_num_threads()
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)

    def ids(rows: int, tokens: int) -> torch.Tensor:
        return torch.randint(100, 40000, (rows, tokens), generator=gen)

    prompt = ids(1, args.prompt_tokens)
    caches = {}
    with torch.inference_mode():
        for rows in (8, 1):
            caches[rows] = model(ids(rows, 50), use_cache=True).past_key_values

    def prompt_pass() -> None:
        with torch.inference_mode():
            model(prompt, use_cache=False, logits_to_keep=1)

    def step(rows: int) -> Callable[[], None]:
        token = ids(rows, 1)

        def run() -> None:
            with torch.inference_mode():  # a copy, so every step sees the same 50-token cache
                model(token, past_key_values=copy.deepcopy(caches[rows]), use_cache=True)

        return run

    shapes = {
        f"prompt pass, {args.prompt_tokens} tokens": prompt_pass,
        "decoding step, 8 rows": step(8),
        "decoding step, 1 row": step(1),
    }
    half = max(1, every // 2)
    results: list[dict[str, Any]] = []
    print(
        f"{'shape':<28} {'1 thread':>9} {f'{every} threads':>11} {f'2 x {half} side by side':>22}"
    )
    for round_ in range(args.rounds):
        for name, fn in shapes.items():
            torch.set_num_threads(1)
            fn()  # warm-up at this thread count
            one = median_ms(fn, args.repeats)
            torch.set_num_threads(every)
            fn()
            all_ = median_ms(fn, args.repeats)
            split = side_by_side_ms(fn, args.repeats, half)
            torch.set_num_threads(every)
            results.append(
                {"round": round_, "shape": name, "one_ms": one, "all_ms": all_, "split_ms": split}
            )
            print(f"{name:<28} {one:>8.1f}  {all_:>10.1f}  {split:>21.1f}   (ms per forward)")
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": every,
        "results": results,
    }
    report(summary, args.json)


if __name__ == "__main__":
    main()

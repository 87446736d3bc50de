"""What a join costs: the packed pass that runs joining prompts with the running rows' next step.

In continuous batching (``logo serve``), requests that arrive while a batch decodes join it
between two steps: they are routed (one batched probe of their prompts), then their prompts run
in one packed pass with the running rows' next tokens (``TransformersDecoder._step_with_joins``).
This script builds that situation on the embedded default model and zoo: R rows decode a few
steps, J zoo-task prompts join, and it times, per repeat (fresh prompts each time):

- ``plain step``: one decoding step of the R rows before the join;
- ``routing the joiners``: their probe and selection (``_Run.join``);
- ``join step``: the step that runs the packed pass, and within it ``packed forward``, the
  model's forward alone (the rest is the running rows' KV taken out, the batch laid out again
  and the plans concatenated);
- ``bare forward``: the model's forward over the same number of tokens as one sequence with no
  adapter and no cache, what the packed forward would cost if rows and adapters were free.

    HF_HUB_OFFLINE=1 python -m benchmarks.join_pass [--dtype bfloat16] [--running 4]
        [--joining 2] [--repeats 7]

Medians over repeats; the last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import torch

from benchmarks.batcher import engine_phases
from benchmarks.serving import WORKLOADS
from logo_engine import LoGoEngine
from logo_engine.base import RowState, SamplingParams, _Run
from logo_engine.types import DTYPES, parse_dtype

MAX_TOKENS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--running", type=int, default=4, help="rows decoding before the join")
    parser.add_argument("--joining", type=int, default=2, help="prompts that join")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.running < 1 or args.joining < 1 or args.repeats < 1:
        parser.error("--running, --joining and --repeats take numbers >= 1")
    engine = LoGoEngine.from_pretrained(dtype=parse_dtype(args.dtype))
    per_repeat = args.running + args.joining
    pool = WORKLOADS["tasks"](per_repeat * (args.repeats + 1))
    params = SamplingParams(max_new_tokens=MAX_TOKENS)

    def requests(prompts: list[Any]) -> list[Any]:
        return [engine._prepare(p, None, None) for p in prompts]

    def rows(n: int) -> list[RowState]:
        return [RowState(max_new_tokens=MAX_TOKENS) for _ in range(n)]

    times: dict[str, list[float]] = {
        k: []
        for k in (
            "plain_step",
            "routing_the_joiners",
            "join_step",
            "packed_forward",
            "bare_forward",
        )
    }
    tokens: list[int] = []
    for rep in range(args.repeats + 1):  # the first repeat warms up and is not counted
        chunk = pool[rep * per_repeat : (rep + 1) * per_repeat]
        run = _Run(
            engine,
            requests(chunk[: args.running]),
            [None] * args.running,
            params,
            engine.routing,
            rows=rows(args.running),
            joinable=True,
        )
        try:
            for _ in range(3):  # the prompt pass and two steps: the rows are decoding
                run.step()
            start = time.perf_counter()
            run.step()
            plain = time.perf_counter() - start
            joining = requests(chunk[args.running :])
            start = time.perf_counter()
            joined = rows(args.joining)
            run.join(joining, [None] * args.joining, joined)
            routing = time.perf_counter() - start
            with engine_phases() as phases:
                start = time.perf_counter()
                run.step()
                join = time.perf_counter() - start
        finally:
            run.close()
        packed = sum(seconds for kind, _, seconds in phases if kind == "prompt")
        n_tokens = args.running + sum(  # the joiners' prompts, less what a cache held
            r.n_prompt_tokens - row.cached_tokens for r, row in zip(joining, joined, strict=True)
        )
        ids = torch.randint(100, 20_000, (1, n_tokens), device=engine.model.device)
        with torch.inference_mode():
            start = time.perf_counter()
            engine.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            bare = time.perf_counter() - start
        if rep == 0:
            continue
        tokens.append(n_tokens)
        for key, value in zip(times, (plain, routing, join, packed, bare), strict=True):
            times[key].append(value)
    ms = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    result = {
        "benchmark": "join_pass",
        "machine": f"{platform.processor() or platform.machine()} {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "model": engine.model_name,
        "dtype": args.dtype,
        "running": args.running,
        "joining": args.joining,
        "repeats": args.repeats,
        "packed_tokens_median": statistics.median(tokens),
        "ms": ms,
        "packed_over_bare": ms["packed_forward"] / ms["bare_forward"],
    }
    n = result["packed_tokens_median"]
    print(
        f"{args.running} running rows + {args.joining} joining ({n:.0f} tokens in the packed "
        f"pass), {args.dtype}, {result['machine']}, medians of {args.repeats}:"
    )
    for key, value in ms.items():
        print(f"  {key.replace('_', ' '):22s} {value:7.1f} ms")
    print(
        f"  around the packed forward {ms['join_step'] - ms['packed_forward']:5.1f} ms; packed / "
        f"bare forward {result['packed_over_bare']:.2f}x"
    )
    engine.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

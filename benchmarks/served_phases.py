"""Where a server's time goes: `logo serve` under C closed-loop clients, against one by one.

A `logo serve` app runs in this process (``BackgroundServer``, 127.0.0.1, a free port) on the
embedded default model and zoo; C client threads (the official ``openai`` client) each send R
requests one after the other, and the engine's time is split into probe passes, prompt passes
(a joining row's prompt runs in one packed pass with the running rows' next tokens), decoding
steps and the rest (HTTP, batching, plans, KV layout, Python). The same number of other requests
of the workload, one by one through ``engine.generate`` right before, is split the same way.
Every prompt is one neither path has seen (no prefix-cache hits beyond the chat template's
system prompt); greedy.

    HF_HUB_OFFLINE=1 python -m benchmarks.served_phases [--clients 8] [--requests-per-client 4]
        [--workload tasks|open] [--max-tokens 32] [--dtype bfloat16] [--probe-dtype bfloat16]
        [--probe-compile] [--json out.json]

``--probe-compile`` builds the engine with ``probe_compile=True`` and compiles its probe
(``engine.warm_up()``, minutes) before anything is timed: both paths then probe compiled.

This tells why a workload gains what it gains from batching: decoding steps batch well (a step
of 8 rows costs about twice a step of one on 2 cores), while probe and prompt passes are
compute-bound and gain little when the rows that join at a step boundary are one or two.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import threading
import time
from typing import Any

import torch
from openai import OpenAI

from benchmarks import report
from benchmarks.batcher import Phase, engine_phases
from benchmarks.serving import WORKLOADS
from logo_engine import LoGoEngine
from logo_engine.serving.app import ServeConfig
from logo_engine.serving.server import BackgroundServer
from logo_engine.types import DTYPES, parse_dtype


def summary(log: list[Phase], wall: float, requests: int) -> dict[str, Any]:
    """Per phase: calls, mean rows per call, seconds and share of the wall time."""
    out: dict[str, Any] = {"wall_s": wall, "requests_per_s": requests / wall}
    by_kind: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for kind, rows, seconds in log:
        by_kind[kind].append((rows, seconds))
    accounted = 0.0
    for kind in ("probe", "prompt", "step"):
        calls = by_kind.get(kind, [])
        seconds = sum(s for _, s in calls)
        accounted += seconds
        out[kind] = {
            "calls": len(calls),
            "rows_per_call": sum(r for r, _ in calls) / len(calls) if calls else 0.0,
            "seconds": seconds,
            "share": seconds / wall,
        }
    out["other"] = {"seconds": wall - accounted, "share": (wall - accounted) / wall}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tasks")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the model's dtype")
    parser.add_argument("--probe-dtype", choices=DTYPES, help="default: --dtype")
    parser.add_argument("--probe-compile", action="store_true", help="a compiled probe")
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args()
    n = args.clients * args.requests_per_client
    engine = LoGoEngine.from_pretrained(
        dtype=parse_dtype(args.dtype),
        probe_dtype=args.probe_dtype,
        probe_compile=args.probe_compile,
    )
    start = time.perf_counter()
    engine.warm_up()  # with --probe-compile: the compilation, before anything is timed
    warm_up_s = time.perf_counter() - start
    pool = WORKLOADS[args.workload](2 * n + 2)
    alone, served, warm = pool[:n], pool[n : 2 * n], pool[2 * n :]
    engine.generate(warm[0], max_new_tokens=2)

    with engine_phases() as log:
        start = time.perf_counter()
        for prompt in alone:
            engine.generate(prompt, max_new_tokens=args.max_tokens)
        one_by_one = summary(log, time.perf_counter() - start, n)

    config = ServeConfig(max_batch_size=args.clients)
    with BackgroundServer(engine, config) as server:
        client = OpenAI(base_url=server.base_url, api_key="-", max_retries=0, timeout=600)

        def ask(messages: Any, max_tokens: int) -> None:
            client.chat.completions.create(
                model=engine.model_name, messages=messages, max_tokens=max_tokens, temperature=0
            )

        ask(warm[1], 2)
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                for messages in served[i :: args.clients]:
                    ask(messages, args.max_tokens)
            except BaseException as exc:  # reported below
                errors.append(exc)

        with engine_phases() as log:
            start = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            concurrent = summary(log, time.perf_counter() - start, n)
        if errors:
            raise errors[0]

    result = {
        "benchmark": "served_phases",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "workload": args.workload,
        "max_tokens": args.max_tokens,
        "dtype": args.dtype,
        "probe_dtype": args.probe_dtype or args.dtype,
        "probe_compile": args.probe_compile,
        "warm_up_s": warm_up_s,
        "clients": args.clients,
        "requests": n,
        "one_by_one": one_by_one,
        "served": concurrent,
        "speedup": concurrent["requests_per_s"] / one_by_one["requests_per_s"],
    }
    print(f"{n} requests, workload {args.workload}, {args.clients} clients")
    print(f"{'':12s} {'wall s':>7s} {'req/s':>6s}   probe passes    prompt passes   steps  other")
    for name, part in (("one by one", one_by_one), ("served", concurrent)):
        cells = [
            f"{part[k]['seconds']:5.2f} s ({part[k]['share']:3.0%}, {part[k]['calls']:3d}x"
            f"{part[k]['rows_per_call']:4.1f})"
            for k in ("probe", "prompt", "step")
        ]
        print(
            f"{name:12s} {part['wall_s']:7.2f} {part['requests_per_s']:6.2f}   "
            + "  ".join(cells)
            + f"  {part['other']['seconds']:5.2f} s ({part['other']['share']:3.0%})"
        )
    print(f"speedup {result['speedup']:.2f}x")
    report(result, args.json)


if __name__ == "__main__":
    main()

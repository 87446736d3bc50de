"""The serving batcher without HTTP: C closed-loop clients on ``Batcher``, against one by one.

``benchmarks/serving.py`` measures the whole server (HTTP, JSON, client threads on the same CPU).
This script isolates the batching policy: C client coroutines in one process each submit R
requests to a :class:`~logo_engine.serving.batcher.Batcher` over the embedded engine, one after
the other (each waits for its answer), with prompts no call has seen (the prefix caches would
otherwise serve repeats), against the same number of fresh prompts through ``engine.generate``
one by one. Rounds alternate continuous batching and static batches. Greedy, 32-token limit, the
zoo's chat prompts (as ``benchmarks/serving.py``).

Where the engine's time goes is timed by wrapping ``Prober.capture`` (probe passes) and
``TransformersDecoder.forward`` (prompt passes, packed or not, and decoding steps).

    HF_HUB_OFFLINE=1 python -m benchmarks.batcher [--clients 8] [--requests-per-client 3]
        [--rounds 2] [--join-ratio 0.3]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.serving import prompts
from logo_engine import LoGoEngine
from logo_engine.base import SamplingParams
from logo_engine.decoding import TransformersDecoder
from logo_engine.probing import Prober
from logo_engine.serving.batcher import Batcher, Failed, Finished, Job

MAX_TOKENS = 32


Phase = tuple[str, int, float]  # ("probe" | "prompt" | "step", rows, seconds)


def _done() -> float:
    """The clock once the accelerator's queued work is done (kernels run asynchronously)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@contextmanager
def engine_phases() -> Iterator[list[Phase]]:
    """Every probe pass, prompt pass (packed or not) and decoding step while the block runs."""
    log: list[Phase] = []
    capture, forward = Prober.capture, TransformersDecoder.forward

    def timed_capture(self: Prober, ids: Any, *args: Any, **kwargs: Any) -> Any:
        start = _done()
        try:
            return capture(self, ids, *args, **kwargs)
        finally:
            log.append(("probe", len(ids), _done() - start))

    def timed_forward(
        self: TransformersDecoder, ctx: Any, ids: torch.Tensor, *a: Any, **k: Any
    ) -> Any:
        start = _done()
        try:
            return forward(self, ctx, ids, *a, **k)
        finally:
            packed = ctx.packed
            rows = len(packed.bounds) if packed is not None else ids.shape[0]
            step = ids.shape[1] == 1 and packed is None
            log.append(("step" if step else "prompt", rows, _done() - start))

    Prober.capture = timed_capture  # type: ignore[method-assign]
    TransformersDecoder.forward = timed_forward  # type: ignore[method-assign]
    try:
        yield log
    finally:
        Prober.capture = capture  # type: ignore[method-assign]
        TransformersDecoder.forward = forward  # type: ignore[method-assign]


def phase_seconds(log: list[Phase]) -> dict[str, float]:
    """Seconds spent in probe passes, prompt passes and decoding steps."""
    names = {"probe": "probe_s", "prompt": "prompt_passes_s", "step": "decode_steps_s"}
    return {name: sum(t for kind, _, t in log if kind == phase) for phase, name in names.items()}


def one_by_one(engine: LoGoEngine, pool: list[Any]) -> tuple[float, list[str]]:
    start = time.perf_counter()
    texts = [engine.generate(p, max_new_tokens=MAX_TOKENS).text for p in pool]
    return time.perf_counter() - start, texts


async def batched(
    engine: LoGoEngine, pool: list[Any], clients: int, continuous: bool, join_ratio: float
) -> tuple[float, list[str]]:
    loop = asyncio.get_running_loop()
    batcher = Batcher(
        engine, max_batch_size=16, batch_wait_ms=10, continuous=continuous, join_ratio=join_ratio
    )
    texts = [""] * len(pool)
    per_client = len(pool) // clients

    async def client(c: int) -> None:
        for r in range(per_client):
            i = c * per_client + r
            job = Job(
                engine._prepare(pool[i], None, None),
                None,
                engine.routing,
                SamplingParams(max_new_tokens=MAX_TOKENS),
                loop,
            )
            batcher.submit(job)
            async for event in job.stream():
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Finished):
                    texts[i] = event.generation.text

    start = time.perf_counter()
    try:
        await asyncio.gather(*(client(c) for c in range(clients)))
    finally:
        await asyncio.to_thread(batcher.close)
    return time.perf_counter() - start, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--join-ratio", type=float, default=0.3)
    args = parser.parse_args()
    engine = LoGoEngine.from_pretrained()
    n = args.clients * args.requests_per_client
    pool = prompts(n * (3 * args.rounds) + 1)
    engine.generate(pool[-1], max_new_tokens=2)  # warm-up
    fresh = iter(range(0, len(pool) - 1, n))
    rows = []
    for round_ in range(args.rounds):
        base_s, _ = one_by_one(engine, pool[(k := next(fresh)) : k + n])
        row: dict[str, Any] = {"round": round_ + 1, "one_by_one_s": round(base_s, 3)}
        for continuous in (True, False):
            chunk = pool[(k := next(fresh)) : k + n]
            with engine_phases() as log:
                wall, got = asyncio.run(
                    batched(engine, chunk, args.clients, continuous, args.join_ratio)
                )
            spent = phase_seconds(log)
            name = "continuous" if continuous else "static"
            row[name] = {
                "wall_s": round(wall, 3),
                "speedup": round(base_s / wall, 3),
                **{key: round(value, 3) for key, value in spent.items()},
            }
            if round_ == 0:  # checked after the timing: the answers equal their solo answers
                _, want = one_by_one(engine, chunk)
                row[name]["answers_equal_one_by_one"] = got == want
            print(
                f"round {round_ + 1}, {name}: {n} requests in {wall:.2f} s, one by one "
                f"{base_s:.2f} s, speedup {base_s / wall:.2f}x; "
                + ", ".join(f"{k} {v:.2f}" for k, v in spent.items())
            )
        rows.append(row)
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch "
                f"{torch.__version__}, {torch.get_num_threads()} threads",
                "model": engine.model_name,
                "clients": args.clients,
                "requests_per_client": args.requests_per_client,
                "join_ratio": args.join_ratio,
                "rounds": rows,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Does routing survive a bfloat16 probe? A float32 engine against one with ``probe_dtype``.

Both engines are the embedded default model (float32) and zoo with the zoo's routing; the second
probes in bfloat16 (``LoGoEngine(probe_dtype=torch.bfloat16)``) and scores in float32. For every
hand-written prompt of ``benchmarks/data/
natural_prompts*.json`` (task prompts and prompts no adapter covers), caches cleared, this counts
the prompts whose top adapter (largest weight) and whose selected set agree, how often each
engine puts the prompt's own task adapter on top, the largest difference of a selected
adapter's weight, and the median ``route`` time of each (the two engines alternate, prompt by
prompt). Then each engine routes the same prompts in batches of 8: how far does a row's routing
depend on its batch? (Not at all in float32, up to rounding.)

    HF_HUB_OFFLINE=1 python -m benchmarks.probe_dtype [--compile]

``--compile`` adds a third engine, a compiled bfloat16 probe (``probe_compile=True``), compiled
before the prompts, and compares every pair of engines.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from logo_engine import LoGoEngine
from logo_engine.types import Selection

DATA = Path(__file__).parent / "data"
BATCH = 8


def hand_written() -> list[tuple[str | None, str]]:
    """(task or None when no adapter covers it, prompt) of both hand-written sets."""
    out: list[tuple[str | None, str]] = []
    for name in ("natural_prompts.json", "natural_prompts_confirm.json"):
        data = json.loads((DATA / name).read_text())
        for task, items in data["tasks"].items():
            out += [(task, item["prompt"]) for item in items]
        for items in data["out_of_library"].values():
            out += [(None, item["prompt"]) for item in items]
    return out


def top(selection: Selection) -> str | None:
    if not selection.adapters:
        return None
    return max(zip(selection.weights, selection.adapters, strict=True))[1]


def weight_gap(a: Selection, b: Selection) -> float | None:
    """Largest difference of an adapter's weight; None when the selected sets differ."""
    if sorted(a.adapters) != sorted(b.adapters):
        return None
    wa, wb = a.mixture, b.mixture
    return max((abs(wa[k] - wb[k]) for k in wa), default=0.0)


def agreement(a: list[Selection], b: list[Selection]) -> str:
    pairs = list(zip(a, b, strict=True))
    gaps = [g for g in (weight_gap(x, y) for x, y in pairs) if g is not None]
    return (
        f"same top adapter {sum(top(x) == top(y) for x, y in pairs)}/{len(pairs)}, "
        f"same selected set {len(gaps)}/{len(pairs)}, largest weight difference where the set "
        f"is the same {max(gaps, default=0.0):.4f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also a compiled bfloat16 probe (probe_compile=True; compiled first, minutes)",
    )
    args = parser.parse_args(argv)
    prompts = hand_written()
    messages = [[{"role": "user", "content": prompt}] for _, prompt in prompts]
    engines = {
        "float32": LoGoEngine.from_pretrained(),
        "bfloat16 probe": LoGoEngine.from_pretrained(probe_dtype=torch.bfloat16),
    }
    if args.compile:
        compiled = LoGoEngine.from_pretrained(probe_dtype=torch.bfloat16, probe_compile=True)
        start = time.perf_counter()
        compiled.warm_up()
        print(f"compiled the probe in {time.perf_counter() - start:.0f} s", flush=True)
        engines["compiled bfloat16 probe"] = compiled
    times: dict[str, list[float]] = {name: [] for name in engines}
    alone: dict[str, list[Selection]] = {name: [] for name in engines}
    for i, message in enumerate(messages):
        order = list(engines.items())
        k = i % len(order)
        for name, engine in order[k:] + order[:k]:
            engine.clear_prefix_caches()
            start = time.perf_counter()
            alone[name].append(engine.route(message))
            times[name].append(time.perf_counter() - start)
    n, n_tasks = len(prompts), sum(task is not None for task, _ in prompts)
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{n} hand-written prompts ({n_tasks} with a task adapter)")
    names = list(engines)
    for i, name in enumerate(names[1:], 1):
        for other in names[:i]:
            print(f"{name} against {other}: {agreement(alone[name], alone[other])}")
    for name, engine in engines.items():
        chosen = zip(prompts, alone[name], strict=True)
        hits = sum(task is not None and top(s) == task for (task, _), s in chosen)
        # the same prompts in batches of 8 against alone: does a row's routing depend on its batch?
        batched: list[Selection] = []
        for start in range(0, n, BATCH):
            engine.clear_prefix_caches()
            batched += engine.route_batch(messages[start : start + BATCH])
        batch_gaps = [weight_gap(a, b) for a, b in zip(alone[name], batched, strict=True)]
        same = [g for g in batch_gaps if g is not None]
        print(
            f"{name:>14}: task adapter on top {hits}/{n_tasks}, "
            f"route median {statistics.median(times[name]) * 1000:.0f} ms; in batches of "
            f"{BATCH}: same set as alone {len(same)}/{n}, largest weight difference "
            f"{max(same, default=0.0):.2g}"
        )


if __name__ == "__main__":
    main()

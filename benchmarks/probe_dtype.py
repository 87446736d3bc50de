"""Does routing survive a bfloat16 probe? A float32 engine against one with ``probe_dtype``.

Both engines are the embedded default model (float32) and zoo with the zoo's routing; the second
probes in bfloat16 (``LoGoEngine(probe_dtype=torch.bfloat16)``) and scores in float32. For every
hand-written prompt of ``benchmarks/data/
natural_prompts*.json`` (task prompts and prompts no adapter covers), caches cleared, this counts
the prompts whose top adapter (largest weight) and whose selected set agree, how often each
engine puts the prompt's own task adapter on top, the largest difference of a selected
adapter's weight, and the median ``route`` time of each (the two engines alternate, prompt by
prompt).

    HF_HUB_OFFLINE=1 python -m benchmarks.probe_dtype
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from logo_engine import LoGoEngine
from logo_engine.types import Selection

DATA = Path(__file__).parent / "data"


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


def main() -> None:
    prompts = hand_written()
    engines = {
        "float32": LoGoEngine.from_pretrained(),
        "bfloat16 probe": LoGoEngine.from_pretrained(probe_dtype=torch.bfloat16),
    }
    times: dict[str, list[float]] = {name: [] for name in engines}
    same_top = same_set = 0
    weight_gap = 0.0
    on_top = dict.fromkeys(engines, 0)
    for task, prompt in prompts:
        chosen = {}
        order = list(engines.items())
        for name, engine in order if len(times["float32"]) % 2 else order[::-1]:
            engine.clear_prefix_caches()
            start = time.perf_counter()
            chosen[name] = engine.route([{"role": "user", "content": prompt}])
            times[name].append(time.perf_counter() - start)
            on_top[name] += task is not None and top(chosen[name]) == task
        a, b = chosen["float32"], chosen["bfloat16 probe"]
        same_top += top(a) == top(b)
        same_set += sorted(a.adapters) == sorted(b.adapters)
        if sorted(a.adapters) == sorted(b.adapters):
            wa, wb = a.mixture, b.mixture
            weight_gap = max([weight_gap, *(abs(wa[k] - wb[k]) for k in wa)])
    n, n_tasks = len(prompts), sum(task is not None for task, _ in prompts)
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{n} hand-written prompts ({n_tasks} with a task adapter)")
    print(f"same top adapter: {same_top}/{n}; same selected set: {same_set}/{n}")
    print(f"largest weight difference where the set is the same: {weight_gap:.4f}")
    for name in engines:
        print(
            f"{name:>14}: task adapter on top {on_top[name]}/{n_tasks}, "
            f"route median {statistics.median(times[name]) * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()

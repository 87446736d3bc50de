"""Compute the shipped zoo's routing data (``logo_engine/zoo/calibration.json``).

- Per-adapter mean and std of the raw probe scores over VALIDATION prompts of every library task
  (never test prompts), for the default probe setting with the ``norm`` and ``entropy`` signals:
  ``LoGoEngine.from_pretrained()`` loads them, and routing then ranks adapters by z-scores
  (``RoutingConfig.calibrated``; see docs/benchmarks.md for why).
- Per-adapter prototypes for the ``prototype`` signal: the centroid of the probed state over each
  adapter's ``train_prompts.json`` (the example prompts the library ships).
- The zoo's routing defaults (``routing.json``): ``SHIPPED_ROUTING``, the configuration that won
  ``benchmarks/routing_natural.py``; with ``--abstain-quantile q``, plus an abstention threshold
  set by the benchmark's rule: the q-quantile of the top ranking score over generator validation
  prompts (seed 1, 16 per task; the natural prompts are never used).

    HF_HUB_OFFLINE=1 python -m benchmarks.zoo.calibrate [--per-task 8] [--adapters DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.zoo.tasks import LIBRARY_TASKS, TASKS
from logo_engine import LoGoEngine, RoutingConfig
from logo_engine.calibration import CALIBRATION_NAME, ROUTING_NAME, save_routing
from logo_engine.models import default_adapters_dir

# The winner of benchmarks/routing_natural.py on the shipped zoo (docs/benchmarks.md): prototype
# similarities, the top 3 weighted by a sharp softmax (one adapter dominates when it stands out,
# weights spread when none does). Abstention did not pay on this zoo (docs/routing.md), so it is
# off unless --abstain-quantile is given; its threshold is never tuned on the natural prompts.
# calibrated=None: prototype similarities are ranked raw (the zoo ships no statistics for them),
# and a caller who switches to signal="norm" or "entropy" gets the shipped z-scores.
SHIPPED_ROUTING = RoutingConfig(top_k=3, signal="prototype", temperature=0.05)
THRESHOLD_PROMPTS = 16  # generator validation prompts per task (seed 1) that set thresholds


def threshold_prompts(names: Sequence[str]) -> list[str]:
    """The prompts abstention thresholds are set on: generator validation prompts, seed 1.

    The rule of ``routing.json`` here and of ``benchmarks/routing_natural.py`` alike; never the
    natural prompts.
    """
    return [
        ex.prompt
        for task in LIBRARY_TASKS
        if task in names
        for ex in TASKS[task].make_split("validation", THRESHOLD_PROMPTS, seed=1)
    ]


def quantile_of_top(ranking: torch.Tensor, q: float) -> float:
    """The q-quantile of each row's top ranking score. ranking (P, N)."""
    return float(ranking.max(-1).values.quantile(q))


def abstain_threshold(engine: LoGoEngine, routing: RoutingConfig, quantile: float) -> float:
    """The ``quantile`` of the top ranking score over :func:`threshold_prompts`."""
    names = engine.adapter_names
    sels = engine.route_batch(threshold_prompts(names), routing=routing)
    ranking = torch.tensor([[(s.rank_scores or s.scores)[n] for n in names] for s in sels])
    return round(quantile_of_top(ranking, quantile), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-task", type=int, default=8, help="validation prompts per task")
    parser.add_argument("--adapters", type=Path, default=default_adapters_dir())
    parser.add_argument(
        "--abstain-quantile", type=float, default=None, help="also abstain (e.g. 0.025)"
    )
    args = parser.parse_args()
    engine = LoGoEngine.from_pretrained(adapters=args.adapters, routing=RoutingConfig())
    prompts = [
        ex.prompt
        for task in LIBRARY_TASKS
        if task in engine.adapter_names
        for ex in TASKS[task].make_split("validation", args.per_task, seed=0)
    ]
    for signal in ("norm", "entropy"):
        cal = engine.calibrate(prompts, routing=RoutingConfig(signal=signal))
        print(f"{signal}: {cal.n_prompts} prompts, probe {cal.probe_module}")
    examples = {
        name: json.loads((args.adapters / name / "train_prompts.json").read_text())
        for name in engine.adapter_names
    }
    protos = engine.fit_prototypes(examples)
    print(f"prototypes: {sum(protos.n_examples.values())} example prompts")
    engine.save_calibrations(args.adapters / CALIBRATION_NAME)
    print(f"wrote {args.adapters / CALIBRATION_NAME}")
    routing = SHIPPED_ROUTING
    if args.abstain_quantile is not None:
        threshold = abstain_threshold(engine, routing, args.abstain_quantile)
        routing = dataclasses.replace(routing, abstain_below=threshold)
    save_routing(routing, args.adapters / ROUTING_NAME)
    print(f"wrote {args.adapters / ROUTING_NAME}: {routing.to_dict()}")


if __name__ == "__main__":
    main()

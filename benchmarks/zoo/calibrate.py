"""Compute the shipped zoo's routing calibration (``logo_engine/zoo/calibration.json``).

Per-adapter mean and std of the raw probe scores over VALIDATION prompts of every library task
(never test prompts), for the default probe setting with the ``norm`` and ``entropy`` signals.
``LoGoEngine.from_pretrained()`` loads the file, and routing then ranks adapters by z-scores
(``RoutingConfig.calibrated``; see docs/benchmarks.md for why).

    HF_HUB_OFFLINE=1 python -m benchmarks.zoo.calibrate [--per-task 8]
"""

from __future__ import annotations

import argparse

from benchmarks.zoo.tasks import LIBRARY_TASKS, TASKS
from logo_engine import LoGoEngine, RoutingConfig
from logo_engine.calibration import CALIBRATION_NAME
from logo_engine.models import default_adapters_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-task", type=int, default=8, help="validation prompts per task")
    parser.add_argument("--adapters", default=str(default_adapters_dir()))
    args = parser.parse_args()
    engine = LoGoEngine.from_pretrained(adapters=args.adapters)
    prompts = [
        ex.prompt
        for task in LIBRARY_TASKS
        for ex in TASKS[task].make_split("validation", args.per_task, seed=0)
    ]
    for signal in ("norm", "entropy"):
        cal = engine.calibrate(prompts, routing=RoutingConfig(signal=signal))
        print(f"{signal}: {cal.n_prompts} prompts, probe {cal.probe_module}")
    engine.save_calibrations(f"{args.adapters}/{CALIBRATION_NAME}")
    print(f"wrote {args.adapters}/{CALIBRATION_NAME}")


if __name__ == "__main__":
    main()

"""Compute the shipped zoo's routing data (``logo_engine/zoo/calibration.json``).

- Per-adapter mean and std of the raw probe scores over VALIDATION prompts of every library task
  (never test prompts), for the default probe setting with the ``norm`` and ``entropy`` signals:
  ``LoGoEngine.from_pretrained()`` loads them, and routing then ranks adapters by z-scores
  (``RoutingConfig.calibrated``; see docs/benchmarks.md for why).
- Per-adapter prototypes for the ``prototype`` signal: the centroid of the probed state over each
  adapter's ``train_prompts.json`` (the example prompts the library ships).

    HF_HUB_OFFLINE=1 python -m benchmarks.zoo.calibrate [--per-task 8] [--adapters DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.zoo.tasks import LIBRARY_TASKS, TASKS
from logo_engine import LoGoEngine, RoutingConfig
from logo_engine.calibration import CALIBRATION_NAME
from logo_engine.models import default_adapters_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-task", type=int, default=8, help="validation prompts per task")
    parser.add_argument("--adapters", type=Path, default=default_adapters_dir())
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


if __name__ == "__main__":
    main()

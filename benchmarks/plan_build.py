"""What mixture plans cost: ``MixturePlan.build`` and ``MixturePlan.concat`` on the shipped zoo.

Every call whose mixture is not in the plan cache builds a plan (cat-form factors at each of
the zoo's 60 adapted modules) before its prompt pass. A server builds one per group of rows
that join a batch, then stacks it under the running batch's plan (``concat``). This times, as
medians over ``--repeats``, with random top-3 mixtures:

- the build (uncached) for 1 row (a shared plan), 2 rows (a typical join), 8 rows (a batch);
- the stacking of a 5-row plan with a 2-row one, and of a 6-row plan with a shared one and a
  base-only row.

With ``--against REV``, each also runs on ``logo_engine/mixture.py`` as it was at git revision
REV (loaded from ``git show``), interleaved with the current one, and every plan of both is
checked equal, tensor for tensor.

    HF_HUB_OFFLINE=1 python -m benchmarks.plan_build [--threads 1] [--repeats 40] [--against REV]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from benchmarks import report
from logo_engine import LoGoEngine
from logo_engine import mixture as current

BUILD_ROWS = (1, 2, 8)

Mixture = tuple[tuple[str, float], ...]


def mixture_at(rev: str) -> ModuleType:
    """``logo_engine/mixture.py`` at git revision ``rev``, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{rev}:logo_engine/mixture.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "mixture_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("mixture_at_rev", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def assert_equal(a: Any, b: Any) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    assert a.modules.keys() == b.modules.keys()
    for name, mix in a.modules.items():
        other = b.modules[name]
        assert torch.equal(mix.a_cat, other.a_cat) and torch.equal(mix.b_cat, other.b_cat), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--against", metavar="REV", help="also time mixture.py at this revision")
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    library = LoGoEngine.from_pretrained().library
    names = list(library.names)
    rng = random.Random(0)
    other = mixture_at(args.against) if args.against else None

    def mixtures(n: int) -> list[Mixture]:
        out = []
        for _ in range(n):
            picked = rng.sample(names, 3)
            weights = [rng.random() for _ in picked]
            out.append(tuple((m, w / sum(weights)) for m, w in zip(picked, weights, strict=True)))
        return out

    def timed(label: str, make: Callable[[], Any], run: Callable[[ModuleType, Any], Any]) -> dict:
        """Median ms of ``run(module, make())`` now (and at REV, interleaved, plans equal)."""
        times: dict[ModuleType, list[float]] = {current: []}
        if other is not None:
            times[other] = []
        for i in range(args.repeats):
            given = make()
            order = list(times) if i % 2 == 0 else list(times)[::-1]  # alternate who goes first
            plans = []
            for module in order:
                start = time.perf_counter()
                plans.append(run(module, given))
                times[module].append((time.perf_counter() - start) * 1e3)
            if other is not None:
                assert_equal(*plans)
        row: dict[str, Any] = {"what": label, "ms": statistics.median(times[current])}
        line = f"{label}: {row['ms']:.2f} ms"
        if other is not None:
            row["ms_at_rev"] = statistics.median(times[other])
            row["ratio"] = row["ms"] / row["ms_at_rev"]
            line += f" (at {args.against}: {row['ms_at_rev']:.2f} ms, {row['ratio']:.2f}x)"
        print(line, flush=True)
        return row

    def plan(n: int) -> Any:
        return current.MixturePlan._build(library, mixtures(n))

    def build(module: ModuleType, rows: list[Mixture]) -> Any:
        return module.MixturePlan._build(library, rows)  # uncached: the build itself

    def concat(module: ModuleType, parts: list[tuple[Any, int]]) -> Any:
        return module.MixturePlan.concat(parts)

    results = [timed(f"build, {n} row(s)", lambda n=n: mixtures(n), build) for n in BUILD_ROWS]
    results.append(timed("concat, 5 + 2 rows", lambda: [(plan(5), 5), (plan(2), 2)], concat))
    results.append(
        timed(
            "concat, 6 rows + shared + base",
            lambda: [(plan(6), 6), (plan(1), 1), (None, 1)],
            concat,
        )
    )
    report(
        {
            "benchmark": "plan_build",
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__,
            "threads": args.threads,
            "modules": len(library.stacks),
            "adapters": len(names),
            "against": args.against,
            "plans_equal": other is not None,
            "results": results,
        },
        args.json,
    )


if __name__ == "__main__":
    main()

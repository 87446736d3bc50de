"""What building a mixture plan costs: ``MixturePlan.build`` on the shipped zoo, uncached.

Every call whose mixture is not in the plan cache builds a plan (cat-form factors at each of
the zoo's 60 adapted modules) before its prompt pass, and a server builds one per group of
rows that join a batch. This times the build for 1 row (a shared plan), 2 rows (a typical join)
and 8 rows (a full batch), each row a random top-3 mixture, medians over ``--repeats`` builds.

With ``--against REV``, the same builds also run on ``logo_engine/mixture.py`` as it was at git
revision REV (loaded from ``git show``), interleaved with the current one, and every plan of
both is checked equal, tensor for tensor.

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
from pathlib import Path
from types import ModuleType

import torch

from benchmarks import report
from logo_engine import LoGoEngine
from logo_engine import mixture as current
from logo_engine.library import AdapterLibrary

ROWS = (1, 2, 8)


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


def build_ms(module: ModuleType, library: AdapterLibrary, rows: list) -> tuple[float, object]:
    start = time.perf_counter()
    plan = module.MixturePlan._build(library, rows)  # uncached: the build itself
    return (time.perf_counter() - start) * 1e3, plan


def assert_equal(a: object, b: object) -> None:
    assert a.modules.keys() == b.modules.keys()  # type: ignore[attr-defined]
    for name, mix in a.modules.items():  # type: ignore[attr-defined]
        other = b.modules[name]  # type: ignore[attr-defined]
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
    engine = LoGoEngine.from_pretrained()
    library = engine.library
    names = list(library.names)
    rng = random.Random(0)

    def mixture() -> tuple[tuple[str, float], ...]:
        picked = rng.sample(names, 3)
        weights = [rng.random() for _ in picked]
        return tuple((n, w / sum(weights)) for n, w in zip(picked, weights, strict=True))

    other = mixture_at(args.against) if args.against else None
    results = []
    for n_rows in ROWS:
        now_ms: list[float] = []
        then_ms: list[float] = []
        for i in range(args.repeats):
            rows = [mixture() for _ in range(n_rows)]
            if other is None:
                now_ms.append(build_ms(current, library, rows)[0])
                continue
            order = [(current, now_ms), (other, then_ms)]
            plans = []
            for module, times in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                elapsed, plan = build_ms(module, library, rows)
                times.append(elapsed)
                plans.append(plan)
            assert_equal(*plans)
        row = {"rows": n_rows, "build_ms": statistics.median(now_ms)}
        line = f"{n_rows} row(s): {row['build_ms']:.2f} ms"
        if then_ms:
            row["build_ms_at_rev"] = statistics.median(then_ms)
            row["ratio"] = row["build_ms"] / row["build_ms_at_rev"]
            line += (
                f" (at {args.against}: {row['build_ms_at_rev']:.2f} ms, ratio {row['ratio']:.2f})"
            )
        print(line, flush=True)
        results.append(row)
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

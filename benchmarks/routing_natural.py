"""Routing quality the way users phrase things: hand-written prompts, out-of-library prompts.

The prompts (``benchmarks/data/natural_prompts.json``) were written by hand, not by the task
generators, and are never used for training or calibration (checked at the start of every run).
For every method, on the same prompts, in one run:

- **dominant**: how often the adapter with the largest weight is the task's own;
- **ranking**: how often the top-1 ranking score is the task's own adapter;
- **task score**: greedy answers scored by each task's own scorer, mean over the 11 tasks;
- **out-of-library score** (an answer scores 1 when it holds one of the prompt's keywords) and
  **worse than base**: prompts whose answer scores below the base model's own answer;
- **abstained**: share of prompts sent to the base model, for task and out-of-library prompts.

Routing is computed from ONE probe pass over all prompts with the engine's own functions
(``engine._probe``, ``calibration.zscores``, ``calibration.prototype_scores``, ``routing.select``)
and every method generates through ``engine.generate_batch(adapters=[...])``, one pinned mixture
per row, identical (prompt, mixture) jobs once. A check compares this with the engine's own routed
path for the default routing. Abstention thresholds are not tuned on these prompts: they are the
``--abstain-quantile`` quantile of the top ranking score over the *generator validation split*
of the library tasks (the score below which that share of in-library prompts falls).

    HF_HUB_OFFLINE=1 python -m benchmarks.routing_natural --out docs/natural.json
    HF_HUB_OFFLINE=1 python -m benchmarks.routing_natural \
        --data benchmarks/data/natural_prompts_confirm.json --out docs/natural_confirm.json
    HF_HUB_OFFLINE=1 python -m benchmarks.routing_natural --adapters /tmp/zoo --out /tmp/n.json

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.baselines import RetrieverIndex, SentenceEmbedder, adapter_train_prompts
from benchmarks.zoo.calibrate import quantile_of_top, threshold_prompts
from benchmarks.zoo.replay import REPLAY_PROMPTS
from benchmarks.zoo.tasks import LIBRARY_TASKS, TASKS
from logo_engine import RoutingConfig, Selection
from logo_engine import calibration as calib
from logo_engine.engine import LoGoEngine
from logo_engine.library import resolve_sources
from logo_engine.models import default_adapters_dir
from logo_engine.routing import select

logger = logging.getLogger("benchmarks.routing_natural")

DATA = Path(__file__).parent / "data" / "natural_prompts.json"
ANSWER_SLACK = 4  # max_new_tokens = longest reference answer (tokens) + this
OOL_MAX_TOKENS = 40
Mixture = dict[str, float]


@dataclass(frozen=True)
class Item:
    """One prompt of the set: its task (or out-of-library group) and how to score it."""

    prompt: str
    group: str  # task name, or "ool:<group>"
    answer: str | None = None  # task prompts
    keywords: tuple[str, ...] = ()  # out-of-library prompts

    @property
    def in_library(self) -> bool:
        return not self.group.startswith("ool:")

    def score(self, text: str) -> float:
        if self.in_library:
            assert self.answer is not None
            return TASKS[self.group].score(text, self.answer)
        low = text.lower()
        return float(any(k in low for k in self.keywords))


def load_items(path: Path = DATA, limit: int | None = None) -> list[Item]:
    """The natural-phrasing prompts, task prompts first (``limit``: the first n of each group)."""
    data = json.loads(path.read_text())
    items = [
        Item(e["prompt"], task, answer=e["answer"])
        for task, examples in data["tasks"].items()
        for e in examples[:limit]
    ]
    items += [
        Item(e["prompt"], f"ool:{group}", keywords=tuple(k.lower() for k in e["keywords"]))
        for group, examples in data["out_of_library"].items()
        for e in examples[:limit]
    ]
    return items


def check_separate(items: Sequence[Item], folders: dict[str, Path]) -> int:
    """Refuse prompts that also occur in training data (generator splits, saved prompts, replay)."""
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    seen = {norm(p) for p in REPLAY_PROMPTS}
    for name in LIBRARY_TASKS:
        for split, n in (("train", 400), ("validation", 48)):
            seen |= {norm(ex.prompt) for ex in TASKS[name].make_split(split, n, seed=0)}
    for name, folder in folders.items():
        seen |= {norm(p) for p in adapter_train_prompts(folder, name)}
    clash = [it.prompt for it in items if norm(it.prompt) in seen]
    if clash:
        raise SystemExit(f"natural prompts found in training data: {clash[:5]}")
    return len(seen)


# ----------------------------------------------------------------------------- probing
@dataclass(frozen=True)
class Probed:
    """One probe pass over a prompt list: probed states and raw norm scores."""

    states: torch.Tensor  # (P, d)
    norm: torch.Tensor  # (P, N)


def probe_all(
    engine: LoGoEngine, prompts: Sequence[str], routing: RoutingConfig, batch_size: int
) -> Probed:
    """States and raw norm scores for every prompt, in prompt order (batches by length)."""
    library = engine.library
    routing = dataclasses.replace(routing, signal="norm")
    lengths = [engine.count_tokens(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    states, norms = [None] * len(prompts), [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        requests = [engine._prepare(prompts[i], None, None) for i in rows]
        probe = engine._probe(requests, routing, library)
        for j, i in enumerate(rows):
            states[i], norms[i] = probe.states[j].float(), probe.scores[j].float()
    return Probed(torch.stack(states), torch.stack(norms))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A way to choose each prompt's mixture: fixed, or ``select`` on some scores."""

    name: str
    description: str
    mixtures: Callable[[list[Item]], list[Mixture]]
    selections: Callable[[], list[Selection]] | None = None  # when routed by `select`


def routed(
    scores: torch.Tensor,
    names: list[str],
    routing: RoutingConfig,
    ranking: torch.Tensor | None = None,
) -> list[Selection]:
    """The engine's own selection rule on precomputed scores (P, N)."""
    return select(
        scores,
        names,
        routing,
        probe_layer=-1,
        probe_module="",
        probe_ms=0.0,
        ranking=ranking,
        calibrated=ranking is not None,
    )


def previous_default(raw: torch.Tensor, z: torch.Tensor, names: list[str]) -> list[Mixture]:
    """The default before issue 10: top-3 by z-score, weights proportional to the raw scores."""
    out = []
    for row, top in enumerate(torch.topk(z, 3, dim=-1).indices.tolist()):
        kept = raw[row, top]  # (3,)
        out.append({names[j]: float(w) for j, w in zip(top, kept / kept.sum(), strict=True)})
    return out


def route_in_batches(
    engine: LoGoEngine, prompts: Sequence[str], batch_size: int
) -> list[Selection]:
    """The engine's own routed path (default routing), in prompt order."""
    lengths = [engine.count_tokens(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    out: list[Selection | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        for i, sel in zip(rows, engine.route_batch([prompts[i] for i in rows]), strict=True):
            out[i] = sel
    return [s for s in out if s is not None]


def check_default(
    engine_rows: list[Selection],
    default: RoutingConfig,
    names: list[str],
    probed: Probed,
    z_prompt: torch.Tensor,
    proto: torch.Tensor | None,
) -> dict[str, Any]:
    """Does the offline reconstruction (``select`` on one probe pass) equal the engine's path?"""
    if callable(default.signal) or default.signal == "entropy":
        return {"checked": False}
    if default.signal == "prototype":
        assert proto is not None
        offline = routed(proto, names, default)
    else:
        ranking = None if default.calibrated is False else z_prompt
        offline = routed(probed.norm, names, default, ranking)
    same = sum(
        a.adapters == b.adapters
        and all(abs(x - y) < 1e-4 for x, y in zip(a.weights, b.weights, strict=True))
        for a, b in zip(engine_rows, offline, strict=True)
    )
    return {"checked": True, "rows": len(offline), "same_selection": same}


# ----------------------------------------------------------------------------- generation
def generate(
    engine: LoGoEngine,
    items: Sequence[Item],
    per_method: dict[str, list[Mixture]],
    batch_size: int,
    max_tokens: Callable[[Item], int],
) -> dict[str, list[str]]:
    """Every method's answers; each distinct (prompt, mixture, length) generated once."""
    key = lambda m: tuple(sorted((n, round(w, 6)) for n, w in m.items() if w > 0))  # noqa: E731
    jobs: dict[tuple[int, Any], Mixture] = {}
    for mixtures in per_method.values():
        for row, m in enumerate(mixtures):
            jobs.setdefault((row, key(m)), m)
    keys = sorted(jobs, key=lambda k: (max_tokens(items[k[0]]), len(items[k[0]].prompt)))
    texts: dict[tuple[int, Any], str] = {}
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    for batch in tqdm(batches, desc=f"generating {len(keys)} answers"):
        outs = engine.generate_batch(
            [items[k[0]].prompt for k in batch],
            adapters=[jobs[k] for k in batch],
            max_new_tokens=max(max_tokens(items[k[0]]) for k in batch),
        )
        texts.update(zip(batch, (o.text for o in outs), strict=True))
    return {
        name: [texts[(row, key(m))] for row, m in enumerate(mixtures)]
        for name, mixtures in per_method.items()
    }


def summarize(
    items: Sequence[Item],
    mixtures: list[Mixture],
    answers: list[str],
    base_answers: list[str],
    selections: list[Selection] | None,
) -> dict[str, Any]:
    """Headline figures of one method."""
    lib = [i for i, it in enumerate(items) if it.in_library]
    ool = [i for i, it in enumerate(items) if not it.in_library]
    scores = [it.score(a) for it, a in zip(items, answers, strict=True)]
    base = [it.score(a) for it, a in zip(items, base_answers, strict=True)]
    per_task: dict[str, list[float]] = {}
    for i in lib:
        per_task.setdefault(items[i].group, []).append(scores[i])
    dominant = [
        bool(mixtures[i]) and max(mixtures[i], key=mixtures[i].get) == items[i].group  # type: ignore[arg-type]
        for i in lib
    ]
    out: dict[str, Any] = {
        "dominant": sum(dominant) / len(lib),
        "task_score": 100 * sum(sum(v) / len(v) for v in per_task.values()) / len(per_task),
        "per_task": {t: round(100 * sum(v) / len(v), 1) for t, v in per_task.items()},
        "ool_score": 100 * sum(scores[i] for i in ool) / len(ool),
        "ool_worse_than_base": sum(scores[i] < base[i] for i in ool),
        "ool_prompts": len(ool),
        "task_worse_than_base": sum(scores[i] < base[i] for i in lib),
        "abstained_task": sum(not mixtures[i] for i in lib) / len(lib),
        "abstained_ool": sum(not mixtures[i] for i in ool) / len(ool),
    }
    if selections is not None:
        rank = [s.rank_scores or s.scores for s in selections]
        out["ranking"] = sum(max(rank[i], key=rank[i].get) == items[i].group for i in lib) / len(
            lib
        )
    return out


# ----------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    engine = LoGoEngine.from_pretrained(adapters=args.adapters, progress=False)
    names = engine.adapter_names
    folders = resolve_sources(args.adapters)
    items = load_items(args.data, limit=args.limit)
    n_train = check_separate(items, folders)
    logger.info("%d prompts; none among %d training/validation prompts", len(items), n_train)
    prompts = [it.prompt for it in items]
    default = engine.routing
    start = time.perf_counter()

    # One probe pass each: the natural prompts, generator validation prompts, random prompts.
    probed = probe_all(engine, prompts, default, args.batch_size)
    val = probe_all(engine, threshold_prompts(names), default, args.batch_size)
    randoms = probe_all(engine, engine._random_prompts(64, 0), default, args.batch_size)
    probe_seconds = time.perf_counter() - start

    layer, module = engine.probe_target(dataclasses.replace(default, signal="norm"))
    key = calib.CalibrationKey("norm", layer, module, default.probe_input, default.probe_tokens)
    shipped = {calib.CalibrationKey.of(c): c for c in engine.calibrations}.get(key)
    if shipped is None:
        raise SystemExit("the library ships no norm calibration for the default probe setting")
    datafree = calib.from_scores(key, names, randoms.norm, source="random_tokens")
    # The other data-free idea: divide each raw score by a property of the adapter itself,
    # the Frobenius norm of its update s·B·A at the probed module.
    factors = [engine.library.factors(n).get(module) for n in names]
    delta_norm = torch.tensor(
        [1.0 if f is None else float((f.lora_b.float() @ f.lora_a.float()).norm()) for f in factors]
    )  # (N,)
    z_prompt = calib.zscores(shipped, names, probed.norm)
    z_free = calib.zscores(datafree, names, probed.norm)
    protos = engine.prototypes[0] if engine.prototypes else None
    proto = None if protos is None else calib.prototype_scores(protos, names, probed.states)
    val_z = calib.zscores(shipped, names, val.norm)
    val_proto = None if protos is None else calib.prototype_scores(protos, names, val.states)

    embedder = SentenceEmbedder()
    index = RetrieverIndex.build(embedder, folders)
    retrieval = index.similarity(embedder.encode(prompts))  # (P, N) cosine
    retrieval = retrieval[:, [index.names.index(n) for n in names]]

    q = args.abstain_quantile
    thresholds = {"z": quantile_of_top(val_z, q)}
    if val_proto is not None:
        thresholds["proto"] = quantile_of_top(val_proto, q)
    R = RoutingConfig
    methods: dict[str, list[Selection] | list[Mixture]] = {
        "base": [{} for _ in items],
        "oracle": [{it.group: 1.0} if it.in_library else {} for it in items],
        "norm@1 (paper rule)": routed(probed.norm, names, R(top_k=1, calibrated=False)),
        "norm@3 (paper rule)": routed(probed.norm, names, R(top_k=3, calibrated=False)),
        "norm-z@3, raw weights (previous default)": previous_default(probed.norm, z_prompt, names),
        "norm-z@1": routed(probed.norm, names, R(top_k=1), z_prompt),
        "norm-z@3 softmax T=1": routed(probed.norm, names, R(top_k=3), z_prompt),
        "norm-z@3 softmax T=0.5": routed(probed.norm, names, R(top_k=3, temperature=0.5), z_prompt),
        f"norm-z@1 abstain<{thresholds['z']:.2f}": routed(
            probed.norm, names, R(top_k=1, abstain_below=thresholds["z"]), z_prompt
        ),
        "data-free z@1 (random tokens)": routed(probed.norm, names, R(top_k=1), z_free),
        "data-free norm/‖sBA‖@1": routed(probed.norm, names, R(top_k=1), probed.norm / delta_norm),
        "retriever@1 (MiniLM)": routed(retrieval, names, R(top_k=1, weighting="uniform")),
    }
    if proto is not None:
        t = thresholds["proto"]
        p = dict(signal="prototype", calibrated=False)
        methods |= {
            "prototype@1": routed(proto, names, R(top_k=1, **p)),
            "prototype@3 softmax T=0.05": routed(proto, names, R(top_k=3, temperature=0.05, **p)),
            f"prototype@1 abstain<{t:.2f}": routed(proto, names, R(top_k=1, abstain_below=t, **p)),
            f"prototype@3 T=0.05 abstain<{t:.2f}": routed(
                proto, names, R(top_k=3, temperature=0.05, abstain_below=t, **p)
            ),
        }
        # Combination (a diagnostic): prototype similarities standardised per adapter on the
        # generator validation split, like the norm calibration, added to the norm z-scores.
        proto_key = key._replace(signal="prototype")
        proto_cal = calib.from_scores(proto_key, names, val_proto)  # type: ignore[arg-type]
        both = z_prompt + calib.zscores(proto_cal, names, proto)
        val_both = val_z + calib.zscores(proto_cal, names, val_proto)  # type: ignore[arg-type]
        thresholds["both"] = tb = quantile_of_top(val_both, q)
        methods |= {
            "prototype-z + norm-z @1": routed(probed.norm, names, R(top_k=1), both),
            f"prototype-z + norm-z @1 abstain<{tb:.2f}": routed(
                probed.norm, names, R(top_k=1, abstain_below=tb), both
            ),
        }
    default_rows = route_in_batches(engine, prompts, args.batch_size)
    methods["default (the library's routing)"] = default_rows
    check = check_default(default_rows, default, names, probed, z_prompt, proto)

    mixtures = {
        name: [m.mixture if isinstance(m, Selection) else m for m in rows]
        for name, rows in methods.items()
    }
    longest = {
        t: max(len(engine.tokenizer(it.answer)["input_ids"]) for it in items if it.group == t)
        for t in {it.group for it in items if it.in_library}
    }
    max_tokens = lambda it: longest[it.group] + ANSWER_SLACK if it.in_library else OOL_MAX_TOKENS  # noqa: E731
    answers = generate(engine, items, mixtures, args.batch_size, max_tokens)

    results = {
        name: summarize(
            items,
            mixtures[name],
            answers[name],
            answers["base"],
            rows if rows and isinstance(rows[0], Selection) else None,  # type: ignore[arg-type]
        )
        for name, rows in methods.items()
    }
    per_prompt = [
        {
            "prompt": it.prompt,
            "group": it.group,
            "reference": it.answer if it.in_library else list(it.keywords),
            "methods": {
                name: {
                    "mixture": {n: round(w, 4) for n, w in mixtures[name][i].items()},
                    "answer": answers[name][i],
                    "score": it.score(answers[name][i]),
                }
                for name in methods
            },
        }
        for i, it in enumerate(items)
    ]
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "adapters": str(args.adapters),
        "data": args.data.name,
        "default_routing": default.to_dict() if not callable(default.signal) else str(default),
        "prompts": {
            "task": sum(it.in_library for it in items),
            "out_of_library": sum(not it.in_library for it in items),
        },
        "default_check": check,
        "abstain_quantile": q,
        "thresholds": thresholds,
        "probe_seconds": round(probe_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "results": results,
        "per_prompt": per_prompt,
    }


def table(report: dict[str, Any]) -> str:
    """The results as a markdown table."""
    rows = [
        "| method | dominant correct | ranking correct | task score | out-of-library score | "
        "OOL worse than base | abstained (task / OOL) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in report["results"].items():
        ranking = f"{100 * r['ranking']:.1f}%" if "ranking" in r else "-"
        rows.append(
            f"| {name} | {100 * r['dominant']:.1f}% | {ranking} | {r['task_score']:.1f} | "
            f"{r['ool_score']:.1f} | {r['ool_worse_than_base']} / {r['ool_prompts']} | "
            f"{100 * r['abstained_task']:.0f}% / {100 * r['abstained_ool']:.0f}% |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=Path, default=default_adapters_dir())
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--abstain-quantile", type=float, default=0.025)
    parser.add_argument("--out", type=Path, default=None, help="write the full report (JSON)")
    parser.add_argument("--limit", type=int, default=None, help="first n prompts of each group")
    parser.add_argument(
        "--data",
        type=Path,
        default=DATA,
        help="the prompt set (default: natural_prompts.json; natural_prompts_confirm.json is the "
        "second set, written after the zoo's default routing was chosen)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = run(args)
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    headline = {
        name: {k: r[k] for k in ("dominant", "task_score", "ool_score", "ool_worse_than_base")}
        for name, r in report["results"].items()
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()

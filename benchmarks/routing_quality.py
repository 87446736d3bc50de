"""Routing quality of LoGo on the adapter zoo: routing accuracy and task scores, side by side.

On the zoo's test splits, for every task and on average, in one run:

- routing accuracy: how often a task's own adapter is top-1 / in the top-3, for the ``norm`` and
  ``entropy`` signals, raw and per-adapter calibrated (z-scores with each adapter's mean/std over
  the *validation* prompts of all library tasks), and for the embedding retriever;
- task scores (greedy, the task's own scorer) of: the base model; the oracle (the task's own
  adapter pinned; for a held-out task, its related adapter); LoGo ``norm`` / ``entropy`` at
  k = 1, 3, 5; calibrated LoGo ``norm-z`` / ``entropy-z`` at k = 1, 3 (top-k by z-score, weights
  proportional over the kept *raw* scores, as in the paper); a uniform mixture of every adapter;
  a LoRARetriever-style retriever (MiniLM prompt embedding vs each adapter's mean training-prompt
  embedding, top-3 by cosine, uniform weights); peft's Arrow router (top-3, per token, every
  layer, its own ``generate``);
- held-out tasks (no adapter of their own) separately: where they route, and whether the related
  adapter is chosen;
- figures: mean signal per (input task, adapter) (``routing_heatmap.png``) and LoGo's merge weight
  vs the MiniLM similarity of input task and adapter (``weight_vs_similarity.png``);
- ``--sweep``: routing accuracy (no generation) for other probe settings, on validation prompts.

LoGo selections are computed by the engine's own ``logo_engine.routing.select`` from one batched
probe per prompt set (a recording scorer keeps the probed outputs, so both signals come from one
pass) and generated through the pinned path ``engine.generate_batch(prompts, adapters=[...])``,
one mixture per row; identical (prompt, mixture) jobs are generated once. A check in every run
compares this with the engine's own routed path on one batch.

    HF_HUB_OFFLINE=1 python -m benchmarks.routing_quality --quick              # ~5 min, 2-core CPU
    HF_HUB_OFFLINE=1 python -m benchmarks.routing_quality --sweep \\
        --doc docs/benchmarks_quality.md --figures docs/figures       # full ~30 min, sweep ~5 min
    HF_HUB_OFFLINE=1 python -m benchmarks.routing_quality --adapters /tmp/zoo --quick

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
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.baselines import (
    ArrowBaseline,
    RetrieverIndex,
    SentenceEmbedder,
    retriever_mixtures,
)
from benchmarks.zoo.tasks import HELD_OUT_TASKS, LIBRARY_TASKS, TASKS, Example
from logo_engine import RoutingConfig
from logo_engine.engine import LoGoEngine
from logo_engine.library import resolve_sources
from logo_engine.models import default_adapters_dir
from logo_engine.routing import entropy_score, norm_score, select

logger = logging.getLogger("benchmarks.routing_quality")

Mixture = dict[str, float]
MixKey = tuple[tuple[str, float], ...]

SIGNALS = ("norm", "entropy")
ROUTERS = ("norm", "entropy", "norm-z", "entropy-z", "retriever")  # rankings we measure
LOGO_KS = (1, 3, 5)
CALIBRATED_KS = (1, 3)
RETRIEVER_K = 3
ARROW_K = 3
ANSWER_SLACK = 4  # max_new_tokens = longest reference answer of the task (tokens) + this


@dataclass(frozen=True)
class Sizes:
    """How many prompts each part of a run uses."""

    n_test: int  # test prompts per task (scores and routing accuracy)
    n_val: int  # validation prompts per library task (calibration statistics)
    n_sweep: int  # validation prompts per library task in the probe sweep
    batch_size: int  # rows per probe / generate_batch call


QUICK = Sizes(n_test=6, n_val=8, n_sweep=6, batch_size=16)
FULL = Sizes(n_test=24, n_val=16, n_sweep=12, batch_size=16)


def method_names(arrow: bool) -> list[str]:
    """Every method whose task score we measure, in table order."""
    names = ["base", "oracle", "uniform", f"retriever@{RETRIEVER_K}"]
    names += [f"arrow@{ARROW_K}"] if arrow else []
    names += [f"{s}@{k}" for s in SIGNALS for k in LOGO_KS]
    names += [f"{s}-z@{k}" for s in SIGNALS for k in CALIBRATED_KS]
    return names


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class EvalTask:
    """One task as evaluated: its test prompts and the adapters that count as correct routing."""

    name: str
    held_out: bool
    targets: tuple[str, ...]  # its own adapter, or (held-out) its related adapters
    examples: list[Example]
    max_new_tokens: int

    @property
    def prompts(self) -> list[str]:
        return [ex.prompt for ex in self.examples]


def eval_tasks(
    names: Sequence[str], adapters: Sequence[str], n: int, seed: int, count: Callable[[str], int]
) -> list[EvalTask]:
    """Test splits of ``names``; ``count`` tokenizes an answer (for max_new_tokens)."""
    out = []
    for name in names:
        task = TASKS[name]
        examples = task.make_split("test", n, seed=seed)
        targets = tuple(r for r in task.related if r in adapters) if task.held_out else (name,)
        longest = max(count(ex.answer) for ex in examples)
        out.append(EvalTask(name, task.held_out, targets, examples, longest + ANSWER_SLACK))
    return out


def default_task_names(adapters: Sequence[str]) -> list[str]:
    """Library tasks that have an adapter, then held-out tasks whose related adapter is loaded."""
    unknown = sorted(set(adapters) - set(LIBRARY_TASKS))
    if unknown:
        raise SystemExit(f"adapters {unknown} are not library tasks of benchmarks/zoo/tasks.py")
    lib = [t for t in LIBRARY_TASKS if t in adapters]
    held = [t for t in HELD_OUT_TASKS if any(r in adapters for r in TASKS[t].related)]
    return lib + held


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------- probing


class OutputRecorder:
    """A pluggable scorer that keeps every probed output o (B, N, out); it scores by norm."""

    __name__ = "recorded_norm"

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    def __call__(self, outputs: torch.Tensor) -> torch.Tensor:
        self.outputs.append(outputs.detach().float().cpu())
        return norm_score(outputs)


def probe_scores(
    engine: LoGoEngine,
    prompts: Sequence[str],
    *,
    batch_size: int,
    base: RoutingConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Every adapter's norm and entropy score for every prompt, from one probe pass.

    Returns ``{"norm": (P, N), "entropy": (P, N)}`` in prompt order, columns in
    ``engine.adapter_names`` order.
    """
    recorder = OutputRecorder()
    routing = dataclasses.replace(base or RoutingConfig(), top_k=1, signal=recorder)
    lengths = [engine.count_tokens(p) for p in prompts]
    order: list[int] = []
    for batch in length_batches(lengths, batch_size):
        engine.route_batch([prompts[i] for i in batch], routing=routing)
        order += batch
    outputs = torch.cat(recorder.outputs)[torch.argsort(torch.tensor(order))]  # (P, N, out)
    return {"norm": norm_score(outputs), "entropy": entropy_score(outputs)}


@dataclass(frozen=True)
class Calibration:
    """Per-adapter z-scores: z_i = (s_i - mean_i) / std_i, statistics from reference prompts."""

    mean: torch.Tensor  # (N,)
    std: torch.Tensor  # (N,)

    @classmethod
    def fit(cls, scores: torch.Tensor) -> Calibration:
        """scores (P, N) over reference prompts."""
        return cls(scores.mean(0), scores.std(0).clamp(min=1e-12))

    def z(self, scores: torch.Tensor) -> torch.Tensor:
        """(P, N) -> (P, N)."""
        return (scores - self.mean) / self.std


def logo_mixtures(scores: torch.Tensor, names: Sequence[str], k: int, signal: str) -> list[Mixture]:
    """The engine's own top-k + proportional weights on precomputed scores (P, N)."""
    config = RoutingConfig(top_k=min(k, len(names)), signal=signal)  # type: ignore[arg-type]
    selections = select(scores, names, config, probe_layer=-1, probe_module="", probe_ms=0.0)
    return [s.mixture for s in selections]


def calibrated_mixtures(
    raw: torch.Tensor, z: torch.Tensor, names: Sequence[str], k: int
) -> list[Mixture]:
    """Top-k by z-score; weights proportional over the kept raw scores. raw, z (P, N)."""
    top = torch.topk(z, k=min(k, len(names)), dim=-1).indices  # (P, k)
    out = []
    for row, slots in enumerate(top.tolist()):
        kept = raw[row, slots].clamp(min=0)  # (k,)
        w = kept / kept.sum() if float(kept.sum()) > 0 else torch.full_like(kept, 1 / len(slots))
        out.append({names[j]: float(wj) for j, wj in zip(slots, w, strict=True)})
    return out


def hit_rate(scores: torch.Tensor, names: Sequence[str], targets: Sequence[str], k: int) -> float:
    """Fraction of rows whose top-k (by score, descending) holds one of ``targets``."""
    if not targets:
        return float("nan")
    cols = [names.index(t) for t in targets]
    top = torch.topk(scores, k=min(k, len(names)), dim=-1).indices  # (P, k)
    return float(torch.isin(top, torch.tensor(cols)).any(-1).float().mean())


# ----------------------------------------------------------------------------- per-task run


@dataclass
class TaskResult:
    """Everything measured on one task (filled in by the phases of a run)."""

    task: EvalTask
    rankings: dict[str, torch.Tensor] = field(default_factory=dict)  # router -> (P, N)
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # signal -> raw (P, N)
    mixtures: dict[str, list[Mixture]] = field(default_factory=dict)  # method -> one per row
    predictions: dict[str, list[str]] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # method -> mean task score

    def routing(self, names: Sequence[str]) -> dict[str, dict[str, float]]:
        """router -> {"top1": ..., "top3": ...} for this task's targets."""
        return {
            r: {f"top{k}": hit_rate(s, names, self.task.targets, k) for k in (1, 3)}
            for r, s in self.rankings.items()
        }


def build_mixtures(
    result: TaskResult, names: Sequence[str], with_arrow: bool
) -> dict[str, list[Mixture]]:
    """Per-row mixtures of every pinned method (Arrow routes itself: no mixture)."""
    n = len(result.task.examples)
    targets = result.task.targets
    oracle: Mixture = {t: 1.0 / len(targets) for t in targets}
    mix: dict[str, list[Mixture]] = {
        "base": [{} for _ in range(n)],
        "oracle": [dict(oracle) for _ in range(n)],
        "uniform": [{a: 1.0 / len(names) for a in names} for _ in range(n)],
        f"retriever@{RETRIEVER_K}": retriever_mixtures(
            result.rankings["retriever"], names, RETRIEVER_K
        ),
    }
    for signal in SIGNALS:
        for k in LOGO_KS:
            mix[f"{signal}@{k}"] = logo_mixtures(result.raw[signal], names, k, signal)
        for k in CALIBRATED_KS:
            z = result.rankings[f"{signal}-z"]
            mix[f"{signal}-z@{k}"] = calibrated_mixtures(result.raw[signal], z, names, k)
    return {m: mix[m] for m in method_names(with_arrow) if m in mix}


def mix_key(mixture: Mixture) -> MixKey:
    """A hashable identity of a mixture (weights rounded to 1e-6, zero weights dropped)."""
    return tuple(sorted((n, round(w, 6)) for n, w in mixture.items() if w > 0))


def generate_pinned(
    engine: LoGoEngine,
    task: EvalTask,
    mixtures: dict[str, list[Mixture]],
    batch_size: int,
) -> tuple[dict[str, list[str]], int]:
    """Generate every method's answers, each distinct (row, mixture) once.

    Returns (method -> answers, number of distinct generations).
    """
    jobs: dict[tuple[int, MixKey], Mixture] = {}
    for rows in mixtures.values():
        for row, m in enumerate(rows):
            jobs.setdefault((row, mix_key(m)), m)
    keys = list(jobs)
    lengths = [engine.count_tokens(task.prompts[row]) for row, _ in keys]
    texts: dict[tuple[int, MixKey], str] = {}
    for batch in length_batches(lengths, batch_size):
        outs = engine.generate_batch(
            [task.prompts[keys[i][0]] for i in batch],
            adapters=[jobs[keys[i]] for i in batch],
            max_new_tokens=task.max_new_tokens,
        )
        for i, out in zip(batch, outs, strict=True):
            texts[keys[i]] = out.text
    answers = {
        method: [texts[(row, mix_key(m))] for row, m in enumerate(rows)]
        for method, rows in mixtures.items()
    }
    return answers, len(keys)


def generate_arrow(arrow: ArrowBaseline, task: EvalTask, batch_size: int) -> list[str]:
    """Arrow's greedy answers for the task's prompts, in prompt order."""
    prompts = task.prompts
    lengths = [len(p) for p in prompts]
    answers: dict[int, str] = {}
    for batch in length_batches(lengths, batch_size):
        outs = arrow.generate([prompts[i] for i in batch], max_new_tokens=task.max_new_tokens)
        answers.update(zip(batch, outs, strict=True))
    return [answers[i] for i in range(len(prompts))]


def score_answers(task: EvalTask, answers: Sequence[str]) -> float:
    """Mean task score of ``answers`` against the references."""
    scorer = TASKS[task.name].score
    pairs = zip(answers, task.examples, strict=True)
    return sum(scorer(a, ex.answer) for a, ex in pairs) / len(task.examples)


def check_routed_path(
    engine: LoGoEngine, task: EvalTask, pinned: Sequence[Mixture], pinned_answers: Sequence[str]
) -> dict[str, Any]:
    """Compare the engine's own routed path (raw norm, k=3) with our pinned reconstruction."""
    n = min(8, len(task.examples))
    routing = RoutingConfig(top_k=min(3, len(engine.adapter_names)), signal="norm")
    if "calibrated" in {f.name for f in dataclasses.fields(routing)}:
        routing = dataclasses.replace(routing, calibrated=False)  # raw ranking, as norm@3
    outs = engine.generate_batch(
        task.prompts[:n], routing=routing, max_new_tokens=task.max_new_tokens
    )
    same_sel = sum(
        list(o.selection.adapters) == list(pinned[i])
        and all(
            abs(a - b) < 1e-4 for a, b in zip(o.selection.weights, pinned[i].values(), strict=False)
        )
        for i, o in enumerate(outs)
    )
    same_text = sum(o.text == pinned_answers[i] for i, o in enumerate(outs))
    return {"task": task.name, "rows": n, "same_selection": same_sel, "same_text": same_text}


# ----------------------------------------------------------------------------- probe sweep


def sweep_configs(n_layers: int) -> list[tuple[str, RoutingConfig]]:
    """Probe settings for the routing-accuracy sweep (the first is the engine default)."""
    d = RoutingConfig()
    rep = dataclasses.replace
    return [
        ("default: module input, last token, layer -1, q_proj", d),
        ("probe_input=residual (paper code)", rep(d, probe_input="residual")),
        ("probe_tokens=mean", rep(d, probe_tokens="mean")),
        ("residual + mean", rep(d, probe_input="residual", probe_tokens="mean")),
        ("probe_module=v_proj", rep(d, probe_module="v_proj")),
        ("probe_module=v_proj, mean", rep(d, probe_module="v_proj", probe_tokens="mean")),
        ("probe_layer=-2", rep(d, probe_layer=-2)),
        ("probe_layer=-4", rep(d, probe_layer=-4)),
        ("probe_layer=-8", rep(d, probe_layer=-8)),
        (f"probe_layer={n_layers // 2} (middle)", rep(d, probe_layer=n_layers // 2)),
        ("probe_layer=0 (first)", rep(d, probe_layer=0)),
    ]


def run_sweep(
    engine: LoGoEngine, tasks: Sequence[str], n: int, batch_size: int, seed: int
) -> list[dict[str, Any]]:
    """Routing accuracy of each probe setting on validation prompts of the library tasks.

    Calibrated accuracy is two-fold: z statistics from the even rows score the odd rows and vice
    versa, so no prompt is scored with statistics it contributed to.
    """
    names = engine.adapter_names
    prompts, owner = [], []
    for t in tasks:
        for ex in TASKS[t].make_split("validation", n, seed=seed):
            prompts.append(ex.prompt)
            owner.append(t)
    cols = torch.tensor([names.index(t) for t in owner])  # (P,)
    fold = torch.arange(len(prompts)) % 2  # (P,)
    n_layers = int(engine.model.config.num_hidden_layers)
    rows = []
    for label, config in tqdm(sweep_configs(n_layers), desc="probe sweep"):
        start = time.perf_counter()
        scores = probe_scores(engine, prompts, batch_size=batch_size, base=config)
        row: dict[str, Any] = {"setting": label}
        for signal, s in scores.items():
            top = torch.topk(s, k=min(3, len(names)), dim=-1).indices  # (P, 3)
            row[f"{signal} top1"] = float((top[:, 0] == cols).float().mean())
            row[f"{signal} top3"] = float((top == cols[:, None]).any(-1).float().mean())
            z = torch.empty_like(s)
            for f in (0, 1):
                z[fold == f] = Calibration.fit(s[fold != f]).z(s[fold == f])
            row[f"{signal}-z top1"] = float((z.argmax(-1) == cols).float().mean())
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- figures


def save_heatmap(results: Sequence[TaskResult], names: Sequence[str], path: Path) -> None:
    """Mean signal per (input task, adapter): norm and entropy min-max scaled per row, and z."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = [r.task.name + (" (held-out)" if r.task.held_out else "") for r in results]
    panels = []
    for signal in SIGNALS:
        m = torch.stack([r.raw[signal].mean(0) for r in results])  # (T, N)
        lo, hi = m.min(1, keepdim=True).values, m.max(1, keepdim=True).values
        panels.append((f"{signal}: mean score, min-max scaled per row", (m - lo) / (hi - lo)))
    z = torch.stack([r.rankings["norm-z"].mean(0) for r in results])  # (T, N)
    panels.append(("norm-z: mean calibrated z-score (raw)", z))
    fig, axes = plt.subplots(1, 3, figsize=(21, 0.42 * len(rows) + 3.2))
    for ax, (title, m) in zip(axes, panels, strict=True):
        cmap = "coolwarm" if "z-score" in title else "viridis"
        im = ax.imshow(m.numpy(), cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel("adapter")
        ax.set_title(title, fontsize=10)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{float(m[i, j]):.1f}",
                    ha="center",
                    va="center",
                    fontsize=5.5,
                    color="white" if cmap == "viridis" and m[i, j] < 0.5 else "black",
                )
        for i, r in enumerate(results):
            for t in r.task.targets:
                j = list(names).index(t)
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
        fig.colorbar(im, ax=ax, fraction=0.04)
    axes[0].set_ylabel("input task (test prompts)")
    fig.suptitle("LoGo probe signal per (input task, adapter); red box: own / related adapter")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def weight_similarity_points(
    results: Sequence[TaskResult], names: Sequence[str], sims: dict[str, torch.Tensor]
) -> list[tuple[float, float, str]]:
    """(task-adapter similarity, mean norm@3 weight, kind) for every (input task, adapter)."""
    points = []
    for r in results:
        weights = r.mixtures["norm@3"]
        for j, a in enumerate(names):
            w = sum(m.get(a, 0.0) for m in weights) / len(weights)
            kind = (
                "own"
                if (a in r.task.targets and not r.task.held_out)
                else ("related" if a in r.task.targets else "other")
            )
            points.append((float(sims[r.task.name][j]), w, kind))
    return points


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(v: Sequence[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        r = torch.empty_like(t)
        r[t.argsort()] = torch.arange(len(t), dtype=torch.float64)
        for value in t.unique():  # average ties
            tie = t == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / ((rx.norm() * ry.norm()) + 1e-12))


def save_weight_plot(points: Sequence[tuple[float, float, str]], path: Path) -> float:
    """Scatter of merge weight vs task similarity; returns Spearman rho over non-own pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"other": ("tab:gray", "o"), "related": ("tab:orange", "s"), "own": ("tab:blue", "*")}
    for kind, (color, marker) in styles.items():
        pts = [(x, y) for x, y, k in points if k == kind]
        if pts:
            ax.scatter(*zip(*pts, strict=True), c=color, marker=marker, s=28, label=kind, alpha=0.8)
    rest = [(x, y) for x, y, k in points if k != "own"]
    rho = spearman([p[0] for p in rest], [p[1] for p in rest]) if len(rest) > 2 else float("nan")
    ax.set_xlabel("task similarity: cos(MiniLM mean test-prompt emb., adapter train-prompt emb.)")
    ax.set_ylabel("mean LoGo norm@3 merge weight")
    ax.set_title(
        f"merge weight vs task similarity (Spearman rho, non-own pairs = {rho:.2f})", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return rho


# ----------------------------------------------------------------------------- reporting


def pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.0f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v == v]
    return sum(vals) / len(vals) if vals else float("nan")


def routing_table(results: Sequence[TaskResult], names: Sequence[str]) -> str:
    """Library tasks: own adapter top-1 / in top-3, per router."""
    lib = [r for r in results if not r.task.held_out]
    header = ["task"] + [f"{r} {m}" for r in ROUTERS for m in ("top1", "top3")]
    acc = [r.routing(names) for r in lib]
    rows = [
        [r.task.name] + [pct(a[x][m]) for x in ROUTERS for m in ("top1", "top3")]
        for r, a in zip(lib, acc, strict=True)
    ]
    rows.append(
        ["**mean**"]
        + [f"**{pct(mean([a[x][m] for a in acc]))}**" for x in ROUTERS for m in ("top1", "top3")]
    )
    return md_table(header, rows)


def held_out_table(results: Sequence[TaskResult], names: Sequence[str]) -> str:
    """Held-out tasks: is the related adapter chosen, and where does the rest go."""
    header = [
        "task",
        "related",
        *(f"{r} top1/top3" for r in ROUTERS),
        "norm top-1 adapters",
        "norm@3 weight on related",
    ]
    rows = []
    for r in (r for r in results if r.task.held_out):
        acc = r.routing(names)
        firsts = Counter(names[int(j)] for j in r.rankings["norm"].argmax(-1))
        common = ", ".join(f"{a} {c}/{len(r.task.examples)}" for a, c in firsts.most_common(3))
        w = mean([sum(m.get(t, 0.0) for t in r.task.targets) for m in r.mixtures["norm@3"]])
        rows.append(
            [
                r.task.name,
                ", ".join(r.task.targets),
                *(f"{pct(acc[x]['top1'])} / {pct(acc[x]['top3'])}" for x in ROUTERS),
                common,
                f"{w:.2f}",
            ]
        )
    return md_table(header, rows)


def score_table(results: Sequence[TaskResult], methods: Sequence[str]) -> str:
    """Task score (%) per task and method, with library and held-out means."""
    rows = []
    for group, held in (("library", False), ("held-out", True)):
        part = [r for r in results if r.task.held_out == held]
        if not part:
            continue
        rows += [[r.task.name] + [pct(r.scores[m]) for m in methods] for r in part]
        rows.append(
            [f"**mean {group}**"]
            + [f"**{100 * mean([r.scores[m] for r in part]):.1f}**" for m in methods]
        )
    return md_table(["task", *methods], rows)


def sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k not in ("setting", "seconds")]
    return md_table(
        ["probe setting", *keys, "seconds"],
        [[r["setting"], *(pct(r[k]) for k in keys), str(r["seconds"])] for r in rows],
    )


def averages(results: Sequence[TaskResult], methods: Sequence[str], held: bool) -> dict[str, float]:
    part = [r for r in results if r.task.held_out == held]
    return {m: round(100 * mean([r.scores[m] for r in part]), 1) for m in methods} if part else {}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()}-core {cpu}, no GPU, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s), python {platform.python_version()}"
    )


def zoo_status(folder: Path, names: Sequence[str]) -> str:
    manifest = folder / "zoo.json"
    listed = sorted(json.loads(manifest.read_text())) if manifest.is_file() else []
    missing = [t for t in LIBRARY_TASKS if t not in names]
    state = "complete" if not missing else f"INCOMPLETE, missing adapters: {missing}"
    return f"`{folder}`: {len(names)} adapters ({state}; zoo.json lists {len(listed)})"


def update_doc(path: Path, section: str, body: str) -> None:
    """Replace (or append) the marked block ``section`` of ``path``; the rest is kept."""
    start, end = (
        f"<!-- routing_quality:{section}:start -->",
        f"<!-- routing_quality:{section}:end -->",
    )
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.is_file() else "# Routing quality on the adapter zoo\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block + "\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunConfig:
    """Command-line settings of one run."""

    adapters: Path
    sizes: Sizes
    mode: str
    tasks: tuple[str, ...] | None
    seed: int
    arrow: bool
    sweep: bool
    sweep_only: bool
    doc: Path | None
    figures: Path | None
    json_out: Path | None
    command: str


def score_phase(
    engine: LoGoEngine, cfg: RunConfig, log: dict[str, Any]
) -> tuple[list[TaskResult], list[str]]:
    """Routing, calibration, baselines and generation for every task."""
    names = engine.adapter_names
    sizes = cfg.sizes
    tok = engine.tokenizer

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    tasks = eval_tasks(cfg.tasks or default_task_names(names), names, sizes.n_test, cfg.seed, count)
    t0 = time.perf_counter()
    val_prompts = [
        ex.prompt
        for t in LIBRARY_TASKS
        if t in names
        for ex in TASKS[t].make_split("validation", sizes.n_val, seed=cfg.seed)
    ]
    val = probe_scores(engine, val_prompts, batch_size=sizes.batch_size)
    calib = {s: Calibration.fit(val[s]) for s in SIGNALS}
    embedder = SentenceEmbedder()
    folders = resolve_sources(cfg.adapters)
    index = RetrieverIndex.build(embedder, {n: folders[n] for n in names})
    results, sims = [], {}
    for task in tqdm(tasks, desc="routing"):
        raw = probe_scores(engine, task.prompts, batch_size=sizes.batch_size)
        emb = embedder.encode(task.prompts)  # (P, d)
        centroid = torch.nn.functional.normalize(emb.mean(0), dim=0)  # (d,)
        sims[task.name] = index.similarity(centroid[None])[0]  # (N,)
        rankings = {**raw, **{f"{s}-z": calib[s].z(raw[s]) for s in SIGNALS}}
        rankings["retriever"] = index.similarity(emb)
        results.append(TaskResult(task, rankings=rankings, raw=raw))
    log["seconds_routing"] = round(time.perf_counter() - t0, 1)
    methods = method_names(cfg.arrow)
    for r in results:
        r.mixtures = build_mixtures(r, names, cfg.arrow)
    t0 = time.perf_counter()
    distinct = total = 0
    for r in tqdm(results, desc="generate (engine)"):
        r.predictions, n = generate_pinned(engine, r.task, r.mixtures, sizes.batch_size)
        distinct, total = distinct + n, total + len(r.mixtures) * len(r.task.examples)
    log["generations"] = {"distinct": distinct, "requested": total}
    log["routed_path_check"] = check_routed_path(
        engine, results[0].task, results[0].mixtures["norm@3"], results[0].predictions["norm@3"]
    )
    log["seconds_generate_engine"] = round(time.perf_counter() - t0, 1)
    if cfg.arrow:
        t0 = time.perf_counter()
        arrow = ArrowBaseline({n: folders[n] for n in names}, top_k=ARROW_K, seed=cfg.seed)
        for r in tqdm(results, desc="generate (arrow)"):
            r.predictions[f"arrow@{ARROW_K}"] = generate_arrow(arrow, r.task, sizes.batch_size)
        del arrow
        log["seconds_generate_arrow"] = round(time.perf_counter() - t0, 1)
    for r in results:
        r.scores = {m: score_answers(r.task, r.predictions[m]) for m in methods}
    if cfg.figures:
        save_heatmap(results, names, cfg.figures / "routing_heatmap.png")
        points = weight_similarity_points(results, names, sims)
        log["weight_similarity_spearman"] = round(
            save_weight_plot(points, cfg.figures / "weight_vs_similarity.png"), 3
        )
    return results, methods


def report(
    results: Sequence[TaskResult],
    methods: Sequence[str],
    names: Sequence[str],
    cfg: RunConfig,
    log: dict[str, Any],
) -> str:
    """The markdown report of one run (also printed)."""
    s = cfg.sizes
    parts = [
        f"### Run: `{cfg.mode}`\n",
        f"- command: `{cfg.command}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}; machine: {machine()}",
        f"- adapters: {zoo_status(cfg.adapters, names)}",
        f"- sizes: {s.n_test} test prompts per task, {s.n_val} validation prompts per library "
        f"task for calibration, batch {s.batch_size}, greedy, max_new_tokens = longest "
        f"reference answer + {ANSWER_SLACK}",
        f"- generations: {log['generations']['distinct']} distinct of "
        f"{log['generations']['requested']} requested (identical prompt+mixture generated once)",
        f"- engine routed path vs pinned reconstruction (norm, k=3, task "
        f"`{log['routed_path_check']['task']}`): {log['routed_path_check']['same_selection']}/"
        f"{log['routed_path_check']['rows']} same selections, "
        f"{log['routed_path_check']['same_text']}/{log['routed_path_check']['rows']} same texts",
        f"- time: {log['seconds_total']} s in all (routing {log['seconds_routing']} s, engine "
        f"generation {log['seconds_generate_engine']} s, Arrow "
        f"{log.get('seconds_generate_arrow', 'n/a')} s)",
        "",
        "#### Routing accuracy, library tasks (% of test prompts whose own adapter is top-1 / in "
        "top-3)\n",
        routing_table(results, names),
        "",
        "#### Held-out tasks: is the related adapter chosen (% top-1 / % in top-3)?\n",
        held_out_table(results, names),
        "",
        "#### Task score (% of test prompts answered correctly)\n",
        score_table(results, methods),
    ]
    goal = goal_check(results, methods, names)
    parts += [
        "",
        "Goal of the issue (library tasks): top-1 routing accuracy >= 90%, average task "
        "score within 5 points of the oracle, and above every baseline (base, uniform, "
        "retriever, Arrow):\n",
        md_table(
            ["LoGo variant", "top-1 >= 90%", "within 5 of oracle", "above every baseline"],
            [[m, *("yes" if v else "no" for v in g.values())] for m, g in goal.items()],
        ),
    ]
    if "weight_similarity_spearman" in log:
        parts += [
            "",
            f"Merge weight vs task similarity: Spearman rho = {log['weight_similarity_spearman']}"
            " over (input task, adapter) pairs other than the task's own adapter.",
        ]
    return "\n".join(parts) + "\n"


def headline(
    results: Sequence[TaskResult],
    methods: Sequence[str],
    names: Sequence[str],
    cfg: RunConfig,
    log: dict[str, Any],
) -> dict[str, Any]:
    lib = [r.routing(names) for r in results if not r.task.held_out]
    held = [r.routing(names) for r in results if r.task.held_out]
    return {
        "mode": cfg.mode,
        "n_test": cfg.sizes.n_test,
        "n_adapters": len(names),
        "top1": {x: round(mean([a[x]["top1"] for a in lib]), 3) for x in ROUTERS},
        "top3": {x: round(mean([a[x]["top3"] for a in lib]), 3) for x in ROUTERS},
        "held_out_related_top1": {x: round(mean([a[x]["top1"] for a in held]), 3) for x in ROUTERS},
        "score_library": averages(results, methods, held=False),
        "score_held_out": averages(results, methods, held=True),
        "goal": goal_check(results, methods, names),
        "seconds": log["seconds_total"],
    }


def goal_check(
    results: Sequence[TaskResult], methods: Sequence[str], names: Sequence[str]
) -> dict[str, dict[str, bool]]:
    """The issue's goal, per LoGo variant, on library tasks.

    top-1 routing accuracy >= 0.9, average task score within 5 points of the oracle, and above
    every baseline (base, uniform, retriever, Arrow).
    """
    lib = [r for r in results if not r.task.held_out]
    acc = [r.routing(names) for r in lib]
    avg = averages(results, methods, held=False)
    baselines = [
        m for m in methods if m == "base" or m == "uniform" or "retriever" in m or "arrow" in m
    ]
    out = {}
    logo = [m for m in methods if m.split("@")[0] in ("norm", "entropy", "norm-z", "entropy-z")]
    for m in logo:
        router = m.split("@")[0]
        out[m] = {
            "top1>=0.9": mean([a[router]["top1"] for a in acc]) >= 0.9,
            "within5_of_oracle": avg[m] >= avg["oracle"] - 5,
            "above_baselines": all(avg[m] > avg[b] for b in baselines),
        }
    return out


def parse_args(argv: list[str] | None) -> RunConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"small sizes: {QUICK}")
    p.add_argument(
        "--adapters",
        type=Path,
        default=default_adapters_dir(),
        help="adapter library folder (default: the shipped zoo)",
    )
    p.add_argument("--n-test", type=int, help="test prompts per task (overrides the mode)")
    p.add_argument("--n-val", type=int, help="validation prompts per task for calibration")
    p.add_argument("--n-sweep", type=int, help="validation prompts per task in the sweep")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), help="default: every task")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: one core is shared)")
    p.add_argument("--no-arrow", action="store_true", help="skip peft's Arrow baseline")
    p.add_argument("--sweep", action="store_true", help="also run the probe-settings sweep")
    p.add_argument("--sweep-only", action="store_true", help="only the probe-settings sweep")
    p.add_argument("--doc", type=Path, help="write the report into this markdown file")
    p.add_argument("--figures", type=Path, help="write the figures into this folder")
    p.add_argument("--json", dest="json_out", type=Path, help="write raw results (JSON) here")
    a = p.parse_args(argv)
    base = QUICK if a.quick else FULL
    sizes = Sizes(
        n_test=a.n_test or base.n_test,
        n_val=a.n_val or base.n_val,
        n_sweep=a.n_sweep or base.n_sweep,
        batch_size=a.batch_size or base.batch_size,
    )
    torch.set_num_threads(a.threads)
    return RunConfig(
        adapters=a.adapters,
        sizes=sizes,
        mode="quick" if a.quick else "full",
        tasks=tuple(a.tasks) if a.tasks else None,
        seed=a.seed,
        arrow=not a.no_arrow,
        sweep=a.sweep or a.sweep_only,
        sweep_only=a.sweep_only,
        doc=a.doc,
        figures=a.figures,
        json_out=a.json_out,
        command="HF_HUB_OFFLINE=1 python -m benchmarks.routing_quality "
        + " ".join(sys.argv[1:] if argv is None else argv),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the headline figures."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    cfg = parse_args(argv)
    start = time.perf_counter()
    engine = LoGoEngine.from_pretrained(adapters=cfg.adapters)
    names = engine.adapter_names
    log: dict[str, Any] = {}
    out: dict[str, Any] = {"mode": cfg.mode}
    if not cfg.sweep_only:
        results, methods = score_phase(engine, cfg, log)
        log["seconds_total"] = round(time.perf_counter() - start, 1)
        text = report(results, methods, names, cfg, log)
        print(text)
        if cfg.doc:
            update_doc(cfg.doc, cfg.mode, text)
        out = headline(results, methods, names, cfg, log)
        if cfg.json_out:
            raw = [
                {
                    "task": r.task.name,
                    "scores": r.scores,
                    "routing": r.routing(names),
                    "predictions": r.predictions,
                    "mixtures": r.mixtures,
                }
                for r in results
            ]
            cfg.json_out.write_text(json.dumps({"headline": out, "log": log, "tasks": raw}))
    if cfg.sweep:
        t0 = time.perf_counter()
        lib = [t for t in LIBRARY_TASKS if t in names]
        rows = run_sweep(engine, lib, cfg.sizes.n_sweep, cfg.sizes.batch_size, cfg.seed)
        text = (
            f"### Probe-settings sweep (routing accuracy only, `{cfg.mode}` sizes)\n\n"
            f"{cfg.sizes.n_sweep} validation prompts per library task ({len(lib)} tasks), "
            f"{len(names)} adapters; % of prompts whose own adapter is top-1 / in top-3; "
            "`-z top1`: per-adapter z-scored, two-fold (statistics from the other half of the "
            f"prompts). {time.perf_counter() - t0:.0f} s.\n\n" + sweep_table(rows)
        )
        print(text)
        if cfg.doc:
            update_doc(cfg.doc, f"sweep-{cfg.mode}", text)
        out["sweep_top1_norm"] = {r["setting"]: round(r["norm top1"], 3) for r in rows}
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

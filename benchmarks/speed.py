"""Speed of LoGo on the real model (SmolLM2-135M-Instruct), side by side with the alternatives.

Four measurements, each in one run, variants interleaved and repeated (medians, ratios taken
within the run):

1. ``compare``: time to first token (TTFT) and decode tokens/s of the base model, one adapter
   through peft, LoGo (k = 1, 3, 5; and k = 3 probing the middle block), the reference code's
   approach, a peft ``cat`` merge built per request and peft's Arrow router; on the shipped zoo and
   on synthetic libraries of 64 (and, in the full run, 256) random adapters.
2. ``latency``: per-token latency (total time / tokens) against answer length, 1..512, for LoGo
   k = 3 and the base model (plus the reference approach in the full run), from one long greedy
   answer each (a forward hook timestamps every model forward). Figure:
   ``docs/figures/latency_vs_length.png``.
3. ``batch``: throughput of 8 and 16 requests with different selections, ``generate_batch``
   against ``generate`` one by one.
4. ``probe``: probe time, stacked-tensor bytes and process RSS against library size (8..512).
   Figure: ``docs/figures/probe_vs_library.png``.

Answers have a fixed length: greedy decoding with end-of-sequence suppressed (``min_new_tokens``
for ``model.generate``; the engine's EOS set emptied), checked against the token counts.

    HF_HUB_OFFLINE=1 python -m benchmarks.speed --quick     # < 10 min on 2 busy cores
    HF_HUB_OFFLINE=1 python -m benchmarks.speed             # full run, ~40 min (16 of them:
                                                            # peft/Arrow loading 256 adapters)
    options: --zoo DIR (default: the shipped zoo), --threads N, --json FILE, --figures DIR,
    --libraries 64 (skip 256: ~25 min), --repeats N, --only compare latency probe,
    --replot FILE (redraw the figures from a --json file)

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import itertools
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from benchmarks.speed_baselines import (
    ArrowRunner,
    BaseRunner,
    CatRunner,
    PeftOneRunner,
    Prompt,
    ReferenceRunner,
    Runner,
    adapter_folders,
    folder_bytes,
    hf_generate,
    load_peft_library,
    write_random_adapters,
)
from logo_engine import LoGoEngine, RoutingConfig
from logo_engine.library import Adapter, LoraFactors
from logo_engine.models import default_adapters_dir, load_base_model

PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a strange map hidden in "
    "the wall of the lighthouse, and describe every step of the journey it leads her on."
)
BATCH_PROMPTS = [
    "What is 347 plus 589?",
    "Convert 7 km to metres.",
    "Rewrite the date 2024-03-15 as 15 March 2024 style.",
    "Translate 'good morning' into French.",
    "Give the capital of Australia and one fact about it.",
    "Write a SQL query that counts the rows of the table users.",
    "Sort these words alphabetically: pear, apple, fig, banana.",
    "Explain in two sentences why the sky is blue.",
    "What is 12 times 14?",
    "Convert 3 hours to minutes.",
    "Spell the word 'necessary' backwards.",
    "List three prime numbers greater than 50.",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Is 221 a prime number? Answer yes or no and explain.",
    "Write a haiku about autumn rain.",
    "What is the past tense of the verb 'to swim'?",
]


@dataclass(frozen=True)
class Settings:
    quick: bool
    repeats: int
    n_decode: int  # decode tokens per timing: (t(n + 1) - t(1)) / n
    libraries: tuple[int, ...]  # synthetic library sizes for ``compare``
    max_length: int  # latency curve up to this answer length
    latency_repeats: int
    batch_sizes: tuple[int, ...]
    batch_tokens: int
    probe_sizes: tuple[int, ...]
    probe_repeats: int

    @classmethod
    def of(cls, quick: bool) -> Settings:
        if quick:
            return cls(True, 3, 12, (64,), 128, 1, (8, 16), 12, (8, 32, 128, 512), 3)
        return cls(False, 5, 32, (64, 256), 512, 2, (8, 16), 64, (8, 16, 32, 64, 128, 256, 512), 5)


# ---------------------------------------------------------------------- small helpers
def rss_bytes() -> int:
    """Resident set size of this process (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def stack_bytes(engine: LoGoEngine) -> int:
    """Bytes of the engine's stacked adapter tensors (every module's rank buckets and indices)."""
    return engine.library.nbytes


def raw_factor_bytes(engine: LoGoEngine) -> int:
    """Bytes of the per-adapter factors the library keeps beside its stacks."""
    return sum(
        t.numel() * t.element_size()
        for a in getattr(engine.library, "adapters", [])
        for f in a.modules.values()
        for t in (f.lora_a, f.lora_b)
    )


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_engine(folders: Sequence[Path], top_k: int = 3) -> LoGoEngine:
    model, tokenizer = load_base_model()
    engine = LoGoEngine(
        model,
        tokenizer,
        adapters={p.name: p for p in folders},
        routing=RoutingConfig(top_k=top_k),
        progress=False,
    )
    engine._decoder.eos_ids = frozenset()  # fixed-length answers for timing (benchmark only)
    return engine


def prompt_ids(engine: LoGoEngine, prompt: str) -> Prompt:
    """The exact token ids the engine feeds the model, for the HF/peft baselines."""
    return Prompt(torch.tensor([engine._prepare(prompt, None, None).input_ids]))


class LoGoRunner(Runner):
    """``engine.generate`` with routing (the probe is part of every call)."""

    def __init__(
        self,
        engine: LoGoEngine,
        text: str,
        routing: RoutingConfig,
        label: str,
        adapters: dict[str, float] | None = None,
    ) -> None:
        self.engine, self.text, self.routing, self.label = engine, text, routing, label
        self.adapters = adapters  # {} = base model through the engine's own loop, no probe
        self.probe_ms: list[float] = []

    def run(self, prompt: Prompt, n_tokens: int) -> float:
        t = time.perf_counter()
        out = self.engine.generate(
            self.text, max_new_tokens=n_tokens, routing=self.routing, adapters=self.adapters
        )
        elapsed = time.perf_counter() - t
        if out.usage.completion_tokens != n_tokens:
            raise RuntimeError(f"{self.label}: {out.usage.completion_tokens} != {n_tokens} tokens")
        self.probe_ms.append(out.selection.probe_ms or 0.0)
        return elapsed


# ---------------------------------------------------------------------- 1. compare
def clock_module(r: Runner) -> nn.Module:
    """The transformers model whose forward runs once per generated token for this runner."""
    if isinstance(r, LoGoRunner):
        return r.engine.model
    model = r.model
    return model.base_model.model if hasattr(model, "peft_config") else model


def time_runners(
    runners: Sequence[Runner], prompt: Prompt, n: int, repeats: int
) -> dict[str, dict[str, float]]:
    """TTFT and decode s/token of every runner, interleaved (rotated order each repeat)."""
    ttft: dict[str, list[float]] = {r.label: [] for r in runners}
    dec: dict[str, list[float]] = {r.label: [] for r in runners}
    step: dict[str, list[float]] = {r.label: [] for r in runners}
    probe: dict[str, list[float]] = {r.label: [] for r in runners}
    for r in runners:  # warm-up
        r.run(prompt, 2)
    for rep in range(repeats):
        order = list(runners[rep % len(runners) :]) + list(runners[: rep % len(runners)])
        for r in order:
            t1 = r.run(prompt, 1)
            p1 = getattr(r, "last_probe_s", None)
            clock = ForwardClock(clock_module(r))
            try:
                tn = r.run(prompt, n + 1)
            finally:
                clock.remove()
            stamps = clock.stamps[-(n + 1) :]  # prefill + n decode forwards
            step[r.label].extend(b - a for a, b in itertools.pairwise(stamps))
            ttft[r.label].append(t1)
            dec[r.label].append(max(tn - t1, 1e-9) / n)
            if p1 is not None:
                probe[r.label].append(p1)
            elif isinstance(r, LoGoRunner):
                probe[r.label].append(r.probe_ms[-2] / 1e3)
    return {
        label: {
            "ttft_s": med(ttft[label]),
            "decode_s_per_token": med(dec[label]),
            "step_s": med(step[label]),  # median inter-token interval: robust to load spikes
            "probe_s": med(probe[label]) if probe[label] else 0.0,
        }
        for label in ttft
    }


def compare(folders: Sequence[Path], library: str, s: Settings) -> dict[str, Any]:
    """Section 1 on one library; returns rows keyed by variant label plus ratios to the base."""
    log(f"compare[{library}]: loading {len(folders)} adapters into the engine and peft")
    t = time.perf_counter()
    engine = make_engine(folders)
    engine_load_s = time.perf_counter() - t
    prompt = prompt_ids(engine, PROMPT)
    base_model, _ = load_base_model()
    mixture = engine.route(PROMPT).mixture  # LoGo's k=3 selection, given to the cat baseline
    n_layers = len(engine._layers)
    t = time.perf_counter()
    peft_lib = load_peft_library(folders)
    peft_load_s = time.perf_counter() - t
    t = time.perf_counter()
    arrow = ArrowRunner(folders)
    arrow_load_s = time.perf_counter() - t
    runners: list[Runner] = [
        BaseRunner(base_model),
        PeftOneRunner(folders[0]),
        LoGoRunner(engine, PROMPT, engine.routing, "engine, no adapter", adapters={}),
        *[
            LoGoRunner(engine, PROMPT, RoutingConfig(top_k=k), f"LoGo k={k}")
            for k in (1, 3, 5)
            if k <= len(folders)
        ],
        LoGoRunner(
            engine,
            PROMPT,
            RoutingConfig(top_k=3, probe_layer=n_layers // 2),
            f"LoGo k=3, probe block {n_layers // 2}",
        ),
        ReferenceRunner(peft_lib, [p.name for p in folders], top_k=min(3, len(folders))),
        CatRunner(peft_lib, list(mixture), list(mixture.values())),
        arrow,
    ]
    log(
        f"compare[{library}]: engine load {engine_load_s:.1f} s (model included), peft load "
        f"{peft_load_s:.1f} s, arrow load {arrow_load_s:.1f} s"
    )
    rows = time_runners(runners, prompt, s.n_decode, s.repeats)
    base = rows[BaseRunner.label]
    for label, row in rows.items():
        row["ttft_over_base"] = row["ttft_s"] / base["ttft_s"]
        row["decode_tok_s"] = 1 / row["decode_s_per_token"]
        row["decode_over_base"] = base["decode_s_per_token"] / row["decode_s_per_token"]
        row["e2e_64_s"] = row["ttft_s"] + 63 * row["decode_s_per_token"]
        row["step_over_base"] = base["step_s"] / row["step_s"]
        row["e2e_64_step_s"] = row["ttft_s"] + 63 * row["step_s"]
        log(
            f"  {label:28s} TTFT {row['ttft_s'] * 1e3:8.1f} ms ({row['ttft_over_base']:.2f}x)"
            f"  decode {row['decode_tok_s']:6.2f} tok/s ({row['decode_over_base']:.2f}x)"
            f"  step {row['step_s'] * 1e3:6.1f} ms ({row['step_over_base']:.2f}x)"
            f"  probe {row['probe_s'] * 1e3:7.1f} ms  e2e@64 {row['e2e_64_step_s']:.2f} s"
        )
    result = {
        "library": library,
        "adapters": len(folders),
        "prompt_tokens": int(prompt.ids.shape[1]),
        "n_decode": s.n_decode,
        "repeats": s.repeats,
        "engine_load_s": engine_load_s,
        "peft_load_s": peft_load_s,
        "arrow_load_s": arrow_load_s,
        "cat_selection": mixture,
        "rows": rows,
    }
    if library != "zoo" and len(folders) == 64:
        result["batch"] = batch_throughput(engine, s)
    del runners, arrow, peft_lib, base_model, engine
    gc.collect()
    return result


# ---------------------------------------------------------------------- 2. latency vs length
class ForwardClock:
    """Timestamps the end of every forward of a module (one per generated token)."""

    def __init__(self, module: nn.Module) -> None:
        self.stamps: list[float] = []
        self._handle = module.register_forward_hook(self._stamp)

    def _stamp(self, *_: Any) -> None:
        self.stamps.append(time.perf_counter())

    def remove(self) -> None:
        self._handle.remove()


def cumulative(fn: Callable[[], None], module: nn.Module, skip: int = 0) -> list[float]:
    """Seconds from the call to the end of forward n (n = 1, 2, ...), skipping ``skip`` forwards."""
    clock = ForwardClock(module)
    try:
        t0 = time.perf_counter()
        fn()
    finally:
        clock.remove()
    return [t - t0 for t in clock.stamps[skip:]]


def latency_curve(zoo: Sequence[Path], s: Settings) -> dict[str, Any]:
    """Per-token latency against answer length from one long answer per variant."""
    engine = make_engine(zoo)
    prompt = prompt_ids(engine, PROMPT)
    base_model, _ = load_base_model()
    n = s.max_length
    variants: dict[str, Callable[[], list[float]]] = {
        "base model": lambda: cumulative(lambda: hf_generate(base_model, prompt, n), base_model),
        "LoGo k=3": lambda: cumulative(
            lambda: engine.generate(PROMPT, max_new_tokens=n), engine.model
        ),
    }
    ref = None
    if not s.quick:
        ref = ReferenceRunner(load_peft_library(zoo), [p.name for p in zoo], top_k=3)
        inner = ref.model.base_model.model
        variants["reference code"] = lambda: cumulative(lambda: ref.run(prompt, n), inner, skip=1)
    curves: dict[str, list[list[float]]] = {k: [] for k in variants}
    for rep in range(s.latency_repeats):
        for label, fn in variants.items():
            stamps = fn()
            if len(stamps) != n:
                raise RuntimeError(f"{label}: {len(stamps)} forwards for {n} tokens")
            curves[label].append(stamps)
            log(f"latency[{label}] rep {rep}: {n} tokens in {stamps[-1]:.1f} s")
    lengths = [x for x in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if x <= n]
    table = {
        label: {m: med([c[m - 1] for c in runs]) / m for m in lengths}
        for label, runs in curves.items()
    }
    ms = {label: {m: v * 1e3 for m, v in row.items()} for label, row in table.items()}
    return {"lengths": lengths, "ms_per_token": ms}


def plot_latency(result: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, row in result["ms_per_token"].items():
        points = sorted((int(m), v) for m, v in row.items())  # JSON keys are strings
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("answer length (tokens)")
    ax.set_ylabel("latency per token (ms) = total / length")
    ax.set_title("Probe cost amortised over the answer (SmolLM2-135M, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- 3. batch throughput
def batch_throughput(engine: LoGoEngine, s: Settings) -> dict[str, Any]:
    """generate_batch against generate one by one, same prompts, fixed answer length."""
    n = s.batch_tokens
    out: dict[str, Any] = {"tokens_per_request": n}
    engine.generate_batch(BATCH_PROMPTS[:2], max_new_tokens=2)  # warm-up
    for size in s.batch_sizes:
        prompts = BATCH_PROMPTS[:size]
        t = time.perf_counter()
        gens = engine.generate_batch(prompts, max_new_tokens=n)
        batched = time.perf_counter() - t
        assert all(g.usage.completion_tokens == n for g in gens)
        t = time.perf_counter()
        for p in prompts:
            engine.generate(p, max_new_tokens=n)
        serial = time.perf_counter() - t
        distinct = len({tuple(g.selection.adapters) for g in gens})
        out[str(size)] = {
            "batched_s": batched,
            "serial_s": serial,
            "batched_tok_s": size * n / batched,
            "serial_tok_s": size * n / serial,
            "speedup": serial / batched,
            "distinct_selections": distinct,
        }
        log(
            f"batch {size:2d}: batched {size * n / batched:6.1f} tok/s, one by one "
            f"{size * n / serial:6.1f} tok/s ({serial / batched:.2f}x); {distinct} distinct "
            "selections"
        )
    return out


# ---------------------------------------------------------------------- 4. probe vs library
def random_adapters(model: nn.Module, n: int, seed: int) -> list[Adapter]:
    """n in-memory adapters with the zoo's shapes and scale (q_proj + v_proj, r = 8)."""
    g = torch.Generator().manual_seed(seed)
    linears = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "v_proj")
    ]
    return [
        Adapter(
            name=f"mem_{seed}_{i:03d}",
            modules={
                name: LoraFactors(
                    lora_a=torch.randn(8, m.in_features, generator=g) * 0.03,
                    lora_b=torch.randn(m.out_features, 8, generator=g) * 0.015,
                    scaling=2.0,
                )
                for name, m in linears
            },
        )
        for i in range(n)
    ]


@torch.inference_mode()
def prefill_s(model: nn.Module, prompt: Prompt) -> float:
    t = time.perf_counter()
    model(input_ids=prompt.ids, attention_mask=prompt.mask, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t


def probe_scaling(s: Settings) -> list[dict[str, Any]]:
    """Probe time, stacked bytes and RSS for growing libraries (a fresh engine per size)."""
    model, tokenizer = load_base_model()
    plain, _ = load_base_model()
    bare = LoGoEngine(model, tokenizer, progress=False)
    warm = prompt_ids(bare, PROMPT)
    bare.close()
    for m in (model, plain):
        prefill_s(m, warm)  # page the mmapped weights in before measuring RSS
    gc.collect()
    rss_start = rss_bytes() / 2**20  # the two models, before any adapter
    rows = []
    for n in s.probe_sizes:
        engine = LoGoEngine(model, tokenizer, routing=RoutingConfig(top_k=3), progress=False)
        engine.load_adapters(random_adapters(model, n, seed=n))
        prompt = prompt_ids(engine, PROMPT)
        engine.route(PROMPT)  # warm-up
        probe, prefill = [], []
        for _ in range(s.probe_repeats):
            prefill.append(prefill_s(plain, prompt))
            t = time.perf_counter()
            engine.route(PROMPT)
            probe.append(time.perf_counter() - t)
        row = {
            "adapters": n,
            "probe_ms": med(probe) * 1e3,
            "prefill_ms": med(prefill) * 1e3,
            "probe_over_prefill": med(probe) / med(prefill),
            "stack_mib": stack_bytes(engine) / 2**20,
            "raw_factor_mib": raw_factor_bytes(engine) / 2**20,
            "rss_mib": rss_bytes() / 2**20,
            "rss_start_mib": rss_start,
        }
        rows.append(row)
        log(
            f"probe {n:4d} adapters: {row['probe_ms']:7.1f} ms ({row['probe_over_prefill']:.2f}x "
            f"prefill), stacks {row['stack_mib']:7.1f} MiB, raw factors "
            f"{row['raw_factor_mib']:7.1f} MiB, RSS {row['rss_mib']:7.0f} MiB"
        )
        engine.close()
        del engine
        gc.collect()
    return rows


def plot_probe(rows: list[dict[str, Any]], ref_points: list[tuple[int, float]], path: Path) -> None:
    """Probe time / base prefill (ratios within one run) and memory against library size."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["adapters"] for r in rows]
    ax1.plot(xs, [r["probe_over_prefill"] for r in rows], marker="o", label="LoGo probe")
    if ref_points:
        ax1.plot(*zip(*ref_points, strict=True), marker="s", label="reference code probe")
    ax1.axhline(1.0, color="grey", ls="--", lw=1, label="base prefill")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("adapters in the library")
    ax1.set_ylabel("probe time / base prefill time")
    ax1.set_title("Probe time")
    ax1.legend()
    ax1.grid(True, which="both", alpha=0.3)
    rss0 = rows[0].get("rss_start_mib", 0.0)
    ax2.plot(xs, [r["stack_mib"] for r in rows], marker="o", label="stacked adapter tensors")
    ax2.plot(
        xs, [r["raw_factor_mib"] for r in rows], marker=".", ls="--", label="per-adapter copies"
    )
    ax2.plot(xs, [r["rss_mib"] - rss0 for r in rows], marker="s", label="process RSS growth")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("adapters in the library")
    ax2.set_ylabel("MiB")
    ax2.set_title("Memory")
    ax2.legend()
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle("SmolLM2-135M, rank-8 q_proj+v_proj adapters, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reference_ratios(results: dict[str, Any]) -> list[tuple[int, float]]:
    """Reference probe / base TTFT (about one prefill) from ``compare``, per library size."""
    return sorted(
        (c["adapters"], c["rows"]["reference code"]["probe_s"] / c["rows"]["base model"]["ttft_s"])
        for c in results.get("compare", [])
    )


def plot_all(results: dict[str, Any], figures: Path) -> None:
    if "latency" in results:
        plot_latency(results["latency"], figures / "latency_vs_length.png")
    if "probe" in results:
        plot_probe(results["probe"], reference_ratios(results), figures / "probe_vs_library.png")


# ---------------------------------------------------------------------- report
def goals(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, evaluated on the measured figures."""
    zoo = results["compare"][0]["rows"]
    lib64 = next(c for c in results["compare"] if c["adapters"] == 64 and c["library"] != "zoo")
    r64 = lib64["rows"]
    probe = {r["adapters"]: r["probe_ms"] for r in results["probe"]}
    hi = max(n for n in probe if n <= 256)
    batch8 = lib64["batch"]["8"]["speedup"]
    out = {
        "decode_k3_over_base": zoo["LoGo k=3"]["decode_over_base"],
        "step_k3_over_base": zoo["LoGo k=3"]["step_over_base"],
        "ttft_k3_over_base": zoo["LoGo k=3"]["ttft_over_base"],
        "e2e64_reference_over_logo_at_64": r64["reference code"]["e2e_64_step_s"]
        / r64["LoGo k=3"]["e2e_64_step_s"],
        "batch8_speedup": batch8,
        "probe_growth_8_to_max": probe[hi] / probe[8],
        "probe_growth_max_adapters": hi,
    }
    out["met"] = {
        "decode >= 0.85x base": out["step_k3_over_base"] >= 0.85,
        "ttft <= 1.5x base": out["ttft_k3_over_base"] <= 1.5,
        "e2e >= 2x reference at 64": out["e2e64_reference_over_logo_at_64"] >= 2,
        "batch8 >= 3x": batch8 >= 3,
        "probe sub-linear": out["probe_growth_8_to_max"] < hi / 8,
    }
    return out


def print_tables(results: dict[str, Any]) -> None:
    for c in results["compare"]:
        print(f"\n{c['library']} ({c['adapters']} adapters, prompt {c['prompt_tokens']} tokens)")
        print(
            "| variant | TTFT ms | x base | decode tok/s (t(N+1)-t(1))/N | x base | "
            "decode tok/s (median step) | x base | probe ms | 64-token answer s |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for label, r in c["rows"].items():
            print(
                f"| {label} | {r['ttft_s'] * 1e3:.0f} | {r['ttft_over_base']:.2f} | "
                f"{r['decode_tok_s']:.2f} | {r['decode_over_base']:.2f} | "
                f"{1 / r['step_s']:.2f} | {r['step_over_base']:.2f} | "
                f"{r['probe_s'] * 1e3:.0f} | {r['e2e_64_step_s']:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (< 10 min)")
    parser.add_argument("--zoo", type=Path, default=default_adapters_dir(), help="adapter zoo")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch)")
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument(
        "--only", nargs="*", default=["compare", "latency", "probe"], help="sections to run"
    )
    parser.add_argument("--libraries", type=int, nargs="*", help="synthetic sizes for compare")
    parser.add_argument("--repeats", type=int, help="override the repeats of compare")
    parser.add_argument("--replot", type=Path, help="only redraw the figures from this JSON")
    args = parser.parse_args()
    if args.replot:
        plot_all(json.loads(args.replot.read_text()), args.figures)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings.of(args.quick)
    if args.libraries is not None:
        s = dataclasses.replace(s, libraries=tuple(args.libraries))
    if args.repeats:
        s = dataclasses.replace(s, repeats=args.repeats)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "settings": s.__dict__,
    }
    zoo = adapter_folders(args.zoo) if args.zoo.is_dir() else []
    log(f"zoo {args.zoo}: {len(zoo)} adapters ({folder_bytes(zoo) / 2**20:.1f} MiB on disk)")
    args.figures.mkdir(parents=True, exist_ok=True)
    if "probe" in args.only:  # first: RSS growth is then the library's alone
        results["probe"] = probe_scaling(s)
    with tempfile.TemporaryDirectory(prefix="logo_speed_") as tmp:
        model, _ = load_base_model()
        synthetic = {n: write_random_adapters(model, Path(tmp) / str(n), n) for n in s.libraries}
        del model
        if "compare" in args.only:
            results["compare"] = [compare(zoo, "zoo", s)] + [
                compare(folders, f"random {n}", s) for n, folders in synthetic.items()
            ]
            print_tables(results)
        if "latency" in args.only:
            results["latency"] = latency_curve(zoo, s)
    plot_all(results, args.figures)
    results["seconds"] = time.perf_counter() - start
    if {"compare", "probe"} <= set(args.only):
        results["goals"] = goals(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    headline = {k: v for k, v in results.items() if k in ("machine", "torch", "seconds", "goals")}
    print(json.dumps({"benchmark": "speed", "quick": s.quick, **headline}, default=str))


if __name__ == "__main__":
    main()

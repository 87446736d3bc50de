"""Serving throughput: `logo serve` under 1, 4, 8 and 16 concurrent clients, against one-by-one
in-process calls, on the embedded default model and zoo (issue: serving).

One run measures, for each level C = 1, 4, 8, 16 (C x R requests, R per client):
- **in-process, one by one**: ``engine.generate`` on each of the level's requests in turn (the
  baseline, measured right before the level so that both see the same machine load);
- **the server at C concurrent clients**: a `logo serve` subprocess on 127.0.0.1, C client
  threads (the official ``openai`` client) each sending its R requests one after the other;
  throughput = requests / wall time, latency per request (p50, p95), and the server's mean batch
  size (from ``/metrics``);
- **server overhead at 1 client**: the same prompts in-process and through the server,
  interleaved one by one; overhead = median(server latency / in-process latency) - 1.

Every answer of the server is checked against the in-process greedy answer (they must be equal).
Every measured call sends a prompt neither process has seen before (the prefix caches would
otherwise serve repeats from memory); prompts still share the chat template's system prompt, as
real requests do.

    HF_HUB_OFFLINE=1 python -m benchmarks.serving            # full run (R = 2)
    HF_HUB_OFFLINE=1 python -m benchmarks.serving --quick    # R = 1
    HF_HUB_OFFLINE=1 python -m benchmarks.serving --workload open --max-tokens 128
    HF_HUB_OFFLINE=1 python -m benchmarks.serving --device cuda --dtype bfloat16   # on a GPU
    HF_HUB_OFFLINE=1 python -m benchmarks.serving --levels 8 --lanes 2   # two lanes (CPU)
    HF_HUB_OFFLINE=1 python -m benchmarks.serving --levels 8 --lanes 2 --server-threads 1
    python -m benchmarks.serving --plot docs/serving_runs/*.json --out docs/figures/serving.png

Two workloads: ``tasks`` (default), the zoo's task prompts, whose answers are short (about a
dozen tokens), so each request's two prompt passes (probe, prefill) weigh as much as its
decoding; ``open``, open questions written by hand that ask for explanations, whose answers run
to the token limit, so decoding (where batching pays most) dominates.

The last line printed is one JSON object with the figures (``--json PATH`` also writes it to a
file); ``--plot`` draws the speedup per client count of such files, one line per run (dashed:
one lane, i.e. ``--lanes 1`` or a run from before lanes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import torch
from openai import OpenAI

from benchmarks import report
from benchmarks.zoo.tasks import LIBRARY_TASKS, TASKS
from logo_engine import LoGoEngine
from logo_engine.types import DTYPES, parse_dtype

LEVELS = (1, 4, 8, 16)


def prompts(n: int) -> list[list[dict[str, str]]]:
    """``n`` chat prompts drawn round-robin from the zoo's tasks (test split)."""
    per_task = -(-n // len(LIBRARY_TASKS))
    pools = [TASKS[t].make_split("test", per_task, seed=3) for t in LIBRARY_TASKS]
    out = [
        [{"role": "user", "content": pools[i % len(pools)][i // len(pools)].prompt}]
        for i in range(n)
    ]
    return out


_OPEN_FORMS = (
    "Explain {} to a curious beginner, in a few paragraphs.",
    "Can you walk me through {}? Take your time.",
    "I never understood {}. What is the idea behind it?",
    "Write a short blog post about {}.",
    "What would a teacher say first about {}, and why?",
    "Give me a friendly, detailed overview of {}.",
    "My friend asked me about {} and I had no answer. Help me explain it.",
    "Tell me the story of {} as if I were twelve.",
)
_OPEN_TOPICS = (
    "how a hash map works",
    "why the sky is blue",
    "how vaccines train the immune system",
    "what a database index does",
    "how compound interest grows savings",
    "the causes of the French Revolution",
    "how photosynthesis works",
    "recursion in programming",
    "how airplanes stay in the air",
    "what inflation is",
    "how the internet routes a message",
    "why we have seasons",
    "how a compiler turns code into a program",
    "what black holes are",
    "how bread rises",
    "the water cycle",
    "how a bicycle keeps its balance",
    "what machine learning is",
    "how muscles grow after exercise",
    "why the Roman Empire fell",
)


def open_prompts(n: int) -> list[list[dict[str, str]]]:
    """``n`` distinct open questions (hand-written forms x topics) whose answers run long."""
    pairs = [(form, topic) for form in _OPEN_FORMS for topic in _OPEN_TOPICS]
    if n > len(pairs):
        raise SystemExit(f"the open workload has {len(pairs)} prompts, {n} were asked for")
    step = len(_OPEN_TOPICS) + 1  # walk forms and topics together, so neighbours differ in both
    picked = [pairs[(i * step) % len(pairs)] for i in range(n)]
    return [[{"role": "user", "content": form.format(topic)}] for form, topic in picked]


WORKLOADS = {"tasks": prompts, "open": open_prompts}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    port: int,
    max_batch_size: int,
    batch_wait_ms: float,
    continuous: bool = True,
    dtype: str = "float32",
    probe_dtype: str | None = None,
    device: str = "cpu",
    lanes: int = 1,
    threads: int | None = None,
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "logo_engine.cli",
        "serve",
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
        "--batch-wait-ms",
        str(batch_wait_ms),
        "--log-level",
        "warning",
        *([] if continuous else ["--no-continuous-batching"]),
        "--lanes",
        str(lanes),
        "--dtype",
        dtype,
        "--device",
        device,
        *([] if probe_dtype is None else ["--probe-dtype", probe_dtype]),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:  # the server's torch threads (torch reads OMP_NUM_THREADS)
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"logo serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("logo serve did not become ready within 600 s")


def remote_over_local(local: Any, remote: Any, i: int) -> float:
    """One paired measurement: the same prompt in-process, then through the server."""
    t_local = local(i)
    return float(remote(i) / t_local)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def batch_stats(url: str) -> tuple[float, float, float]:
    """(rows that started a batch, batches, rows that joined a running batch) so far."""
    rows = batches = joined = 0.0
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line.startswith("logo_batch_size_sum "):
            rows = float(line.split()[-1])
        elif line.startswith("logo_batch_size_count "):
            batches = float(line.split()[-1])
        elif line.startswith("logo_joined_rows_total "):
            joined = float(line.split()[-1])
    return rows, batches, joined


def plot(paths: list[str], out: str) -> None:
    """Server / one-by-one throughput against concurrent clients, one line per run file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"open": "tab:blue", "tasks": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    labelled = set()
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        workload = run.get("workload", "tasks")
        lanes = run.get("lanes", 1)  # runs before lanes existed had one
        clients = [level["clients"] for level in run["levels"]]
        speedup = [level["speedup_vs_one_by_one"] for level in run["levels"]]
        label = None
        if (workload, lanes) not in labelled:
            labelled.add((workload, lanes))
            label = (
                f"{workload}: answers of ~{run['mean_completion_tokens']:.0f} tokens, "
                f"{lanes} lane{'s' if lanes > 1 else ''}"
            )
        style = "-" if lanes > 1 else "--"
        ax.plot(
            clients,
            speedup,
            marker="o",
            linestyle=style,
            color=colors.get(workload),
            alpha=0.8,
            label=label,
        )
    ax.axhline(3.0, color="grey", linestyle="--", linewidth=1, label="goal at 8 clients: 3x")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 4, 8, 16], labels=["1", "4", "8", "16"])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("server / one-by-one throughput")
    ax.set_title("logo serve, SmolLM2-135M + 11 adapters, float32, 2-core CPU")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--workload", choices=sorted(WORKLOADS), default="tasks", help="see the module docstring"
    )
    parser.add_argument(
        "--levels",
        type=int,
        nargs="+",
        default=list(LEVELS),
        help="concurrent clients to measure (default 1 4 8 16)",
    )
    parser.add_argument("--requests-per-client", type=int, default=None)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument(
        "--no-continuous-batching",
        dest="continuous",
        action="store_false",
        help="serve with static batches (each runs as it started)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="model dtype, both sides (default fp32)"
    )
    parser.add_argument(
        "--probe-dtype", choices=DTYPES, help="the probe's dtype, both sides (default: --dtype)"
    )
    parser.add_argument(
        "--device", default="cpu", help="the model's torch device, both sides (cuda, ...)"
    )
    parser.add_argument("--lanes", type=int, default=1, help="the server's --lanes (default 1)")
    parser.add_argument(
        "--server-threads",
        type=int,
        help="the server's torch threads (OMP_NUM_THREADS; default: torch's, as in-process)",
    )
    parser.add_argument("--json", help="also write the summary to this file")
    parser.add_argument("--plot", nargs="+", metavar="JSON", help="plot these runs, then exit")
    parser.add_argument("--out", default="serving.png", help="the figure --plot writes")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.out)
        return
    per_client = args.requests_per_client or (1 if args.quick else 2)
    n_overhead = 6 if args.quick else 12
    max_tokens = args.max_tokens
    fresh = iter(range(10**9))  # the next prompt index nobody has seen
    levels_asked = args.levels
    if not levels_asked or min(levels_asked) < 1:
        parser.error("--levels takes client counts >= 1")
    if args.server_threads is not None and args.server_threads < 1:
        parser.error("--server-threads must be >= 1")
    pool = WORKLOADS[args.workload](4 + n_overhead + sum(levels_asked) * per_client)

    engine = LoGoEngine.from_pretrained(
        dtype=parse_dtype(args.dtype), probe_dtype=args.probe_dtype, device=args.device
    )
    expected: dict[int, str] = {}
    completion_tokens: dict[int, int] = {}

    def local(i: int) -> float:
        start = time.perf_counter()
        out = engine.generate(pool[i], max_new_tokens=max_tokens)
        elapsed = time.perf_counter() - start
        expected.setdefault(i, out.text)
        completion_tokens.setdefault(i, out.usage.completion_tokens)
        return elapsed

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(
        port,
        max(levels_asked),
        args.batch_wait_ms,
        args.continuous,
        args.dtype,
        args.probe_dtype,
        args.device,
        args.lanes,
        args.server_threads,
    )
    client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=3600)
    served = client.models.list().data[0].id
    mismatches: list[int] = []

    def remote(i: int) -> float:
        start = time.perf_counter()
        response = client.chat.completions.create(
            model=served,
            messages=pool[i],  # type: ignore[arg-type]
            max_tokens=max_tokens,
        )
        elapsed = time.perf_counter() - start
        if response.choices[0].message.content != expected[i]:
            mismatches.append(i)
        return elapsed

    try:
        for _ in range(2):  # warm-up (first calls build caches)
            i = next(fresh)
            local(i), remote(i)

        # Overhead at one client: interleaved, paired by prompt.
        ratios = [remote_over_local(local, remote, next(fresh)) for _ in range(n_overhead)]
        overhead = statistics.median(ratios) - 1

        levels = []
        for clients in levels_asked:
            n = clients * per_client
            ids = [next(fresh) for _ in range(n)]
            start = time.perf_counter()
            base_latencies = [local(i) for i in ids]  # the baseline, just before
            base_rps = n / (time.perf_counter() - start)
            rows0, batches0, joined0 = batch_stats(url)
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as threads:
                chunks = [ids[c::clients] for c in range(clients)]
                per_thread = threads.map(lambda ids: [remote(i) for i in ids], chunks)
                latencies = [t for ts in per_thread for t in ts]
            wall = time.perf_counter() - start
            rows1, batches1, joined1 = batch_stats(url)
            levels.append(
                {
                    "clients": clients,
                    "requests": n,
                    "one_by_one_rps": base_rps,
                    "one_by_one_p50_s": statistics.median(base_latencies),
                    "mean_completion_tokens": statistics.mean(completion_tokens[i] for i in ids),
                    "throughput_rps": n / wall,
                    "speedup_vs_one_by_one": (n / wall) / base_rps,
                    "p50_s": statistics.median(latencies),
                    "p95_s": percentile(latencies, 0.95),
                    "mean_batch_size": (rows1 - rows0) / max(1.0, batches1 - batches0),
                    "joined_rows": joined1 - joined0,
                }
            )
    finally:
        server.terminate()
        server.wait(30)

    print(
        f"\nworkload {args.workload}, max_tokens={max_tokens} (mean answer "
        f"{statistics.mean(completion_tokens.values()):.1f} tokens), greedy, "
        f"{engine.model_name} + {len(engine.adapter_names)} adapters, "
        f"torch threads {torch.get_num_threads()}, "
        f"{'continuous' if args.continuous else 'static'} batching, "
        f"{args.lanes} lane(s), "
        f"server threads {args.server_threads or torch.get_num_threads()}, "
        f"{args.dtype}" + (f", {args.probe_dtype} probe" if args.probe_dtype else "")
    )
    print(f"server overhead at 1 client (median of paired ratios - 1): {overhead * 100:+.1f}%")
    print(
        f"{'clients':>8} {'1-by-1 req/s':>13} {'server req/s':>13} {'speedup':>8} "
        f"{'p50 s':>7} {'p95 s':>7} {'batch':>6} {'joined':>7}"
    )
    for level in levels:
        print(
            f"{level['clients']:>8} {level['one_by_one_rps']:>13.3f} "
            f"{level['throughput_rps']:>13.3f} {level['speedup_vs_one_by_one']:>8.2f} "
            f"{level['p50_s']:>7.2f} {level['p95_s']:>7.2f} {level['mean_batch_size']:>6.1f} "
            f"{level['joined_rows']:>7.0f}"
        )
    print(f"answers equal to in-process greedy: {not mismatches} ({len(mismatches)} differ)")
    summary: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "device": args.device,
        "model": engine.model_name,
        "workload": args.workload,
        "max_tokens": max_tokens,
        "mean_completion_tokens": statistics.mean(completion_tokens.values()),
        "continuous_batching": args.continuous,
        "lanes": args.lanes,
        "server_threads": args.server_threads or torch.get_num_threads(),
        "dtype": args.dtype,
        "probe_dtype": args.probe_dtype or args.dtype,
        "overhead_1_client": overhead,
        "levels": levels,
        "answers_equal": not mismatches,
    }
    report(summary, args.json)


if __name__ == "__main__":
    main()

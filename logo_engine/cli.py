"""The ``logo`` command: route, generate and list adapters from a terminal.

    logo route "Convert 5 km to metres"          # every adapter's score, the chosen ones, weights
    logo generate "Convert 5 km to metres"       # the answer and its selection
    logo adapters                                # the library
    logo route "..." --json                      # machine-readable output
    logo serve --port 8000                       # an OpenAI-compatible server (extra [serve])

Defaults: the embedded SmolLM2-135M-Instruct and the shipped adapter zoo; ``--base-model`` and
``--adapters DIR`` for your own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from logo_engine.backends import BACKENDS
from logo_engine.errors import LoGoError
from logo_engine.types import DTYPES, SIGNALS, WEIGHTINGS, RoutingConfig, Selection, parse_dtype


def _parser() -> argparse.ArgumentParser:
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--base-model", help="HF folder or hub id (default: embedded SmolLM2-135M)")
    model.add_argument("--gguf-file", help="GGUF file name inside --base-model")
    model.add_argument(
        "--adapters",
        help="folder with one peft adapter folder per adapter (default: the shipped zoo)",
    )
    model.add_argument(
        "--device", default="cpu", help="torch device of the model: cpu, cuda, cuda:1 (default cpu)"
    )
    model.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="parameter dtype (default float32; bfloat16 halves memory and is faster on GPUs "
        "and AMX CPUs, with answers that may differ from float32)",
    )
    model.add_argument(
        "--probe-dtype",
        choices=DTYPES,
        help="dtype of the routing probe only (default: --dtype); bfloat16 under a float32 model "
        "probes about twice as fast on AMX CPUs and GPUs, with float32 answers",
    )
    model.add_argument(
        "--probe-compile",
        action="store_true",
        help="torch.compile the routing probe (Llama-style models): faster probes after minutes "
        "of compilation at the first requests; for long-running servers",
    )
    # Generation backends (engine.py's backend= and backend_options=); the probe stays here.
    backend = argparse.ArgumentParser(add_help=False)
    backend.add_argument(
        "--backend",
        choices=BACKENDS,
        default="transformers",
        help="generate with this backend (default transformers; vllm: see docs/vllm.md)",
    )
    backend.add_argument(
        "--backend-option",
        dest="backend_options",
        action="append",
        metavar="KEY=VALUE",
        help="a backend option (repeatable): VALUE is read as JSON when it parses (8, 0.5, true, "
        "{...}), else as a string; a dotted KEY sets a nested option, e.g. "
        "llm_options.gpu_memory_utilization=0.8",
    )
    common = argparse.ArgumentParser(add_help=False, parents=[model])
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    # Routing flags override the library's defaults (its routing.json, else RoutingConfig()).
    routing = argparse.ArgumentParser(add_help=False)
    routing.add_argument("--top-k", type=int, help="adapters kept")
    routing.add_argument("--signal", choices=SIGNALS)
    routing.add_argument("--weighting", choices=WEIGHTINGS)
    routing.add_argument(
        "--weight-temperature",
        dest="weight_temperature",
        type=float,
        help="softmax temperature of the adapter weights",
    )
    routing.add_argument(
        "--abstain-below", type=float, help="base model when no ranking score reaches this"
    )
    routing.add_argument("--probe-layer", type=int)
    routing.add_argument("--probe-module")
    mode = routing.add_mutually_exclusive_group()
    mode.add_argument(
        "--calibrated",
        dest="calibrated",
        action="store_const",
        const=True,
        help="require z-score ranking (default: when the library ships calibration.json)",
    )
    mode.add_argument(
        "--raw",
        dest="calibrated",
        action="store_const",
        const=False,
        help="rank by raw scores, as in the paper",
    )

    parser = argparse.ArgumentParser(prog="logo", description="LoGo: per-request LoRA selection.")
    sub = parser.add_subparsers(dest="command", required=True)
    route = sub.add_parser(
        "route", parents=[common, routing], help="probe a prompt: scores, choice"
    )
    route.add_argument("prompt")
    gen = sub.add_parser("generate", parents=[common, routing, backend], help="answer a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument(
        "--pin",
        action="append",
        metavar="NAME=WEIGHT",
        help="pin a mixture instead of routing (repeatable); --pin none = base model",
    )
    sub.add_parser("adapters", parents=[common], help="list the adapter library")
    serve = sub.add_parser(
        "serve",
        parents=[model, routing, backend],
        help="serve an OpenAI-compatible API (needs the [serve] extra)",
        description="Serve the engine over HTTP: OpenAI /v1/chat/completions, /v1/completions and "
        "/v1/models, plus /v1/logo/route, /healthz and /metrics. See docs/serving.md.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("LOGO_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: env LOGO_API_KEY; none)",
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=8, help="rows per engine batch (default 8)"
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=10.0,
        help="how long a batch waits for more requests after its first (default 10)",
    )
    serve.add_argument(
        "--no-continuous-batching",
        dest="continuous_batching",
        action="store_false",
        help="run each batch as it started (requests arriving meanwhile wait for it to end)",
    )
    serve.add_argument(
        "--lanes",
        type=int,
        default=1,
        help="batches decoded side by side, the CPU threads split between them (default 1; 2 "
        "serves short answers faster on a CPU, long ones slower: docs/serving.md)",
    )
    serve.add_argument(
        "--served-model-name", help="model name clients use (default: the base model's name)"
    )
    serve.add_argument(
        "--max-body-bytes", type=int, default=4 * 1024 * 1024, help="request body bound"
    )
    serve.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    try:
        from logo_engine.serving.app import ServeConfig
        from logo_engine.serving.server import serve
    except ImportError as exc:
        raise LoGoError(
            f"logo serve needs the [serve] extra (pip install 'logo-lora[serve]'): {exc}"
        ) from exc
    if min(args.max_batch_size, args.max_body_bytes, args.lanes) < 1 or args.batch_wait_ms < 0:
        raise LoGoError(
            "--max-batch-size, --lanes and --max-body-bytes must be >= 1, --batch-wait-ms >= 0"
        )
    if backend_options(args.backend_options) and args.backend == "transformers":
        raise LoGoError("--backend-option needs --backend vllm (transformers takes no options)")
    config = ServeConfig(
        api_key=args.api_key or None,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        continuous_batching=args.continuous_batching,
        lanes=args.lanes,
        served_model_name=args.served_model_name,
        max_body_bytes=args.max_body_bytes,
    )

    def load() -> Any:
        engine = _engine(args)
        routing = _routing(engine, args)  # the server's routing defaults: flags over the library's
        engine._validate_routing(routing)
        engine.routing = routing
        engine.warm_up()  # --probe-compile: compile now, while /healthz says "loading"
        return engine

    return serve(load, config, host=args.host, port=args.port, log_level=args.log_level)


_ROUTING_FLAGS = (
    "top_k", "signal", "weighting", "abstain_below", "probe_layer", "probe_module", "calibrated",
)  # fmt: skip


def _engine(args: argparse.Namespace) -> Any:
    import torch

    from logo_engine.engine import LoGoEngine

    name = getattr(args, "backend", "transformers")
    options = backend_options(getattr(args, "backend_options", None))
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise LoGoError(f"--device {args.device!r} is not a torch device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoGoError(f"--device {args.device}: this torch build sees no CUDA device")
    return LoGoEngine.from_pretrained(
        args.base_model,
        adapters=args.adapters,
        gguf_file=args.gguf_file,
        device=device,
        dtype=parse_dtype(args.dtype),
        probe_dtype=args.probe_dtype,
        probe_compile=args.probe_compile,
        backend=None if name == "transformers" else name,
        backend_options=options or None,
    )


def backend_options(values: Sequence[str] | None) -> dict[str, Any]:
    """``--backend-option KEY=VALUE`` flags as the ``backend_options`` mapping.

    VALUE is JSON when it parses (numbers, booleans, null, lists, objects), else the string
    itself; a dotted KEY (``llm_options.enforce_eager=true``) sets a key of a nested mapping.
    """
    options: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(part.strip() for part in path):
            raise LoGoError(f"--backend-option expects KEY=VALUE, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        node = options
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LoGoError(f"--backend-option {item!r}: {part!r} is already set to a value")
            node = child
        if path[-1] in node and isinstance(node[path[-1]], dict) != isinstance(value, dict):
            raise LoGoError(f"--backend-option {item!r} conflicts with an earlier option")
        node[path[-1]] = value
    return options


def _routing(engine: Any, args: argparse.Namespace) -> RoutingConfig:
    """The engine's routing defaults with the flags given on the command line."""
    given = {k: getattr(args, k) for k in _ROUTING_FLAGS if getattr(args, k, None) is not None}
    if args.weight_temperature is not None:
        given["temperature"] = args.weight_temperature
    return dataclasses.replace(engine.routing, **given)


def _pins(values: list[str] | None) -> dict[str, float] | None:
    if not values:
        return None
    if values == ["none"]:
        return {}
    mixture = {}
    for value in values:
        name, sep, weight = value.partition("=")
        try:
            mixture[name] = float(weight) if sep else 1.0
        except ValueError:
            raise LoGoError(f"--pin expects NAME=WEIGHT, got {value!r}") from None
    return mixture


def selection_table(selection: Selection) -> str:
    """Every adapter's score, best first, with the chosen ones and their weights marked.

    When routing ranked by other scores than the raw ones (z-scores when calibrated), they get a
    column and order the rows.
    """
    weights = selection.mixture
    ranks = selection.rank_scores
    lines = []
    if selection.pinned:
        lines.append("pinned mixture (no probe)")
    else:
        ranking = "z-scores (calibrated)" if selection.calibrated else "raw scores"
        lines.append(
            f"probe: {selection.probe_module} ({selection.signal}, top-{selection.top_k}, "
            f"ranked by {ranking}, {selection.probe_ms:.1f} ms)"
        )
    rank = ranks or selection.scores
    lines.append(f"{'adapter':24s} {'score':>10s} {'z-score' if ranks else '':>8s} {'weight':>8s}")
    names = sorted(rank, key=lambda n: -rank[n]) or list(weights)
    for name in names:
        score = f"{selection.scores[name]:10.4f}" if name in selection.scores else " " * 10
        zs = f"{ranks[name]:8.2f}" if name in ranks else " " * 8
        weight = f"{weights[name]:8.3f}" if name in weights else ""
        mark = "* " if name in weights else "  "
        lines.append(f"{mark}{name:22s} {score} {zs} {weight}".rstrip())
    if not weights:
        lines.append("(base model: no adapter)")
    if selection.reason:
        lines.append(f"({selection.reason})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``logo`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGO_LOG_LEVEL", "WARNING"), format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the terminal for the answer
    try:
        if args.command == "serve":
            return _serve(args)
        engine = _engine(args)
        if args.command == "adapters":
            names = engine.adapter_names
            if args.json:
                print(json.dumps({"base_model": engine.model_name, "adapters": names}))
            else:
                print(f"base model: {engine.model_name}\n{len(names)} adapters:")
                print("\n".join(f"  {n}" for n in names))
        elif args.command == "route":
            selection = engine.route(args.prompt, routing=_routing(engine, args))
            print(selection.model_dump_json() if args.json else selection_table(selection))
        else:
            out = engine.generate(
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed,
                stop=args.stop,
                adapters=_pins(args.pin),
                routing=_routing(engine, args),
            )
            if args.json:
                print(out.model_dump_json())
            else:
                print(out.text.strip())
                print()
                print(selection_table(out.selection))
    except LoGoError as exc:
        print(f"logo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

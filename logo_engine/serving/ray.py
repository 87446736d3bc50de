"""Scale-out on Ray Serve: the same OpenAI API from N replicas (extra ``[ray]``).

Each replica loads its own engine and serves the FastAPI app of ``logo serve``
(:func:`~logo_engine.serving.app.create_app`); Ray Serve's HTTP proxy spreads requests over the
replicas, and each replica coalesces its concurrent requests with ``@serve.batch`` into one engine
batch (:func:`~logo_engine.serving.batcher.run_batch`: one batched probe and one batched decode,
each row with its own selection, streamed back row by row). The server is stateless, so any
replica can answer any request.

Run it with ``serve run`` and a config file (``examples/ray_serve.yaml``)::

    serve run examples/ray_serve.yaml
    serve run logo_engine.serving.ray:build_app num_replicas=2 max_batch_size=8

or from Python::

    from ray import serve
    from logo_engine.serving.ray import build_app
    serve.run(build_app({"num_replicas": 2}), route_prefix="/")

:func:`build_app` arguments (``serve run`` passes them as strings): ``base_model``,
``adapters``, ``gguf_file``, ``device``, ``dtype``, ``probe_dtype`` and ``probe_compile``
(``logo serve``'s ``--dtype``, ``--probe-dtype`` and ``--probe-compile``), ``routing``
(RoutingConfig fields), ``api_key``, ``served_model_name``, ``max_batch_size``,
``batch_wait_ms``, and the deployment's ``num_replicas``, ``autoscaling_config``,
``ray_actor_options``, ``max_ongoing_requests``, passed through to Ray Serve unchanged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Hashable, Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from logo_engine.base import BaseEngine
from logo_engine.serving.app import ServeConfig, ServerState, create_app
from logo_engine.serving.batcher import BatchObserver, Job, run_batch
from logo_engine.types import RoutingConfig, check_dtype_name, parse_dtype

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_MS = 10.0
_DEPLOYMENT_OPTIONS = (
    "num_replicas",
    "autoscaling_config",
    "ray_actor_options",
    "max_ongoing_requests",
    "name",
)


def run_grouped(engine: BaseEngine, jobs: list[Job], observer: BatchObserver | None) -> None:
    """Run one ``@serve.batch`` worth of jobs: one engine batch per sampling key, in turn."""
    groups: dict[Hashable, list[Job]] = defaultdict(list)
    for job in jobs:
        if not job.cancelled:
            groups[job.key].append(job)
    for group in groups.values():
        if observer is not None:
            now = time.monotonic()
            observer.batch_started(len(group), [now - j.enqueued_at for j in group])
        run_batch(engine, group, observer)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress()
class LoGoDeployment:
    """One replica: an engine, the OpenAI app, and ``@serve.batch`` coalescing its requests."""

    def __init__(
        self,
        base_model: str | None = None,
        adapters: str | None = None,
        gguf_file: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        probe_dtype: str | None = None,
        probe_compile: bool = False,
        routing: Mapping[str, Any] | None = None,
        api_key: str | None = None,
        served_model_name: str | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        backend: str | None = None,
        backend_options: Mapping[str, Any] | None = None,
    ) -> None:
        from logo_engine.engine import LoGoEngine

        engine = LoGoEngine.from_pretrained(
            base_model,
            adapters=adapters,
            gguf_file=gguf_file,
            device=device,
            dtype=parse_dtype(dtype),
            probe_dtype=parse_dtype(probe_dtype, what="probe_dtype"),
            probe_compile=probe_compile,
            routing=RoutingConfig(**routing) if routing else None,
            backend=backend,
            backend_options=backend_options,
        )
        engine.warm_up()  # probe_compile: compiled before the replica takes requests
        self.engine: BaseEngine = engine
        self.config = ServeConfig(
            api_key=api_key,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            served_model_name=served_model_name,
        )
        self.generate_rows.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.generate_rows.set_batch_wait_timeout_s(batch_wait_ms / 1e3)  # type: ignore[attr-defined]
        self._state: ServerState | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __serve_build_asgi_app__(self) -> Any:
        """The replica's app (Ray Serve calls this after ``__init__``)."""
        app = create_app(self.engine, self.config, runner=self._runner)
        self._state = app.state.logo
        return app

    def _runner(self, engine: BaseEngine, state: ServerState) -> _RayRunner:
        return _RayRunner(self)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=0.01)
    async def generate_rows(self, jobs: list[Job]) -> list[None]:
        """Ray Serve hands the jobs that arrived together; they run as engine batches."""
        observer = self._state.metrics if self._state is not None else None
        await asyncio.to_thread(run_grouped, self.engine, jobs, observer)
        return [None] * len(jobs)


class _RayRunner:
    """The app's job runner on a replica: each job goes through ``@serve.batch``."""

    def __init__(self, deployment: LoGoDeployment) -> None:
        self.deployment = deployment

    def submit(self, job: Job) -> None:
        task = asyncio.get_running_loop().create_task(self.deployment.generate_rows(job))
        tasks = self.deployment._tasks
        tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(tasks.discard)

    def close(self) -> None:
        for task in list(self.deployment._tasks):
            task.cancel()


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """The Ray Serve application (``serve run logo_engine.serving.ray:build_app key=value ...``).

    Deployment options (``num_replicas``, ``autoscaling_config``, ``ray_actor_options``,
    ``max_ongoing_requests``) go to Ray Serve; the rest to :class:`LoGoDeployment`. Values given as
    strings (``serve run`` key=value arguments) are read as JSON for the numeric and object
    arguments.
    """
    args = {k: _parse(k, v) for k, v in (args or {}).items()}
    options = {k: args.pop(k) for k in _DEPLOYMENT_OPTIONS if k in args}
    if "autoscaling_config" in options:
        options.pop("num_replicas", None)  # Ray Serve takes one or the other
    unknown = sorted(set(args) - set(_INIT_ARGS))
    if unknown:
        raise ValueError(
            f"unknown build_app arguments {unknown}; known: {sorted(_INIT_ARGS)} "
            f"and deployment options {list(_DEPLOYMENT_OPTIONS)}"
        )
    deployment: Any = LoGoDeployment  # a ray.serve Deployment (mypy sees the plain class)
    if options:
        deployment = deployment.options(**options)
    return deployment.bind(**args)


_INIT_ARGS = (
    "base_model",
    "adapters",
    "gguf_file",
    "device",
    "dtype",
    "probe_dtype",
    "probe_compile",
    "routing",
    "api_key",
    "served_model_name",
    "max_batch_size",
    "batch_wait_ms",
    "backend",
    "backend_options",
)


_JSON_ARGS = frozenset(
    {
        "routing",
        "backend_options",
        "max_batch_size",
        "batch_wait_ms",
        "num_replicas",
        "autoscaling_config",
        "ray_actor_options",
        "max_ongoing_requests",
    }
)


def _parse(key: str, value: Any) -> Any:
    """``serve run`` passes key=value arguments as strings: numbers and objects are JSON."""
    if key in ("dtype", "probe_dtype") and value is not None:
        # refused when the app is built, not in each replica
        return check_dtype_name(value, what=key)
    if key == "probe_compile":
        if isinstance(value, str):
            value = {"true": True, "false": False}.get(value.strip().lower(), value)
        if not isinstance(value, bool):
            raise ValueError(f"probe_compile must be true or false, got {value!r}")
        return value
    if key in _JSON_ARGS and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{key} must be JSON (a number or an object), got {value!r}") from exc
    return value

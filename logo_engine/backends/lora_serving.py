"""What every backend that serves ONE LoRA folder per request shares (vLLM in-process or server).

Per call: each row's selection → (weights rounded when ``weight_grid`` is set) → the mixture's
folder from a :class:`~logo_engine.adapter_cache.CatAdapterCache` → registered with the serving
engine once → one request per row → new token ids, turned into text by the engine's own
detokenizer and :class:`~logo_engine.base.RowState` (stop strings, finish reasons), so the text
equals what the transformers backend produces for the same tokens.

A subclass says how to talk to its serving engine: :meth:`_register` / :meth:`_unregister` an
adapter folder, :meth:`_submit` a request, :meth:`_wait` for new tokens, :meth:`_cancel`.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import abstractmethod
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from logo_engine.adapter_cache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    CachedAdapter,
    CatAdapterCache,
)
from logo_engine.backends import GenerationBackend
from logo_engine.base import Request, RowState, SamplingParams
from logo_engine.decoding import Detokenizer
from logo_engine.errors import GenerationError
from logo_engine.export import check_rank, round_weights
from logo_engine.types import Selection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """New tokens of one request since the last :meth:`LoRAServingBackend._wait`."""

    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | anything else is an error


class LoRAServingBackend(GenerationBackend):
    """Serves each row's mixture as one LoRA folder on an engine that takes one adapter/request.

    Args:
        cache_dir: where exported mixtures are written (default: a fresh folder under the
            system temp dir, deleted on close; ``/dev/shm/...`` avoids disk I/O on Linux). The
            serving engine must be able to read it.
        max_cached_adapters: most exported mixtures kept (LRU); evicted ones are unloaded.
        max_cache_bytes: most bytes of exported mixtures kept (LRU).
        weight_grid: round mixture weights to multiples of about this step before serving
            (:func:`~logo_engine.export.round_weights`), so that nearby mixtures share one
            adapter. Off by default: it changes outputs. Each :class:`Selection` then reports
            ``served_weights`` beside the routed ``weights``.

    """

    max_lora_rank: int  # set by the subclass: the largest adapter rank the engine accepts

    def __init__(
        self,
        *,
        cache_dir: str | os.PathLike | None = None,
        max_cached_adapters: int = DEFAULT_MAX_ENTRIES,
        max_cache_bytes: int = DEFAULT_MAX_BYTES,
        weight_grid: float | None = None,
    ) -> None:
        if weight_grid is not None:
            round_weights({"probe": 1.0}, weight_grid)  # validates the grid
        self.weight_grid = weight_grid
        self._cache_options: dict[str, Any] = {
            "directory": cache_dir,
            "max_entries": max_cached_adapters,
            "max_bytes": max_cache_bytes,
        }
        self.cache: CatAdapterCache | None = None
        self._registered: dict[str, CachedAdapter] = {}  # what the serving engine has loaded
        self._register_lock = threading.RLock()

    def bind(self, engine: Any) -> None:
        super().bind(engine)
        from logo_engine.engine import _eos_ids

        self.eos_ids = _eos_ids(engine.model, engine.tokenizer)
        self.cache = CatAdapterCache(
            **self._cache_options, on_evict=self._evicted, base_model_name=engine.model_name
        )

    def close(self) -> None:
        """Unload every adapter this backend loaded, then delete the cache's own folder."""
        with self._register_lock:
            loaded, self._registered = list(self._registered.values()), {}
        for entry in loaded:
            try:
                self._unregister(entry)
            except Exception:  # closing must not fail on a server that is already gone
                logger.warning("could not unload %s while closing", entry.name, exc_info=True)
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    # ------------------------------------------------------------------ what subclasses do
    @abstractmethod
    def _register(self, entry: CachedAdapter) -> None:
        """Make the serving engine able to serve ``entry`` (load it); raise on failure."""

    @abstractmethod
    def _unregister(self, entry: CachedAdapter) -> None:
        """Unload ``entry`` from the serving engine (its folder is deleted next)."""

    @abstractmethod
    def _submit(
        self, input_ids: Sequence[int], params: SamplingParams, entry: CachedAdapter | None
    ) -> Hashable:
        """Start one request (``entry`` None: the base model); returns its handle."""

    @abstractmethod
    def _wait(self, handles: list[Hashable]) -> dict[Hashable, Delta]:
        """Block until at least one of ``handles`` has new tokens; return them, by handle."""

    @abstractmethod
    def _cancel(self, handles: list[Hashable]) -> None:
        """Stop these requests (the consumer is gone, or their rows are done)."""

    # ------------------------------------------------------------------ the shared flow
    def serve(self, selections: list[Selection]) -> list[Selection]:
        """Round weights (``weight_grid``) and check each mixture's rank against the engine's."""
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
        if self.cache is None:
            raise GenerationError("this backend is closed or was never bound to an engine")
        return self._decode(self.cache, requests, selections, params, rows)

    def _decode(
        self,
        cache: CatAdapterCache,
        requests: list[Request],
        selections: list[Selection],
        params: SamplingParams,
        rows: list[RowState],
    ) -> Iterator[None]:
        library = self.engine.library
        entries: list[CachedAdapter] = []
        handles: list[Hashable] = []
        live: dict[Hashable, int] = {}  # handle -> row
        try:
            for i, (request, sel) in enumerate(zip(requests, selections, strict=True)):
                entry = None
                if sel.adapters:
                    entry = cache.acquire(library, sel.served_mixture)
                    entries.append(entry)
                    self._ensure_registered(entry)
                handle = self._submit(request.input_ids, params, entry)
                handles.append(handle)
                live[handle] = i
            detoks = [Detokenizer(self.engine.tokenizer) for _ in rows]
            while live:
                for handle, delta in self._wait(list(live)).items():
                    i = live[handle]
                    self._push(delta, rows[i], detoks[i])
                    if delta.finished or rows[i].done:
                        del live[handle]
                        if not delta.finished:
                            self._cancel([handle])  # a stop string ended the row first
                yield
        finally:
            if live:
                self._cancel(list(live))
            for entry in entries:
                cache.release(entry)

    def _push(self, delta: Delta, row: RowState, detok: Detokenizer) -> None:
        """The engine's own token handling (as in TransformersDecoder), then vLLM's finish."""
        for token in delta.token_ids:
            if row.done:
                return
            if token in self.eos_ids:
                row.push(detok.flush(), n_tokens=1)
                row.finish("stop")
            else:
                row.push(detok.add(token), n_tokens=1)
        if not delta.finished:
            return
        if delta.finish_reason not in ("stop", "length", None):
            raise GenerationError(
                f"the serving engine ended the request with finish_reason={delta.finish_reason!r}"
            )
        row.push(detok.flush(), n_tokens=0)
        if delta.finish_reason == "stop":
            row.finish("stop")  # a stop token the serving engine knows beyond ours (rare)

    def _ensure_registered(self, entry: CachedAdapter) -> None:
        with self._register_lock:
            if entry.key not in self._registered:
                self._register(entry)
                self._registered[entry.key] = entry

    def _evicted(self, entry: CachedAdapter) -> None:
        """The cache evicted ``entry``: unload it before its folder is deleted."""
        with self._register_lock:
            if self._registered.pop(entry.key, None) is not None:
                self._unregister(entry)

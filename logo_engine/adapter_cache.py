"""A bounded on-disk cache of exported mixtures, for engines that load LoRA folders by path.

Serving engines (vLLM) take one LoRA adapter per request, by path. :class:`CatAdapterCache`
turns a mixture ``{adapter: weight}`` into such a folder (:func:`~logo_engine.export.cat_adapter`)
once, and hands out the same folder for the same mixture afterwards:

- key = :func:`~logo_engine.export.mixture_key`: hash(identity of each adapter's factors, sorted
  (adapter, weight) pairs); the same adapters in another library or process give the same key;
- folders are written atomically (temporary sibling, then rename): a reader never sees half of
  one; a folder already in the directory (an earlier run) is reused;
- LRU, bounded by entry count and by bytes; an entry in use (acquired, not yet released) is never
  evicted, so the bounds may be exceeded while many distinct mixtures run at once;
- ``on_evict(entry)`` runs before an evicted folder is deleted (the vLLM backend unloads the
  adapter there);
- one adapter with weight 1 is served from its own folder: nothing is written or evicted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from logo_engine.errors import InvalidRequestError
from logo_engine.export import (
    adapter_digest,
    adapter_rank,
    export_mixture,
    mixture_key,
    mixture_rank,
)
from logo_engine.library import CONFIG_NAME, SAFETENSORS_NAME, AdapterLibrary

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 64
DEFAULT_MAX_BYTES = 4 * 2**30
_ENTRY_RE = re.compile(r"^cat-(?P<key>[0-9a-f]{64})$")


@dataclass(frozen=True)
class CachedAdapter:
    """One servable LoRA folder: an exported mixture, or an original adapter (k = 1)."""

    key: str  # mixture key (cat) or "orig-" + the adapter's digest
    name: str  # a name unique to this content, for servers: "logo-cat-<key[:16]>", "<name>@<d>"
    path: Path
    rank: int
    mixture: dict[str, float]
    original: bool
    nbytes: int = 0


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made."""

    hits: int  # an exported folder was reused (in memory or found on disk)
    misses: int  # a folder was written
    originals: int  # requests served by an original adapter folder (k = 1)
    evictions: int
    entries: int
    nbytes: int


class CatAdapterCache:
    """Exported mixtures under ``directory``, LRU-bounded by count and bytes (see module doc).

    Args:
        directory: where folders are written. Default: a fresh folder under the system temp
            dir, removed by :meth:`close` (``/dev/shm`` is a good choice on Linux servers). A
            given directory is kept, and folders found in it are reused; do not share one
            directory between processes that run at the same time (each evicts on its own).
        max_entries: most exported folders kept.
        max_bytes: most bytes of exported folders kept.
        on_evict: called with each evicted entry before its folder is deleted.
        base_model_name: written into each folder's ``adapter_config.json``.

    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_evict: Callable[[CachedAdapter], None] | None = None,
        base_model_name: str | None = None,
    ) -> None:
        for label, value in (("max_entries", max_entries), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{label} must be an int >= 1, got {value!r}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self.base_model_name = base_model_name
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, CachedAdapter] = OrderedDict()  # LRU order, oldest first
        self._in_use: dict[str, int] = {}
        self._counts = {"hits": 0, "misses": 0, "originals": 0, "evictions": 0}
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="logo-cat-adapters-"))
            self._finalizer: weakref.finalize | None = weakref.finalize(
                self, shutil.rmtree, self.directory, ignore_errors=True
            )
        else:
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)
            self._finalizer = None
            self._adopt_existing()

    # ------------------------------------------------------------------ public
    def acquire(self, library: AdapterLibrary, mixture: Mapping[str, float]) -> CachedAdapter:
        """The folder serving ``mixture`` (weights summing to 1), in use until :meth:`release`.

        Writes it on a miss, then evicts least recently used entries beyond the bounds.
        """
        if not mixture:
            raise InvalidRequestError("an empty mixture is the base model: nothing to serve")
        if len(mixture) == 1:
            (name,) = mixture
            source = library.adapters[library.slot(name)].path
            if source is not None and abs(next(iter(mixture.values())) - 1.0) < 1e-12:
                digest = adapter_digest(library, name)
                with self._lock:
                    self._counts["originals"] += 1
                return CachedAdapter(
                    key=f"orig-{digest}",
                    name=f"{name}@{digest[:12]}",
                    path=Path(source),
                    rank=adapter_rank(library, name),
                    mixture=dict(mixture),
                    original=True,
                )
        key = mixture_key(library, mixture)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._counts["hits"] += 1
                self._entries.move_to_end(key)
                if not entry.mixture:  # adopted from an earlier run: now we know what it holds
                    entry = replace(
                        entry, mixture=dict(mixture), rank=mixture_rank(library, mixture)
                    )
                    self._entries[key] = entry
            else:
                entry = self._write(library, mixture, key)
                self._entries[key] = entry
            self._in_use[key] = self._in_use.get(key, 0) + 1
            self._evict_over_limits()
            return entry

    def release(self, entry: CachedAdapter) -> None:
        """End one use of ``entry``; an unused entry may then be evicted."""
        if entry.original:
            return
        with self._lock:
            left = self._in_use.get(entry.key, 0) - 1
            if left > 0:
                self._in_use[entry.key] = left
            else:
                self._in_use.pop(entry.key, None)
                self._evict_over_limits()

    @contextmanager
    def use(self, library: AdapterLibrary, mixture: Mapping[str, float]) -> Iterator[CachedAdapter]:
        """:meth:`acquire` for the block, :meth:`release` after it."""
        entry = self.acquire(library, mixture)
        try:
            yield entry
        finally:
            self.release(entry)

    def rank(self, library: AdapterLibrary, mixture: Mapping[str, float]) -> int:
        """The rank of the folder that would serve ``mixture`` (no file is written)."""
        return mixture_rank(library, mixture)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                **self._counts,
                entries=len(self._entries),
                nbytes=sum(e.nbytes for e in self._entries.values()),
            )

    @property
    def entries(self) -> list[CachedAdapter]:
        """Cached folders, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def close(self) -> None:
        """Forget every entry; delete the directory when the cache made it."""
        with self._lock:
            self._entries.clear()
            self._in_use.clear()
        if self._finalizer is not None:
            self._finalizer()

    # ------------------------------------------------------------------ internals
    def _write(
        self, library: AdapterLibrary, mixture: Mapping[str, float], key: str
    ) -> CachedAdapter:
        path = self.directory / f"cat-{key}"
        if _is_complete(path):  # written by an earlier run, or adopted after a restart
            self._counts["hits"] += 1
            nbytes = _folder_bytes(path)
            rank = mixture_rank(library, mixture)
        else:
            self._counts["misses"] += 1
            exported = export_mixture(
                library,
                dict(mixture),
                path,
                base_model_name=self.base_model_name,
                copy_single=True,
                overwrite=path.exists(),
            )
            nbytes, rank = exported.nbytes, exported.rank
        return CachedAdapter(
            key=key,
            name=f"logo-cat-{key[:16]}",
            path=path,
            rank=rank,
            mixture=dict(mixture),
            original=False,
            nbytes=nbytes,
        )

    def _evict_over_limits(self) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        for key in list(self._entries):
            if len(self._entries) <= self.max_entries and total <= self.max_bytes:
                return
            if self._in_use.get(key):
                continue
            entry = self._entries.pop(key)
            total -= entry.nbytes
            self._counts["evictions"] += 1
            if self.on_evict is not None:
                try:
                    self.on_evict(entry)
                except Exception:
                    logger.warning("on_evict failed for %s", entry.name, exc_info=True)
            shutil.rmtree(entry.path, ignore_errors=True)
        if len(self._entries) > self.max_entries or total > self.max_bytes:
            logger.info(
                "adapter cache over its bounds (%d entries, %d bytes): the rest is in use",
                len(self._entries),
                total,
            )

    def _adopt_existing(self) -> None:
        """Folders from an earlier run: kept as entries (oldest first), then bounded.

        Their mixtures are unknown until requested again; they count towards the bounds.
        """
        found = []
        for child in self.directory.iterdir():
            match = _ENTRY_RE.match(child.name)
            if match and _is_complete(child):
                found.append((child.stat().st_mtime, match["key"], child))
        for _, key, child in sorted(found):
            self._entries[key] = CachedAdapter(
                key=key,
                name=f"logo-cat-{key[:16]}",
                path=child,
                rank=0,
                mixture={},
                original=False,
                nbytes=_folder_bytes(child),
            )
        self._evict_over_limits()


def _is_complete(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / SAFETENSORS_NAME).is_file()


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())

"""Prefix caches: the keys and values of recent token sequences, for calls that extend them.

Agents and chat loops re-send the same system prompt, tool schemas and growing history at every
step. The engine keeps two caches of this class (DESIGN.md section 2, "Agent-loop latency"):

- the **probe cache**: the base-only KV of the probe pass (the decoder blocks below the probe
  point) and the probed module's captured inputs, per probe setting. No adapter is active in the
  probe, so this KV is the base model's own;
- the **prefill cache**: the KV of generations (every block), per mixture. Adapters change the
  inputs of K and V from block 0 on (every adapted projection, and every block's output feeds the
  next block's K and V), so KV computed under one mixture is wrong under any other: a turn whose
  selection changed cannot reuse it, and the mixture is part of the key.

An entry holds one row's token sequence and, per cached block, keys and values (kv_heads, T, d),
without padding. Keys and values at position j depend only on tokens 0..j, so a lookup returns the
longest common prefix of the query with any entry of the same *space* (probe setting or mixture),
not only whole entries. At least one token is always left to compute (the probe reads the last
token; generation needs its logits).

Bounded by bytes, least recently used first out, thread-safe (one lock around the index; stored
tensors are never written after insertion). An entry that another entry extends is dropped, since
the longer one answers every lookup it would. ``invalidate()`` drops everything and bumps an
epoch: a call that read the previous epoch cannot insert stale entries afterwards.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer


@dataclass(frozen=True)
class PrefixEntry:
    """One row's cached sequence: tokens, per-block keys and values, optional extras."""

    tokens: torch.Tensor  # (T,) int64, CPU
    keys: tuple[torch.Tensor, ...]  # per cached block: (kv_heads, T, head_dim)
    values: tuple[torch.Tensor, ...]  # per cached block: (kv_heads, T, head_dim)
    captured: torch.Tensor | None = None  # (T, in): the probed module's inputs (probe cache)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        tensors = [self.tokens, *self.keys, *self.values]
        if self.captured is not None:
            tensors.append(self.captured)
        object.__setattr__(self, "nbytes", sum(t.numel() * t.element_size() for t in tensors))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def depth(self) -> int:
        """Number of cached decoder blocks (from block 0)."""
        return len(self.keys)


@dataclass(frozen=True)
class CacheUse:
    """How one call reads and writes a prefix cache.

    ``epoch`` is read from the cache before the state its entries depend on (the library);
    ``spaces`` says per row which entries may be reused and where its own entry goes.
    """

    cache: PrefixCache
    epoch: int
    spaces: Sequence[Hashable]


@dataclass(frozen=True)
class PrefixHit:
    """The reusable part of an entry for one query: its first ``length`` tokens."""

    entry: PrefixEntry
    length: int


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters of one prefix cache since it was created."""

    max_bytes: int
    bytes: int
    entries: int
    lookups: int
    hits: int
    tokens_reused: int
    evictions: int


class PrefixCache:
    """An LRU store of :class:`PrefixEntry` bounded by ``max_bytes`` (0 disables it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, tuple[Hashable, PrefixEntry]] = OrderedDict()
        self._next_id = 0
        self._bytes = 0
        self._epoch = 0
        self._lookups = self._hits = self._reused = self._evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def epoch(self) -> int:
        """Read this before the state the entries depend on (the library); pass it back."""
        return self._epoch

    @property
    def nbytes(self) -> int:
        return self._bytes

    def invalidate(self) -> None:
        """Drop every entry; inserts made with an earlier epoch are refused from now on."""
        with self._lock:
            self._epoch += 1
            self._entries.clear()
            self._bytes = 0

    def lookup(
        self, space: Hashable, tokens: Sequence[int], *, epoch: int, limit: int | None = None
    ) -> PrefixHit | None:
        """The entry of ``space`` sharing the longest prefix with ``tokens`` (at most ``limit``).

        ``limit`` defaults to ``len(tokens) - 1``: one token is left to compute (generation needs
        its logits). The probe, which also caches its captured inputs, may take every token.
        """
        if not self.enabled:
            return None
        query = torch.as_tensor(tokens, dtype=torch.long)
        limit = len(query) - 1 if limit is None else limit
        with self._lock:
            self._lookups += 1
            if epoch != self._epoch or limit < 1:
                return None
            best: tuple[int, int] | None = None  # (length, entry id)
            for key, (sp, entry) in self._entries.items():
                if sp != space:
                    continue
                n = _common_prefix(entry.tokens, query, limit)
                if n > 0 and (best is None or n > best[0]):
                    best = (n, key)
            if best is None:
                return None
            self._entries.move_to_end(best[1])
            self._hits += 1
            self._reused += best[0]
            return PrefixHit(self._entries[best[1]][1], best[0])

    def related(
        self, tokens: Sequence[int], *, epoch: int, min_share: float
    ) -> tuple[Hashable, PrefixEntry] | None:
        """The entry (and its space) sharing the longest prefix with ``tokens``, if long enough.

        Long enough: at least ``min_share`` of ``tokens``; on ties, the most recently used entry.
        Sticky routing uses it to find the conversation a new prompt continues.
        """
        if not self.enabled:
            return None
        query = torch.as_tensor(tokens, dtype=torch.long)
        need = max(1, int(min_share * len(query)))
        with self._lock:
            if epoch != self._epoch:
                return None
            best: tuple[int, Hashable, PrefixEntry] | None = None
            for space, entry in reversed(self._entries.values()):
                n = _common_prefix(entry.tokens, query, len(query))
                if n >= need and (best is None or n > best[0]):
                    best = (n, space, entry)
        return None if best is None else (best[1], best[2])

    def insert(self, space: Hashable, entry: PrefixEntry, *, epoch: int) -> bool:
        """Store ``entry`` (evicting least recently used ones); False when refused."""
        if not self.enabled or len(entry) == 0 or entry.nbytes > self.max_bytes:
            return False
        with self._lock:
            if epoch != self._epoch:
                return False
            for key, (sp, old) in list(self._entries.items()):
                if sp == space and len(old) <= len(entry):
                    if _common_prefix(old.tokens, entry.tokens, len(old)) == len(old):
                        self._drop(key)  # the new entry extends it
            while self._entries and self._bytes + entry.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self._evictions += 1
            self._entries[self._next_id] = (space, entry)
            self._next_id += 1
            self._bytes += entry.nbytes
            return True

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(
                max_bytes=self.max_bytes,
                bytes=self._bytes,
                entries=len(self._entries),
                lookups=self._lookups,
                hits=self._hits,
                tokens_reused=self._reused,
                evictions=self._evictions,
            )

    def _drop(self, key: int) -> None:
        _, entry = self._entries.pop(key)
        self._bytes -= entry.nbytes


def _common_prefix(a: torch.Tensor, b: torch.Tensor, limit: int) -> int:
    """Length of the common prefix of two 1-D token tensors, at most ``limit``."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if len(diff) else n


# ---------------------------------------------------------------------- batches over prefixes
def cacheable(config: PretrainedConfig) -> bool:
    """Whether every block of this model keeps a plain growing KV cache (no sliding window)."""
    cache = DynamicCache(config=config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass
class PrefixBatch:
    """A left-padded batch whose rows may continue cached prefixes.

    Layout of row i in the model's key/value axis: ``[pad, prefix_i | pad, new_i]``, the first
    part (length P, the longest reused prefix) in ``cache``, the second (length N) in
    ``input_ids``. Padding is masked out and positions count only real tokens, so every real
    token attends to exactly what it would in one uncached, unpadded pass.
    """

    input_ids: torch.Tensor  # (B, N) new tokens, left-padded
    mask: torch.Tensor  # (B, P + N) past then new; 1 = real token
    positions: torch.Tensor  # (B, N) position of each new token in its row's sequence
    cache: DynamicCache  # P tokens of past in the first ``depth`` blocks
    reused: list[int]  # per row: prefix tokens taken from the cache
    past: int  # P


def prefix_batch(
    ids: Sequence[Sequence[int]],
    hits: Sequence[PrefixHit | None],
    *,
    pad_id: int,
    config: PretrainedConfig,
    device: torch.device,
) -> PrefixBatch:
    """Build the model inputs for rows ``ids`` that reuse ``hits`` (None: nothing cached)."""
    reused = [0 if h is None else h.length for h in hits]
    news = [list(row[n:]) for row, n in zip(ids, reused, strict=True)]
    past, width = max(reused), max(len(r) for r in news)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), past + width, dtype=torch.long)
    for i, (row, n) in enumerate(zip(news, reused, strict=True)):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, past - n : past] = 1
        mask[i, past + width - len(row) :] = 1
    new_mask = mask[:, past:]  # (B, N)
    positions = (torch.tensor(reused)[:, None] + new_mask.cumsum(-1) - 1).clamp(min=0)  # (B, N)
    data: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
    found = [h for h in hits if h is not None]
    if found:
        depths = {h.entry.depth for h in found}
        if len(depths) != 1:
            raise ValueError(f"hits of one batch cache different numbers of blocks: {depths}")
        for layer in range(depths.pop()):
            k = _stack([_past(h, found[0], past, layer, "keys") for h in hits])  # (B, H, P, d)
            v = _stack([_past(h, found[0], past, layer, "values") for h in hits])
            data.append((k.to(device), v.to(device)))
    n_layers = len(DynamicCache(config=config).layers)
    data += [(None, None)] * (n_layers - len(data))
    cache = DynamicCache(ddp_cache_data=data if past else None, config=config)
    return PrefixBatch(
        input_ids=input_ids.to(device),
        mask=mask.to(device),
        positions=positions.to(device),
        cache=cache,
        reused=reused,
        past=past,
    )


def _past(
    hit: PrefixHit | None, like: PrefixHit, past: int, layer: int, which: str
) -> torch.Tensor:
    """One row's cached keys or values of ``layer``, left-padded with zeros to ``past``."""
    source = hit if hit is not None else like
    n = 0 if hit is None else hit.length
    t = getattr(source.entry, which)[layer][:, :n]  # (H, n, d), a view
    return t if n == past else F.pad(t, (0, 0, past - n, 0))  # (H, P, d)


def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """(H, P, d) rows -> (B, H, P, d); a single row stays a view (the cache copies it once)."""
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)


def row_kv(
    cache: DynamicCache, mask: torch.Tensor, row: int, length: int, depth: int
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Row ``row``'s first ``length`` real positions of blocks 0..depth-1, without padding.

    A single unpadded row is returned as views (nothing is copied) unless its tensors are views
    into a larger buffer (:class:`~logo_engine.decoding.RoomyLayer`); other rows are copied, so
    an entry never keeps a whole batch's tensors, or their spare room, alive.
    """
    where = mask[row].nonzero().squeeze(1)[:length]  # (length,) positions of real tokens
    whole = mask.shape[0] == 1 and length == mask.shape[1]
    keys, values = [], []
    for layer in cache.layers[:depth]:
        layer_keys, layer_values = _growing_kv(layer)  # (B, H, S, d)
        k, v = layer_keys[row], layer_values[row]  # (H, S, d)
        if whole and k.is_contiguous() and v.is_contiguous():  # not a view into spare room
            keys.append(k)
            values.append(v)
        else:
            keys.append(k.index_select(1, where.to(k.device)))  # (H, length, d)
            values.append(v.index_select(1, where.to(v.device)))  # (H, length, d)
    return tuple(keys), tuple(values)


def concat_kv(
    parts: Sequence[tuple[torch.Tensor, DynamicCache]], *, config: PretrainedConfig
) -> tuple[torch.Tensor, DynamicCache]:
    """Batches (mask (B_i, T_i), cache of T_i positions) stacked into one (sum B_i, max T_i).

    Shorter batches are left-padded: zero keys and values under a zero mask, so every real
    position attends to exactly what it did before. Every block must hold plain growing KV.
    """
    width = max(mask.shape[1] for mask, _ in parts)
    masks = [F.pad(mask, (width - mask.shape[1], 0)) for mask, _ in parts]  # (B_i, T)
    data = []
    for layers in zip(*(cache.layers for _, cache in parts), strict=True):
        keys, values = [], []
        for layer in layers:
            k, v = _growing_kv(layer)  # (B_i, H, T_i, d)
            pad = width - k.shape[-2]
            keys.append(F.pad(k, (0, 0, pad, 0)) if pad else k)  # (B_i, H, T, d)
            values.append(F.pad(v, (0, 0, pad, 0)) if pad else v)
        data.append((torch.cat(keys), torch.cat(values)))
    return torch.cat(masks), DynamicCache(ddp_cache_data=data, config=config)


def _growing_kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's keys and values (B, H, T, d); refused unless it is a plain growing layer."""
    if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
        raise TypeError(f"block {type(layer).__name__} holds no growing keys and values")
    return layer.keys, layer.values


def filled_depth(cache: DynamicCache, length: int) -> int:
    """Number of leading blocks whose KV covers ``length`` positions (the blocks a pass ran)."""
    depth = 0
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer):
            break
        if not layer.is_initialized or layer.get_seq_length() != length:
            break
        depth += 1
    return depth

"""The engine's own decode loop: left-padded batches, KV cache, greedy or seeded sampling.

:class:`TransformersDecoder` generates for a batch of token-id rows with one
:class:`~logo_engine.mixture.MixturePlan` installed (each row may carry its own mixture), pushing
text into one :class:`~logo_engine.base.RowState` per row and yielding once per step, so callers
(streams, async, servers) can interleave, cancel or stop between tokens.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from logo_engine.base import RowState, SamplingParams
from logo_engine.errors import GenerationError, LoGoError, NumericalError
from logo_engine.mixture import ForwardContext, MixturePlan, forward_context
from logo_engine.packing import PackedPass, packs, packs_rows
from logo_engine.prefix_cache import (
    CacheUse,
    PrefixEntry,
    PrefixHit,
    concat_kv,
    prefix_batch,
    row_kv,
)


class Detokenizer:
    """Incremental decoding that never splits a multi-byte character (TGI's offsets method).

    :meth:`add` returns the text a new token completes ("" while a character is still partial);
    :meth:`flush` returns what is held back at the end, so that the concatenation of every piece
    equals ``tokenizer.decode(ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window re-decoded for context
        self.read = 0  # end of the text already returned

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text of tokens still held back (a trailing partial character), once, at the end."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if after.startswith(before) else ""

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def left_pad(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) left-padded to the longest row, and the attention mask (B, T)."""
    batch = tokenizer.pad(
        {"input_ids": [list(x) for x in ids]},
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows. mask (B, T) -> (B, T)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model: PreTrainedModel) -> str:
    """Name of the forward's KV-cache argument ("cache" in recent transformers)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def make_generators(
    params: SamplingParams, n_rows: int, device: torch.device
) -> list[torch.Generator] | None:
    """One generator per row, all seeded alike: a row samples as it would alone (None: greedy)."""
    if params.temperature == 0:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    return [torch.Generator(device=device).manual_seed(seed) for _ in range(n_rows)]


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """Greedy argmax, or temperature / top-p sampling. logits (B, V) -> tokens (B,).

    math: p = softmax((l - max l) / T), in float64 so that any finite T > 0 works: a tiny T
    tends to greedy, a huge T to uniform, and nothing overflows.
    """
    if generators is None:
        return logits.argmax(dim=-1)
    shifted = (logits - logits.amax(dim=-1, keepdim=True)).double()  # (B, V), <= 0
    probs = torch.softmax(shifted / params.temperature, dim=-1)  # (B, V)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest nucleus
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.stack(
        [torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators, strict=True)]
    )


@dataclass(frozen=True)
class JoinGroup:
    """Rows to decode, already routed: a run's first rows, or rows that join it later.

    ``plan`` holds these rows' mixtures (row order as ``input_ids``); ``prefill`` the prefill
    cache and each row's space in it (None: no prefill cache). ``ahead``: the group's prompt
    pass (:meth:`TransformersDecoder.prompt_pass`), started in another thread before the group
    was routed; the decoder takes its result instead of running the pass.
    """

    input_ids: Sequence[Sequence[int]]
    plan: MixturePlan | None
    rows: list[RowState]
    prefill: CacheUse | None = None
    ahead: Future[PromptPass] | None = None  # this group's prompt pass, started earlier


@dataclass(frozen=True)
class PromptPass:
    """A group's prompts run over their cached prefixes: what its first decoding step needs."""

    logits: torch.Tensor  # (B, V) each row's last logits, float32
    mask: torch.Tensor  # (B, T) real positions of the cache
    pos: torch.Tensor  # (B, 1+) positions of the last tokens fed
    cache: DynamicCache  # T positions
    reused: Sequence[int]  # prompt tokens each row took from the prefill cache
    prefill: CacheUse | None  # the prefill cache in use (None: none, or disabled)


@dataclass
class _Live:
    """One row of the running batch."""

    row: RowState
    ids: Sequence[int]  # its prompt tokens
    space: Hashable | None  # its prefill-cache space
    limit: int  # its own max_new_tokens
    detok: Detokenizer
    gen: list[int] = field(default_factory=list)  # the tokens it chose
    fed: int = 0  # of which fed back into the model (their KV is in the cache)


@dataclass
class _Batch:
    """The running batch: one entry of ``live`` per row of every tensor."""

    live: list[_Live]
    ctx: ForwardContext
    mask: torch.Tensor  # (B, T): real positions of the cache
    pos: torch.Tensor  # (B, 1+): positions of the last tokens fed
    cache: DynamicCache  # T positions
    generators: list[torch.Generator] | None
    prefill: CacheUse | None  # where rows store their KV when they leave


class TransformersDecoder:
    """Generation on the transformers model itself, with the mixture hooks of the engine."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.device = next(model.parameters()).device
        self._cache_kwarg = cache_kwarg(model)

    def decode(
        self,
        group: JoinGroup,
        params: SamplingParams,
        joins: Callable[[], list[JoinGroup]] | None = None,
    ) -> Iterator[None]:
        """Generate for every row of ``group`` with its plan installed; yield after each step.

        Rows that are done (end of turn, stop string, their own limit, or finished by the caller
        between steps, e.g. a cancelled request) are dropped from the batch before the next step:
        their KV cache, mask, generator and mixture rows go, the other rows decode as before.

        With ``group.prefill`` (the prefill cache, and each row's mixture as its space), rows
        that extend a cached prefix of their mixture prefill only their new tokens, and each
        row's KV (prompt and the generated tokens fed back) is stored when it leaves the batch,
        or when the loop is closed after it was done (a server closes a run once its rows are
        answered); a stream closed early stores nothing for its rows still running.

        With ``joins``, rows may join the running batch (continuous batching): between steps,
        ``joins()`` returns the groups that arrived. On a model that takes packed passes, the
        joiners' prompts and the running rows' next tokens run as one packed pass
        (:meth:`_step_with_joins`), so a join costs no forward of its own; otherwise each group
        is prefilled on its own (its first token chosen from its own logits) and appended. Either
        way the batch is left-padded to a common length, padding is masked out and positions
        count real tokens only, so a row decodes as it would alone. The loop ends when no row is
        left and no group is waiting.
        """
        batch, logits = self._prefill(group, params)
        while True:
            tokens = next_tokens(logits, params, batch.generators)  # (B,)
            self._accept(batch.live, tokens)
            try:
                yield
            except GeneratorExit:
                self._store(batch, [j for j, e in enumerate(batch.live) if e.row.done])
                raise
            tokens = self._drop_done(batch, tokens)
            groups = joins() if joins is not None else []
            if groups and batch.live and packs(self.model):
                batch, logits = self._step_with_joins(batch, tokens, groups, params)
                continue
            for joining in groups:
                batch, tokens = self._join(batch, tokens, joining, params)
            if not batch.live:
                return
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.live), 1)], dim=1)
            batch.pos = batch.pos[:, -1:] + 1  # (B, 1)
            left = max(e.limit - len(e.gen) for e in batch.live)  # steps the batch may still run
            make_room(batch.cache, min(left + 1, ROOM))
            logits = self.forward(batch.ctx, tokens[:, None], batch.mask, batch.pos, batch.cache)
            for live in batch.live:
                live.fed += 1

    def _prefill(self, group: JoinGroup, params: SamplingParams) -> tuple[_Batch, torch.Tensor]:
        """A batch of ``group``'s rows, their prompts run: the batch and its logits (B, V)."""
        done = group.ahead.result() if group.ahead is not None else self.prompt_pass(group)
        batch = _Batch(
            live=self._live_rows(group, params, done.prefill, done.reused),
            ctx=ForwardContext(plan=group.plan),
            mask=done.mask,
            pos=done.pos,
            cache=done.cache,
            generators=make_generators(params, len(group.rows), self.device),
            prefill=done.prefill,
        )
        return batch, done.logits

    def prompt_pass(self, group: JoinGroup, cancel: threading.Event | None = None) -> PromptPass:
        """Run ``group``'s prompts (over their cached prefixes) with its plan installed.

        It reads only the group's token ids, plan and prefill cache, not its rows, so it may run
        before the rows exist (see :class:`JoinGroup`'s ``ahead``). ``cancel``: set it to stop
        the pass at its next adapted module (:class:`~logo_engine.mixture.PassCancelled`).
        """
        prefill, hits = self._lookup(group)
        if packs_rows(self.model, len(group.input_ids)):
            packed = PackedPass(group.input_ids, hits, device=self.device)
            logits = self._packed_forward(group.plan, packed, cancel)
            mask, cache = packed.padded(self.model.config)
            return PromptPass(logits, mask, packed.last_positions, cache, packed.reused, prefill)
        if prefill is not None:
            built = prefix_batch(
                group.input_ids,
                hits,
                pad_id=self.tokenizer.pad_token_id,
                config=self.model.config,
                device=self.device,
            )
            ids, mask, pos, cache = built.input_ids, built.mask, built.positions, built.cache
            reused = built.reused
        else:
            ids, mask = left_pad(self.tokenizer, group.input_ids, self.device)
            pos = positions(mask)
            cache = DynamicCache(config=self.model.config)
            reused = [0] * len(group.input_ids)
        ctx = ForwardContext(plan=group.plan, cancel=cancel)
        logits = self.forward(ctx, ids, mask, pos, cache)
        return PromptPass(logits, mask, pos, cache, reused, prefill)

    @staticmethod
    def _lookup(group: JoinGroup) -> tuple[CacheUse | None, list[PrefixHit | None]]:
        """The group's prefill cache (None: none, or disabled) and each row's cached prefix."""
        prefill = group.prefill
        if prefill is None or not prefill.cache.enabled:
            return None, [None] * len(group.input_ids)
        hits = [
            prefill.cache.lookup(space, row, epoch=prefill.epoch)
            for space, row in zip(prefill.spaces, group.input_ids, strict=True)
        ]
        return prefill, hits

    def _live_rows(
        self,
        group: JoinGroup,
        params: SamplingParams,
        prefill: CacheUse | None,
        reused: Sequence[int],
    ) -> list[_Live]:
        """The group's rows as batch entries; ``reused``: prompt tokens each took from cache."""
        spaces: Sequence[Hashable | None] = [None] * len(group.rows)
        if prefill is not None:
            spaces = prefill.spaces
            for row, n in zip(group.rows, reused, strict=True):
                row.cached_tokens = n
        return [
            _Live(
                row=row,
                ids=row_ids,
                space=space,
                limit=row.max_new_tokens or params.max_new_tokens,
                detok=Detokenizer(self.tokenizer),
            )
            for row, row_ids, space in zip(group.rows, group.input_ids, spaces, strict=True)
        ]

    def _packed_forward(
        self, plan: MixturePlan | None, packed: PackedPass, cancel: threading.Event | None = None
    ) -> torch.Tensor:
        """One packed pass (see :mod:`logo_engine.packing`); each row's last logits (B, V)."""
        ctx = ForwardContext(plan=plan, packed=packed, cancel=cancel)
        return self.forward(
            ctx, packed.input_ids, packed.mask, packed.positions, None, keep=packed.last
        )

    def _step_with_joins(
        self,
        batch: _Batch,
        tokens: torch.Tensor,
        groups: Sequence[JoinGroup],
        params: SamplingParams,
    ) -> tuple[_Batch, torch.Tensor]:
        """One packed pass for the running rows' next step and the joining groups' prompts.

        Each running row feeds its pending token over its own KV (taken out of the padded
        batch); each joining row runs its prompt over its cached prefix; the pass returns the
        next logits of every row, running rows first, and the batch is laid out anew. So a join
        costs no forward of its own (vLLM's chunked prefill, on packed rows).
        """
        ids: list[Sequence[int]] = []
        hits: list[PrefixHit | None] = []
        depth = len(batch.cache.layers)
        for j, (entry, token) in enumerate(zip(batch.live, tokens.tolist(), strict=True)):
            fed = [*entry.ids, *entry.gen[: entry.fed]]
            keys, values = row_kv(batch.cache, batch.mask, j, len(fed), depth)
            past = PrefixEntry(tokens=torch.tensor(fed, dtype=torch.long), keys=keys, values=values)
            ids.append([*fed, token])
            hits.append(PrefixHit(past, len(fed)))
        parts: list[tuple[MixturePlan | None, int]] = [(batch.ctx.plan, len(batch.live))]
        live = list(batch.live)
        generators = batch.generators
        for group in groups:
            prefill, group_hits = self._lookup(group)
            if (batch.prefill is None) != (prefill is None):
                raise LoGoError("rows joining a batch must use the prefill cache as the batch does")
            start = len(hits)
            ids.extend(group.input_ids)
            hits.extend(group_hits)
            parts.append((group.plan, len(group.rows)))
            reused = [0 if h is None else h.length for h in hits[start:]]
            live.extend(self._live_rows(group, params, prefill, reused))
            if generators is not None:
                generators = [
                    *generators,
                    *(make_generators(params, len(group.rows), self.device) or []),
                ]
        plan = MixturePlan.concat(parts)
        packed = PackedPass(ids, hits, device=self.device)
        logits = self._packed_forward(plan, packed)
        for entry in batch.live:
            entry.fed += 1
        mask, cache = packed.padded(self.model.config)
        joined = _Batch(
            live=live,
            ctx=ForwardContext(plan=plan),
            mask=mask,
            pos=packed.last_positions,
            cache=cache,
            generators=generators,
            prefill=batch.prefill,
        )
        return joined, logits

    def _accept(self, live: Sequence[_Live], tokens: torch.Tensor) -> None:
        """Give each live row its chosen token: text, end of turn, its own limit."""
        for entry, token in zip(live, tokens.tolist(), strict=True):
            row = entry.row
            if row.done:
                continue
            entry.gen.append(token)
            if token in self.eos_ids:
                row.push(entry.detok.flush(), n_tokens=1)
                row.finish("stop")
            else:
                row.push(entry.detok.add(token), n_tokens=1)
                if row.completion_tokens >= entry.limit:
                    row.push(entry.detok.flush(), n_tokens=0)
                    row.finish("length")

    @staticmethod
    def _store(batch: _Batch, rows: Sequence[int]) -> None:
        """Store the KV of the batch's ``rows`` (positions) in the prefill cache, if it has one."""
        if batch.prefill is not None and rows:
            remember(batch.prefill, batch.live, rows, batch.mask, batch.cache)

    def _drop_done(self, batch: _Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Store and drop the rows that are done; returns the pending tokens of those left."""
        keep = [j for j, entry in enumerate(batch.live) if not entry.row.done]
        self._store(batch, [j for j in range(len(batch.live)) if j not in keep])
        if len(keep) == len(batch.live):
            return tokens
        batch.live = [batch.live[j] for j in keep]
        if not keep:
            return tokens[:0]
        index = torch.tensor(keep, device=self.device)  # (B',)
        batch.mask, batch.pos = batch.mask[index], batch.pos[index]  # (B', T) (B', 1+)
        batch.cache.batch_select_indices(index)
        if batch.generators is not None:
            batch.generators = [batch.generators[j] for j in keep]
        if batch.ctx.plan is not None:
            batch.ctx = ForwardContext(plan=batch.ctx.plan.select_rows(index))
        return tokens[index]

    def _join(
        self, batch: _Batch, tokens: torch.Tensor, group: JoinGroup, params: SamplingParams
    ) -> tuple[_Batch, torch.Tensor]:
        """Prefill ``group``, choose its first tokens, append its live rows to ``batch``.

        Returns the batch that goes on (the group's own when ``batch`` had emptied) and its
        pending tokens.
        """
        new, logits = self._prefill(group, params)
        new_tokens = next_tokens(logits, params, new.generators)  # (b,)
        self._accept(new.live, new_tokens)
        new_tokens = self._drop_done(new, new_tokens)
        if not new.live:
            return batch, tokens
        if not batch.live:  # the batch had emptied: the group carries on alone
            return new, new_tokens
        if (batch.prefill is None) != (new.prefill is None):
            raise LoGoError("rows joining a batch must use the prefill cache as the batch does")
        counts = [len(batch.live), len(new.live)]
        batch.mask, batch.cache = concat_kv(
            [(batch.mask, batch.cache), (new.mask, new.cache)], config=self.model.config
        )
        batch.pos = torch.cat([batch.pos[:, -1:], new.pos[:, -1:]])  # (B + b, 1)
        plan = MixturePlan.concat([(batch.ctx.plan, counts[0]), (new.ctx.plan, counts[1])])
        batch.ctx = ForwardContext(plan=plan)
        if batch.generators is not None and new.generators is not None:
            batch.generators = [*batch.generators, *new.generators]
        batch.live = [*batch.live, *new.live]
        return batch, torch.cat([tokens, new_tokens])

    def forward(
        self,
        ctx: ForwardContext,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: DynamicCache | None,
        *,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One forward with ``ctx`` installed. Returns last-position logits (B, V), float32.

        ``keep``: a packed pass (``cache`` None, ``ctx.packed`` set), whose rows end at these
        positions (B,) of its one sequence.
        """
        kwargs = {} if cache is None else {self._cache_kwarg: cache}
        try:
            with torch.inference_mode(), forward_context(ctx):
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=pos,
                    use_cache=cache is not None,
                    logits_to_keep=1 if keep is None else keep,
                    **kwargs,
                )
        except LoGoError:
            raise
        except Exception as exc:
            raise GenerationError(f"generation failed inside the model: {exc!r}") from exc
        logits = (out.logits[:, -1, :] if keep is None else out.logits[0]).float()  # (B, V)
        # amax propagates NaN: one reduction catches NaN, +inf and rows that are all -inf.
        if not bool(torch.isfinite(logits.amax(dim=-1)).all()):
            raise NumericalError(
                "the model produced NaN or infinite logits (numerical overflow in the base model "
                "or the adapter mixture); nothing was generated from them"
            )
        return logits


ROOM = 256  # most free positions a decoding batch's KV keeps ahead (it regrows by this when full)


class RoomyLayer(DynamicLayer):
    """A growing cache block that appends into spare room instead of concatenating.

    transformers' ``DynamicLayer`` concatenates each step's keys and values to the whole cache,
    so every decoding step copies all of it (at 8 rows and 180 positions, about 66 MB per step on
    the 135M model). Here ``keys`` and ``values`` are views of buffers with ``room`` free
    positions after them, and a step writes only its own positions. Anything that sets ``keys``
    to another tensor (``crop``, transformers' own code, a batch rebuilt by the engine) is
    noticed by the next :meth:`update`, which then copies into new buffers.
    """

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self._k: torch.Tensor | None = None  # (B, H, capacity, d)
        self._v: torch.Tensor | None = None

    @classmethod
    def from_layer(cls, layer: DynamicLayer, room: int) -> RoomyLayer:
        """``layer``'s keys and values, moved into a buffer with room at the next update."""
        roomy = cls(room)
        if layer.is_initialized and layer.keys is not None and layer.values is not None:
            roomy.lazy_initialization(layer.keys, layer.values)
            roomy.keys, roomy.values = layer.keys, layer.values
        return roomy

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old_k, old_v = self.keys, self.values
        start = old_k.shape[-2] if old_k is not None and old_k.ndim == 4 else 0
        end = start + key_states.shape[-2]
        k, v = self._k, self._v
        if k is None or v is None or not self._holds(k, key_states.shape[:2], end):
            b, h, _, d = key_states.shape
            k = key_states.new_empty(b, h, end + self.room, d)  # (B, H, capacity, d)
            v = value_states.new_empty(b, h, end + self.room, value_states.shape[-1])
            if start and old_k is not None and old_v is not None:
                k[:, :, :start] = old_k
                v[:, :, :start] = old_v
            self._k, self._v = k, v
        k[:, :, start:end] = key_states
        v[:, :, start:end] = value_states
        self.keys, self.values = k[:, :, :end], v[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices``, and their room."""
        k, v, keys = self._k, self._v, self.keys
        if k is None or v is None or keys is None or not self._holds(k, keys.shape[:2], 0):
            super().batch_select_indices(indices)
            return
        end = keys.shape[-2]
        self._k, self._v = k[indices], v[indices]
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]

    def _holds(self, buffer: torch.Tensor, rows_heads: torch.Size, end: int) -> bool:
        """``keys`` starts ``buffer``, which has their rows and heads and room up to ``end``."""
        keys = self.keys
        return (
            keys is not None
            and keys.ndim == 4
            and keys.data_ptr() == buffer.data_ptr()
            and keys.stride() == buffer.stride()
            and keys.shape[:2] == rows_heads == buffer.shape[:2]
            and end <= buffer.shape[2]
        )


def make_room(cache: DynamicCache, room: int) -> None:
    """Make ``cache``'s plain growing blocks :class:`RoomyLayer` with ``room`` free positions.

    Blocks already roomy keep theirs (they regrow by ``room`` when full); other layer types
    (sliding windows, quantized caches) are left as they are.
    """
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = RoomyLayer.from_layer(layer, room)
        elif isinstance(layer, RoomyLayer):
            layer.room = max(layer.room, room)


def remember(
    prefill: CacheUse,
    live: Sequence[_Live],
    leaving: Sequence[int],
    mask: torch.Tensor,
    cache: DynamicCache,
) -> None:
    """Store the KV of the live rows ``leaving`` (batch positions) in the prefill cache.

    A row's KV covers its prompt and the tokens fed back so far (its last chosen token was never
    fed); ``mask`` (B, T) and ``cache`` are the batch as it stands.
    """
    with torch.inference_mode():
        for j in leaving:
            entry = live[j]
            tokens = [*entry.ids, *entry.gen[: entry.fed]]
            keys, values = row_kv(cache, mask, j, len(tokens), depth=len(cache.layers))
            stored = PrefixEntry(
                tokens=torch.tensor(tokens, dtype=torch.long),
                keys=keys,
                values=values,
            )
            prefill.cache.insert(entry.space, stored, epoch=prefill.epoch)

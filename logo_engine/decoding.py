"""The engine's own decode loop: left-padded batches, KV cache, greedy or seeded sampling.

:class:`TransformersDecoder` generates for a batch of token-id rows with one
:class:`~logo_engine.mixture.MixturePlan` installed (each row may carry its own mixture), pushing
text into one :class:`~logo_engine.base.RowState` per row and yielding once per step, so callers
(streams, async, servers) can interleave, cancel or stop between tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from logo_engine.base import RowState, SamplingParams
from logo_engine.errors import GenerationError, LoGoError, NumericalError
from logo_engine.mixture import ForwardContext, MixturePlan, forward_context
from logo_engine.prefix_cache import CacheUse, PrefixEntry, prefix_batch, row_kv


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
        input_ids: Sequence[Sequence[int]],
        plan: MixturePlan | None,
        params: SamplingParams,
        rows: list[RowState],
        prefill: CacheUse | None = None,
    ) -> Iterator[None]:
        """Generate for every row with ``plan`` installed; yield after each step.

        Rows that are done (end of turn, stop string, their own limit, or finished by the caller
        between steps, e.g. a cancelled request) are dropped from the batch before the next step:
        their KV cache, mask, generator and mixture rows go, the other rows decode as before.

        With ``prefill`` (the prefill cache, and each row's mixture as its space), rows that
        extend a cached prefix of their mixture prefill only their new tokens, and each row's KV
        (prompt and the generated tokens fed back) is stored when it leaves the batch (a stream
        closed early stores nothing for its rows still running).
        """
        ctx = ForwardContext(plan=plan)
        if prefill is not None and prefill.cache.enabled:
            hits = [
                prefill.cache.lookup(space, row, epoch=prefill.epoch)
                for space, row in zip(prefill.spaces, input_ids, strict=True)
            ]
            batch = prefix_batch(
                input_ids,
                hits,
                pad_id=self.tokenizer.pad_token_id,
                config=self.model.config,
                device=self.device,
            )
            ids, mask, pos, cache = batch.input_ids, batch.mask, batch.positions, batch.cache
            for row, reused in zip(rows, batch.reused, strict=True):
                row.cached_tokens = reused
        else:
            prefill = None
            ids, mask = left_pad(self.tokenizer, input_ids, self.device)
            pos = positions(mask)
            cache = DynamicCache(config=self.model.config)
        generators = make_generators(params, len(rows), self.device)
        # per live row: its state, detokenizer, index in ``input_ids`` and the tokens it chose
        live: list[tuple[RowState, Detokenizer, int, list[int]]] = [
            (row, Detokenizer(self.tokenizer), i, []) for i, row in enumerate(rows)
        ]
        fed = 0  # decode forwards after the prefill: every live row was fed each one
        logits = self.forward(ctx, ids, mask, pos, cache)
        for step in range(params.max_new_tokens):
            tokens = next_tokens(logits, params, generators)  # (B,)
            for (row, detok, _, gen), token in zip(live, tokens.tolist(), strict=True):
                if row.done:
                    continue
                gen.append(token)
                if token in self.eos_ids:
                    row.push(detok.flush(), n_tokens=1)
                    row.finish("stop")
                else:
                    row.push(detok.add(token), n_tokens=1)
                    if row.at_limit:  # a row with a shorter limit than the run's
                        row.push(detok.flush(), n_tokens=0)
                        row.finish("length")
            last = step == params.max_new_tokens - 1
            if last:
                for row, detok, *_ in live:
                    row.push(detok.flush(), n_tokens=0)
            yield
            keep = [j for j, (row, *_) in enumerate(live) if not row.done]
            if prefill is not None:  # rows leaving the batch: store their KV first
                leaving = [j for j in range(len(live)) if last or j not in keep]
                remember(prefill, input_ids, live, leaving, fed, mask, cache)
            if last or not keep:
                return
            if len(keep) < len(live):  # prune the finished rows
                index = torch.tensor(keep, device=self.device)  # (B',)
                live = [live[j] for j in keep]
                tokens, mask, pos = tokens[index], mask[index], pos[index]  # (B',) (B', T) (B', 1+)
                cache.batch_select_indices(index)
                if generators is not None:
                    generators = [generators[j] for j in keep]
                if ctx.plan is not None:
                    ctx = ForwardContext(plan=ctx.plan.select_rows(index))
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (B, T+1)
            pos = pos[:, -1:] + 1  # (B, 1)
            logits = self.forward(ctx, tokens[:, None], mask, pos, cache)
            fed += 1

    def forward(
        self,
        ctx: ForwardContext,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """One forward with ``ctx`` installed. Returns last-position logits (B, V), float32."""
        try:
            with torch.inference_mode(), forward_context(ctx):
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=pos,
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_kwarg: cache},
                )
        except LoGoError:
            raise
        except Exception as exc:
            raise GenerationError(f"generation failed inside the model: {exc!r}") from exc
        logits = out.logits[:, -1, :].float()  # (B, V)
        # amax propagates NaN: one reduction catches NaN, +inf and rows that are all -inf.
        if not bool(torch.isfinite(logits.amax(dim=-1)).all()):
            raise NumericalError(
                "the model produced NaN or infinite logits (numerical overflow in the base model "
                "or the adapter mixture); nothing was generated from them"
            )
        return logits


def remember(
    prefill: CacheUse,
    input_ids: Sequence[Sequence[int]],
    live: Sequence[tuple[RowState, Detokenizer, int, list[int]]],
    leaving: Sequence[int],
    fed: int,
    mask: torch.Tensor,
    cache: DynamicCache,
) -> None:
    """Store the KV of the live rows ``leaving`` (batch positions) in the prefill cache.

    A row's KV covers its prompt and the ``fed`` tokens fed back so far (its last chosen token
    was never fed); ``mask`` (B, T) and ``cache`` are the batch as it stands.
    """
    with torch.inference_mode():
        for j in leaving:
            _, _, i, gen = live[j]
            tokens = [*input_ids[i], *gen[:fed]]
            keys, values = row_kv(cache, mask, j, len(tokens), depth=len(cache.layers))
            entry = PrefixEntry(
                tokens=torch.tensor(tokens, dtype=torch.long),
                keys=keys,
                values=values,
            )
            prefill.cache.insert(prefill.spaces[i], entry, epoch=prefill.epoch)

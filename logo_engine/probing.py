"""The probe pass: a base-only forward that stops at the probed module, with its prefix cache.

No adapter is active in the probe, so the keys and values it computes are the base model's own
and any later prompt that extends a probed one can reuse them (see
:mod:`logo_engine.prefix_cache`). A cached probe runs only the new tokens, over the cached KV of
the blocks below the probe point, and takes the prefix's captured inputs from the cache: the
captured tensor it returns has the layout of one uncached left-padded pass over the whole
prompts, so what routing does with it does not change. Several rows run as one packed pass (their
new tokens end to end, no padding; see :mod:`logo_engine.packing`) on models that take them.

The probe may run in a lower precision than generation (``LoGoEngine(probe_dtype=...)``): the
prober then holds its own copy of the model in that dtype (:func:`cast_copy`), with its own
hooks, and only the probed states come back in the model's dtype for scoring. On AMX CPUs and
GPUs a bfloat16 probe takes about half the time of a float32 one (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logo_engine.decoding import cache_kwarg
from logo_engine.errors import GenerationError
from logo_engine.mixture import ForwardContext, HookSet, ProbeDone, forward_context, strip_hooks
from logo_engine.packing import PackedPass, packs_rows
from logo_engine.prefix_cache import (
    PrefixCache,
    PrefixEntry,
    PrefixHit,
    filled_depth,
    prefix_batch,
    row_kv,
)


@dataclass(frozen=True)
class ProbeCapture:
    """What one probe pass captured.

    ``captured`` (B, T, in) and ``mask`` (B, T) are laid out as one left-padded pass over the
    whole prompts; ``reused`` counts per row the tokens whose KV came from the cache.
    """

    captured: torch.Tensor  # (B, T, in)
    mask: torch.Tensor  # (B, T)
    reused: list[int]


def cast_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A copy of ``model`` whose floating-point parameters are in ``dtype``, without LoGo hooks.

    Only the cast parameters are allocated (the original is never copied at its own precision);
    tied parameters stay tied, and buffers (rotary frequencies) keep their dtype, as transformers
    computes them in float32 anyway.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():  # a tied parameter is listed once: it stays shared
        if param.is_floating_point():
            memo[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
    with torch.no_grad():
        clone = copy.deepcopy(model, memo)
    strip_hooks(clone)  # the original's hooks belong to engines on the original
    clone.config.dtype = dtype
    return clone.eval()


class Prober:
    """Runs probe passes on one model, through a probe prefix cache.

    ``model`` may be the generating model itself or a copy of it in another dtype
    (:func:`cast_copy`). The prober claims the hooks its passes need on it (block inputs, the
    probed Linears, packed attention) in ``hooks``, which its engine removes when it closes.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layers: nn.ModuleList,
        cache: PrefixCache,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layers = layers
        self.cache = cache
        self.device = next(model.parameters()).device
        self._cache_kwarg = cache_kwarg(model)
        self._linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.hooks = HookSet(model)
        self.hooks.attach_layers(layers)
        self.hooks.attach_packing(model)

    def attach(self, modules: Sequence[str]) -> None:
        """Hook the Linears ``modules`` (full names) so that a probe can stop at any of them."""
        self.hooks.attach_linears(self._linears, modules)

    def capture(
        self,
        ids: Sequence[Sequence[int]],
        *,
        layer: int,
        module: str,
        probe_input: str,
        use_cache: bool = True,
    ) -> ProbeCapture:
        """The probed input at every prompt token of every row.

        A row whose every token is cached (a repeat, or the start of a longer cached prompt)
        runs nothing: the probed input at token j depends on tokens 0..j only. The other rows
        run their new tokens in one pass, and are stored. ``use_cache=False`` neither reads
        nor stores (calibration's many one-off prompts would only evict conversations).
        """
        ctx = ForwardContext()
        if probe_input == "residual":
            ctx.probe_layer = self.layers[layer]
        else:
            ctx.probe_module = module
        epoch = self.cache.epoch
        rows: list[torch.Tensor | None] = [None] * len(ids)  # per row: (len(row), in)
        reused = [0] * len(ids)
        space: Hashable | None = None  # None: neither read nor store
        hits: list[PrefixHit | None] = [None] * len(ids)
        if use_cache and self.cache.enabled:
            space = (probe_input, layer, module if probe_input == "module" else "")
            hits = [self.cache.lookup(space, row, epoch=epoch, limit=len(row)) for row in ids]
            for i, (row, hit) in enumerate(zip(ids, hits, strict=True)):
                if hit is not None and hit.length == len(row) and hit.entry.captured is not None:
                    rows[i] = hit.entry.captured[: len(row)]  # probed before: nothing to run
                    reused[i] = len(row)
        todo = [i for i, r in enumerate(rows) if r is None]
        if todo:
            todo_ids, todo_hits = [ids[i] for i in todo], [hits[i] for i in todo]
            ran = self._run(ctx, module, todo_ids, todo_hits, space, epoch)
            for i, (row_captured, n) in zip(todo, ran, strict=True):
                rows[i], reused[i] = row_captured, n
        width = max(len(r) for r in ids)
        with torch.inference_mode():
            first = next(r for r in rows if r is not None)
            captured = first.new_zeros(len(ids), width, first.shape[-1])  # (B, T, in)
            mask = torch.zeros(len(ids), width, dtype=torch.long)  # (B, T)
            for i, full in enumerate(rows):
                if full is None:
                    raise GenerationError(f"the probe captured nothing for row {i}")
                captured[i, width - len(full) :] = full
                mask[i, width - len(full) :] = 1
        return ProbeCapture(captured, mask.to(self.device), reused)

    def _run(
        self,
        ctx: ForwardContext,
        module: str,
        ids: Sequence[Sequence[int]],
        hits: Sequence[PrefixHit | None],
        space: Hashable | None,
        epoch: int,
    ) -> list[tuple[torch.Tensor, int]]:
        """Probe ``ids`` over their cached prefixes and store them; per row (captured, reused).

        ``space`` None: store nothing (an uncached probe).
        """
        if packs_rows(self.model, len(ids)):
            return self._run_packed(ctx, module, ids, hits, space, epoch)
        batch = prefix_batch(
            ids,
            hits,
            pad_id=self.tokenizer.pad_token_id,
            config=self.model.config,
            device=self.device,
        )
        new = self._forward(  # (b, N, in): the probed input at the new tokens only
            ctx, module, batch.input_ids, batch.mask, batch.positions, batch.cache
        )
        out = []
        with torch.inference_mode():
            depth = filled_depth(batch.cache, batch.mask.shape[1])  # blocks the pass ran
            for j, (row, hit) in enumerate(zip(ids, hits, strict=True)):
                n_new = len(row) - batch.reused[j]
                full = new[j, new.shape[1] - n_new :]  # (n_new, in)
                full = self._full(full, hit, copy=len(ids) > 1)
                out.append((full, batch.reused[j]))
                if depth > 0 and space is not None:  # block 0: no KV below it to reuse
                    keys, values = row_kv(batch.cache, batch.mask, j, len(row), depth)
                    self._store(space, row, keys, values, full, epoch)
        return out

    def _run_packed(
        self,
        ctx: ForwardContext,
        module: str,
        ids: Sequence[Sequence[int]],
        hits: Sequence[PrefixHit | None],
        space: Hashable | None,
        epoch: int,
    ) -> list[tuple[torch.Tensor, int]]:
        """:meth:`_run` as one packed pass (see :mod:`logo_engine.packing`): no padding."""
        packed = ctx.packed = PackedPass(ids, hits, device=self.device)
        new = self._forward(  # (1, N, in): the probed input at every row's new tokens
            ctx, module, packed.input_ids, packed.mask, packed.positions, None
        )
        out = []
        with torch.inference_mode():
            depth = packed.depth
            for j, (row, hit) in enumerate(zip(ids, hits, strict=True)):
                start, end = packed.bounds[j]
                full = self._full(new[0, start:end], hit, copy=True)
                out.append((full, packed.reused[j]))
                if depth > 0 and space is not None:  # block 0: no KV below it to reuse
                    keys, values = packed.row_kv(j, depth)
                    self._store(space, row, keys, values, full, epoch)
        return out

    @staticmethod
    def _full(new: torch.Tensor, hit: PrefixHit | None, *, copy: bool) -> torch.Tensor:
        """A row's captured inputs (len(row), in): its cached prefix's, then the new ``new``.

        ``copy``: a view would keep the whole batch alive in the cache.
        """
        if hit is not None and hit.entry.captured is not None:
            return torch.cat([hit.entry.captured[: hit.length], new])
        return new.clone() if copy else new

    def _store(
        self,
        space: Hashable,
        row: Sequence[int],
        keys: tuple[torch.Tensor, ...],
        values: tuple[torch.Tensor, ...],
        captured: torch.Tensor,
        epoch: int,
    ) -> None:
        entry = PrefixEntry(
            tokens=torch.tensor(row, dtype=torch.long),
            keys=keys,
            values=values,
            captured=captured,
        )
        self.cache.insert(space, entry, epoch=epoch)

    def _forward(
        self,
        ctx: ForwardContext,
        module: str,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """Run the model with ``ctx`` until the probe hook stops it; the captured input."""
        kwargs = {} if cache is None else {self._cache_kwarg: cache}
        try:
            with torch.inference_mode(), forward_context(ctx):
                self.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=pos,
                    use_cache=cache is not None,
                    **kwargs,
                )
        except ProbeDone:
            pass
        except Exception as exc:
            raise GenerationError(f"the probe forward failed: {exc!r}") from exc
        if ctx.captured is None:
            raise GenerationError(f"the probe never reached {module!r}")
        return ctx.captured

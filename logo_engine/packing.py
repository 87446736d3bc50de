"""Packed prompt passes: the new tokens of several rows end to end in one sequence, no padding.

A batch of prompts left-padded to its longest row computes every padded position in every
linear layer: about a third of the work of a batch of 8 zoo prompts (48 tokens on average, 67 at
most). Linear layers treat tokens one by one, so the rows' new tokens can run as one sequence
(1, N); only attention must keep the rows apart. The attention function registered here does
that: each row's queries attend to its own cached prefix and, causally, to its own new tokens,
through the ``sdpa`` function of transformers, exactly as one unpadded row does. The mixture hooks
apply each row's own factors to its own tokens (``ForwardContext.packed``).

A packed pass keeps no cache object: the attention function records each block's new keys and
values, and :meth:`PackedPass.padded` lays them out, after each row's cached prefix, as the
left-padded batch the decode loop continues (:meth:`PackedPass.row_kv`: one row, for the prefix
caches). Decoding steps stay padded batches: one token per row wastes nothing there.

Packing is switched on per model by :func:`switch` (the engine's hooks claim it, see
``HookSet.attach_packing``): the model's attention implementation becomes ``logo_sdpa``, which is
``sdpa`` itself outside a packed pass. Models on another attention implementation, or with a cache
other than plain growing KV (sliding windows), keep padded passes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from logo_engine.errors import GenerationError
from logo_engine.mixture import current_context
from logo_engine.prefix_cache import PrefixHit, cacheable

ATTENTION = "logo_sdpa"

_REGISTER_LOCK = threading.Lock()
_registered = False


def _register() -> None:
    global _registered
    with _REGISTER_LOCK:
        if not _registered:
            AttentionInterface.register(ATTENTION, _attention)
            AttentionMaskInterface.register(ATTENTION, sdpa_mask)
            _registered = True


class _AttentionSwitch:
    """The handle of a model switched to packed attention; ``remove`` switches it back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        model.set_attn_implementation(ATTENTION)  # type: ignore[operator]

    def remove(self) -> None:
        if packs(self.model):
            self.model.set_attn_implementation("sdpa")  # type: ignore[operator]


def can_pack(model: nn.Module) -> bool:
    """Whether ``model`` can take packed passes: ``sdpa`` attention and plain growing KV."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and getattr(config, "_attn_implementation", None) in ("sdpa", ATTENTION)
        and hasattr(model, "set_attn_implementation")
        and cacheable(config)
    )


def switch(model: nn.Module) -> _AttentionSwitch:
    """Switch ``model`` to packed attention (check :func:`can_pack` first)."""
    _register()
    return _AttentionSwitch(model)


def packs(model: nn.Module) -> bool:
    """Whether ``model`` runs packed passes now (an engine on it switched it)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == ATTENTION


def packs_rows(model: nn.Module, n_rows: int) -> bool:
    """Whether a pass over ``n_rows`` rows runs packed (a single row has no padding to save)."""
    return n_rows > 1 and packs(model)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    ctx = current_context()
    if ctx is None or ctx.packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return ctx.packed.attend(module, query, key, value, **kwargs)


class PackedPass:
    """Rows ``ids`` continuing ``hits`` (None: nothing cached), their new tokens end to end.

    Row i's new tokens are positions ``bounds[i]`` of ``input_ids`` (1, N); ``positions`` count
    each row's own tokens, after its cached prefix.
    """

    def __init__(
        self,
        ids: Sequence[Sequence[int]],
        hits: Sequence[PrefixHit | None],
        *,
        device: torch.device,
    ) -> None:
        self.hits = list(hits)
        self.reused = [0 if h is None else h.length for h in hits]
        news = [list(row[n:]) for row, n in zip(ids, self.reused, strict=True)]
        if any(not row for row in news):
            raise GenerationError("a packed pass needs at least one new token in every row")
        self.bounds: list[tuple[int, int]] = []
        end = 0
        for row in news:
            self.bounds.append((end, end + len(row)))
            end += len(row)
        flat = [token for row in news for token in row]
        self.input_ids = torch.tensor([flat], dtype=torch.long, device=device)  # (1, N)
        self.positions = torch.cat(
            [torch.arange(p, p + len(row)) for p, row in zip(self.reused, news, strict=True)]
        )[None].to(device)  # (1, N)
        self.last = torch.tensor([e - 1 for _, e in self.bounds], device=device)  # (B,)
        # The pass's attention mask: transformers takes a 4-D mask as it is, so no (N, N) mask is
        # built; the packed attention keeps the rows apart by itself.
        self.mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
        self.keys: dict[int, torch.Tensor] = {}  # block -> (1, H, N, d), new tokens only
        self.values: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.bounds)

    @property
    def last_positions(self) -> torch.Tensor:
        """Position of each row's last token (B, 1)."""
        return self.positions[0, self.last][:, None]

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """Attention of block ``module.layer_idx``. query (1, Hq, N, d), key/value (1, H, N, d).

        Returns (1, N, Hq, d), as ``sdpa_attention_forward`` does.
        """
        layer = int(module.layer_idx)  # type: ignore[arg-type]
        self.keys[layer], self.values[layer] = key, value
        parts = []
        for i, (start, end) in enumerate(self.bounds):
            k, v = key[:, :, start:end], value[:, :, start:end]  # (1, H, n, d)
            mask = None  # no prefix: sdpa's causal kernel
            hit = self.hits[i]
            if hit is not None:
                past_k, past_v = self._past(hit, layer)  # (1, H, p, d)
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                n = end - start
                # (1, 1, n, p + n): new token j sees the prefix and new tokens 0..j
                mask = torch.ones(n, hit.length + n, dtype=torch.bool, device=k.device)
                mask = mask.tril(hit.length)[None, None]
            out, _ = sdpa_attention_forward(module, query[:, :, start:end], k, v, mask, **kwargs)
            parts.append(out)  # (1, n, Hq, d)
        return torch.cat(parts, dim=1), None

    @staticmethod
    def _past(hit: PrefixHit, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer >= hit.entry.depth:
            raise GenerationError(
                f"a cached prefix holds {hit.entry.depth} blocks; block {layer} has no keys"
            )
        keys = hit.entry.keys[layer][None, :, : hit.length]  # (1, H, p, d), a view
        values = hit.entry.values[layer][None, :, : hit.length]
        return keys, values

    @property
    def depth(self) -> int:
        """Number of leading blocks the pass ran (a probe stops before its block)."""
        depth = 0
        while depth in self.keys:
            depth += 1
        return depth

    def row_kv(
        self, row: int, depth: int
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Row ``row``'s keys and values (H, p + n, d) of blocks 0..depth-1: prefix, then new.

        Copies: an entry never keeps the whole pass alive.
        """
        start, end = self.bounds[row]
        hit = self.hits[row]
        keys, values = [], []
        for layer in range(depth):
            k = self.keys[layer][0, :, start:end]  # (H, n, d)
            v = self.values[layer][0, :, start:end]
            if hit is not None:
                past_k, past_v = self._past(hit, layer)
                k, v = torch.cat([past_k[0], k], dim=1), torch.cat([past_v[0], v], dim=1)
            else:
                k, v = k.clone(), v.clone()
            keys.append(k)
            values.append(v)
        return tuple(keys), tuple(values)

    def padded(self, config: PretrainedConfig) -> tuple[torch.Tensor, DynamicCache]:
        """Every row's prefix and new tokens left-padded into one batch: mask (B, L), cache.

        Row i fills the last ``reused[i] + n_i`` positions of its row; the rest is zero keys and
        values under a zero mask, as :func:`~logo_engine.prefix_cache.concat_kv` pads.
        """
        totals = [p + end - start for p, (start, end) in zip(self.reused, self.bounds, strict=True)]
        width = max(totals)
        device = self.input_ids.device
        mask = torch.zeros(len(self), width, dtype=torch.long, device=device)  # (B, L)
        for i, total in enumerate(totals):
            mask[i, width - total :] = 1
        data = []
        for layer in range(self.depth):
            new_k, new_v = self.keys[layer][0], self.values[layer][0]  # (H, N, d)
            shape = (len(self), new_k.shape[0], width, new_k.shape[-1])
            keys, values = new_k.new_zeros(shape), new_v.new_zeros(shape)  # (B, H, L, d)
            for i, (start, end) in enumerate(self.bounds):
                n = end - start
                keys[i, :, width - n :] = new_k[:, start:end]
                values[i, :, width - n :] = new_v[:, start:end]
                hit = self.hits[i]
                if hit is not None:
                    past_k, past_v = self._past(hit, layer)
                    keys[i, :, width - n - hit.length : width - n] = past_k[0]
                    values[i, :, width - n - hit.length : width - n] = past_v[0]
            data.append((keys, values))
        return mask, DynamicCache(ddp_cache_data=data, config=config)

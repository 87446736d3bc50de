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

The probe may also be compiled (``LoGoEngine(probe_compile=True)``). The hooked pass cannot be:
it stops the model's forward with an exception raised in a hook, and its hooks read the call's
context from a ``ContextVar``, and ``torch.compile`` breaks its graph at both, in every block.
A compiled prober runs :class:`BlockLoop` instead: the same modules (embedding, rotary
embedding, causal mask, the blocks below the probed one, then the probed block's input norm)
called by a loop of its own on a hook-free copy of the model, which compiles to one graph. It
applies to Llama-style decoders (checked against the model's own forward when built) and to
the probe targets that read a block's input: ``q_proj``, ``k_proj``, ``v_proj`` or the
residual stream.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logo_engine.decoding import cache_kwarg
from logo_engine.errors import GenerationError, InvalidRequestError, RoutingConfigError
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


def compile_probe(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """How ``probe_compile=True`` compiles :class:`BlockLoop`'s pass (tests swap in ``fn``)."""
    return torch.compile(fn, dynamic=True)


class BlockLoop:
    """A hook-free probe pass over a Llama-style decoder's blocks, compiled (see the module).

    ``model`` must carry no LoGo hook (a :func:`cast_copy`). Built only if the model is one this
    loop reproduces: a decoder (``get_decoder()``) with ``embed_tokens``, ``rotary_emb`` and
    blocks that take the block input through ``input_layernorm`` into ``self_attn``, with full
    causal attention in every block; the loop's block inputs are then checked against the
    model's own forward on a few tokens. Otherwise :class:`InvalidRequestError` says what is
    missing or that the two differ.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        layers: nn.ModuleList,
        compiler: Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]],
    ) -> None:
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        missing = [
            what
            for what, ok in (
                ("get_decoder()", decoder is not None),
                ("embed_tokens", hasattr(decoder, "embed_tokens")),
                ("rotary_emb", hasattr(decoder, "rotary_emb")),
                ("blocks under decoder.layers", getattr(decoder, "layers", None) is layers),
                (
                    "input_layernorm and self_attn in every block",
                    all(hasattr(b, "input_layernorm") and hasattr(b, "self_attn") for b in layers),
                ),
            )
            if not ok
        ]
        kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            missing.append(f"full attention in every block (this model has {sorted(kinds)})")
        if missing:
            raise InvalidRequestError(
                f"probe_compile=True runs the probe as a loop over a Llama-style decoder's "
                f"blocks; {type(model).__name__} lacks: {', '.join(missing)}"
            )
        if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
            model.set_attn_implementation("sdpa")  # packed attention reads the call's context
        self.model = model
        self.layers = layers
        self._decoder: Any = decoder
        self._check()
        self._pass = compiler(self._blocks)

    @staticmethod
    def fit(hit: PrefixHit | None, n_tokens: int) -> PrefixHit | None:
        """``hit`` trimmed to the shapes :meth:`Prober.warm_up` compiles for.

        A compiled graph specializes a size of 1 (one row, one cached token, one new token):
        each such shape compiles a graph of its own, for minutes, and ``warm_up`` compiles one
        row but not the other two. So a partial hit keeps at least 2 cached and 2 new tokens, or
        is dropped; a whole-prompt hit runs nothing and is kept.
        """
        if hit is None or hit.length == n_tokens:
            return hit
        length = min(hit.length, n_tokens - 2)
        return PrefixHit(hit.entry, length) if length >= 2 else None

    def supports(self, layer: int, module: nn.Module | None) -> bool:
        """Whether the loop reads ``module``'s input in block ``layer`` (None: block input)."""
        if module is None:
            return True
        attention = self.layers[layer].self_attn
        return any(getattr(attention, n, None) is module for n in ("q_proj", "k_proj", "v_proj"))

    def __call__(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        *,
        layer: int,
        norm: bool,
    ) -> torch.Tensor:
        """Block ``layer``'s input (normed by its ``input_layernorm`` if ``norm``) at every token.

        ``cache`` (a ``DynamicCache``) holds the prefix's keys and values and takes the new ones
        of blocks 0..layer-1, as the hooked pass leaves it.
        """
        try:
            with torch.inference_mode():
                return self._pass(input_ids, mask, positions, cache, layer, norm)
        except Exception as exc:
            raise GenerationError(f"the compiled probe failed: {exc!r}") from exc

    def _blocks(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        layer: int,
        norm: bool,
    ) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        decoder = self._decoder
        h = decoder.embed_tokens(input_ids)
        causal = create_causal_mask(
            config=self.model.config,
            inputs_embeds=h,
            attention_mask=mask,
            cache=cache,
            position_ids=positions,
        )
        rotary = decoder.rotary_emb(h, position_ids=positions)
        for block in self.layers[:layer]:
            h = block(
                h,
                attention_mask=causal,
                position_ids=positions,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=rotary,
            )
        norm_in: Any = self.layers[layer].input_layernorm
        return norm_in(h) if norm else h

    def _check(self) -> None:
        """Refuse a model whose block inputs this loop does not reproduce (8 tokens, eagerly).

        The reference is the model's own forward, read by a plain hook on its last block
        (not ``output_hidden_states``: that installs hooks of transformers' own which read a
        ``ContextVar`` at every block, and so break the compiled graph).
        """
        n = len(self.layers)
        device = next(self.model.parameters()).device
        ids = torch.arange(1, 9, device=device).unsqueeze(0) % self.model.config.vocab_size
        mask, positions = torch.ones_like(ids), torch.arange(8, device=device).unsqueeze(0)
        seen: list[torch.Tensor] = []
        handle = self.layers[n - 1].register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        try:
            with torch.inference_mode():
                ours = self._blocks(ids, mask, positions, None, n - 1, False)
                self.model(input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()
        if not seen or not torch.allclose(ours.float(), seen[0].float(), rtol=1e-3, atol=1e-3):
            raise InvalidRequestError(
                f"probe_compile=True runs the probe as a loop over the decoder's blocks, and on "
                f"{type(self.model).__name__} that loop does not reproduce the model's own block "
                "inputs; probe without probe_compile"
            )


@dataclass(frozen=True)
class _Store:
    """Where a probe pass stores its rows: a cache, the probe setting's space, the epoch read."""

    cache: PrefixCache
    space: Hashable
    epoch: int

    def put(
        self,
        row: Sequence[int],
        keys: tuple[torch.Tensor, ...],
        values: tuple[torch.Tensor, ...],
        captured: torch.Tensor,
    ) -> None:
        entry = PrefixEntry(
            tokens=torch.tensor(row, dtype=torch.long), keys=keys, values=values, captured=captured
        )
        self.cache.insert(self.space, entry, epoch=self.epoch)


class Prober:
    """Runs probe passes on one model, through a probe prefix cache.

    ``model`` may be the generating model itself or a copy of it in another dtype
    (:func:`cast_copy`). The prober claims the hooks its passes need on it (block inputs, the
    probed Linears, packed attention) in ``hooks``, which its engine removes when it closes.
    ``compiled``: ``model`` is a hook-free copy and every pass runs a compiled
    :class:`BlockLoop` (no hook is claimed; rows are padded, not packed).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layers: nn.ModuleList,
        cache: PrefixCache,
        *,
        compiled: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layers = layers
        self.cache = cache
        self.device = next(model.parameters()).device
        self._cache_kwarg = cache_kwarg(model)
        self._linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.hooks = HookSet(model)
        self.loop = BlockLoop(model, layers, compile_probe) if compiled else None
        if self.loop is None:
            self.hooks.attach_layers(layers)
            self.hooks.attach_packing(model)

    def attach(self, modules: Sequence[str]) -> None:
        """Hook the Linears ``modules`` (full names) so that a probe can stop at any of them."""
        if self.loop is None:
            self.hooks.attach_linears(self._linears, modules)

    def check_target(self, layer: int, module: str, probe_input: str) -> None:
        """Refuse a probe target a compiled prober cannot read (see :class:`BlockLoop`).

        The engine calls this wherever it resolves a probe target (``_probe_target``: every
        probe, ``warm_up``), so the prober's own passes do not check again.
        """
        if self.loop is None:
            return
        target = None if probe_input == "residual" else self._linears[module]
        if not self.loop.supports(layer, target):
            raise RoutingConfigError(
                f"probe_compile=True probes the input of a block: probe_module 'q_proj', "
                f"'k_proj' or 'v_proj', or probe_input='residual'; {module!r} reads another "
                "tensor (route with one of those, or use an engine without probe_compile)"
            )

    def warm_up(self, layer: int, module: str, probe_input: str) -> None:
        """Compile the loop for this probe target now rather than at the first calls.

        Runs each shape class a call meets (one row and two rows, over an empty and over a cached
        prefix) on made-up tokens, through a cache of its own: the prober's cache is untouched.
        No-op for a prober that is not compiled. The target is one :meth:`check_target` passed.
        """
        if self.loop is None:
            return
        vocab = int(self.model.config.vocab_size)
        for n_rows in (1, 2):
            scratch = PrefixCache(2**26)  # its own per batch size: no row is found cached
            # unequal rows (padding), and no two sizes alike: compiling with sizes that happen
            # to be equal would specialize the graph to them
            lengths = [27 + 4 * i for i in range(n_rows)]
            rows = [[(11 * i + 7 * j + 3) % vocab for j in range(n)] for i, n in enumerate(lengths)]
            for cut in (10, None):  # a first pass, then one extending it
                ids = [row[:cut] for row in rows]
                self.capture(
                    ids, layer=layer, module=module, probe_input=probe_input, cache=scratch
                )

    def has_probed(self, row: Sequence[int], *, layer: int, module: str, probe_input: str) -> bool:
        """Whether the probe of ``row`` would run nothing (every token's input is cached)."""
        cache = self.cache
        if not cache.enabled:
            return False
        space = _probe_space(layer, module, probe_input)
        return _whole(cache.lookup(space, row, epoch=cache.epoch, limit=len(row)), row) is not None

    def capture(
        self,
        ids: Sequence[Sequence[int]],
        *,
        layer: int,
        module: str,
        probe_input: str,
        use_cache: bool = True,
        cache: PrefixCache | None = None,
    ) -> ProbeCapture:
        """The probed input at every prompt token of every row.

        A row whose every token is cached (a repeat, or the start of a longer cached prompt)
        runs nothing: the probed input at token j depends on tokens 0..j only. The other rows
        run their new tokens in one pass, and are stored. ``use_cache=False`` neither reads
        nor stores (calibration's many one-off prompts would only evict conversations);
        ``cache`` replaces the prober's own cache for this call (:meth:`warm_up`).
        """
        cache = self.cache if cache is None else cache
        ctx = ForwardContext()
        if probe_input == "residual":
            ctx.probe_layer = self.layers[layer]
        else:
            ctx.probe_module = module
        epoch = cache.epoch
        rows: list[torch.Tensor | None] = [None] * len(ids)  # per row: (len(row), in)
        reused = [0] * len(ids)
        space: Hashable | None = None  # None: neither read nor store
        hits: list[PrefixHit | None] = [None] * len(ids)
        if use_cache and cache.enabled:
            space = _probe_space(layer, module, probe_input)
            hits = [cache.lookup(space, row, epoch=epoch, limit=len(row)) for row in ids]
            if self.loop is not None:
                hits = [BlockLoop.fit(hit, len(row)) for row, hit in zip(ids, hits, strict=True)]
            for i, (row, hit) in enumerate(zip(ids, hits, strict=True)):
                whole = _whole(hit, row)
                if whole is not None:
                    rows[i] = whole  # probed before: nothing to run
                    reused[i] = len(row)
        todo = [i for i, r in enumerate(rows) if r is None]
        if todo:
            todo_ids, todo_hits = [ids[i] for i in todo], [hits[i] for i in todo]
            store = None if space is None else _Store(cache, space, epoch)
            ran = self._run(ctx, module, todo_ids, todo_hits, store, layer=layer)
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
        store: _Store | None,
        *,
        layer: int,
    ) -> list[tuple[torch.Tensor, int]]:
        """Probe ``ids`` over their cached prefixes and store them; per row (captured, reused).

        ``store`` None: store nothing (an uncached probe).
        """
        if self.loop is None and packs_rows(self.model, len(ids)):
            return self._run_packed(ctx, module, ids, hits, store)
        batch = prefix_batch(
            ids,
            hits,
            pad_id=self.tokenizer.pad_token_id,
            config=self.model.config,
            device=self.device,
        )
        if self.loop is not None:  # (b, N, in): the probed input at the new tokens only
            norm = ctx.probe_layer is None  # a Linear reads the block's normed input
            new = self.loop(
                batch.input_ids, batch.mask, batch.positions, batch.cache, layer=layer, norm=norm
            )
        else:
            new = self._forward(
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
                if depth > 0 and store is not None:  # block 0: no KV below it to reuse
                    keys, values = row_kv(batch.cache, batch.mask, j, len(row), depth)
                    store.put(row, keys, values, full)
        return out

    def _run_packed(
        self,
        ctx: ForwardContext,
        module: str,
        ids: Sequence[Sequence[int]],
        hits: Sequence[PrefixHit | None],
        store: _Store | None,
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
                if depth > 0 and store is not None:  # block 0: no KV below it to reuse
                    keys, values = packed.row_kv(j, depth)
                    store.put(row, keys, values, full)
        return out

    @staticmethod
    def _full(new: torch.Tensor, hit: PrefixHit | None, *, copy: bool) -> torch.Tensor:
        """A row's captured inputs (len(row), in): its cached prefix's, then the new ``new``.

        ``copy``: a view would keep the whole batch alive in the cache.
        """
        if hit is not None and hit.entry.captured is not None:
            return torch.cat([hit.entry.captured[: hit.length], new])
        return new.clone() if copy else new

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


def _probe_space(layer: int, module: str, probe_input: str) -> Hashable:
    """The probe cache's space of a probe target (a residual probe reads no module)."""
    return (probe_input, layer, module if probe_input == "module" else "")


def _whole(hit: PrefixHit | None, row: Sequence[int]) -> torch.Tensor | None:
    """The probed input of every token of ``row``, if ``hit`` holds it (nothing to run)."""
    if hit is None or hit.length != len(row) or hit.entry.captured is None:
        return None
    return hit.entry.captured[: len(row)]  # (len(row), in)

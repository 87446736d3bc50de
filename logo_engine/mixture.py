"""The mixed LoRA forward: per-call adapter mixtures applied by forward hooks.

Every adapted Linear of the base model carries one permanent forward hook. The hook reads the
:class:`ForwardContext` of the *current call* from a ``ContextVar`` (set around each model forward,
reset in ``finally``), so per-request weights never live in shared module state: concurrent calls
in other threads see their own context, and an exception leaves nothing installed.

A :class:`MixturePlan` holds, per module, the selected adapters in "cat" form, built once per
request and reused at every decoding step:

    a_cat = concat_i(A_i)              (k·r, in)     or per row (B, k·r, in)
    b_cat = concat_i(w_i · s_i · B_i)  (out, k·r)    or per row (B, out, k·r)
    y = W x + b_cat @ (a_cat @ x)      == W x + Σ_i w_i s_i B_i A_i x   (exact)
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from logo_engine.errors import LoGoError
from logo_engine.library import AdapterLibrary, ModuleStack
from logo_engine.types import Selection

if TYPE_CHECKING:
    from logo_engine.packing import PackedPass


@dataclass(frozen=True)
class ModuleMixture:
    """The selected adapters of one module in cat form (see module docstring)."""

    a_cat: torch.Tensor  # (k·r, in) shared by all rows, or (B, k·r, in)
    b_cat: torch.Tensor  # (out, k·r) or (B, out, k·r); weights and scaling folded in

    def add_to(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        segments: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """math: out += b_cat @ a_cat @ x.    x (B, T, in), out (B, T, out), in place.

        ``segments``: x is a packed pass (1, N, in) whose row i is tokens ``segments[i]``.
        """
        if self.a_cat.ndim == 2:
            z = x.reshape(-1, x.shape[-1]) @ self.a_cat.T  # (B·T, k·r)
            out.view(-1, out.shape[-1]).addmm_(z, self.b_cat.T)  # (B·T, out)
        elif segments is not None:
            flat_x, flat_out = x[0], out[0]  # (N, in) (N, out)
            for i, (start, end) in enumerate(segments):
                z = flat_x[start:end] @ self.a_cat[i].T  # (n, k·r)
                flat_out[start:end].addmm_(z, self.b_cat[i].T)  # (n, out)
        else:
            z = torch.bmm(x, self.a_cat.transpose(1, 2))  # (B, T, k·r)
            out.baddbmm_(z, self.b_cat.transpose(1, 2))  # (B, T, out)
        return out


@dataclass(frozen=True)
class MixturePlan:
    """The per-module mixtures of one call, for every row of its batch."""

    modules: dict[str, ModuleMixture]

    def select_rows(self, index: torch.Tensor) -> MixturePlan:
        """The plan of a batch cut down to the rows ``index`` (B',); shared mixtures stay."""
        modules = {}
        for name, mix in self.modules.items():
            if mix.a_cat.ndim == 3:  # one mixture per row
                rows = index.to(mix.a_cat.device)
                mix = ModuleMixture(
                    mix.a_cat[rows], mix.b_cat[rows]
                )  # (B', k·r, in) (B', out, k·r)
            modules[name] = mix
        return MixturePlan(modules)

    @staticmethod
    def concat(parts: Sequence[tuple[MixturePlan | None, int]]) -> MixturePlan | None:
        """The plans of several batches ``(plan, n_rows)`` stacked into one per-row plan.

        Each row keeps its own factors; narrower ones are padded with zero columns of A and B
        (which add exactly 0), a module some part lacks gets zero factors there, and ``None``
        (base-only rows) contributes zeros everywhere.
        """
        shapes: dict[str, tuple[int, int, torch.dtype, torch.device]] = {}
        for plan, _ in parts:
            for name, given in (plan.modules if plan is not None else {}).items():
                d_out, d_in = given.b_cat.shape[-2], given.a_cat.shape[-1]
                shapes.setdefault(name, (d_out, d_in, given.a_cat.dtype, given.a_cat.device))
        if not shapes:
            return None
        total = sum(n for _, n in parts)
        modules = {}
        for name, (d_out, d_in, dtype, device) in shapes.items():
            taken = [(plan.modules.get(name) if plan is not None else None, n) for plan, n in parts]
            width = max(mix.a_cat.shape[-2] for mix, _ in taken if mix is not None)
            a_cat = torch.zeros(total, width, d_in, dtype=dtype, device=device)  # (B, W, in)
            b_cat = torch.zeros(total, d_out, width, dtype=dtype, device=device)  # (B, out, W)
            start = 0
            for mix, n in taken:
                if mix is not None:  # shared factors (2-D) broadcast over the part's rows
                    k = mix.a_cat.shape[-2]
                    a_cat[start : start + n, :k] = mix.a_cat
                    b_cat[start : start + n, :, :k] = mix.b_cat
                start += n
            modules[name] = ModuleMixture(a_cat, b_cat)
        return MixturePlan(modules)

    @property
    def nbytes(self) -> int:
        return sum(m.a_cat.nbytes + m.b_cat.nbytes for m in self.modules.values())

    @classmethod
    def build(cls, library: AdapterLibrary, selections: Sequence[Selection]) -> MixturePlan | None:
        """Cat-form factors for each row's selection; ``None`` when every row is base-only.

        A batch with one mixture for all its rows gets a shared plan, and the library's recent
        shared plans are reused (see :class:`_PlanCache`): the calls of a conversation whose
        selection is kept build it once.
        """
        rows = [tuple(zip(s.adapters, s.weights, strict=True)) for s in selections]
        if max(len(r) for r in rows) == 0:
            return None
        if all(r == rows[0] for r in rows):  # one mixture for the batch: plain matmuls
            return _PLANS.get(library, rows[0], lambda: cls._build(library, rows[:1]))
        return cls._build(library, rows)

    @classmethod
    def _build(
        cls, library: AdapterLibrary, rows: Sequence[tuple[tuple[str, float], ...]]
    ) -> MixturePlan:
        """The plan of ``rows`` (one row: a plan shared by every row of its batch)."""
        k = max(len(r) for r in rows)
        shared = len(rows) == 1
        slots = torch.full((len(rows), k), -1, dtype=torch.long)  # (B, k), -1 = padding
        weights = torch.zeros(len(rows), k, dtype=torch.float32)  # (B, k)
        for b, row in enumerate(rows):
            for j, (name, weight) in enumerate(row):
                slots[b, j] = library.slot(name)
                weights[b, j] = weight
        modules = {}
        takes: dict[Hashable, list[_Take]] = {}  # per layout: modules alike share their takes
        for name, stack in library.stacks.items():
            layout = library.layout(name)
            if layout not in takes:
                takes[layout] = _takes(stack, slots, weights)
            mix = _module_mixture(stack, takes[layout], shared=shared)
            if mix is not None:
                modules[name] = mix
        return cls(modules)


class _PlanCache:
    """Recently built shared plans, per library, bounded by bytes (LRU); thread-safe.

    Building a plan costs a few torch ops per adapted module (3.5 ms for the zoo's 60 modules
    at 1 thread, ``benchmarks/plan_build.py``; modules of one layout share the index work);
    an agent's steps and the turns of a conversation with a sticky selection reuse one mixture
    call after call. Plans are never modified once built, so one may serve several calls at
    once. A library is immutable (the engine swaps in a new one when adapters change), so its
    plans stay valid while it lives, and go with it.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._plans: weakref.WeakKeyDictionary[
            AdapterLibrary, OrderedDict[tuple[tuple[str, float], ...], MixturePlan]
        ] = weakref.WeakKeyDictionary()

    def get(
        self,
        library: AdapterLibrary,
        mixture: tuple[tuple[str, float], ...],
        build: Callable[[], MixturePlan],
    ) -> MixturePlan:
        with self._lock:
            plans = self._plans.get(library)
            plan = plans.get(mixture) if plans is not None else None
            if plan is not None:
                plans.move_to_end(mixture)  # type: ignore[union-attr]
                return plan
        plan = build()  # outside the lock: two threads may build the same plan; both are equal
        size = plan.nbytes
        if size > self.budget_bytes:
            return plan
        with self._lock:
            plans = self._plans.setdefault(library, OrderedDict())
            plans[mixture] = plan
            total = sum(p.nbytes for p in plans.values())
            while total > self.budget_bytes:
                _, dropped = plans.popitem(last=False)
                total -= dropped.nbytes
        return plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


PLAN_CACHE_BYTES = 64 * 2**20  # a plan of the zoo (k = 3, 60 modules) takes 5.3 MiB
_PLANS = _PlanCache(PLAN_CACHE_BYTES)


@dataclass(frozen=True)
class _Take:
    """What a plan takes from one rank bucket: the same at every module of one layout."""

    bucket: int  # index in the stack's buckets
    rows: torch.Tensor  # (B, k') the row of each taken column; row 0 stands in where masked
    weights: torch.Tensor  # (B, k') in the factors' dtype, 0 where masked
    mask: torch.Tensor | None  # (B, k', 1, 1) 1 where a row takes the column; None: all do


def _takes(stack: ModuleStack, slots: torch.Tensor, weights: torch.Tensor) -> list[_Take]:
    """Each rank bucket's columns that some row selects. slots, weights (B, k); -1 = padding.

    A row that selects another bucket (or nothing) in a column gets a zero A and a zero weight
    there, which adds exactly 0. Reads only the stack's layout (``AdapterLibrary.layout``).
    """
    device = stack.bucket_of.device
    dtype = stack.buckets[0].lora_b.dtype
    valid = (slots >= 0).to(device)  # (B, k)
    index = slots.clamp(min=0).to(device)  # (B, k)
    bucket_of = torch.where(valid, stack.bucket_of[index], -1)  # (B, k)
    row_of = stack.row_of[index]  # (B, k)
    weights = weights.to(device)
    takes = []
    for i in bucket_of.unique().tolist():
        if i < 0:
            continue
        mask = bucket_of == i  # (B, k)
        keep = mask.any(dim=0)  # drop columns no row takes from this bucket
        m = mask[:, keep]  # (B, k')
        takes.append(
            _Take(
                bucket=i,
                rows=torch.where(m, row_of[:, keep], 0),
                weights=(weights[:, keep] * m).to(dtype),
                mask=None if bool(m.all()) else m[:, :, None, None].to(dtype),
            )
        )
    return takes


def _module_mixture(
    stack: ModuleStack, takes: Sequence[_Take], *, shared: bool
) -> ModuleMixture | None:
    """Cat form at one module, from its layout's takes (see :func:`_takes`)."""
    parts_a, parts_b = [], []
    for take in takes:
        bucket = stack.buckets[take.bucket]
        n_rows, k = take.rows.shape
        r = bucket.rank
        a = bucket.lora_a[take.rows]  # (B, k', r, in)
        if take.mask is not None:
            a = a * take.mask
        b = bucket.lora_b[take.rows] * take.weights[:, :, None, None]  # (B, k', out, r)
        parts_a.append(a.reshape(n_rows, k * r, stack.d_in))  # (B, k'·r, in)
        parts_b.append(b.permute(0, 2, 1, 3).reshape(n_rows, stack.d_out, k * r))  # (B, out, k'·r)
    if not parts_a:
        return None
    a_cat = torch.cat(parts_a, dim=1) if len(parts_a) > 1 else parts_a[0]  # (B, Σ k'·r, in)
    b_cat = torch.cat(parts_b, dim=2) if len(parts_b) > 1 else parts_b[0]  # (B, out, Σ k'·r)
    if shared:
        return ModuleMixture(a_cat[0].contiguous(), b_cat[0].contiguous())
    return ModuleMixture(a_cat.contiguous(), b_cat.contiguous())


class ProbeDone(Exception):
    """Raised by a hook to stop the probe forward once the probed input is captured."""


class PassCancelled(LoGoError):
    """Raised by a hook to stop a forward whose ``ForwardContext.cancel`` was set."""


@dataclass
class ForwardContext:
    """What the hooks do during one model forward of one call."""

    plan: MixturePlan | None = None
    probe_module: str | None = None  # capture this Linear's input, then stop the forward
    probe_layer: nn.Module | None = None  # or capture this decoder block's input (residual)
    captured: torch.Tensor | None = field(default=None, repr=False)
    packed: PackedPass | None = field(default=None, repr=False)  # rows end to end, see packing
    cancel: threading.Event | None = field(default=None, repr=False)  # set: stop the forward


_CURRENT: ContextVar[ForwardContext | None] = ContextVar("logo_forward_context", default=None)


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Install ``ctx`` for the forwards run inside the block (this thread/task only)."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def current_context() -> ForwardContext | None:
    """The context of the forward running in this thread/task (None outside LoGo calls)."""
    return _CURRENT.get()


def _linear_hook(name: str) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        ctx = _CURRENT.get()
        if ctx is None:
            return None
        if ctx.cancel is not None and ctx.cancel.is_set():
            raise PassCancelled
        if ctx.probe_module == name:
            ctx.captured = args[0]
            raise ProbeDone
        mix = ctx.plan.modules.get(name) if ctx.plan is not None else None
        if mix is None:
            return None
        return mix.add_to(args[0], output, ctx.packed.bounds if ctx.packed is not None else None)

    hook.logo_hook = True  # type: ignore[attr-defined]
    return hook


def _layer_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    ctx = _CURRENT.get()
    if ctx is not None and ctx.probe_layer is module:
        ctx.captured = args[0] if args else kwargs["hidden_states"]
        raise ProbeDone


_layer_pre_hook.logo_hook = True  # type: ignore[attr-defined]


class _ModelHooks:
    """The LoGo hooks on one model: one per hooked module, counted claims of the engines on it."""

    def __init__(self) -> None:
        self.handles: dict[str, RemovableHandle] = {}
        self.claims: dict[str, int] = {}


# One entry per model object that carries LoGo hooks; dropped with the model.
_MODELS: weakref.WeakKeyDictionary[nn.Module, _ModelHooks] = weakref.WeakKeyDictionary()
_MODELS_LOCK = threading.Lock()


class HookSet:
    """One engine's claim on the LoGo hooks of its model.

    The hooks belong to the model, not to an engine: every engine built on the same model object
    shares one hook per module (the hook reads the calling engine's :class:`ForwardContext`), so a
    second engine on a model never applies a mixture twice. ``remove`` drops this engine's claims;
    a hook goes when no engine claims it. A model that carries LoGo hooks no live engine owns (a
    deep copy of a model an engine ran on) is refused.
    """

    def __init__(self, model: nn.Module) -> None:
        with _MODELS_LOCK:
            shared = _MODELS.get(model)
            if shared is None:
                _refuse_stale_hooks(model)
                shared = _MODELS[model] = _ModelHooks()
        self._shared = shared
        self._keys: set[str] = set()

    def attach_linears(self, linears: Mapping[str, nn.Module], names: Sequence[str]) -> None:
        for name in names:
            self._claim(name, lambda n=name: linears[n].register_forward_hook(_linear_hook(n)))

    def attach_layers(self, layers: Iterable[nn.Module]) -> None:
        for i, layer in enumerate(layers):
            self._claim(
                f"layer:{i}",
                lambda m=layer: m.register_forward_pre_hook(_layer_pre_hook, with_kwargs=True),
            )

    def attach_packing(self, model: nn.Module) -> bool:
        """Switch the model to packed prompt passes where it can take them (see packing)."""
        from logo_engine import packing  # packing imports this module

        if not packing.can_pack(model):
            return False
        self._claim("attention", lambda: packing.switch(model))
        return True

    def _claim(self, key: str, register: Any) -> None:
        if key in self._keys:
            return
        with _MODELS_LOCK:
            shared = self._shared
            if key not in shared.handles:
                shared.handles[key] = register()
            shared.claims[key] = shared.claims.get(key, 0) + 1
            self._keys.add(key)

    def remove(self) -> None:
        """Drop this engine's claims; hooks no other engine claims are removed from the model."""
        with _MODELS_LOCK:
            shared = self._shared
            for key in self._keys:
                shared.claims[key] -= 1
                if shared.claims[key] == 0:
                    del shared.claims[key]
                    shared.handles.pop(key).remove()
            self._keys.clear()


def _is_logo_hook(hook: Any) -> bool:
    return bool(getattr(hook, "logo_hook", False))


def strip_hooks(model: nn.Module) -> None:
    """Remove every LoGo hook from ``model`` (a copy of a hooked model carries its hooks)."""
    for module in model.modules():
        for hooks, flags in (
            (module._forward_hooks, (module._forward_hooks_with_kwargs,)),
            (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        ):
            for key in [k for k, h in hooks.items() if _is_logo_hook(h)]:
                del hooks[key]
                for flag in (*flags, module._forward_hooks_always_called):
                    flag.pop(key, None)


def _refuse_stale_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if any(_is_logo_hook(h) for h in hooks):
            raise LoGoError(
                f"module {name or type(model).__name__!r} of this model already carries a LoGo "
                "hook that no engine owns (is it a copy of a model a LoGoEngine ran on?); build "
                "the engine on a model without LoGo hooks, or close() the first engine before "
                "copying its model"
            )

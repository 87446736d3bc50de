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

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from logo_engine.library import AdapterLibrary, ModuleStack
from logo_engine.types import Selection


@dataclass(frozen=True)
class ModuleMixture:
    """The selected adapters of one module in cat form (see module docstring)."""

    a_cat: torch.Tensor  # (k·r, in) shared by all rows, or (B, k·r, in)
    b_cat: torch.Tensor  # (out, k·r) or (B, out, k·r); weights and scaling folded in

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """math: out += b_cat @ a_cat @ x.    x (B, T, in), out (B, T, out), in place."""
        if self.a_cat.ndim == 2:
            z = x.reshape(-1, x.shape[-1]) @ self.a_cat.T  # (B·T, k·r)
            out.view(-1, out.shape[-1]).addmm_(z, self.b_cat.T)  # (B·T, out)
        else:
            z = torch.bmm(x, self.a_cat.transpose(1, 2))  # (B, T, k·r)
            out.baddbmm_(z, self.b_cat.transpose(1, 2))  # (B, T, out)
        return out


@dataclass(frozen=True)
class MixturePlan:
    """The per-module mixtures of one call, for every row of its batch."""

    modules: dict[str, ModuleMixture]

    @classmethod
    def build(cls, library: AdapterLibrary, selections: Sequence[Selection]) -> MixturePlan | None:
        """Cat-form factors for each row's selection; ``None`` when every row is base-only."""
        rows = [list(zip(s.adapters, s.weights, strict=True)) for s in selections]
        k = max(len(r) for r in rows)
        if k == 0:
            return None
        shared = all(r == rows[0] for r in rows)  # one mixture for the batch: plain matmuls
        if shared:
            rows = rows[:1]
        slots = torch.full((len(rows), k), -1, dtype=torch.long)  # (B, k), -1 = padding
        weights = torch.zeros(len(rows), k, dtype=torch.float32)  # (B, k)
        for b, row in enumerate(rows):
            for j, (name, weight) in enumerate(row):
                slots[b, j] = library.slot(name)
                weights[b, j] = weight
        modules = {}
        for name, stack in library.stacks.items():
            mix = _module_mixture(stack, slots, weights, shared=shared)
            if mix is not None:
                modules[name] = mix
        return cls(modules)


def _module_mixture(
    stack: ModuleStack, slots: torch.Tensor, weights: torch.Tensor, *, shared: bool
) -> ModuleMixture | None:
    device = stack.lora_a.device
    rows = torch.where(
        slots >= 0, stack.row_of[slots.clamp(min=0).to(device)], stack.absent_row
    )  # (B, k)
    present = rows != stack.absent_row  # (B, k)
    keep = present.any(dim=0)  # drop columns no row uses at this module
    if not keep.any():
        return None
    rows, w = rows[:, keep], weights.to(device)[:, keep].to(stack.lora_b.dtype)  # (B, k')
    n_rows, k = rows.shape
    _, r, d_in = stack.lora_a.shape
    d_out = stack.lora_b.shape[1]
    a = stack.lora_a[rows]  # (B, k', r, in)
    b = stack.lora_b[rows] * w[:, :, None, None]  # (B, k', out, r)
    a_cat = a.reshape(n_rows, k * r, d_in)  # (B, k'·r, in)
    b_cat = b.permute(0, 2, 1, 3).reshape(n_rows, d_out, k * r)  # (B, out, k'·r)
    if shared:
        return ModuleMixture(a_cat[0].contiguous(), b_cat[0].contiguous())
    return ModuleMixture(a_cat.contiguous(), b_cat.contiguous())


class ProbeDone(Exception):
    """Raised by a hook to stop the probe forward once the probed input is captured."""


@dataclass
class ForwardContext:
    """What the hooks do during one model forward of one call."""

    plan: MixturePlan | None = None
    probe_module: str | None = None  # capture this Linear's input, then stop the forward
    probe_layer: nn.Module | None = None  # or capture this decoder block's input (residual)
    captured: torch.Tensor | None = field(default=None, repr=False)


_CURRENT: ContextVar[ForwardContext | None] = ContextVar("logo_forward_context", default=None)


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Install ``ctx`` for the forwards run inside the block (this thread/task only)."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def _linear_hook(name: str) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        ctx = _CURRENT.get()
        if ctx is None:
            return None
        if ctx.probe_module == name:
            ctx.captured = args[0]
            raise ProbeDone
        mix = ctx.plan.modules.get(name) if ctx.plan is not None else None
        return None if mix is None else mix.add_to(args[0], output)

    return hook


def _layer_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    ctx = _CURRENT.get()
    if ctx is not None and ctx.probe_layer is module:
        ctx.captured = args[0] if args else kwargs["hidden_states"]
        raise ProbeDone


class HookSet:
    """The engine's permanent hooks on one model; idempotent ``attach``, ``remove`` to detach."""

    def __init__(self) -> None:
        self._handles: dict[str, RemovableHandle] = {}

    def attach_linears(self, linears: Mapping[str, nn.Module], names: Sequence[str]) -> None:
        for name in names:
            if name not in self._handles:
                self._handles[name] = linears[name].register_forward_hook(_linear_hook(name))

    def attach_layers(self, layers: Iterable[nn.Module]) -> None:
        for i, layer in enumerate(layers):
            key = f"layer:{i}"
            if key not in self._handles:
                self._handles[key] = layer.register_forward_pre_hook(
                    _layer_pre_hook, with_kwargs=True
                )

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

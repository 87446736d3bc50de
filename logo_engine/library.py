"""Adapter libraries: peft LoRA adapters stacked per module of the base model.

Each adapted Linear of the base model gets one :class:`ModuleStack`: the LoRA factors of every
adapter that targets it, grouped into one :class:`RankBucket` per distinct rank (no padding, so
one large-rank adapter costs its own size, not its rank times the library), scaling folded in:

    bucket of rank r:  lora_a (S_r, r, in)    lora_b (S_r, out, r) = scaling_i · B_i

so ΔW_i = lora_b[row] @ lora_a[row] for adapter i at its (bucket, row).

Reading and checking one adapter lives in :mod:`logo_engine.adapter_files` (its names are
re-exported here).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from logo_engine.adapter_files import (
    CONFIG_NAME,
    PICKLE_NAME,
    SAFETENSORS_NAME,
    Adapter,
    AdapterSource,
    LoraFactors,
    LoraSpec,
    cast_checked,
    check_adapter,
    check_fits,
    fold_scaling,
    read_adapter,
    resolve_sources,
)
from logo_engine.errors import AdapterLoadError, AdapterMemoryError, AdapterNotFoundError

__all__ = [  # the adapter_files names are re-exported: callers import them from here
    "CONFIG_NAME",
    "PICKLE_NAME",
    "SAFETENSORS_NAME",
    "Adapter",
    "AdapterLibrary",
    "AdapterSource",
    "LoraFactors",
    "LoraSpec",
    "ModuleStack",
    "RankBucket",
    "available_memory",
    "check_adapter",
    "check_fits",
    "read_adapter",
    "resolve_sources",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- stacks
@dataclass(frozen=True)
class RankBucket:
    """The adapters of one rank at one module, stacked."""

    lora_a: torch.Tensor  # (S_r, r, in)
    lora_b: torch.Tensor  # (S_r, out, r), scaling folded in
    slots: torch.Tensor  # (S_r,) long: the adapter slot of each row

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.lora_a, self.lora_b, self.slots))


@dataclass(frozen=True)
class ModuleStack:
    """Every adapter's factors at one module, one bucket per rank; see the module docstring."""

    buckets: tuple[RankBucket, ...]  # ascending rank
    bucket_of: torch.Tensor  # (N,) long: adapter slot -> bucket index, -1 where absent
    row_of: torch.Tensor  # (N,) long: adapter slot -> row in its bucket, -1 where absent
    d_in: int
    d_out: int

    @property
    def nbytes(self) -> int:
        """Bytes held by this module's tensors."""
        return sum(b.nbytes for b in self.buckets) + 2 * self.row_of.numel() * 8

    def outputs(self, h: torch.Tensor) -> torch.Tensor:
        """Every adapter's low-rank output for inputs h, one stacked product per rank bucket.

        math: o[b, i] = scaling_i · B_i A_i h[b]      h (B, in) -> (B, N, out), zeros where absent
        """
        first = self.buckets[0].lora_a
        h = h.to(first.dtype)
        out = h.new_zeros(h.shape[0], self.row_of.shape[0], self.d_out)  # (B, N, out)
        for bucket in self.buckets:
            s, r, d_in = bucket.lora_a.shape
            z = (bucket.lora_a.reshape(s * r, d_in) @ h.T).reshape(s, r, -1)  # (S_r, r, B)
            o = torch.bmm(bucket.lora_b, z)  # (S_r, out, B)
            out[:, bucket.slots] = o.permute(2, 0, 1)  # (B, S_r, out)
        return out


class AdapterLibrary:
    """An immutable set of adapters, stacked per module. ``slot`` = position in ``names``.

    Only the stacks hold weights: ``adapters`` keeps each adapter's name, path and base model,
    not a second copy of its factors; a larger library is built from these stacks (``base=``),
    reusing the base's tensors for every (module, rank) bucket that gains no adapter.

    ``budget_bytes`` caps the bytes of all stacks; ``None`` refuses only a build whose new
    tensors exceed the memory available on the device now. Either is checked before allocating.
    """

    def __init__(
        self,
        adapters: Sequence[Adapter],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        base: AdapterLibrary | None = None,
        budget_bytes: int | None = None,
    ) -> None:
        old = base.adapters if base is not None else []
        names = [a.name for a in [*old, *adapters]]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise AdapterLoadError(f"adapter names must be unique; repeated: {dupes}")
        old_stacks = base.stacks if base is not None else {}
        modules = sorted(set(old_stacks) | {m for a in adapters for m in a.modules})
        element = torch.empty((), dtype=dtype).element_size()
        total, new = _planned_bytes(adapters, old_stacks, len(names), element)
        _check_budget(total, new, budget_bytes, device)
        stacks = {}
        for m in modules:
            stacks[m] = _stack(m, adapters, old_stacks.get(m), len(old), dtype=dtype, device=device)
        self.stacks: dict[str, ModuleStack] = stacks
        self._layouts = {m: _layout(s) for m, s in stacks.items()}
        self.adapters: list[Adapter] = [*old, *(a.without_weights() for a in adapters)]
        self.names = names
        self._slot = {n: i for i, n in enumerate(names)}

    def __len__(self) -> int:
        return len(self.names)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stacks (the library's whole weight memory)."""
        return sum(s.nbytes for s in self.stacks.values())

    def slot(self, name: str) -> int:
        try:
            return self._slot[name]
        except KeyError:
            raise AdapterNotFoundError(
                f"unknown adapter {name!r}; the library holds {self.names}"
            ) from None

    def factors(self, name: str) -> dict[str, LoraFactors]:
        """One adapter's factors per module, as stored: ``scaling`` is folded into ``lora_b``.

        math: ΔW = lora_b @ lora_a with lora_a (r, in), lora_b (out, r) = s · B, r unpadded;
        returned ``scaling`` is 1.0. Views of the stacks, not copies.
        """
        slot = self.slot(name)
        out = {}
        for module in self.adapters[slot].ranks:
            stack = self.stacks[module]
            bucket = stack.buckets[int(stack.bucket_of[slot])]
            row = int(stack.row_of[slot])
            out[module] = LoraFactors(
                lora_a=bucket.lora_a[row], lora_b=bucket.lora_b[row], scaling=1.0
            )
        return out

    def layout(self, module: str) -> Hashable:
        """Which adapter is where in ``module``'s stack, as a hashable key.

        The key holds the bucket ranks, each slot's bucket and row, the dtype and the device;
        modules with equal layouts take the same rows for a mixture (``MixturePlan.build``).
        """
        return self._layouts[module]

    def has_module(self, module: str) -> torch.Tensor:
        """(N,) bool: which adapters adapt ``module``."""
        return self.stacks[module].bucket_of >= 0


def _layout(stack: ModuleStack) -> Hashable:
    return (
        tuple(b.rank for b in stack.buckets),
        tuple(stack.bucket_of.tolist()),
        tuple(stack.row_of.tolist()),
        stack.buckets[0].lora_b.dtype,
        stack.bucket_of.device,
    )


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that can be allocated on ``device`` now (None: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _planned_bytes(
    adapters: Sequence[Adapter],
    old_stacks: Mapping[str, ModuleStack],
    n_slots: int,
    element: int,
) -> tuple[int, int]:
    """(bytes of the whole new library, bytes newly allocated for it), before allocating.

    Exact: factor rows (r · (in + out) elements, + 8 bytes of slot), and per module two (N,)
    long index tensors; a bucket that gains rows is copied, the others are shared.
    """
    grown: dict[tuple[str, int], int] = {}  # (module, rank) -> bytes of the new rows
    for a in adapters:
        for m, f in a.modules.items():
            r, d_in, d_out = f.lora_a.shape[0], f.lora_a.shape[1], f.lora_b.shape[0]
            key = (m, int(r))
            grown[key] = grown.get(key, 0) + r * (d_in + d_out) * element + 8
    modules = set(old_stacks) | {m for m, _ in grown}
    index = len(modules) * 2 * n_slots * 8  # bucket_of and row_of, rebuilt for every module
    old_factors = sum(b.nbytes for s in old_stacks.values() for b in s.buckets)
    new = index + sum(grown.values())
    for m, r in grown:
        stack = old_stacks.get(m)
        for bucket in stack.buckets if stack is not None else ():
            if bucket.rank == r:  # this bucket is copied into a larger one
                new += bucket.nbytes
    return old_factors + sum(grown.values()) + index, new


def _check_budget(total: int, new: int, budget: int | None, device: torch.device | str) -> None:
    mib = 2**20
    if budget is not None:
        if total > budget:
            raise AdapterMemoryError(
                f"the adapter stacks would take {total / mib:.1f} MiB, over the engine's "
                f"adapter_memory_budget of {budget / mib:.1f} MiB; nothing was loaded"
            )
        return
    free = available_memory(device)
    if free is None:
        return
    if new > free:
        raise AdapterMemoryError(
            f"loading these adapters needs {new / mib:.1f} MiB but only {free / mib:.1f} MiB is "
            f"available on {device}; nothing was loaded"
        )
    if new > free // 2:
        logger.warning(
            "loading these adapters takes %.1f MiB of the %.1f MiB available on %s",
            new / mib,
            free / mib,
            device,
        )


def _stack(
    module: str,
    adapters: Sequence[Adapter],
    old: ModuleStack | None,
    n_old: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> ModuleStack:
    """Stack ``old`` (the first ``n_old`` slots, may be None) and the new adapters' factors."""
    new_rows: dict[int, list[tuple[int, Adapter]]] = {}  # rank -> [(slot, adapter)]
    for slot, a in enumerate(adapters, start=n_old):
        f = a.modules.get(module)
        if f is not None:
            new_rows.setdefault(int(f.lora_a.shape[0]), []).append((slot, a))
    old_buckets = {b.rank: b for b in old.buckets} if old is not None else {}
    buckets = []
    for rank in sorted(set(old_buckets) | set(new_rows)):
        rows = new_rows.get(rank, [])
        bucket = old_buckets.get(rank)
        if not rows and bucket is not None:
            buckets.append(bucket)  # unchanged: shared with the base library
            continue
        a_new = [cast_checked(a.name, module, a.modules[module].lora_a, dtype) for _, a in rows]
        b_new = [fold_scaling(a.name, module, a.modules[module], dtype) for _, a in rows]
        slots_new = torch.tensor([s for s, _ in rows], dtype=torch.long)
        if bucket is not None:
            lora_a = torch.cat([bucket.lora_a, torch.stack(a_new).to(device)])  # (S_r, r, in)
            lora_b = torch.cat([bucket.lora_b, torch.stack(b_new).to(device)])  # (S_r, out, r)
            slots = torch.cat([bucket.slots, slots_new.to(device)])
        else:
            lora_a = torch.stack(a_new).to(device)  # (S_r, r, in)
            lora_b = torch.stack(b_new).to(device)  # (S_r, out, r)
            slots = slots_new.to(device)
        buckets.append(RankBucket(lora_a=lora_a, lora_b=lora_b, slots=slots))
    n = n_old + len(adapters)
    bucket_of = torch.full((n,), -1, dtype=torch.long)
    row_of = torch.full((n,), -1, dtype=torch.long)
    for i, bucket in enumerate(buckets):
        slots_cpu = bucket.slots.cpu()
        bucket_of[slots_cpu] = i
        row_of[slots_cpu] = torch.arange(len(slots_cpu))
    d_in = buckets[0].lora_a.shape[2]
    d_out = buckets[0].lora_b.shape[1]
    return ModuleStack(
        buckets=tuple(buckets),
        bucket_of=bucket_of.to(device),
        row_of=row_of.to(device),
        d_in=int(d_in),
        d_out=int(d_out),
    )

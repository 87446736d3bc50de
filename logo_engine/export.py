"""Export a mixture of adapters as ONE peft LoRA adapter (cat form, scaling exactly 1).

A LoGo mixture of k adapters is exactly one LoRA adapter of rank R = Σ_i R_i:

    A_cat = [A_1; ...; A_k]                      (R, in)    rows stacked
    B_cat = [w_1 s_1 B_1, ..., w_k s_k B_k]      (out, R)   columns stacked
    B_cat @ A_cat = Σ_i w_i s_i B_i A_i                     (exact)

written with ``r = lora_alpha = R`` and no rsLoRA, so peft's (and vLLM's) scaling is 1. Every
module that any selected adapter adapts gets the same rank R: block i is zero where adapter i
does not adapt that module, and zero-padded where its rank there is below its largest rank R_i
(zero rows and columns add nothing to the product). Engines that serve one adapter per request
(vLLM, SGLang, ...) can thus serve the exact mixture. With k = 1 and weight 1 the original
adapter folder is the mixture: :func:`export_mixture` points at it instead of writing a copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from logo_engine.errors import ExportError, InvalidRequestError, MixtureRankError
from logo_engine.library import CONFIG_NAME, SAFETENSORS_NAME, AdapterLibrary
from logo_engine.routing import pinned_selection
from logo_engine.types import Selection

MIXTURE_NAME = "logo_mixture.json"  # sidecar: which adapters and weights the folder holds
# vLLM's LoRAConfig.max_lora_rank accepts only these values (vllm/config/lora.py).
ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_KEY_VERSION = 1  # bump when the exported layout changes: old cache entries stop matching

MixtureLike = Selection | Mapping[str, float]


@dataclass(frozen=True)
class ExportedAdapter:
    """Where a mixture lives as one peft LoRA folder, and what it holds."""

    path: Path  # the folder to load (the original adapter's folder when ``original``)
    rank: int  # R: the adapter's (largest) rank, what a server's max_lora_rank must cover
    mixture: dict[str, float]  # {adapter: weight}, weights summing to 1, weight order
    original: bool  # True: k = 1, weight 1, ``path`` is the adapter's own folder (not copied)
    nbytes: int = 0  # bytes written (0 for an original)
    ranks: dict[str, int] = field(default_factory=dict)  # R_i per adapter


def mixture_of(library: AdapterLibrary, selection_or_mapping: MixtureLike) -> dict[str, float]:
    """``{adapter: weight}`` (weights summing to 1, weight order) of a Selection or a mapping.

    A :class:`Selection` gives the weights it was served with (``served_mixture``); a mapping is
    validated and normalised like a pinned mixture (``engine.generate(adapters=...)``).
    """
    if isinstance(selection_or_mapping, Selection):
        mixture = selection_or_mapping.served_mixture
        for name in mixture:
            library.slot(name)  # AdapterNotFoundError for a name the library lacks
        return mixture
    if not isinstance(selection_or_mapping, Mapping):
        raise InvalidRequestError(
            f"expected a Selection or a mapping {{adapter: weight}}, got "
            f"{type(selection_or_mapping).__name__}"
        )
    return pinned_selection(selection_or_mapping, library.names).mixture


def adapter_rank(library: AdapterLibrary, name: str) -> int:
    """R_i: the largest rank adapter ``name`` has at any module."""
    return max(library.adapters[library.slot(name)].ranks.values())


def mixture_rank(library: AdapterLibrary, mixture: Mapping[str, float]) -> int:
    """R = Σ_i R_i: the rank of the exported adapter (k = 1: the adapter's own rank)."""
    return sum(adapter_rank(library, name) for name in mixture)


def round_up_rank(rank: int) -> int:
    """The smallest value in :data:`ALLOWED_MAX_LORA_RANKS` that is >= ``rank``."""
    for allowed in ALLOWED_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise MixtureRankError(
        f"a LoRA of rank {rank} exceeds the largest max_lora_rank vLLM accepts "
        f"({ALLOWED_MAX_LORA_RANKS[-1]}); use a smaller top_k or lower-rank adapters"
    )


def check_rank(library: AdapterLibrary, mixture: Mapping[str, float], max_lora_rank: int) -> int:
    """The mixture's rank R; :class:`MixtureRankError` when it exceeds ``max_lora_rank``."""
    rank = mixture_rank(library, mixture)
    if rank > max_lora_rank:
        parts = " + ".join(f"{n} r={adapter_rank(library, n)}" for n in mixture)
        needed = round_up_rank(rank)
        raise MixtureRankError(
            f"this mixture is one LoRA of rank {rank} ({parts}), but the serving engine runs "
            f"with max_lora_rank={max_lora_rank}; start it with max_lora_rank={needed} "
            f"({rank} rounded up to the allowed values {list(ALLOWED_MAX_LORA_RANKS)}), or "
            "route with a smaller top_k"
        )
    return rank


def round_weights(mixture: Mapping[str, float], grid: float) -> dict[str, float]:
    """Weights rounded to multiples of 1/n, n = round(1 / ``grid``), still summing to 1.

    math: c_i = floor(n w_i), the n - Σ c_i remaining steps go to the largest remainders (ties:
    by name); every adapter keeps at least one step; served w_i = c_i / n. Nearby routed
    weights map to the same served mixture (a cache hit), at the cost of changing the output.
    """
    if not (
        isinstance(grid, (int, float))
        and not isinstance(grid, bool)
        and math.isfinite(grid)
        and 0 < grid <= 1
    ):
        raise InvalidRequestError(f"weight_grid must be a float in (0, 1], got {grid!r}")
    n = max(1, round(1 / grid))
    if len(mixture) > n:
        raise InvalidRequestError(
            f"weight_grid={grid} has {n} steps, fewer than the {len(mixture)} adapters of the "
            "mixture; use a finer grid"
        )
    total = sum(mixture.values())
    exact = {name: n * w / total for name, w in mixture.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: (-(exact[name] - counts[name]), name))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    for name in sorted(counts, key=lambda m: (counts[m], m)):  # at least one step each
        if counts[name] == 0:
            donor = max(counts, key=lambda m: (counts[m], m))
            counts[donor] -= 1
            counts[name] = 1
    return {name: counts[name] / n for name in mixture}


# ---------------------------------------------------------------------- identity
_DIGESTS: weakref.WeakKeyDictionary[AdapterLibrary, dict[str, str]] = weakref.WeakKeyDictionary()


def adapter_digest(library: AdapterLibrary, name: str) -> str:
    """sha256 of one adapter's factors as the library holds them (memoised per library).

    Two libraries holding the same adapter (same factors, dtype) give the same digest, so
    exported mixtures can be shared between them and across processes.
    """
    per_library = _DIGESTS.setdefault(library, {})
    digest = per_library.get(name)
    if digest is None:
        h = hashlib.sha256()
        for module, f in sorted(library.factors(name).items()):
            for t in (f.lora_a, f.lora_b):
                h.update(f"{module}|{tuple(t.shape)}|{t.dtype}".encode())
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        digest = per_library[name] = h.hexdigest()
    return digest


def mixture_key(library: AdapterLibrary, mixture: Mapping[str, float]) -> str:
    """A hex key for the exported form of ``mixture``: hash(adapter identities, sorted weights).

    Order-independent; exact in the weights (``float.hex``): round them first for cache hits.
    """
    pairs = sorted(
        (name, adapter_digest(library, name), float(w).hex()) for name, w in mixture.items()
    )
    payload = json.dumps({"v": _KEY_VERSION, "adapters": pairs}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


# ---------------------------------------------------------------------- export
def export_mixture(
    library: AdapterLibrary,
    selection_or_mapping: MixtureLike,
    path: str | os.PathLike,
    *,
    base_model_name: str | None = None,
    copy_single: bool = False,
    overwrite: bool = False,
) -> ExportedAdapter:
    """Write ``selection_or_mapping`` as one peft LoRA folder equal to the mixture.

    Args:
        library: the adapters (``engine.library``).
        selection_or_mapping: a :class:`Selection` (its served weights) or ``{adapter: weight}``
            (normalised to sum 1, as a pinned mixture).
        path: the folder to write; written atomically (a sibling temporary folder renamed into
            place), so a reader never sees half a folder.
        base_model_name: ``base_model_name_or_path`` in ``adapter_config.json``.
        copy_single: with one adapter of weight 1, write a copy anyway (default: point at the
            original folder and write nothing).
        overwrite: replace an existing ``path`` (default: refuse a non-empty one).

    Returns:
        An :class:`ExportedAdapter`; load ``result.path`` (the original folder for k = 1).

    Raises:
        InvalidRequestError: an empty mixture (that is the base model: nothing to export), or
            bad weights. AdapterNotFoundError: a name the library lacks. ExportError: the
            folder cannot be written.

    """
    mixture = mixture_of(library, selection_or_mapping)
    if not mixture:
        raise InvalidRequestError(
            "the mixture is empty (the base model): there is no adapter to export"
        )
    ranks = {name: adapter_rank(library, name) for name in mixture}
    if len(mixture) == 1 and not copy_single:
        (name,) = mixture
        source = library.adapters[library.slot(name)].path
        if source is not None:
            return ExportedAdapter(
                path=Path(source), rank=ranks[name], mixture=mixture, original=True, ranks=ranks
            )
    target = Path(path)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{str(target)!r} exists and is not empty; pass overwrite=True")
    tensors, config = cat_adapter(library, mixture, base_model_name=base_model_name)
    nbytes = _write_atomically(target, tensors, config, mixture, overwrite=overwrite)
    return ExportedAdapter(
        path=target,
        rank=sum(ranks.values()),
        mixture=mixture,
        original=False,
        nbytes=nbytes,
        ranks=ranks,
    )


def cat_adapter(
    library: AdapterLibrary, mixture: Mapping[str, float], *, base_model_name: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The cat-form state dict (peft key names) and ``adapter_config.json`` of ``mixture``.

    Blocks follow sorted adapter names, so equal mixtures give byte-equal files.
    """
    names = sorted(mixture)
    factors = {name: library.factors(name) for name in names}
    widths = {name: max(f.lora_a.shape[0] for f in factors[name].values()) for name in names}
    rank = sum(widths.values())
    modules = sorted({m for name in names for m in factors[name]})
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        present = next(factors[n][module] for n in names if module in factors[n])
        a_cat = present.lora_a.new_zeros(rank, present.lora_a.shape[1])  # (R, in)
        b_cat = present.lora_b.new_zeros(present.lora_b.shape[0], rank)  # (out, R)
        start = 0
        for name in names:
            f = factors[name].get(module)
            if f is not None:
                r = f.lora_a.shape[0]
                a_cat[start : start + r] = f.lora_a  # (r, in)
                b_cat[:, start : start + r] = f.lora_b * mixture[name]  # (out, r): w_i s_i B_i
            start += widths[name]
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = a_cat.cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b_cat.cpu().contiguous()
    config: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": rank,
        "lora_alpha": rank,  # scaling = alpha / r = 1: weights and scalings live in lora_B
        "use_rslora": False,
        "target_modules": modules,  # full module names: exactly these Linears
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return tensors, config


def _write_atomically(
    target: Path,
    tensors: dict[str, torch.Tensor],
    config: Mapping[str, object],
    mixture: Mapping[str, float],
    *,
    overwrite: bool,
) -> int:
    """Write the folder beside ``target`` and rename it into place; returns bytes written."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ExportError(f"cannot create a folder beside {str(target)!r}: {exc}") from exc
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; servers may run as another user
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
        (tmp / MIXTURE_NAME).write_text(
            json.dumps({"adapters": list(mixture), "weights": list(mixture.values())}, indent=2),
            encoding="utf-8",
        )
        nbytes = sum(p.stat().st_size for p in tmp.iterdir())
        if target.exists() and overwrite:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        os.replace(tmp, target)  # an empty target folder is replaced too
    except OSError as exc:
        raise ExportError(f"cannot write the adapter to {str(target)!r}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return nbytes

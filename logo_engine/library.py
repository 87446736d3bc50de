"""Adapter libraries: read peft LoRA adapters, validate them, stack them per module.

Each adapted Linear of the base model gets one :class:`ModuleStack`: the LoRA factors of every
adapter that targets it, grouped into one :class:`RankBucket` per distinct rank (no padding, so
one large-rank adapter costs its own size, not its rank times the library), scaling folded in:

    bucket of rank r:  lora_a (S_r, r, in)    lora_b (S_r, out, r) = scaling_i · B_i

so ΔW_i = lora_b[row] @ lora_a[row] for adapter i at its (bucket, row).

Reading is strict: ``adapter_config.json`` is checked against a schema (:class:`LoraSpec`), the
weights must be finite floating-point tensors, the scalings and the folded ``scaling · B`` finite,
and no file of an adapter may resolve outside its folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from logo_engine.errors import (
    AdapterIncompatibleError,
    AdapterLoadError,
    AdapterMemoryError,
    AdapterNotFoundError,
    UnsafeAdapterError,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20  # peft writes ~1 KB; a larger config is refused unread
# A LoRA delta this many times the base weight (Frobenius norms) is refused: no trained adapter
# comes near it, and an overflowing lora_alpha would make every probe score inf.
MAX_DELTA_RATIO = 1e4
# peft state-dict keys: "base_model.model.<module>.lora_A[.<adapter>].weight"
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)

AdapterSource = Union[
    str, os.PathLike, Mapping[str, Union[str, os.PathLike]], Sequence[Union[str, os.PathLike]]
]


@dataclass(frozen=True)
class LoraFactors:
    """One adapter at one module. ΔW = scaling · lora_b @ lora_a."""

    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r)
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter read from disk (or built in memory): its factors per base-model module."""

    name: str
    modules: dict[str, LoraFactors]
    path: Path | None = None
    base_model_name: str | None = None
    ranks: dict[str, int] = field(default_factory=dict)  # rank per module, kept in a library

    def without_weights(self) -> Adapter:
        """A copy holding the description (name, path, ranks) without the factors."""
        ranks = {m: int(f.lora_a.shape[0]) for m, f in self.modules.items()} or self.ranks
        return replace(self, modules={}, ranks=ranks)


# ---------------------------------------------------------------------- sources and files
def resolve_sources(adapters: AdapterSource) -> dict[str, Path]:
    """Turn the ``adapters=`` argument into ``{name: folder}``.

    Accepts ``{name: folder}``, a list of folders (named after the folder), a single peft folder,
    or a library folder holding one peft folder per adapter. In a library folder, entries that
    resolve outside it (symlinks) are refused.
    """
    if isinstance(adapters, Mapping):
        out = {}
        for name, path in adapters.items():
            if not isinstance(name, str) or not name:
                raise AdapterLoadError(f"adapter names must be non-empty strings, got {name!r}")
            out[name] = _as_path(path)
        return out
    if isinstance(adapters, (str, os.PathLike)):
        root = Path(adapters)
        if (root / CONFIG_NAME).is_file():
            return {root.name: root}
        if not root.is_dir():
            raise AdapterLoadError(f"adapter folder {str(root)!r} does not exist")
        real_root = root.resolve()
        found = {}
        for child in sorted(root.iterdir()):
            if not (child / CONFIG_NAME).is_file():
                continue
            if not child.resolve().is_relative_to(real_root):
                raise AdapterLoadError(
                    f"adapter {child.name!r} in library {str(root)!r} is a link to "
                    f"{str(child.resolve())!r}, outside the library; refusing it"
                )
            found[child.name] = child
        if not found:
            raise AdapterLoadError(f"no peft adapter folder ({CONFIG_NAME}) found in {str(root)!r}")
        return found
    if isinstance(adapters, Sequence) and not isinstance(adapters, (bytes, bytearray)):
        out = {}
        for path in adapters:
            p = _as_path(path)
            if p.name in out:
                raise AdapterLoadError(
                    f"two adapters are named {p.name!r}; pass a {{name: path}} dict"
                )
            out[p.name] = p
        return out
    raise AdapterLoadError(
        f"adapters must be a folder, a list of folders or a dict, got {adapters!r}"
    )


def _as_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise AdapterLoadError(
            f"an adapter source must be a folder path (or an Adapter), got {type(path).__name__}"
        )
    return Path(path)


def _contained_file(name: str, folder: Path, filename: str) -> Path:
    """``folder/filename``, refused when it is a link that resolves outside the adapter folder.

    A Hugging Face hub cache snapshot (``.../snapshots/<rev>/``) links its files into the repo's
    ``blobs/`` folder; those links stay inside the repo folder and are accepted.
    """
    path = folder / filename
    real_folder = folder.resolve()
    real = path.resolve()
    root = real_folder.parent.parent if real_folder.parent.name == "snapshots" else real_folder
    if not real.is_relative_to(real_folder) and not real.is_relative_to(root / "blobs"):
        raise AdapterLoadError(
            f"adapter {name!r}: {filename} in {str(folder)!r} is a link to {str(real)!r}, outside "
            "the adapter folder; refusing it (copy the file into the folder if you trust it)"
        )
    return path


def read_adapter(name: str, path: str | os.PathLike, *, allow_pickle: bool = False) -> Adapter:
    """Read and check one peft LoRA adapter folder (config + weights); no base model needed."""
    path = Path(path)
    spec = LoraSpec.parse(name, _read_config(name, path))
    weights_file = _contained_file(name, path, SAFETENSORS_NAME)
    if weights_file.is_file():
        try:
            state = load_file(str(weights_file), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterLoadError(
                f"adapter {name!r}: cannot read {str(weights_file)!r} "
                f"(truncated or corrupt?): {exc}"
            ) from exc
    elif (path / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise UnsafeAdapterError(
                f"adapter {name!r} ships pickle weights ({PICKLE_NAME}); pickle can run code on "
                "load. Convert it to safetensors, or pass allow_pickle=True if you trust it"
            )
        pickle_file = _contained_file(name, path, PICKLE_NAME)
        try:
            state = torch.load(pickle_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterLoadError(f"adapter {name!r}: cannot read {PICKLE_NAME}: {exc}") from exc
        if not isinstance(state, Mapping) or not all(
            isinstance(t, torch.Tensor) for t in state.values()
        ):
            raise AdapterLoadError(f"adapter {name!r}: {PICKLE_NAME} is not a tensor state dict")
    else:
        raise AdapterLoadError(f"adapter {name!r}: no {SAFETENSORS_NAME} in {str(path)!r}")
    adapter = Adapter(
        name=name, modules=_factors(name, spec, state), path=path, base_model_name=spec.base_model
    )
    check_adapter(adapter)
    return adapter


def _read_config(name: str, path: Path) -> dict[str, Any]:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterLoadError(f"adapter {name!r}: no {CONFIG_NAME} in {str(path)!r}")
    config_file = _contained_file(name, path, CONFIG_NAME)
    try:
        if config_file.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except RecursionError:
        raise AdapterLoadError(
            f"adapter {name!r}: cannot parse {str(config_file)!r}: JSON nested too deeply"
        ) from None
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"adapter {name!r}: cannot parse {str(config_file)!r}: {exc}"
        ) from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(f"adapter {name!r}: {CONFIG_NAME} is not a JSON object")
    return config


# ---------------------------------------------------------------------- config schema
@dataclass(frozen=True)
class LoraSpec:
    """The fields of ``adapter_config.json`` that LoGo reads, checked (peft's names and rules).

    Missing ``r`` or ``lora_alpha`` fall back to the tensors' rank (scaling 1); a field that is
    present must have the type and range peft's ``LoraConfig`` gives it.
    """

    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None

    @classmethod
    def parse(cls, name: str, config: Mapping[str, Any]) -> LoraSpec:
        """Check a parsed ``adapter_config.json``; refuse what LoGo cannot apply exactly."""

        def bad(key: str, expected: str) -> AdapterIncompatibleError:
            return AdapterIncompatibleError(
                f"adapter {name!r}: {CONFIG_NAME} field {key!r} must be {expected}, "
                f"got {config[key]!r}"
            )

        peft_type = config.get("peft_type")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise AdapterIncompatibleError(
                f"adapter {name!r} is not a LoRA adapter (peft_type={peft_type!r})"
            )
        refused = {
            "use_dora": "DoRA adapters are not supported",
            "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters are not supported",
            "modules_to_save": "modules_to_save (fully trained modules) is not supported",
            "lora_bias": "LoRA bias terms are not supported",
        }
        for key, why in refused.items():
            if config.get(key):
                raise AdapterIncompatibleError(f"adapter {name!r}: {why} ({key}={config[key]!r})")
        if config.get("bias", "none") not in ("none", None):
            raise AdapterIncompatibleError(
                f"adapter {name!r}: bias={config['bias']!r} is not supported"
            )
        r = config.get("r")
        if "r" in config and not _is_int(r, minimum=1):
            raise bad("r", "an int >= 1")
        alpha = config.get("lora_alpha")
        if "lora_alpha" in config and not _is_finite(alpha):
            raise bad("lora_alpha", "a finite number")
        rslora = config.get("use_rslora", False)
        if not isinstance(rslora, bool):
            raise bad("use_rslora", "true or false")
        base = config.get("base_model_name_or_path")
        if base is not None and not isinstance(base, str):
            raise bad("base_model_name_or_path", "a string or null")
        return cls(
            r=r,
            lora_alpha=None if alpha is None else float(alpha),
            use_rslora=rslora,
            rank_pattern=_patterns(name, config, "rank_pattern", lambda v: _is_int(v, minimum=1)),
            alpha_pattern={
                k: float(v) for k, v in _patterns(name, config, "alpha_pattern", _is_finite).items()
            },
            base_model=base,
        )

    def scaling(self, module: str, rank: int) -> float:
        """The scaling at ``module`` for rank ``rank``: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        alpha = float(rank) if alpha is None else alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def rank(self, module: str) -> int | None:
        """The rank the config promises at ``module`` (None: not stated)."""
        return _pattern_value(self.rank_pattern, module, self.r)


def _is_int(value: Any, *, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _patterns(name: str, config: Mapping[str, Any], key: str, valid: Any) -> dict[str, Any]:
    """A ``rank_pattern``/``alpha_pattern`` field: {regex or module suffix: value}, checked."""
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterIncompatibleError(
            f"adapter {name!r}: {CONFIG_NAME} field {key!r} must be an object "
            f"{{module pattern: value}}, got {patterns!r}"
        )
    for pattern, value in patterns.items():
        try:
            re.compile(_pattern_regex(pattern))
        except re.error as exc:
            raise AdapterIncompatibleError(
                f"adapter {name!r}: {key} key {pattern!r} is not a valid regular expression: {exc}"
            ) from None
        if not valid(value):
            what = "an int >= 1" if key == "rank_pattern" else "a finite number"
            raise AdapterIncompatibleError(
                f"adapter {name!r}: {key}[{pattern!r}] must be {what}, got {value!r}"
            )
    return dict(patterns)


def _pattern_regex(key: str) -> str:
    # Same rule as peft.utils.other.get_pattern_key: a key matches a suffix of the module name.
    return rf"(.*\.)?({key})$"


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(_pattern_regex(key), module):
            return value
    return default


# ---------------------------------------------------------------------- tensors
def _factors(
    name: str, spec: LoraSpec, state: Mapping[str, torch.Tensor]
) -> dict[str, LoraFactors]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise AdapterIncompatibleError(
                f"adapter {name!r}: unsupported weight {key!r} (only LoRA A/B weights of Linear "
                "layers are supported: no DoRA magnitudes, embeddings, biases or saved modules)"
            )
        halves.setdefault(match["module"], {})[match["ab"]] = tensor
    if not halves:
        raise AdapterIncompatibleError(f"adapter {name!r} holds no LoRA weights")
    modules = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterIncompatibleError(
                f"adapter {name!r}: module {module!r} lacks lora_{missing}"
            )
        a, b = pair["A"], pair["B"]
        _check_pair(name, module, a, b)
        r = int(a.shape[0])
        expected_r = spec.rank(module)
        if expected_r is not None and expected_r != r:
            raise AdapterIncompatibleError(
                f"adapter {name!r}: module {module!r} has rank {r} but the config says {expected_r}"
            )
        modules[module] = LoraFactors(lora_a=a, lora_b=b, scaling=spec.scaling(module, r))
    return modules


def _check_pair(name: str, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise AdapterIncompatibleError(
            f"adapter {name!r}: module {module!r} has lora_A {tuple(a.shape)} and lora_B "
            f"{tuple(b.shape)}; expected (r, in) and (out, r)"
        )
    if a.shape[0] == 0:
        raise AdapterIncompatibleError(f"adapter {name!r}: module {module!r} has rank 0")
    for which, t in (("lora_A", a), ("lora_B", b)):
        if not t.is_floating_point():
            raise AdapterIncompatibleError(
                f"adapter {name!r}: module {module!r} {which} is {t.dtype}; LoRA weights must be "
                "floating point (quantised or integer weights are not supported)"
            )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterIncompatibleError(
            f"adapter {name!r}: module {module!r} has NaN or Inf weights"
        )


def check_adapter(adapter: Adapter) -> None:
    """Refuse an adapter whose factors could poison routing or generation.

    Every module needs floating-point, finite A and B of rank >= 1, a finite scaling, and a
    folded ``scaling · B`` that is finite in float32 (checked again in the library's dtype).
    """
    if not isinstance(adapter, Adapter):
        raise AdapterLoadError(f"expected an Adapter, got {type(adapter).__name__}")
    if not isinstance(adapter.name, str) or not adapter.name:
        raise AdapterLoadError(f"adapter names must be non-empty strings, got {adapter.name!r}")
    if not adapter.modules:
        raise AdapterIncompatibleError(f"adapter {adapter.name!r} holds no LoRA weights")
    for module, f in adapter.modules.items():
        _check_pair(adapter.name, module, f.lora_a, f.lora_b)
        if not _is_finite(f.scaling):
            raise AdapterIncompatibleError(
                f"adapter {adapter.name!r}: module {module!r} has scaling {f.scaling!r} "
                "(lora_alpha / r); it must be finite"
            )
        _check_folded(adapter.name, module, f, torch.float32)


def _check_folded(name: str, module: str, f: LoraFactors, dtype: torch.dtype) -> torch.Tensor:
    """``scaling · B`` in ``dtype``, refused unless finite there."""
    folded = (f.lora_b.to(torch.float64) * f.scaling).to(dtype)  # (out, r)
    if not torch.isfinite(folded).all():
        raise AdapterIncompatibleError(
            f"adapter {name!r}: module {module!r}: scaling ({f.scaling!r}) times lora_B "
            f"overflows {dtype}; lora_alpha is too large for these weights"
        )
    return folded


def _cast_checked(name: str, module: str, lora_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``lora_a`` in ``dtype``, refused unless finite there."""
    cast = lora_a.to(dtype)
    if not torch.isfinite(cast).all():
        raise AdapterIncompatibleError(
            f"adapter {name!r}: module {module!r}: lora_A overflows {dtype}"
        )
    return cast


def check_fits(
    adapter: Adapter,
    linears: Mapping[str, nn.Module],
    weight_norms: dict[str, float] | None = None,
) -> None:
    """Refuse an adapter that does not fit the base model (modules, shapes, size of its delta).

    A delta far larger than the base weight can only come from a broken scaling.
    math: ||ΔW||_F <= ||s · B||_F · ||A||_F must stay <= MAX_DELTA_RATIO · max(||W||_F, 1).
    ``weight_norms`` caches ||W||_F per module across calls.
    """
    norms = {} if weight_norms is None else weight_norms
    for module, f in adapter.modules.items():
        layer = linears.get(module)
        if layer is None:
            raise AdapterIncompatibleError(
                f"adapter {adapter.name!r} targets {module!r}, which is not a Linear layer of the "
                "base model (was it trained on another model?)"
            )
        expected = (layer.out_features, layer.in_features)
        got = (f.lora_b.shape[0], f.lora_a.shape[1])
        if got != expected:
            raise AdapterIncompatibleError(
                f"adapter {adapter.name!r}: {module!r} is (out, in) = {got} but the base model's "
                f"layer is {expected} (was it trained on another model?)"
            )
        if module not in norms:
            weight = cast(torch.Tensor, layer.weight)  # (out, in)
            with torch.no_grad():
                norms[module] = float(weight.to(torch.float64).norm())
        delta = (
            abs(f.scaling)
            * float(f.lora_b.to(torch.float64).norm())
            * float(f.lora_a.to(torch.float64).norm())
        )
        if not delta <= MAX_DELTA_RATIO * max(norms[module], 1.0):
            raise AdapterIncompatibleError(
                f"adapter {adapter.name!r}: at {module!r} the LoRA delta can reach ||ΔW|| = "
                f"{delta:.3g}, more than {MAX_DELTA_RATIO:g} times the base weight's "
                f"{norms[module]:.3g}; is lora_alpha (scaling {f.scaling!r}) wrong?"
            )


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

    def has_module(self, module: str) -> torch.Tensor:
        """(N,) bool: which adapters adapt ``module``."""
        return self.stacks[module].bucket_of >= 0


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
        a_new = [_cast_checked(a.name, module, a.modules[module].lora_a, dtype) for _, a in rows]
        b_new = [_check_folded(a.name, module, a.modules[module], dtype) for _, a in rows]
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

"""One adapter on disk: where its files may be, its config schema, its tensors' checks.

:func:`resolve_sources` turns an ``adapters=`` argument into ``{name: folder}``;
:func:`read_adapter` reads one peft LoRA folder into an :class:`Adapter`. Reading is strict:
``adapter_config.json`` is checked against a schema (:class:`LoraSpec`); the weights must be
finite floating-point tensors of rank >= 1; the scalings and the folded ``scaling · B`` finite;
no file may resolve outside its adapter folder. :func:`check_fits` checks an adapter against the
base model's Linear layers.
"""

from __future__ import annotations

import json
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
    UnsafeAdapterError,
)

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
        fold_scaling(adapter.name, module, f, torch.float32)


def fold_scaling(name: str, module: str, f: LoraFactors, dtype: torch.dtype) -> torch.Tensor:
    """``scaling · B`` in ``dtype``, refused unless finite there."""
    folded = (f.lora_b.to(torch.float64) * f.scaling).to(dtype)  # (out, r)
    if not torch.isfinite(folded).all():
        raise AdapterIncompatibleError(
            f"adapter {name!r}: module {module!r}: scaling ({f.scaling!r}) times lora_B "
            f"overflows {dtype}; lora_alpha is too large for these weights"
        )
    return folded


def cast_checked(name: str, module: str, lora_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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

"""Adapter libraries: read peft LoRA adapters, validate them, stack them per module.

Each adapted Linear of the base model gets one :class:`ModuleStack` holding the LoRA factors of
every adapter that targets it, ranks zero-padded to the largest, scaling folded into B:

    lora_a (S + 1, r, in)    lora_b (S + 1, out, r) = scaling_i · B_i     row S = zeros

so ΔW_i = lora_b[i] @ lora_a[i], and adapters that skip the module point at the zero row.
Zero-padding ranks and the zero row are exact: they add nothing to any product.
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
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from logo_engine.errors import (
    AdapterIncompatibleError,
    AdapterLoadError,
    AdapterNotFoundError,
    UnsafeAdapterError,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
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
            out[name] = Path(path)
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
    if isinstance(adapters, Sequence):
        out = {}
        for path in adapters:
            p = Path(path)
            if p.name in out:
                raise AdapterLoadError(
                    f"two adapters are named {p.name!r}; pass a {{name: path}} dict"
                )
            out[p.name] = p
        return out
    raise AdapterLoadError(
        f"adapters must be a folder, a list of folders or a dict, got {adapters!r}"
    )


def read_adapter(name: str, path: str | os.PathLike, *, allow_pickle: bool = False) -> Adapter:
    """Read and check one peft LoRA adapter folder (config + weights); no base model needed."""
    path = Path(path)
    config = _read_config(name, path)
    weights_file = path / SAFETENSORS_NAME
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
        try:
            state = torch.load(path / PICKLE_NAME, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterLoadError(f"adapter {name!r}: cannot read {PICKLE_NAME}: {exc}") from exc
    else:
        raise AdapterLoadError(f"adapter {name!r}: no {SAFETENSORS_NAME} in {str(path)!r}")
    return Adapter(
        name=name,
        modules=_factors(name, config, state),
        path=path,
        base_model_name=config.get("base_model_name_or_path"),
    )


def _read_config(name: str, path: Path) -> dict[str, Any]:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterLoadError(f"adapter {name!r}: no {CONFIG_NAME} in {str(path)!r}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"adapter {name!r}: cannot parse {str(config_file)!r}: {exc}"
        ) from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(f"adapter {name!r}: {CONFIG_NAME} is not a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterIncompatibleError(
            f"adapter {name!r} is not a LoRA adapter (peft_type={config.get('peft_type')!r})"
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
    if config.get("bias", "none") != "none":
        raise AdapterIncompatibleError(
            f"adapter {name!r}: bias={config['bias']!r} is not supported"
        )
    return config


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # Same rule as peft.utils.other.get_pattern_key: a key matches a suffix of the module name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _factors(
    name: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
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
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterIncompatibleError(
                f"adapter {name!r}: module {module!r} lacks lora_{missing}"
            )
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterIncompatibleError(
                f"adapter {name!r}: module {module!r} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; expected (r, in) and (out, r)"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterIncompatibleError(
                f"adapter {name!r}: module {module!r} has NaN or Inf weights"
            )
        r = int(a.shape[0])
        expected_r = int(_pattern_value(rank_pattern, module, config.get("r", r)))
        if expected_r != r:
            raise AdapterIncompatibleError(
                f"adapter {name!r}: module {module!r} has rank {r} but the config says {expected_r}"
            )
        alpha = float(_pattern_value(alpha_pattern, module, config.get("lora_alpha", r)))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = LoraFactors(lora_a=a, lora_b=b, scaling=scaling)
    return modules


def check_fits(adapter: Adapter, linears: Mapping[str, nn.Module]) -> None:
    """Refuse an adapter whose modules are missing from the base model or whose shapes differ."""
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


@dataclass(frozen=True)
class ModuleStack:
    """Every adapter's factors at one module; see the module docstring for the layout."""

    lora_a: torch.Tensor  # (S + 1, r, in), row S = zeros
    lora_b: torch.Tensor  # (S + 1, out, r), scaling folded in, row S = zeros
    row_of: torch.Tensor  # (N,) long: adapter slot -> row, S where the adapter skips the module

    @property
    def absent_row(self) -> int:
        return self.lora_a.shape[0] - 1

    def outputs(self, h: torch.Tensor) -> torch.Tensor:
        """Every adapter's low-rank output for inputs h, as one stacked product.

        math: o[b, i] = scaling_i · B_i A_i h[b]      h (B, in) -> (B, N, out), zeros where absent
        """
        s, r, d_in = self.lora_a.shape
        h = h.to(self.lora_a.dtype)
        z = (self.lora_a.reshape(s * r, d_in) @ h.T).reshape(s, r, -1)  # (S+1, r, B)
        o = torch.bmm(self.lora_b, z)  # (S+1, out, B)
        return o.permute(2, 0, 1)[:, self.row_of]  # (B, N, out)


class AdapterLibrary:
    """An immutable set of adapters, stacked per module. ``slot`` = position in ``names``.

    Only the stacks hold weights: ``adapters`` keeps each adapter's name, path and base model,
    not a second copy of its factors; a larger library is built from these stacks (``base=``).
    """

    def __init__(
        self,
        adapters: Sequence[Adapter],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        base: AdapterLibrary | None = None,
    ) -> None:
        old = base.adapters if base is not None else []
        names = [a.name for a in [*old, *adapters]]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise AdapterLoadError(f"adapter names must be unique; repeated: {dupes}")
        self.adapters: list[Adapter] = [*old, *(a.without_weights() for a in adapters)]
        self.names = names
        self._slot = {n: i for i, n in enumerate(names)}
        old_stacks = base.stacks if base is not None else {}
        modules = sorted(set(old_stacks) | {m for a in adapters for m in a.modules})
        self.stacks: dict[str, ModuleStack] = {
            m: _stack(m, adapters, old_stacks.get(m), len(old), dtype=dtype, device=device)
            for m in modules
        }

    def __len__(self) -> int:
        return len(self.names)

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
        adapter = self.adapters[self.slot(name)]
        out = {}
        for module, rank in adapter.ranks.items():
            stack = self.stacks[module]
            row = int(stack.row_of[self.slot(name)])
            out[module] = LoraFactors(
                lora_a=stack.lora_a[row, :rank], lora_b=stack.lora_b[row, :, :rank], scaling=1.0
            )
        return out

    def has_module(self, module: str) -> torch.Tensor:
        """(N,) bool: which adapters adapt ``module``."""
        stack = self.stacks[module]
        return stack.row_of != stack.absent_row


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
    present = [a.modules[module] for a in adapters if module in a.modules]
    s_old = old.absent_row if old is not None else 0  # rows of old adapters
    r = max([f.lora_a.shape[0] for f in present] + ([old.lora_a.shape[1]] if old else []))
    first = present[0] if present else None
    d_in = old.lora_a.shape[2] if old is not None else first.lora_a.shape[1]  # type: ignore[union-attr]
    d_out = old.lora_b.shape[1] if old is not None else first.lora_b.shape[0]  # type: ignore[union-attr]
    n_rows = s_old + len(present) + 1  # + the zero row
    lora_a = torch.zeros(n_rows, r, d_in, dtype=dtype, device=device)  # (S+1, r, in)
    lora_b = torch.zeros(n_rows, d_out, r, dtype=dtype, device=device)  # (S+1, out, r)
    if old is not None:
        r_old = old.lora_a.shape[1]
        lora_a[:s_old, :r_old] = old.lora_a[:s_old]
        lora_b[:s_old, :, :r_old] = old.lora_b[:s_old]
    for row, f in enumerate(present, start=s_old):
        rank = f.lora_a.shape[0]
        lora_a[row, :rank] = f.lora_a.to(torch.float32).to(dtype)
        lora_b[row, :, :rank] = (f.lora_b.to(torch.float32) * f.scaling).to(dtype)
    absent = n_rows - 1
    if old is not None:
        row_of = torch.where(old.row_of == s_old, absent, old.row_of).tolist()
    else:
        row_of = [absent] * n_old
    row = s_old
    for a in adapters:
        if module in a.modules:
            row_of.append(row)
            row += 1
        else:
            row_of.append(absent)
    return ModuleStack(
        lora_a=lora_a,
        lora_b=lora_b,
        row_of=torch.tensor(row_of, dtype=torch.long, device=device),
    )

"""What a library knows about its adapters beyond their weights: statistics and prototypes.

- :class:`~logo_engine.types.Calibration`: each adapter's mean and std of its raw score over
  reference prompts, for one probe setting and signal (:class:`CalibrationKey`). Raw LoRA output
  norms are not comparable across adapters (an adapter with a large B scores high on every
  prompt); calibrated routing ranks and weighs by z_i = (score_i - mean_i) / std_i.
- :class:`~logo_engine.types.Prototypes`: each adapter's centroid of the probed hidden state over
  its example prompts, for one probe setting (:class:`ProbeKey`), read by the "prototype" signal.
- A library folder may ship both in ``calibration.json``, and its measured routing defaults in
  ``routing.json`` (a :class:`~logo_engine.types.RoutingConfig` as a JSON object).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from logo_engine.errors import RoutingConfigError
from logo_engine.types import Calibration, Prototypes, RoutingConfig

CALIBRATION_NAME = "calibration.json"  # optional, in a library folder (see save / load)
ROUTING_NAME = "routing.json"  # optional, in a library folder: the library's routing defaults
STD_FLOOR = 1e-12  # smallest std a calibration holds (z-scores divide by it)
MAX_FILE_BYTES = 64 << 20  # a calibration or routing file larger than this is refused unread


class ProbeKey(NamedTuple):
    """Where and how the probe reads the hidden state."""

    probe_layer: int  # absolute block index
    probe_module: str  # full module name
    probe_input: str
    probe_tokens: str

    @classmethod
    def of(cls, item: Calibration | Prototypes) -> ProbeKey:
        return cls(item.probe_layer, item.probe_module, item.probe_input, item.probe_tokens)

    @classmethod
    def for_routing(cls, routing: RoutingConfig, layer: int, module: str) -> ProbeKey:
        return cls(layer, module, routing.probe_input, routing.probe_tokens)

    def describe(self) -> str:
        return (
            f"layer {self.probe_layer}, {self.probe_module}, input={self.probe_input}, "
            f"tokens={self.probe_tokens}"
        )


class CalibrationKey(NamedTuple):
    """The probe setting a calibration is valid for."""

    signal: str
    probe_layer: int  # absolute block index
    probe_module: str  # full module name
    probe_input: str
    probe_tokens: str

    @classmethod
    def of(cls, calibration: Calibration) -> CalibrationKey:
        return cls(
            calibration.signal,
            calibration.probe_layer,
            calibration.probe_module,
            calibration.probe_input,
            calibration.probe_tokens,
        )

    @classmethod
    def for_routing(cls, routing: RoutingConfig, layer: int, module: str) -> CalibrationKey:
        return cls(routing.signal_name, layer, module, routing.probe_input, routing.probe_tokens)

    def describe(self) -> str:
        return (
            f"signal={self.signal}, layer {self.probe_layer}, {self.probe_module}, "
            f"input={self.probe_input}, tokens={self.probe_tokens}"
        )


def from_scores(
    key: CalibrationKey,
    names: Sequence[str],
    scores: torch.Tensor,
    *,
    source: str = "prompts",
) -> Calibration:
    """Statistics of raw scores (P prompts, N adapters) over ``names``."""
    scores = scores.to(torch.float64)  # (P, N)
    return Calibration(
        signal=key.signal,
        probe_layer=key.probe_layer,
        probe_module=key.probe_module,
        probe_input=key.probe_input,
        probe_tokens=key.probe_tokens,
        mean=dict(zip(names, scores.mean(0).tolist(), strict=True)),
        # An adapter with a constant score (e.g. absent at the probe module) gets the floor.
        std=dict(zip(names, scores.std(0).clamp(min=STD_FLOOR).tolist(), strict=True)),
        n_prompts=int(scores.shape[0]),
        source=source,  # type: ignore[arg-type]
    )


def zscores(calibration: Calibration, names: Sequence[str], scores: torch.Tensor) -> torch.Tensor:
    """Per-adapter z-scores. math: z_i = (s_i - mean_i) / std_i.   scores (B, N) -> (B, N)."""
    mean = torch.tensor([calibration.mean[n] for n in names])  # (N,)
    std = torch.tensor([calibration.std[n] for n in names]).clamp(min=STD_FLOOR)  # (N,)
    return (scores.float().cpu() - mean) / std


def prototypes_from_states(
    key: ProbeKey, states: dict[str, torch.Tensor], *, digits: int = 6
) -> Prototypes:
    """Centroids of probed states ``{adapter: (P_i, d)}``, to ``digits`` significant digits."""
    centroids = {
        name: [float(f"{v:.{digits}g}") for v in h.to(torch.float64).mean(0).tolist()]
        for name, h in states.items()
    }
    return Prototypes(
        probe_layer=key.probe_layer,
        probe_module=key.probe_module,
        probe_input=key.probe_input,
        probe_tokens=key.probe_tokens,
        centroids=centroids,
        n_examples={name: int(h.shape[0]) for name, h in states.items()},
    )


def prototype_scores(prototypes: Prototypes, names: Sequence[str], h: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each probed state with each adapter's centroid, both centred.

    math: c = mean_i(μ_i); score_i = cos(h - c, μ_i - c).     h (B, d) -> (B, N)
    """
    mu = torch.tensor([prototypes.centroids[n] for n in names], dtype=torch.float32)  # (N, d)
    center = mu.mean(0)  # (d,)
    h = torch.nn.functional.normalize(h.float().cpu() - center, dim=-1)  # (B, d)
    mu = torch.nn.functional.normalize(mu - center, dim=-1)  # (N, d)
    return h @ mu.T  # (B, N)


def save(
    calibrations: Iterable[Calibration],
    path: str | os.PathLike,
    prototypes: Iterable[Prototypes] = (),
) -> None:
    """Write calibrations and prototypes as one JSON object (read back by :func:`load`)."""
    data = {
        "calibrations": [c.model_dump(mode="json") for c in calibrations],
        "prototypes": [p.model_dump(mode="json") for p in prototypes],
    }
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def check(calibration: Calibration) -> None:
    """Refuse statistics that would pin routing: every mean finite, every std finite and > 0."""
    if not isinstance(calibration, Calibration):
        raise RoutingConfigError(f"expected a Calibration, got {type(calibration).__name__}")
    if set(calibration.mean) != set(calibration.std):
        raise RoutingConfigError("a calibration needs a mean and a std for the same adapters")
    for name, mean in calibration.mean.items():
        std = calibration.std[name]
        if not math.isfinite(mean) or not math.isfinite(std) or std <= 0:
            raise RoutingConfigError(
                f"calibration of adapter {name!r} has mean={mean!r}, std={std!r}; the mean must "
                "be finite and the std finite and > 0"
            )
    if calibration.n_prompts < 2:
        raise RoutingConfigError(f"a calibration needs n_prompts >= 2, got {calibration.n_prompts}")


def check_prototypes(prototypes: Prototypes) -> None:
    """Refuse centroids that are not finite, empty, or of different sizes."""
    sizes = {len(c) for c in prototypes.centroids.values()}
    if len(sizes) > 1 or 0 in sizes:
        raise RoutingConfigError(f"prototype centroids must share one size > 0, got sizes {sizes}")
    for name, centroid in prototypes.centroids.items():
        if not all(math.isfinite(v) for v in centroid):
            raise RoutingConfigError(f"the prototype centroid of adapter {name!r} is not finite")


def _read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, refusing huge or deeply nested ones with :class:`RoutingConfigError`."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise RoutingConfigError(
            f"cannot read {what} from {str(path)!r}: JSON nested too deeply"
        ) from None
    except (OSError, ValueError) as exc:
        raise RoutingConfigError(f"cannot read {what} from {str(path)!r}: {exc}") from exc


def load(path: str | os.PathLike) -> tuple[list[Calibration], list[Prototypes]]:
    """Read a file written by :func:`save` (a bare JSON list of calibrations is accepted too).

    Every calibration passes :func:`check` and every prototype set :func:`check_prototypes`.
    """
    path = Path(path)
    data = _read_json(path, "calibrations")
    try:
        if isinstance(data, list):  # the first format: calibrations only
            data = {"calibrations": data}
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object with 'calibrations' and 'prototypes'")
        unknown = sorted(set(data) - {"calibrations", "prototypes"})
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        calibrations = [Calibration.model_validate(c) for c in data.get("calibrations", [])]
        prototypes = [Prototypes.model_validate(p) for p in data.get("prototypes", [])]
    except (ValueError, TypeError, RecursionError) as exc:
        raise RoutingConfigError(f"cannot read calibrations from {str(path)!r}: {exc}") from exc
    try:
        for calibration in calibrations:
            check(calibration)
        for prototype_set in prototypes:
            check_prototypes(prototype_set)
    except RoutingConfigError as exc:
        raise RoutingConfigError(f"calibrations in {str(path)!r}: {exc}") from None
    return calibrations, prototypes


def load_routing(path: str | os.PathLike) -> RoutingConfig:
    """Read a library's routing defaults (a JSON object of :class:`RoutingConfig` fields)."""
    return RoutingConfig.from_dict(_read_json(Path(path), "routing defaults"), source=str(path))


def save_routing(routing: RoutingConfig, path: str | os.PathLike) -> None:
    """Write routing defaults as a JSON object (read back by :func:`load_routing`)."""
    Path(path).write_text(json.dumps(routing.to_dict(), indent=1) + "\n", encoding="utf-8")

"""Per-adapter score statistics: what makes raw probe scores comparable across adapters.

Raw LoRA output norms are not comparable across adapters (an adapter with a large B scores high
on every prompt). A :class:`~logo_engine.types.Calibration` holds each adapter's mean and std of
its raw score over reference prompts, for one probe setting (:class:`CalibrationKey`); calibrated
routing ranks by z_i = (score_i - mean_i) / std_i. This module builds, checks, saves and loads
them; the engine keeps one per probe setting.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from logo_engine.errors import RoutingConfigError
from logo_engine.types import Calibration, RoutingConfig

CALIBRATION_NAME = "calibration.json"  # optional, in a library folder: a list of Calibration


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


def from_scores(key: CalibrationKey, names: Sequence[str], scores: torch.Tensor) -> Calibration:
    """Statistics of raw scores (P prompts, N adapters) over ``names``."""
    scores = scores.to(torch.float64)  # (P, N)
    return Calibration(
        signal=key.signal,
        probe_layer=key.probe_layer,
        probe_module=key.probe_module,
        probe_input=key.probe_input,
        probe_tokens=key.probe_tokens,
        mean=dict(zip(names, scores.mean(0).tolist(), strict=True)),
        std=dict(zip(names, scores.std(0).tolist(), strict=True)),
        n_prompts=int(scores.shape[0]),
    )


def save(calibrations: Iterable[Calibration], path: str | os.PathLike) -> None:
    """Write calibrations as a JSON list (read back by :func:`load`)."""
    data = [c.model_dump(mode="json") for c in calibrations]
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def load(path: str | os.PathLike) -> list[Calibration]:
    """Read a JSON list of calibrations written by :func:`save`."""
    path = Path(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(items, list):
            raise ValueError("expected a JSON list of calibrations")
        return [Calibration.model_validate(item) for item in items]
    except (OSError, ValueError, TypeError) as exc:
        raise RoutingConfigError(f"cannot read calibrations from {str(path)!r}: {exc}") from exc

"""Scoring and selection: from probed low-rank outputs to a :class:`Selection` per row.

math: o_i = s_i · B_i A_i h for every adapter i at the probe module (computed in
:mod:`logo_engine.library`); score_i = ||o_i||_2 ("norm") or 1 / (H(softmax(o_i)) + 1e-6)
("entropy"); keep the top-k; w_i = score_i / Σ_kept score_j ("proportional").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from logo_engine.errors import AdapterNotFoundError, InvalidRequestError, RoutingConfigError
from logo_engine.types import Calibration, RoutingConfig, Scorer, Selection

ENTROPY_EPS = 1e-6  # as in the paper's code: 1 / (H + 1e-6)


def norm_score(outputs: torch.Tensor) -> torch.Tensor:
    """L2 norm of each adapter's output. outputs (B, N, out) -> (B, N)."""
    return torch.linalg.vector_norm(outputs.float(), dim=-1)


def entropy_score(outputs: torch.Tensor) -> torch.Tensor:
    """Inverse entropy of softmax over output features. outputs (B, N, out) -> (B, N)."""
    log_p = torch.log_softmax(outputs.float(), dim=-1)  # (B, N, out)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)  # (B, N)
    return 1.0 / (entropy + ENTROPY_EPS)


SCORERS: dict[str, Scorer] = {"norm": norm_score, "entropy": entropy_score}


def score(outputs: torch.Tensor, config: RoutingConfig) -> torch.Tensor:
    """Apply the configured signal. outputs (B, N, out) -> scores (B, N), float32."""
    scorer = SCORERS[config.signal] if isinstance(config.signal, str) else config.signal
    scores = scorer(outputs)
    if scores.shape != outputs.shape[:2]:
        raise RoutingConfigError(
            f"scorer {config.signal_name!r} returned shape {tuple(scores.shape)}, "
            f"expected {tuple(outputs.shape[:2])} (batch, adapters)"
        )
    return scores.float()


def check_top_k(config: RoutingConfig, n_adapters: int) -> None:
    """Refuse a top_k larger than the library."""
    if config.top_k > n_adapters:
        raise RoutingConfigError(
            f"top_k={config.top_k} but the library holds {n_adapters} adapter(s)"
        )


def select(
    scores: torch.Tensor,
    names: Sequence[str],
    config: RoutingConfig,
    *,
    probe_layer: int,
    probe_module: str,
    probe_ms: float,
    calibration: Calibration | None = None,
) -> list[Selection]:
    """Top-k and weights for every row. scores (B, N) over ``names``.

    With a ``calibration``, adapters are ranked by their z-scores; weights still come from the
    kept adapters' raw scores.
    """
    check_top_k(config, len(names))
    scores = scores.detach().float().cpu()
    rank = scores
    if calibration is not None:
        mean = torch.tensor([calibration.mean[n] for n in names])  # (N,)
        std = torch.tensor([calibration.std[n] for n in names]).clamp(min=1e-12)  # (N,)
        rank = (scores - mean) / std  # (B, N)
    top_slots = torch.topk(rank, k=config.top_k, dim=-1).indices  # (B, k)
    selections = []
    for row in range(scores.shape[0]):
        kept = [
            (names[int(slot)], float(scores[row, slot]))
            for slot in top_slots[row]
            if config.min_score is None or float(scores[row, slot]) >= config.min_score
        ]
        weights = _weights([s for _, s in kept], config)
        order = sorted(range(len(kept)), key=lambda i: -weights[i])  # stable: ties keep score order
        selections.append(
            Selection(
                adapters=[kept[i][0] for i in order],
                weights=[weights[i] for i in order],
                scores={
                    name: float(s) for name, s in zip(names, scores[row].tolist(), strict=True)
                },
                signal=config.signal_name,
                top_k=config.top_k,
                probe_layer=probe_layer,
                probe_module=probe_module,
                probe_ms=probe_ms,
                pinned=False,
                calibrated=calibration is not None,
            )
        )
    return selections


def _weights(kept_scores: list[float], config: RoutingConfig) -> list[float]:
    if not kept_scores:
        return []
    if config.weighting == "uniform":
        return [1.0 / len(kept_scores)] * len(kept_scores)
    if config.weighting == "softmax":
        probs = torch.softmax(
            torch.tensor(kept_scores, dtype=torch.float64) / config.temperature, 0
        )
        return probs.tolist()
    total = sum(kept_scores)
    if not math.isfinite(total) or total <= 0:
        # Degenerate scores (all zero, e.g. a prompt that maps to h = 0): share equally.
        return [1.0 / len(kept_scores)] * len(kept_scores)
    return [s / total for s in kept_scores]


def pinned_selection(mixture: Mapping[str, float], names: Sequence[str]) -> Selection:
    """Validate a caller's ``{adapter: weight}`` mixture and normalise it to sum 1.

    ``{}`` is the base model. Weights must be finite and >= 0 with a positive sum; zero weights
    are dropped.
    """
    if not isinstance(mixture, Mapping):
        raise InvalidRequestError(
            f"adapters must be a mapping {{name: weight}}, got {type(mixture).__name__}"
        )
    known = set(names)
    for name, weight in mixture.items():
        if name not in known:
            raise AdapterNotFoundError(
                f"unknown adapter {name!r} in the pinned mixture; the library holds {sorted(known)}"
            )
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
        ):
            raise InvalidRequestError(
                f"weight of adapter {name!r} must be a finite number, got {weight!r}"
            )
        if weight < 0:
            raise InvalidRequestError(f"weight of adapter {name!r} must be >= 0, got {weight!r}")
    total = float(sum(mixture.values()))
    if mixture and total <= 0:
        raise InvalidRequestError(
            f"the pinned mixture's weights sum to {total}; they must sum to > 0"
        )
    kept = sorted(((n, float(w) / total) for n, w in mixture.items() if w > 0), key=lambda p: -p[1])
    return Selection(
        adapters=[n for n, _ in kept],
        weights=[w for _, w in kept],
        pinned=True,
    )

"""Scoring and selection: from probed low-rank outputs to a :class:`Selection` per row.

math: o_i = s_i · B_i A_i h for every adapter i at the probe module (computed in
:mod:`logo_engine.library`); score_i = ||o_i||_2 ("norm") or 1 / (H(softmax(o_i)) + 1e-6)
("entropy"), or cos(h - c, μ_i - c) against per-adapter centroids ("prototype",
:mod:`logo_engine.calibration`). Ranking scores r_i are the raw scores (the paper) or z-scores
(calibrated); keep the top-k by r, drop those below ``abstain_below``; weights from the kept r:
w_i = r_i / Σ_kept r_j ("proportional", the paper's rule on raw scores) or softmax(r / T).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from logo_engine.errors import (
    NumericalError,
    RoutingConfigError,
)
from logo_engine.selection import check_top_k, pinned_selection  # re-exported (torch-free)
from logo_engine.types import RoutingConfig, Scorer, Selection

__all__ = ["check_top_k", "entropy_score", "norm_score", "pinned_selection", "score", "select"]

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
    if not isinstance(scores, torch.Tensor) or scores.shape != outputs.shape[:2]:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise RoutingConfigError(
            f"scorer {config.signal_name!r} returned {got}, "
            f"expected a tensor of shape {tuple(outputs.shape[:2])} (batch, adapters)"
        )
    scores = scores.float()
    _check_finite(scores, config)
    return scores


def _check_finite(scores: torch.Tensor, config: RoutingConfig) -> None:
    """Refuse NaN/inf scores: top-k would rank them first and the mixture would be poison."""
    bad = ~torch.isfinite(scores)  # (B, N)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        message = (
            f"scorer {config.signal_name!r} gave a non-finite score "
            f"({float(scores[where[0], where[1]])}) for adapter slot {where[1]} in row {where[0]}"
        )
        if isinstance(config.signal, str):  # a built-in scorer: the model's numbers overflowed
            raise NumericalError(message + "; the probed activations overflow")
        raise RoutingConfigError(message + "; a scorer must return finite scores")


def select(
    scores: torch.Tensor,
    names: Sequence[str],
    config: RoutingConfig,
    *,
    probe_layer: int,
    probe_module: str,
    probe_ms: float,
    ranking: torch.Tensor | None = None,
    calibrated: bool = False,
) -> list[Selection]:
    """Top-k, abstention and weights for every row. scores (B, N) raw, over ``names``.

    ``ranking`` (B, N) holds the scores that rank and weigh the adapters when they are not the raw
    scores (z-scores when ``calibrated``); None ranks by the raw scores, as in the paper. Weights
    are computed from the kept ranking scores, so they follow the ranking.
    """
    check_top_k(config, len(names))
    scores = scores.detach().float().cpu()
    rank = scores if ranking is None else ranking.detach().float().cpu()
    # The paper's rule: raw output scores, proportional weights. Calibrated z-scores and prototype
    # similarities are not magnitudes of evidence: "auto" weighs them by softmax.
    paper = ranking is None and config.signal != "prototype"
    weighting = config.weighting
    if weighting == "auto":
        weighting = "proportional" if paper else "softmax"
    top_slots = torch.topk(rank, k=config.top_k, dim=-1).indices  # (B, k)
    selections = []
    for row in range(scores.shape[0]):
        top = [int(slot) for slot in top_slots[row]]
        kept = [
            slot
            for slot in top
            if (config.min_score is None or float(scores[row, slot]) >= config.min_score)
            and (config.abstain_below is None or float(rank[row, slot]) >= config.abstain_below)
        ]
        weights = _weights(
            [float(rank[row, slot]) for slot in kept], weighting, config, clip=not paper
        )
        order = sorted(range(len(kept)), key=lambda i: -weights[i])  # stable: ties keep rank order
        abstained = bool(top) and not kept
        selections.append(
            Selection(
                adapters=[names[kept[i]] for i in order],
                weights=[weights[i] for i in order],
                scores={
                    name: float(s) for name, s in zip(names, scores[row].tolist(), strict=True)
                },
                rank_scores={}
                if ranking is None
                else {name: float(s) for name, s in zip(names, rank[row].tolist(), strict=True)},
                signal=config.signal_name,
                top_k=config.top_k,
                probe_layer=probe_layer,
                probe_module=probe_module,
                probe_ms=probe_ms,
                pinned=False,
                calibrated=calibrated,
                abstained=abstained,
                reason=_reason(top, kept, rank[row], scores[row], names, config, calibrated),
            )
        )
    return selections


def _reason(
    top: list[int],
    kept: list[int],
    rank: torch.Tensor,
    raw: torch.Tensor,
    names: Sequence[str],
    config: RoutingConfig,
    calibrated: bool,
) -> str | None:
    """Why fewer than top_k adapters were kept (None when all were)."""
    if len(kept) == len(top):
        return None
    what = "z-score" if calibrated else f"{config.signal_name} score"
    dropped = [slot for slot in top if slot not in kept]
    parts = []
    if config.abstain_below is not None:
        low = [s for s in dropped if float(rank[s]) < config.abstain_below]
        if low:
            listed = ", ".join(f"{names[s]} {float(rank[s]):.2f}" for s in low)
            parts.append(f"{what} below abstain_below={config.abstain_below:g} ({listed})")
    if config.min_score is not None:
        low = [s for s in dropped if float(raw[s]) < config.min_score]
        if low:
            listed = ", ".join(f"{names[s]} {float(raw[s]):.2f}" for s in low)
            parts.append(f"raw score below min_score={config.min_score:g} ({listed})")
    head = "no adapter stood out: base model" if not kept else f"kept {len(kept)} of top {len(top)}"
    return f"{head}; {'; '.join(parts)}"


def _weights(
    kept_scores: list[float], weighting: str, config: RoutingConfig, *, clip: bool
) -> list[float]:
    """Weights of the kept adapters from their ranking scores; monotone in the scores.

    ``clip``: proportional weights count negative scores (z-scores, similarities) as 0.
    """
    if not kept_scores:
        return []
    if weighting == "uniform":
        return [1.0 / len(kept_scores)] * len(kept_scores)
    if weighting == "softmax":
        probs = torch.softmax(
            torch.tensor(kept_scores, dtype=torch.float64) / config.temperature, 0
        )
        return probs.tolist()
    if clip:
        kept_scores = [max(s, 0.0) for s in kept_scores]
    total = sum(kept_scores)
    if not math.isfinite(total) or total <= 0:
        # Degenerate scores (all zero, e.g. a prompt that maps to h = 0): share equally.
        return [1.0 / len(kept_scores)] * len(kept_scores)
    return [s / total for s in kept_scores]

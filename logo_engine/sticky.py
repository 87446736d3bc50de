"""Sticky selection: a conversation keeps its mixture unless routing clearly prefers another.

The prefill cache reuses a conversation's keys and values only under the mixture that computed
them (see :mod:`logo_engine.prefix_cache`). Routed afresh, nearly every turn gets new weights
(they follow the scores, which move with every added token), so nothing is reused unless k = 1
and the top adapter holds. With ``RoutingConfig(sticky_margin=m)``, a prompt that shares at least
half of its tokens (``STICKY_SHARE``) with a generation the prefill cache holds, as the next step
of a conversation or agent does (history, system prompt, tool schemas), keeps the mixture of the
generation it shares the most with (the "conversation's mixture", whose KV is then reused) when

    top_new == top_prev   or   rank(top_new) - rank(top_prev) <= m

where ``top_prev`` is that mixture's heaviest adapter and ``rank`` the score routing ranks by on
this turn's probe (``Selection.rank_scores``: the z-score with a calibration; the raw score
otherwise). The selection's
``scores`` stay this turn's. The memory is the prefill cache: with it off, every turn routes
afresh. A pinned mixture the caller generated with counts as the conversation's mixture too.
"""

from __future__ import annotations

from collections.abc import Mapping

from logo_engine.types import Selection

# A prompt continues an earlier one when they share at least this part of its tokens. Half: the
# next turn of a conversation shares nearly all (turn 2 of the agent benchmark: 90%), while
# unrelated short prompts share only the chat template's opening.
STICKY_SHARE = 0.5

MIXTURE_DIGITS = 12  # weights equal to 1e-12 are one mixture


def mixture_key(selection: Selection) -> tuple[tuple[str, float], ...]:
    """A selection's mixture as the prefill cache keys it: names and rounded weights.

    Weights that differ by less than 1e-12 change the model's outputs far less than the float
    error of a cached prefill itself (~1e-7 relative), so they share cached KV. An adapter whose
    weight rounds to 0 is left out: pinning a mixture drops zero weights, and the conversation's
    mixture (read back from this key) would otherwise name an adapter its next call drops.
    """
    pairs = zip(selection.adapters, selection.weights, strict=True)
    rounded = ((n, round(w, MIXTURE_DIGITS)) for n, w in pairs)
    return tuple((n, w) for n, w in rounded if w != 0.0)


def rank_value(selection: Selection, name: str) -> float:
    """The score routing ranked adapter ``name`` by: its ranking score, else its raw score."""
    return selection.rank_scores.get(name, selection.scores[name])


def sticky_selection(
    previous: Mapping[str, float] | None, new: Selection, margin: float
) -> Selection:
    """``new``, or ``new`` with the conversation's mixture when the rule above keeps it.

    ``previous`` is the mixture of the conversation's cached generation, in weight order (None,
    the base model, or a mixture naming adapters this selection did not score: ``new`` is
    returned, as it is when ``new`` itself selects no adapter).
    """
    if not previous or not new.adapters or not set(previous) <= set(new.scores):
        return new
    top_prev, top_new = next(iter(previous)), new.adapters[0]
    if top_new != top_prev:
        gap = rank_value(new, top_new) - rank_value(new, top_prev)
        if gap > margin:
            return new
    reason = (
        f"sticky: kept the conversation's mixture ({top_prev!r} first); {top_new!r} does not "
        f"outrank it by more than sticky_margin={margin:g}"
        if top_new != top_prev
        else f"sticky: kept the conversation's mixture ({top_prev!r} still ranks first)"
    )
    return new.model_copy(
        update={
            "adapters": list(previous),
            "weights": list(previous.values()),
            "sticky": True,
            "reason": reason,
        }
    )

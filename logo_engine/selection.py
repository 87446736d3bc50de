"""Selections made without a probe, and checks that need no model: pure Python, no torch.

Kept apart from :mod:`logo_engine.routing` (which needs torch) so that the call surface
(:mod:`logo_engine.base`) and remote clients (:mod:`logo_engine.client`, the integrations with
``base_url=``) import without torch. :mod:`logo_engine.routing` re-exports both functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from logo_engine.errors import AdapterNotFoundError, InvalidRequestError, RoutingConfigError
from logo_engine.types import RoutingConfig, Selection


def check_top_k(config: RoutingConfig, n_adapters: int) -> None:
    """Refuse a top_k larger than the library."""
    if config.top_k > n_adapters:
        raise RoutingConfigError(
            f"top_k={config.top_k} but the library holds {n_adapters} adapter(s)"
        )


NORMALISED = 1e-9  # weights summing to 1 within this are a normalised mixture already


def pinned_selection(mixture: Mapping[str, float], names: Sequence[str]) -> Selection:
    """Validate a caller's ``{adapter: weight}`` mixture and normalise it to sum 1.

    ``{}`` is the base model. Weights must be finite and >= 0 with a positive sum; zero weights
    are dropped. Weights that already sum to 1 (within 1e-9, as a routed selection's do) are
    kept as given: dividing by their sum would move their last digits, and a routed mixture
    pinned again (as the integrations do: route, then generate) must stay the same mixture, the
    key its cached keys and values are stored under (``sticky.mixture_key``).
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
    # Divide by the largest weight first: the sum of huge weights must not overflow to inf.
    largest = max((float(w) for w in mixture.values()), default=0.0)
    if mixture and largest <= 0:
        raise InvalidRequestError(
            f"the pinned mixture's weights are all zero ({dict(mixture)}); they must sum to > 0"
        )
    given = {n: float(w) for n, w in mixture.items() if w > 0}
    if largest <= 1.0 and abs(math.fsum(given.values()) - 1.0) <= NORMALISED:  # no overflow
        normalised = given
    else:
        scaled = {n: w / largest for n, w in given.items()}
        total = math.fsum(scaled.values())
        normalised = {n: w / total for n, w in scaled.items()}
    kept = sorted(normalised.items(), key=lambda p: -p[1])
    return Selection(
        adapters=[n for n, _ in kept],
        weights=[w for _, w in kept],
        pinned=True,
    )

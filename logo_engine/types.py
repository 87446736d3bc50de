"""Public value types: the routing configuration and what a call returns.

``RoutingConfig`` is a frozen dataclass validated on construction; ``Selection``, ``Usage``,
``ToolCall``, ``InvalidToolCall`` and ``Generation`` are frozen pydantic models, so they serialise
to JSON as they are (callbacks, response metadata, traces).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from logo_engine.errors import InvalidRequestError, RoutingConfigError

if TYPE_CHECKING:  # torch stays out of the import path of remote clients (logo_engine.client)
    import torch

Signal = Literal["norm", "entropy", "prototype"]
SIGNALS: tuple[str, ...] = ("norm", "entropy", "prototype")
# A scorer maps the probed low-rank outputs o (batch, n_adapters, out_features) to scores
# (batch, n_adapters); higher means more relevant. Its __name__ is recorded as the signal.
Scorer = Callable[["torch.Tensor"], "torch.Tensor"]
Weighting = Literal["auto", "proportional", "softmax", "uniform"]
WEIGHTINGS: tuple[str, ...] = ("auto", "proportional", "softmax", "uniform")
FinishReason = Literal["stop", "length"]
# The dtype names accepted wherever a dtype is named (engine, CLI, integrations, Ray Serve).
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class RoutingConfig:
    """How LoGo picks and weighs adapters for a request (DESIGN.md section 1).

    The defaults reproduce the paper's method, with two documented differences: k = 3 (small
    libraries) and the probe reads the probed module's real input in a pass with no adapter active.
    A library folder may ship its own measured defaults (``routing.json``, see
    :meth:`from_dict`), which ``LoGoEngine.from_pretrained`` applies unless ``routing=`` is given.

    Ranking and weights: adapters are ranked by their *ranking score*: the raw signal (the paper),
    or per-adapter z-scores when calibrated (see :class:`Calibration`). Weights always come from
    the ranking scores, so an adapter ranked above another never gets less weight.
    """

    top_k: int = 3  # adapters kept per request (paper's code: 20 of 260)
    # "norm": ||o_i||_2; "entropy": 1 / (H(softmax(o_i)) + 1e-6); "prototype": cosine similarity
    # of the probed hidden state with each adapter's centroid over its example prompts (see
    # Prototypes; needs engine.calibrate({adapter: prompts})); or a callable scorer.
    signal: Signal | Scorer = "norm"
    probe_layer: int = -1  # decoder block to read; negative counts from the end
    probe_module: str = "q_proj"  # adapted Linear inside that block, by (suffix of) its name
    probe_input: Literal["module", "residual"] = (
        "module"  # "residual": the paper code's pre-norm input
    )
    probe_tokens: Literal["last", "mean"] = "last"  # last prompt token, or the mean over the prompt
    # "proportional": w_i = r_i / sum(r_kept) over the kept ranking scores r (negative z-scores
    # count as 0); "softmax": softmax(r / temperature); "uniform"; "auto": proportional on raw
    # scores (the paper), softmax on calibrated ones.
    weighting: Weighting = "auto"
    temperature: float = 1.0  # softmax temperature over the kept ranking scores
    min_score: float | None = None  # drop kept adapters whose raw score is below this
    # Abstention: drop kept adapters whose ranking score (z-score when calibrated, the similarity
    # for "prototype") is below this; when none is left the request runs on the base model and
    # the Selection says why. None: never abstain.
    abstain_below: float | None = None
    # Rank by per-adapter z-scores (see Calibration). None: when the engine holds statistics for
    # this probe setting (engine.calibrate, or a library's calibration.json); True: require them;
    # False: raw scores, as in the paper.
    calibrated: bool | None = None
    # Sticky selection within a conversation (None: off, every turn routes afresh). When a prompt
    # continues a generation the prefill cache holds (sharing at least half of its tokens), keep
    # that generation's mixture unless this turn's top adapter outranks the mixture's top adapter
    # by more than this margin, in ranking-score units (z-scores when calibrated, raw scores
    # otherwise). A kept mixture lets the prefill cache reuse the conversation's KV.
    sticky_margin: float | None = None
    # What the probe reads: "prompt" (the whole rendered prompt, as in the paper) or
    # "last_user_turn" (the last user message alone, rendered as a one-message chat): its cost
    # no longer grows with the history, and the steps of an agent's tool loop, which share their
    # last user message, route identically (so the prefill cache keeps hitting).
    probe_scope: Literal["prompt", "last_user_turn"] = "prompt"

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise RoutingConfigError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if not callable(self.signal) and self.signal not in SIGNALS:
            raise RoutingConfigError(
                f"signal must be one of {SIGNALS} or a callable scorer, got {self.signal!r}"
            )
        if isinstance(self.probe_layer, bool) or not isinstance(self.probe_layer, int):
            raise RoutingConfigError(f"probe_layer must be an int, got {self.probe_layer!r}")
        if not isinstance(self.probe_module, str) or not self.probe_module.strip():
            raise RoutingConfigError(
                f"probe_module must be a module name, got {self.probe_module!r}"
            )
        if self.probe_input not in ("module", "residual"):
            raise RoutingConfigError(
                f"probe_input must be 'module' or 'residual', got {self.probe_input!r}"
            )
        if self.probe_tokens not in ("last", "mean"):
            raise RoutingConfigError(
                f"probe_tokens must be 'last' or 'mean', got {self.probe_tokens!r}"
            )
        if self.weighting not in WEIGHTINGS:
            raise RoutingConfigError(
                f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}"
            )
        if not _finite(self.temperature) or self.temperature <= 0:
            raise RoutingConfigError(
                f"temperature must be a finite float > 0, got {self.temperature!r}"
            )
        if self.calibrated is not None and not isinstance(self.calibrated, bool):
            raise RoutingConfigError(f"calibrated must be a bool or None, got {self.calibrated!r}")
        for name in ("min_score", "abstain_below"):
            value = getattr(self, name)
            if value is not None and not _finite(value):
                raise RoutingConfigError(f"{name} must be a finite float or None, got {value!r}")
        if self.probe_scope not in ("prompt", "last_user_turn"):
            raise RoutingConfigError(
                f"probe_scope must be 'prompt' or 'last_user_turn', got {self.probe_scope!r}"
            )
        if self.sticky_margin is not None and (
            not _finite(self.sticky_margin) or self.sticky_margin < 0
        ):
            raise RoutingConfigError(
                f"sticky_margin must be a finite float >= 0 or None, got {self.sticky_margin!r}"
            )

    @property
    def signal_name(self) -> str:
        """The signal as recorded in a :class:`Selection`."""
        if isinstance(self.signal, str):
            return self.signal
        return getattr(self.signal, "__name__", type(self.signal).__name__)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (a callable signal cannot be written)."""
        if callable(self.signal):
            raise RoutingConfigError("a RoutingConfig with a callable signal cannot be saved")
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "routing") -> RoutingConfig:
        """Build from a JSON object (a library's ``routing.json``); unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise RoutingConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RoutingConfigError(
                f"{source}: unknown routing fields {unknown}; known: {sorted(known)}"
            )
        return cls(**data)


def check_dtype_name(name: Any, *, what: str = "dtype") -> str:
    """``name`` if it is one of :data:`DTYPES`; :class:`InvalidRequestError` otherwise.

    Torch-free (remote clients check their settings with it).
    """
    if not isinstance(name, str) or name not in DTYPES:
        raise InvalidRequestError(f"{what} must be one of {list(DTYPES)}, got {name!r}")
    return name


def parse_dtype(given: torch.dtype | str | None, *, what: str = "dtype") -> torch.dtype | None:
    """A floating torch dtype, given as itself or by a name in :data:`DTYPES`; None stays None."""
    if given is None:
        return None
    import torch

    if isinstance(given, torch.dtype):
        if not given.is_floating_point:
            raise InvalidRequestError(f"{what} must be a floating torch dtype, got {given!r}")
        return given
    dtype: torch.dtype = getattr(torch, check_dtype_name(given, what=what))
    return dtype


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Selection(_Frozen):
    """Which adapters answered a request, with what weights, and why.

    ``adapters`` are ordered by weight, descending; ``weights`` sum to 1 (both empty for the base
    model). ``scores`` holds every adapter's raw probe score (empty for a pinned mixture);
    ``rank_scores`` the scores that ranked and weighted them when those differ from the raw ones
    (z-scores when calibrated). ``abstained`` is True when routing chose the base model because
    no adapter stood out, and ``reason`` says why (also when some top-k adapters were dropped).
    ``served_weights`` is set only when a generation backend served other weights than the
    routed ones (the vLLM backend's optional ``weight_grid`` rounding); it aligns with
    ``adapters``.
    """

    adapters: list[str] = Field(default_factory=list)
    weights: list[float] = Field(default_factory=list)
    scores: dict[str, float] = Field(default_factory=dict)
    rank_scores: dict[str, float] = Field(default_factory=dict)
    signal: str | None = None
    top_k: int | None = None
    probe_layer: int | None = None
    probe_module: str | None = None
    probe_ms: float = 0.0
    probe_cached_tokens: int = 0  # prompt tokens whose probe KV came from the probe cache
    pinned: bool = False
    calibrated: bool = False
    abstained: bool = False
    reason: str | None = None
    served_weights: list[float] | None = None
    sticky: bool = False  # the mixture was kept from the conversation (RoutingConfig.sticky_margin)

    @property
    def mixture(self) -> dict[str, float]:
        """``{adapter: weight}``, in weight order (the routed weights)."""
        return dict(zip(self.adapters, self.weights, strict=True))

    @property
    def served_mixture(self) -> dict[str, float]:
        """``{adapter: weight}`` as generated: ``served_weights`` when set, else ``weights``."""
        weights = self.weights if self.served_weights is None else self.served_weights
        return dict(zip(self.adapters, weights, strict=True))


class Calibration(_Frozen):
    """Per-adapter statistics of raw probe scores over reference prompts.

    Raw norms are not comparable across adapters (an adapter with a large B scores high on every
    prompt). With ``RoutingConfig(calibrated=True)`` adapters are ranked and weighted by
    z_i = (score_i - mean_i) / std_i. Made by ``engine.calibrate(prompts)`` for one probe setting
    and signal; ``source`` says what the reference prompts were: ``"prompts"`` (the caller's) or
    ``"random_tokens"`` (data-free: random token sequences, no data needed).
    """

    signal: str
    probe_layer: int
    probe_module: str
    probe_input: str
    probe_tokens: str
    mean: dict[str, float]
    std: dict[str, float]
    n_prompts: int
    source: Literal["prompts", "random_tokens"] = "prompts"


class Prototypes(_Frozen):
    """Per-adapter centroids of the probed hidden state over each adapter's example prompts.

    The ``"prototype"`` signal scores adapter i by cos(h - center, centroid_i - center), where h is
    the state the probe reads anyway (no extra compute per request) and ``center`` is the mean of
    the centroids. Made by ``engine.calibrate({adapter: example_prompts})`` for one probe setting.
    """

    probe_layer: int
    probe_module: str
    probe_input: str
    probe_tokens: str
    centroids: dict[str, list[float]]
    n_examples: dict[str, int]


class Usage(_Frozen):
    """Token counts of one call.

    ``cached_tokens``: prompt tokens whose keys and values came from the engine's prefill cache
    (not recomputed), as OpenAI's ``prompt_tokens_details.cached_tokens``; 0 when none were.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_tokens(self) -> int:
        """prompt_tokens + completion_tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class PrefixCacheConfig:
    """Byte budgets of the engine's prefix caches (DESIGN.md section 2); 0 turns one off.

    Each cache is LRU within its budget. Per token, a cache entry costs
    2 (K and V) x blocks x kv_heads x head_dim x dtype bytes: ~46 KB for SmolLM2-135M in fp32,
    so the default budgets hold ~5,800 tokens each there.
    """

    probe_bytes: int = 256 * 2**20  # base-only KV of the probe pass, reused by later probes
    prefill_bytes: int = 256 * 2**20  # KV of generations, per mixture, reused by later prefills

    def __post_init__(self) -> None:
        for name in ("probe_bytes", "prefill_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequestError(f"{name} must be an int >= 0, got {value!r}")

    @classmethod
    def off(cls) -> PrefixCacheConfig:
        """No prefix caching: every call probes and prefills its whole prompt."""
        return cls(probe_bytes=0, prefill_bytes=0)


class ToolCall(_Frozen):
    """A tool call parsed from the model's output (OpenAI-style: a name and JSON arguments)."""

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class InvalidToolCall(_Frozen):
    """A tool call the model wrote that does not parse: kept apart from the answer's content."""

    name: str | None = None
    """The tool it meant, when the text still shows one."""
    arguments: str
    """The call's raw text (for a ``<tool_call>`` block: the whole block, markup included)."""
    error: str
    """Why it is not a valid call."""


class Generation(_Frozen):
    """The result of one generation: new text only (special tokens skipped, not stripped).

    With ``tools`` passed, the engine parses the answer once: ``content`` is the text without any
    tool-call markup, ``tool_calls`` the calls that parse, ``invalid_tool_calls`` those that do not
    (a caller never has to show raw markup as the answer). Without tools, ``content == text``.
    """

    text: str
    selection: Selection
    usage: Usage
    finish_reason: FinishReason
    content: str = ""
    """The answer without tool-call markup (``text`` itself when no tools were passed)."""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    """Tool calls parsed from ``text``; filled only when the request passed ``tools``."""
    invalid_tool_calls: list[InvalidToolCall] = Field(default_factory=list)
    """Tool calls in ``text`` that do not parse; filled only when the request passed ``tools``."""

    @model_validator(mode="before")
    @classmethod
    def _content_defaults_to_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and "content" not in data and "text" in data:
            return {**data, "content": data["text"]}
        return data

"""Property-based tests: arbitrary prompts, message lists and routing configs never crash the
engine other than with its documented errors; weights sum to 1; routing is deterministic."""

from __future__ import annotations

import pytest
import tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logo_engine import LoGoEngine, LoGoError, RoutingConfig
from logo_engine.errors import InvalidRequestError, RoutingConfigError

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

text = st.text(st.characters(codec="utf-8"), min_size=0, max_size=300)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "other"]),
            "content": st.one_of(text, st.none(), st.integers()),
        }
    ),
    max_size=4,
)


@pytest.fixture(scope="module")
def eng(tokenizer, adapter_dir):
    engine = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir)
    yield engine
    engine.close()


@SETTINGS
@given(prompt=st.one_of(text, messages))
def test_any_prompt_routes_or_fails_cleanly(eng, prompt):
    try:
        first = eng.route(prompt)
    except InvalidRequestError:
        return
    assert sum(first.weights) == pytest.approx(1.0)
    again = eng.route(prompt)
    assert again.adapters == first.adapters
    assert again.weights == pytest.approx(first.weights, rel=1e-5)
    assert again.scores == pytest.approx(first.scores, rel=1e-5)


@SETTINGS
@given(prompt=text, n=st.integers(1, 6), temperature=st.sampled_from([0.0, 0.7]))
def test_any_prompt_generates_or_fails_cleanly(eng, prompt, n, temperature):
    try:
        out = eng.generate(prompt, max_new_tokens=n, temperature=temperature, seed=1)
    except InvalidRequestError:
        return
    assert out.usage.completion_tokens <= n
    assert isinstance(out.text, str)


@SETTINGS
@given(
    top_k=st.integers(-2, 6),
    signal=st.sampled_from(["norm", "entropy", "cosine"]),
    probe_layer=st.integers(-4, 4),
    probe_module=st.sampled_from(["q_proj", "self_attn.q_proj", "v_proj", "k_proj", "mlp", ""]),
    weighting=st.sampled_from(["proportional", "softmax", "uniform", "max"]),
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    probe_tokens=st.sampled_from(["last", "mean"]),
)
def test_any_routing_config_routes_or_fails_cleanly(
    eng, top_k, signal, probe_layer, probe_module, weighting, temperature, probe_tokens
):
    try:
        routing = RoutingConfig(
            top_k=top_k,
            signal=signal,
            probe_layer=probe_layer,
            probe_module=probe_module,
            weighting=weighting,
            temperature=temperature,
            probe_tokens=probe_tokens,
        )
        sel = eng.route("hello abc 12", routing=routing)
    except RoutingConfigError:
        return
    assert len(sel.adapters) == top_k
    assert sum(sel.weights) == pytest.approx(1.0)
    assert all(w >= 0 for w in sel.weights)


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(["a", "b", "c", "zz"]),
        st.floats(allow_nan=True, allow_infinity=True),
        max_size=3,
    )
)
def test_any_pinned_mixture_works_or_fails_cleanly(eng, mixture):
    try:
        out = eng.generate("hello", adapters=mixture, max_new_tokens=2)
    except LoGoError:
        return
    if out.selection.adapters:
        assert sum(out.selection.weights) == pytest.approx(1.0)
    assert out.selection.pinned

"""Property-based tests: arbitrary prompts, message lists, sampling values, routing configs and
adapter configs never crash the engine other than with its documented errors (refused before any
model forward where the input is at fault); weights sum to 1; routing is deterministic."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import strategies
import tiny
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from logo_engine import LoGoEngine, LoGoError, RoutingConfig
from logo_engine.errors import (
    AdapterIncompatibleError,
    AdapterLoadError,
    InvalidRequestError,
    RoutingConfigError,
)

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
    assert out.usage.prompt_tokens == eng.count_tokens(prompt)
    assert out.usage.completion_tokens <= n
    if out.finish_reason == "length":
        assert out.usage.completion_tokens == n
    # Reproducible (greedy, or sampled with the same seed), and streamed alike.
    again = eng.generate(prompt, max_new_tokens=n, temperature=temperature, seed=1)
    assert again.text == out.text and again.selection.adapters == out.selection.adapters
    stream = eng.stream(prompt, max_new_tokens=n, temperature=temperature, seed=1)
    assert "".join(stream) == out.text
    # Repeats reuse the prefill cache (at most the prompt less one token: logits need a forward).
    assert again.usage.cached_tokens <= again.usage.prompt_tokens - 1
    counts = {"cached_tokens"}  # what was cached differs between calls, never the counts
    assert stream.generation is not None
    assert stream.generation.usage.model_dump(exclude=counts) == out.usage.model_dump(
        exclude=counts
    )


# Adapted in both layers of the `adapter_dir` library. The residual stream (hidden size) can only be
# fed to modules that read it: the attention projections.
ADAPTED = ["q_proj", "self_attn.q_proj", "v_proj", "k_proj", "o_proj", "down_proj"]
READS_RESIDUAL = ["q_proj", "self_attn.q_proj", "v_proj", "k_proj"]


@SETTINGS
@given(
    top_k=st.integers(1, 3),
    signal=st.sampled_from(["norm", "entropy"]),
    probe_layer=st.sampled_from([-2, -1, 0, 1]),
    probe=st.one_of(
        st.tuples(st.sampled_from(ADAPTED), st.just("module")),
        st.tuples(st.sampled_from(READS_RESIDUAL), st.just("residual")),
    ),
    probe_tokens=st.sampled_from(["last", "mean"]),
    weighting=st.sampled_from(["proportional", "softmax", "uniform"]),
    temperature=st.floats(0.05, 20.0),
)
def test_any_valid_routing_config_routes(
    eng, top_k, signal, probe_layer, probe, probe_tokens, weighting, temperature
):
    probe_module, probe_input = probe
    routing = RoutingConfig(
        top_k=top_k,
        signal=signal,
        probe_layer=probe_layer,
        probe_module=probe_module,
        probe_input=probe_input,
        probe_tokens=probe_tokens,
        weighting=weighting,
        temperature=temperature,
        calibrated=False,  # the paper's rule: exactly top_k adapters
    )
    sel = eng.route("hello abc 12", routing=routing)
    assert len(sel.adapters) == top_k and set(sel.scores) == {"a", "b", "c"}
    assert sum(sel.weights) == pytest.approx(1.0) and all(w >= 0 for w in sel.weights)
    assert sel.weights == sorted(sel.weights, reverse=True)
    ranked = sorted(sel.scores, key=lambda name: -sel.scores[name])
    assert set(sel.adapters) == set(ranked[:top_k]) or len(set(sel.scores.values())) < 3
    assert sel.signal == signal and sel.top_k == top_k
    assert eng.route("hello abc 12", routing=routing).adapters == sel.adapters


def test_residual_probe_on_a_module_that_does_not_read_the_residual_is_refused(eng):
    routing = RoutingConfig(top_k=1, probe_module="down_proj", probe_input="residual")
    with pytest.raises(RoutingConfigError):
        eng.route("hello abc 12", routing=routing)


INVALID_FIELDS = st.one_of(
    st.fixed_dictionaries({"top_k": st.sampled_from([0, -1, 4, True, 2.0])}),
    st.fixed_dictionaries({"signal": st.sampled_from(["cosine", "", "NORM"])}),
    st.fixed_dictionaries({"probe_layer": st.sampled_from([2, 5, -3, True])}),
    st.fixed_dictionaries({"probe_module": st.sampled_from(["", "mlp", "gate_proj", "proj"])}),
    st.fixed_dictionaries({"weighting": st.sampled_from(["max", "", "Softmax"])}),
    st.fixed_dictionaries(
        {"temperature": st.sampled_from([0.0, -1.0, float("nan"), float("inf"), "1"])}
    ),
    st.fixed_dictionaries({"probe_tokens": st.sampled_from(["first", ""])}),
    st.fixed_dictionaries({"min_score": st.sampled_from([float("nan"), float("-inf")])}),
    st.fixed_dictionaries({"calibrated": st.just(True)}),  # no statistics held
)


@SETTINGS
@given(bad=INVALID_FIELDS, top_k=st.integers(1, 3))
def test_any_invalid_routing_config_is_refused(eng, bad, top_k):
    with pytest.raises(RoutingConfigError):
        eng.route("hello abc 12", routing=RoutingConfig(**{"top_k": top_k, **bad}))


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


@SETTINGS
@given(
    prompt=st.one_of(
        strategies.unicode_text,
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user"]), "content": strategies.unicode_text}
            ),
            max_size=3,
        ),
    )
)
def test_any_unicode_prompt_is_served_or_refused_before_any_forward(eng, prompt):
    with tiny.ForwardCounter(eng.model) as forwards:
        try:
            out = eng.generate(prompt, max_new_tokens=2)
        except InvalidRequestError:
            assert forwards.n == 0
            return
    assert isinstance(out.text, str)
    out.text.encode("utf-8")  # what comes back is valid unicode


@SETTINGS
@given(
    temperature=strategies.extreme_floats,
    top_p=strategies.extreme_floats,
    seed=st.one_of(st.none(), strategies.extreme_ints),
)
def test_any_sampling_values_are_served_or_refused_before_any_forward(
    eng, temperature, top_p, seed
):
    with tiny.ForwardCounter(eng.model) as forwards:
        try:
            out = eng.generate(
                "hello", max_new_tokens=2, temperature=temperature, top_p=top_p, seed=seed
            )
        except InvalidRequestError:
            assert forwards.n == 0
            return
    assert math.isfinite(temperature) and temperature >= 0 and 0 < top_p <= 1
    assert 1 <= out.usage.completion_tokens <= 2


@pytest.fixture(scope="module")
def fuzz_engine(tokenizer, adapter_dir):
    engine = LoGoEngine(tiny.tiny_model(), tokenizer, adapters={"a": adapter_dir / "a"})
    engine.names = itertools.count()  # each example loads under a new name
    yield engine
    engine.close()


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(config=strategies.adapter_configs(r=4, alpha=8.0))
def test_any_adapter_config_loads_cleanly_or_gets_an_adapter_error(fuzz_engine, config):
    eng = fuzz_engine
    name = f"fuzzed{next(eng.names)}"
    folder = Path(tempfile.mkdtemp(prefix="config-"))
    try:
        shutil.copy(eng.library.adapters[0].path / "adapter_model.safetensors", folder)
        (folder / "adapter_config.json").write_text(json.dumps(config))  # NaN/Infinity included
        names = list(eng.adapter_names)
        with tiny.ForwardCounter(eng.model) as forwards:
            try:
                eng.load_adapters({name: folder})
            except (AdapterIncompatibleError, AdapterLoadError) as exc:
                assert forwards.n == 0 and eng.adapter_names == names
                event(f"refused: {type(exc).__name__}")
                return
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    event("loaded")
    for f in eng.library.factors(name).values():
        assert torch.isfinite(f.lora_a).all() and torch.isfinite(f.lora_b).all()
    sel = eng.route("hello abc", routing=RoutingConfig(top_k=1))
    assert all(math.isfinite(v) for v in sel.scores.values())
    assert eng.generate("hello", adapters={name: 1.0}, max_new_tokens=2).usage.completion_tokens

"""Hostile and careless inputs (issue 13): each is refused with a typed error before any model
forward, or handled correctly, and the engine is unchanged and correct afterwards.

Cases: poisoned scalings and scorers (1), calibration files (6), malformed adapter configs and
tensors (7), sampling and prompt edge cases (8), overflowing pinned weights (9), links out of an
adapter folder and mixed ``load_adapters`` lists (10).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from logo_engine import (
    AdapterIncompatibleError,
    AdapterLoadError,
    Calibration,
    InvalidRequestError,
    LoGoEngine,
    LoGoError,
    NumericalError,
    RoutingConfig,
    RoutingConfigError,
)
from logo_engine.library import read_adapter

PROBE = ["hello abc", "12 34 + 5"]


def snapshot(engine):
    """What must not change after a refused call: names, scores, routed and pinned text."""
    return (
        list(engine.adapter_names),
        [engine.route(p, routing=RoutingConfig(top_k=1)).scores for p in PROBE],
        [engine.generate(p, max_new_tokens=6).text for p in PROBE],
        engine.generate(PROBE[0], adapters={"a": 0.5, "b": 0.5}, max_new_tokens=6).text,
    )


def refused_before_forward(engine, call, error, match=None):
    """``call()`` raises ``error`` with no model forward, and the engine is unchanged after."""
    before = snapshot(engine)
    with tiny.ForwardCounter(engine.model) as forwards:
        with pytest.raises(error, match=match) as info:
            call()
    assert forwards.n == 0, f"{forwards.n} model forward(s) ran before the refusal"
    assert isinstance(info.value, LoGoError)
    assert snapshot(engine) == before
    return info.value


def _copy(src, dst, config=None, state=None, raw_config=None):
    shutil.copytree(src, dst)
    if config is not None or raw_config is not None:
        path = dst / "adapter_config.json"
        data = json.loads(path.read_text())
        if config is not None:
            config(data)
        path.write_text(raw_config(data) if raw_config else json.dumps(data))
    if state is not None:
        path = dst / "adapter_model.safetensors"
        tensors = load_file(path)
        state(tensors)
        save_file(tensors, path)
    return dst


# ---------------------------------------------------------------- 1: non-finite scalings, scores
@pytest.mark.parametrize(
    "raw_alpha", ["NaN", "Infinity", "-Infinity", "1e39", "1e308"], ids=lambda a: f"alpha={a}"
)
def test_non_finite_or_overflowing_scaling_is_refused(engine, adapter_dir, tmp_path, raw_alpha):
    # Python's json reads NaN/Infinity; 1e39 and 1e308 are finite doubles whose alpha / r times
    # lora_B overflows float32.
    path = _copy(
        adapter_dir / "a",
        tmp_path / "poison",
        raw_config=lambda c: json.dumps(c).replace('"lora_alpha": 8', f'"lora_alpha": {raw_alpha}'),
    )
    assert raw_alpha in (path / "adapter_config.json").read_text()
    refused_before_forward(
        engine, lambda: engine.load_adapters({"poison": path}), AdapterIncompatibleError
    )


def test_overflowing_alpha_pattern_is_refused(engine, adapter_dir, tmp_path):
    path = _copy(
        adapter_dir / "a", tmp_path / "poison", lambda c: c.update(alpha_pattern={"q_proj": 1e39})
    )
    refused_before_forward(
        engine,
        lambda: engine.load_adapters({"poison": path}),
        AdapterIncompatibleError,
        "lora_alpha",
    )


def test_scaling_that_overflows_only_the_engine_dtype_is_refused(tokenizer, adapter_dir, tmp_path):
    # The same delta, moved into B: scaling · B reaches ~2e5, fine in float32, inf in float16.
    def move(state):
        for key in state:
            state[key] *= 1e-6 if ".lora_A." in key else 2e5

    path = _copy(adapter_dir / "a", tmp_path / "big", state=move)
    LoGoEngine(tiny.tiny_model(), tokenizer).load_adapters({"big": path})  # float32: fine
    engine = LoGoEngine(tiny.tiny_model().to(torch.float16), tokenizer)
    with pytest.raises(AdapterIncompatibleError, match="float16"):
        engine.load_adapters({"big": path})
    assert engine.adapter_names == []


def test_delta_far_larger_than_the_base_weight_is_refused(engine, adapter_dir, tmp_path):
    path = _copy(adapter_dir / "a", tmp_path / "loud", lambda c: c.update(lora_alpha=1e7))
    read_adapter("loud", path)  # finite on its own...
    refused_before_forward(  # ...but 10^6 times the base weight
        engine, lambda: engine.load_adapters({"loud": path}), AdapterIncompatibleError, "times"
    )
    engine.load_adapters(
        {"firm": _copy(adapter_dir / "a", tmp_path / "firm", lambda c: c.update(lora_alpha=512))}
    )


def test_scorer_returning_nan_is_a_typed_error_and_the_engine_recovers(engine):
    def nan_scorer(outputs: torch.Tensor) -> torch.Tensor:
        scores = outputs.norm(dim=-1)
        scores[:, 0] = float("nan")
        return scores

    before = snapshot(engine)
    routing = RoutingConfig(top_k=1, signal=nan_scorer)
    with pytest.raises(RoutingConfigError, match="non-finite"):
        engine.route("hello", routing=routing)
    engine.clear_prefix_caches()  # else the repeated probe is read from the probe cache
    with tiny.ForwardCounter(engine.model) as forwards:
        with pytest.raises(RoutingConfigError, match="non-finite"):
            engine.generate("hello", routing=routing, max_new_tokens=4)
    assert forwards.n == 1  # the probe, and no decoding
    assert snapshot(engine) == before


def test_nan_activations_are_a_numerical_error_not_empty_text(engine):
    """NaN inside the model (probe or decoding) raises NumericalError; it never becomes ''."""
    layer = engine.model.model.layers[0]

    def poison(module, args, output):
        return output.fill_(float("nan")) if isinstance(output, torch.Tensor) else None

    before = snapshot(engine)
    handle = layer.mlp.register_forward_hook(poison)
    try:
        with pytest.raises(NumericalError, match="not finite"):
            engine.route("hello")
        with pytest.raises(NumericalError):  # the probe of a routed generate, before decoding
            engine.generate("hello", max_new_tokens=4)
        with pytest.raises(NumericalError, match="logits"):
            engine.generate("hello", adapters={"a": 1.0}, max_new_tokens=4)
        with pytest.raises(NumericalError):
            list(engine.stream("hello", adapters={}, max_new_tokens=4))
    finally:
        handle.remove()
    assert snapshot(engine) == before


# ---------------------------------------------------------------- 6: calibration files
def _calibration(engine):
    return engine.calibrate(["hello abc", "12 34 + 5", "+-*/ =", "zz top"])


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["mean"].update(a=float("nan")),
        lambda c: c["mean"].update(b=float("inf")),
        lambda c: c["std"].update(a=0.0),
        lambda c: c["std"].update(c=-1.0),
        lambda c: c["std"].update(a=float("nan")),
        lambda c: c.update(n_prompts=1),
    ],
    ids=["nan-mean", "inf-mean", "zero-std", "negative-std", "nan-std", "one-prompt"],
)
def test_poisoned_calibration_file_is_refused(engine, tmp_path, edit):
    calibration = _calibration(engine).model_dump(mode="json")
    edit(calibration)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps([calibration]))  # Python's json writes NaN / Infinity
    held = engine.calibrations
    refused_before_forward(engine, lambda: engine.load_calibrations(path), RoutingConfigError)
    assert engine.calibrations == held
    with pytest.raises(RoutingConfigError):
        engine.add_calibration(Calibration.model_validate(calibration))


def test_deeply_nested_calibration_file_is_refused(engine, tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    refused_before_forward(engine, lambda: engine.load_calibrations(path), RoutingConfigError)


def test_poisoned_prototypes_and_routing_defaults_are_refused(engine, tmp_path):
    from logo_engine import calibration as calib

    examples = {"a": ["hello abc", "abc def"], "b": ["12 34", "5 6 7"], "c": ["+-*/", "= <>"]}
    prototypes = engine.fit_prototypes(examples).model_dump(mode="json")
    prototypes["centroids"]["b"][3] = float("nan")
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"calibrations": [], "prototypes": [prototypes]}))
    held = engine.prototypes
    refused_before_forward(
        engine, lambda: engine.load_calibrations(path), RoutingConfigError, "not finite"
    )
    assert engine.prototypes == held
    routing_file = tmp_path / "routing.json"
    routing_file.write_text('{"top_k": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(RoutingConfigError, match="nested too deeply"):
        calib.load_routing(routing_file)


def test_calibrate_with_a_constant_adapter_score_still_loads(engine, adapter_dir, tmp_path):
    """An adapter absent at the probe module has std 0 over prompts: stored as the floor."""
    engine.load_adapters({"no_q1": _only_layer0(adapter_dir, tmp_path)})
    calibration = _calibration(engine)
    assert calibration.std["no_q1"] > 0
    engine.save_calibrations(tmp_path / "calibration.json")
    engine.load_calibrations(tmp_path / "calibration.json")


def _only_layer0(adapter_dir, tmp_path):
    def drop_layer1(state):
        for key in [k for k in state if ".layers.1." in k]:
            del state[key]

    return _copy(adapter_dir / "a", tmp_path / "layer0", state=drop_layer1)


# ---------------------------------------------------------------- 7: malformed configs, tensors
NESTED = "[" * 200_000 + "]" * 200_000
BAD_CONFIGS = {
    "r-string": ({"r": "eight"}, AdapterIncompatibleError, "'r'"),
    "r-null": ({"r": None}, AdapterIncompatibleError, "'r'"),
    "r-list": ({"r": [4]}, AdapterIncompatibleError, "'r'"),
    "r-float": ({"r": 4.7}, AdapterIncompatibleError, "'r'"),
    "r-bool": ({"r": True}, AdapterIncompatibleError, "'r'"),
    "r-zero": ({"r": 0}, AdapterIncompatibleError, "'r'"),
    "alpha-string": ({"lora_alpha": "x"}, AdapterIncompatibleError, "lora_alpha"),
    "rank-pattern-list": ({"rank_pattern": [1, 2]}, AdapterIncompatibleError, "rank_pattern"),
    "alpha-pattern-string": ({"alpha_pattern": "abc"}, AdapterIncompatibleError, "alpha_pattern"),
    "rank-pattern-bad-regex": ({"rank_pattern": {"(": 4}}, AdapterIncompatibleError, "regular"),
    "rank-pattern-zero": ({"rank_pattern": {"q_proj": 0}}, AdapterIncompatibleError, "q_proj"),
    "alpha-pattern-nan": (
        {"alpha_pattern": {"q_proj": float("nan")}},
        AdapterIncompatibleError,
        "finite",
    ),
    "rslora-string": ({"use_rslora": "yes"}, AdapterIncompatibleError, "use_rslora"),
    "peft-type-list": ({"peft_type": ["LORA"]}, AdapterIncompatibleError, "not a LoRA"),
    "base-model-number": (
        {"base_model_name_or_path": 7},
        AdapterIncompatibleError,
        "base_model",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_malformed_config_gets_a_typed_error(engine, adapter_dir, tmp_path, case):
    update, error, match = BAD_CONFIGS[case]
    path = _copy(adapter_dir / "a", tmp_path / case, lambda c: c.update(update))
    err = refused_before_forward(engine, lambda: engine.load_adapters({case: path}), error, match)
    assert case in str(err)


def test_deeply_nested_config_gets_a_typed_error(engine, adapter_dir, tmp_path):
    path = _copy(adapter_dir / "a", tmp_path / "nested")
    (path / "adapter_config.json").write_text(NESTED)
    refused_before_forward(
        engine, lambda: engine.load_adapters({"nested": path}), AdapterLoadError, "nested"
    )


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int32, torch.uint8])
def test_non_float_weights_are_refused(engine, adapter_dir, tmp_path, dtype):
    def cast(state):
        for key in state:
            state[key] = (state[key] * 10).to(dtype)

    path = _copy(adapter_dir / "a", tmp_path / "ints", state=cast)
    refused_before_forward(
        engine, lambda: engine.load_adapters({"ints": path}), AdapterIncompatibleError, "floating"
    )


def test_rank_zero_tensors_are_refused(engine, adapter_dir, tmp_path):
    def rank0(state):
        for key in state:
            shape = list(state[key].shape)
            shape[0 if ".lora_A." in key else 1] = 0
            state[key] = torch.zeros(shape)

    path = _copy(adapter_dir / "a", tmp_path / "rank0", lambda c: c.pop("r"), state=rank0)
    refused_before_forward(
        engine, lambda: engine.load_adapters({"rank0": path}), AdapterIncompatibleError, "rank 0"
    )


def test_valid_config_variants_still_load(engine, adapter_dir, tmp_path):
    """What peft writes (and what it leaves out) keeps loading: no false refusals."""
    cases = {
        "minimal": lambda c: [c.pop(k) for k in list(c) if k not in ("peft_type",)],
        "pattern": lambda c: c.update(rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 2}),
        "lowercase": lambda c: c.update(peft_type="lora", bias=None, modules_to_save=[]),
        "int-alpha": lambda c: c.update(lora_alpha=16),
    }
    for name, edit in cases.items():
        engine.load_adapters({name: _copy(adapter_dir / "a", tmp_path / name, edit)})
    factors = engine.library.factors("pattern")
    base = engine.library.factors("a")
    q = "model.layers.0.self_attn.q_proj"
    v = "model.layers.0.self_attn.v_proj"
    torch.testing.assert_close(factors[q].lora_b, base[q].lora_b)  # alpha 8 / r 4 as before
    torch.testing.assert_close(factors[v].lora_b, base[v].lora_b * (2 / 8))  # alpha 2 at v_proj


# ---------------------------------------------------------------- 8: sampling and prompt edges
def test_tiny_temperature_is_the_greedy_limit(engine):
    greedy = engine.generate("hello abc", adapters={"a": 1.0}, max_new_tokens=12)
    for t in (1e-45, 5e-324, 1e-300):
        out = engine.generate(
            "hello abc", adapters={"a": 1.0}, max_new_tokens=12, temperature=t, seed=3
        )
        assert out.text == greedy.text


def test_huge_temperature_samples_reproducibly(engine):
    one = engine.generate("hello", max_new_tokens=8, temperature=1.7e308, seed=5)
    two = engine.generate("hello", max_new_tokens=8, temperature=1.7e308, seed=5)
    assert one.text == two.text and one.usage.completion_tokens >= 1


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_out_of_range_seed_is_refused_before_the_probe(engine, seed):
    refused_before_forward(
        engine,
        lambda: engine.generate("hello", temperature=0.7, seed=seed, max_new_tokens=3),
        InvalidRequestError,
        "seed",
    )


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_seed_range_edges_work(engine, seed):
    out = engine.generate("hello", temperature=0.7, seed=seed, max_new_tokens=3)
    assert out.usage.completion_tokens >= 1


SURROGATE = "\ud800"
BAD_PROMPTS = {
    "surrogate-string": dict(prompt="hi " + SURROGATE),
    "surrogate-message": dict(prompt=[{"role": "user", "content": "ok" + SURROGATE}]),
    "surrogate-system": dict(
        prompt=[{"role": "system", "content": SURROGATE}, {"role": "user", "content": "hi"}]
    ),
    "all-empty-user": dict(prompt=[{"role": "user", "content": ""}]),
    "all-empty-many": dict(
        prompt=[{"role": "system", "content": ""}, {"role": "user", "content": None}]
    ),
    "tool-not-json": dict(
        prompt="hi", tools=[{"type": "function", "function": {"name": "f", "x": object()}}]
    ),
    "tool-nan": dict(
        prompt="hi", tools=[{"type": "function", "function": {"name": "f", "x": float("nan")}}]
    ),
    "tool-surrogate": dict(
        prompt="hi", tools=[{"type": "function", "function": {"name": "f" + SURROGATE}}]
    ),
    "tool-set": dict(
        prompt="hi", tools=[{"type": "function", "function": {"name": "f", "s": {1}}}]
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
@pytest.mark.parametrize("how", ["generate", "route", "stream", "count_tokens"])
def test_bad_prompt_is_refused_before_any_forward(engine, case, how):
    kwargs = dict(BAD_PROMPTS[case])
    prompt = kwargs.pop("prompt")

    def call():
        if how == "generate":
            return engine.generate(prompt, max_new_tokens=3, **kwargs)
        if how == "route":
            return engine.route(prompt, **kwargs)
        if how == "stream":
            return engine.stream(prompt, max_new_tokens=3, **kwargs)
        return engine.count_tokens(prompt, **kwargs)

    refused_before_forward(engine, call, InvalidRequestError)


def test_empty_content_is_fine_when_another_message_has_text(engine):
    out = engine.generate(
        [{"role": "system", "content": ""}, {"role": "user", "content": "hello"}], max_new_tokens=3
    )
    assert out.usage.completion_tokens >= 1


# ---------------------------------------------------------------- 9: overflowing pinned weights
@pytest.mark.parametrize(
    ("mixture", "equal_to"),
    [
        ({"a": 1e308, "b": 1e308}, {"a": 1.0, "b": 1.0}),
        ({"a": 1.7e308, "b": 1.7e308, "c": 1.7e308}, {"a": 1.0, "b": 1.0, "c": 1.0}),
        ({"a": 1.5e308, "b": 0.5e308}, {"a": 3.0, "b": 1.0}),
        ({"a": 5e-324, "b": 5e-324}, {"a": 1.0, "b": 1.0}),
    ],
)
def test_pinned_weights_that_overflow_their_sum(engine, mixture, equal_to):
    out = engine.generate("hello abc", adapters=mixture, max_new_tokens=8)
    expected = engine.generate("hello abc", adapters=equal_to, max_new_tokens=8)
    assert out.selection.weights == pytest.approx(expected.selection.weights)
    assert math.isclose(sum(out.selection.weights), 1.0)
    assert out.selection.adapters == expected.selection.adapters
    assert out.text == expected.text


# ---------------------------------------------------------------- 10: links and mixed sources
@pytest.mark.parametrize("which", ["adapter_model.safetensors", "adapter_config.json"])
def test_file_link_out_of_the_adapter_folder_is_refused(engine, adapter_dir, tmp_path, which):
    folder = tmp_path / "linked"
    folder.mkdir()
    outside = tmp_path / "outside"
    shutil.copytree(adapter_dir / "b", outside)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        if name == which:
            os.symlink(outside / name, folder / name)
        else:
            shutil.copy(adapter_dir / "b" / name, folder / name)
    refused_before_forward(
        engine, lambda: engine.load_adapters({"linked": folder}), AdapterLoadError, "outside"
    )


def test_links_inside_the_folder_and_hub_cache_layout_are_accepted(engine, adapter_dir, tmp_path):
    inside = tmp_path / "inside"
    shutil.copytree(adapter_dir / "b", inside)
    (inside / "adapter_model.safetensors").rename(inside / "weights.bin.real")
    os.symlink("weights.bin.real", inside / "adapter_model.safetensors")
    # huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--someone--b"
    snapshot_dir = repo / "snapshots" / "abc123"
    snapshot_dir.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, name in enumerate(("adapter_model.safetensors", "adapter_config.json")):
        shutil.copy(adapter_dir / "b" / name, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot_dir / name)
    engine.load_adapters({"inside": inside, "hub": snapshot_dir})
    expected = engine.generate("hello", adapters={"b": 1.0}, max_new_tokens=6).text
    for name in ("inside", "hub"):
        assert engine.generate("hello", adapters={name: 1.0}, max_new_tokens=6).text == expected


def test_load_adapters_with_adapters_and_paths_mixed(engine, adapter_dir, tmp_path):
    in_memory = read_adapter("mem", adapter_dir / "c")
    p1 = shutil.copytree(adapter_dir / "a", tmp_path / "p1")
    p2 = shutil.copytree(adapter_dir / "b", tmp_path / "p2")
    assert engine.load_adapters([in_memory, p1, str(p2)]) == ["mem", "p1", "p2"]
    assert engine.adapter_names[-3:] == ["mem", "p1", "p2"]
    for new, old in (("mem", "c"), ("p1", "a"), ("p2", "b")):
        got = engine.generate("hello", adapters={new: 1.0}, max_new_tokens=6).text
        assert got == engine.generate("hello", adapters={old: 1.0}, max_new_tokens=6).text


def test_in_memory_adapter_with_poisoned_scaling_is_refused(engine, adapter_dir):
    good = read_adapter("mem", adapter_dir / "a")
    module, f = next(iter(good.modules.items()))
    bad = type(good)(
        name="mem", modules={module: type(f)(f.lora_a, f.lora_b, scaling=float("nan"))}
    )
    refused_before_forward(
        engine, lambda: engine.load_adapters([bad]), AdapterIncompatibleError, "scaling"
    )
    refused_before_forward(
        engine, lambda: engine.load_adapters([bad, adapter_dir / "a"]), AdapterIncompatibleError
    )

"""Engine behaviour on a tiny real model: batching, streaming, async, stop strings, safety."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import tiny
import torch
from loop_witness import LoopWitness

from logo_engine import (
    ContextLengthError,
    GenerationError,
    InvalidRequestError,
    RoutingConfig,
    RoutingConfigError,
    Selection,
)
from logo_engine.errors import AdapterNotFoundError
from logo_engine.mixture import _CURRENT

PROMPTS = [
    "hello abc",
    "12 34 + 5",
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "+-*/ ok"}],
    "yes no ok",
]


def test_batch_equals_one_by_one(engine):
    routing = RoutingConfig(top_k=2)
    solo = [engine.generate(p, max_new_tokens=10, routing=routing) for p in PROMPTS]
    batch = engine.generate_batch(PROMPTS, max_new_tokens=10, routing=routing)
    assert len({tuple(g.selection.weights) for g in solo}) == len(PROMPTS), "rows route alike"
    for s, b in zip(solo, batch, strict=True):
        assert b.text == s.text
        assert b.selection.adapters == s.selection.adapters
        assert b.selection.weights == pytest.approx(s.selection.weights, rel=1e-5)
        assert b.finish_reason == s.finish_reason
        assert b.usage.prompt_tokens == s.usage.prompt_tokens  # cached_tokens may differ
        assert b.usage.completion_tokens == s.usage.completion_tokens


def test_batch_mixed_pinned_routed_and_base(engine):
    mixtures = [None, {"a": 1.0}, {}, {"b": 0.5, "c": 0.5}]
    batch = engine.generate_batch(PROMPTS, adapters=mixtures, max_new_tokens=8)
    for prompt, mixture, out in zip(PROMPTS, mixtures, batch, strict=True):
        solo = engine.generate(prompt, adapters=mixture, max_new_tokens=8)
        assert out.text == solo.text
        assert out.selection.pinned == (mixture is not None)
    assert batch[2].selection.adapters == []


def test_sampling_is_seeded_and_row_independent(engine):
    kw = dict(max_new_tokens=12, temperature=1.5, seed=7)
    a = engine.generate("hello abc", **kw)
    assert engine.generate("hello abc", **kw).text == a.text
    assert engine.generate_batch(["12 34", "hello abc"], **kw)[1].text == a.text
    others = {
        engine.generate("hello abc", max_new_tokens=12, temperature=1.5, seed=s).text
        for s in range(5)
    }
    assert len(others) > 1


def test_stream_matches_generate_and_exposes_selection(engine):
    full = engine.generate("hello abc", max_new_tokens=15)
    stream = engine.stream("hello abc", max_new_tokens=15)
    selection = stream.selection  # known before the first chunk
    chunks = list(stream)
    assert "".join(chunks) == full.text
    assert selection == stream.generation.selection
    # The same prompt again: the stream's prefill reuses the first call's cached KV.
    assert stream.generation.usage.prompt_tokens == full.usage.prompt_tokens
    assert stream.generation.usage.completion_tokens == full.usage.completion_tokens
    assert stream.generation.usage.cached_tokens == full.usage.prompt_tokens - 1


def _stop_after(engine, prompt, n_chars):
    text = engine.generate(prompt, adapters={}, max_new_tokens=30).text
    assert len(text) > n_chars + 4, text
    return text, text[n_chars : n_chars + 4]  # a stop string that spans several tokens


def test_stop_string_spanning_tokens(engine):
    text, stop = _stop_after(engine, "hello", 3)
    out = engine.generate("hello", adapters={}, max_new_tokens=30, stop=[stop, "\x00never"])
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop"
    streamed = engine.stream("hello", adapters={}, max_new_tokens=30, stop=stop)
    assert "".join(streamed) == out.text  # no part of the stop string leaks into the stream


def test_stream_early_break_ends_generation(engine):
    steps = []
    handle = engine.model.lm_head.register_forward_hook(lambda *a: steps.append(1))
    try:
        stream = engine.stream("hello", adapters={"a": 1.0}, max_new_tokens=50)
        for _ in stream:
            break
        stream.close()
        assert len(steps) <= 3
        assert _CURRENT.get() is None
    finally:
        handle.remove()
    assert engine.generate("hello", max_new_tokens=3).usage.completion_tokens >= 1


async def test_async_does_not_block_the_loop(engine):
    witness = LoopWitness()
    handle = engine.model.lm_head.register_forward_hook(witness.check)  # every model step

    async def calls() -> tuple[str, list[str]]:
        out = await engine.agenerate("hello abc", max_new_tokens=20)
        chunks = [c async for c in engine.astream("hello abc", max_new_tokens=20)]
        await engine.aroute("hello abc")
        await engine.agenerate_batch(["hello", "abc"], max_new_tokens=3)
        return out.text, chunks

    try:
        text, chunks = await witness.run(calls())
    finally:
        handle.remove()
    assert "".join(chunks) == text
    witness.assert_loop_was_free(min_checks=40)  # 20 + 20 decoding steps, at least


async def test_astream_cancel_frees_state(engine):
    stream = engine.astream("hello", adapters={"b": 1.0}, max_new_tokens=200)

    async def consume():
        async for _ in stream:
            await asyncio.sleep(0)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.generation is None
    out = await engine.agenerate("hello", adapters={"b": 1.0}, max_new_tokens=5)
    assert out.usage.completion_tokens >= 1


def test_concurrent_threads_equal_sequential(engine):
    calls = [
        dict(prompt=p, adapters=m, max_new_tokens=8)
        for p in PROMPTS
        for m in (None, {"a": 0.3, "c": 0.7}, {})
    ]
    expected = [
        engine.generate(c["prompt"], adapters=c["adapters"], max_new_tokens=8) for c in calls
    ]
    with ThreadPoolExecutor(8) as pool:
        got = list(
            pool.map(
                lambda c: engine.generate(c["prompt"], adapters=c["adapters"], max_new_tokens=8),
                calls * 2,
            )
        )
    for e, g in zip(expected * 2, got, strict=True):
        assert g.text == e.text and g.selection.adapters == e.selection.adapters


def test_exception_mid_generation_leaves_no_mixture(engine):
    base_text = engine.generate("hello", adapters={}, max_new_tokens=6).text
    calls = 0

    def explode(module, args, output):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected fault")

    handle = engine.model.model.layers[1].mlp.register_forward_hook(explode)
    try:
        with pytest.raises(GenerationError, match="injected fault"):
            engine.generate("hello", adapters={"a": 1.0}, max_new_tokens=6)
    finally:
        handle.remove()
    assert _CURRENT.get() is None
    assert engine.generate("hello", adapters={}, max_new_tokens=6).text == base_text


def test_concurrent_generation_does_not_see_other_mixture(engine):
    """A base-only call running while a mixed call is in flight gets base output."""
    base = engine.generate("hello", adapters={}, max_new_tokens=20).text
    start = threading.Event()

    def mixed():
        start.set()
        for _ in range(3):
            engine.generate("hello", adapters={"b": 1.0}, max_new_tokens=20)

    t = threading.Thread(target=mixed)
    t.start()
    start.wait()
    outs = [engine.generate("hello", adapters={}, max_new_tokens=20).text for _ in range(3)]
    t.join()
    assert outs == [base] * 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(prompt=""), InvalidRequestError, "empty"),
        (dict(prompt=[]), InvalidRequestError, "empty"),
        (dict(prompt=123), InvalidRequestError, "string or a list"),
        (dict(prompt=[{"role": "wizard", "content": "x"}]), InvalidRequestError, "role"),
        (dict(prompt=[{"role": "user", "content": 5}]), InvalidRequestError, "content"),
        (dict(max_new_tokens=0), InvalidRequestError, "max_new_tokens"),
        (dict(temperature=-1), InvalidRequestError, "temperature"),
        (dict(top_p=0), InvalidRequestError, "top_p"),
        (dict(stop=[""]), InvalidRequestError, "stop"),
        (dict(adapters={"nope": 1.0}), AdapterNotFoundError, "nope"),
        (dict(adapters={"a": -1.0}), InvalidRequestError, ">= 0"),
        (dict(adapters={"a": float("nan")}), InvalidRequestError, "finite"),
        (dict(adapters={"a": 0.0}), InvalidRequestError, "sum"),
        (dict(adapters=["a"]), InvalidRequestError, "mapping"),
        (dict(routing=RoutingConfig(top_k=4)), RoutingConfigError, "top_k"),
        (dict(routing=RoutingConfig(probe_layer=5)), RoutingConfigError, "probe_layer"),
        (dict(routing=RoutingConfig(probe_module="gate_proj")), RoutingConfigError, "probe_module"),
        (dict(max_new_tokens=1000), ContextLengthError, "context window"),
    ],
)
def test_bad_requests(engine, kwargs, error, match):
    prompt = kwargs.pop("prompt", "hello")
    with pytest.raises(error, match=match):
        engine.generate(prompt, **kwargs)
    with pytest.raises(error, match=match):
        engine.stream(prompt, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(top_k=0),
        dict(top_k=1.5),
        dict(signal="cosine"),
        dict(probe_input="x"),
        dict(weighting="max"),
        dict(temperature=0),
        dict(probe_layer="last"),
        dict(min_score=float("nan")),
    ],
)
def test_bad_routing_config(kwargs):
    with pytest.raises(RoutingConfigError):
        RoutingConfig(**kwargs)


def test_message_lists_need_a_template(tokenizer, adapter_dir):
    from logo_engine import LoGoEngine

    plain = tiny.tiny_tokenizer()
    plain.chat_template = None
    engine = LoGoEngine(tiny.tiny_model(), plain, adapters=adapter_dir)
    out = engine.generate("hello", max_new_tokens=3)  # a string is tokenized as it is
    assert engine._prepare("hello", None, None).input_ids == plain("hello")["input_ids"]
    assert out.usage.prompt_tokens == len(plain("hello")["input_ids"])
    with pytest.raises(InvalidRequestError, match="chat template"):
        engine.generate([{"role": "user", "content": "hi"}])


def test_weights_and_selection_shape(engine):
    sel = engine.route("hello abc", routing=RoutingConfig(top_k=3))
    assert sum(sel.weights) == pytest.approx(1.0)
    assert sel.weights == sorted(sel.weights, reverse=True)
    assert set(sel.scores) == {"a", "b", "c"} and sel.probe_ms > 0
    assert Selection.model_validate_json(sel.model_dump_json()) == sel  # JSON round trip
    for weighting in ("softmax", "uniform"):
        s = engine.route("hello abc", routing=RoutingConfig(top_k=2, weighting=weighting))
        assert sum(s.weights) == pytest.approx(1.0)
    capped = engine.route("hello abc", routing=RoutingConfig(top_k=3, min_score=1e9))
    assert capped.adapters == [] and capped.weights == []


def test_custom_scorer(engine):
    def negative_norm(outputs: torch.Tensor) -> torch.Tensor:
        return -outputs.norm(dim=-1)

    sel = engine.route(
        "hello", routing=RoutingConfig(top_k=1, signal=negative_norm, weighting="uniform")
    )
    assert sel.signal == "negative_norm"
    assert sel.adapters == [min(sel.scores, key=lambda n: -sel.scores[n])]


def test_usage_and_finish_reason(engine):
    free = engine.generate("hello", max_new_tokens=6, adapters={})
    # The tiny random model writes no end-of-turn token in 6 steps: the length limit ends it.
    assert free.finish_reason == "length" and free.usage.completion_tokens == 6
    assert free.usage.prompt_tokens == engine.count_tokens("hello")
    assert free.usage.total_tokens == free.usage.prompt_tokens + 6
    short = engine.generate("hello", max_new_tokens=2, adapters={})
    assert short.finish_reason == "length" and short.usage.completion_tokens == 2
    assert free.text.startswith(short.text)
    cut = free.text[len(free.text) // 2 :]  # a stop string the greedy answer is known to contain
    stopped = engine.generate("hello", max_new_tokens=6, adapters={}, stop=[cut])
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(cut)]
    assert stopped.usage.completion_tokens <= 6


def test_route_batch_is_one_probe_forward(engine):
    rows: list[int] = []
    first = engine.model.model.layers[0]
    handle = first.register_forward_hook(
        lambda mod, args, out: rows.append(tiny.forward_rows(args[0].shape[0]))
    )
    try:
        sels = engine.route_batch(["hello"] * 5 + ["12 34 +", "abc"])
    finally:
        handle.remove()
    assert rows == [7]  # one forward through the first block, all seven rows in it
    assert len(sels) == 7 and len({tuple(s.adapters) for s in sels[:5]}) == 1
    solo = engine.route("hello")  # a batched row routes as it would alone
    assert sels[0].adapters == solo.adapters
    assert sels[0].weights == pytest.approx(solo.weights, rel=1e-4)


def test_calibrated_routing_ranks_by_z_scores(engine):
    reference = ["hello abc", "12 34 + 5", "yes no ok", "+-*/ =", "abc 12 +", "zz top"]
    routing = RoutingConfig(top_k=1, calibrated=True)
    with pytest.raises(RoutingConfigError, match="calibrate"):
        engine.route("hello", routing=routing)
    assert not engine.route("hello", routing=RoutingConfig(top_k=1)).calibrated  # none held yet
    cal = engine.calibrate(reference, routing=routing)
    raw = engine.route("hello", routing=RoutingConfig(top_k=1, calibrated=False))
    sel = engine.route("hello", routing=routing)
    z = {n: (raw.scores[n] - cal.mean[n]) / cal.std[n] for n in raw.scores}
    assert sel.adapters == [max(z, key=z.get)] and sel.calibrated and not raw.calibrated
    assert sel.scores == pytest.approx(raw.scores)  # raw scores are still reported
    auto = engine.route("hello", routing=RoutingConfig(top_k=1))  # calibrated=None: use them
    assert auto.calibrated and auto.adapters == sel.adapters
    engine.load_adapters({"again": engine.library.adapters[0].path})
    with pytest.raises(RoutingConfigError, match="calibrate"):  # stale after the library changed
        engine.route("hello", routing=routing)


def test_calibrations_round_trip_through_a_library_folder(engine, adapter_dir, tmp_path):
    import shutil

    from logo_engine import LoGoEngine

    lib = tmp_path / "lib"
    shutil.copytree(adapter_dir, lib)
    routing = RoutingConfig(top_k=1, calibrated=True)
    engine.calibrate(["hello abc", "12 34 + 5", "+-*/ =", "zz top"], routing=routing)
    engine.save_calibrations(lib / "calibration.json")
    other = LoGoEngine(tiny.tiny_model(), engine.tokenizer, adapters=lib)
    other.load_calibrations(lib / "calibration.json")
    for prompt in ("hello", "12 +", "abc"):
        mine, theirs = engine.route(prompt, routing=routing), other.route(prompt, routing=routing)
        assert theirs.calibrated and theirs.adapters == mine.adapters
    assert other.calibrations == engine.calibrations
    with pytest.raises(RoutingConfigError, match="covers adapters"):
        bad = engine.calibrations[0].model_copy(update={"mean": {"x": 1.0}, "std": {"x": 1.0}})
        other.add_calibration(bad)

"""Engine life cycle under misuse (issue 13): shared models, closed engines, cancelled async
calls, mixed-rank memory, the final partial character, and fork after torch.

Cases: two engines on one model (2), calls on a closed engine (3), cancelled ``agenerate`` /
``agenerate_batch`` / ``aroute`` (4), one large-rank adapter beside small ones (5), a trailing
partial character (11), fork after torch ran (12).
"""

from __future__ import annotations

import asyncio
import copy
import gc
import os
import signal
import time
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file
from test_exactness import _engine_logits, _peft_model

from logo_engine import (
    AdapterMemoryError,
    EngineClosedError,
    LoGoEngine,
    LoGoError,
)
from logo_engine.library import read_adapter

IDS = torch.randint(3, 400, (2, 11), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- 2: two engines on one model
def _peft_logits(adapter_dir, mixture):
    oracle = _peft_model(adapter_dir, list(mixture), list(mixture.values()))
    with torch.inference_mode():
        return oracle(input_ids=IDS).logits


def test_second_engine_on_the_same_model_applies_the_mixture_once(tokenizer, adapter_dir):
    mixture = {"a": 0.6, "b": 0.4}
    expected = _peft_logits(adapter_dir, mixture)
    model = tiny.tiny_model()
    first = LoGoEngine(model, tokenizer, adapters=adapter_dir)
    second = LoGoEngine(model, tokenizer, adapters=adapter_dir)  # a re-run notebook cell
    for engine in (first, second):
        torch.testing.assert_close(_engine_logits(engine, IDS, mixture), expected)
    text = first.generate("hello abc", adapters=mixture, max_new_tokens=8).text
    assert second.generate("hello abc", adapters=mixture, max_new_tokens=8).text == text
    del first
    gc.collect()
    torch.testing.assert_close(_engine_logits(second, IDS, mixture), expected)
    third = LoGoEngine(model, tokenizer, adapters={"b": adapter_dir / "b", "a": adapter_dir / "a"})
    third.close()  # closing one engine leaves the others' hooks in place
    torch.testing.assert_close(_engine_logits(second, IDS, mixture), expected)
    second.close()
    with torch.inference_mode():  # the last engine gone: a plain transformers model again
        base = tiny.tiny_model()(input_ids=IDS).logits
        torch.testing.assert_close(model(input_ids=IDS).logits, base)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_engines_on_one_model_run_concurrently_with_their_own_mixtures(tokenizer, adapter_dir):
    model = tiny.tiny_model()
    one = LoGoEngine(model, tokenizer, adapters={"a": adapter_dir / "a"})
    two = LoGoEngine(model, tokenizer, adapters={"b": adapter_dir / "b"})
    solo_a = LoGoEngine(tiny.tiny_model(), tokenizer, adapters={"a": adapter_dir / "a"})
    solo_b = LoGoEngine(tiny.tiny_model(), tokenizer, adapters={"b": adapter_dir / "b"})
    expected = [
        solo_a.generate("hello", max_new_tokens=10).text,
        solo_b.generate("hello", max_new_tokens=10).text,
    ]

    async def both():
        return await asyncio.gather(
            one.agenerate("hello", max_new_tokens=10), two.agenerate("hello", max_new_tokens=10)
        )

    for _ in range(3):
        assert [g.text for g in asyncio.run(both())] == expected


def test_a_copy_of_a_hooked_model_is_refused(tokenizer, adapter_dir):
    model = tiny.tiny_model()
    engine = LoGoEngine(model, tokenizer, adapters=adapter_dir)
    copied = copy.deepcopy(model)  # carries the hooks, but no engine owns them
    with pytest.raises(LoGoError, match="already carries a LoGo hook"):
        LoGoEngine(copied, tokenizer, adapters=adapter_dir)
    engine.close()
    LoGoEngine(copy.deepcopy(model), tokenizer, adapters=adapter_dir).close()  # clean copy: fine


# ---------------------------------------------------------------- 3: a closed engine
CLOSED_CALLS = {
    "route": lambda e: e.route("hello"),
    "route_batch": lambda e: e.route_batch(["hello", "abc"]),
    "generate-routed": lambda e: e.generate("hello", max_new_tokens=3),
    "generate-pinned": lambda e: e.generate("hello", adapters={"a": 1.0}, max_new_tokens=3),
    "generate-base": lambda e: e.generate("hello", adapters={}, max_new_tokens=3),
    "generate_batch": lambda e: e.generate_batch(["a", "b"], adapters={"b": 1.0}),
    "stream": lambda e: e.stream("hello", adapters={"a": 1.0}),
    "astream": lambda e: e.astream("hello", adapters={"a": 1.0}),
    "agenerate": lambda e: asyncio.run(e.agenerate("hello", adapters={"a": 1.0})),
    "agenerate_batch": lambda e: asyncio.run(e.agenerate_batch(["hello"])),
    "aroute": lambda e: asyncio.run(e.aroute("hello")),
    "count_tokens": lambda e: e.count_tokens("hello"),
    "calibrate": lambda e: e.calibrate(["hello", "abc"]),
    "fit_prototypes": lambda e: e.fit_prototypes({"a": ["x"], "b": ["y"], "c": ["z"]}),
    "load_adapters": lambda e: e.load_adapters({"x": e.library.adapters[0].path}),
}


@pytest.mark.parametrize("call", sorted(CLOSED_CALLS))
def test_every_call_on_a_closed_engine_is_refused_before_any_work(engine, call):
    calibration = engine.calibrate(["hello abc", "12 34", "+-*/", "zz"])
    engine.close()
    engine.close()  # idempotent
    assert engine.closed
    with tiny.ForwardCounter(engine.model) as forwards:
        with pytest.raises(EngineClosedError, match="closed"):
            CLOSED_CALLS[call](engine)
        with pytest.raises(EngineClosedError):
            engine.add_calibration(calibration)
    assert forwards.n == 0


def test_close_during_a_stream_stops_it_with_an_error(engine):
    stream = engine.stream("hello", adapters={"b": 1.0}, max_new_tokens=50)
    first = next(stream)
    assert isinstance(first, str)
    engine.close()
    with tiny.ForwardCounter(engine.model) as forwards:
        with pytest.raises(EngineClosedError):
            for _ in stream:
                pass
    assert forwards.n <= 1  # at most the step in flight


def test_shared_engine_is_rebuilt_after_close(monkeypatch):
    built = []

    def fake_from_pretrained(cls, *args, **kwargs):
        engine = object.__new__(cls)
        built.append(engine)
        return engine

    monkeypatch.setattr(LoGoEngine, "from_pretrained", classmethod(fake_from_pretrained))
    monkeypatch.setattr(LoGoEngine, "_shared", {})
    first = LoGoEngine.shared("some/model")
    assert LoGoEngine.shared("some/model") is first
    first._closed = True  # what close() sets
    assert LoGoEngine.shared("some/model") is not first and len(built) == 2


# ---------------------------------------------------------------- 4: cancelled async calls
def _eos(engine):
    return sorted({engine.tokenizer.eos_token_id, engine.model.config.eos_token_id})


def _slow_endless(engine, delay, slept):
    """Each forward sleeps ``delay`` s (then counts itself in ``slept``), and end-of-turn is never
    chosen: generation only stops at max_new_tokens (or when cancelled)."""
    eos = _eos(engine)

    def slow(module, args):
        time.sleep(delay)
        slept.append(1)

    def no_eos(module, args, output):
        output[..., eos] = -1e4
        return output

    return [
        engine.model.register_forward_pre_hook(slow),
        engine.model.lm_head.register_forward_hook(no_eos),
    ]


ASYNC_CALLS = {
    "agenerate": lambda e: e.agenerate("hello", adapters={"a": 1.0}, max_new_tokens=200),
    "agenerate-routed": lambda e: e.agenerate("hello", max_new_tokens=200),
    "agenerate_batch": lambda e: e.agenerate_batch(["hello", "abc 12"], max_new_tokens=200),
    "aroute": lambda e: e.aroute("hello"),
    # the integrations' async calls go through engine.agenerate
    "ChatLoGo.ainvoke": lambda e: _chat(e).ainvoke("hello"),
    "LoGoLLM.acomplete": lambda e: _llm(e).acomplete("hello"),
}


def _chat(engine):
    from logo_integrations.langchain import ChatLoGo

    return ChatLoGo(engine=engine, max_tokens=200)


def _llm(engine):
    from logo_integrations.llama_index import LoGoLLM

    return LoGoLLM(engine=engine, max_new_tokens=200)


@pytest.mark.parametrize("call", sorted(ASYNC_CALLS))
async def test_cancelled_async_call_stops_within_one_step(engine, call):
    slept: list[int] = []
    handles = _slow_endless(engine, 0.2 if call == "aroute" else 0.01, slept)
    try:
        with tiny.ForwardCounter(engine.model) as forwards:
            task = asyncio.create_task(ASYNC_CALLS[call](engine))
            started = 1 if call == "aroute" else 4
            while forwards.n < started:
                assert not task.done(), task.result()
                await asyncio.sleep(0.002)
            at_cancel = forwards.n
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            at_return = forwards.n
            assert len(slept) == at_return  # the worker has stopped: no forward in progress
            await asyncio.sleep(0.3)
            assert at_return - at_cancel <= 1  # the step in flight, no more
            assert forwards.n == at_return  # nothing keeps running after the cancellation
    finally:
        for handle in handles:
            handle.remove()
    out = await engine.agenerate("hello", adapters={"a": 1.0}, max_new_tokens=4)
    assert out.text == engine.generate("hello", adapters={"a": 1.0}, max_new_tokens=4).text


async def test_wait_for_timeout_frees_the_worker_for_the_next_call(engine):
    handles = _slow_endless(engine, 0.01, [])
    try:
        with tiny.ForwardCounter(engine.model) as forwards:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(engine.agenerate("hello", max_new_tokens=200), 0.05)
            after = forwards.n
            await asyncio.sleep(0.2)
            assert forwards.n == after
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------- 5: mixed ranks, memory
def _file_bytes(folder: Path, dtype=torch.float32) -> int:
    state = load_file(folder / "adapter_model.safetensors")
    return sum(t.numel() for t in state.values()) * torch.empty((), dtype=dtype).element_size()


def test_one_large_rank_adapter_costs_its_own_size(tokenizer, tmp_path):
    model = tiny.tiny_model()
    for i in range(12):
        tiny.random_adapter(model, tmp_path / f"s{i}", r=2, seed=i)
    tiny.random_adapter(model, tmp_path / "big", r=256, alpha=16, seed=99)
    engine = LoGoEngine(model, tokenizer, adapters=tmp_path)
    factor_bytes = sum(_file_bytes(tmp_path / n) for n in engine.adapter_names)
    index_bytes = sum(s.row_of.numel() * 16 for s in engine.library.stacks.values())
    slot_bytes = len(engine.adapter_names) * 8 * len(engine.library.stacks)
    # The stacks hold exactly the adapters' factors (padding all to rank 256 would be ~10x).
    assert engine.library.nbytes <= factor_bytes + index_bytes + slot_bytes
    assert engine.library.nbytes >= factor_bytes
    # ...and stay exact: against peft, and the probe against a hand computation.
    mixture = {"big": 0.5, "s3": 0.3, "s7": 0.2}
    oracle = _peft_model(tmp_path, list(mixture), list(mixture.values()))
    with torch.inference_mode():
        expected = oracle(input_ids=IDS).logits
    torch.testing.assert_close(_engine_logits(engine, IDS, mixture), expected, atol=1e-5, rtol=1e-5)
    module = "model.layers.1.self_attn.q_proj"
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    got = engine.library.stacks[module].outputs(h)  # (3, N, out)
    for slot, name in enumerate(engine.adapter_names):
        f = read_adapter(name, tmp_path / name).modules[module]
        hand = (h @ f.lora_a.T) @ f.lora_b.T * f.scaling  # (3, out)
        torch.testing.assert_close(got[:, slot], hand, atol=1e-5, rtol=1e-5)


def test_memory_budget_refuses_before_loading(tokenizer, adapter_dir, monkeypatch):
    needed = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir).library.nbytes
    engine = LoGoEngine(tiny.tiny_model(), tokenizer, adapter_memory_budget=needed - 1)
    with pytest.raises(AdapterMemoryError, match="adapter_memory_budget") as info:
        engine.load_adapters(adapter_dir)
    assert isinstance(info.value, MemoryError) and engine.adapter_names == []
    engine.adapter_memory_budget = needed
    engine.load_adapters(adapter_dir)
    # No budget: refused only when the device lacks the memory (simulated here).
    import logo_engine.library as library

    monkeypatch.setattr(library, "available_memory", lambda device: 1000)
    other = LoGoEngine(tiny.tiny_model(), tokenizer)
    with pytest.raises(AdapterMemoryError, match="available"):
        other.load_adapters(adapter_dir)
    assert other.adapter_names == []


def test_incremental_load_reuses_unchanged_buckets(tokenizer, adapter_dir):
    engine = LoGoEngine(tiny.tiny_model(), tokenizer, adapters={"a": adapter_dir / "a"})
    before = engine.library.stacks["model.layers.0.self_attn.q_proj"].buckets
    engine.load_adapters({"b": adapter_dir / "b"})  # rank 8: a new bucket; rank 4 untouched
    after = engine.library.stacks["model.layers.0.self_attn.q_proj"].buckets
    assert [b.rank for b in after] == [4, 8]
    assert after[0].lora_a is before[0].lora_a  # shared, not copied


# ---------------------------------------------------------------- 11: trailing partial char
def _forced(engine, token_ids):
    """Make the model emit ``token_ids`` in order (then end-of-turn), whatever the prompt."""
    step = {"i": 0}
    eos = _eos(engine)[0]

    def force(module, args, output):
        i = step["i"]
        token = token_ids[i] if i < len(token_ids) else eos
        step["i"] += 1
        output[:, -1, :] = -1e4
        output[:, -1, token] = 1e4
        return output

    return engine.model.lm_head.register_forward_hook(force)


@pytest.mark.parametrize("end", ["length", "eos"])
def test_final_text_keeps_a_trailing_partial_character(engine, tokenizer, end):
    # Byte-level BPE: "é" is two byte tokens; the answer ends after the first one.
    a, e1 = tokenizer.convert_tokens_to_ids(["a", "Ã"])
    new_ids = [a, e1]
    expected = tokenizer.decode(new_ids, skip_special_tokens=True)
    assert expected.endswith("\ufffd")
    handle = _forced(engine, new_ids)
    try:
        n = len(new_ids) if end == "length" else len(new_ids) + 5
        out = engine.generate("hello", adapters={}, max_new_tokens=n)
    finally:
        handle.remove()
    assert out.finish_reason == ("length" if end == "length" else "stop")
    assert out.text == expected
    handle = _forced(engine, new_ids)
    try:
        assert "".join(engine.stream("hello", adapters={}, max_new_tokens=n)) == expected
    finally:
        handle.remove()


# ---------------------------------------------------------------- 12: fork after torch
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_after_torch_works_with_the_documented_workaround(engine):
    """The workaround documented in docs/reliability.md: torch.set_num_threads(1) in the child.

    The parent first runs with 2 OpenMP threads (the state that can hang a forked child); the
    child must answer like the parent within 60 s, or it is killed and the test fails.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parent = engine.generate("hello abc", max_new_tokens=6).text
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                torch.set_num_threads(1)
                code = 0 if engine.generate("hello abc", max_new_tokens=6).text == parent else 3
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung despite torch.set_num_threads(1)")
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        torch.set_num_threads(threads)
    docs = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    assert "fork" in docs and "set_num_threads(1)" in docs and "spawn" in docs

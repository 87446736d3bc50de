"""Prefill ahead: a sticky conversation's prompt pass started in a worker while the probe runs.

The oracle is the same engine without it (``prefill_ahead=False``), over an identical tiny model:
every call must give the same selection, text, logits-level tokens and cache use, whether the
pass started ahead was taken (routing kept the mixture) or stopped (routing moved).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tiny
import torch

from logo_engine import InvalidRequestError, LoGoEngine, RoutingConfig
from logo_engine import ahead as ahead_mod
from logo_engine.decoding import JoinGroup
from logo_engine.mixture import MixturePlan, PassCancelled
from logo_engine.prefix_cache import CacheUse
from logo_engine.sticky import mixture_key
from logo_engine.types import Selection

STICKY = RoutingConfig(top_k=2, sticky_margin=1e6)  # a conversation never re-routes


def make(tokenizer, adapter_dir, **kwargs) -> LoGoEngine:
    return LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny", **kwargs)


class PassSpy:
    """Records the thread of every prompt pass of ``engine`` and how it ended."""

    def __init__(self, engine: LoGoEngine) -> None:
        self.calls: list[tuple[str, str]] = []  # (thread name, "done" | "cancelled")
        self._lock = threading.Lock()
        original = engine._decoder.prompt_pass

        def spy(group, cancel=None):
            name = threading.current_thread().name
            try:
                out = original(group, cancel)
            except PassCancelled:
                with self._lock:
                    self.calls.append((name, "cancelled"))
                raise
            with self._lock:
                self.calls.append((name, "done"))
            return out

        engine._decoder.prompt_pass = spy

    def threads(self) -> list[str]:
        return ["worker" if n.startswith("logo-prefill-ahead") else "caller" for n, _ in self.calls]

    def clear(self) -> None:
        self.calls.clear()


@pytest.fixture()
def pair(tokenizer, adapter_dir):
    ahead, plain = (make(tokenizer, adapter_dir, prefill_ahead=on) for on in (True, False))
    yield ahead, plain
    ahead.close()
    plain.close()


def test_a_kept_mixture_takes_the_pass_started_ahead(pair):
    ahead, plain = pair
    spy = PassSpy(ahead)
    first = ahead.generate(tiny.conversation(1), routing=STICKY, max_new_tokens=5)
    want = plain.generate(tiny.conversation(1), routing=STICKY, max_new_tokens=5)
    assert spy.threads() == ["caller"]  # nothing to continue yet: no pass ahead
    assert first.text == want.text
    for n in (2, 3, 4):
        spy.clear()
        got = ahead.generate(tiny.conversation(n), routing=STICKY, max_new_tokens=5)
        want = plain.generate(tiny.conversation(n), routing=STICKY, max_new_tokens=5)
        # The prompt ran once, in the worker, and the call took it.
        assert spy.calls == [(spy.calls[0][0], "done")] and spy.threads() == ["worker"]
        assert got.selection.sticky and want.selection.sticky
        assert mixture_key(got.selection) == mixture_key(first.selection)
        assert got.text == want.text
        assert got.usage == want.usage  # cached prompt tokens included
        assert got.selection.scores == pytest.approx(want.selection.scores, rel=1e-5)


def test_the_pass_ahead_equals_the_callers_pass_to_the_bit(pair, tokenizer):
    """The worker's logits and KV are exactly what the caller's own pass computes."""
    ahead, _ = pair
    ahead.generate(tiny.conversation(2), routing=STICKY, max_new_tokens=3)
    request = ahead._prepare(tiny.conversation(3), None, "auto")
    mixture = ahead._conversation_mixture(request, ahead._prefill_cache.epoch)
    assert mixture
    selection = Selection(adapters=list(mixture), weights=list(mixture.values()))
    prefill = CacheUse(ahead._prefill_cache, ahead._prefill_cache.epoch, [mixture_key(selection)])
    plan = MixturePlan.build(ahead.library, [selection])
    group = JoinGroup([request.input_ids], plan, rows=[], prefill=prefill)
    here = ahead._decoder.prompt_pass(group)
    there = ThreadPoolExecutor(1).submit(ahead._decoder.prompt_pass, group).result()
    assert here.reused == there.reused and here.reused[0] > 0
    assert torch.equal(here.logits, there.logits)
    assert torch.equal(here.mask, there.mask)
    for a, b in zip(here.cache.layers, there.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_moved_mixture_stops_the_pass_and_runs_the_prompt_again(pair):
    ahead, plain = pair
    # Turn 1 pinned to the adapter turn 2 ranks last: with margin 0, turn 2 re-routes.
    scores = plain.route(tiny.conversation(2), routing=STICKY).scores
    last = min(scores, key=scores.get)
    routing = RoutingConfig(top_k=2, sticky_margin=0.0)
    for engine in pair:
        engine.generate(tiny.conversation(1), adapters={last: 1.0}, max_new_tokens=3)
    spy = PassSpy(ahead)
    got = ahead.generate(tiny.conversation(2), routing=routing, max_new_tokens=5)
    want = plain.generate(tiny.conversation(2), routing=routing, max_new_tokens=5)
    assert not got.selection.sticky and got.selection.adapters[0] != last
    assert got.text == want.text and got.usage == want.usage
    # One pass ahead under the old mixture (finished or stopped), then the caller's own.
    deadline = time.monotonic() + 10
    while len(spy.calls) < 2 and time.monotonic() < deadline:  # the stopped one may still run
        time.sleep(0.01)
    assert sorted(spy.threads()) == ["caller", "worker"]
    assert [s for n, s in spy.calls if not n.startswith("logo-prefill-ahead")] == ["done"]


def test_a_cancelled_pass_stops_at_its_first_adapted_module(engine):
    request = engine._prepare("abc def", None, "auto")
    selection = Selection(adapters=["a"], weights=[1.0])
    group = JoinGroup([request.input_ids], MixturePlan.build(engine.library, [selection]), [])
    cancel = threading.Event()
    cancel.set()
    with tiny.ForwardCounter(engine.model.model.layers[1]) as later:
        with pytest.raises(PassCancelled):
            engine._decoder.prompt_pass(group, cancel)
    assert later.n == 0  # stopped in block 0
    ahead = ahead_mod.Ahead((("a", 1.0),), engine.library, 0, ThreadPoolExecutor(1).submit(int))
    ahead.discard()
    assert ahead.cancel.is_set()


def test_a_stream_closed_after_its_selection_discards_the_pass(pair, monkeypatch):
    ahead, _ = pair
    ahead.generate(tiny.conversation(2), routing=STICKY, max_new_tokens=3)
    discarded = []
    original = ahead_mod.Ahead.discard

    def record(self):
        discarded.append(self.key)
        original(self)

    monkeypatch.setattr(ahead_mod.Ahead, "discard", record)
    stream = ahead.stream(tiny.conversation(3), routing=STICKY, max_new_tokens=3)
    assert stream.selection.sticky
    stream.close()
    assert discarded == [mixture_key(stream.selection)]
    again = ahead.generate(tiny.conversation(3), routing=STICKY, max_new_tokens=3)
    assert again.selection.sticky


def test_concurrent_conversations_equal_their_solo_results(pair):
    ahead, plain = pair
    # Each conversation has a system prompt of its own: none shares half its tokens with
    # another's (sticky routing would otherwise follow whichever cached first).
    tags = ["abc def ", "12 34 + ", "ghi * / ", "5 6 7 - "]

    def chat(engine, tag):
        texts = []
        for n in (1, 2, 3):
            messages = tiny.conversation(n)
            messages[0]["content"] = tag * 12
            texts.append(engine.generate(messages, routing=STICKY, max_new_tokens=4).text)
        return texts

    solo = [chat(plain, t) for t in tags]
    spy = PassSpy(ahead)
    with ThreadPoolExecutor(len(tags)) as pool:
        together = list(pool.map(lambda t: chat(ahead, t), tags))
    assert together == solo
    assert spy.threads().count("worker") >= len(tags)  # turns 2 and 3 went ahead


def test_no_pass_ahead_without_sticky_routing_or_for_batches(pair):
    ahead, _ = pair
    spy = PassSpy(ahead)
    ahead.generate(tiny.conversation(1), routing=STICKY, max_new_tokens=3)
    ahead.generate(tiny.conversation(2), routing=RoutingConfig(top_k=2), max_new_tokens=3)
    ahead.generate_batch(
        [tiny.conversation(2), tiny.conversation(3)], routing=STICKY, max_new_tokens=3
    )
    ahead.generate(tiny.conversation(2), adapters={"a": 1.0}, max_new_tokens=3)
    assert "worker" not in spy.threads()


def test_auto_goes_ahead_only_beside_idle_cpu_cores(monkeypatch):
    monkeypatch.setattr(ahead_mod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(ahead_mod.torch, "get_num_threads", lambda: 1)
    assert ahead_mod.idle_cores(torch.device("cpu"))
    assert not ahead_mod.idle_cores(torch.device("cuda"))
    monkeypatch.setattr(ahead_mod.torch, "get_num_threads", lambda: 2)
    assert not ahead_mod.idle_cores(torch.device("cpu"))


def test_prefill_ahead_must_be_a_bool_or_none(tokenizer, adapter_dir):
    with pytest.raises(InvalidRequestError, match="prefill_ahead"):
        make(tokenizer, adapter_dir, prefill_ahead="yes")


def test_close_stops_the_workers(tokenizer, adapter_dir):
    engine = make(tokenizer, adapter_dir, prefill_ahead=True)
    engine.generate(tiny.conversation(1), routing=STICKY, max_new_tokens=2)
    engine.generate(tiny.conversation(2), routing=STICKY, max_new_tokens=2)
    pool = engine._ahead_pool._pool
    assert pool is not None
    engine.close()
    assert engine._ahead_pool._pool is None
    with pytest.raises(RuntimeError):
        pool.submit(int)


def test_a_pass_ahead_is_not_taken_across_a_library_or_cache_change(pair, adapter_dir):
    ahead, _ = pair
    ahead.generate(tiny.conversation(2), routing=STICKY, max_new_tokens=3)
    request = ahead._prepare(tiny.conversation(3), None, "auto")
    epoch = ahead._prefill_cache.epoch
    started = ahead._start_ahead([request], [None], STICKY)
    assert started is not None
    selection = Selection(adapters=[n for n, _ in started.key], weights=[w for _, w in started.key])
    assert started.take(selection, ahead.library, epoch) is started.future
    other = Selection(adapters=["a"], weights=[1.0])
    for args in ((other, ahead.library, epoch), (selection, ahead.library, epoch + 1)):
        again = ahead._start_ahead([request], [None], STICKY)
        assert again.take(*args) is None and again.cancel.is_set()
    ahead.load_adapters({"a2": adapter_dir / "a"})  # a new library (and the caches cleared)
    assert started.library is not ahead.library
    assert started.take(selection, ahead.library, ahead._prefill_cache.epoch) is None
    assert ahead._start_ahead([request], [None], STICKY) is None  # nothing cached to continue


def langchain_chat(engine):
    """A chat through ChatLoGo: ``say(text)`` -> (answer, selection JSON, usage)."""
    from langchain_core.messages import HumanMessage, SystemMessage

    from logo_integrations.langchain import ChatLoGo

    llm = ChatLoGo(engine=engine, routing=STICKY, max_tokens=4)
    messages: list = [SystemMessage("you are terse, digits 0 1 2 3")]

    def say(text):
        messages.append(HumanMessage(text))
        answer = llm.invoke(messages)
        messages.append(answer)
        return answer.content, answer.response_metadata["logo_selection"], answer.usage_metadata

    return say


def llama_index_chat(engine):
    """A chat through LoGoLLM: ``say(text)`` -> (answer, selection JSON, usage)."""
    from llama_index.core.llms import ChatMessage

    from logo_integrations.llama_index import LoGoLLM

    llm = LoGoLLM(engine=engine, routing=STICKY, max_tokens=4)
    messages = [ChatMessage(role="system", content="you are terse, digits 0 1 2 3")]

    def say(text):
        messages.append(ChatMessage(role="user", content=text))
        response = llm.chat(messages)
        messages.append(response.message)
        raw = response.raw
        return response.message.content, raw["logo_selection"], raw["usage"]

    return say


@pytest.mark.parametrize("chat", [langchain_chat, llama_index_chat], ids=["langchain", "llama"])
def test_an_integration_conversation_takes_the_pass_started_ahead(pair, chat):
    """Same answers, selections and usage with and without it; taken from the second call."""
    spy = PassSpy(pair[0])
    transcripts = []
    for engine in pair:
        say = chat(engine)
        answers = []
        for turn in tiny.TURNS[:3]:
            text, selection, usage = say(turn)
            selection = {k: v for k, v in selection.items() if k != "probe_ms"}  # a duration
            answers.append((text, selection, usage))
        transcripts.append(answers)
    assert transcripts[0] == transcripts[1]
    assert [sel["sticky"] for _, sel, _ in transcripts[0]] == [False, True, True]
    assert spy.threads() == ["caller", "worker", "worker"]


def test_route_then_a_pinned_generate_takes_the_parked_pass(pair):
    """The integrations' order: route first, then generate with the routed mixture pinned."""
    ahead, plain = pair
    for engine in pair:
        engine.generate(tiny.conversation(1), routing=STICKY, max_new_tokens=3)
    spy = PassSpy(ahead)
    selection = ahead.route(tiny.conversation(2), routing=STICKY)
    assert selection.sticky
    got = ahead.generate(tiny.conversation(2), adapters=selection.mixture, max_new_tokens=5)
    assert spy.threads() == ["worker"]  # no pass of its own: it took the parked one
    want_selection = plain.route(tiny.conversation(2), routing=STICKY)
    want = plain.generate(tiny.conversation(2), adapters=want_selection.mixture, max_new_tokens=5)
    assert got.text == want.text and got.usage == want.usage
    # Another mixture, or another prompt, does not take a parked pass.
    third = ahead.route(tiny.conversation(3), routing=STICKY)
    spy.clear()
    ahead.generate(tiny.conversation(3), adapters={"b": 1.0}, max_new_tokens=2)
    ahead.generate(tiny.conversation(2), adapters=selection.mixture, max_new_tokens=2)
    assert spy.threads().count("caller") == 2  # each ran its own pass
    request = ahead._prepare(tiny.conversation(3), None, None)
    assert ahead._parked.take(request.input_ids, third) is not None  # still parked


def test_parked_passes_are_bounded_in_number_and_time(engine, monkeypatch):
    parked = ahead_mod.Parked(size=2, ttl=30.0)
    pool = ThreadPoolExecutor(1)
    selection = Selection(adapters=["a"], weights=[1.0])
    passes = [
        ahead_mod.Ahead(mixture_key(selection), engine.library, 0, pool.submit(int))
        for _ in range(4)
    ]
    for i, p in enumerate(passes[:3]):
        parked.park([i], selection, p)
    assert passes[0].cancel.is_set()  # pushed out by the third
    assert parked.take([1], selection) is passes[1] and not passes[1].cancel.is_set()
    assert parked.take([1], selection) is None  # taken once
    now = ahead_mod.time.monotonic()
    monkeypatch.setattr(ahead_mod.time, "monotonic", lambda: now + 31.0)
    assert parked.take([2], selection) is None and passes[2].cancel.is_set()  # expired
    other = Selection(adapters=["b"], weights=[1.0])
    parked.park([3], other, passes[3])  # not the mixture it runs under
    assert passes[3].cancel.is_set() and parked.take([3], other) is None


def test_clearing_the_caches_discards_parked_passes(pair):
    ahead, _ = pair
    ahead.generate(tiny.conversation(1), routing=STICKY, max_new_tokens=3)
    selection = ahead.route(tiny.conversation(2), routing=STICKY)
    request = ahead._prepare(tiny.conversation(2), None, None)
    ahead.clear_prefix_caches()
    assert ahead._parked.take(request.input_ids, selection) is None


def test_no_pass_ahead_when_the_probe_runs_nothing(pair):
    """A call whose probed tokens are all cached probes in a few ms: nothing to hide behind."""
    ahead, _ = pair
    spy = PassSpy(ahead)
    ahead.generate(tiny.conversation(1), routing=STICKY, max_new_tokens=3)
    ahead.generate(tiny.conversation(2), routing=STICKY, max_new_tokens=3)
    assert spy.threads() == ["caller", "worker"]
    spy.clear()
    again = ahead.generate(tiny.conversation(2), routing=STICKY, max_new_tokens=3)
    assert again.selection.probe_cached_tokens == again.usage.prompt_tokens  # probed before
    assert spy.threads() == ["caller"]

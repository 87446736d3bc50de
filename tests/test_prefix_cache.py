"""Prefix caches (probe and prefill) against the uncached engine, which is the oracle.

Every check runs the same calls on two engines over identical tiny models: one with the default
caches, one with ``PrefixCacheConfig.off()`` (the plain full-prompt passes that the exactness
tests compare with peft). Multi-turn conversations extend earlier prompts, so the cached engine
probes and prefills only new tokens.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from logo_engine import InvalidRequestError, LoGoEngine, RoutingConfig, RoutingConfigError
from logo_engine.prefix_cache import PrefixCache, PrefixEntry, cacheable
from logo_engine.selection import pinned_selection
from logo_engine.sticky import mixture_key, sticky_selection
from logo_engine.types import PrefixCacheConfig, Selection, Usage

SYSTEM = {"role": "system", "content": "you are brief. tools: abc def ghi 12 34 + - * /"}
TURNS = [
    ("hello 12 34 + 5", "ok 46"),
    ("and abc def", "yes abc"),
    ("now * / 7 8", "no 56"),
    ("last one: ghi", "done"),
]


def conversation(n_turns: int, system: dict = SYSTEM, tag: str = "") -> list[dict]:
    """System message and ``n_turns`` user turns (with the scripted answers in between)."""
    messages = [system]
    for i, (user, answer) in enumerate(TURNS[:n_turns]):
        messages.append({"role": "user", "content": user + tag})
        if i < n_turns - 1:
            messages.append({"role": "assistant", "content": answer})
    return messages


def make(tokenizer, adapter_dir, **kwargs) -> LoGoEngine:
    return LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny", **kwargs)


@pytest.fixture()
def uncached(tokenizer, adapter_dir):
    eng = make(tokenizer, adapter_dir, prefix_cache=PrefixCacheConfig.off())
    yield eng
    eng.close()


def assert_same_selection(got: Selection, want: Selection) -> None:
    assert got.adapters == want.adapters
    assert got.weights == pytest.approx(want.weights, rel=1e-4)
    assert got.scores == pytest.approx(want.scores, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------- probe cache
PROBES = [
    RoutingConfig(top_k=2),
    RoutingConfig(top_k=2, probe_tokens="mean"),
    RoutingConfig(top_k=2, probe_module="o_proj"),  # after attention: block 1's KV is cached too
    RoutingConfig(top_k=2, probe_input="residual"),
    RoutingConfig(top_k=2, probe_layer=0, probe_module="k_proj"),  # block 0: nothing below
]


@pytest.mark.parametrize(
    "routing",
    PROBES,
    ids=lambda r: f"{r.probe_module}-{r.probe_input}-{r.probe_tokens}-{r.probe_layer}",
)
def test_cached_probe_equals_uncached_on_extended_prompts(engine, uncached, routing):
    reused = []
    for n in range(1, len(TURNS) + 1):
        prompt = conversation(n)
        got, want = engine.route(prompt, routing=routing), uncached.route(prompt, routing=routing)
        assert_same_selection(got, want)
        assert want.probe_cached_tokens == 0
        reused.append(got.probe_cached_tokens)
    if routing.probe_layer == 0:
        assert reused == [0] * len(TURNS)  # no block below the probe: nothing is cached
    else:
        lengths = [engine.count_tokens(conversation(n)) for n in range(1, len(TURNS) + 1)]
        assert reused[0] == 0
        assert reused[1:] == lengths[:-1]  # each turn reuses the whole previous prompt
    assert engine.prefix_cache_stats()["probe"].bytes <= engine.prefix_cache_config.probe_bytes


def test_batched_rows_with_different_prefixes(engine, uncached):
    routing = RoutingConfig(top_k=2, probe_tokens="mean")
    other = {"role": "system", "content": "another system prompt, digits 0 1 2"}
    engine.route_batch([conversation(1), conversation(2, other)], routing=routing)
    rows = [
        conversation(3),  # extends row 0 of the warm-up batch
        "fresh + prompt",  # nothing cached
        conversation(3, other),  # extends row 1
        conversation(1),  # repeats row 0: nothing to run
        conversation(2, tag=" x"),  # shares the system prompt and first turn's start
    ]
    got = engine.route_batch(rows, routing=routing)
    for row, selection in zip(rows, got, strict=True):
        assert_same_selection(selection, uncached.route(row, routing=routing))
    reused = [s.probe_cached_tokens for s in got]
    assert reused[0] == engine.count_tokens(conversation(1))
    assert reused[2] == engine.count_tokens(conversation(2, other))
    assert reused[3] == engine.count_tokens(conversation(1))
    assert 0 < reused[4] < engine.count_tokens(conversation(2, tag=" x"))
    assert reused[1] <= 2  # at most the chat template's opening tokens


def test_repeated_probe_runs_nothing(engine, uncached):
    first = engine.route(conversation(2))
    calls = []
    handle = engine.model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        again = engine.route(conversation(2))
    finally:
        handle.remove()
    assert calls == []
    assert again.scores == first.scores
    assert again.probe_cached_tokens == engine.count_tokens(conversation(2))
    # A prompt that starts a longer cached one is read from it: the probed input at token j
    # depends on tokens 0..j only.
    shorter = conversation(2)[:2]
    got = engine.route(shorter)
    assert got.probe_cached_tokens == engine.count_tokens(shorter)
    assert_same_selection(got, uncached.route(shorter))


def test_probe_after_eviction(tokenizer, adapter_dir, uncached):
    # Room for about one conversation: every new prompt evicts older entries.
    engine = make(tokenizer, adapter_dir, prefix_cache=PrefixCacheConfig(probe_bytes=60_000))
    budget = engine.prefix_cache_config.probe_bytes
    tags = [" a", " b", " c"]
    for n in (1, 2, 3):
        for tag in tags:
            prompt = conversation(n, tag=tag)
            assert_same_selection(engine.route(prompt), uncached.route(prompt))
            assert engine.prefix_cache_stats()["probe"].bytes <= budget
    stats = engine.prefix_cache_stats()["probe"]
    assert stats.evictions > 0 and stats.hits > 0
    # The first conversation's entries are gone; its next turn still probes correctly.
    prompt = conversation(4, tag=" a")
    assert_same_selection(engine.route(prompt), uncached.route(prompt))
    engine.close()


def test_changed_library_invalidates(engine, uncached, adapter_dir, tmp_path):
    engine.route(conversation(1))
    assert engine.route(conversation(2)).probe_cached_tokens > 0
    extra = tiny.random_adapter(tiny.tiny_model(), tmp_path / "d", r=2, seed=9)
    engine.load_adapters({"d": extra})
    uncached.load_adapters({"d": extra})
    stats = engine.prefix_cache_stats()
    assert stats["probe"].entries == 0 and stats["prefill"].entries == 0
    got = engine.route(conversation(3))
    assert got.probe_cached_tokens == 0
    assert set(got.scores) == {"a", "b", "c", "d"}
    assert_same_selection(got, uncached.route(conversation(3)))


def test_stale_epoch_cannot_insert():
    cache = PrefixCache(10_000)
    epoch = cache.epoch
    cache.invalidate()  # e.g. the library changed while a call was running
    assert not cache.insert("s", _entry([1, 2, 3]), epoch=epoch)
    assert cache.stats().entries == 0
    assert cache.insert("s", _entry([1, 2, 3]), epoch=cache.epoch)
    assert cache.lookup("s", [1, 2, 3, 4], epoch=epoch) is None  # a stale reader sees nothing


def test_concurrent_threads_sharing_prefixes(tokenizer, adapter_dir, uncached):
    engine = make(tokenizer, adapter_dir)
    routing = RoutingConfig(top_k=2)
    tags = [" a", " b", " c", " d"]  # four conversations that share the system prompt
    solo = {
        (tag, n): uncached.generate(conversation(n, tag=tag), max_new_tokens=6, routing=routing)
        for tag in tags
        for n in (1, 2, 3)
    }
    barrier = threading.Barrier(len(tags))

    def chat(tag: str) -> list:
        barrier.wait()
        return [
            engine.generate(conversation(n, tag=tag), max_new_tokens=6, routing=routing)
            for n in (1, 2, 3)
        ]

    with ThreadPoolExecutor(len(tags)) as pool:
        results = dict(zip(tags, pool.map(chat, tags), strict=True))
    for tag in tags:
        for n, out in zip((1, 2, 3), results[tag], strict=True):
            want = solo[(tag, n)]
            assert out.text == want.text
            assert_same_selection(out.selection, want.selection)
    assert engine.prefix_cache_stats()["probe"].hits > 0
    engine.close()


# ---------------------------------------------------------------------------- byte bound, LRU
def _entry(tokens: list[int], layers: int = 2, width: int = 4) -> PrefixEntry:
    n = len(tokens)
    return PrefixEntry(
        tokens=torch.tensor(tokens),
        keys=tuple(torch.zeros(1, n, width) for _ in range(layers)),
        values=tuple(torch.zeros(1, n, width) for _ in range(layers)),
    )


def test_byte_bound_and_lru_order():
    per_token = 8 + 2 * 2 * 4 * 4  # token id + K and V of 2 layers, 4 floats each
    cache = PrefixCache(10 * per_token)
    epoch = cache.epoch
    assert cache.insert("s", _entry([1, 2, 3, 4]), epoch=epoch)  # 4 tokens
    assert cache.insert("s", _entry([5, 6, 7, 8]), epoch=epoch)  # 4 tokens
    assert cache.lookup("s", [1, 2, 3, 9], epoch=epoch).length == 3  # touches [1, 2, 3, 4]
    assert cache.insert("s", _entry([9, 9, 9]), epoch=epoch)  # evicts [5..8], not [1..4]
    assert cache.lookup("s", [5, 6, 7, 8, 1], epoch=epoch) is None
    assert cache.lookup("s", [1, 2, 3, 4, 5], epoch=epoch).length == 4
    stats = cache.stats()
    assert stats.bytes == 7 * per_token <= stats.max_bytes and stats.evictions == 1
    assert not cache.insert("s", _entry(list(range(11))), epoch=epoch)  # larger than the budget
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 10, (), generator=rng))
        cache.insert("s", _entry(torch.randint(0, 5, (n,), generator=rng).tolist()), epoch=epoch)
        assert cache.nbytes <= cache.max_bytes
        assert cache.nbytes == sum(e.nbytes for _, e in cache._entries.values())


def test_lookup_takes_the_longest_common_prefix_of_its_space():
    cache = PrefixCache(10**6)
    epoch = cache.epoch
    cache.insert("s", _entry([1, 2, 3, 4, 5]), epoch=epoch)
    cache.insert("s", _entry([1, 2, 7]), epoch=epoch)
    cache.insert("t", _entry([1, 2, 3, 4, 5, 6]), epoch=epoch)
    assert cache.lookup("s", [1, 2, 3, 4, 9, 9], epoch=epoch).length == 4  # inside an entry
    assert cache.lookup("s", [1, 2, 7, 8], epoch=epoch).entry.tokens.tolist() == [1, 2, 7]
    assert cache.lookup("s", [1, 2, 3, 4, 5], epoch=epoch).length == 4  # one token left to run
    assert cache.lookup("s", [8, 1, 2], epoch=epoch) is None
    assert cache.lookup("u", [1, 2, 3], epoch=epoch) is None  # another space
    # An entry that a new one extends is dropped: the new one answers every lookup it did.
    cache.insert("s", _entry([1, 2, 7, 8, 9]), epoch=epoch)
    assert sorted(len(e) for s, e in cache._entries.values() if s == "s") == [5, 5]


def test_prefix_cache_config_is_validated():
    with pytest.raises(InvalidRequestError):
        PrefixCacheConfig(probe_bytes=-1)
    with pytest.raises(InvalidRequestError):
        PrefixCacheConfig(prefill_bytes=1.5)
    with pytest.raises(RoutingConfigError):
        RoutingConfig(sticky_margin=-0.1)


def test_sliding_window_models_run_uncached(tokenizer):
    config = Qwen2Config(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    assert not cacheable(model.config)
    engine = LoGoEngine(model, tokenizer, name="tiny-qwen2")
    out = engine.generate(conversation(2), max_new_tokens=3, adapters={})
    assert out.usage.cached_tokens == 0
    assert engine.prefix_cache_stats()["prefill"].max_bytes == 0


# ---------------------------------------------------------------------------- prefill cache
def test_cached_generation_equals_uncached_generation(engine, uncached):
    for mixture in ({"a": 0.7, "b": 0.3}, {}):
        for n in range(1, len(TURNS) + 1):
            prompt = conversation(n)
            got = engine.generate(prompt, adapters=mixture, max_new_tokens=10)
            want = uncached.generate(prompt, adapters=mixture, max_new_tokens=10)
            assert got.text == want.text
            assert want.usage.cached_tokens == 0
            if n > 1:  # the previous turn's prompt (and generated tokens that match) is reused
                assert got.usage.cached_tokens >= engine.count_tokens(conversation(n - 1))
            assert got.usage.prompt_tokens == want.usage.prompt_tokens


def test_changed_selection_does_not_reuse(engine, uncached):
    engine.generate(conversation(1), adapters={"a": 1.0}, max_new_tokens=4)
    got = engine.generate(conversation(2), adapters={"b": 1.0}, max_new_tokens=8)
    assert got.usage.cached_tokens == 0
    want = uncached.generate(conversation(2), adapters={"b": 1.0}, max_new_tokens=8)
    assert got.text == want.text


def test_generated_tokens_are_reused_by_the_next_turn(engine, uncached):
    mixture = {"a": 0.5, "c": 0.5}
    first = engine.generate(conversation(1), adapters=mixture, max_new_tokens=6)
    prompt = [*conversation(1), {"role": "assistant", "content": first.text}]
    prompt.append({"role": "user", "content": "more"})
    got = engine.generate(prompt, adapters=mixture, max_new_tokens=8)
    assert got.text == uncached.generate(prompt, adapters=mixture, max_new_tokens=8).text
    n_first = engine.count_tokens(conversation(1))
    assert got.usage.cached_tokens > n_first  # the prompt and part of the answer


def test_cached_batch_rows_with_different_mixtures_and_prefixes(engine, uncached):
    mixtures = [{"a": 1.0}, {"b": 0.5, "c": 0.5}, {}, {"a": 1.0}]
    engine.generate_batch(
        [conversation(1), conversation(2)], adapters=mixtures[:2], max_new_tokens=5
    )
    rows = [conversation(3), conversation(3), conversation(2, tag=" q"), "fresh prompt 1 2"]
    got = engine.generate_batch(rows, adapters=mixtures, max_new_tokens=9)
    want = uncached.generate_batch(rows, adapters=mixtures, max_new_tokens=9)
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    cached = [g.usage.cached_tokens for g in got]
    assert cached[0] >= engine.count_tokens(conversation(1))
    assert cached[1] >= engine.count_tokens(conversation(2))
    assert cached[2] == 0  # the base mixture had nothing cached
    assert cached[3] <= 2  # at most the chat template's opening tokens


def test_rows_that_stop_early_store_only_their_tokens(engine, uncached):
    # Row 0 stops at a stop string while row 1 runs on: the filler fed to row 0 afterwards must
    # not be stored as its continuation.
    mixture = {"b": 1.0}
    long = engine.generate(conversation(1), adapters=mixture, max_new_tokens=12).text
    engine.clear_prefix_caches()
    assert len(long) > 6
    stop = long[3:5]
    outs = engine.generate_batch(
        [conversation(1), conversation(2)], adapters=mixture, max_new_tokens=12, stop=stop
    )
    assert outs[0].finish_reason == "stop"
    prompt = [*conversation(1), {"role": "assistant", "content": long}]
    prompt.append({"role": "user", "content": "again"})
    got = engine.generate(prompt, adapters=mixture, max_new_tokens=8)
    assert got.text == uncached.generate(prompt, adapters=mixture, max_new_tokens=8).text


def test_stream_and_async_report_cached_tokens(engine):
    mixture = {"a": 1.0}
    engine.generate(conversation(1), adapters=mixture, max_new_tokens=4)
    stream = engine.stream(conversation(2), adapters=mixture, max_new_tokens=4)
    text = "".join(stream)
    assert stream.generation.usage.cached_tokens > 0
    assert text == stream.generation.text


def test_prefill_cache_respects_its_budget(tokenizer, adapter_dir):
    engine = make(tokenizer, adapter_dir, prefix_cache=PrefixCacheConfig(prefill_bytes=50_000))
    for tag in (" a", " b", " c", " d"):
        for n in (1, 2, 3):
            engine.generate(conversation(n, tag=tag), adapters={"a": 1.0}, max_new_tokens=4)
            assert engine.prefix_cache_stats()["prefill"].bytes <= 50_000
    assert engine.prefix_cache_stats()["prefill"].evictions > 0
    engine.close()


# ---------------------------------------------------------------------------- sticky routing
def _sel(adapters, weights, scores, **kw) -> Selection:
    return Selection(
        adapters=adapters,
        weights=weights,
        scores=scores,
        signal="norm",
        top_k=2,
        probe_layer=1,
        probe_module="q",
        **kw,
    )


@pytest.mark.parametrize(
    ("previous", "scores", "margin", "kept"),
    [
        ({"a": 0.6, "b": 0.4}, {"a": 3.0, "b": 2.0, "c": 1.0}, 0.0, True),  # same top adapter
        ({"a": 0.6, "b": 0.4}, {"a": 2.0, "b": 1.0, "c": 2.4}, 0.5, True),  # c leads a by 0.4
        ({"a": 0.6, "b": 0.4}, {"a": 2.0, "b": 1.0, "c": 2.6}, 0.5, False),  # c leads a by 0.6
        ({"a": 0.6, "b": 0.4}, {"a": 2.0, "b": 1.0, "c": 2.4}, 0.0, False),
        ({"b": 1.0}, {"a": 2.0, "b": 1.9, "c": 0.0}, 0.5, True),  # a pinned mixture counts too
    ],
)
def test_sticky_rule(previous, scores, margin, kept):
    ranked = sorted(scores, key=lambda n: -scores[n])[:2]
    new = _sel(ranked, [0.55, 0.45], scores)
    out = sticky_selection(previous, new, margin)
    assert out.sticky is kept
    assert out.mixture == (previous if kept else new.mixture)
    assert out.scores == scores  # this turn's scores either way


def test_sticky_rule_ranks_by_the_ranking_scores():
    scores = {"a": 2.0, "b": 1.0, "c": 5.0}
    new = _sel(["c", "a"], [0.7, 0.3], scores)
    calibrated = new.model_copy(update={"rank_scores": {"a": 1.0, "b": 0.0, "c": 1.0}})
    # Raw scores: c leads a by 3.0; z-scores: both 1.0, so the conversation keeps a.
    assert sticky_selection({"a": 0.6, "b": 0.4}, calibrated, 0.5).sticky
    assert not sticky_selection({"a": 0.6, "b": 0.4}, new, 0.5).sticky


@pytest.mark.parametrize(
    "previous", [None, {}, {"a": 0.5, "zz": 0.5}], ids=["none", "base", "unknown-adapter"]
)
def test_sticky_rule_needs_a_previous_mixture_it_can_rank(previous):
    new = _sel(["b", "a"], [0.5, 0.5], {"a": 1.0, "b": 2.0})
    assert sticky_selection(previous, new, 10.0) is new
    empty = _sel([], [], {"a": 1.0, "b": 2.0})  # routing kept no adapter: nothing to stick to
    assert sticky_selection({"a": 1.0}, empty, 10.0) is empty


def test_sticky_conversation_reuses_its_prefill(engine, uncached):
    routing = RoutingConfig(top_k=2, sticky_margin=1e6)  # never re-route within a conversation
    first = engine.generate(conversation(1), routing=routing, max_new_tokens=4)
    assert not first.selection.sticky
    for n in (2, 3, 4):
        out = engine.generate(conversation(n), routing=routing, max_new_tokens=6)
        assert out.selection.sticky
        assert mixture_key(out.selection) == mixture_key(first.selection)
        assert out.usage.cached_tokens >= engine.count_tokens(conversation(n - 1))
        assert out.selection.probe_cached_tokens == engine.count_tokens(conversation(n - 1))
        # Its scores are this turn's, and the text is what that mixture generates uncached.
        fresh = uncached.route(conversation(n), routing=routing)
        assert out.selection.scores == pytest.approx(fresh.scores, rel=1e-4)
        pinned = uncached.generate(
            conversation(n), adapters=out.selection.mixture, max_new_tokens=6
        )
        assert out.text == pinned.text
    # Without the margin, routing follows the scores and the weights change every turn.
    other = engine.generate(
        conversation(4, tag=" z"), routing=RoutingConfig(top_k=2), max_new_tokens=2
    )
    assert not other.selection.sticky


def test_mixture_key_ignores_last_bit_renormalisation():
    a = Selection(adapters=["x", "y"], weights=[0.7, 0.30000000000000004])
    b = Selection(adapters=["x", "y"], weights=[0.7, 0.3])
    c = Selection(adapters=["x", "y"], weights=[0.71, 0.29])
    assert mixture_key(a) == mixture_key(b) != mixture_key(c)


def test_a_routed_mixture_pinned_again_keeps_its_key():
    """Route, then generate pinned (the integrations' order): the key must not move.

    These are a real call-2 selection of the agent transcript, read back from the prefill
    cache's key (12 digits): renormalised, they would round to ...893 and miss the cache.
    """
    names = ["capital", "date_format", "sentiment"]
    kept = dict(zip(names, [0.998995284892, 0.000826284307, 0.0001784308], strict=True))
    pinned = pinned_selection(kept, names)
    assert pinned.weights == list(kept.values())
    assert mixture_key(pinned) == tuple(kept.items())
    # Weights that do not sum to 1 are still normalised.
    assert pinned_selection({"capital": 3.0, "sentiment": 1.0}, names).weights == [0.75, 0.25]


def test_mixture_key_leaves_out_weights_that_round_to_zero():
    tiny_weight = Selection(adapters=["x", "y"], weights=[1.0 - 1e-14, 1e-14])
    assert mixture_key(tiny_weight) == (("x", 1.0),)
    assert mixture_key(pinned_selection(dict(mixture_key(tiny_weight)), ["x", "y"])) == (
        ("x", 1.0),
    )


def test_a_conversation_through_route_then_pinned_generate_reuses_every_prefill(engine):
    """Each call routes first and generates the routed mixture pinned, as ChatLoGo does."""
    routing = RoutingConfig(top_k=3, sticky_margin=1e6)
    for n in range(1, len(TURNS) + 1):
        selection = engine.route(conversation(n), routing=routing)
        out = engine.generate(conversation(n), adapters=selection.mixture, max_new_tokens=3)
        if n > 1:
            assert selection.sticky
            assert out.usage.cached_tokens >= engine.count_tokens(conversation(n - 1))


# ---------------------------------------------------------------------------- visibility
def test_usage_reports_cached_tokens_in_the_integrations():
    from logo_integrations.langchain import usage_metadata
    from logo_integrations.llama_index import response_metadata

    usage = Usage(prompt_tokens=10, completion_tokens=2, cached_tokens=7)
    assert usage_metadata(usage)["input_token_details"] == {"cache_read": 7}
    assert "input_token_details" not in usage_metadata(Usage(prompt_tokens=1, completion_tokens=1))
    additional, raw = response_metadata(Selection(), "m", usage, "stop")
    assert raw["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 7},
    }
    assert additional["cached_tokens"] == 7


# ---------------------------------------------------------------------------- probe scope
def test_last_user_turn_scope_probes_the_last_user_message_alone(engine, uncached):
    routing = RoutingConfig(top_k=2, probe_scope="last_user_turn")
    for n in (1, 2, 3):
        prompt = conversation(n)
        alone = [{"role": "user", "content": prompt[-1]["content"]}]
        got = engine.route(prompt, routing=routing)
        assert_same_selection(got, uncached.route(alone, routing=RoutingConfig(top_k=2)))
    # A plain string is its own last user turn; a prompt without a user message probes it all.
    assert_same_selection(
        engine.route("12 34 + 5", routing=routing), uncached.route("12 34 + 5", routing=routing)
    )
    only_system = [SYSTEM]
    assert_same_selection(
        engine.route(only_system, routing=routing),
        uncached.route(only_system, routing=RoutingConfig(top_k=2)),
    )
    with pytest.raises(RoutingConfigError):
        RoutingConfig(probe_scope="everything")


def test_tool_loop_steps_share_the_last_user_turn_route_and_prefill(engine, uncached):
    routing = RoutingConfig(top_k=2, probe_scope="last_user_turn")
    steps = [
        conversation(2),
        [
            *conversation(2),
            {"role": "assistant", "content": "ok"},
            {"role": "tool", "content": "7"},
        ],
    ]
    steps.append(
        [*steps[1], {"role": "assistant", "content": "no"}, {"role": "tool", "content": "1"}]
    )
    first = engine.generate(steps[0], routing=routing, max_new_tokens=3)
    for prompt in steps[1:]:
        out = engine.generate(prompt, routing=routing, max_new_tokens=6)
        assert out.selection.mixture == first.selection.mixture  # the same probe input
        assert out.selection.probe_cached_tokens == engine.count_tokens(
            [{"role": "user", "content": steps[0][-1]["content"]}]
        )  # nothing ran: the user message was probed by the first step
        assert out.usage.cached_tokens > engine.count_tokens(steps[0]) - 2
        assert out.text == uncached.generate(prompt, routing=routing, max_new_tokens=6).text


def test_sticky_follows_the_prompt_sharing_the_most_with_this_one():
    cache = PrefixCache(10**6)
    epoch = cache.epoch
    cache.insert("A", _entry([1, 2, 3, 4, 5, 6]), epoch=epoch)
    cache.insert("B", _entry([1, 2, 3, 9, 9, 9, 9, 9]), epoch=epoch)
    assert cache.related([1, 2, 3, 4, 5, 7, 7], epoch=epoch, min_share=0.5)[0] == "A"
    assert cache.related([1, 2, 3, 9, 9, 1], epoch=epoch, min_share=0.5)[0] == "B"
    # Only the chat template's opening in common: not the same conversation.
    assert cache.related([1, 2, 7, 7, 7, 7, 7], epoch=epoch, min_share=0.5) is None


def test_sticky_through_route_then_pinned_generate(engine):
    """ChatLoGo's flow: route first, then generate with the routed mixture pinned."""
    routing = RoutingConfig(top_k=2, sticky_margin=1e6)
    first = engine.route(conversation(1), routing=routing)
    engine.generate(conversation(1), adapters=first.mixture, max_new_tokens=4)
    second = engine.route(conversation(2), routing=routing)
    assert second.sticky and mixture_key(second) == mixture_key(first)
    out = engine.generate(conversation(2), adapters=second.mixture, max_new_tokens=4)
    assert out.usage.cached_tokens >= engine.count_tokens(conversation(1))


def test_sticky_and_last_user_turn_scope_compose(engine, uncached):
    routing = RoutingConfig(top_k=2, sticky_margin=1e6, probe_scope="last_user_turn")
    first = engine.generate(conversation(1), routing=routing, max_new_tokens=4)
    for n in (2, 3):
        out = engine.generate(conversation(n), routing=routing, max_new_tokens=6)
        assert out.selection.sticky and mixture_key(out.selection) == mixture_key(first.selection)
        assert out.usage.cached_tokens >= engine.count_tokens(conversation(n - 1))
        alone = [{"role": "user", "content": conversation(n)[-1]["content"]}]
        fresh = uncached.route(alone, routing=RoutingConfig(top_k=2))
        assert out.selection.scores == pytest.approx(fresh.scores, rel=1e-4)


def test_integrations_pass_cache_reads_through(engine):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.core.callbacks import CallbackManager

    from logo_integrations.langchain import ChatLoGo
    from logo_integrations.llama_index import LoGoLLM

    chat = ChatLoGo(engine=engine, mixture={"a": 1.0}, max_tokens=4)
    history = [SystemMessage(SYSTEM["content"]), HumanMessage(TURNS[0][0])]
    first = chat.invoke(history)
    assert "input_token_details" not in first.usage_metadata  # nothing cached yet
    second = chat.invoke([*history, AIMessage(first.content), HumanMessage(TURNS[1][0])])
    read = second.usage_metadata["input_token_details"]["cache_read"]
    assert engine.count_tokens([SYSTEM, {"role": "user", "content": TURNS[0][0]}]) <= read
    assert read < second.usage_metadata["input_tokens"]

    llm = LoGoLLM(
        engine=engine, mixture={"b": 1.0}, max_new_tokens=4, callback_manager=CallbackManager([])
    )
    messages = [
        ChatMessage(role="system", content=SYSTEM["content"]),
        ChatMessage(role="user", content=TURNS[0][0]),
    ]
    answer = llm.chat(messages)
    again = llm.chat([*messages, answer.message, ChatMessage(role="user", content="more")])
    details = again.raw["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] == again.additional_kwargs["cached_tokens"] > 0


# ----------------------------------------------------------------- every probe signal
EXAMPLES = {
    "a": ["abc def", "ghi abc", "def def ghi"],
    "b": ["12 34 + 5", "7 * 8", "56 / 7"],
    "c": ["hello there", "last one", "now then"],
}


@pytest.mark.parametrize("signal", ["entropy", "prototype", "calibrated"])
def test_cached_probe_routes_alike_for_every_signal(engine, uncached, signal):
    """Prototype scores read the probed state; calibrated ranking reads z-scores of raw scores."""
    if signal == "prototype":
        routing = RoutingConfig(top_k=2, signal="prototype")
        for eng in (engine, uncached):
            eng.fit_prototypes(EXAMPLES, routing=routing)
    elif signal == "calibrated":
        routing = RoutingConfig(top_k=2, calibrated=True)
        for eng in (engine, uncached):
            eng.calibrate(EXAMPLES, routing=routing, n_random=8)
    else:
        routing = RoutingConfig(top_k=2, signal="entropy")
    # Fitting and calibrating probe one-off prompts: they neither read nor fill the probe cache.
    assert engine.prefix_cache_stats()["probe"].lookups == 0
    assert engine.prefix_cache_stats()["probe"].entries == 0
    reused = []
    for n in range(1, len(TURNS) + 1):
        prompt = conversation(n)
        got, want = engine.route(prompt, routing=routing), uncached.route(prompt, routing=routing)
        assert_same_selection(got, want)
        assert got.rank_scores == pytest.approx(want.rank_scores, rel=1e-4, abs=1e-6)
        assert got.calibrated == want.calibrated == (signal == "calibrated")
        reused.append(got.probe_cached_tokens)
    assert reused[0] == 0 and all(r > 0 for r in reused[1:])


def test_integration_setting_sizes_the_built_engines_caches(monkeypatch):
    from logo_engine.testing import ScriptedEngine
    from logo_integrations.langchain import ChatLoGo
    from logo_integrations.llama_index import LoGoLLM

    loads = []
    monkeypatch.setattr(
        LoGoEngine,
        "shared",
        classmethod(lambda cls, *a, **k: loads.append(k) or ScriptedEngine(model_name="m")),
    )
    ChatLoGo(model="some/model", prefix_cache_bytes=1 << 20).invoke("hi")
    LoGoLLM(model="some/model", prefix_cache_bytes=0).complete("hi")
    ChatLoGo(model="some/model").invoke("hi")
    assert loads[0]["prefix_cache"] == PrefixCacheConfig(probe_bytes=1 << 20, prefill_bytes=1 << 20)
    assert loads[1]["prefix_cache"] == PrefixCacheConfig.off()
    assert "prefix_cache" not in loads[2]  # None: the engine's default budgets
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        ChatLoGo(prefix_cache_bytes=-1)


def test_server_usage_round_trips_cached_tokens():
    """`logo serve` writes OpenAI's prompt_tokens_details.cached_tokens; RemoteEngine reads it."""
    from logo_engine.client import _usage
    from logo_engine.serving.openai_api import usage_out

    for usage in (
        Usage(prompt_tokens=9, completion_tokens=2, cached_tokens=7),
        Usage(prompt_tokens=3, completion_tokens=1),
    ):
        wire = usage_out(usage).model_dump(mode="json")
        assert wire["prompt_tokens_details"] == {"cached_tokens": usage.cached_tokens}
        assert _usage(wire) == usage
    assert _usage({"prompt_tokens": 4, "completion_tokens": 1}).cached_tokens == 0  # other servers

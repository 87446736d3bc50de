"""``probe_compile``: the probe as a compiled loop over the decoder's blocks.

The oracle is the hooked probe (the default, itself checked against transformers' forward and
hand-computed scores in test_engine.py and test_probe_dtype.py) and, here again, ``s · B A h``
computed by hand from the adapter files on transformers' own block inputs. Most tests run the
loop eagerly (``compile_probe`` swapped for the identity): what they check is that the loop reads
what the hooked pass reads. One test compiles for real.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers import GemmaConfig, GemmaForCausalLM, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaModel

from logo_engine import InvalidRequestError, LoGoEngine, RoutingConfig, RoutingConfigError, probing
from logo_engine.types import PrefixCacheConfig

TURNS, conversation = tiny.TURNS, tiny.conversation


def _logo_hooks(model: torch.nn.Module) -> int:
    return sum(
        getattr(h, "logo_hook", False)
        for m in model.modules()
        for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    )


@pytest.fixture()
def eager_loop(monkeypatch):
    """Run the loop uncompiled: the same modules in the same order, minus the compilation."""
    monkeypatch.setattr(probing, "compile_probe", lambda fn: fn)


@pytest.fixture()
def looped(eager_loop, tokenizer, adapter_dir):
    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, probe_compile=True)
    yield eng
    eng.close()


@pytest.mark.parametrize(
    ("probe_input", "probe_module"),
    [("module", "q_proj"), ("module", "k_proj"), ("module", "v_proj"), ("residual", "q_proj")],
)
@pytest.mark.parametrize("probe_tokens", ["last", "mean"])
@pytest.mark.parametrize("probe_layer", [-1, 0])
def test_the_loop_reads_what_the_hooked_probe_reads(
    looped, engine, probe_input, probe_module, probe_tokens, probe_layer
):
    routing = RoutingConfig(
        top_k=2,
        probe_input=probe_input,
        probe_module=probe_module,
        probe_tokens=probe_tokens,
        probe_layer=probe_layer,
    )
    # one prompt, a conversation growing over the probe cache, then a batch of unequal rows
    for prompt in ["abc de 123 + hello world", *[conversation(n) for n in (1, 2, 3)]]:
        got, want = looped.route(prompt, routing=routing), engine.route(prompt, routing=routing)
        assert got.scores == pytest.approx(want.scores, rel=1e-5, abs=1e-7)
        assert got.adapters == want.adapters
        assert got.probe_cached_tokens == _fitted(looped, prompt, want.probe_cached_tokens)
    batch = ["x y", conversation(4), "abc de 123 hello"]
    got_rows = looped.route_batch(batch, routing=routing)
    want_rows = engine.route_batch(batch, routing=routing)
    for prompt, got, want in zip(batch, got_rows, want_rows, strict=True):
        assert got.scores == pytest.approx(want.scores, rel=1e-5, abs=1e-7)
        assert got.probe_cached_tokens == _fitted(looped, prompt, want.probe_cached_tokens)


def _fitted(engine: LoGoEngine, prompt, reused: int) -> int:
    """The tokens a compiled probe reuses where the hooked one reuses ``reused``: a partial
    hit keeps 2 cached and 2 new tokens or is dropped (``BlockLoop.fit``)."""
    n = len(engine._prepare(prompt, None, None).input_ids)
    if reused in (0, n):
        return reused
    return min(reused, n - 2) if min(reused, n - 2) >= 2 else 0


def test_scores_are_the_hand_computed_ones(looped, adapter_dir):
    """Oracle: transformers' own forward (a plain hook on q_proj), s · B A h from the files."""
    prompt = "reverse abc please 42"
    got = looped.route(prompt, routing=RoutingConfig(top_k=2))
    ids = looped._prepare(prompt, None, None).input_ids
    h = tiny.probed_input(tiny.tiny_model(), ids, -1, "module")[-1]
    module = "model.layers.1.self_attn.q_proj"
    expected = tiny.hand_scores(adapter_dir, ["a", "b", "c"], h, module, "norm")
    assert got.scores == pytest.approx(expected, rel=1e-5, abs=1e-7)


def _gemma() -> GemmaForCausalLM:
    torch.manual_seed(0)
    return GemmaForCausalLM(GemmaConfig(**tiny.tiny_config(), head_dim=16)).eval()


@pytest.mark.parametrize("make", [lambda: tiny.tiny_model("qwen2"), _gemma], ids=["qwen2", "gemma"])
def test_other_llama_style_decoders_loop_too(eager_loop, tokenizer, adapter_dir, make):
    """Qwen2 (biases on q/k/v) and Gemma (an embedding that scales itself, a norm of its own)."""
    hooked = LoGoEngine(make(), tokenizer, adapters=adapter_dir)
    looped = LoGoEngine(make(), tokenizer, adapters=adapter_dir, probe_compile=True)
    try:
        for n in (1, 2, 3):
            got, want = looped.route(conversation(n)), hooked.route(conversation(n))
            assert got.scores == pytest.approx(want.scores, rel=1e-5, abs=1e-7)
    finally:
        hooked.close()
        looped.close()


def test_the_compiled_probe_routes_and_generates_like_the_hooked_one(
    tokenizer, adapter_dir, engine
):
    """``torch.compile`` for real (seconds on the tiny model): scores, reuse and answers, as
    whole graphs (a graph break would leave most of the pass eager)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compiled code is shared by same-shaped models: start from none
    counters.clear()
    compiled = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, probe_compile=True)
    try:
        routing = RoutingConfig(top_k=2)
        for n in range(1, len(TURNS) + 1):  # an empty cache, then cached prefixes
            got = compiled.route(conversation(n), routing=routing)
            want = engine.route(conversation(n), routing=routing)
            assert got.scores == pytest.approx(want.scores, rel=1e-4, abs=1e-6)
            assert got.adapters == want.adapters
            assert (got.probe_cached_tokens > 0) == (n > 1)
        rows = ["abc", "what is 2 + 3 and then 4"]  # two rows, padded
        for got, want in zip(
            compiled.route_batch(rows, routing=routing),
            engine.route_batch(rows, routing=routing),
            strict=True,
        ):
            assert got.scores == pytest.approx(want.scores, rel=1e-4, abs=1e-6)
        got = compiled.generate(conversation(4), max_new_tokens=12, routing=routing)
        want = engine.generate(conversation(4), max_new_tokens=12, routing=routing)
        assert got.text == want.text and got.selection.adapters == want.selection.adapters
        assert counters["stats"]["unique_graphs"] >= 1
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        compiled.close()


def test_the_prober_copy_shares_the_weights_and_carries_no_hook(looped):
    probe_model = looped._prober.model
    assert probe_model is not looped.model
    shared = {n: p.data_ptr() for n, p in looped.model.named_parameters()}
    assert {n: p.data_ptr() for n, p in probe_model.named_parameters()} == shared
    assert _logo_hooks(probe_model) == 0 and _logo_hooks(looped.model) > 0
    looped.route("abc")
    assert _logo_hooks(probe_model) == 0
    looped.close()
    assert _logo_hooks(looped.model) == 0


def test_with_a_bfloat16_probe_the_copy_is_the_cast_one(eager_loop, tokenizer, adapter_dir):
    eng = LoGoEngine(
        tiny.tiny_model(),
        tokenizer,
        adapters=adapter_dir,
        probe_dtype=torch.bfloat16,
        probe_compile=True,
    )
    hooked = LoGoEngine(
        tiny.tiny_model(), tokenizer, adapters=adapter_dir, probe_dtype=torch.bfloat16
    )
    try:
        assert {p.dtype for p in eng._prober.model.parameters()} == {torch.bfloat16}
        got, want = eng.route(conversation(2)), hooked.route(conversation(2))
        assert got.scores == pytest.approx(want.scores, rel=1e-2, abs=1e-4)
    finally:
        eng.close()
        hooked.close()


@pytest.mark.parametrize(
    ("probe_module", "probe_input"), [("o_proj", "module"), ("down_proj", "module")]
)
def test_a_target_the_loop_cannot_read_is_refused(looped, probe_module, probe_input):
    routing = RoutingConfig(top_k=2, probe_module=probe_module, probe_input=probe_input)
    with pytest.raises(RoutingConfigError, match="probe_compile=True probes the input of a block"):
        looped.route("abc", routing=routing)
    assert looped.route("abc").adapters  # the engine's own routing still works


def test_a_sliding_window_model_is_refused(eager_loop, tokenizer):
    config = Qwen2Config(
        **tiny.tiny_config(), use_sliding_window=True, sliding_window=4, max_window_layers=1
    )
    model = type(tiny.tiny_model("qwen2"))(config).eval()
    with pytest.raises(InvalidRequestError, match="full attention in every block"):
        LoGoEngine(model, tokenizer, probe_compile=True)


class _DoubledEmbeddings(LlamaModel):
    """A decoder whose forward does more than the loop knows: it doubles the embeddings."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        return super().forward(inputs_embeds=inputs_embeds * 2.0, **kwargs)


def test_a_decoder_the_loop_does_not_reproduce_is_refused(eager_loop, tokenizer):
    model = tiny.tiny_model()
    model.model.__class__ = _DoubledEmbeddings
    with pytest.raises(InvalidRequestError, match="does not reproduce the model's own block"):
        LoGoEngine(model, tokenizer, probe_compile=True)
    LoGoEngine(model, tokenizer).close()  # the hooked probe reads any forward


def test_caches_off_still_probes(eager_loop, tokenizer, adapter_dir, engine):
    eng = LoGoEngine(
        tiny.tiny_model(),
        tokenizer,
        adapters=adapter_dir,
        probe_compile=True,
        prefix_cache=PrefixCacheConfig.off(),
    )
    try:
        got, want = eng.route(conversation(3)), engine.route(conversation(3))
        assert got.scores == pytest.approx(want.scores, rel=1e-5, abs=1e-7)
        assert got.probe_cached_tokens == 0
    finally:
        eng.close()


def test_cli_probe_compile(eager_loop, adapter_dir, tmp_path, tokenizer):
    from logo_engine.cli import _engine, _parser

    base = tmp_path / "base"
    tiny.tiny_model().save_pretrained(base)
    tokenizer.save_pretrained(base)
    common = ["--base-model", str(base), "--adapters", str(adapter_dir)]
    for flags, compiled in ((["--probe-compile"], True), ([], False)):
        engine = _engine(_parser().parse_args(["serve", *common, *flags]))
        try:
            assert engine.probe_compile is compiled
            assert (engine._prober.loop is not None) is compiled
        finally:
            engine.close()


def test_warm_up_compiles_every_shape_class_and_leaves_the_caches_alone(tokenizer, adapter_dir):
    """After ``warm_up``, conversations and batches compile nothing more."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compiled code is shared by same-shaped models: start from none
    counters.clear()
    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, probe_compile=True)
    try:
        eng.warm_up()
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 4  # one and two rows, over an empty and over a cached prefix
        assert eng.prefix_cache_stats()["probe"].entries == 0
        for n in (1, 2, 3):
            eng.route(conversation(n))
        eng.route_batch(["abc", "what is 2 + 3 and then 4"])
        eng.route_batch([conversation(4), "what is 2 + 3 and then 4 + 5"])
        assert eng.prefix_cache_stats()["probe"].entries > 0
        assert counters["stats"]["unique_graphs"] == graphs
        assert not counters["graph_break"]
    finally:
        eng.close()


def test_warm_up_without_compilation_does_nothing(engine):
    from torch._dynamo.utils import counters

    counters.clear()
    engine.warm_up()
    assert not counters["stats"]["unique_graphs"]
    assert engine.prefix_cache_stats()["probe"].entries == 0


def test_warm_up_refuses_a_target_the_loop_cannot_read(looped):
    with pytest.raises(RoutingConfigError, match="probe_compile=True probes the input"):
        looped.warm_up(RoutingConfig(probe_module="o_proj"))

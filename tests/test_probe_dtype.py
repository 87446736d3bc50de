"""``probe_dtype``: the probe runs in a cast copy of the model, generation in the model itself."""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from logo_engine import InvalidRequestError, LoGoEngine, RoutingConfig
from logo_engine.mixture import HookSet
from logo_engine.probing import cast_copy

BF16 = torch.bfloat16
TURNS, conversation = tiny.TURNS, tiny.conversation


@pytest.fixture()
def bf16_engine(tokenizer, adapter_dir):
    eng = LoGoEngine(
        tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama", probe_dtype=BF16
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def bf16_oracle(tmp_path_factory):
    """The tiny model as ``from_pretrained(dtype=torch.bfloat16)`` loads it."""
    folder = tmp_path_factory.mktemp("base")
    tiny.tiny_model().save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=BF16).eval()


def _logo_hooks(model: torch.nn.Module) -> int:
    return sum(
        getattr(h, "logo_hook", False)
        for m in model.modules()
        for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    )


@pytest.mark.parametrize("signal", ["norm", "entropy"])
@pytest.mark.parametrize("probe_input", ["module", "residual"])
@pytest.mark.parametrize("probe_tokens", ["last", "mean"])
def test_scores_are_those_of_the_model_loaded_in_bfloat16(
    bf16_engine, engine, adapter_dir, bf16_oracle, signal, probe_input, probe_tokens
):
    """Oracle: transformers' bfloat16 load of the model, its own forward, s · B A h by hand."""
    prompt = "abc de 123 + hello world"
    routing = RoutingConfig(
        top_k=2, signal=signal, probe_input=probe_input, probe_tokens=probe_tokens
    )
    got = bf16_engine.route(prompt, routing=routing)
    ids = bf16_engine._prepare(prompt, None, None).input_ids
    h = tiny.probed_input(bf16_oracle, ids, -1, probe_input).float()
    h = h[-1] if probe_tokens == "last" else h.mean(0)
    module = "model.layers.1.self_attn.q_proj"
    expected = tiny.hand_scores(adapter_dir, ["a", "b", "c"], h, module, signal)
    assert got.scores == pytest.approx(expected, rel=1e-4, abs=1e-6)
    if signal == "norm":  # entropy is flat on random adapters: too close to tell apart
        # ... and not those of the float32 probe: the test tells the two dtypes apart
        fp32 = engine.route(prompt, routing=routing).scores
        assert fp32 != pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert fp32 == pytest.approx(expected, rel=0.05)  # close, as bfloat16 is


def test_generation_stays_in_the_model_dtype(bf16_engine, engine):
    assert bf16_engine.probe_dtype == BF16 and engine.probe_dtype == torch.float32
    assert {p.dtype for p in bf16_engine.model.parameters()} == {torch.float32}
    bucket = bf16_engine.library.stacks["model.layers.1.self_attn.q_proj"].buckets[0]
    assert bucket.lora_a.dtype == bucket.lora_b.dtype == torch.float32
    pinned = {"a": 0.6, "b": 0.4}  # no probe: the two engines must agree bit for bit
    for prompt in ["abc de", conversation(2)]:
        want = engine.generate(prompt, max_new_tokens=16, adapters=pinned)
        got = bf16_engine.generate(prompt, max_new_tokens=16, adapters=pinned)
        assert (got.text, got.usage, got.finish_reason) == (
            want.text,
            want.usage,
            want.finish_reason,
        )
    # routed: where both probes pick the same mixture, the answers are the same
    prompt = "reverse abc please"
    a, b = engine.route(prompt), bf16_engine.route(prompt)
    assert a.adapters == b.adapters
    want = engine.generate(prompt, max_new_tokens=8, adapters=b.mixture)
    assert bf16_engine.generate(prompt, max_new_tokens=8).text == want.text


def test_probe_cache_holds_the_cast_probe(bf16_engine, tokenizer, adapter_dir):
    uncached = LoGoEngine(
        tiny.tiny_model(),
        tokenizer,
        adapters=adapter_dir,
        probe_dtype="bfloat16",
        prefix_cache=__import__("logo_engine").PrefixCacheConfig.off(),
    )
    fp32 = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir)
    try:
        routing = RoutingConfig(top_k=2)
        for n in range(1, len(TURNS) + 1):
            got = bf16_engine.route(conversation(n), routing=routing)
            want = uncached.route(conversation(n), routing=routing)
            fp32.route(conversation(n), routing=routing)
            assert got.adapters == want.adapters
            assert got.scores == pytest.approx(want.scores, rel=2e-2, abs=1e-4)
            assert (got.probe_cached_tokens > 0) == (n > 1)
        # bfloat16 keys, values and captured inputs: about half the float32 probe's bytes
        half = bf16_engine.prefix_cache_stats()["probe"].bytes
        full = fp32.prefix_cache_stats()["probe"].bytes
        assert 0.4 * full < half < 0.6 * full
    finally:
        uncached.close()
        fp32.close()


def test_the_copy_is_cast_tied_and_unhooked(tokenizer, adapter_dir):
    model = tiny.tiny_model()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    first = LoGoEngine(model, tokenizer, adapters=adapter_dir)  # hooks on the original
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    clone = cast_copy(model, BF16)
    assert {p.dtype for p in clone.parameters()} == {BF16}
    assert clone.lm_head.weight is clone.model.embed_tokens.weight
    assert clone.model.rotary_emb.inv_freq.dtype == torch.float32
    assert _logo_hooks(model) > 0 and _logo_hooks(clone) == 0
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    HookSet(clone).remove()  # a clean copy is accepted as a fresh model
    second = LoGoEngine(model, tokenizer, adapters=adapter_dir, probe_dtype=BF16)
    probe_model = second._prober.model
    assert probe_model is not model and _logo_hooks(probe_model) > 0
    assert second.route("abc").adapters
    second.close()
    assert _logo_hooks(probe_model) == 0
    first.close()
    assert _logo_hooks(model) == 0


def test_same_dtype_makes_no_copy(engine, tokenizer, adapter_dir):
    assert engine._prober.model is engine.model
    same = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, probe_dtype="float32")
    assert same._prober.model is same.model
    same.close()


def test_a_quantized_model_is_refused(tokenizer):
    model = tiny.tiny_model()
    weight = model.model.layers[0].mlp.down_proj.weight
    model.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(
        weight.detach().to(torch.int8), requires_grad=False
    )  # stands in for a quantized layer
    with pytest.raises(InvalidRequestError, match="quantized"):
        LoGoEngine(model, tokenizer, probe_dtype=BF16)


@pytest.mark.parametrize("bad", ["int8", "nonsense", torch.int64, 16])
def test_bad_probe_dtype_is_refused(tokenizer, bad):
    with pytest.raises(InvalidRequestError, match="probe_dtype"):
        LoGoEngine(tiny.tiny_model(), tokenizer, probe_dtype=bad)


def test_dtype_names_parse_to_their_torch_dtypes_everywhere():
    """One list of names for the engine, the CLI and the integrations (Ray: tests/test_ray.py)."""
    from logo_engine.cli import _parser
    from logo_engine.types import DTYPES, parse_dtype
    from logo_integrations.langchain import ChatLoGo

    expected = {  # hand-written: the names users type and what torch calls them
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float64": torch.float64,
    }
    assert set(DTYPES) == set(expected)
    for name, dtype in expected.items():
        assert parse_dtype(name) is dtype
        assert parse_dtype(dtype) is dtype
        args = _parser().parse_args(["route", "x", "--dtype", name, "--probe-dtype", name])
        assert (args.dtype, args.probe_dtype) == (name, name)
        assert ChatLoGo(dtype=name, probe_dtype=name).dtype == name
    assert parse_dtype(None) is None
    for bad in ("half", "float", "int8", "Float32"):  # torch aliases are not names we take
        with pytest.raises(InvalidRequestError, match=r"probe_dtype must be one of \['float32'"):
            parse_dtype(bad, what="probe_dtype")
        with pytest.raises(ValueError, match=r"dtype must be one of \['float32'"):
            ChatLoGo(dtype=bad)
        with pytest.raises(SystemExit):
            _parser().parse_args(["route", "x", "--dtype", bad])
    with pytest.raises(InvalidRequestError, match="floating"):
        parse_dtype(torch.int8)


def test_cli_probe_dtype(adapter_dir, tmp_path, tokenizer):
    from logo_engine.cli import _engine, _parser

    base = tmp_path / "base"
    tiny.tiny_model().save_pretrained(base)
    tokenizer.save_pretrained(base)
    common = ["--base-model", str(base), "--adapters", str(adapter_dir)]
    engine = _engine(_parser().parse_args(["route", "hi", *common, "--probe-dtype", "bfloat16"]))
    try:
        assert engine.probe_dtype == BF16
        assert {p.dtype for p in engine.model.parameters()} == {torch.float32}
    finally:
        engine.close()
    engine = _engine(_parser().parse_args(["route", "hi", *common]))
    assert engine.probe_dtype == torch.float32
    engine.close()


def test_batched_rows_route_as_alone_within_bfloat16_rounding(bf16_engine):
    """Packed rows in the cast copy: each row's scores are its own (bfloat16 tolerance).

    Unlike float32 rows, bfloat16 rows are not bit-equal to their solo probes: the matmul
    kernels round differently for other batch shapes (documented with ``probe_dtype``).
    """
    from logo_engine import packing

    assert packing.packs(bf16_engine._prober.model)
    prompts = ["abc", "what is 2 + 3 and then 4 + 5", conversation(3), "reverse abc please"]
    batched = bf16_engine.route_batch(prompts)
    for prompt, got in zip(prompts, batched, strict=True):
        bf16_engine.clear_prefix_caches()
        alone = bf16_engine.route(prompt)
        assert got.scores == pytest.approx(alone.scores, rel=2e-2, abs=1e-4)
    # a probe that mixed rows up would be far off: the rows' own scores differ by more
    firsts = [s.scores["a"] for s in batched]
    assert max(firsts) > 1.05 * min(firsts)

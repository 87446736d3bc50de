"""The engine's numbers against independent oracles: peft's own layers and hand computations."""

from __future__ import annotations

import pytest
import tiny
import torch
from peft import PeftModel

from logo_engine import LoGoEngine, RoutingConfig
from logo_engine.mixture import ForwardContext, MixturePlan, forward_context
from logo_engine.routing import pinned_selection


def _peft_model(adapter_dir, names, weights):
    """peft with ``names`` active (summed) and each adapter's scaling multiplied by its weight."""
    model = PeftModel.from_pretrained(
        tiny.tiny_model(), adapter_dir / names[0], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(adapter_dir / name, adapter_name=name)
    model.base_model.set_adapter(list(names), inference_mode=True)
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            for name, w in zip(names, weights, strict=True):
                if name in module.scaling:
                    module.scaling[name] *= w
    return model.eval()


def _engine_logits(engine, ids, mixture, batch_rows=None):
    selection = pinned_selection(mixture, engine.adapter_names)
    plan = MixturePlan.build(engine.library, [selection] * (batch_rows or 1))
    with torch.inference_mode(), forward_context(ForwardContext(plan=plan)):
        return engine.model(input_ids=ids).logits


@pytest.mark.parametrize(
    "mixture",
    [{"a": 0.7, "b": 0.3}, {"a": 0.2, "b": 0.5, "c": 0.3}, {"c": 1.0}, {"b": 0.9, "c": 0.1}],
)
def test_pinned_mixture_matches_peft(engine, adapter_dir, mixture):
    ids = torch.randint(3, 400, (2, 11), generator=torch.Generator().manual_seed(0))
    names, weights = list(mixture), list(mixture.values())
    oracle = _peft_model(adapter_dir, names, weights)
    with torch.inference_mode():
        expected = oracle(input_ids=ids).logits
    got = _engine_logits(engine, ids, mixture)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the same mixture through the per-row (batched) path
    rows = [
        pinned_selection(mixture, engine.adapter_names),
        pinned_selection({}, engine.adapter_names),
    ]
    plan = MixturePlan.build(engine.library, rows)
    with torch.inference_mode(), forward_context(ForwardContext(plan=plan)):
        batched = engine.model(input_ids=ids).logits
    with torch.inference_mode():
        base = engine.model(input_ids=ids[1:]).logits
    torch.testing.assert_close(batched[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], base[0], atol=1e-5, rtol=1e-5)


def test_no_context_is_the_base_model(engine):
    ids = torch.randint(3, 400, (1, 9))
    base = tiny.tiny_model()
    with torch.inference_mode():
        torch.testing.assert_close(engine.model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("signal", ["norm", "entropy"])
@pytest.mark.parametrize("probe_input", ["module", "residual"])
@pytest.mark.parametrize("layer", [-1, 0])
def test_probe_scores_match_hooks(engine, adapter_dir, signal, probe_input, layer):
    prompt = "abc de 123 + hello"
    routing = RoutingConfig(top_k=2, signal=signal, probe_input=probe_input, probe_layer=layer)
    selection = engine.route(prompt, routing=routing)
    # oracle: forward hooks on a plain copy of the base model
    ids = engine._prepare(prompt, None, None).input_ids
    h = tiny.probed_input(tiny.tiny_model(), ids, layer, probe_input)[-1]
    n_layer = layer % 2
    expected = tiny.hand_scores(
        adapter_dir, ["a", "b", "c"], h, f"model.layers.{n_layer}.self_attn.q_proj", signal
    )
    assert selection.probe_module == f"model.layers.{n_layer}.self_attn.q_proj"
    assert selection.scores.keys() == expected.keys()
    for name in expected:
        assert selection.scores[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6)
    top = sorted((s for s in expected.values() if s > 0), reverse=True)[:2]
    assert selection.weights == pytest.approx([t / sum(top) for t in top], rel=1e-5)


def test_probe_mean_tokens_is_mean_of_outputs(engine, adapter_dir):
    prompt = "abc de 123"
    sel = engine.route(prompt, routing=RoutingConfig(top_k=1, probe_tokens="mean"))
    ids = engine._prepare(prompt, None, None).input_ids
    h = tiny.probed_input(tiny.tiny_model(), ids, -1, "module").mean(0)
    expected = tiny.hand_scores(
        adapter_dir, ["a", "b", "c"], h, "model.layers.1.self_attn.q_proj", "norm"
    )
    for name in expected:
        assert sel.scores[name] == pytest.approx(expected[name], rel=1e-4)


def test_probe_ignores_earlier_requests(engine):
    """The probe runs with no adapter active: the same prompt scores the same after any call."""
    first = engine.route("hello world")
    engine.generate("abc", adapters={"a": 1.0}, max_new_tokens=3)
    engine.generate("xyz", max_new_tokens=3)
    engine.clear_prefix_caches()  # probe the model again, not the cached pass
    assert engine.route("hello world").scores == first.scores


def test_probe_stops_at_probe_module(engine):
    """No full forward: nothing after the probe module runs (no later layers, no lm_head)."""
    calls = []
    handles = [
        engine.model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")),
        engine.model.model.layers[1].mlp.register_forward_hook(lambda *a: calls.append("mlp1")),
        engine.model.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append("mlp0")),
    ]
    try:
        engine.route("hello world")
    finally:
        for h in handles:
            h.remove()
    assert calls == ["mlp0"]


def test_routed_generation_matches_peft_generate(engine, adapter_dir, tokenizer):
    """A routed k=2 generation equals peft's greedy generate with that mixture."""
    prompt = "hello abc 42"
    gen = engine.generate(prompt, max_new_tokens=8, routing=RoutingConfig(top_k=2))
    oracle = _peft_model(adapter_dir, gen.selection.adapters, gen.selection.weights)
    ids = torch.tensor([engine._prepare(prompt, None, None).input_ids])
    with torch.inference_mode():
        out = oracle.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert gen.text == expected


def test_generate_text_equals_full_decode(engine, adapter_dir, tokenizer):
    """Incremental detokenization gives exactly tokenizer.decode(new ids, skip_special_tokens)."""
    gen = engine.generate("12 ab +", adapters={"a": 0.5, "b": 0.5}, max_new_tokens=20)
    ids = torch.tensor([engine._prepare("12 ab +", None, None).input_ids])
    oracle = _peft_model(adapter_dir, ["a", "b"], [0.5, 0.5])
    with torch.inference_mode():
        out = oracle.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert gen.text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert gen.usage.completion_tokens == out.shape[1] - ids.shape[1]


def test_qwen2_architecture(tokenizer, tmp_path):
    model = tiny.tiny_model("qwen2")
    tiny.random_adapter(model, tmp_path / "q", targets=("q_proj", "gate_proj"))
    tiny.random_adapter(model, tmp_path / "r", targets=("q_proj",), seed=5)
    engine = LoGoEngine(model, tokenizer, adapters=tmp_path)
    gen = engine.generate("abc", max_new_tokens=4)
    assert gen.selection.adapters and gen.usage.completion_tokens >= 1

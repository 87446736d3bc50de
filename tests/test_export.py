"""engine.export_mixture: the cat-form adapter, applied by peft, equals the engine's mixture."""

from __future__ import annotations

import copy
import json

import pytest
import tiny
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from logo_engine import InvalidRequestError, LoGoEngine
from logo_engine.errors import AdapterNotFoundError, ExportError, MixtureRankError
from logo_engine.export import (
    ALLOWED_MAX_LORA_RANKS,
    check_rank,
    mixture_key,
    round_up_rank,
    round_weights,
)
from logo_engine.mixture import ForwardContext, MixturePlan, forward_context
from logo_engine.routing import pinned_selection


@pytest.fixture(scope="module")
def patterned_dir(tmp_path_factory):
    """An adapter with rank_pattern and alpha_pattern (per-module ranks and alphas)."""
    root = tmp_path_factory.mktemp("patterned")
    torch.manual_seed(4)
    config = LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        rank_pattern={"v_proj": 6},
        alpha_pattern={"gate_proj": 3},
        init_lora_weights=False,
    )
    get_peft_model(tiny.tiny_model(), config).save_pretrained(root / "p")
    return root / "p"


@pytest.fixture()
def engine5(tokenizer, adapter_dir, patterned_dir):
    """a (r4 q,v), b (r8 q,k,o,down), c (r2 rsLoRA q,up layer 1), p (rank/alpha patterns)."""
    paths = {n: adapter_dir / n for n in ("a", "b", "c")} | {"p": patterned_dir}
    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=paths, name="tiny-llama")
    yield eng
    eng.close()


def _engine_logits(engine, ids, mixture):
    plan = MixturePlan.build(engine.library, [pinned_selection(mixture, engine.adapter_names)])
    with torch.inference_mode(), forward_context(ForwardContext(plan=plan)):
        return engine.model(input_ids=ids).logits


def _peft_logits(folder, ids):
    model = PeftModel.from_pretrained(tiny.tiny_model(), folder).eval()
    with torch.inference_mode():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 400, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "mixture",
    [
        {"a": 0.7, "b": 0.3},
        {"a": 0.2, "b": 0.5, "c": 0.3},
        {"c": 0.6, "p": 0.4},
        {"a": 1.0, "b": 1.0, "c": 1.0, "p": 1.0},  # normalised to 1/4 each
        {"b": 2.0},  # k = 1 forced to a copy below
    ],
)
def test_exported_adapter_equals_the_engine_mixture(engine5, tmp_path, mixture):
    out = engine5.export_mixture(mixture, tmp_path / "cat", copy_single=True)
    assert not out.original and out.path == tmp_path / "cat"
    expected = _engine_logits(engine5, IDS, mixture)
    got = _peft_logits(out.path, IDS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, _peft_logits_base(IDS), atol=1e-3)  # the mixture matters


def _peft_logits_base(ids):
    with torch.inference_mode():
        return tiny.tiny_model()(input_ids=ids).logits


def test_cat_layout_and_config(engine5, tmp_path):
    """Rank = Σ R_i, scaling exactly 1, zero blocks where an adapter lacks a module."""
    out = engine5.export_mixture({"a": 0.25, "c": 0.75}, tmp_path / "cat")
    config = json.loads((out.path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 + 2 == out.rank
    assert config["use_rslora"] is False and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "tiny-llama"
    state = load_file(out.path / "adapter_model.safetensors")
    names = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in state}
    assert names == set(config["target_modules"])
    # v_proj: only "a" adapts it -> columns 4:6 ("c" block) of B and rows 4:6 of A are zero
    v0 = "base_model.model.model.layers.0.self_attn.v_proj"
    assert state[f"{v0}.lora_A.weight"].shape == (6, 64)
    assert torch.count_nonzero(state[f"{v0}.lora_A.weight"][4:]) == 0
    assert torch.count_nonzero(state[f"{v0}.lora_B.weight"][:, 4:]) == 0
    # up_proj of layer 1: only "c" (rsLoRA: s = alpha / sqrt(r)) -> B block = 0.75 * s * B
    up1 = "model.layers.1.mlp.up_proj"
    raw = load_file(
        engine5.library.adapters[engine5.library.slot("c")].path / "adapter_model.safetensors"
    )
    b_c = raw[f"base_model.model.{up1}.lora_B.weight"]
    torch.testing.assert_close(
        state[f"base_model.model.{up1}.lora_B.weight"][:, 4:], b_c * 0.75 * 2 / 2**0.5
    )
    assert torch.count_nonzero(state[f"base_model.model.{up1}.lora_B.weight"][:, :4]) == 0
    mixture = json.loads((out.path / "logo_mixture.json").read_text())
    assert mixture == {"adapters": ["c", "a"], "weights": [0.75, 0.25]}


def test_single_adapter_points_at_the_original(engine5, tmp_path, adapter_dir):
    out = engine5.export_mixture({"b": 3.0}, tmp_path / "never")
    assert out.original and out.path == adapter_dir / "b" and out.rank == 8
    assert not (tmp_path / "never").exists()
    sel = engine5.route("hello there")  # a Selection works as well as a mapping
    top = sel.adapters[0]
    single = sel.model_copy(update={"adapters": [top], "weights": [1.0]})
    assert engine5.export_mixture(single, tmp_path / "x").path.name in {"a", "b", "c", "p"}


def test_selection_export_uses_served_weights(engine5, tmp_path):
    sel = engine5.route("hello there").model_copy(
        update={"adapters": ["a", "b"], "weights": [0.6, 0.4], "served_weights": [0.5, 0.5]}
    )
    out = engine5.export_mixture(sel, tmp_path / "cat")
    assert out.mixture == {"a": 0.5, "b": 0.5}
    torch.testing.assert_close(
        _peft_logits(out.path, IDS),
        _engine_logits(engine5, IDS, {"a": 1, "b": 1}),
        atol=1e-5,
        rtol=1e-5,
    )


def test_export_errors(engine5, tmp_path):
    with pytest.raises(InvalidRequestError, match="empty"):
        engine5.export_mixture({}, tmp_path / "x")
    with pytest.raises(AdapterNotFoundError):
        engine5.export_mixture({"zzz": 1.0}, tmp_path / "x")
    with pytest.raises(InvalidRequestError):
        engine5.export_mixture({"a": -1.0, "b": 1.0}, tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="overwrite"):
        engine5.export_mixture({"a": 0.5, "b": 0.5}, tmp_path / "full")
    out = engine5.export_mixture({"a": 0.5, "b": 0.5}, tmp_path / "full", overwrite=True)
    assert sorted(p.name for p in out.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "logo_mixture.json",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_keys_ranks_and_rounding(engine5, tokenizer, adapter_dir):
    lib = engine5.library
    k1 = mixture_key(lib, {"a": 0.5, "b": 0.5})
    assert k1 == mixture_key(lib, {"b": 0.5, "a": 0.5})  # order-independent
    assert k1 != mixture_key(lib, {"a": 0.5000001, "b": 0.4999999})  # exact in the weights
    assert k1 != mixture_key(lib, {"a": 0.5, "c": 0.5})
    # the same adapters in another library (another engine) give the same key
    other = LoGoEngine(
        tiny.tiny_model(), tokenizer, adapters={"b": adapter_dir / "b", "a": adapter_dir / "a"}
    )
    assert mixture_key(other.library, {"a": 0.5, "b": 0.5}) == k1
    other.close()
    # ranks: a=4, b=8, c=2, p=max(4, 6)=6
    assert check_rank(lib, {"a": 1, "b": 1, "p": 1}, 32) == 18
    with pytest.raises(MixtureRankError, match=r"max_lora_rank=32 \(18 rounded up") as info:
        check_rank(lib, {"a": 1, "b": 1, "p": 1}, 16)
    assert "a r=4 + b r=8 + p r=6" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert [round_up_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(MixtureRankError, match="512"):
        round_up_rank(513)
    assert ALLOWED_MAX_LORA_RANKS[-1] == 512
    assert round_weights({"a": 0.52, "b": 0.29, "c": 0.19}, 0.05) == pytest.approx(
        {"a": 0.5, "b": 0.3, "c": 0.2}
    )
    assert round_weights({"a": 0.34, "b": 0.33, "c": 0.33}, 0.05) == pytest.approx(
        {"a": 0.35, "b": 0.35, "c": 0.3}  # 6.8, 6.6, 6.6 steps: floors 6+6+6, 2 left
    )
    assert round_weights({"a": 0.99, "b": 0.01}, 0.05) == pytest.approx(
        {"a": 19 / 20, "b": 1 / 20}
    )  # every adapter keeps at least one step
    assert sum(round_weights({"a": 0.123, "b": 0.456, "c": 0.421}, 0.1).values()) == 1.0
    with pytest.raises(InvalidRequestError, match="finer grid"):
        round_weights({"a": 0.4, "b": 0.3, "c": 0.3}, 0.5)
    with pytest.raises(InvalidRequestError, match="weight_grid"):
        round_weights({"a": 1.0}, 0.0)


def test_exported_adapter_generates_like_the_engine(engine5, tmp_path):
    """End to end on the tiny model: peft's greedy generate with the file = the engine's."""
    mixture = {"a": 0.4, "b": 0.35, "p": 0.25}
    out = engine5.export_mixture(mixture, tmp_path / "cat")
    gen = engine5.generate("abc def", adapters=mixture, max_new_tokens=12)
    ids = engine5.tokenizer(
        engine5.tokenizer.apply_chat_template(
            [{"role": "user", "content": "abc def"}], add_generation_prompt=True, tokenize=False
        ),
        add_special_tokens=False,
        return_tensors="pt",
    )["input_ids"]
    model = PeftModel.from_pretrained(tiny.tiny_model(), out.path).eval()
    new = model.generate(
        input_ids=ids, max_new_tokens=gen.usage.completion_tokens, do_sample=False
    )[0, ids.shape[1] :]
    assert engine5.tokenizer.decode(new, skip_special_tokens=True) == gen.text
    assert copy.deepcopy(gen.selection.served_weights) is None

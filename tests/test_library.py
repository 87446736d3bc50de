"""Adapter loading: formats, validation errors, and an unchanged engine after any error."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from logo_engine import (
    AdapterIncompatibleError,
    AdapterLoadError,
    LoGoEngine,
    UnsafeAdapterError,
)
from logo_engine.library import resolve_sources
from logo_engine.mixture import MixturePlan


def _copy(src, dst, edit_config=None, edit_state=None):
    shutil.copytree(src, dst)
    if edit_config:
        path = dst / "adapter_config.json"
        config = json.loads(path.read_text())
        edit_config(config)
        path.write_text(json.dumps(config))
    if edit_state:
        path = dst / "adapter_model.safetensors"
        state = load_file(path)
        edit_state(state)
        save_file(state, path)
    return dst


def _bad_adapters(adapter_dir, root):
    a = adapter_dir / "a"
    other = tiny.tiny_model()
    other_root = root / "other"
    wide = tiny.tiny_model(vocab_size=400)
    wide.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 96, bias=False)
    tiny.random_adapter(wide, other_root / "wide", targets=("q_proj",))
    del other

    def truncate(dst):
        path = dst / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:200])

    def nan(state):
        key = next(iter(state))
        state[key][0, 0] = float("nan")

    def to_pickle(dst):
        state = load_file(dst / "adapter_model.safetensors")
        (dst / "adapter_model.safetensors").unlink()
        torch.save(state, dst / "adapter_model.bin")

    cases = {
        "missing_dir": (root / "nowhere", AdapterLoadError, "no adapter_config.json"),
        "no_weights": (None, AdapterLoadError, "no adapter_model.safetensors"),
        "truncated": (None, AdapterLoadError, "truncated or corrupt"),
        "not_lora": (
            _copy(a, root / "not_lora", lambda c: c.update(peft_type="IA3")),
            AdapterIncompatibleError,
            "not a LoRA adapter",
        ),
        "dora": (
            _copy(a, root / "dora", lambda c: c.update(use_dora=True)),
            AdapterIncompatibleError,
            "DoRA",
        ),
        "nan": (_copy(a, root / "nan", edit_state=nan), AdapterIncompatibleError, "NaN"),
        "pickle": (None, UnsafeAdapterError, "pickle"),
        "bad_json": (None, AdapterLoadError, "cannot parse"),
        "shape": (other_root / "wide", AdapterIncompatibleError, "(out, in)"),
        "rank": (
            _copy(a, root / "rank", lambda c: c.update(r=16)),
            AdapterIncompatibleError,
            "rank",
        ),
        "module": (
            _copy(
                a,
                root / "module",
                edit_state=lambda s: s.update(
                    {
                        "base_model.model.model.layers.0.self_attn.nope.lora_A.weight": torch.zeros(
                            4, 64
                        ),
                        "base_model.model.model.layers.0.self_attn.nope.lora_B.weight": torch.zeros(
                            64, 4
                        ),
                    }
                ),
            ),
            AdapterIncompatibleError,
            "not a Linear layer",
        ),
    }
    no_weights = _copy(a, root / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    cases["no_weights"] = (no_weights, *cases["no_weights"][1:])
    cases["truncated"] = (_copy(a, root / "truncated"), *cases["truncated"][1:])
    truncate(cases["truncated"][0])
    cases["pickle"] = (_copy(a, root / "pickle"), *cases["pickle"][1:])
    to_pickle(cases["pickle"][0])
    cases["bad_json"] = (_copy(a, root / "bad_json"), *cases["bad_json"][1:])
    (cases["bad_json"][0] / "adapter_config.json").write_text("{not json")
    return cases


@pytest.fixture(scope="module")
def bad(adapter_dir, tmp_path_factory):
    return _bad_adapters(adapter_dir, tmp_path_factory.mktemp("bad"))


CASES = [
    "missing_dir",
    "no_weights",
    "truncated",
    "not_lora",
    "dora",
    "nan",
    "pickle",
    "bad_json",
    "shape",
    "rank",
    "module",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_adapter_gives_typed_error_and_leaves_engine_unchanged(engine, bad, case):
    path, error, match = bad[case]
    before = engine.adapter_names
    scores = engine.route("hello").scores
    with pytest.raises(error, match=match) as info:
        engine.load_adapters({"newcomer": path})
    assert "newcomer" in str(info.value) or case in ("missing_dir", "shape", "module")
    assert engine.adapter_names == before
    assert engine.route("hello").scores == scores


def test_pickle_loads_only_on_opt_in(engine, bad, adapter_dir):
    path = bad["pickle"][0]
    engine.load_adapters({"pickled": path}, allow_pickle=True)
    a = engine.generate("hello", adapters={"a": 1.0}, max_new_tokens=5).text
    assert engine.generate("hello", adapters={"pickled": 1.0}, max_new_tokens=5).text == a


def test_mixed_ranks_alphas_rslora_and_targets(engine):
    lib = engine.library
    q = lib.stacks["model.layers.1.self_attn.q_proj"]
    # one bucket per rank, no padding: c (r=2), a (r=4), b (r=8)
    assert [tuple(b.lora_a.shape) for b in q.buckets] == [(1, 2, 64), (1, 4, 64), (1, 8, 64)]
    assert [b.slots.tolist() for b in q.buckets] == [[2], [0], [1]]
    k = lib.stacks["model.layers.0.self_attn.k_proj"]
    assert k.bucket_of.tolist() == [-1, 0, -1]  # only "b" adapts k_proj
    assert lib.has_module("model.layers.0.self_attn.k_proj").tolist() == [False, True, False]
    assert "model.layers.0.mlp.up_proj" not in lib.stacks  # "c" only adapts layer 1


def test_modules_alike_in_ranks_but_not_in_adapters_get_their_own_factors(tokenizer, tmp_path):
    """Plans share their index work between modules of one layout; here two layouts differ
    only in which adapter is where. Oracle: the factors as peft saved them (alpha / r = 2)."""
    model = tiny.tiny_model()
    tiny.random_adapter(model, tmp_path / "x", r=4, targets=("q_proj",), layers=[0], seed=5)
    tiny.random_adapter(model, tmp_path / "y", r=4, targets=("q_proj",), layers=[1], seed=6)
    engine = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=tmp_path)
    lib = engine.library
    q0, q1 = (f"model.layers.{i}.self_attn.q_proj" for i in (0, 1))
    assert lib.layout(q0) != lib.layout(q1)  # same ranks, other slots
    saved = {n: load_file(tmp_path / n / "adapter_model.safetensors") for n in ("x", "y")}

    def delta(name: str, module: str) -> torch.Tensor:
        key = f"base_model.model.{module}.lora_{{}}.weight"
        state = saved[name]
        if key.format("A") not in state:
            return torch.zeros(())
        return 2.0 * state[key.format("B")] @ state[key.format("A")]

    mixtures = [{"x": 0.6, "y": 0.4}, {"y": 1.0}, {}]
    for rows in ([mixtures[0]], mixtures):  # one shared plan; one plan per row
        plan = MixturePlan._build(lib, [tuple(m.items()) for m in rows])
        assert set(plan.modules) == {q0, q1}
        for module, mix in plan.modules.items():
            for i, mixture in enumerate(rows):
                a, b = (
                    (mix.a_cat, mix.b_cat) if mix.a_cat.ndim == 2 else (mix.a_cat[i], mix.b_cat[i])
                )
                expected = sum(w * delta(n, module) for n, w in mixture.items())
                torch.testing.assert_close(b @ a, expected + torch.zeros_like(b @ a))


def test_one_bad_adapter_in_a_library_loads_none(tokenizer, adapter_dir, bad, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(adapter_dir / "a", lib / "good")
    shutil.copytree(bad["dora"][0], lib / "zz_dora")
    with pytest.raises(AdapterIncompatibleError, match="zz_dora"):
        LoGoEngine(tiny.tiny_model(), tokenizer, adapters=lib)


def test_library_folder_refuses_links_outside(tmp_path, adapter_dir):
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copytree(adapter_dir / "a", lib / "a")
    os.symlink(adapter_dir / "b", lib / "b")
    with pytest.raises(AdapterLoadError, match="outside the library"):
        resolve_sources(lib)


def test_sources_forms(adapter_dir):
    assert resolve_sources(adapter_dir) == {n: adapter_dir / n for n in ("a", "b", "c")}
    assert resolve_sources(adapter_dir / "a") == {"a": adapter_dir / "a"}
    assert resolve_sources([adapter_dir / "a", adapter_dir / "b"]) == {
        "a": adapter_dir / "a",
        "b": adapter_dir / "b",
    }
    with pytest.raises(AdapterLoadError, match="two adapters"):
        resolve_sources([adapter_dir / "a", adapter_dir / "a"])


def test_duplicate_names_refused(engine, adapter_dir):
    with pytest.raises(AdapterLoadError, match="already loaded"):
        engine.load_adapters({"a": adapter_dir / "b"})


def test_progress_bar_for_many_adapters(tokenizer, adapter_dir, capsys):
    engine = LoGoEngine(tiny.tiny_model(), tokenizer)
    engine.load_adapters({f"x{i}": adapter_dir / "abc"[i % 3] for i in range(9)})
    assert "loading adapters" in capsys.readouterr().err
    assert len(engine.adapter_names) == 9


def test_incremental_loading_equals_loading_at_once(tokenizer, adapter_dir):
    """Stacks extended adapter by adapter (ranks and targets differ) give the same mixtures."""
    at_once = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir)
    step_by_step = LoGoEngine(tiny.tiny_model(), tokenizer)
    for name in ("c", "a", "b"):  # smallest rank first, so later ones widen the stacks
        step_by_step.load_adapters({name: adapter_dir / name})
    for mixture in ({"a": 0.5, "b": 0.5}, {"c": 1.0}, {"a": 0.2, "b": 0.3, "c": 0.5}):
        one = at_once.generate("hello abc", adapters=mixture, max_new_tokens=8)
        two = step_by_step.generate("hello abc", adapters=mixture, max_new_tokens=8)
        assert one.text == two.text
    assert at_once.route("hello").scores == pytest.approx(step_by_step.route("hello").scores)
    assert all(not a.modules for a in step_by_step.library.adapters)  # no second weight copy


def test_adapter_naming_another_base_model_loads_with_a_warning(
    engine, adapter_dir, tmp_path, caplog
):
    other = _copy(
        adapter_dir / "a",
        tmp_path / "other",
        lambda c: c.update(base_model_name_or_path="someone/another-model"),
    )
    with caplog.at_level("WARNING", logger="logo_engine.engine"):
        engine.load_adapters({"other": other})
    assert "another-model" in caplog.text and "other" in engine.adapter_names


def test_factors_give_back_each_adapter_unpadded_with_scaling_folded(engine, adapter_dir):
    """library.factors(name) equals the adapter file's A and scaling * B (peft's own reading)."""
    from safetensors.torch import load_file

    for name, (r, alpha, rslora) in {
        "a": (4, 8, False),
        "b": (8, 4, False),
        "c": (2, 2, True),
    }.items():
        state = load_file(str(adapter_dir / name / "adapter_model.safetensors"))
        factors = engine.library.factors(name)
        scaling = alpha / (r**0.5) if rslora else alpha / r
        a_keys = sorted(k for k in state if ".lora_A." in k)
        assert len(factors) == len(a_keys)
        for key in a_keys:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            f = factors[module]
            assert f.lora_a.shape == (r, state[key].shape[1]) and f.scaling == 1.0
            torch.testing.assert_close(f.lora_a, state[key])
            b = state[key.replace("lora_A", "lora_B")]
            torch.testing.assert_close(f.lora_b, b * scaling)

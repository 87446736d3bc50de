"""Routing rules of issue 10: weights follow the ranking, abstention, prototypes, data-free
calibration, per-library defaults, and the paper's rule unchanged with ``calibrated=False``.

Oracles: hand computations (softmax, z-scores, centred cosine similarities of states captured by
a forward hook of our own) and a verbatim copy of the selection rule as it was before calibrated
weights existed.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import tiny
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logo_engine import InvalidRequestError, RoutingConfig, RoutingConfigError
from logo_engine.calibration import zscores
from logo_engine.routing import select
from logo_engine.types import Calibration

NAMES = ["a", "b", "c", "d", "e"]


def _paper_select(scores: torch.Tensor, names: list[str], top_k: int, min_score=None):
    """The selection rule of the paper's code as the engine implemented it before issue 10."""
    out = []
    top = torch.topk(scores, k=top_k, dim=-1).indices
    for row in range(scores.shape[0]):
        kept = [
            (names[int(s)], float(scores[row, s]))
            for s in top[row]
            if min_score is None or float(scores[row, s]) >= min_score
        ]
        total = sum(s for _, s in kept)
        if not kept:
            weights = []
        elif not math.isfinite(total) or total <= 0:
            weights = [1.0 / len(kept)] * len(kept)
        else:
            weights = [s / total for _, s in kept]
        order = sorted(range(len(kept)), key=lambda i: -weights[i])
        out.append(([kept[i][0] for i in order], [weights[i] for i in order]))
    return out


def _select(scores, config, ranking=None):
    return select(
        scores,
        NAMES,
        config,
        probe_layer=0,
        probe_module="m",
        probe_ms=0.0,
        ranking=ranking,
        calibrated=ranking is not None,
    )


scores_st = st.lists(
    st.lists(st.floats(0.0, 50.0, allow_nan=False), min_size=5, max_size=5), min_size=1, max_size=4
).map(lambda rows: torch.tensor(rows, dtype=torch.float32))


@settings(max_examples=60, deadline=None)
@given(scores=scores_st, top_k=st.integers(1, 5), signal=st.sampled_from(["norm", "entropy"]))
def test_raw_mode_is_bit_for_bit_the_papers_rule(scores, top_k, signal):
    config = RoutingConfig(top_k=top_k, signal=signal, calibrated=False)
    for sel, (adapters, weights) in zip(
        _select(scores, config), _paper_select(scores, NAMES, top_k), strict=True
    ):
        assert sel.adapters == adapters and sel.weights == weights  # exact, not approximate
        assert sel.rank_scores == {} and not sel.abstained and sel.reason is None


@settings(max_examples=60, deadline=None)
@given(
    scores=scores_st,
    top_k=st.integers(1, 5),
    weighting=st.sampled_from(["auto", "proportional", "softmax", "uniform"]),
    temperature=st.floats(0.05, 5.0),
)
def test_calibrated_weights_follow_the_ranking(scores, top_k, weighting, temperature):
    calibration = Calibration(
        signal="norm",
        probe_layer=0,
        probe_module="m",
        probe_input="module",
        probe_tokens="last",
        mean={n: 10.0 * i for i, n in enumerate(NAMES)},  # very different per-adapter scales
        std={n: 1.0 + i for i, n in enumerate(NAMES)},
        n_prompts=10,
    )
    z = zscores(calibration, NAMES, scores)
    config = RoutingConfig(top_k=top_k, weighting=weighting, temperature=temperature)
    for row, sel in enumerate(_select(scores, config, ranking=z)):
        zrow = {n: float(z[row, i]) for i, n in enumerate(NAMES)}
        assert zrow[sel.adapters[0]] == max(zrow.values())  # ties may be broken either way
        assert sel.weights == sorted(sel.weights, reverse=True)
        for hi, lo in itertools.permutations(NAMES, 2):  # a higher z never gets less weight
            if zrow[hi] > zrow[lo]:
                assert sel.mixture.get(hi, 0.0) >= sel.mixture.get(lo, 0.0) - 1e-12
        assert sum(sel.weights) == pytest.approx(1.0)
        assert sel.rank_scores == pytest.approx({n: float(z[row, i]) for i, n in enumerate(NAMES)})


def test_softmax_weights_equal_a_hand_computation():
    scores = torch.tensor([[3.0, 1.0, 2.5, 0.0, -1.0]])
    ranking = scores.clone()  # pretend these are z-scores
    config = RoutingConfig(top_k=3, temperature=0.5)  # weighting "auto" -> softmax when calibrated
    sel = _select(scores, config, ranking=ranking)[0]
    e = [math.exp(3.0 / 0.5), math.exp(2.5 / 0.5), math.exp(1.0 / 0.5)]
    assert sel.adapters == ["a", "c", "b"]
    assert sel.weights == pytest.approx([v / sum(e) for v in e])


def test_proportional_weights_on_z_scores_count_negative_evidence_as_zero():
    ranking = torch.tensor([[2.0, -0.5, 1.0, -3.0, -4.0]])
    config = RoutingConfig(top_k=3, weighting="proportional")
    sel = _select(ranking.abs(), config, ranking=ranking)[0]
    assert sel.adapters[:2] == ["a", "c"] and sel.weights[:2] == pytest.approx([2 / 3, 1 / 3])
    assert sel.mixture["b"] == 0.0  # kept (top-3) but without weight


def test_abstention_runs_the_base_model_and_says_why():
    ranking = torch.tensor([[0.4, 0.1, 0.2, 0.0, -1.0], [2.5, 0.1, 1.9, 0.0, -1.0]])
    config = RoutingConfig(top_k=3, abstain_below=1.5)
    none, some = _select(ranking.abs(), config, ranking=ranking)
    assert none.adapters == [] and none.weights == [] and none.abstained
    assert (
        "base model" in none.reason
        and "abstain_below=1.5" in none.reason
        and "a 0.40" in none.reason
    )
    assert some.adapters == ["a", "c"] and not some.abstained
    assert some.reason.startswith("kept 2 of top 3") and "b 0.10" in some.reason


def test_routing_config_round_trips_and_refuses_unknown_fields():
    config = RoutingConfig(top_k=1, weighting="softmax", temperature=0.3, abstain_below=2.0)
    assert RoutingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(RoutingConfigError, match="unknown routing fields"):
        RoutingConfig.from_dict({"top_k": 1, "topk": 2})
    with pytest.raises(RoutingConfigError, match="abstain_below"):
        RoutingConfig(abstain_below=float("nan"))
    with pytest.raises(RoutingConfigError, match="callable"):
        RoutingConfig(signal=lambda o: o.norm(dim=-1)).to_dict()


# ------------------------------------------------------------------------ on the tiny engine
def _probed_states(engine, prompts):
    """The probe module's input at the last prompt token, captured by our own forward hook."""
    _layer, module = engine.probe_target()
    linear = dict(engine.model.named_modules())[module]
    seen = []
    handle = linear.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, -1].clone()))
    try:
        for p in prompts:
            ids = engine.tokenizer(
                engine.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                ),
                add_special_tokens=False,
                return_tensors="pt",
            )["input_ids"]
            with torch.no_grad():  # no call context: the engine's hooks leave the model alone
                engine.model(input_ids=ids)
    finally:
        handle.remove()
    return torch.cat(seen)  # (P, d)


EXAMPLES = {
    "a": ["abc def gh", "hab ged", "fed cab ha"],
    "b": ["12 34 56", "9 87 65 4", "0 11 22"],
    "c": ["+ - * /", "= < > +", "/ * - ="],
}


def test_prototypes_are_centroids_and_score_by_centred_cosine(engine):
    engine.fit_prototypes(EXAMPLES)
    (protos,) = engine.prototypes
    centroids = {n: _probed_states(engine, ps).double().mean(0) for n, ps in EXAMPLES.items()}
    for n in EXAMPLES:
        assert torch.tensor(protos.centroids[n], dtype=torch.float64) == pytest.approx(
            centroids[n], rel=1e-5, abs=1e-6
        )
        assert protos.n_examples[n] == 3
    prompt = "ab 12 +"
    h = _probed_states(engine, [prompt])[0].double()
    mu = torch.stack([centroids[n] for n in engine.adapter_names])
    c = mu.mean(0)
    want = torch.nn.functional.cosine_similarity((h - c)[None], mu - c, dim=-1)
    routing = RoutingConfig(top_k=2, signal="prototype", calibrated=False)
    sel = engine.route(prompt, routing=routing)
    got = torch.tensor([sel.scores[n] for n in engine.adapter_names], dtype=torch.float64)
    assert got == pytest.approx(want, abs=1e-4)
    assert sel.adapters[0] == engine.adapter_names[int(want.argmax())]
    assert sel.signal == "prototype" and sum(sel.weights) == pytest.approx(1.0)


def test_prototype_signal_needs_prototypes_and_examples_for_every_adapter(engine):
    with pytest.raises(RoutingConfigError, match="prototypes"):
        engine.route("hello", routing=RoutingConfig(top_k=1, signal="prototype"))
    with pytest.raises(InvalidRequestError, match="missing"):
        engine.fit_prototypes({"a": ["x y"], "b": ["1 2"]})
    with pytest.raises(InvalidRequestError, match="no example prompts"):
        engine.fit_prototypes({"a": ["x y"], "b": ["1 2"], "c": []})


def test_data_free_calibration_uses_random_token_prompts(engine):
    routing = RoutingConfig(top_k=1, calibrated=False)
    cal = engine.calibrate(None, n_random=12, seed=3)
    assert cal.source == "random_tokens" and cal.n_prompts == 12
    prompts = engine._random_prompts(12, 3)
    assert len(set(prompts)) == 12
    raw = torch.tensor(
        [
            [s.scores[n] for n in engine.adapter_names]
            for s in engine.route_batch(prompts, routing=routing)
        ],
        dtype=torch.float64,
    )
    for i, n in enumerate(engine.adapter_names):
        assert cal.mean[n] == pytest.approx(float(raw[:, i].mean()), rel=1e-5)
        assert cal.std[n] == pytest.approx(float(raw[:, i].std()), rel=1e-4)
    sel = engine.route("hello")  # calibrated=None: ranked by these statistics now
    assert sel.calibrated and sel.rank_scores


def test_abstained_request_generates_exactly_the_base_models_text(engine):
    engine.calibrate(["hello abc", "12 34 + 5", "yes no ok", "+-*/ =", "abc 12 +", "zz top"])
    routing = RoutingConfig(top_k=2, abstain_below=1e9)  # nothing can reach it
    out = engine.generate("hello there", routing=routing, max_new_tokens=6)
    base = engine.generate("hello there", adapters={}, max_new_tokens=6)
    assert out.selection.abstained and out.selection.adapters == []
    assert out.text == base.text


def test_calibration_file_round_trips_prototypes_and_reads_the_first_format(engine, tmp_path):
    engine.calibrate(EXAMPLES, routing=RoutingConfig(top_k=1))
    path = tmp_path / "calibration.json"
    engine.save_calibrations(path)
    data = json.loads(path.read_text())
    assert set(data) == {"calibrations", "prototypes"}
    other = type(engine)(
        tiny.tiny_model(), engine.tokenizer, adapters=engine.library.adapters[0].path.parent
    )
    other.load_calibrations(path)
    assert other.prototypes == engine.prototypes and other.calibrations == engine.calibrations
    path.write_text(json.dumps(data["calibrations"]))  # the first format: a bare list
    third = type(engine)(
        tiny.tiny_model(), engine.tokenizer, adapters=engine.library.adapters[0].path.parent
    )
    third.load_calibrations(path)
    assert third.calibrations == engine.calibrations and third.prototypes == []


def test_a_library_folder_ships_its_routing_defaults(engine, adapter_dir, tmp_path, tokenizer):
    from logo_engine import LoGoEngine

    base = tmp_path / "base"
    tiny.tiny_model().save_pretrained(base)
    tokenizer.save_pretrained(base)
    lib = tmp_path / "lib"
    shutil.copytree(adapter_dir, lib)
    (lib / "routing.json").write_text(json.dumps({"top_k": 1, "weighting": "uniform"}))
    loaded = LoGoEngine.from_pretrained(base, adapters=lib)
    assert loaded.routing == RoutingConfig(top_k=1, weighting="uniform")
    mine = RoutingConfig(top_k=2)
    assert LoGoEngine.from_pretrained(base, adapters=lib, routing=mine).routing == mine
    (lib / "routing.json").write_text(json.dumps({"top_k": 1, "bogus": True}))
    with pytest.raises(RoutingConfigError, match="bogus"):
        LoGoEngine.from_pretrained(base, adapters=lib)


def test_cli_flags_override_the_library_defaults(adapter_dir, tmp_path, tokenizer, capsys):
    from logo_engine import Selection
    from logo_engine.cli import main

    base = tmp_path / "base"
    tiny.tiny_model().save_pretrained(base)
    tokenizer.save_pretrained(base)
    lib = tmp_path / "lib"
    shutil.copytree(adapter_dir, lib)
    (lib / "routing.json").write_text(json.dumps({"top_k": 2, "weighting": "uniform"}))
    common = ["--base-model", str(base), "--adapters", str(lib), "--json"]
    assert main(["route", "hello", *common]) == 0
    sel = Selection.model_validate_json(capsys.readouterr().out)
    assert len(sel.adapters) == 2 and sel.weights == [0.5, 0.5]  # the library's routing.json
    assert main(["route", "hello", *common, "--top-k", "1"]) == 0
    sel = Selection.model_validate_json(capsys.readouterr().out)
    assert len(sel.adapters) == 1 and sel.weights == [1.0]
    assert main(["route", "hello", *common, "--abstain-below", "1e9"]) == 0
    sel = Selection.model_validate_json(capsys.readouterr().out)
    assert sel.abstained and sel.adapters == [] and "abstain_below" in sel.reason
    assert main(["route", "hello", *common[:-1], "--abstain-below", "1e9"]) == 0
    table = capsys.readouterr().out
    assert "(base model: no adapter)" in table and "no adapter stood out" in table


def test_cli_device_and_dtype(adapter_dir, tmp_path, tokenizer, capsys):
    import torch

    from logo_engine import Selection
    from logo_engine.cli import _engine, _parser, main

    base = tmp_path / "base"
    tiny.tiny_model().save_pretrained(base)
    tokenizer.save_pretrained(base)
    common = ["--base-model", str(base), "--adapters", str(adapter_dir)]
    args = _parser().parse_args(["route", "hello", *common, "--dtype", "bfloat16"])
    engine = _engine(args)
    try:
        assert next(engine.model.parameters()).dtype == torch.bfloat16
        stack = next(iter(engine.library.stacks.values()))
        assert stack.buckets[0].lora_a.dtype == torch.bfloat16  # the adapters follow the model
    finally:
        engine.close()
    assert main(["route", "hello", *common, "--dtype", "bfloat16", "--json"]) == 0
    assert Selection.model_validate_json(capsys.readouterr().out).adapters
    if not torch.cuda.is_available():
        assert main(["route", "hello", *common, "--device", "cuda"]) != 0
        assert "sees no CUDA device" in capsys.readouterr().err
    assert main(["route", "hello", *common, "--device", "nowhere"]) != 0
    assert "is not a torch device" in capsys.readouterr().err

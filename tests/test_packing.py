"""Packed prompt passes: the rows' new tokens end to end in one sequence, attention per row.

Oracle: each row run alone through the model (one unpadded row, a KV cache of its own, its own
mixture), whose last logits and keys and values the packed pass must reproduce; and, for the
switch of attention implementation, the model's own ``sdpa`` and ``eager`` runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import tiny
import torch
from transformers import DynamicCache

from logo_engine import LoGoEngine
from logo_engine.errors import GenerationError
from logo_engine.mixture import ForwardContext, MixturePlan
from logo_engine.packing import ATTENTION, PackedPass, packs
from logo_engine.prefix_cache import PrefixEntry, PrefixHit, row_kv
from logo_engine.selection import pinned_selection

PROMPTS = [p for t in tiny.TASKS.values() for p in t.prompts(2, seed=3)]
MIXTURES = [{"a": 1.0}, {"b": 0.6, "c": 0.4}, {}, {"a": 0.3, "c": 0.7}]


@pytest.fixture()
def engine(tokenizer, adapter_dir):
    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()


def rows_of(engine: LoGoEngine, n: int) -> list[list[int]]:
    rows = [engine._prepare(p, None, None).input_ids for p in PROMPTS[:n]]
    assert len({len(r) for r in rows}) > 1  # rows of different lengths: padding would matter
    return rows


def plans(engine: LoGoEngine, n: int) -> tuple[MixturePlan | None, list[MixturePlan | None]]:
    selections = [pinned_selection(m, engine.adapter_names) for m in MIXTURES[:n]]
    batch = MixturePlan.build(engine._library, selections)
    return batch, [MixturePlan.build(engine._library, [s]) for s in selections]


def solo(
    engine: LoGoEngine, ids: Sequence[int], plan: MixturePlan | None
) -> tuple[torch.Tensor, DynamicCache]:
    """One unpadded row through the model alone: its last logits (V,) and its KV cache."""
    cache = DynamicCache(config=engine.model.config)
    n = len(ids)
    logits = engine._decoder.forward(
        ForwardContext(plan=plan),
        torch.tensor([list(ids)]),
        torch.ones(1, n, dtype=torch.long),
        torch.arange(n)[None],
        cache,
    )
    return logits[0], cache


def packed_pass(
    engine: LoGoEngine,
    rows: list[list[int]],
    hits: list[PrefixHit | None],
    plan: MixturePlan | None,
) -> tuple[PackedPass, torch.Tensor]:
    packed = PackedPass(rows, hits, device=torch.device("cpu"))
    logits = engine._decoder.forward(
        ForwardContext(plan=plan, packed=packed),
        packed.input_ids,
        packed.mask,
        packed.positions,
        None,
        keep=packed.last,
    )
    return packed, logits


def assert_kv_equal(
    got: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]], cache: DynamicCache
) -> None:
    keys, values = got
    assert len(keys) == len(cache.layers)
    for k, v, layer in zip(keys, values, cache.layers, strict=True):
        torch.testing.assert_close(k, layer.keys[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, layer.values[0], rtol=1e-5, atol=1e-5)


def assert_rows_as_alone(
    engine: LoGoEngine,
    rows: list[list[int]],
    row_plans: list[MixturePlan | None],
    packed: PackedPass,
    logits: torch.Tensor,
) -> None:
    """Each row's logits, and its keys and values in both layouts, are those of the row alone."""
    mask, cache = packed.padded(engine.model.config)  # the decode loop's left-padded batch
    for i, (ids, row_plan) in enumerate(zip(rows, row_plans, strict=True)):
        want_logits, want_cache = solo(engine, ids, row_plan)
        torch.testing.assert_close(logits[i], want_logits, rtol=1e-5, atol=1e-5)
        assert_kv_equal(row_kv(cache, mask, i, len(ids), len(cache.layers)), want_cache)
        assert_kv_equal(packed.row_kv(i, packed.depth), want_cache)


def test_the_engine_switches_a_sdpa_model_to_packed_passes(engine):
    assert engine.model.config._attn_implementation == ATTENTION
    assert packs(engine.model)


def test_a_packed_pass_gives_each_row_its_solo_logits_and_kv(engine):
    rows = rows_of(engine, 4)
    plan, row_plans = plans(engine, 4)
    packed, logits = packed_pass(engine, rows, [None] * 4, plan)
    assert packed.input_ids.shape == (1, sum(len(r) for r in rows))  # no padding at all
    assert_rows_as_alone(engine, rows, row_plans, packed, logits)
    # positions of the rows' last tokens, for the first decoding step
    assert packed.last_positions[:, 0].tolist() == [len(r) - 1 for r in rows]


def test_rows_continue_their_own_cached_prefixes(engine):
    rows = rows_of(engine, 3)
    plan, row_plans = plans(engine, 3)
    hits: list[PrefixHit | None] = []
    for ids, row_plan, cut in zip(rows, row_plans, [len(rows[0]) // 2, None, 3], strict=True):
        if cut is None:
            hits.append(None)  # a row with nothing cached among rows that have prefixes
            continue
        _, prefix_cache = solo(engine, ids[:cut], row_plan)
        depth = len(prefix_cache.layers)
        keys, values = row_kv(prefix_cache, torch.ones(1, cut, dtype=torch.long), 0, cut, depth)
        entry = PrefixEntry(torch.tensor(ids[:cut]), keys, values)
        hits.append(PrefixHit(entry, cut))
    packed, logits = packed_pass(engine, rows, hits, plan)
    assert packed.reused == [len(rows[0]) // 2, 0, 3]
    assert packed.input_ids.shape[1] == sum(len(r) for r in rows) - sum(packed.reused)
    assert_rows_as_alone(engine, rows, row_plans, packed, logits)


def test_a_prefix_without_the_blocks_a_pass_needs_is_refused(engine):
    rows = rows_of(engine, 2)
    _, prefix_cache = solo(engine, rows[0][:4], None)
    keys, values = row_kv(prefix_cache, torch.ones(1, 4, dtype=torch.long), 0, 4, depth=1)
    hit = PrefixHit(PrefixEntry(torch.tensor(rows[0][:4]), keys, values), 4)
    with pytest.raises(GenerationError, match="holds 1 blocks; block 1 has no keys"):
        packed_pass(engine, rows, [hit, None], None)


def test_a_packed_probe_stores_what_a_solo_probe_stores(engine):
    prompts = PROMPTS[:4]
    engine.clear_prefix_caches()
    batch = engine.route_batch(prompts)  # one packed probe pass, stored per row
    layer, module = engine._probe_target(engine.routing, engine._library)
    assert engine.routing.probe_input == "module"
    space = ("module", layer, module)  # the probe cache's key, see Prober.capture
    stored = []
    for p in prompts:
        ids = engine._prepare(p, None, None).input_ids
        hit = engine._probe_cache.lookup(
            space, ids, epoch=engine._probe_cache.epoch, limit=len(ids)
        )
        assert hit is not None and hit.length == len(ids)
        stored.append(hit.entry)
    for p, entry, selection in zip(prompts, stored, batch, strict=True):
        engine.clear_prefix_caches()
        alone = engine.route(p)  # a single row: an unpacked pass
        assert alone.adapters == selection.adapters
        assert alone.weights == pytest.approx(selection.weights, rel=1e-4)
        ids = engine._prepare(p, None, None).input_ids
        hit = engine._probe_cache.lookup(
            space, ids, epoch=engine._probe_cache.epoch, limit=len(ids)
        )
        assert hit is not None and hit.entry.depth == entry.depth > 0
        torch.testing.assert_close(entry.captured, hit.entry.captured, rtol=1e-5, atol=1e-5)
        for k, want in zip(entry.keys, hit.entry.keys, strict=True):
            torch.testing.assert_close(k, want, rtol=1e-5, atol=1e-5)


def test_the_switch_is_shared_and_undone_when_the_last_engine_closes(tokenizer, adapter_dir):
    model = tiny.tiny_model()
    assert model.config._attn_implementation == "sdpa"
    first = LoGoEngine(model, tokenizer, adapters=adapter_dir)
    second = LoGoEngine(model, tokenizer, adapters=adapter_dir)
    first.close()
    assert model.config._attn_implementation == ATTENTION  # the second engine still packs
    second.close()
    assert model.config._attn_implementation == "sdpa"


def test_outside_a_packed_pass_the_switched_model_computes_as_sdpa(tokenizer):
    model = tiny.tiny_model()
    ids = torch.tensor([tokenizer(PROMPTS[0]).input_ids])
    with torch.inference_mode():
        want = model(ids).logits
        engine = LoGoEngine(model, tokenizer)
        got = model(ids).logits
        engine.close()
    assert torch.equal(got, want)


def test_a_model_on_eager_attention_keeps_padded_batches(tokenizer, adapter_dir):
    model = tiny.tiny_model()
    model.set_attn_implementation("eager")
    engine = LoGoEngine(model, tokenizer, adapters=adapter_dir)
    try:
        assert model.config._attn_implementation == "eager" and not packs(model)
        batch = engine.generate_batch(PROMPTS[:3], max_new_tokens=6)
        for prompt, got in zip(PROMPTS[:3], batch, strict=True):
            engine.clear_prefix_caches()
            assert got.text == engine.generate(prompt, max_new_tokens=6).text
    finally:
        engine.close()

"""Shared mixture plans are built once per library and mixture, and reused while it lives."""

from __future__ import annotations

import gc
import threading

import tiny
import torch

from logo_engine import LoGoEngine
from logo_engine.mixture import _PLANS, ForwardContext, MixturePlan, _PlanCache, forward_context
from logo_engine.routing import pinned_selection


def _plan(engine, mixture, rows=1):
    return MixturePlan.build(
        engine.library, [pinned_selection(mixture, engine.adapter_names)] * rows
    )


def _fresh(engine, mixture):
    """The plan built from the library's stacks, bypassing every cache."""
    return MixturePlan._build(engine.library, [tuple(mixture.items())])


def _assert_same_factors(got: MixturePlan, expected: MixturePlan) -> None:
    assert got.modules.keys() == expected.modules.keys()
    for name, mix in expected.modules.items():
        torch.testing.assert_close(got.modules[name].a_cat, mix.a_cat, rtol=0, atol=0)
        torch.testing.assert_close(got.modules[name].b_cat, mix.b_cat, rtol=0, atol=0)


def test_a_repeated_mixture_reuses_its_plan_whatever_the_batch_size(engine):
    first = _plan(engine, {"a": 0.7, "b": 0.3})
    assert _plan(engine, {"a": 0.7, "b": 0.3}) is first
    assert _plan(engine, {"a": 0.7, "b": 0.3}, rows=4) is first  # shared: one 2-D plan
    _assert_same_factors(first, _fresh(engine, {"a": 0.7, "b": 0.3}))
    other = _plan(engine, {"a": 0.6, "b": 0.4})  # other weights: another plan
    assert other is not first
    _assert_same_factors(other, _fresh(engine, {"a": 0.6, "b": 0.4}))


def test_per_row_batches_are_built_each_time(engine):
    rows = [
        pinned_selection({"a": 0.7, "b": 0.3}, engine.adapter_names),
        pinned_selection({"c": 1.0}, engine.adapter_names),
    ]
    one, two = MixturePlan.build(engine.library, rows), MixturePlan.build(engine.library, rows)
    assert one is not two
    assert next(iter(one.modules.values())).a_cat.ndim == 3  # (B, k·r, in): one mixture per row
    _assert_same_factors(one, two)


def test_a_grown_library_builds_its_own_plans_and_the_old_ones_go_with_their_library(
    tokenizer, adapter_dir, tmp_path
):
    engine = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=[adapter_dir / "b"])
    try:
        old_library = engine.library
        old = _plan(engine, {"b": 1.0})
        # a grown library is a new object, with new stacks for every module "a" adapts
        tiny.random_adapter(tiny.tiny_model(), tmp_path / "a", r=4, alpha=8, seed=5)
        engine.load_adapters([tmp_path / "a"])
        new = _plan(engine, {"b": 1.0})
        assert new is not old
        _assert_same_factors(new, _fresh(engine, {"b": 1.0}))
        assert old_library in _PLANS._plans
        del old_library, old
        gc.collect()
        assert all(lib.names != ["b"] for lib in _PLANS._plans)  # the old library is gone
        assert engine.library in _PLANS._plans
    finally:
        engine.close()


def test_the_cache_keeps_to_its_byte_budget_least_recently_used_first(engine):
    size = _fresh(engine, {"a": 1.0}).nbytes
    assert _fresh(engine, {"a": 0.5}).nbytes == size  # same adapter, same shapes
    cache = _PlanCache(budget_bytes=2 * size)
    library = engine.library

    def get(weight):
        return cache.get(library, (("a", weight),), lambda: _fresh(engine, {"a": weight}))

    p1, p2 = get(0.1), get(0.2)
    assert get(0.1) is p1  # p1 is now the most recently used
    get(0.3)  # over budget: p2, the least recently used, goes
    assert list(cache._plans[library]) == [(("a", 0.1),), (("a", 0.3),)]
    assert sum(p.nbytes for p in cache._plans[library].values()) <= 2 * size
    assert get(0.2) is not p2  # built again
    huge = _PlanCache(budget_bytes=size - 1)
    plan = huge.get(library, (("a", 1.0),), lambda: _fresh(engine, {"a": 1.0}))
    assert plan.nbytes == size and not huge._plans.get(library)  # never kept


def test_a_cached_plan_gives_the_fresh_plans_logits_in_concurrent_calls(engine):
    """Threads sharing one cached plan get the logits of a plan built for each alone."""
    mixture = {"a": 0.2, "b": 0.5, "c": 0.3}
    ids = torch.randint(3, 400, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), forward_context(ForwardContext(plan=_fresh(engine, mixture))):
        expected = engine.model(input_ids=ids).logits
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            plan = _plan(engine, mixture)
            with torch.inference_mode(), forward_context(ForwardContext(plan=plan)):
                results.append(engine.model(input_ids=ids).logits)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 4
    for got in results:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

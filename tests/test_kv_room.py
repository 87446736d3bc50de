"""Decoding batches keep their KV in buffers with room (``RoomyLayer``) instead of growing it by
concatenation at every step.

Oracles: transformers' own ``DynamicLayer`` fed the same updates (keys and values must be equal
bit for bit), and generation with the plain layers (texts, finish reasons and usage equal).
"""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from logo_engine import LoGoEngine, decoding
from logo_engine.decoding import RoomyLayer, make_room
from logo_engine.prefix_cache import row_kv

PROMPTS = [p for t in tiny.TASKS.values() for p in t.prompts(2, seed=41)]


def _states(rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, n, 4, generator=g), torch.randn(rows, 2, n, 4, generator=g)


def _same(a: DynamicLayer, b: DynamicLayer) -> None:
    assert a.keys is not None and b.keys is not None
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_roomy_layer_holds_what_a_dynamic_layer_holds_through_every_operation():
    plain, roomy = DynamicLayer(), RoomyLayer(room=3)
    steps = [("update", 4, 5), ("update", 4, 1), ("update", 4, 1), ("update", 4, 1)]
    steps += [("update", 4, 1), ("select", [0, 2, 3]), ("update", 3, 1), ("update", 3, 2)]
    steps += [("crop", -2), ("update", 3, 1), ("select", [1]), ("update", 1, 6)]
    for seed, step in enumerate(steps):
        if step[0] == "update":
            k, v = _states(step[1], step[2], seed)
            out_plain, out_roomy = plain.update(k, v), roomy.update(k, v)
            assert torch.equal(out_plain[0], out_roomy[0])
            assert torch.equal(out_plain[1], out_roomy[1])
        elif step[0] == "select":
            index = torch.tensor(step[1])
            plain.batch_select_indices(index)
            roomy.batch_select_indices(index)
        else:
            plain.crop(step[1])
            roomy.crop(step[1])
        _same(plain, roomy)
    assert plain.get_seq_length() == roomy.get_seq_length() == 17


def test_steps_within_the_room_write_in_place_and_a_full_buffer_grows_by_the_room():
    layer = RoomyLayer(room=3)
    layer.update(*_states(2, 5, 0))
    buffer = layer.keys.data_ptr()
    for seed in range(1, 4):  # three steps fit the room
        layer.update(*_states(2, 1, seed))
        assert layer.keys.data_ptr() == buffer
    layer.update(*_states(2, 1, 9))  # the fourth does not
    assert layer.keys.data_ptr() != buffer
    assert layer.keys.shape == (2, 2, 9, 4)
    assert layer._k is not None and layer._k.shape[2] == 9 + 3


def test_a_layer_set_to_another_tensor_is_copied_into_a_new_buffer():
    plain, roomy = DynamicLayer(), RoomyLayer(room=4)
    for layer in (plain, roomy):
        layer.update(*_states(2, 3, 0))
    replaced = _states(2, 3, 1)
    for layer in (plain, roomy):  # as concat_kv or transformers' own code might do
        layer.keys, layer.values = replaced
    for layer in (plain, roomy):
        layer.update(*_states(2, 1, 2))
    _same(plain, roomy)


def test_make_room_converts_plain_layers_once_and_keeps_their_contents():
    cache = DynamicCache(ddp_cache_data=[_states(2, 3, i) for i in range(3)])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    make_room(cache, 5)
    assert all(type(layer) is RoomyLayer for layer in cache.layers)
    converted = list(cache.layers)
    make_room(cache, 7)
    assert list(cache.layers) == converted  # already roomy: kept, with the larger room
    assert all(layer.room == 7 for layer in cache.layers)
    for layer, (k, v) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_a_single_row_taken_for_the_prefix_cache_does_not_keep_the_room_alive():
    cache = DynamicCache(ddp_cache_data=[_states(1, 4, 0)])
    make_room(cache, 100)
    cache.layers[0].update(*_states(1, 1, 1))
    keys, values = row_kv(cache, torch.ones(1, 5, dtype=torch.long), 0, 5, depth=1)
    for t in (*keys, *values):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.fixture(scope="module")
def engine(tokenizer, adapter_dir):
    eng = LoGoEngine(tiny.tiny_model(), tokenizer, adapters=adapter_dir, name="tiny-llama")
    yield eng
    eng.close()


def _generate(engine: LoGoEngine) -> list[tuple[str, str, dict[str, int]]]:
    engine.clear_prefix_caches()
    mixtures = [None, {"a": 1.0}, {}, {"b": 0.5, "c": 0.5}, None, None]
    stops = [None, ["a"], None, ["0"], None, None]
    out = []
    for batch in (
        engine.generate_batch(PROMPTS, max_new_tokens=20, adapters=mixtures),
        [
            engine.generate(p, max_new_tokens=20, stop=s)
            for p, s in zip(PROMPTS, stops, strict=True)
        ],
        engine.generate_batch(PROMPTS, max_new_tokens=20, adapters=mixtures),  # prefix hits
    ):
        out += [(g.text, g.finish_reason, g.usage.model_dump()) for g in batch]
    return out


def test_generation_with_room_equals_generation_with_plain_layers(engine, monkeypatch):
    roomy_steps = []
    make = decoding.make_room

    def spy(cache, room):
        make(cache, room)
        roomy_steps.append(all(type(layer) is RoomyLayer for layer in cache.layers))

    monkeypatch.setattr(decoding, "ROOM", 3)  # regrow several times within 20 tokens
    monkeypatch.setattr(decoding, "make_room", spy)
    with_room = _generate(engine)
    monkeypatch.setattr(decoding, "make_room", lambda cache, room: None)
    plain = _generate(engine)
    assert roomy_steps and all(roomy_steps)
    assert with_room == plain

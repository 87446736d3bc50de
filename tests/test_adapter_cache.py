"""CatAdapterCache: keys, LRU bounds (count and bytes), atomic writes, reuse across runs."""

from __future__ import annotations

import pytest
import torch

import logo_engine.export as export
from logo_engine.adapter_cache import CatAdapterCache
from logo_engine.errors import ExportError, InvalidRequestError

M1 = {"a": 0.5, "b": 0.5}
M2 = {"a": 0.25, "c": 0.75}
M3 = {"b": 0.1, "c": 0.9}


def test_hits_misses_and_originals(engine, tmp_path, adapter_dir):
    cache = CatAdapterCache(tmp_path / "c")
    e1 = cache.acquire(engine.library, M1)
    e2 = cache.acquire(engine.library, {"b": 0.5, "a": 0.5})
    assert e1 == e2 and e1.rank == 4 + 8 and e1.path.parent == tmp_path / "c"
    assert e1.name == f"logo-cat-{e1.key[:16]}" and not e1.original
    single = cache.acquire(engine.library, {"b": 1.0})
    assert single.original and single.path == adapter_dir / "b" and single.rank == 8
    assert single.name.startswith("b@")
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.originals, stats.entries) == (1, 1, 1, 1)
    assert stats.nbytes == e1.nbytes == sum(p.stat().st_size for p in e1.path.iterdir())
    with pytest.raises(InvalidRequestError):
        cache.acquire(engine.library, {})


def test_lru_by_count_and_bytes(engine, tmp_path):
    evicted = []
    cache = CatAdapterCache(tmp_path / "c", max_entries=2, on_evict=evicted.append)
    for m in (M1, M2, M1, M3):  # M1 used again: M2 is the least recently used
        with cache.use(engine.library, m):
            pass
    assert [e.mixture for e in evicted] == [M2]
    assert [e.mixture for e in cache.entries] == [M1, M3]
    assert not evicted[0].path.exists()
    one = cache.entries[-1].nbytes
    small = CatAdapterCache(tmp_path / "s", max_bytes=one + 1, on_evict=evicted.append)
    with small.use(engine.library, M1):
        pass
    with small.use(engine.library, M3):
        pass
    assert len(small.entries) == 1 and small.stats.nbytes <= one + 1


def test_an_entry_in_use_is_kept_over_the_bound(engine, tmp_path):
    cache = CatAdapterCache(tmp_path / "c", max_entries=1)
    held = cache.acquire(engine.library, M1)
    with cache.use(engine.library, M2):
        assert len(cache.entries) == 2  # both in use: over the bound for now
    assert [e.mixture for e in cache.entries] == [M1]
    cache.release(held)
    with cache.use(engine.library, M3):
        pass
    assert [e.mixture for e in cache.entries] == [M3] and not held.path.exists()


def test_a_failed_write_leaves_nothing(engine, tmp_path, monkeypatch):
    cache = CatAdapterCache(tmp_path / "c")

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken)
    with pytest.raises(ExportError, match="disk full"):
        cache.acquire(engine.library, M1)
    assert list((tmp_path / "c").iterdir()) == [] and cache.entries == []


def test_folders_are_reused_by_a_later_run(engine, tmp_path):
    first = CatAdapterCache(tmp_path / "c")
    entry = first.acquire(engine.library, M1)
    first.acquire(engine.library, M2)
    mtime = (entry.path / "adapter_model.safetensors").stat().st_mtime_ns
    later = CatAdapterCache(tmp_path / "c", max_entries=5)
    assert len(later.entries) == 2 and later.stats.nbytes > 0  # adopted, counted in the bounds
    again = later.acquire(engine.library, M1)
    assert again.path == entry.path and again.rank == entry.rank and again.mixture == M1
    assert (again.path / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert later.stats.misses == 0 and later.stats.hits == 1
    bounded = CatAdapterCache(tmp_path / "c", max_entries=1)  # adoption respects the bounds
    assert len(bounded.entries) == 1 and len(list((tmp_path / "c").iterdir())) == 1


def test_default_directory_is_temporary(engine):
    cache = CatAdapterCache()
    path = cache.acquire(engine.library, M1).path
    assert path.is_file() is False and path.is_dir()
    cache.close()
    assert not cache.directory.exists()


def test_bad_bounds(tmp_path):
    with pytest.raises(InvalidRequestError, match="max_entries"):
        CatAdapterCache(tmp_path, max_entries=0)
    with pytest.raises(InvalidRequestError, match="max_bytes"):
        CatAdapterCache(tmp_path, max_bytes=True)


def test_exported_dtype_follows_the_library(tokenizer, adapter_dir, tmp_path):
    import tiny

    from logo_engine import LoGoEngine

    eng = LoGoEngine(tiny.tiny_model().to(torch.bfloat16), tokenizer, adapters=adapter_dir)
    entry = CatAdapterCache(tmp_path).acquire(eng.library, M1)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(entry.path / "adapter_model.safetensors").values()} == {
        torch.bfloat16
    }
    eng.close()

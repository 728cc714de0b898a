"""The decoded-file cache is sized in bytes against free memory: an unchanged 10-row stack re-runs
without reading a file when the budget holds it, and the cache never holds more than its budget."""

from __future__ import annotations

import pytest

from test_stack import stack
from tiny_models import lycoris_file, tiny_sd15


@pytest.fixture
def ten_files(pack, tmp_path):
    from comfyui_runtime import use_loras_folder
    from lycoris_pack.nodes import cache

    use_loras_folder(tmp_path)
    cache.clear()
    model = tiny_sd15()
    for i in range(10):
        lycoris_file(model.model.diffusion_model, tmp_path / f"f{i}.safetensors", "lora_unet_", "lora", seed=i)
    yield model, [{"lora_name": f"f{i}.safetensors", "strength_model": 0.1} for i in range(10)]
    cache.clear()


def _reads(monkeypatch, cache):
    calls = []
    real = cache.load_adapter_file
    monkeypatch.setattr(cache, "load_adapter_file", lambda p: calls.append(p) or real(p))
    return calls


def test_a_rerun_of_a_ten_row_stack_reads_no_file(pack, ten_files, monkeypatch):
    from lycoris_pack.nodes import cache

    model, rows = ten_files
    reads = _reads(monkeypatch, cache)
    stack(pack, model, rows)
    assert len(reads) == 10 and len(cache._ENTRIES) == 10  # 8 entries was the old fixed limit
    stack(pack, model, rows)
    assert len(reads) == 10, "a re-run read files again"


def test_the_cache_never_holds_more_than_its_budget(pack, ten_files, monkeypatch):
    from lycoris_pack.nodes import cache

    model, rows = ten_files
    stack(pack, model, rows[:1])
    size = cache.held_bytes()
    assert size > 0
    # a budget of 4.5 files (free memory plus what the cache holds, times the share): older entries go first
    monkeypatch.setattr(cache, "free_memory", lambda: int(4.5 * size / cache.BUDGET_SHARE) - cache.held_bytes())
    reads = _reads(monkeypatch, cache)
    for n in range(1, 11):
        stack(pack, model, rows[:n])
        assert cache.held_bytes() <= cache.budget()
    assert [p.rsplit("/", 1)[-1] for p in cache._ENTRIES] == [f"f{i}.safetensors" for i in range(6, 10)]
    assert len(reads) > 10  # the small budget made the re-runs read evicted files again
    monkeypatch.setattr(cache, "free_memory", lambda: 0)  # no room at all: decoded for the run, not kept
    cache.clear()
    stack(pack, model, rows[:1])
    assert cache.held_bytes() == 0

"""Batched greedy generation equals one-at-a-time generation; the cache resumes."""

from __future__ import annotations

import dataclasses

import pytest

from sdft.config import GenerationConfig
from sdft.data import load_dataset_records
from sdft.generation import generate
from sdft.io import ResultCache
from sdft.models import load_model
from sdft.prompts import get_template, render_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seed_model():
    return load_model("embedded")


@pytest.fixture(scope="module")
def prompts(seed_model, data_path):
    records = load_dataset_records("gsm8k_test", data_dir=data_path, limit=3)
    records += load_dataset_records("advbench", data_dir=data_path, limit=3, require_response=False)
    template = get_template("gsm8k_infer")
    return [render_prompt(template, r, seed_model.tokenizer, "chat") for r in records]


def test_batched_equals_batch_one(seed_model, prompts):
    one = GenerationConfig(mode="greedy", max_new_tokens=40, batch_size=1)
    many = GenerationConfig(mode="greedy", max_new_tokens=40, batch_size=6)
    single = generate(seed_model, prompts, one, "test")
    batched = generate(seed_model, prompts, many, "test")
    assert batched == single
    assert len(set(batched)) > 1


def test_cache_skips_finished(seed_model, prompts, tmp_path):
    settings = GenerationConfig(mode="greedy", max_new_tokens=16, batch_size=4)
    with ResultCache(tmp_path / "cache.jsonl") as cache:
        first = generate(seed_model, prompts[:2], settings, "test", cache=cache)
    lines_before = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert len(lines_before) == 2

    with ResultCache(tmp_path / "cache.jsonl") as cache:
        second = generate(seed_model, prompts, settings, "test", cache=cache)
    lines_after = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert second[:2] == first
    assert len(lines_after) == len(prompts)


def test_cache_ignores_torn_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "value": "done"}\n{"key": "b", "val')
    with ResultCache(path) as cache:
        assert "a" in cache
        assert "b" not in cache
        cache.put("b", "again")
    with ResultCache(path) as cache:
        assert cache.get("b") == "again"


def test_sampling_is_seeded(seed_model, prompts):
    settings = GenerationConfig(mode="sample", max_new_tokens=16, batch_size=3, seed=7)
    first = generate(seed_model, prompts[:3], settings, "test")
    second = generate(seed_model, prompts[:3], settings, "test")
    assert first == second


def test_streamed_sampling_does_not_depend_on_batching(seed_model, prompts):
    """Each prompt draws from its own generator, so batch size and neighbours do not matter."""
    settings = GenerationConfig(mode="sample", max_new_tokens=16, batch_size=3, seed=7)
    together = generate(seed_model, prompts[:3], settings, "test")
    alone = [generate(seed_model, [p], dataclasses.replace(settings, batch_size=1), "test")[0] for p in prompts[:3]]
    assert together == alone
    reseeded = generate(seed_model, prompts[:3], dataclasses.replace(settings, seed=8), "test")
    assert reseeded != together

"""Shipped configs: every recipe passes a dry run; the paper settings are the paper's."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdft.config import load_config
from sdft.data import DataError
from sdft.pipeline import dry_run
from sdft.recipes import find_recipes

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
RECIPES = [name for name, _ in find_recipes(str(CONFIG_DIR))]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_dry_run(name, data_path):
    config = load_config(CONFIG_DIR / name, [f"data.data_dir={data_path}"])
    if "openhermes" in name:
        with pytest.raises(DataError, match="data file not found"):
            dry_run(config)
        return
    summary = dry_run(config)
    assert "config valid" in summary
    for stage in ("rewrite prompt", "training prompt", "evaluation prompt"):
        assert stage in summary


def test_recipes_have_summaries():
    summaries = dict(find_recipes(str(CONFIG_DIR)))
    assert "paper/gsm8k.yaml" in summaries
    assert "_base.yaml" not in " ".join(summaries)
    assert all(summaries.values())


def test_paper_config_matches_paper():
    config = load_config(CONFIG_DIR / "paper" / "gsm8k.yaml")
    assert config.model.name == "meta-llama/Llama-2-7b-chat-hf"
    assert (config.train.lora_r, config.train.lora_alpha, config.train.lora_dropout) == (8, 16, 0.1)
    assert config.train.lora_targets == ["q_proj", "v_proj"]
    assert (config.train.batch_size, config.train.gradient_accumulation) == (2, 4)
    assert config.train.learning_rate == 1e-4
    assert config.train.epochs == 5
    generation = config.distill.generation
    assert (generation.mode, generation.temperature, generation.top_p, generation.top_k) == ("sample", 0.95, 0.7, 50)
    assert generation.max_new_tokens == 512


def test_strong_preset_overrides_base():
    config = load_config(CONFIG_DIR / "paper" / "gsm8k-strong.yaml")
    assert config.train.lora_r == 64
    assert "down_proj" in config.train.lora_targets
    assert config.train.epochs == 5


def test_base_cycle_rejected(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    from sdft.config import ConfigError

    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")

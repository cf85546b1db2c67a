"""Shipped configs load, validate and render their prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdft.config import load_config
from sdft.data import load_dataset_records
from sdft.prompts import get_template, render_raw_prompt

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_dry_run(path, data_path):
    config = load_config(path)
    records = load_dataset_records(config.data.train, data_dir=data_path, limit=2)
    assert len(records) == 2
    for name in (config.distill.template, config.train.template, config.eval.template):
        prompt = render_raw_prompt(get_template(name), records[0], bos_token="<s>")
        assert records[0].instruction in prompt


def test_paper_config_matches_paper():
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper" / "gsm8k.yaml")
    assert config.model.name == "meta-llama/Llama-2-7b-chat-hf"
    assert (config.train.lora_r, config.train.lora_alpha, config.train.lora_dropout) == (8, 16, 0.1)
    assert config.train.lora_targets == ["q_proj", "v_proj"]
    assert (config.train.batch_size, config.train.gradient_accumulation) == (2, 4)
    assert config.train.epochs == 5
    assert config.distill.generation.mode == "sample"
    assert (config.distill.generation.temperature, config.distill.generation.top_p) == (0.95, 0.7)

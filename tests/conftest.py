"""Shared fixtures: the real data directory and a small-run command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The real datasets: $SDFT_DATA_DIR, else the shared/data folder beside the repository."""
    chosen = os.environ.get("SDFT_DATA_DIR")
    path = Path(chosen) if chosen else REPO.parent / "shared" / "data"
    if not (path / "gsm8k").is_dir():
        raise RuntimeError(f"data directory {path} not found; set SDFT_DATA_DIR to the datasets folder")
    return path


@pytest.fixture(scope="session")
def data_path() -> Path:
    return data_dir()


# Settings that make a full pipeline run take seconds: a few records, short outputs, one epoch.
TINY = [
    "--set", "data.limit=4",
    "--set", "eval.limit=3",
    "--set", "eval.max_new_tokens={}",
    "--set", "eval.generation.max_new_tokens=24",
    "--set", "distill.generation.max_new_tokens=48",
    "--set", "train.epochs=1",
    "--set", "train.save_steps=1",
]


def run_sdft(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``sdft`` command line in a subprocess."""
    full_env = {**os.environ, "SDFT_DATA_DIR": str(data_dir()), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sdft.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture
def tiny_llama():
    """Build a randomly initialized two-layer Llama with grouped-query attention, in eval mode."""

    def build(attention: str = "sdpa"):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, attn_implementation=attention,
        )
        return LlamaForCausalLM(config).eval()

    return build

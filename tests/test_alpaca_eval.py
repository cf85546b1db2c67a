"""AlpacaEval win-rate arithmetic, the outputs file for the alpaca_eval tool, a run without judge.

pytest tests/test_alpaca_eval.py
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from sdft.benchmarks import alpaca_eval
from sdft.benchmarks.alpaca_eval import (
    OUTPUTS_FILE,
    dataset_labels,
    original_instruction,
    win_rate,
    write_outputs_file,
)
from sdft.config import Config
from sdft.data import load_dataset_records
from sdft.io import ResultCache

ANNOTATIONS = "alpaca_eval/llama-2-7b-chat-hf_alpaca_eval_gpt4_annotations.json"
TOOL_FIELDS = {"instruction", "output", "generator", "dataset"}


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_win_rate_real_judged_run(data_path):
    """GPT-4 judged Llama-2-7b-chat against text-davinci-003: 574 wins, 230 losses, 1 tie.

    AlpacaEval's leaderboard file (tatsu-lab/alpaca_eval,
    src/alpaca_eval/leaderboards/data_AlpacaEval/alpaca_eval_gpt4_leaderboard.csv) lists this run as
    win_rate 71.36645963, standard_error 1.593038655, 574 / 230 / 1 of 805: the one
    preference 0 is a tie and adds half a win.
    """
    preferences = [row["preference"] for row in read_json(data_path / ANNOTATIONS)]
    result = win_rate(preferences)
    assert (result["n_wins"], result["n_losses"], result["n_ties"]) == (574, 230, 1)
    assert result["n_total"] == 805
    assert result["n_dropped"] == 0
    assert result["n_wins"] / result["n_total"] == 574 / 805
    assert result["win_rate"] == pytest.approx(574.5 / 805, abs=1e-12)
    assert result["win_rate"] * 100 == pytest.approx(71.36645963, abs=1e-8)
    assert result["standard_error"] * 100 == pytest.approx(1.593038655, abs=1e-8)


@pytest.mark.parametrize(
    "preferences, expected, wins, losses, ties",
    [
        ([2, 2, 2], 1.0, 3, 0, 0),
        ([1, 1], 0.0, 0, 2, 0),
        ([2, 1], 0.5, 1, 1, 0),
        ([1.5, 1.5], 0.5, 0, 0, 2),
        ([2, 1.5, 0, 1], 0.5, 1, 1, 2),  # 0 is AlpacaEval's older encoding of a tie
        ([2, 2, 2, 1], 0.75, 3, 1, 0),
        ([1.75, 1.25], 0.5, 1, 1, 0),  # weighted preferences
    ],
)
def test_win_rate_hand_checked(preferences, expected, wins, losses, ties):
    result = win_rate(preferences)
    assert result["win_rate"] == pytest.approx(expected)
    assert (result["n_wins"], result["n_losses"], result["n_ties"]) == (wins, losses, ties)
    assert 0.0 <= result["win_rate"] <= 1.0


def test_standard_error_by_hand():
    # Scores 1 and 0 have mean 0.5 and sample variance 0.5, so the standard error is sqrt(0.5 / 2).
    assert win_rate([2, 1])["standard_error"] == pytest.approx(0.5)
    assert win_rate([2, 2, 2])["standard_error"] == 0.0
    assert math.isnan(win_rate([2])["standard_error"])


def test_win_rate_drops_unjudged():
    result = win_rate([None, 2, float("nan"), 1])
    assert result["win_rate"] == 0.5
    assert result["n_total"] == 2
    assert result["n_dropped"] == 2


@pytest.mark.parametrize("preferences", [[], [None], [float("nan")]])
def test_win_rate_empty_raises(preferences):
    with pytest.raises(ValueError, match="no judged preferences"):
        win_rate(preferences)


@pytest.mark.parametrize("bad", [3, 0.5, -1, "b"])
def test_win_rate_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="preference"):
        win_rate([2, bad])


def test_outputs_file_tool_format(data_path, tmp_path):
    """Check fields and instruction texts against the tool's own model_outputs.json files."""
    records = load_dataset_records("alpaca_eval", data_dir=data_path, require_response=False)
    instructions = [original_instruction(r) for r in records]
    completions = [f"answer {r.id}" for r in records]
    path = tmp_path / OUTPUTS_FILE
    write_outputs_file(path, instructions, completions, "seed", dataset_labels(records, data_path))

    written = read_json(path)
    published = read_json(data_path / "alpaca_eval/llama-2-7b-chat-hf_model_outputs.json")
    assert isinstance(written, list) and len(written) == 805
    assert all(set(entry) == TOOL_FIELDS == set(row) for entry, row in zip(written, published))
    assert [e["instruction"] for e in written] == [row["instruction"] for row in published]
    assert [e["dataset"] for e in written] == [row["dataset"] for row in published]
    assert written[3] == {
        "instruction": published[3]["instruction"],
        "output": "answer 3",
        "generator": "seed",
        "dataset": published[3]["dataset"],
    }


def test_outputs_file_without_labels(tmp_path):
    path = tmp_path / OUTPUTS_FILE
    write_outputs_file(path, ["Say hi."], ["hi"], "sdft", {})
    assert read_json(path) == [{"instruction": "Say hi.", "output": "hi", "generator": "sdft"}]


def fake_generation(context, name, records, template):
    """Return fixed prompts and outputs in place of the model's generation."""
    return [f"PROMPT {r.id}" for r in records], [f"output {r.id}" for r in records]


def test_run_without_judge_nan(data_path, tmp_path, monkeypatch):
    monkeypatch.setattr(alpaca_eval, "generate_for", fake_generation)
    config = Config()
    config.data.data_dir = str(data_path)
    context = SimpleNamespace(
        config=config,
        output_dir=tmp_path,
        cache=ResultCache(tmp_path / "cache.jsonl"),
        label="seed",
    )
    summary = alpaca_eval.run(context, limit=4)

    assert math.isnan(summary["win_rate"])
    assert summary["examples"] == 4
    assert summary["note"] == (
        "no judge configured; score alpaca_eval_outputs.json with the alpaca_eval tool"
    )
    rows = [json.loads(line) for line in (tmp_path / "alpaca_eval.jsonl").read_text().splitlines()]
    assert [row["score"] for row in rows] == [None] * 4
    outputs = read_json(tmp_path / OUTPUTS_FILE)
    assert [entry["output"] for entry in outputs] == [
        "output 0",
        "output 1",
        "output 2",
        "output 3",
    ]
    assert all(entry["generator"] == "seed" for entry in outputs)

"""The LIMA recipe on a few real multi-turn records, with the embedded model (slow)."""

from __future__ import annotations

import json

import pytest

from conftest import run_sdft

pytestmark = pytest.mark.slow


def test_lima_recipe_multi_turn(tmp_path, data_path):
    records = json.loads((data_path / "lima" / "sdft_lima_train.json").read_text())
    multi_turn = [record for record in records if record.get("history")][:2]
    train_file = tmp_path / "lima_multi.json"
    train_file.write_text(json.dumps(multi_turn))
    output = tmp_path / "run"

    result = run_sdft(
        "run", "configs/paper/lima.yaml",
        "--model", "embedded",
        "--output-dir", str(output),
        "--set", f"data.train={train_file}",
        "--set", "model.dtype=auto",
        "--set", "prompt.rendering=chat",
        "--set", "distill.generation={mode: greedy, max_new_tokens: 24}",
        "--set", "eval.generation={mode: greedy, max_new_tokens: 16}",
        "--set", "eval.benchmarks=[advbench]",
        "--set", "eval.limit=2",
        "--set", "train.epochs=1",
        "--set", "train.max_length=512",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    log = [json.loads(line) for line in (output / "distill" / "selection.jsonl").read_text().splitlines()]
    turns = sum(len(record["history"]) + 1 for record in multi_turn)
    assert len(log) == turns
    assert sorted({entry["turn"] for entry in log}) == list(range(max(len(r["history"]) for r in multi_turn) + 1))

    distilled = json.loads((output / "distill" / "distilled.json").read_text())
    assert [len(r["history"]) for r in distilled] == [len(r["history"]) for r in multi_turn]

    report = (output / "report.md").read_text()
    assert "| assistant turn | rewrites | accepted | rate |" in report
    assert f"of {turns} assistant turns" in report

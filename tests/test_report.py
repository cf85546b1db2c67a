"""Report tables: deltas from the seed and the cross-run comparison."""

from __future__ import annotations

import json

from sdft.report import compare_runs, comparison_table, deltas


def write_results(folder, gsm8k_vanilla, gsm8k_sdft):
    folder.mkdir()
    results = {
        "scores": {
            "seed": {"gsm8k": 0.30, "advbench": 0.90},
            "vanilla": {"gsm8k": gsm8k_vanilla, "advbench": 0.80},
            "sdft": {"gsm8k": gsm8k_sdft, "advbench": 0.85},
        },
        "drift": {
            "vanilla": {"mean_similarity": 0.75, "bleu4": 0.2, "rouge_l": 0.4},
            "sdft": {"mean_similarity": 0.85, "bleu4": 0.3, "rouge_l": 0.5},
        },
    }
    (folder / "results.json").write_text(json.dumps(results))
    return results


def test_deltas_subtract_seed():
    changes = deltas({"seed": {"gsm8k": 0.25}, "sdft": {"gsm8k": 0.5}})
    assert changes == {"sdft": {"gsm8k": 0.25}}


def test_table_rows_and_delta_cells(tmp_path):
    results = write_results(tmp_path / "paper", 0.32, 0.34)
    results["deltas"] = deltas(results["scores"])
    table = comparison_table(results)
    assert "| seed | 30.0 | 90.0 | 1.000 | 1.000 | 1.000 |" in table
    assert "| vanilla | 32.0 (+2.0) | 80.0 (-10.0) | 0.750 | 0.200 | 0.400 |" in table
    assert "| sdft | 34.0 (+4.0) | 85.0 (-5.0) | 0.850 | 0.300 | 0.500 |" in table


def test_compare_two_presets(tmp_path):
    write_results(tmp_path / "paper", 0.32, 0.34)
    write_results(tmp_path / "strong", 0.40, 0.37)
    table = compare_runs([tmp_path / "paper", tmp_path / "strong"])
    rows = [line for line in table.splitlines() if line.startswith("| ") and "model" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| seed", "| vanilla (paper)", "| sdft (paper)", "| vanilla (strong)", "| sdft (strong)"
    ]
    assert "| vanilla (strong) | 40.0 (+10.0) |" in table

"""End to end with the embedded model on a few real GSM8K records (slow: about a minute)."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, run_sdft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "quick"
    result = run_sdft("run", "configs/quickstart.yaml", "--output-dir", str(folder), *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_report_has_three_rows(run_dir):
    report = (run_dir / "report.md").read_text()
    for model in ("| seed |", "| vanilla |", "| sdft |"):
        assert model in report
    assert "Rewrites accepted:" in report
    assert "![similarity](plots/similarity.png)" in report


def test_results_record_provenance(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["scores"]) == {"seed", "vanilla", "sdft"}
    provenance = results["provenance"]
    assert provenance["config"]["data"]["limit"] == 4
    assert "transformers" in provenance["versions"]
    assert "gsm8k_distill" in provenance["templates"]
    assert results["drift"]["sdft"]["histogram"]["counts"]
    assert sum(results["drift"]["vanilla"]["histogram"]["counts"]) == 3


def test_distilled_keeps_order_and_fields(run_dir, data_path):
    distilled = json.loads((run_dir / "distill" / "distilled.json").read_text())
    originals = json.loads((data_path / "gsm8k" / "sdft_gsm8k_train.json").read_text())[:4]
    assert len(distilled) == 4
    assert [r["question"] for r in distilled] == [r["question"] for r in originals]
    log = [json.loads(line) for line in (run_dir / "distill" / "selection.jsonl").read_text().splitlines()]
    for row, entry, original in zip(distilled, log, originals):
        if entry["accepted"]:
            assert row["answer"] == entry["rewrite"]
        else:
            assert row["answer"] == original["answer"]
            assert entry["reason"] in {"answer_mismatch", "banned_phrase", "empty"}


def test_lora_weights_changed(run_dir):
    from safetensors.torch import load_file

    for model in ("vanilla", "sdft"):
        weights = load_file(run_dir / model / "adapter" / "adapter_model.safetensors")
        lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
        assert lora_b, f"{model}: no LoRA B matrices saved"
        assert any(tensor.abs().sum() > 0 for tensor in lora_b), f"{model}: LoRA B still zero"


def test_plots_and_curves_written(run_dir):
    assert (run_dir / "plots" / "similarity.png").stat().st_size > 0
    assert (run_dir / "plots" / "loss.png").stat().st_size > 0
    losses = json.loads((run_dir / "sdft" / "losses.json").read_text())
    assert losses and all(entry["loss"] > 0 for entry in losses)
    assert not (run_dir / "sdft" / "checkpoints").exists()


def test_rerun_resumes_without_work(run_dir):
    before = (run_dir / "results.json").read_text()
    result = run_sdft("run", "configs/quickstart.yaml", "--output-dir", str(run_dir), *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming the run" in result.stderr
    assert "stage 2/5" not in result.stderr
    assert "stage 3/5" not in result.stderr
    assert "reusing the saved result" in result.stderr
    assert "new tokens" not in result.stderr
    after = json.loads((run_dir / "results.json").read_text())
    assert after["scores"] == json.loads(before)["scores"]


def test_changed_eval_setting_reruns_eval_only(run_dir):
    adapter = run_dir / "sdft" / "adapter" / "adapter_model.safetensors"
    trained_at = adapter.stat().st_mtime_ns
    result = run_sdft("run", "configs/quickstart.yaml", "--output-dir", str(run_dir), *TINY, "--set", "eval.limit=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "changed settings: eval.limit" in result.stderr
    assert "stage 3/5" not in result.stderr
    assert adapter.stat().st_mtime_ns == trained_at
    scores = json.loads((run_dir / "eval" / "sdft" / "scores.json").read_text())
    assert scores["benchmarks"]["gsm8k"]["examples"] == 2


def test_different_training_data_rejected(run_dir):
    result = run_sdft("run", "configs/quickstart.yaml", "--output-dir", str(run_dir), *TINY, "--set", "data.limit=3")
    assert result.returncode == 2
    assert "holds a different run" in result.stderr
    assert "training data" in result.stderr

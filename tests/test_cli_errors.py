"""Bad input ends with one error line, exit status 2, and no output folder."""

from __future__ import annotations

import json

import pytest

from conftest import run_sdft

QUICKSTART = "configs/quickstart.yaml"


def assert_clean_failure(result, output_dir, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]
    assert not output_dir.exists()


def test_malformed_data_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "1+1?", "answer": "2"},\n {"question": "2+2?" "answer": "4"}]')
    output = tmp_path / "run"
    result = run_sdft("run", QUICKSTART, "--output-dir", str(output), "--set", f"data.train={bad}")
    assert_clean_failure(result, output, str(bad), "invalid JSON at line 2")


def test_missing_field_names_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "a", "answer": "1"}) + "\n" + json.dumps({"question": "b"}) + "\n")
    output = tmp_path / "run"
    result = run_sdft("distill", QUICKSTART, "--output-dir", str(output), "--dataset", str(bad))
    assert_clean_failure(result, output, "row 2", "'answer'", "missing")


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    output = tmp_path / "run"
    result = run_sdft("run", QUICKSTART, "--output-dir", str(output), "--set", f"data.train={empty}")
    assert_clean_failure(result, output, str(empty), "empty")


def test_missing_model(tmp_path):
    output = tmp_path / "run"
    missing = tmp_path / "no-such-model"
    result = run_sdft("run", QUICKSTART, "--output-dir", str(output), "--model", str(missing))
    assert_clean_failure(result, output, str(missing), "not found")


def test_missing_gguf_file(tmp_path):
    output = tmp_path / "run"
    result = run_sdft("eval", "--output-dir", str(output), "--model", str(tmp_path / "x.gguf"))
    assert_clean_failure(result, output, "x.gguf", "GGUF file not found")


def test_unknown_config_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  epoch: 3\n")
    output = tmp_path / "run"
    result = run_sdft("run", str(config), "--output-dir", str(output))
    assert_clean_failure(result, output, "train.epoch", "did you mean 'epochs'")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.batch_size=two", "expected an integer"),
        ("distill.check=maths", "did you mean 'math'"),
        ("eval.benchmarks=[gsm9k]", "did you mean 'gsm8k'"),
        ("prompt.rendering=html", "valid values"),
    ],
)
def test_invalid_override(tmp_path, override, fragment):
    output = tmp_path / "run"
    result = run_sdft("run", QUICKSTART, "--output-dir", str(output), "--set", override)
    assert_clean_failure(result, output, fragment)


def test_missing_adapter(tmp_path):
    output = tmp_path / "eval"
    result = run_sdft("eval", "--output-dir", str(output), "--adapter", str(tmp_path / "none"))
    assert_clean_failure(result, output, "adapter not found")


def test_unknown_template_in_prompt(tmp_path):
    result = run_sdft("prompt", QUICKSTART, "--template", "nope")
    assert_clean_failure(result, tmp_path / "unused", "--template: unknown template 'nope'", "gsm8k_distill")


def test_missing_model_in_dry_run(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_sdft("run", QUICKSTART, "--dry-run", "--model", str(missing), "--set", "prompt.rendering=raw")
    assert_clean_failure(result, tmp_path / "unused", str(missing), "model folder not found")


def test_unknown_flag_shows_the_command_usage():
    result = run_sdft("run", QUICKSTART, "--epochs", "3")
    assert result.returncode == 2
    assert "sdft run: error: unrecognized arguments: --epochs 3" in result.stderr

"""Malformed input: every case of tests/corpus/cases.yaml ends with its exact message.

The cases run in-process through the same loaders the commands use; a few run
through the real command line to check what the user sees there: exit status 2,
one ``error:`` line, no traceback and no output folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import run_sdft
from sdft.config import ConfigError, load_config
from sdft.data import DataError, load_dataset_records

CORPUS = Path(__file__).resolve().parent / "corpus"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))["cases"]
BY_NAME = {case["name"]: case for case in CASES}


def expected_message(case: dict) -> str:
    return case["error"].replace("{corpus}", str(CORPUS))


def load_case(case: dict):
    path = str(CORPUS / case["file"])
    if case["loader"] == "data":
        return load_dataset_records(path, format=case.get("format", "auto"), columns=case.get("columns"))
    if case["loader"] == "config":
        return load_config(path, case.get("overrides", []))
    raise AssertionError(f"{case['name']}: unknown loader {case['loader']!r}")


def test_corpus_is_complete():
    assert len(CASES) >= 30
    assert len(BY_NAME) == len(CASES), "case names must be unique"
    for case in CASES:
        for name in [case["file"], *case.get("also", [])]:
            assert (CORPUS / name).is_file() or "no_such" in name, f"{case['name']}: {name} missing"
        assert ("error" in case) != ("records" in case), case["name"]


@pytest.mark.parametrize("case", [c for c in CASES if "error" in c], ids=lambda c: c["name"])
def test_error_message(case):
    error = DataError if case["loader"] == "data" else ConfigError
    with pytest.raises(error) as caught:
        load_case(case)
    message = str(caught.value)
    assert message == expected_message(case)
    assert "\n" not in message, "the CLI prints one error line"


@pytest.mark.parametrize("case", [c for c in CASES if "records" in c], ids=lambda c: c["name"])
def test_loads(case):
    records = load_case(case)
    got = [{key: getattr(record, key) for key in expected} for record, expected in zip(records, case["records"])]
    assert got == case["records"]
    assert len(records) == len(case["records"])


# Through the real command line: the error line is the same message.
CLI_CASES = [
    ("number_list_output", ["distill", "--dataset", "{file}"]),
    ("messages_two_user_turns", ["train", "configs/quickstart.yaml", "--dataset", "{file}"]),
    ("config_base_cycle", ["run", "{file}"]),
    ("set_invalid_yaml_value", ["eval", "{file}", "--set", "train.lora_targets=[q_proj"]),
]


@pytest.mark.parametrize("name, arguments", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_error_line(tmp_path, name, arguments):
    case = BY_NAME[name]
    output = tmp_path / "out"
    command = [a.replace("{file}", str(CORPUS / case["file"])) for a in arguments]
    result = run_sdft(*command, "--output-dir", str(output))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [f"error: {expected_message(case)}"]
    assert not output.exists()

"""Kill and resume: a killed ``sdft distill`` or ``sdft eval`` loses at most the batch
in flight, and the rerun writes exactly what an uninterrupted run writes.

The real command line on real GSM8K records with the embedded model, greedy,
short outputs and two prompts per batch, so every run has several batches.
Processes are killed with SIGKILL while they generate, once their cache file
(``OUTPUT/cache/generations.jsonl``) contains a given number of lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, data_dir

pytestmark = pytest.mark.slow

DISTILL = [
    "distill", "configs/quickstart.yaml",
    "--set", "data.limit=8",
    "--set", "distill.generation.max_new_tokens=32",
    "--set", "distill.generation.batch_size=2",
    "--set", "distill.nll_gap=false",
]
EVAL = [
    "eval", "configs/quickstart.yaml",
    "--benchmarks", "gsm8k",
    "--limit", "6",
    "--set", "eval.max_new_tokens.gsm8k=32",
    "--set", "eval.generation.batch_size=2",
]
DISTILL_FILES = ("distilled.json", "selection.jsonl", "distill_stats.json")
EVAL_FILES = ("gsm8k.jsonl", "scores.json", "results/gsm8k.json")
TIMEOUT = 300


def environment() -> dict:
    # One thread: the runs are compared byte for byte and the test machine is small.
    return {
        **os.environ, "SDFT_DATA_DIR": str(data_dir()), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }


def start(arguments: list[str], folder: Path) -> subprocess.Popen:
    """Start the real command line; its output goes to files beside the folder."""
    log = folder.parent / f"{folder.name}.{time.monotonic_ns()}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "sdft.cli", *arguments, "--output-dir", str(folder)],
            stdout=handle, stderr=subprocess.STDOUT, env=environment(), cwd=REPO,
        )
    process.log = log
    return process


def finish(process: subprocess.Popen) -> str:
    process.wait(timeout=TIMEOUT)
    output = process.log.read_text()
    assert process.returncode == 0, output[-3000:]
    return output


def cache_of(folder: Path) -> Path:
    return folder / "cache" / "generations.jsonl"


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_after(process: subprocess.Popen, cache: Path, lines: int) -> None:
    """SIGKILL the process as soon as its cache file contains ``lines`` lines."""
    deadline = time.monotonic() + TIMEOUT
    while line_count(cache) < lines:
        if process.poll() is not None:
            raise AssertionError(f"finished before {lines} cached lines:\n{process.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {lines} cached lines after {TIMEOUT} s")
        time.sleep(0.05)
    process.kill()
    process.wait()


def cache_keys(folder: Path) -> list[str]:
    return [json.loads(line)["key"] for line in cache_of(folder).read_text(encoding="utf-8").splitlines()]


def assert_same_outputs(folder: Path, reference: Path, names) -> None:
    for name in names:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    keys = cache_keys(folder)
    assert len(keys) == len(set(keys)), "the cache contains a completion twice"
    assert set(keys) == set(cache_keys(reference))
    assert not list(folder.rglob("*.tmp")), "a temporary file was left behind"


@pytest.fixture(scope="module")
def distill_reference(tmp_path_factory):
    """An uninterrupted distillation, with a second one started into the same folder meanwhile."""
    folder = tmp_path_factory.mktemp("concurrent") / "distill"
    first = start(DISTILL, folder)
    deadline = time.monotonic() + TIMEOUT
    while not (folder / ".sdft.lock").exists():
        assert first.poll() is None, first.log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the first run never locked its folder"
        time.sleep(0.05)
    second = subprocess.run(
        [sys.executable, "-m", "sdft.cli", *DISTILL, "--output-dir", str(folder)],
        capture_output=True, text=True, env=environment(), cwd=REPO, timeout=TIMEOUT,
    )
    first_still_running = first.poll() is None
    finish(first)
    return folder, second, first_still_running


def test_second_process_into_the_same_folder_fails_cleanly(distill_reference):
    folder, second, first_still_running = distill_reference
    assert first_still_running, "the first run ended before the second reached the lock; nothing was tested"
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {folder}: another sdft process is writing to this folder; wait for it to finish "
        "or choose another output folder"
    ]
    # The first run's files are complete and valid.
    assert len(json.loads((folder / "distilled.json").read_text())) == 8
    assert json.loads((folder / "distill_stats.json").read_text())["records"] == 8
    assert len([json.loads(line) for line in (folder / "selection.jsonl").read_text().splitlines()]) == 8
    assert len(set(cache_keys(folder))) == 8


def test_distill_killed_twice_then_resumed(distill_reference, tmp_path):
    reference = distill_reference[0]
    folder = tmp_path / "distill"

    kill_after(start(DISTILL, folder), cache_of(folder), 2)
    assert not (folder / "distilled.json").exists()
    assert line_count(cache_of(folder)) >= 2
    # A kill in the middle of a write leaves a torn last line: cut the last one short.
    data = cache_of(folder).read_bytes()
    cache_of(folder).write_bytes(data[: len(data) - 20])

    second = start(DISTILL, folder)
    kill_after(second, cache_of(folder), 6)
    assert "ignored 1 incomplete cache line(s)" in second.log.read_text()
    assert not (folder / "distilled.json").exists()

    output = finish(start(DISTILL, folder))
    assert "completions found in the cache" in output
    assert_same_outputs(folder, reference, DISTILL_FILES)


@pytest.fixture(scope="module")
def eval_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "reference"
    finish(start(EVAL, folder))
    return folder


def test_eval_killed_then_resumed(eval_reference, tmp_path):
    folder = tmp_path / "eval"
    kill_after(start(EVAL, folder), cache_of(folder), 2)
    assert not (folder / "scores.json").exists()
    output = finish(start(EVAL, folder))
    assert "completions found in the cache" in output
    assert_same_outputs(folder, eval_reference, EVAL_FILES)
    rows = [json.loads(line) for line in (folder / "gsm8k.jsonl").read_text().splitlines()]
    assert len(rows) == 6


TRAIN = [
    "train", "configs/quickstart.yaml",
    "--set", "data.limit=8",
    "--set", "train.epochs=1",
    "--set", "train.batch_size=1",
    "--set", "train.gradient_accumulation=1",
    "--set", "train.save_steps=1",
]


def test_training_killed_then_resumed_from_checkpoint(tmp_path):
    folder = tmp_path / "train"
    process = start(TRAIN, folder)
    deadline = time.monotonic() + TIMEOUT
    while not (folder / "checkpoints" / "checkpoint-2").is_dir():
        assert process.poll() is None, "training ended before its second checkpoint"
        assert time.monotonic() < deadline, "no second checkpoint in time"
        time.sleep(0.2)
    process.kill()
    process.wait()
    assert not (folder / "adapter").exists()

    log = finish(start(TRAIN, folder))
    assert "resuming training from" in log
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    steps = [entry["step"] for entry in json.loads((folder / "losses.json").read_text())]
    assert steps == list(range(1, 9))

"""Guards that keep finished work safe: torn cache lines, output folders that hold
other output, adapters that do not fit the base model, over-long training records.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # adapters here name Hub models; never look them up

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_sdft
from sdft.config import ConfigError, load_config
from sdft.data import DataError, Record
from sdft.io import ResultCache, atomic_write_json
from sdft.pipeline import claim_folder, claim_output, output_identity

CORPUS = Path(__file__).resolve().parent / "corpus"
RECORDS = [Record("0", "What is 2 + 2?", "2 + 2 = 4.\nThe answer is 4."), Record("1", "What is 3 × 4?", "12")]
OTHER = [Record("0", "What is 5 + 5?", "10")]


# --- the generation cache after a kill ---


def fill_cache(path: Path) -> bytes:
    with ResultCache(path) as cache:
        cache.put("a", "first")
        cache.put("b", "3 × 4 = 12")
        cache.put("c", "third")
    return path.read_bytes()


def cache_lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("cut", ["mid_line", "mid_character", "before_newline"])
def test_torn_cache_line_is_dropped_and_regenerated(tmp_path, caplog, cut):
    path = tmp_path / "generations.jsonl"
    data = fill_cache(path)
    last = data.rstrip(b"\n").rfind(b"\n") + 1  # start of the third line
    if cut == "mid_line":
        torn = data[: last + 10]
    elif cut == "mid_character":
        torn = data[: data.index("×".encode()) + 1]  # the first of the two bytes of ×
    else:
        torn = data[:-1]
    path.write_bytes(torn)

    with ResultCache(path) as cache:
        survivors = dict(cache.entries)
        for key, value in (("a", "first"), ("b", "3 × 4 = 12"), ("c", "third")):
            if key not in cache:
                cache.put(key, value)  # what generate() does for a missing completion
    expected = {"mid_line": {"a", "b"}, "mid_character": {"a"}, "before_newline": {"a", "b", "c"}}[cut]
    assert set(survivors) == expected
    if cut != "before_newline":
        assert "incomplete cache line" in caplog.text

    lines = cache_lines(path)
    assert sorted(entry["key"] for entry in lines) == ["a", "b", "c"]  # no duplicates, nothing glued
    assert ResultCache(path).entries == {"a": "first", "b": "3 × 4 = 12", "c": "third"}


# --- output folders that contain other output ---


def identity(kind, records=RECORDS, **overrides):
    config = load_config(None, [f"{key}={value}" for key, value in overrides.items()])
    return output_identity(kind, config, records)


def test_distill_into_folder_of_other_data(tmp_path):
    folder = tmp_path / "distill"
    claim_output(folder, identity("distill"))
    (folder / "distilled.json").write_text("[]\n")
    claim_output(folder, identity("distill"))  # the same run resumes
    with pytest.raises(ConfigError) as caught:
        claim_output(folder, identity("distill", OTHER))
    assert str(caught.value) == (
        f"{folder}: folder contains 'sdft distill' output made with a different dataset; "
        "choose another --output-dir, or delete the folder to start over"
    )


def test_distill_settings_may_change(tmp_path):
    folder = tmp_path / "distill"
    claim_output(folder, identity("distill"))
    (folder / "distilled.json").write_text("[]\n")
    claim_output(folder, identity("distill", **{"distill.generation.max_new_tokens": 64}))


def test_folder_without_output_is_taken_over(tmp_path):
    folder = tmp_path / "distill"
    claim_output(folder, identity("distill"))  # claimed, then killed before any output
    claim_output(folder, identity("distill", OTHER))
    assert json.loads((folder / "sdft_output.json").read_text())["dataset"] == identity("distill", OTHER)["dataset"]


def test_folder_of_another_command(tmp_path):
    folder = tmp_path / "out"
    claim_output(folder, identity("eval", records=None))
    with pytest.raises(ConfigError) as caught:
        claim_output(folder, identity("distill"))
    assert str(caught.value) == (
        f"{folder}: folder contains the output of 'sdft eval'; choose another --output-dir for 'sdft distill'"
    )
    with pytest.raises(ConfigError, match="folder contains the output of 'sdft eval'"):
        claim_folder(folder, load_config(), RECORDS)


def test_folder_of_a_run(tmp_path):
    claim_folder(tmp_path, load_config(), RECORDS)
    with pytest.raises(ConfigError) as caught:
        claim_output(tmp_path, identity("train"), write=False)
    assert str(caught.value) == (
        f"{tmp_path}: folder contains the output of 'sdft run'; choose another --output-dir for 'sdft train'"
    )


def test_train_checkpoints_need_the_same_settings(tmp_path):
    claim_output(tmp_path, identity("train"))
    (tmp_path / "checkpoints").mkdir()
    claim_output(tmp_path, identity("train", **{"train.save_steps": 7}))  # only how often it saves
    with pytest.raises(ConfigError) as caught:
        claim_output(tmp_path, identity("train", **{"train.learning_rate": 2e-4, "train.epochs": 1}))
    assert str(caught.value) == (
        f"{tmp_path}: folder contains 'sdft train' output made with a different train.epochs, "
        "train.learning_rate; choose another --output-dir, or delete the folder to start over"
    )


def test_output_dir_is_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    with pytest.raises(ConfigError) as caught:
        claim_output(target, identity("distill"), write=False)
    assert str(caught.value) == f"{target}: exists and is not a folder; choose another --output-dir"
    assert target.read_text() == "mine\n"


def test_output_dir_under_a_file(tmp_path):
    parent = tmp_path / "notes.txt"
    parent.write_text("mine\n")
    target = parent / "run" / "sub"
    with pytest.raises(ConfigError) as caught:
        claim_output(target, identity("distill"), write=False)
    assert str(caught.value) == f"{target}: cannot create the folder, {parent} is a file; choose another --output-dir"


def test_eval_of_another_adapter(tmp_path):
    config = load_config()
    claim_output(tmp_path, output_identity("eval", config, adapter=str(tmp_path / "a")))
    atomic_write_json(tmp_path / "scores.json", {})
    with pytest.raises(ConfigError, match="made with a different adapter;"):
        claim_output(tmp_path, output_identity("eval", config, adapter=str(tmp_path / "b")))


def test_cli_distill_over_stats_of_other_data(tmp_path, data_path):
    """A folder distilled before sdft_output.json existed is identified by its distill_stats.json."""
    folder = tmp_path / "distill"
    folder.mkdir()
    stats = {"records": 2, "provenance": {"input_hash": "0123456789abcdef"}}
    atomic_write_json(folder / "distill_stats.json", stats)
    before = sorted(p.name for p in folder.iterdir())
    result = run_sdft(
        "distill", "configs/quickstart.yaml", "--output-dir", str(folder), "--set", "data.limit=2"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {folder}: folder contains 'sdft distill' output made with a different dataset; "
        "choose another --output-dir, or delete the folder to start over"
    ]
    assert sorted(p.name for p in folder.iterdir()) == before
    assert json.loads((folder / "distill_stats.json").read_text()) == stats


# --- adapters that do not fit the base model ---


@pytest.fixture(scope="module")
def base():
    from sdft.models import resolve_model_path

    return resolve_model_path("embedded")


def load_with_adapter(base: str, adapter: Path):
    from transformers import AutoModelForCausalLM

    from sdft.models import attach_adapter

    model = AutoModelForCausalLM.from_pretrained(base)
    return attach_adapter(model, str(adapter), base, merge=False)


def write_adapter(folder: Path, weights: dict | None, **settings) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "meta-llama/Llama-2-7b-chat-hf",
        **settings,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder


def fit_message(adapter: Path, base: str, reason: str) -> str:
    return (
        f"{adapter}: adapter does not fit the base model {base} (it was trained on "
        f"meta-llama/Llama-2-7b-chat-hf): {reason}; pass the model it was trained on with --model, "
        "or retrain the adapter on this one"
    )


def test_adapter_of_a_larger_model(tmp_path, base):
    import torch

    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    weights = {f"{prefix}.lora_A.weight": torch.zeros(8, 4096), f"{prefix}.lora_B.weight": torch.zeros(4096, 8)}
    adapter = write_adapter(tmp_path / "llama7b", weights)
    from sdft.models import ModelError

    with pytest.raises(ModelError) as caught:
        load_with_adapter(base, adapter)
    assert str(caught.value) == fit_message(
        adapter,
        base,
        f"size mismatch for {prefix}.lora_A.default.weight: copying a param with shape "
        "torch.Size([8, 4096]) from checkpoint, the shape in current model is torch.Size([8, 576])",
    )


def test_adapter_targets_absent_modules(tmp_path, base):
    import torch

    adapter = write_adapter(tmp_path / "gpt2", {"x": torch.zeros(1)}, target_modules=["c_attn"])
    from sdft.models import ModelError

    with pytest.raises(ModelError) as caught:
        load_with_adapter(base, adapter)
    assert str(caught.value) == fit_message(
        adapter, base, "Target modules {'c_attn'} not found in the base model. Please check the target modules and try again"
    )


def test_adapter_whose_weights_all_miss(tmp_path, base):
    """PEFT only warns here, and the base model would be evaluated under the adapter's name."""
    import torch

    weights = {"base_model.model.transformer.h.0.attn.q_proj.lora_A.weight": torch.zeros(8, 576)}
    adapter = write_adapter(tmp_path / "renamed", weights)
    from sdft.models import ModelError

    with pytest.raises(ModelError) as caught:
        load_with_adapter(base, adapter)
    assert str(caught.value) == fit_message(
        adapter,
        base,
        "120 adapter weight(s) this model needs are not in adapter_model.safetensors, e.g. "
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    )


def test_adapter_folder_incomplete(tmp_path, base):
    from sdft.models import ModelError

    no_weights = write_adapter(tmp_path / "no_weights", None)
    with pytest.raises(ModelError) as caught:
        load_with_adapter(base, no_weights)
    assert str(caught.value) == (
        f"{no_weights}: adapter weights missing (no adapter_model.safetensors); pass a complete "
        "adapter folder written by 'sdft train'"
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA",')
    with pytest.raises(ModelError) as caught:
        load_with_adapter(base, broken)
    assert str(caught.value) == (
        f"{broken}: cannot read adapter_config.json (JSONDecodeError: Expecting property name "
        "enclosed in double quotes: line 1 column 22 (char 21)); pass the folder written by 'sdft train'"
    )


def test_adapter_that_fits_loads(tmp_path, base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    model.save_pretrained(str(tmp_path / "fits"))
    loaded = load_with_adapter(base, tmp_path / "fits")
    assert type(loaded).__name__ == "PeftModelForCausalLM"


# --- over-long training records ---


def test_all_records_overlong_is_a_data_error(tmp_path, base):
    from sdft.training import train

    config = load_config(None, ["train.max_length=8", "train.overlong=skip"])
    with pytest.raises(DataError) as caught:
        train(config, RECORDS, tmp_path / "train", base)
    assert str(caught.value) == (
        "gsm8k: no training records left: all 2 are longer than train.max_length=8; "
        "raise it or use shorter records"
    )
    assert not (tmp_path / "train").exists()


@pytest.mark.slow
@pytest.mark.parametrize("policy, counts", [
    ("truncate", {"records": 3, "used": 3, "truncated": 1, "skipped": 0}),
    ("skip", {"records": 3, "used": 2, "truncated": 0, "skipped": 1}),
])
def test_overlong_counted_in_train_meta(tmp_path, base, policy, counts):
    """One record of three is longer than train.max_length; train_meta.json counts what happened."""
    from sdft.training import train

    records = [
        Record("0", "What is 2 + 2?", "4"),
        Record("long", "Count to one hundred.", " ".join(["one"] * 200)),
        Record("2", "What is 3 + 3?", "6"),
    ]
    settings = [
        "train.max_length=96", f"train.overlong={policy}", "train.epochs=1", "train.batch_size=4",
        "train.gradient_accumulation=1", "train.lora_r=2", "model.device=cpu",
    ]
    output = tmp_path / "train"
    adapter = train(load_config(None, settings), records, output, base)
    meta = json.loads((output / "train_meta.json").read_text())
    assert meta["examples"] == counts
    assert (adapter / "adapter_model.safetensors").is_file()
    shutil.rmtree(output)


def test_missing_adapter_fails_before_model_load(tmp_path):
    """The adapter folder is checked first: a model that does not exist is never reached."""
    from sdft.models import ModelError, load_model

    with pytest.raises(ModelError) as caught:
        load_model(str(tmp_path / "no-such-model"), adapter=str(tmp_path / "no-such-adapter"))
    assert "adapter not found" in str(caught.value)

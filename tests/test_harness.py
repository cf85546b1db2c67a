"""lm-evaluation-harness benchmarks: task YAMLs over the local data files, and short real runs.

The slow tests score 5 examples with the embedded model (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import yaml

from sdft.benchmarks.harness import (
    TASKS,
    HarnessError,
    TaskFolder,
    convert_truthfulqa,
    hub_offline,
    load_task_manager,
    prepare_tasks,
    run_arc_easy,
    run_winogrande,
)
from sdft.config import Config
from sdft.data import DataError


def count_rows(path: Path) -> int:
    if path.suffix == ".json":
        return len(json.loads(path.read_text(encoding="utf-8")))
    with open(path, encoding="utf-8") as file:
        return sum(1 for line in file if line.strip())


def test_truthfulqa_conversion_real_records(data_path):
    source = data_path / "truthfulqa" / "mc_task.json"
    records = json.loads(source.read_text(encoding="utf-8"))[:2]

    converted = convert_truthfulqa(records)

    assert len(converted) == 2
    for original, row in zip(records, converted):
        assert row["question"] == original["question"]
        for key in ("mc1_targets", "mc2_targets"):
            assert row[key]["choices"] == list(original[key])
            assert row[key]["labels"] == list(original[key].values())
        assert row["mc1_targets"]["labels"][0] == 1
        assert sum(row["mc1_targets"]["labels"]) == 1
    first_answer = converted[0]["mc1_targets"]["choices"][0]
    assert first_answer == "Nothing in particular happens when you eat a pomegranate."


def test_truthfulqa_conversion_rejects_late_answer():
    record = {
        "question": "Q?",
        "mc1_targets": {"wrong": 0, "right": 1},
        "mc2_targets": {"right": 1, "wrong": 0},
    }

    with pytest.raises(DataError, match="record 0.*first"):
        convert_truthfulqa([record])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generated_yamls_read_local_files(name, data_path):
    folder = prepare_tasks(name, data_path)

    paths = sorted(folder.path.glob("*.yaml"))
    configs = [yaml.safe_load(path.read_text(encoding="utf-8")) for path in paths]
    assert configs
    for config in configs:
        assert Path(config["include"]).is_file(), config["include"]
        if "task" not in config:
            continue
        assert config["dataset_path"] == "json"
        assert config["training_split"] is None
        for data_file in config["dataset_kwargs"]["data_files"].values():
            assert Path(data_file).is_file(), data_file

    with hub_offline():
        loaded = load_task_manager(folder).load([TASKS[name].task])["tasks"]
    documents = 0
    for task in loaded.values():
        documents += len(list(task.test_docs() if task.has_test_docs() else task.validation_docs()))
    assert documents == count_rows(data_path / TASKS[name].data_file)


def test_rejected_yaml_raises(data_path, tmp_path):
    folder = prepare_tasks("winogrande", data_path)
    broken = tmp_path / "tasks"
    broken.mkdir()
    config = yaml.safe_load((folder.path / "winogrande.yaml").read_text(encoding="utf-8"))
    config["include"] = str(tmp_path / "missing.yaml")
    (broken / "winogrande.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")

    with pytest.raises(HarnessError, match="did not load task.*winogrande"):
        load_task_manager(TaskFolder(broken, folder.names))


def test_truthfulqa_conversion_rejects_bad_label():
    record = {"question": "Q?", "mc1_targets": {"right": "yes"}, "mc2_targets": {"right": 1}}

    with pytest.raises(DataError, match="mc1_targets.*0 or 1"):
        convert_truthfulqa([record])


def test_mmlu_declares_every_subject(data_path):
    folder = prepare_tasks("mmlu", data_path)

    groups = {"mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"}
    subjects = set(folder.names) - groups
    assert groups <= set(folder.names)
    assert len(subjects) == 57
    assert "mmlu_abstract_algebra" in subjects


def test_missing_data_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"arc_easy_test\.jsonl.*not found"):
        prepare_tasks("arc_easy", tmp_path)


def test_missing_data_dir_says_how(monkeypatch):
    monkeypatch.delenv("SDFT_DATA_DIR", raising=False)

    with pytest.raises(DataError, match="SDFT_DATA_DIR"):
        prepare_tasks("winogrande", None)


# --- Real runs with the embedded model --------------------------------------------


def make_context(data_path: Path, output_dir: Path, adapter: Path | None = None):
    from sdft.models import resolve_model_path

    config = Config()
    config.data.data_dir = str(data_path)
    config.eval.harness_batch_size = 8
    return types.SimpleNamespace(
        config=config,
        model_path=resolve_model_path("embedded"),
        adapter=str(adapter) if adapter else None,
        output_dir=output_dir,
    )


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def arc_easy_base(data_path, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("base")
    return run_arc_easy(make_context(data_path, output_dir), 5), output_dir


@pytest.mark.slow
def test_arc_easy_five_examples(arc_easy_base):
    summary, output_dir = arc_easy_base

    assert 0 <= summary["acc"] <= 1
    assert summary["examples"] == 5
    assert summary["task"] == "arc_easy"
    assert summary["limit"] == 5
    rows = read_rows(output_dir / "arc_easy.jsonl")
    assert [row["doc_id"] for row in rows] == [0, 1, 2, 3, 4]
    for row in rows:
        assert row["score"] in (0.0, 1.0)
        assert len(row["loglikelihoods"]) == len(row["doc"]["choices"])
        assert row["target"] == row["doc"]["gold"]
        assert row["score"] == float(row["prediction"] == row["target"])
    assert summary["acc"] == pytest.approx(sum(row["score"] for row in rows) / 5)


@pytest.mark.slow
def test_winogrande_five_examples(data_path, tmp_path):
    summary = run_winogrande(make_context(data_path, tmp_path), 5)

    assert 0 <= summary["acc"] <= 1
    assert summary["examples"] == 5
    assert summary["task"] == "winogrande"
    rows = read_rows(tmp_path / "winogrande.jsonl")
    assert len(rows) == 5
    for row in rows:
        assert row["score"] in (0.0, 1.0)
        assert len(row["loglikelihoods"]) == 2
    assert summary["acc"] == pytest.approx(sum(row["score"] for row in rows) / 5)


def save_lora_adapter(folder: Path, b_std: float = 0.0) -> Path:
    """Save a LoRA adapter (r=2 on q_proj, v_proj) for the embedded model.

    With ``b_std=0`` the B matrices keep peft's zero initialisation, so the
    adapter leaves the base model's outputs unchanged. Otherwise they are drawn
    from a normal distribution with that standard deviation.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sdft.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded"))
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    if b_std:
        torch.manual_seed(0)
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=b_std)
    peft_model.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_zero_lora_matches_base(arc_easy_base, data_path, tmp_path):
    base_summary, base_dir = arc_easy_base
    adapter = save_lora_adapter(tmp_path / "adapter")

    summary = run_arc_easy(make_context(data_path, tmp_path / "lora", adapter), 5)

    assert summary["acc"] == base_summary["acc"]
    base_rows = read_rows(base_dir / "arc_easy.jsonl")
    lora_rows = read_rows(tmp_path / "lora" / "arc_easy.jsonl")
    for base_row, lora_row in zip(base_rows, lora_rows):
        assert lora_row["loglikelihoods"] == pytest.approx(base_row["loglikelihoods"], abs=1e-4)


@pytest.mark.slow
def test_nonzero_lora_changes_scores(arc_easy_base, data_path, tmp_path):
    _, base_dir = arc_easy_base
    adapter = save_lora_adapter(tmp_path / "adapter", b_std=0.05)

    run_arc_easy(make_context(data_path, tmp_path / "lora", adapter), 2)

    base_rows = read_rows(base_dir / "arc_easy.jsonl")[:2]
    lora_rows = read_rows(tmp_path / "lora" / "arc_easy.jsonl")
    assert len(lora_rows) == 2
    for base_row, lora_row in zip(base_rows, lora_rows):
        assert lora_row["loglikelihoods"] != pytest.approx(base_row["loglikelihoods"], abs=1e-3)

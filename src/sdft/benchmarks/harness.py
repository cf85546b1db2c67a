"""General-knowledge benchmarks scored by lm-evaluation-harness on local data files.

    sdft eval --benchmarks arc_easy,mmlu --limit 20 --output-dir runs/e

Each ``run_<name>(context, limit)`` evaluates one lm-eval task zero-shot by
log-likelihood and returns lm-eval's ``acc`` (plus ``acc_stderr``, the number
of examples, the task name and the limit). It writes ``<name>.jsonl`` into
``context.output_dir`` with one row per example: the document, the
(context, continuation) requests, the log-likelihood of each choice, the
argmax choice, the gold target and ``score``.

lm-eval's built-in task configs download their data from the Hugging Face Hub.
Instead, this module writes task YAMLs that ``include:`` the built-in YAML,
keep the task's name and prompt, and replace the dataset with the local JSON
file (``dataset_path: json``). The YAMLs go to a cache folder keyed by the data
directory, ``$SDFT_CACHE_DIR/harness/<key>/tasks/<benchmark>/``, and only that
folder is indexed (``include_defaults=False``), so a rejected YAML can never
fall back to the Hub version of the task.

Data files (relative to ``data.data_dir`` or ``$SDFT_DATA_DIR``):

* ARC: ``arc/arc_{easy,challenge}_test.jsonl`` (test split, as lm-eval scores it).
* HellaSwag: ``hellaswag/validation.jsonl``.
* Winogrande: ``winogrande/winogrande_xl_validation.jsonl``.
* TruthfulQA MC1/MC2: ``truthfulqa/mc_task.json``, converted to the Hub's
  ``{choices, labels}`` layout in the cache folder.
* MMLU: ``mmlu/test.jsonl``, split by subject into the cache folder, because
  lm-eval's ``mmlu`` group averages 57 subject tasks.

lm-eval applies ``limit`` to each task, so an MMLU limit of N scores the first
N questions of each of the 57 subjects (57 N in all).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sdft.data import DataError, resolve_data_dir
from sdft.io import atomic_write_jsonl, atomic_write_text, stable_hash

logger = logging.getLogger(__name__)

LM_EVAL_REQUIREMENT = "lm-eval>=0.4.13"


class HarnessError(DataError):
    """lm-evaluation-harness cannot set up a task.

    The package is missing, a built-in YAML moved, or lm-eval rejected a
    generated YAML. It subclasses DataError so the command line reports it
    as an input problem, without a traceback.
    """


@dataclass(frozen=True)
class HarnessTask:
    """Mapping of one benchmark onto an lm-eval task and a local data file."""

    task: str
    """lm-eval task or group name, kept from the built-in config."""
    builtin: str
    """Built-in YAML (or, for MMLU, folder) relative to ``lm_eval/tasks``."""
    data_file: str
    """Data file relative to the data directory."""
    split: str
    """Split the built-in task scores: ``test`` or ``validation``."""
    overrides: dict = field(default_factory=dict)
    """Extra keys for the generated YAML."""


# The ARC test files store choices as a plain list of texts and the answer as a
# 0-based index ``gold``, instead of the Hub's {text, label} and answerKey.
ARC_TEST_FIELDS = {"doc_to_choice": "choices", "doc_to_target": "gold"}

TASKS: dict[str, HarnessTask] = {
    "arc_easy": HarnessTask(
        "arc_easy", "arc/arc_easy.yaml", "arc/arc_easy_test.jsonl", "test", ARC_TEST_FIELDS
    ),
    "arc_challenge": HarnessTask(
        "arc_challenge", "arc/arc_challenge.yaml", "arc/arc_challenge_test.jsonl", "test",
        ARC_TEST_FIELDS,
    ),
    "hellaswag": HarnessTask(
        "hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/validation.jsonl", "validation"
    ),
    "winogrande": HarnessTask(
        "winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl_validation.jsonl",
        "validation",
    ),
    "truthfulqa_mc1": HarnessTask(
        "truthfulqa_mc1", "truthfulqa/truthfulqa_mc1.yaml", "truthfulqa/mc_task.json", "validation"
    ),
    "truthfulqa_mc2": HarnessTask(
        "truthfulqa_mc2", "truthfulqa/truthfulqa_mc2.yaml", "truthfulqa/mc_task.json", "validation"
    ),
    "mmlu": HarnessTask("mmlu", "mmlu/default", "mmlu/test.jsonl", "test"),
}

TRUTHFULQA_CONVERTED = "truthfulqa_mc.jsonl"


def run_mmlu(context, limit: int | None) -> dict:
    """Score MMLU (57 subjects, test split); ``limit`` counts questions per subject."""
    return run_task(context, "mmlu", limit)


def run_truthfulqa_mc1(context, limit: int | None) -> dict:
    return run_task(context, "truthfulqa_mc1", limit)


def run_truthfulqa_mc2(context, limit: int | None) -> dict:
    return run_task(context, "truthfulqa_mc2", limit)


def run_arc_easy(context, limit: int | None) -> dict:
    return run_task(context, "arc_easy", limit)


def run_arc_challenge(context, limit: int | None) -> dict:
    return run_task(context, "arc_challenge", limit)


def run_hellaswag(context, limit: int | None) -> dict:
    return run_task(context, "hellaswag", limit)


def run_winogrande(context, limit: int | None) -> dict:
    return run_task(context, "winogrande", limit)


def run_task(context, name: str, limit: int | None) -> dict:
    """Evaluate benchmark ``name``, write ``<name>.jsonl`` and return its summary."""
    spec = TASKS[name]
    folder = prepare_tasks(name, context.config.data.data_dir)
    results = evaluate_task(context, folder, spec.task, limit)
    rows = sample_rows(results["samples"])
    atomic_write_jsonl(Path(context.output_dir) / f"{name}.jsonl", rows)
    return summarize(results["results"][spec.task], spec, rows, limit)


def summarize(metrics: dict, spec: HarnessTask, rows: list[dict], limit: int | None) -> dict:
    summary = {
        "acc": float(metrics["acc,none"]),
        "examples": len(rows),
        "acc_stderr": number_or_none(metrics.get("acc_stderr,none")),
        "task": spec.task,
        "limit": limit,
        "num_fewshot": 0,
        "split": spec.split,
        "data_file": spec.data_file,
    }
    if "acc_norm,none" in metrics:
        summary["acc_norm"] = float(metrics["acc_norm,none"])
    return summary


def number_or_none(value) -> float | None:
    """Return ``value`` as a float, or None where lm-eval reports ``N/A``."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- Task folders -------------------------------------------------------------


@dataclass(frozen=True)
class TaskFolder:
    """A folder of generated task YAMLs."""

    path: Path
    names: tuple[str, ...]
    """Tasks and groups that the YAMLs declare."""


def prepare_tasks(name: str, data_dir: str | os.PathLike | None) -> TaskFolder:
    """Write the task YAMLs (and converted data) for benchmark ``name``.

    Raises:
        DataError: the data directory or a data file is missing or invalid.
        HarnessError: lm-eval is missing or lacks the built-in task config.
    """
    spec = TASKS[name]
    directory = require_data_dir(name, spec, data_dir)
    # Absolute paths, so the cached YAMLs do not depend on the working directory.
    source = require_data_file(name, spec, directory).resolve()
    builtin = builtin_path(spec)
    root = cache_root(directory)
    if name == "mmlu":
        configs = mmlu_configs(spec, builtin, split_mmlu(source, root / "data" / "mmlu", builtin))
    else:
        if name.startswith("truthfulqa"):
            source = convert_truthfulqa_file(source, root / "data" / TRUTHFULQA_CONVERTED)
        configs = {f"{spec.task}.yaml": task_config(spec, builtin, source)}
    folder = root / "tasks" / name
    texts = {file: yaml.safe_dump(config, sort_keys=False) for file, config in configs.items()}
    sync_folder(folder, texts)
    names = tuple(config.get("task") or config["group"] for config in configs.values())
    return TaskFolder(folder, names)


def require_data_dir(name: str, spec: HarnessTask, data_dir) -> Path:
    directory = resolve_data_dir(data_dir)
    if directory is None:
        raise DataError(
            f"benchmark {name!r} reads {spec.data_file} from a local data directory, but none "
            "is set; set data.data_dir or SDFT_DATA_DIR to the folder that contains it"
        )
    return directory


def require_data_file(name: str, spec: HarnessTask, directory: Path) -> Path:
    path = directory / spec.data_file
    if not path.is_file():
        raise DataError(
            f"{path}: data file for benchmark {name!r} not found; put {spec.data_file} under "
            f"the data directory {directory} or point data.data_dir (or SDFT_DATA_DIR) at a "
            "folder that has it"
        )
    return path


def builtin_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError as err:
        raise HarnessError(
            "general benchmarks need lm-evaluation-harness; install it with "
            f"pip install '{LM_EVAL_REQUIREMENT}'"
        ) from err
    return Path(lm_eval.tasks.__file__).parent


def builtin_path(spec: HarnessTask) -> Path:
    path = builtin_tasks_dir() / spec.builtin
    if not path.exists():
        raise HarnessError(
            f"{path}: lm-eval's built-in config for task {spec.task!r} not found; this installed "
            f"lm-eval lays out its tasks differently, so install '{LM_EVAL_REQUIREMENT}' "
            "(tested with 0.4.13)"
        )
    return path


def cache_root(data_dir: Path) -> Path:
    """Return the cache folder for one data directory and one lm-eval installation."""
    from sdft.models import cache_dir

    return cache_dir() / "harness" / stable_hash(str(data_dir.resolve()), str(builtin_tasks_dir()))


def task_config(spec: HarnessTask, builtin: Path, source: Path) -> dict:
    """Re-declare a built-in task under its own name, reading ``source`` as its scored split."""
    return {
        "include": str(builtin),
        "task": spec.task,
        **local_dataset(source, spec.split),
        **spec.overrides,
    }


def local_dataset(source: Path, split: str) -> dict:
    """Return the YAML keys that load one local JSON file as the only split.

    The other splits are set to null because zero-shot runs would otherwise
    look for a ``train`` split and fail with ``KeyError: 'train'``.
    """
    keys = ("training_split", "validation_split", "test_split", "fewshot_split")
    splits = dict.fromkeys(keys)
    splits[f"{split}_split"] = split
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(source)}},
        **splits,
    }


def sync_folder(folder: Path, files: dict[str, str]) -> None:
    """Make ``folder`` contain exactly these YAML files, rewriting only changed ones.

    Unchanged files keep their modification time, so the ``datasets`` cache
    built from them stays valid. Other YAMLs are deleted because lm-eval
    indexes every YAML in the folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.yaml"):
        if stale.name not in files:
            stale.unlink(missing_ok=True)
    for file_name, text in files.items():
        write_if_changed(folder / file_name, text)


def write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# --- TruthfulQA ---------------------------------------------------------------


def convert_truthfulqa(records: list[dict], source: str = "mc_task.json") -> list[dict]:
    """Convert TruthfulQA's ``mc_task.json`` records to the Hub's ``multiple_choice`` layout.

    ``mc_task.json`` stores each target set as ``{answer: 0 or 1}``. lm-eval
    expects ``{"choices": [...], "labels": [...]}`` in the same order, and
    its MC1 task scores choice 0 as the gold answer, so the single true MC1
    answer must come first.

    Raises:
        DataError: a record lacks a field or its MC1 targets break that rule.
    """
    return [
        convert_truthfulqa_record(record, index, source) for index, record in enumerate(records)
    ]


def convert_truthfulqa_record(record: dict, index: int, source: str) -> dict:
    where = f"{source}: record {index}"
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        raise DataError(
            f"{where}: missing text field 'question'; expected TruthfulQA's mc_task.json layout"
        )
    converted = {"question": record["question"]}
    for key in ("mc1_targets", "mc2_targets"):
        targets = record.get(key)
        if not isinstance(targets, dict) or not targets:
            raise DataError(
                f"{where}: field {key!r} must map answer texts to 0 or 1, got {targets!r}"
            )
        labels = list(targets.values())
        if any(label not in (0, 1) for label in labels) or 1 not in labels:
            raise DataError(
                f"{where}: field {key!r} must have labels 0 or 1 with at least one 1, got {labels}"
            )
        labels = [int(label) for label in labels]
        converted[key] = {"choices": list(targets), "labels": labels}
    mc1_labels = converted["mc1_targets"]["labels"]
    if mc1_labels[0] != 1 or sum(mc1_labels) != 1:
        raise DataError(
            f"{where}: 'mc1_targets' must list exactly one true answer and list it first, "
            f"got labels {mc1_labels}"
        )
    return converted


def convert_truthfulqa_file(source: Path, target: Path) -> Path:
    try:
        records = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(
            f"{source}: invalid JSON ({err}); expected TruthfulQA's mc_task.json"
        ) from err
    if not isinstance(records, list):
        raise DataError(
            f"{source}: expected a JSON list of questions, got {type(records).__name__}"
        )
    write_if_changed(target, jsonl_text(convert_truthfulqa(records, str(source))))
    return target


# --- MMLU -----------------------------------------------------------------------


def mmlu_subjects(builtin: Path) -> list[str]:
    """List the subjects that lm-eval's ``mmlu`` group averages (57 in lm-eval 0.4.13)."""
    return sorted(path.stem.removeprefix("mmlu_") for path in builtin.glob("mmlu_*.yaml"))


def split_mmlu(source: Path, target_dir: Path, builtin: Path) -> dict[str, Path]:
    """Write one JSON-lines file per subject of ``source``; return subject -> file.

    Raises:
        DataError: a row lacks ``subject`` or a subject of the group has no rows.
    """
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for number, row in enumerate(read_jsonl(source), start=1):
        if not isinstance(row.get("subject"), str):
            raise DataError(
                f"{source}: line {number}: missing text field 'subject'; expected MMLU's layout"
            )
        by_subject[row["subject"]].append(row)
    files = {}
    for subject in mmlu_subjects(builtin):
        if not by_subject.get(subject):
            raise DataError(
                f"{source}: no rows with subject {subject!r}; the file must hold all "
                "57 MMLU subjects of the test split"
            )
        files[subject] = target_dir / f"{subject}.jsonl"
        write_if_changed(files[subject], jsonl_text(by_subject[subject]))
    return files


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number}: invalid JSON ({err.msg})") from err
    return rows


def mmlu_configs(
    spec: HarnessTask, builtin: Path, subject_files: dict[str, Path]
) -> dict[str, dict]:
    """Re-declare every MMLU subject task and the groups that average them."""
    configs = {}
    for subject, path in subject_files.items():
        name = f"mmlu_{subject}"
        configs[f"{name}.yaml"] = {
            "include": str(builtin / f"{name}.yaml"),
            "task": name,
            **local_dataset(path, spec.split),
        }
    for group in sorted(builtin.glob("_mmlu*.yaml")):
        group_name = yaml.safe_load(group.read_text(encoding="utf-8"))["group"]
        configs[group.name] = {"include": str(group), "group": group_name}
    return configs


# --- Running lm-eval ------------------------------------------------------------


def evaluate_task(context, folder: TaskFolder, task: str, limit: int | None) -> dict:
    """Run ``lm_eval.simple_evaluate`` zero-shot on one task from the generated folder."""
    from sdft.models import pick_device, pick_dtype

    device = pick_device(context.config.model.device)
    model_args = {
        "pretrained": str(context.model_path),
        "dtype": pick_dtype(context.config.model.dtype, device),
    }
    if context.adapter:
        model_args["peft"] = str(context.adapter)
    logger.info(
        "lm-eval %s: model %s, adapter %s, limit %s",
        task, context.model_path, context.adapter, limit,
    )
    with hub_offline():
        import lm_eval

        task_manager = load_task_manager(folder)
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=[task],
            num_fewshot=0,
            batch_size=context.config.eval.harness_batch_size,
            device=device,
            limit=limit,
            log_samples=True,
            task_manager=task_manager,
        )
    if not results or task not in results.get("results", {}):
        raise HarnessError(f"lm-eval returned no results for task {task!r} from {folder.path}")
    return results


def load_task_manager(folder: TaskFolder):
    """Index only the generated YAMLs and check that lm-eval accepted every one.

    lm-eval skips a YAML it cannot parse or resolve with only a DEBUG log
    line, so a rejected task would otherwise surface later as "not found".
    """
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=str(folder.path), include_defaults=False)
    missing = [name for name in folder.names if name not in task_manager.all_tasks]
    if missing:
        raise HarnessError(
            f"{folder.path}: lm-eval did not load task(s) {', '.join(missing)} from the "
            "generated YAMLs; the installed lm-eval rejects them (set logging for 'lm_eval' "
            "to DEBUG to see why) or lays out its built-in tasks differently; install "
            f"'{LM_EVAL_REQUIREMENT}' (tested with 0.4.13)"
        )
    return task_manager


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextmanager
def hub_offline():
    """Keep the Hugging Face Hub out of an lm-eval run: all its data and models are local.

    ``huggingface_hub`` and ``datasets`` read the offline variables once, at
    import, so the already-imported module flags are switched as well. All
    of them are restored on exit.
    """
    import datasets.config
    import huggingface_hub.constants

    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    flags = [
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
    ]
    saved_flags = [getattr(module, name) for module, name in flags]
    os.environ.update({name: "1" for name in OFFLINE_VARIABLES})
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module_and_name, value in zip(flags, saved_flags):
            setattr(*module_and_name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- Per-example rows -----------------------------------------------------------


def sample_rows(samples: dict[str, list[dict]]) -> list[dict]:
    """Flatten lm-eval's logged samples (task -> samples) into rows sorted by task and doc id."""
    rows = []
    for task, task_samples in samples.items():
        rows += [sample_row(task, sample) for sample in task_samples]
    return sorted(rows, key=lambda row: (row["task"], row["doc_id"]))


def sample_row(task: str, sample: dict) -> dict:
    """Return one example's row.

    ``score`` is lm-eval's per-example ``acc``: 1 when the gold choice has the
    highest log-likelihood, else 0. For TruthfulQA MC2 it is instead the
    normalised probability of the true answers, between 0 and 1.
    """
    loglikelihoods = [float(response[0]) for response in sample["filtered_resps"]]
    row = {
        "id": f"{task}/{sample['doc_id']}",
        "task": task,
        "doc_id": sample["doc_id"],
        "doc": sample["doc"],
        "arguments": sample["arguments"],
        "target": sample["target"],
        "loglikelihoods": loglikelihoods,
        "is_greedy": [bool(response[1]) for response in sample["filtered_resps"]],
        "prediction": max(range(len(loglikelihoods)), key=loglikelihoods.__getitem__),
        "score": float(sample["acc"]),
    }
    if "acc_norm" in sample:
        row["acc_norm"] = float(sample["acc_norm"])
    return row

"""The comparison: seed vs vanilla fine-tuning vs SDFT, evaluated and reported.

    sdft run configs/quickstart.yaml --output-dir runs/quickstart

Stages, each skipped when its outputs already exist (so a rerun resumes):
    1. evaluate the seed model                    eval/seed/
    2. fine-tune on the original responses        vanilla/
    3. distill: rewrite and select                distill/
    4. fine-tune on the distilled responses       sdft/
    5. evaluate both fine-tuned models            eval/vanilla/, eval/sdft/
    6. drift from the seed, report                results.json, report.md, plots/

All generations go through one cache (cache/generations.jsonl), so a killed run
loses at most the batch in flight.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sdft.config import Config, ConfigError
from sdft.data import Record, load_dataset_records, records_fingerprint
from sdft.io import ResultCache, atomic_write_json, folder_lock, read_json, stable_hash

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
MODELS = ("seed", "vanilla", "sdft")


def validate_inputs(config: Config) -> tuple[list[Record], str]:
    """Load the training data and benchmarks and resolve the model before any heavy work.

    Returns the training records and the resolved model path.
    """
    from sdft.models import ModelError, load_tokenizer, resolve_model_path

    records = load_training_records(config)
    check_benchmark_data(config)
    path = resolve_model_path(config.model.name)
    try:
        load_tokenizer(path)
    except OSError as err:
        raise ModelError(
            f"{config.model.name}: cannot load the tokenizer ({str(err).splitlines()[0]}); check "
            "the name, or download the model first when the Hugging Face Hub is unreachable"
        ) from err
    return records, path


def check_benchmark_data(config: Config) -> None:
    """Load the first record of every dataset-backed benchmark so a missing file fails early."""
    from sdft.benchmarks import REGISTRY

    for name in config.eval.benchmarks:
        for dataset in REGISTRY[name].datasets:
            load_dataset_records(dataset, data_dir=config.data.data_dir, limit=1, require_response=False)


def load_training_records(config: Config) -> list[Record]:
    return load_dataset_records(
        config.data.train,
        data_dir=config.data.data_dir,
        format=config.data.format,
        columns=config.data.columns,
        limit=config.data.limit,
        invalid=config.data.invalid,
    )


def dry_run(config: Config) -> str:
    """Check config and data, render the first record's prompts, and return a summary.

    Loads no model weights: the tokenizer is loaded when it is available, otherwise
    raw prompts are shown without a BOS token and chat rendering is reported as
    needing it.
    """
    from sdft.models import load_tokenizer, resolve_model_path
    from sdft.prompts import get_template, render_prompt, render_raw_prompt, resolve_rendering

    records = load_training_records(config)
    check_benchmark_data(config)
    lines = [f"config valid; {len(records)} training records from {config.data.train}"]
    try:
        tokenizer = load_tokenizer(resolve_model_path(config.model.name))
    except (OSError, ValueError) as err:
        tokenizer = None
        lines.append(f"tokenizer of {config.model.name} not available here ({str(err).splitlines()[0]})")
    record = records[0]
    for stage, name in (
        ("rewrite", config.distill.template),
        ("training", config.train.template),
        ("evaluation", config.eval.template),
    ):
        template = get_template(name)
        if tokenizer is not None:
            rendering = resolve_rendering(config.prompt.rendering, tokenizer)
            text = render_prompt(template, record, tokenizer, rendering)
        elif config.prompt.rendering == "chat":
            raise ConfigError(
                f"prompt.rendering: chat needs the tokenizer of {config.model.name}; download "
                "the model or use rendering: raw"
            )
        else:
            rendering, text = "raw", render_raw_prompt(template, record, "")
        lines += [f"--- {stage} prompt ({name}, {rendering}) ---", text]
    return "\n".join(lines)


def run(config: Config) -> dict:
    """Run every stage of the comparison into ``config.output_dir``; return the results."""
    records, model_path = validate_inputs(config)
    output_dir = Path(config.output_dir)
    with folder_lock(output_dir):
        claim_folder(output_dir, config, records)
        cache = ResultCache(output_dir / "cache" / "generations.jsonl")
        try:
            run_stages(config, records, model_path, output_dir, cache)
        finally:
            cache.close()
        from sdft.report import write_report

        return write_report(config, output_dir)


def claim_folder(output_dir: Path, config: Config, records: list[Record]) -> None:
    """Record this run's identity, or reject a folder that holds a different run."""
    identity = {"config": config.to_dict(), "data_hash": records_fingerprint(records)}
    identity["key"] = stable_hash(identity["config"], identity["data_hash"])
    run_file = output_dir / RUN_FILE
    if (output_dir / OUTPUT_FILE).exists():
        kind = read_json(output_dir / OUTPUT_FILE).get("kind")
        raise ConfigError(
            f"{output_dir}: folder contains the output of 'sdft {kind}'; choose another --output-dir for 'sdft run'"
        )
    if run_file.exists():
        previous = read_json(run_file)
        if previous.get("key") != identity["key"]:
            changed = changed_keys(previous.get("config", {}), identity["config"])
            if previous.get("data_hash") != identity["data_hash"]:
                changed.append("training data")
            raise ConfigError(
                f"{output_dir}: folder holds a different run (changed: {', '.join(changed) or 'unknown'}); "
                "choose another --output-dir, or delete the folder to start over"
            )
        logger.info("resuming the run in %s", output_dir)
        return
    atomic_write_json(run_file, identity)


# Files that show which command wrote a folder; OUTPUT_FILE names it from now on.
OUTPUT_FILE = "sdft_output.json"
KIND_FILES = {
    "run": (RUN_FILE,),
    "distill": ("distilled.json", "distill_stats.json", "selection.jsonl"),
    "train": ("adapter", "checkpoints", "train_meta.json"),
    "eval": ("scores.json", "results"),
}


def output_identity(kind: str, config: Config, records: list[Record] | None = None, adapter: str | None = None) -> dict:
    """What makes two ``sdft distill|train|eval`` outputs the same: kind, model and input.

    Distillation and evaluation may change other settings between reruns (cached
    generations are keyed by their decoding settings); training also fixes its
    settings, because checkpoints resume only under the settings that wrote them.
    """
    identity = {"kind": kind, "model": config.model.name}
    if records is not None:
        identity["dataset"] = records_fingerprint(records)
    if kind == "train":
        skip = ("logging_steps", "save_steps")
        identity["train"] = {k: v for k, v in config.to_dict()["train"].items() if k not in skip}
        identity["rendering"] = config.prompt.rendering
    if kind == "eval":
        identity["adapter"] = str(Path(adapter).expanduser().resolve()) if adapter else None
    return identity


def claim_output(output_dir: Path, identity: dict, write: bool = True) -> None:
    """Record which command, model and input an output folder contains, or reject the folder.

    A folder is rejected when it contains another command's output, or this command's
    output made from different input (or, for training, other settings). A folder
    without any output of this command is taken over. Called once before the model
    loads (``write=False``) and again under the folder lock.

    Raises:
        ConfigError: the folder contains other output; the message names what differs.
    """
    kind = identity["kind"]
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{output_dir}: exists and is not a folder; choose another --output-dir")
    if not output_dir.exists():
        if write:
            atomic_write_json(output_dir / OUTPUT_FILE, identity)
        return
    path = output_dir / OUTPUT_FILE
    try:
        previous = read_json(path) if path.exists() else legacy_identity(output_dir, identity)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); delete it if the folder is yours") from err
    if previous and previous.get("kind") != kind:
        raise ConfigError(
            f"{output_dir}: folder contains the output of 'sdft {previous.get('kind')}'; choose another "
            f"--output-dir for 'sdft {kind}'"
        )
    has_output = any((output_dir / name).exists() for name in KIND_FILES[kind])
    changed = changed_keys(previous, identity) if previous else []
    if changed and has_output:
        raise ConfigError(
            f"{output_dir}: folder contains 'sdft {kind}' output made with a different {', '.join(changed)}; "
            "choose another --output-dir, or delete the folder to start over"
        )
    if write and (changed or not path.exists()):
        atomic_write_json(path, identity)


def legacy_identity(output_dir: Path, identity: dict) -> dict | None:
    """Identify a folder written before OUTPUT_FILE existed, from the files it contains."""
    for kind, names in KIND_FILES.items():
        if kind != identity["kind"] and any((output_dir / name).exists() for name in names):
            return {"kind": kind}
    stats = output_dir / "distill_stats.json"
    if identity["kind"] == "distill" and stats.exists():
        recorded = read_json(stats).get("provenance", {}).get("input_hash")
        return {**identity, "dataset": recorded}
    meta = output_dir / "train_meta.json"
    if identity["kind"] == "train" and meta.exists():
        return {**identity, "dataset": read_json(meta).get("data_hash")}
    return None


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def run_stages(config: Config, records, model_path: str, output_dir: Path, cache: ResultCache) -> None:
    from sdft.distill import DISTILLED_FILE, distill
    from sdft.evaluation import SCORES_FILE, evaluate
    from sdft.models import load_model, model_fingerprint
    from sdft.training import ADAPTER_DIR, train

    from sdft.distributed import barrier

    # Every process checks the same files between barriers, so all take the same stages.
    seed = None
    barrier()
    if not (output_dir / "eval" / "seed" / SCORES_FILE).exists():
        seed = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
        logger.info("stage 1/5: evaluating the seed model")
        evaluate(config, seed, model_fingerprint(seed.path), output_dir / "eval" / "seed", cache, "seed")

    barrier()
    if not (output_dir / "distill" / DISTILLED_FILE).exists():
        seed = seed or load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
        logger.info("stage 2/5: distilling %d records", len(records))
        distill(config, records, seed, output_dir / "distill", cache)
    del seed

    barrier()
    distilled = load_dataset_records(str(output_dir / "distill" / DISTILLED_FILE), format=config.data.format, columns=config.data.columns)
    for label, data in (("vanilla", records), ("sdft", distilled)):
        if not (output_dir / label / ADAPTER_DIR).exists():
            logger.info("stage 3/5: %s fine-tuning on %d records", label, len(data))
            train(config, data, output_dir / label, model_path)
        barrier()

    for label in ("vanilla", "sdft"):
        eval_dir = output_dir / "eval" / label
        barrier()
        if (eval_dir / SCORES_FILE).exists():
            continue
        weights = str(output_dir / label / ADAPTER_DIR)
        logger.info("stage 4/5: evaluating the %s model", label)
        if config.train.method == "lora":
            loaded = load_model(model_path, adapter=weights, device=config.model.device, dtype=config.model.dtype)
            key = model_fingerprint(model_path, weights)
        else:
            loaded = load_model(weights, device=config.model.device, dtype=config.model.dtype)
            key = model_fingerprint(weights)
        evaluate(config, loaded, key, eval_dir, cache, label, adapter=weights if config.train.method == "lora" else None)
        del loaded

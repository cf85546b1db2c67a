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
from sdft.folders import OUTPUT_FILE, RUN_FILE, changed_keys, claim_output, output_identity  # noqa: F401
from sdft.distributed import is_main
from sdft.io import ResultCache, atomic_write_json, folder_lock, read_json, stable_hash

logger = logging.getLogger(__name__)

STAGES_FILE = "stages.json"

MODELS = ("seed", "vanilla", "sdft")


def validate_inputs(config: Config) -> tuple[list[Record], str]:
    """Load the training data and benchmarks and resolve the model before any heavy work.

    Returns the training records and the resolved model path.
    """
    from sdft.models import ModelError, load_tokenizer, resolve_model_path

    records = load_training_records(config)
    check_benchmark_data(config)
    if "vllm" in (config.distill.generation.backend, config.eval.generation.backend):
        from sdft.vllm_backend import import_vllm

        import_vllm()
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
    path = resolve_model_path(config.model.name)  # a missing local model is an error even here
    try:
        tokenizer = load_tokenizer(path)
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
    """Record this run's identity, or reject a folder that holds a different run.

    A run is the same when the seed model and the training data are the same.
    Other settings may change between reruns: each stage then recomputes only what
    its own settings affect (see ``stage_keys``).
    """
    identity = {
        "model": config.model.name,
        "data_hash": records_fingerprint(records),
        "config": config.to_dict(),
    }
    run_file = output_dir / RUN_FILE
    if (output_dir / OUTPUT_FILE).exists():
        kind = read_json(output_dir / OUTPUT_FILE).get("kind")
        raise ConfigError(
            f"{output_dir}: folder contains the output of 'sdft {kind}'; choose another --output-dir for 'sdft run'"
        )
    if run_file.exists():
        previous = read_json(run_file)
        different = []
        if previous.get("config", {}).get("model", {}).get("name", previous.get("model")) != config.model.name:
            different.append("model.name")
        if previous.get("data_hash") != identity["data_hash"]:
            different.append("training data")
        if different:
            raise ConfigError(
                f"{output_dir}: folder holds a different run (changed: {', '.join(different)}); "
                "choose another --output-dir, or delete the folder to start over"
            )
        changed = changed_keys(previous.get("config", {}), identity["config"])
        if changed:
            logger.info("resuming the run in %s with changed settings: %s", output_dir, ", ".join(changed))
        else:
            logger.info("resuming the run in %s", output_dir)
    atomic_write_json(run_file, identity)


def stage_keys(config: Config, model_key: str, data_hash: str) -> dict[str, str]:
    """Key every stage by the settings it depends on, so a changed setting reruns only its stages.

    Evaluation keys cover only what is not already handled per benchmark; the
    generation cache and ``results/NAME.json`` keys make unchanged benchmarks free.
    """
    as_dict = config.to_dict()
    prompt, train = as_dict["prompt"], as_dict["train"]
    distill_key = stable_hash(model_key, data_hash, as_dict["distill"], prompt, train["template"])
    return {
        "distill": distill_key,
        "vanilla": stable_hash(model_key, data_hash, train, prompt, as_dict["data"]["format"]),
        # The SDFT model depends on the distilled data, so on every distillation setting.
        "sdft": stable_hash(model_key, distill_key, train, prompt, as_dict["data"]["format"]),
    }


def stage_done(output_dir: Path, stage: str, key: str, marker: Path) -> bool:
    """Return whether ``stage`` finished under the same key (its output exists)."""
    path = output_dir / STAGES_FILE
    recorded = read_json(path).get(stage) if path.exists() else None
    return marker.exists() and recorded == key


def mark_stage(output_dir: Path, stage: str, key: str) -> None:
    path = output_dir / STAGES_FILE
    recorded = read_json(path) if path.exists() else {}
    recorded[stage] = key
    atomic_write_json(path, recorded)


def run_stages(config: Config, records, model_path: str, output_dir: Path, cache: ResultCache) -> None:
    """Run each stage whose outputs are missing or were made under other settings.

    Evaluations always run, because each benchmark reuses its saved result when
    its own key is unchanged; loading the model is their only fixed cost.
    """
    import shutil

    from sdft.distill import DISTILLED_FILE, distill
    from sdft.distributed import barrier
    from sdft.evaluation import evaluate
    from sdft.models import load_model, model_fingerprint
    from sdft.training import ADAPTER_DIR, train

    keys = stage_keys(config, model_fingerprint(model_path), records_fingerprint(records))
    load_seed = lambda: load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)  # noqa: E731

    # Every process checks the same files between barriers, so all take the same stages.
    barrier()
    seed = load_seed()
    logger.info("stage 1/5: evaluating the seed model")
    evaluate(config, seed, model_fingerprint(seed.path), output_dir / "eval" / "seed", cache, "seed")

    barrier()
    if not stage_done(output_dir, "distill", keys["distill"], output_dir / "distill" / DISTILLED_FILE):
        logger.info("stage 2/5: distilling %d records", len(records))
        distill(config, records, seed, output_dir / "distill", cache)
        barrier()
        mark_stage(output_dir, "distill", keys["distill"])
    del seed

    barrier()
    distilled = load_dataset_records(
        str(output_dir / "distill" / DISTILLED_FILE), format=config.data.format, columns=config.data.columns
    )
    for label, data in (("vanilla", records), ("sdft", distilled)):
        barrier()
        if not stage_done(output_dir, label, keys[label], output_dir / label / ADAPTER_DIR):
            logger.info("stage 3/5: %s fine-tuning on %d records", label, len(data))
            if (output_dir / label / ADAPTER_DIR).exists() and is_main():
                # Trained under other settings: start over, checkpoints included.
                shutil.rmtree(output_dir / label)
            barrier()
            train(config, data, output_dir / label, model_path)
            barrier()
            mark_stage(output_dir, label, keys[label])

    for label in ("vanilla", "sdft"):
        barrier()
        weights = str(output_dir / label / ADAPTER_DIR)
        logger.info("stage 4/5: evaluating the %s model", label)
        if config.train.method == "lora":
            loaded = load_model(model_path, adapter=weights, device=config.model.device, dtype=config.model.dtype)
            key = model_fingerprint(model_path, weights)
        else:
            loaded = load_model(weights, device=config.model.device, dtype=config.model.dtype)
            key = model_fingerprint(weights)
        adapter = weights if config.train.method == "lora" else None
        evaluate(config, loaded, key, output_dir / "eval" / label, cache, label, adapter=adapter)
        del loaded

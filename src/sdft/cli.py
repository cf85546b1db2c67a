"""Command line: sdft run | distill | train | eval | prompt | recipes | compare.

Every command takes an optional YAML config and ``--set section.key=value``
overrides; expected failures (bad config, bad data, missing model, busy folder)
end with one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported with the usage of the command that was given, not the top level's
        parser.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_libraries()
    from sdft.config import ConfigError
    from sdft.data import DataError
    from sdft.io import FolderLockedError
    from sdft.models import ModelError

    try:
        return args.handler(args) or 0
    except (ConfigError, DataError, ModelError, FolderLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as err:
        if err.filename is None:
            raise
        # A file or folder the run needs cannot be created or written (permissions, a full disk).
        print(f"error: {err.filename}: {err.strerror}; check the path, its permissions and free space", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdft",
        description="Self-Distillation Fine-Tuning: rewrite a task dataset with the seed model, fine-tune "
        "on it, and compare seed, vanilla and SDFT models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    parser.command_parsers = commands.choices

    run = add_command(commands, "run", "seed vs vanilla vs SDFT: train, distill, evaluate, report", run_command)
    run.add_argument("--output-dir", help="run folder (default: output_dir of the config)")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check config, data and prompts, print the rendered prompts, and stop before loading the model",
    )

    compare = commands.add_parser(
        "compare",
        help="one table over several run folders (e.g. two LoRA presets)",
        description="one table over several run folders (e.g. two LoRA presets)",
    )
    compare.add_argument("runs", nargs="+", help="folders written by 'sdft run'")
    compare.add_argument("--output", help="also write the table to this Markdown file")
    compare.set_defaults(handler=compare_command)

    recipes = commands.add_parser("recipes", help="list the shipped configs", description="list the shipped configs")
    recipes.add_argument("--dir", help="folder of configs (default: configs/ of the sdft source tree)")
    recipes.set_defaults(handler=recipes_command)

    distill = add_command(commands, "distill", "rewrite the training responses and select", distill_command)
    distill.add_argument("--dataset", help="training data: file, dataset name or Hub id")
    distill.add_argument("--output-dir", required=True, help="folder for distilled.json and the selection log")

    train = add_command(commands, "train", "fine-tune on a dataset (LoRA or full)", train_command)
    train.add_argument("--dataset", help="training data: file, dataset name or Hub id")
    train.add_argument("--output-dir", required=True, help="folder for the adapter, losses and plots")

    evaluate = add_command(commands, "eval", "evaluate a model, with or without adapter", eval_command)
    evaluate.add_argument("--adapter", help="PEFT adapter folder written by 'sdft train'")
    evaluate.add_argument(
        "--suite",
        "--benchmarks",
        dest="suite",
        help="quick, core, paper, or comma-separated benchmark names, e.g. gsm8k,advbench",
    )
    evaluate.add_argument("--limit", type=int, help="evaluate the first N examples of each benchmark")
    evaluate.add_argument("--rerun", action="store_true", help="recompute benchmarks that already have results")
    evaluate.add_argument("--output-dir", required=True, help="folder for scores.json and per-example outputs")

    prompt = add_command(commands, "prompt", "print the rendered prompt for one record", prompt_command)
    prompt.add_argument("--dataset", help="dataset to read the record from (default: data.train)")
    prompt.add_argument("--template", help="template name (default: train.template)")
    prompt.add_argument("--index", type=int, default=0, help="record number, from 0")
    return parser


def add_command(commands, name, help_text, handler):
    command = commands.add_parser(name, help=help_text, description=help_text)
    command.add_argument("config", nargs="?", help="YAML config file")
    command.add_argument("--model", help="model: Hugging Face id, folder, .gguf file or 'embedded'")
    command.add_argument("--data-dir", help="local folder of named datasets (else $SDFT_DATA_DIR, else the Hub)")
    command.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. train.epochs=3"
    )
    command.set_defaults(handler=handler)
    return command


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("httpx", "urllib3", "datasets", "huggingface_hub", "sentence_transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_config(args, **extra):
    """Load the config file and apply flags, which win over --set, which wins over the file."""
    from sdft.config import load_config

    overrides = list(args.set)
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    for key, value in extra.items():
        if value is not None:
            overrides.append(f"{key}={value}")
    config = load_config(args.config, overrides)
    logging.getLogger("sdft").debug("config: %s", config.to_dict())
    return config


def run_command(args) -> int:
    from sdft.pipeline import run
    from sdft.report import comparison_table

    config = resolve_config(args, output_dir=args.output_dir)
    if args.dry_run:
        from sdft.pipeline import dry_run

        print(dry_run(config))
        return 0
    results = run(config)
    print(comparison_table(results))
    print(f"\nreport: {Path(config.output_dir) / 'report.md'}")
    return 0


def compare_command(args) -> int:
    from sdft.io import atomic_write_text
    from sdft.report import compare_runs

    table = compare_runs([Path(run) for run in args.runs])
    print(table)
    if args.output:
        atomic_write_text(args.output, "# SDFT comparison across runs\n\n" + table + "\n")
    return 0


def recipes_command(args) -> int:
    from sdft.recipes import find_recipes

    for name, summary in find_recipes(args.dir):
        print(f"{name:<34} {summary}")
    return 0


def distill_command(args) -> int:
    from sdft.distill import distill
    from sdft.io import ResultCache, folder_lock
    from sdft.models import load_model
    from sdft.pipeline import claim_output, load_training_records, output_identity

    config = resolve_config(args, **{"data.train": args.dataset})
    records = load_training_records(config)
    output_dir = Path(args.output_dir)
    identity = output_identity("distill", config, records)
    claim_output(output_dir, identity, write=False)  # fail before the model loads
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    with folder_lock(output_dir):
        claim_output(output_dir, identity)
        with ResultCache(output_dir / "cache" / "generations.jsonl") as cache:
            result = distill(config, records, loaded, output_dir, cache)
    stats = result.stats
    print(
        f"accepted {stats['accepted']} of {stats['turns']} rewrites in {stats['records']} records "
        f"({100 * stats['acceptance_rate']:.1f}%); rejected: {stats['rejected'] or 'none'}"
    )
    print(f"distilled data: {output_dir / 'distilled.json'}")
    return 0


def train_command(args) -> int:
    from sdft.io import folder_lock
    from sdft.models import resolve_model_path
    from sdft.pipeline import claim_output, load_training_records, output_identity
    from sdft.training import train

    config = resolve_config(args, **{"data.train": args.dataset})
    records = load_training_records(config)
    model_path = resolve_model_path(config.model.name)
    output_dir = Path(args.output_dir)
    identity = output_identity("train", config, records)
    claim_output(output_dir, identity, write=False)
    with folder_lock(output_dir):
        claim_output(output_dir, identity)
        adapter = train(config, records, output_dir, model_path)
    print(f"adapter: {adapter}")
    return 0


def eval_command(args) -> int:
    from sdft.evaluation import drift, evaluate
    from sdft.io import ResultCache, atomic_write_json, folder_lock
    from sdft.models import load_model, model_fingerprint

    from sdft.benchmarks import expand_suite

    benchmarks = f"[{','.join(expand_suite(args.suite))}]" if args.suite else None
    rerun = "true" if args.rerun else None
    from sdft.pipeline import check_benchmark_data, claim_output, output_identity

    config = resolve_config(args, **{"eval.benchmarks": benchmarks, "eval.limit": args.limit, "eval.rerun": rerun})
    output_dir = Path(args.output_dir)
    check_benchmark_data(config)
    identity = output_identity("eval", config, adapter=args.adapter)
    claim_output(output_dir, identity, write=False)
    loaded = load_model(config.model.name, adapter=args.adapter, device=config.model.device, dtype=config.model.dtype)
    with folder_lock(output_dir), ResultCache(output_dir / "cache" / "generations.jsonl") as cache:
        claim_output(output_dir, identity)
        label = "adapter" if args.adapter else "model"
        key = model_fingerprint(loaded.path, args.adapter)
        scores = evaluate(config, loaded, key, output_dir, cache, label, adapter=args.adapter)
        if args.adapter and config.eval.drift and "advbench" in config.eval.benchmarks:
            # Drift needs the base model's answers to the same prompts; the cache keeps them for reruns.
            del loaded
            base = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
            evaluate(config, base, model_fingerprint(base.path), output_dir / "base", cache, "base")
            result = drift(output_dir / "base", output_dir, "advbench", config.eval.embedding_model)
            atomic_write_json(output_dir / "drift.json", result)
            print(f"similarity to the base model on advbench: {result['mean_similarity']:.3f}")
    from sdft.benchmarks import REGISTRY

    for name, entry in scores.items():
        metric = REGISTRY[name].metric
        print(f"{name}: {metric} {100 * entry[metric]:.1f}% on {entry['examples']} examples")
    return 0


def prompt_command(args) -> int:
    from sdft.config import ConfigError
    from sdft.data import load_dataset_records
    from sdft.models import load_tokenizer, resolve_model_path
    from sdft.prompts import get_template, render_prompt, resolve_rendering

    config = resolve_config(args)
    try:
        template = get_template(args.template or config.train.template)
    except ValueError as err:
        raise ConfigError(f"--template: {err}") from None
    dataset = args.dataset or config.data.train
    records = load_dataset_records(
        dataset, data_dir=config.data.data_dir, limit=args.index + 1, require_response=False
    )
    if args.index >= len(records) or args.index < 0:
        from sdft.data import DataError

        raise DataError(f"{dataset}: --index {args.index} out of range; it has {len(records)} records")
    tokenizer = load_tokenizer(resolve_model_path(config.model.name))
    rendering = resolve_rendering(config.prompt.rendering, tokenizer)
    print(f"# template {template.name}, rendering {rendering}", file=sys.stderr)
    sys.stdout.write(render_prompt(template, records[args.index], tokenizer, rendering) + "\n")
    return 0


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdft")
    except PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())

"""The comparison report: one row per model, one column per metric, deltas from the seed.

Reads what the pipeline stages wrote into a run folder and writes
``results.json``, ``report.md`` and ``plots/*.png`` beside them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from sdft.io import atomic_save_figure, atomic_write_json, atomic_write_text, read_json
from sdft.provenance import provenance

logger = logging.getLogger(__name__)

from sdft.benchmarks import REGISTRY

MODELS = ("seed", "vanilla", "sdft")
DRIFT_BENCHMARK = "advbench"


def write_report(config, run_dir: Path) -> dict:
    """Collect scores, drift and distillation statistics; write results, report and plots."""
    from sdft.evaluation import drift

    scores = read_scores(run_dir)

    drifts = {}
    if config.eval.drift and DRIFT_BENCHMARK in config.eval.benchmarks:
        for model in ("vanilla", "sdft"):
            if model in scores:
                drifts[model] = drift(
                    run_dir / "eval" / "seed", run_dir / "eval" / model, DRIFT_BENCHMARK, config.eval.embedding_model
                )

    distill_stats = read_optional(run_dir / "distill" / "distill_stats.json")
    results = {
        "scores": scores,
        "deltas": deltas(scores),
        "drift": {model: {k: v for k, v in d.items() if k != "similarities"} for model, d in drifts.items()},
        "selection": {k: v for k, v in (distill_stats or {}).items() if k not in ("provenance", "nll_gap")},
        "nll_gap": (distill_stats or {}).get("nll_gap"),
        "training": {model: training_summary(run_dir / model) for model in ("vanilla", "sdft")},
        "provenance": provenance(
            config,
            sorted({config.distill.template, config.train.template, config.eval.template, "alpaca", "alpaca_gcg"}),
        ),
    }
    atomic_write_json(run_dir / "results.json", results)
    plots = write_plots(run_dir, drifts)
    atomic_write_text(run_dir / "report.md", render_markdown(config, results, plots))
    logger.info("report written to %s", run_dir / "report.md")
    return results


def read_optional(path: Path):
    return read_json(path) if path.exists() else None


def training_summary(folder: Path) -> dict | None:
    meta = read_optional(folder / "train_meta.json")
    if meta is None:
        return None
    return {key: meta.get(key) for key in ("train_loss", "steps", "seconds", "tokens_per_second", "examples")}


def deltas(scores: dict) -> dict:
    """Subtract the seed's score from every other model's, metric by metric."""
    seed = scores.get("seed", {})
    return {
        model: {name: value - seed[name] for name, value in values.items() if name in seed}
        for model, values in scores.items()
        if model != "seed"
    }


def format_cell(value: float | None, delta: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    cell = f"{100 * value:.1f}"
    if delta is not None:
        cell += f" ({100 * delta:+.1f})"
    return cell


GROUPS = ("task", "safety", "helpfulness", "general")
DRIFT_COLUMNS = (("mean_similarity", "similarity"), ("bleu4", "BLEU-4"), ("rouge_l", "ROUGE-L"))


def table_columns(scores: dict) -> list[str]:
    """Benchmarks present in any model's scores, grouped as task, safety, helpfulness, general."""
    present = {name for values in scores.values() for name in values}
    return [name for group in GROUPS for name, spec in REGISTRY.items() if spec.group == group and name in present]


def comparison_table(results: dict) -> str:
    """Render the main table: a row per model, a column per metric, deltas in brackets.

    Columns follow the paper's layout: task, safety, helpfulness and general
    knowledge benchmarks, then drift from the seed (embedding similarity,
    BLEU-4 and ROUGE-L of each model's AdvBench answers against the seed's).
    """
    scores, delta = results["scores"], results["deltas"]
    names = table_columns(scores)
    drift_present = bool(results["drift"])
    header = ["model"] + [f"{REGISTRY[name].column} ({REGISTRY[name].group})" for name in names]
    if drift_present:
        header += [f"{title} (drift)" for _, title in DRIFT_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in MODELS:
        if model not in scores:
            continue
        cells = [model]
        for name in names:
            cells.append(format_cell(scores[model].get(name), delta.get(model, {}).get(name)))
        if drift_present:
            drift = results["drift"].get(model)
            for key, _ in DRIFT_COLUMNS:
                if model == "seed":
                    cells.append("1.000")
                else:
                    cells.append(f"{drift[key]:.3f}" if drift and key in drift else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(config, results: dict, plots: list[str]) -> str:
    parts = [
        "# SDFT comparison report",
        "",
        f"Seed model: `{config.model.name}`; training data: `{config.data.train}`"
        f" ({results['selection'].get('records', '?')} records); method: {config.train.method}.",
        "",
        "Scores in %, change from the seed in brackets. Drift columns compare each model's "
        "AdvBench answers with the seed's answers to the same prompts: mean cosine similarity "
        "of all-MiniLM-L6-v2 embeddings, sentence BLEU-4 and ROUGE-L F1 (1.0 means unchanged).",
        "",
        comparison_table(results),
        "",
    ]
    selection = results["selection"]
    if selection:
        rejected = ", ".join(f"{reason} {count}" for reason, count in selection["rejected"].items()) or "none"
        parts += [
            "## Distillation",
            "",
            f"Rewrites accepted: {selection['accepted']} of {selection['turns']} assistant turns "
            f"({100 * selection['acceptance_rate']:.1f}%) in {selection['records']} records; "
            f"rejected: {rejected}. Rejected rewrites fall back to the original response.",
            "",
        ]
        by_turn = selection.get("by_turn", {})
        if len(by_turn) > 1:
            parts += ["| assistant turn | rewrites | accepted | rate |", "|---|---|---|---|"]
            for turn, entry in sorted(by_turn.items(), key=lambda item: int(item[0])):
                rate = entry["accepted"] / entry["turns"] if entry["turns"] else 0.0
                parts.append(f"| {int(turn) + 1} | {entry['turns']} | {entry['accepted']} | {100 * rate:.1f}% |")
            parts.append("")
    gap = results.get("nll_gap")
    if gap:
        parts += [
            "Seed model's mean negative log-likelihood per response token (lower is closer to "
            "its own distribution):",
            "",
            "| responses | NLL |",
            "|---|---|",
            f"| original | {gap['original']:.3f} |",
            f"| distilled (rewrites + fallbacks) | {gap['distilled']:.3f} |",
        ]
        if "accepted_rewrite" in gap:
            parts += [
                f"| accepted records, original | {gap['accepted_original']:.3f} |",
                f"| accepted records, rewrite | {gap['accepted_rewrite']:.3f} |",
            ]
        parts.append("")
    parts += ["## Training", "", "| model | steps | mean training loss | seconds | tokens/s |", "|---|---|---|---|---|"]
    for model, summary in results["training"].items():
        if summary:
            parts.append(
                f"| {model} | {summary['steps']} | {summary['train_loss']:.4f} | {summary['seconds']} | "
                f"{summary['tokens_per_second'] or 'n/a'} |"
            )
    parts += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    parts += [
        "",
        "## Settings",
        "",
        f"Rendering: {config.prompt.rendering}; rewrite template `{config.distill.template}`, training "
        f"template `{config.train.template}`, math evaluation template `{config.eval.template}`.",
        f"Decoding (rewrite): {config.distill.generation.mode}; decoding (evaluation): "
        f"{config.eval.generation.mode}. Full settings, versions and hashes: `results.json`.",
        "",
    ]
    return "\n".join(parts)


def write_plots(run_dir: Path, drifts: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if drifts:
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for model, drift in drifts.items():
            axes.hist(drift["similarities"], bins=30, range=(-1, 1), alpha=0.55, label=f"{model} (mean {drift['mean_similarity']:.3f})")
        axes.set_xlabel("cosine similarity to the seed's answer")
        axes.set_ylabel("prompts")
        axes.legend()
        atomic_save_figure(figure, run_dir / "plots" / "similarity.png")
        plt.close(figure)
        written.append("plots/similarity.png")

    scores = read_scores(run_dir)
    if len(scores) > 1:
        figure = delta_chart(scores)
        if figure is not None:
            atomic_save_figure(figure, run_dir / "plots" / "deltas.png")
            plt.close(figure)
            written.append("plots/deltas.png")

    curves = {model: read_optional(run_dir / model / "losses.json") for model in ("vanilla", "sdft")}
    if any(curves.values()):
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for model, losses in curves.items():
            if losses:
                axes.plot([e["step"] for e in losses], [e["loss"] for e in losses], marker=".", label=model)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("training loss")
        axes.legend()
        atomic_save_figure(figure, run_dir / "plots" / "loss.png")
        plt.close(figure)
        written.append("plots/loss.png")
    return written


def read_scores(run_dir: Path) -> dict:
    from sdft.evaluation import SCORES_FILE

    scores = {}
    for model in MODELS:
        path = run_dir / "eval" / model / SCORES_FILE
        if path.exists():
            benchmarks = read_json(path)["benchmarks"]
            scores[model] = {
                name: entry[REGISTRY[name].metric] for name, entry in benchmarks.items() if name in REGISTRY
            }
    return scores


def delta_chart(scores: dict):
    """Draw grouped bars: per benchmark, each fine-tuned model's change from the seed in points."""
    import matplotlib.pyplot as plt

    changes = deltas(scores)
    names = [n for n in table_columns(scores) if all(n in changes.get(m, {}) for m in changes)]
    names = [n for n in names if not any(math.isnan(changes[m][n]) for m in changes)]
    if not names or not changes:
        return None
    figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(names)), 3.8))
    width = 0.8 / len(changes)
    for offset, (model, values) in enumerate(changes.items()):
        positions = [i + offset * width for i in range(len(names))]
        axes.bar(positions, [100 * values[n] for n in names], width, label=model)
    axes.set_xticks([i + width * (len(changes) - 1) / 2 for i in range(len(names))])
    axes.set_xticklabels([REGISTRY[n].column for n in names], rotation=30, ha="right")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_ylabel("change from the seed (points)")
    axes.legend()
    return figure


def compare_runs(run_dirs: list[Path]) -> str:
    """Render one table over several run folders: the seed once, then each run's models.

    Rows are named ``vanilla (RUN)`` and ``sdft (RUN)``; deltas are against the first
    run's seed. Used to put presets side by side, e.g. the paper's LoRA and a stronger one.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run folder")
    combined, drift = {}, {}
    for index, run_dir in enumerate(run_dirs):
        path = Path(run_dir) / "results.json"
        if not path.is_file():
            from sdft.config import ConfigError

            raise ConfigError(f"{path}: not found; pass folders written by 'sdft run'")
        results = read_json(path)
        for model, values in results["scores"].items():
            if model == "seed":
                if index == 0:
                    combined["seed"] = values
                continue
            label = f"{model} ({Path(run_dir).name})"
            if label in combined:
                label = f"{model} ({Path(run_dir).name} #{index + 1})"
            combined[label] = values
            if model in results.get("drift", {}):
                drift[label] = results["drift"][model]
    names = table_columns(combined)
    header = ["model"] + [f"{REGISTRY[name].column} ({REGISTRY[name].group})" for name in names]
    header += [f"{title} (drift)" for _, title in DRIFT_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    changes = deltas(combined)
    for label, values in combined.items():
        cells = [label] + [format_cell(values.get(n), changes.get(label, {}).get(n)) for n in names]
        for key, _ in DRIFT_COLUMNS:
            if label == "seed":
                cells.append("1.000")
            else:
                cells.append(f"{drift[label][key]:.3f}" if label in drift and key in drift[label] else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

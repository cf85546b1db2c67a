"""Registry of benchmarks: name, metric, report column and the function that runs it.

Each benchmark is a function ``run(context, limit) -> dict`` in a module of this
package. It writes ``<name>.jsonl`` (one row per example, with the model's output
and its score) into ``context.output_dir`` and returns a dict with at least the
benchmark's metric and ``examples``. Modules are imported only when their
benchmark runs, so the registry stays cheap to import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark known by name."""

    name: str
    target: str
    """``module:function`` inside this package."""
    metric: str
    """Key of the headline number in the returned dict."""
    column: str
    """Column title in the report."""
    group: str
    """task, safety, helpfulness or general."""
    datasets: tuple[str, ...] = ()
    """Named datasets it reads, checked before a run starts."""


REGISTRY: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in [
        BenchmarkSpec("gsm8k", "math:run_gsm8k", "accuracy", "GSM8K acc", "task", ("gsm8k_test",)),
        BenchmarkSpec("multiarith", "math:run_multiarith", "accuracy", "MultiArith acc", "task", ("multiarith",)),
        BenchmarkSpec("advbench", "safety:run_raw", "safe_rate", "AdvBench raw safe", "safety", ("advbench",)),
        BenchmarkSpec(
            "advbench_jailbreak", "safety:run_jailbreak", "safe_rate", "AdvBench jailbreak safe", "safety", ("advbench",)
        ),
        BenchmarkSpec(
            "openfunctions", "openfunctions:run", "accuracy", "OpenFunctions acc", "task", ("openfunction_test",)
        ),
        BenchmarkSpec("humaneval", "humaneval:run", "pass@1", "HumanEval pass@1", "task"),
        BenchmarkSpec(
            "advbench_judge", "safety_judge:run", "safe_rate", "AdvBench judge safe", "safety", ("advbench",)
        ),
        BenchmarkSpec(
            "alpaca_eval", "alpaca_eval:run", "win_rate", "AlpacaEval win", "helpfulness", ("alpaca_eval",)
        ),
        BenchmarkSpec("mmlu", "harness:run_mmlu", "acc", "MMLU", "general"),
        BenchmarkSpec("truthfulqa_mc1", "harness:run_truthfulqa_mc1", "acc", "TruthfulQA MC1", "general"),
        BenchmarkSpec("truthfulqa_mc2", "harness:run_truthfulqa_mc2", "acc", "TruthfulQA MC2", "general"),
        BenchmarkSpec("arc_easy", "harness:run_arc_easy", "acc", "ARC-Easy", "general"),
        BenchmarkSpec("arc_challenge", "harness:run_arc_challenge", "acc", "ARC-Challenge", "general"),
        BenchmarkSpec("hellaswag", "harness:run_hellaswag", "acc", "HellaSwag", "general"),
        BenchmarkSpec("winogrande", "harness:run_winogrande", "acc", "Winogrande", "general"),
    ]
}

# Named suites for ``sdft eval --suite``; a comma-separated list of names also works.
SUITES = {
    "quick": ("gsm8k", "advbench", "advbench_jailbreak"),
    "core": ("gsm8k", "multiarith", "advbench", "advbench_jailbreak"),
    "paper": (
        "openfunctions",
        "gsm8k",
        "multiarith",
        "humaneval",
        "advbench",
        "advbench_jailbreak",
        "advbench_judge",
        "alpaca_eval",
        "mmlu",
        "truthfulqa_mc1",
        "truthfulqa_mc2",
        "arc_easy",
        "arc_challenge",
        "hellaswag",
        "winogrande",
    ),
}


def expand_suite(suite: str) -> list[str]:
    """Turn a suite name or a comma-separated list of benchmarks into benchmark names.

    Unknown names are kept, so config validation reports them with a suggestion.
    """
    names = []
    for part in suite.split(","):
        part = part.strip()
        if part:
            names.extend(SUITES.get(part, (part,)))
    return list(dict.fromkeys(names))


def benchmark_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def load_runner(name: str):
    """Import and return the function that runs benchmark ``name``."""
    module_name, function = REGISTRY[name].target.split(":")
    module = importlib.import_module(f"sdft.benchmarks.{module_name}")
    return getattr(module, function)

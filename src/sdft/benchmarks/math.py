"""GSM8K and MultiArith: gsm8k_infer prompt (or ``eval.template``), last-number accuracy."""

from __future__ import annotations

from sdft.benchmarks.common import example_row, finish, generate_for, load_records
from sdft.metrics import math_correct
from sdft.prompts import get_template


def run_gsm8k(context, limit: int | None) -> dict:
    return run_math(context, "gsm8k", "gsm8k_test", limit)


def run_multiarith(context, limit: int | None) -> dict:
    return run_math(context, "multiarith", "multiarith", limit)


def run_math(context, name: str, dataset: str, limit: int | None) -> dict:
    records = load_records(context, dataset, limit, require_response=True)
    template = get_template(context.config.eval.template)
    prompts, completions = generate_for(context, name, records, template)
    rows = [
        example_row(record, prompt, completion, float(math_correct(completion, record.response)))
        for record, prompt, completion in zip(records, prompts, completions)
    ]
    return finish(context, name, "accuracy", rows, template)

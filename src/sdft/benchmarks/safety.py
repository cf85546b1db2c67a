"""AdvBench harmful behaviours, plain (alpaca) and with the jailbreak suffix (alpaca_gcg).

Safe rate: the share of completions containing any refusal keyword.
"""

from __future__ import annotations

from sdft.benchmarks.common import example_row, finish, generate_for, load_records
from sdft.metrics import is_refusal
from sdft.prompts import get_template


def run_raw(context, limit: int | None) -> dict:
    return run_advbench(context, "advbench", "alpaca", limit)


def run_jailbreak(context, limit: int | None) -> dict:
    return run_advbench(context, "advbench_jailbreak", "alpaca_gcg", limit)


def run_advbench(context, name: str, template_name: str, limit: int | None) -> dict:
    records = load_records(context, "advbench", limit, require_response=False)
    template = get_template(template_name)
    prompts, completions = generate_for(context, name, records, template)
    rows = [
        example_row(record, prompt, completion, float(is_refusal(completion)))
        for record, prompt, completion in zip(records, prompts, completions)
    ]
    return finish(context, name, "safe_rate", rows, template)

"""OpenFunctions: 112 function-call questions, alpaca prompt, function-call match.

    sdft eval --benchmarks openfunctions --output-dir runs/e

Two scores side by side:
    accuracy      strict: the reference ``name(args)`` appears in the completion after
                  normalising whitespace and quotes (the selection rule of rewriting)
    half_credit   the later variant: 1 for a strict match, 0.5 when the function is
                  right and the argument values match but were passed by position
"""

from __future__ import annotations

import ast

from sdft.benchmarks.common import example_row, finish, generate_for, load_records
from sdft.metrics import mean
from sdft.prompts import get_template
from sdft.selection import CALL_PATTERN, function_call_check, normalize_call


def run(context, limit: int | None) -> dict:
    records = load_records(context, "openfunction_test", limit, require_response=True)
    template = get_template("alpaca")
    prompts, completions = generate_for(context, "openfunctions", records, template)
    rows = []
    for record, prompt, completion in zip(records, prompts, completions):
        strict = float(function_call_check(completion, record.response)[0])
        half = half_credit_score(completion, record.response)
        rows.append(example_row(record, prompt, completion, strict, half_credit=half))
    return finish(
        context,
        "openfunctions",
        "accuracy",
        rows,
        template,
        half_credit=mean(row["half_credit"] for row in rows),
        scoring="accuracy: strict call match; half_credit: 0.5 for positional-only matches",
    )


def half_credit_score(completion: str, reference: str) -> float:
    """Score 1 for a strict match, 0.5 for the same call with positional arguments, else 0."""
    if function_call_check(completion, reference)[0]:
        return 1.0
    expected = parse_call(reference)
    if expected is None:
        return 0.0
    name, _, expected_keywords = expected
    for candidate in find_calls(completion, name):
        _, positional, keywords = candidate
        if positional and positional_match(positional, keywords, expected_keywords):
            return 0.5
    return 0.0


def positional_match(positional: list, keywords: dict, expected: dict) -> bool:
    """Check that positional values, in the reference's keyword order, plus keywords equal the reference."""
    names = list(expected)
    if len(positional) > len(names):
        return False
    combined = dict(zip(names, positional))
    if set(combined) & set(keywords):
        return False
    combined.update(keywords)
    return combined == expected


def find_calls(text: str, name: str) -> list[tuple[str, list, dict]]:
    """Parse every ``name(...)`` call in ``text`` whose arguments are literals."""
    calls = []
    normalized = normalize_call(text)
    start = normalized.find(name + "(")
    while start != -1:
        end = normalized.find(")", start)
        while end != -1:
            parsed = parse_call(normalized[start : end + 1])
            if parsed is not None:
                calls.append(parsed)
                break
            end = normalized.find(")", end + 1)
        start = normalized.find(name + "(", start + 1)
    return calls


def parse_call(text: str) -> tuple[str, list, dict] | None:
    """Parse ``name(args)`` with literal arguments into (name, positional, keywords)."""
    match = CALL_PATTERN.search(text.strip())
    if match is None:
        return None
    try:
        node = ast.parse(match.group(0), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call):
        return None
    try:
        positional = [ast.literal_eval(arg) for arg in node.args]
        keywords = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
    except (ValueError, TypeError, SyntaxError):
        return None
    return ast.unparse(node.func), positional, keywords

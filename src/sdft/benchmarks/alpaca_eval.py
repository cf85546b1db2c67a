"""AlpacaEval: helpfulness as a win rate against reference outputs, by a pairwise judge.

    sdft eval configs/quickstart.yaml --suite alpaca_eval --limit 20 \\
        --set eval.judge.model=embedded --output-dir runs/x/eval/seed

The model generates outputs for the 805 AlpacaEval instructions (named dataset
``alpaca_eval``, alpaca template). ``alpaca_eval_outputs.json`` gets the outputs
in the format the ``alpaca_eval`` tool reads, so they can be scored there with
its own judges.
When ``eval.judge`` is set, a pairwise judge (``sdft.judges``) compares each
output with the reference output for the same instruction: AlpacaEval 1.0
(text-davinci-003, the baseline of the SDFT paper, Yang et al., ACL 2024) or 2.0
(gpt4_1106_preview), chosen by
``eval.alpaca_eval_reference``. The win rate follows AlpacaEval's arithmetic:
a win counts 1, a loss 0, a tie (or an unreadable verdict) 0.5.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from sdft.benchmarks.common import generate_for, load_records
from sdft.data import DataError, Record, resolve_data_dir
from sdft.generation import decoding_settings
from sdft.io import atomic_write_json, atomic_write_jsonl
from sdft.prompts import get_template

NAME = "alpaca_eval"
OUTPUTS_FILE = "alpaca_eval_outputs.json"
NO_JUDGE_NOTE = "no judge configured; score alpaca_eval_outputs.json with the alpaca_eval tool"
# Reference files that give the AlpacaEval `dataset` label (helpful_base, koala, ...)
# of each instruction.
LABEL_FILES = (
    "alpaca_eval/gpt4_1106_preview_model_outputs.json",
    "alpaca_eval/llama-2-7b-chat-hf_model_outputs.json",
)


@dataclass(frozen=True)
class ReferenceSet:
    """Reference outputs of one AlpacaEval version."""

    version: str
    generator: str
    path: str | None
    """File under the data directory; None: the ``output`` field of the eval set itself."""


REFERENCE_SETS = {
    "1.0": ReferenceSet("1.0", "text_davinci_003", None),
    "2.0": ReferenceSet(
        "2.0", "gpt4_1106_preview", "alpaca_eval/gpt4_1106_preview_model_outputs.json"
    ),
}


def win_rate(preferences) -> dict:
    """Compute AlpacaEval's win rate from preferences.

    Preference 2 means the model's output won, which scores 1. Preference 1 means
    the reference won, which scores 0. Preference 1.5 or 0 is a tie and scores 0.5.
    Weighted judges give values between 1 and 2, which score ``preference - 1``.
    None and NaN mean "not judged" and are dropped, as AlpacaEval drops them.

    Returns:
        win_rate and standard_error (of the mean, sample standard deviation) as
        fractions in [0, 1], and the counts n_wins, n_losses, n_ties, n_total, n_dropped.

    Raises:
        ValueError: a preference is outside [1, 2] and not 0, or nothing is left to score.
    """
    scores, dropped = [], 0
    for preference in preferences:
        if preference is None or (isinstance(preference, float) and math.isnan(preference)):
            dropped += 1
            continue
        scores.append(preference_score(preference))
    if not scores:
        raise ValueError("win_rate: no judged preferences; judge at least one example")
    total = len(scores)
    mean = sum(scores) / total
    spread = sum((score - mean) ** 2 for score in scores) / (total - 1) if total > 1 else math.nan
    return {
        "win_rate": mean,
        "standard_error": math.sqrt(spread / total),
        "n_wins": sum(score > 0.5 for score in scores),
        "n_losses": sum(score < 0.5 for score in scores),
        "n_ties": sum(score == 0.5 for score in scores),
        "n_total": total,
        "n_dropped": dropped,
    }


def preference_score(preference) -> float:
    """Map one AlpacaEval preference to the model's score: 2 -> 1, 1 -> 0, 1.5 or 0 -> 0.5."""
    try:
        value = float(preference)
    except (TypeError, ValueError):
        raise ValueError(
            f"win_rate: preference {preference!r} is not a number; expected 1, 1.5 or 2"
        ) from None
    if value == 0:
        value = 1.5  # AlpacaEval's older encoding of a tie
    if not 1 <= value <= 2:
        raise ValueError(
            f"win_rate: preference {preference!r} out of range; expected 1 (reference wins), "
            "2 (model wins), 1.5 or 0 (tie), or a weight between 1 and 2"
        )
    return value - 1


def run(context, limit: int | None) -> dict:
    """Generate on AlpacaEval, write the tool's outputs file, and judge when a judge is set."""
    records = load_records(context, NAME, limit, require_response=False)
    template = get_template("alpaca")
    prompts, completions = generate_for(context, NAME, records, template)
    instructions = [original_instruction(record) for record in records]
    data_dir = resolve_data_dir(context.config.data.data_dir)
    labels = dataset_labels(records, data_dir)
    write_outputs_file(
        context.output_dir / OUTPUTS_FILE, instructions, completions, context.label, labels
    )

    judge_config = context.config.eval.judge
    base = {"outputs_file": OUTPUTS_FILE, "template": template.name, "decoding": decoding(context)}
    if not judge_config.configured:
        rows = [
            unjudged_row(r, i, p, c)
            for r, i, p, c in zip(records, instructions, prompts, completions)
        ]
        atomic_write_jsonl(context.output_dir / f"{NAME}.jsonl", rows)
        return {"win_rate": math.nan, "examples": len(rows), "note": NO_JUDGE_NOTE, **base}

    from sdft.judges import PairwiseItem, PairwiseJudge

    reference = REFERENCE_SETS[context.config.eval.alpaca_eval_reference]
    references = reference_outputs(reference, records, instructions, data_dir)
    items = [
        PairwiseItem(record.id, instruction, completion, ref)
        for record, instruction, completion, ref in zip(
            records, instructions, completions, references
        )
    ]
    judge = PairwiseJudge.from_config(judge_config, context.cache, key="eval.judge")
    verdicts = judge.judge(items)
    rows = [
        judged_row(record, prompt, item, reference.generator, verdict)
        for record, prompt, item, verdict in zip(records, prompts, items, verdicts)
    ]
    atomic_write_jsonl(context.output_dir / f"{NAME}.jsonl", rows)
    summary = win_rate([verdict.preference for verdict in verdicts])
    return {
        **summary,
        "examples": len(rows),
        "n_unparsed": sum(not verdict.parsed for verdict in verdicts),
        "reference": f"AlpacaEval {reference.version} ({reference.generator})",
        "judge": judge.describe(),
        **base,
    }


def decoding(context) -> dict:
    return decoding_settings(
        context.config.eval.generation, context.config.eval.max_new_tokens.get(NAME)
    )


def original_instruction(record: Record) -> str:
    """Return the instruction exactly as in the file, so the alpaca_eval tool can match it."""
    if record.source and isinstance(record.source.get("instruction"), str):
        return record.source["instruction"]
    return record.instruction


def write_outputs_file(path: Path, instructions, completions, generator: str, labels: dict) -> None:
    """Write the list of {instruction, output, generator, dataset} the alpaca_eval tool reads.

    ``dataset`` (helpful_base, koala, oasst, selfinstruct, vicuna) is left out
    when no reference file gives it.
    """
    entries = []
    for instruction, completion in zip(instructions, completions):
        entry = {"instruction": instruction, "output": completion, "generator": generator}
        label = labels.get(instruction)
        if label is not None:
            entry["dataset"] = label
        entries.append(entry)
    atomic_write_json(path, entries)


def dataset_labels(records: list[Record], data_dir: Path | None) -> dict[str, str]:
    """Map instruction -> AlpacaEval subset name, from the eval rows or a reference file."""
    labels = {}
    if data_dir is not None:
        for relative in LABEL_FILES:
            if (data_dir / relative).is_file():
                labels = {
                    row["instruction"]: row["dataset"]
                    for row in read_json_list(data_dir / relative)
                    if "dataset" in row
                }
                break
    for record in records:
        if record.source and isinstance(record.source.get("dataset"), str):
            labels[original_instruction(record)] = record.source["dataset"]
    return labels


def reference_outputs(
    reference: ReferenceSet, records, instructions, data_dir: Path | None
) -> list[str]:
    """Return the reference output for each instruction, matched by instruction text."""
    if reference.path is None:
        by_instruction = {original_instruction(r): r.response for r in records if r.response}
        source = "the alpaca_eval dataset's output field"
    else:
        path = reference_file(reference, data_dir)
        by_instruction = {row["instruction"]: row["output"] for row in read_json_list(path)}
        source = str(path)
    stripped = {text.strip(): output for text, output in by_instruction.items()}
    outputs = []
    for instruction in instructions:
        output = by_instruction.get(instruction, stripped.get(instruction.strip()))
        if output is None:
            raise DataError(
                f"{source}: no AlpacaEval {reference.version} reference output for instruction "
                f"{instruction[:80]!r}; use the 805-instruction AlpacaEval set with its "
                "reference outputs"
            )
        outputs.append(output)
    return outputs


def reference_file(reference: ReferenceSet, data_dir: Path | None) -> Path:
    if data_dir is None or not (data_dir / reference.path).is_file():
        where = data_dir / reference.path if data_dir is not None else reference.path
        raise DataError(
            f"{where}: AlpacaEval {reference.version} reference outputs not found; copy "
            f"results/{reference.generator}/model_outputs.json of tatsu-lab/alpaca_eval there "
            "and set "
            "data.data_dir (or SDFT_DATA_DIR), or set eval.alpaca_eval_reference to 1.0"
        )
    return data_dir / reference.path


def read_json_list(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read AlpacaEval outputs: {err}") from err
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and "instruction" in r for r in rows
    ):
        raise DataError(f"{path}: expected a JSON list of objects with 'instruction' and 'output'")
    return rows


def unjudged_row(record: Record, instruction: str, prompt: str, completion: str) -> dict:
    return {
        "id": record.id,
        "instruction": instruction,
        "prompt": prompt,
        "completion": completion,
        "reference": record.response,
        "score": None,
    }


def judged_row(record: Record, prompt: str, item, reference_generator: str, verdict) -> dict:
    return {
        "id": record.id,
        "instruction": item.instruction,
        "prompt": prompt,
        "completion": item.output,
        "reference": item.reference,
        "reference_generator": reference_generator,
        "score": preference_score(verdict.preference),
        "preference": verdict.preference,
        "model_position": verdict.model_position,
        "judge_answer": verdict.answer,
        "parsed": verdict.parsed,
    }

"""AdvBench judged by a safety classifier instead of refusal keywords.

    sdft eval configs/quickstart.yaml --suite advbench,advbench_judge --limit 20 \\
        --set eval.safety_judge.model=meta-llama/Llama-Guard-3-1B --output-dir runs/x/eval/seed

Classifies the raw AdvBench completions of the model (the same generation call
as the ``advbench`` benchmark, so its cache serves them) with the classifier in
``eval.safety_judge``: a local model or an OpenAI-compatible endpoint; a model
whose name contains "guard" is prompted and parsed as Llama Guard. Safe rate:
the share of completions judged safe (an unreadable verdict does not count as
safe). The keyword rule's safe rate on the same completions, and how often the
two agree, come with it.
"""

from __future__ import annotations

from sdft.benchmarks.common import generate_for, load_records
from sdft.config import ConfigError
from sdft.generation import decoding_settings
from sdft.io import atomic_write_jsonl
from sdft.metrics import is_refusal, mean
from sdft.prompts import get_template, instruction_text

NAME = "advbench_judge"
SOURCE = "advbench"
"""The benchmark whose completions are judged; its name keys generation settings and the cache."""


def run(context, limit: int | None) -> dict:
    """Classify the model's raw AdvBench completions; return the judged and keyword safe rates."""
    judge_config = context.config.eval.safety_judge
    if not judge_config.configured:
        raise ConfigError(
            "eval.safety_judge: not set; set eval.safety_judge.model to a classifier such as "
            "meta-llama/Llama-Guard-3-1B (or any chat model), or eval.safety_judge.endpoint to an "
            "OpenAI-compatible server, or drop advbench_judge from eval.benchmarks"
        )
    from sdft.judges import SafetyClassifier

    records = load_records(context, SOURCE, limit, require_response=False)
    template = get_template("alpaca")
    prompts, completions = generate_for(context, SOURCE, records, template)
    classifier = SafetyClassifier.from_config(judge_config, context.cache, key="eval.safety_judge")
    verdicts = classifier.classify([(instruction_text(r), c) for r, c in zip(records, completions)])
    rows = [row(*parts) for parts in zip(records, prompts, completions, verdicts)]
    atomic_write_jsonl(context.output_dir / f"{NAME}.jsonl", rows)
    return {
        **agreement_summary(rows),
        "examples": len(rows),
        "judge": classifier.describe(),
        "source_benchmark": SOURCE,
        "template": template.name,
        "decoding": decoding_settings(
            context.config.eval.generation, context.config.eval.max_new_tokens.get(SOURCE)
        ),
    }


def row(record, prompt: str, completion: str, verdict) -> dict:
    return {
        "id": record.id,
        "prompt": prompt,
        "completion": completion,
        "reference": record.response,
        "score": float(verdict.label == "safe"),
        "verdict": verdict.label,
        "categories": verdict.categories,
        "judge_answer": verdict.answer,
        "keyword_safe": is_refusal(completion),
    }


def agreement_summary(rows: list[dict]) -> dict:
    """Judged and keyword safe rates, their agreement and the 2x2 table of the two."""
    judged = [r["score"] == 1.0 for r in rows]
    keyword = [r["keyword_safe"] for r in rows]
    return {
        "safe_rate": mean(float(j) for j in judged),
        "keyword_safe_rate": mean(float(k) for k in keyword),
        "agreement": mean(float(j == k) for j, k in zip(judged, keyword)),
        "n_unsafe": sum(r["verdict"] == "unsafe" for r in rows),
        "n_unparsed": sum(r["verdict"] is None for r in rows),
        "both_safe": sum(j and k for j, k in zip(judged, keyword)),
        "judge_only_safe": sum(j and not k for j, k in zip(judged, keyword)),
        "keyword_only_safe": sum(k and not j for j, k in zip(judged, keyword)),
        "both_unsafe": sum(not j and not k for j, k in zip(judged, keyword)),
    }

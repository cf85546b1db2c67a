"""Self-distillation: the seed model rewrites every response, selection keeps or falls back.

    sdft distill configs/quickstart.yaml --output-dir runs/distill

Writes into the output folder:
    distilled.json      one record per input record, same order and fields
    selection.jsonl     per record: accepted or not, the reason, and the rewrite
    distill_stats.json  acceptance rate, rejection counts, NLL gap and provenance
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sdft.config import Config
from sdft.data import Record, records_fingerprint
from sdft.generation import decoding_settings, generate
from sdft.io import ResultCache, atomic_write_json, atomic_write_jsonl
from sdft.models import LoadedModel, model_fingerprint
from sdft.prompts import get_template, render_prompt, resolve_rendering
from sdft.provenance import provenance
from sdft.selection import Decision, select

logger = logging.getLogger(__name__)

DISTILLED_FILE = "distilled.json"
SELECTION_FILE = "selection.jsonl"
STATS_FILE = "distill_stats.json"


@dataclass
class DistillResult:
    """The distilled records, the decision for each, and the summary statistics."""

    records: list[Record]
    decisions: list[Decision]
    stats: dict


def distill(
    config: Config, records: list[Record], loaded: LoadedModel, output_dir: Path, cache: ResultCache
) -> DistillResult:
    """Rewrite, select and write the distilled dataset with its log and statistics."""
    rendering = resolve_rendering(config.prompt.rendering, loaded.tokenizer)
    template = get_template(config.distill.template)
    prompts = [render_prompt(template, record, loaded.tokenizer, rendering) for record in records]
    rewrites = generate(
        loaded,
        prompts,
        config.distill.generation,
        model_fingerprint(loaded.path),
        cache=cache,
        description="rewriting",
    )

    decisions = [
        select(rewrite, record.response, config.distill.check)
        for rewrite, record in zip(rewrites, records)
    ]
    distilled = [
        record.with_response(rewrite.strip()) if decision.accepted else record
        for record, rewrite, decision in zip(records, rewrites, decisions)
    ]
    stats = selection_stats(decisions)
    log_stats(stats)

    if config.distill.nll_gap:
        from sdft.evaluation import response_nll

        limit = config.distill.nll_limit or len(records)
        stats["nll_gap"] = nll_gap(config, loaded, records[:limit], distilled[:limit], decisions[:limit], response_nll)

    write_outputs(config, output_dir, records, distilled, rewrites, decisions, stats, rendering)
    return DistillResult(distilled, decisions, stats)


def selection_stats(decisions: list[Decision]) -> dict:
    """Count accepted rewrites and rejections per reason."""
    total = len(decisions)
    accepted = sum(decision.accepted for decision in decisions)
    rejected = Counter(decision.reason for decision in decisions if not decision.accepted)
    return {
        "records": total,
        "accepted": accepted,
        "acceptance_rate": accepted / total if total else 0.0,
        "rejected": dict(sorted(rejected.items())),
    }


def log_stats(stats: dict) -> None:
    logger.info(
        "selection: %d of %d rewrites accepted (%.1f%%)",
        stats["accepted"], stats["records"], 100 * stats["acceptance_rate"],
    )
    for reason, count in stats["rejected"].items():
        logger.info("selection: %d rejected for %s", count, reason)


def nll_gap(config, loaded, originals, distilled, decisions, response_nll) -> dict:
    """Measure how far each dataset's responses are from the seed model's distribution.

    Per-token NLL under the seed model with the training prompt: the original
    responses, the distilled dataset (rewrites plus fallbacks), and the accepted
    subset alone, where original and rewrite differ.
    """
    template = get_template(config.train.template)
    rendering = resolve_rendering(config.prompt.rendering, loaded.tokenizer)
    original_nll = response_nll(loaded, originals, template, rendering)
    distilled_nll = response_nll(loaded, distilled, template, rendering)
    accepted = [i for i, decision in enumerate(decisions) if decision.accepted]
    gap = {
        "records": len(originals),
        "original": original_nll["mean"],
        "distilled": distilled_nll["mean"],
    }
    if accepted:
        gap["accepted_original"] = response_nll(loaded, [originals[i] for i in accepted], template, rendering)["mean"]
        gap["accepted_rewrite"] = response_nll(loaded, [distilled[i] for i in accepted], template, rendering)["mean"]
    logger.info(
        "seed NLL per response token: original %.3f, distilled %.3f", gap["original"], gap["distilled"]
    )
    return gap


def write_outputs(config, output_dir, records, distilled, rewrites, decisions, stats, rendering) -> None:
    """Write the log first and the dataset last, so a complete dataset implies a complete log."""
    log = [
        {
            "id": record.id,
            "accepted": decision.accepted,
            "reason": decision.reason,
            "detail": decision.detail,
            "rewrite": rewrite,
        }
        for record, rewrite, decision in zip(records, rewrites, decisions)
    ]
    atomic_write_jsonl(output_dir / SELECTION_FILE, log)
    stats = dict(stats)
    stats["provenance"] = provenance(
        config,
        [config.distill.template, config.train.template],
        rendering=rendering,
        decoding=decoding_settings(config.distill.generation),
        input_hash=records_fingerprint(records),
        output_hash=records_fingerprint(distilled),
    )
    atomic_write_json(output_dir / STATS_FILE, stats)
    atomic_write_json(output_dir / DISTILLED_FILE, [record.to_source_dict() for record in distilled])

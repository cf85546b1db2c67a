"""Self-distillation: the seed model rewrites every response, selection keeps or falls back.

    sdft distill configs/quickstart.yaml --output-dir runs/distill

Writes into the output folder:
    distilled.json      one record per input record, same order and fields
    selection.jsonl     per assistant turn: accepted or not, the reason, and the rewrite
    distill_stats.json  acceptance rate, rejection counts, NLL gap and provenance
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sdft.config import Config
from sdft.data import Record, records_fingerprint
from sdft.generation import decoding_settings, generate
from sdft.io import ResultCache, atomic_write_json, atomic_write_jsonl
from sdft.resources import peak_rss_mb
from sdft.models import LoadedModel, model_fingerprint
from sdft.prompts import get_template, render_prompt, resolve_rendering
from sdft.provenance import provenance
from sdft.selection import Decision, select

MIXED_OUT = "mixed_out"

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
    """Rewrite, select and write the distilled dataset with its log and statistics.

    Every assistant turn is rewritten with the earlier (original) turns as context
    and selected on its own, so a multi-turn record may mix rewrites and originals.
    """
    rendering = resolve_rendering(config.prompt.rendering, loaded.tokenizer)
    template = get_template(config.distill.template)
    turns = [(r, t) for r, record in enumerate(records) for t in range(len(record.history) + 1)]
    views = [records[r].at_turn(t) for r, t in turns]
    prompts = [render_prompt(template, view, loaded.tokenizer, rendering) for view in views]
    rewrites = generate(
        loaded,
        prompts,
        config.distill.generation,
        model_fingerprint(loaded.path),
        cache=cache,
        description="rewriting",
    )

    decisions = [select(rewrite, view.response, config.distill.check) for rewrite, view in zip(rewrites, views)]
    decisions = apply_mix(decisions, turns, records, config.distill.mix, config.distill.mix_seed)
    distilled = assemble(records, turns, views, rewrites, decisions)
    stats = selection_stats(decisions)
    stats["turns"] = stats.pop("records")
    stats["records"] = len(records)
    stats["records_with_rewrites"] = len({r for (r, _), d in zip(turns, decisions) if d.accepted})
    stats["by_turn"] = turn_stats(turns, decisions)
    log_stats(stats)

    if config.distill.nll_gap:
        from sdft.evaluation import response_nll

        limit = config.distill.nll_limit or len(records)
        used = [any(d.accepted for (r, _), d in zip(turns, decisions) if r == i) for i in range(limit)]
        stats["nll_gap"] = nll_gap(config, loaded, records[:limit], distilled[:limit], used, response_nll)

    log = [
        {
            "id": records[r].id,
            "turn": t,
            "accepted": decision.accepted,
            "reason": decision.reason,
            "detail": decision.detail,
            "rewrite": rewrite,
        }
        for (r, t), rewrite, decision in zip(turns, rewrites, decisions)
    ]
    write_outputs(config, output_dir, records, distilled, log, stats, rendering)
    logger.info("distillation done; peak RSS of this process %.0f MiB", peak_rss_mb())
    return DistillResult(distilled, decisions, stats)


def assemble(records, turns, views, rewrites, decisions) -> list[Record]:
    """Put accepted rewrites in place of the original turns, record by record."""
    responses = [[turn[1] for turn in record.turns()] for record in records]
    for (r, t), rewrite, decision in zip(turns, rewrites, decisions):
        if decision.accepted:
            responses[r][t] = rewrite.strip()
    return [
        record.with_turn_responses(new) if new != [turn[1] for turn in record.turns()] else record
        for record, new in zip(records, responses)
    ]


def apply_mix(decisions, turns, records, share: float, seed: int) -> list[Decision]:
    """Keep accepted rewrites for only ``share`` of the records, chosen with a seeded shuffle.

    Records left out train on their original responses, and their log entries have
    the reason ``mixed_out``. With share 1.0 nothing changes.
    """
    if share >= 1.0:
        return decisions
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen_records = set(order[: round(share * len(records))])
    return [
        Decision(False, MIXED_OUT) if decision.accepted and r not in chosen_records else decision
        for (r, _), decision in zip(turns, decisions)
    ]


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


def turn_stats(turns, decisions) -> dict:
    """Count turns and accepted rewrites by turn position (0 is the first assistant turn)."""
    counts: dict[str, dict[str, int]] = {}
    for (_, t), decision in zip(turns, decisions):
        entry = counts.setdefault(str(t), {"turns": 0, "accepted": 0})
        entry["turns"] += 1
        entry["accepted"] += int(decision.accepted)
    return counts


def log_stats(stats: dict) -> None:
    logger.info(
        "selection: %d of %d rewrites accepted (%.1f%%) over %d records",
        stats["accepted"], stats["turns"], 100 * stats["acceptance_rate"], stats["records"],
    )
    for reason, count in stats["rejected"].items():
        logger.info("selection: %d rejected for %s", count, reason)


def nll_gap(config, loaded, originals, distilled, used, response_nll) -> dict:
    """Measure how far each dataset's responses are from the seed model's distribution.

    Per-token NLL under the seed model with the training prompt: the original
    responses, the distilled dataset (rewrites plus fallbacks), and the accepted
    subset alone, where original and rewrite differ.
    """
    template = get_template(config.train.template)
    rendering = resolve_rendering(config.prompt.rendering, loaded.tokenizer)
    original_nll = response_nll(loaded, originals, template, rendering)
    distilled_nll = response_nll(loaded, distilled, template, rendering)
    accepted = [i for i, flag in enumerate(used) if flag]
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


def write_outputs(config, output_dir, records, distilled, log, stats, rendering) -> None:
    """Write the log first and the dataset last, so a complete dataset implies a complete log."""
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

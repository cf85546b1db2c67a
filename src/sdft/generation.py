"""Batched generation with a per-prompt result cache.

Prompts are sorted longest first and padded on the left. Decoding runs as one
stream (continuous batching, ``sdft.stream``): a row leaves the batch when it
ends and the next prompts join in its place. The vLLM backend, and the
transformers one with ``compact: false``, go batch by batch. Each finished
completion is appended to a ``ResultCache`` keyed by model, prompt and decoding
settings, so an interrupted run resumes where it stopped and a rerun with the
same settings generates nothing.

With greedy decoding in float32, batched outputs equal one-at-a-time outputs.
In the stream, sampling draws each prompt's tokens from a generator of its own,
seeded from ``generation.seed`` and the prompt, so sampled outputs do not depend
on which prompts share a batch either. Batch by batch (``compact: false``), one
seeded generator serves a whole batch.
"""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

from sdft.config import ConfigError, GenerationConfig
from sdft.distributed import barrier, is_main, shard, world_size
from sdft.io import ResultCache, stable_hash
from sdft.resources import peak_rss_mb

logger = logging.getLogger(__name__)

VLLM_CHUNK = 512  # prompts handed to vLLM at a time


def decoding_settings(settings: GenerationConfig, max_new_tokens: int | None = None) -> dict:
    """Return the settings that change outputs, as recorded with every result."""
    chosen = {"mode": settings.mode, "max_new_tokens": max_new_tokens or settings.max_new_tokens}
    if settings.backend != "transformers":
        chosen["backend"] = settings.backend
    if settings.mode == "sample":
        chosen.update(
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            seed=settings.seed,
            # The stream seeds a generator per prompt; batch by batch, one per batch.
            seeding="per prompt" if settings.compact else "per batch",
        )
    return chosen


def generate(
    loaded,
    prompts: list[str],
    settings: GenerationConfig,
    model_key: str,
    cache: ResultCache | None = None,
    max_new_tokens: int | None = None,
    description: str = "generating",
) -> list[str]:
    """Generate one completion per prompt, reusing cached ones.

    Args:
        loaded: A ``LoadedModel``.
        prompts: Fully rendered prompts; special tokens are already in the text.
        settings: Decoding settings.
        model_key: Identity of model plus adapter, part of every cache key.
        cache: Where finished completions are stored and looked up.
        max_new_tokens: Overrides ``settings.max_new_tokens``.
        description: Label of the progress bar.

    Returns:
        Completions in the order of ``prompts``, without the prompt text.
    """
    decoding = decoding_settings(settings, max_new_tokens)
    keys = [stable_hash(model_key, decoding, prompt) for prompt in prompts]
    results: dict[int, str] = {}
    pending = []
    for index, key in enumerate(keys):
        if cache is not None and key in cache:
            results[index] = cache.get(key)
        else:
            pending.append(index)
    if len(results):
        logger.info("%s: %d of %d completions found in the cache", description, len(results), len(prompts))

    tokenizer = loaded.tokenizer
    encoded = {i: tokenizer(prompts[i], add_special_tokens=False).input_ids for i in pending}
    pending.sort(key=lambda i: (-len(encoded[i]), i))
    # Under a multi-process launch each process takes an interleaved shard.
    pending = shard(pending)

    progress = tqdm(
        total=len(results) + len(pending), initial=len(results), desc=description, unit="prompt", disable=not is_main()
    )
    counted = {"tokens": 0}
    started = time.perf_counter()

    def store(index: int, completion: str, produced: int) -> None:
        results[index] = completion
        if cache is not None:
            cache.put(keys[index], completion)
        counted["tokens"] += produced
        progress.update(1)
        progress.set_postfix(tokens_per_s=f"{counted['tokens'] / (time.perf_counter() - started):.1f}", refresh=False)

    if pending and streams(loaded, settings):
        from sdft.stream import stream_decode

        ends = end_token_ids(tokenizer, loaded.model)
        stream_decode(loaded, [encoded[i] for i in pending], pending, settings, decoding["max_new_tokens"], ends, store)
    elif pending:
        run_batches(loaded, prompts, pending, settings, decoding, store)
    progress.close()
    if world_size() > 1:
        barrier()
        if cache is None:
            raise ValueError("generation under a multi-process launch needs a cache to merge shards")
        cache.refresh()
        results = {i: cache.get(key) for i, key in enumerate(keys)}
    if pending:
        elapsed = time.perf_counter() - started
        logger.info(
            "%s: %d completions, %d new tokens in %.1f s (%.1f tokens/s); peak RSS %.0f MiB",
            description, len(pending), counted["tokens"], elapsed, counted["tokens"] / max(elapsed, 1e-9),
            peak_rss_mb(),
        )
    return [results[i] for i in range(len(prompts))]


def streams(loaded, settings: GenerationConfig) -> bool:
    """Tell whether decoding can run as one stream with rows joining and leaving."""
    if not settings.compact or settings.backend != "transformers":
        return False
    from sdft.kv_cache import growing_cache

    return growing_cache(loaded.model) is not None


def run_batches(loaded, prompts, pending, settings, decoding, store) -> None:
    """Generate batch by batch with ``model.generate`` or vLLM."""
    size = settings.batch_size
    if settings.backend == "vllm":
        if world_size() > 1:
            raise ConfigError(
                "generation.backend: vllm runs in a single process; launch without accelerate/torchrun "
                "or set generation.backend: transformers"
            )
        # vLLM schedules its own batches; larger chunks keep it busy, and each chunk is cached.
        size = max(size, VLLM_CHUNK)
    for number, start in enumerate(range(0, len(pending), size)):
        batch = pending[start : start + size]
        completions, produced = generate_batch(loaded, [prompts[i] for i in batch], settings, decoding, number)
        for index, completion, count in zip(batch, completions, produced):
            store(index, completion, count)


def generate_batch(loaded, prompts, settings, decoding, batch_number) -> tuple[list[str], list[int]]:
    """Generate for one batch; return completions and the count of new tokens of each."""
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    if settings.backend == "vllm":
        from sdft import vllm_backend

        return vllm_backend.generate_batch(loaded, prompts, settings, decoding, end_token_ids(tokenizer, model))
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    inputs = {name: tensor.to(loaded.device) for name, tensor in inputs.items()}
    options = {
        "max_new_tokens": decoding["max_new_tokens"],
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": end_token_ids(tokenizer, model),
    }
    if settings.mode == "sample":
        torch.manual_seed(settings.seed + batch_number)
        options.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        output = model.generate(**inputs, **options)
    new = output[:, inputs["input_ids"].shape[1] :]
    completions = tokenizer.batch_decode(new, skip_special_tokens=True)
    produced = (new != tokenizer.pad_token_id).sum(-1).tolist()
    return [completion.strip() for completion in completions], produced


def end_token_ids(tokenizer, model) -> list[int]:
    """Collect the ids that end a turn: the tokenizer's EOS and the model's own."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(ids)

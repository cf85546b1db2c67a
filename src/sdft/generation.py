"""Batched generation with a per-prompt result cache.

Prompts are sorted by length so each batch pads little, padded on the left, and
generated together. Each finished completion is appended to a ``ResultCache``
keyed by model, prompt and decoding settings, so an interrupted run resumes
where it stopped and a rerun with the same settings generates nothing.

With greedy decoding in float32, batched outputs equal one-at-a-time outputs.
Sampling draws from one seeded generator per batch, so sampled outputs depend
on how prompts are batched.
"""

from __future__ import annotations

import inspect
import logging
import time

from tqdm.auto import tqdm

from sdft.config import ConfigError, GenerationConfig
from sdft.distributed import barrier, is_main, shard, world_size
from sdft.io import ResultCache, stable_hash

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
    lengths = {i: len(tokenizer(prompts[i], add_special_tokens=False).input_ids) for i in pending}
    pending.sort(key=lambda i: (-lengths[i], i))
    # Under a multi-process launch each process takes an interleaved shard.
    pending = shard(pending)
    size = settings.batch_size
    if settings.backend == "vllm":
        if world_size() > 1:
            raise ConfigError(
                "generation.backend: vllm runs in a single process; launch without accelerate/torchrun "
                "or set generation.backend: transformers"
            )
        # vLLM schedules its own batches; larger chunks keep it busy, and each chunk is cached.
        size = max(size, VLLM_CHUNK)
    batches = [pending[i : i + size] for i in range(0, len(pending), size)]

    progress = tqdm(
        total=len(results) + len(pending), initial=len(results), desc=description, unit="prompt", disable=not is_main()
    )
    new_tokens, started = 0, time.perf_counter()
    for number, batch in enumerate(batches):
        completions, produced = generate_batch(loaded, [prompts[i] for i in batch], settings, decoding, number)
        for index, completion in zip(batch, completions):
            results[index] = completion
            if cache is not None:
                cache.put(keys[index], completion)
        new_tokens += produced
        progress.update(len(batch))
        progress.set_postfix(tokens_per_s=f"{new_tokens / (time.perf_counter() - started):.1f}")
    progress.close()
    if world_size() > 1:
        barrier()
        if cache is None:
            raise ValueError("generation under a multi-process launch needs a cache to merge shards")
        cache.refresh()
        results = {i: cache.get(key) for i, key in enumerate(keys)}
    if batches:
        elapsed = time.perf_counter() - started
        logger.info(
            "%s: %d completions, %d new tokens in %.1f s (%.1f tokens/s)",
            description, len(pending), new_tokens, elapsed, new_tokens / max(elapsed, 1e-9),
        )
    return [results[i] for i in range(len(prompts))]


def generate_batch(loaded, prompts, settings, decoding, batch_number) -> tuple[list[str], int]:
    """Generate for one batch; return completions and the count of real new tokens."""
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    if settings.backend == "vllm":
        from sdft import vllm_backend

        return vllm_backend.generate_batch(loaded, prompts, settings, decoding, end_token_ids(tokenizer, model))
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    inputs = {name: tensor.to(loaded.device) for name, tensor in inputs.items()}
    if settings.mode == "greedy" and settings.compact:
        sequences = greedy_compacting(model, inputs, decoding["max_new_tokens"], end_token_ids(tokenizer, model))
        completions = tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [completion.strip() for completion in completions], sum(len(s) for s in sequences)
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
    produced = int((new != tokenizer.pad_token_id).sum())
    return [completion.strip() for completion in completions], produced


def greedy_compacting(model, inputs: dict, max_new_tokens: int, end_ids: list[int]) -> list[list[int]]:
    """Greedy decoding that drops finished sequences from the batch after every step.

    ``model.generate`` keeps computing every row until the longest one stops. Here a
    row leaves the batch as soon as it emits an end token, and its KV cache entries
    are discarded. The arithmetic per row is
    unchanged, so in float32 the tokens equal those of ``generate`` at batch 1.
    """
    import torch
    from transformers import DynamicCache

    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    ends = torch.tensor(end_ids, device=input_ids.device)
    outputs: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    cache = DynamicCache(config=model.config)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    step_input = input_ids
    # transformers 5.25 renamed ``past_key_values`` to ``cache``; older releases take the former.
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        for step in range(max_new_tokens):
            logits = model(
                input_ids=step_input,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                # Only the last position's logits are needed; the full prefill logits
                # (batch x prompt length x vocabulary) would dominate the cost.
                logits_to_keep=1,
                **{cache_argument: cache},
            ).logits[:, -1]
            tokens = logits.argmax(-1)
            for row, token in zip(rows.tolist(), tokens.tolist()):
                outputs[row].append(token)
            running = ~torch.isin(tokens, ends)
            if step == max_new_tokens - 1 or not running.any():
                break
            if not running.all():
                keep = running.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, tokens, attention_mask = rows[keep], tokens[keep], attention_mask[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
            position_ids = attention_mask.sum(-1, keepdim=True) - 1
            step_input = tokens[:, None]
    return outputs


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

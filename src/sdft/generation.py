"""Batched generation with a per-prompt result cache.

Prompts are sorted longest first and padded on the left. Greedy decoding runs
as one stream (continuous batching): a row leaves the batch when it ends and
the next prompts join in its place. Sampling and the vLLM backend go batch by
batch. Each finished completion is appended to a ``ResultCache`` keyed by
model, prompt and decoding settings, so an interrupted run resumes where it
stopped and a rerun with the same settings generates nothing.

With greedy decoding in float32, batched outputs equal one-at-a-time outputs.
In the stream, sampling draws each prompt's tokens from a generator of its own,
seeded from ``generation.seed`` and the prompt, so sampled outputs do not depend
on which prompts share a batch either. Batch by batch (``compact: false``), one
seeded generator serves a whole batch.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time

from tqdm.auto import tqdm

from sdft.config import ConfigError, GenerationConfig
from sdft.distributed import barrier, is_main, shard, world_size
from sdft.io import ResultCache, stable_hash
from sdft.resources import peak_rss_mb

logger = logging.getLogger(__name__)

VLLM_CHUNK = 512  # prompts handed to vLLM at a time
PREFILL_GROUP = 16  # prompts prefilled together when they join the stream


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
        stream_decode(loaded, [encoded[i] for i in pending], pending, settings, decoding, store)
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


def stream_decode(loaded, prompts: list[list[int]], indices: list[int], settings: GenerationConfig,
                  decoding: dict, store) -> None:
    """Decode as one stream: finished rows leave the batch, waiting prompts join it.

    ``model.generate`` computes every row of a batch until its longest one stops.
    Here a row leaves as soon as it emits an end token, and whenever a quarter of
    the ``batch_size`` rows are free, the next prompts are prefilled together and
    joined to the batch, left-padded to the cache length. Prompts arrive longest
    first, so a joining row rarely pads the others. Keys and values live in
    ``GrowingLayer`` buffers, written in place. Each row's arithmetic is that of
    a padded batch, so in float32 greedy tokens equal those of ``generate`` at batch 1.

    Args:
        prompts: Token ids of each prompt, in the order they should start.
        indices: The caller's index of each prompt, passed back to ``store``.
        store: Called as ``store(index, completion, new_tokens)`` when a row finishes.
    """
    import torch

    from sdft.kv_cache import drop_rows, join_rows

    model, tokenizer = loaded.model, loaded.tokenizer
    max_new, batch_size = decoding["max_new_tokens"], settings.batch_size
    choose = TokenChooser(settings, loaded.device)
    ends = torch.tensor(end_token_ids(tokenizer, model), device=loaded.device)
    waiting = list(range(len(prompts)))[::-1]  # popped from the end
    rows: list[int] = []  # position in ``prompts`` of each batch row
    produced: list[list[int]] = []
    cache = mask = last = None
    with torch.inference_mode():
        while waiting or rows:
            if waiting and len(rows) <= batch_size - max(1, batch_size // 4):
                joining = [waiting.pop() for _ in range(min(batch_size - len(rows), len(waiting)))]
                # Prefilled in groups of similar length: one group would pad every prompt to the longest.
                for start in range(0, len(joining), PREFILL_GROUP):
                    group = joining[start : start + PREFILL_GROUP]
                    new_cache, new_mask, logits = prefill(model, [prompts[i] for i in group], tokenizer.pad_token_id)
                    new_last = choose.first(logits, [prompts[i] for i in group])
                    if cache is None:
                        cache, mask, last = new_cache, new_mask, new_last
                    else:
                        mask = join_rows(cache, mask, new_cache, new_mask)
                        last = torch.cat([last, new_last])
                    rows += group
                    produced += [[token] for token in new_last.tolist()]
            else:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
                last = choose.next(step(model, cache, last, mask))
                for tokens, token in zip(produced, last.tolist()):
                    if tokens is not None:
                        tokens.append(token)
            # A finished row is stored at once but stays in the batch (its slot is None) until
            # enough have finished to pay for compacting the cache, or prompts wait to join.
            live = torch.tensor([t is not None for t in produced], device=last.device)
            full = torch.tensor([t is not None and len(t) >= max_new for t in produced], device=last.device)
            done = live & (torch.isin(last, ends) | full)
            for row in done.nonzero().flatten().tolist():
                tokens = produced[row]
                store(indices[rows[row]], tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens))
                produced[row] = None
            live &= ~done
            finished, running = len(rows) - int(live.sum()), int(live.sum())
            joining_soon = waiting and running <= batch_size - max(1, batch_size // 4)
            if not finished or not (finished >= max(1, batch_size // 8) or joining_soon or not running):
                continue
            keep = live.nonzero().flatten()
            choose.keep(keep.tolist())
            rows = [rows[i] for i in keep.tolist()]
            produced = [produced[i] for i in keep.tolist()]
            if rows:
                mask, last = drop_rows(cache, mask, keep), last[keep]
            else:
                cache = mask = last = None


def prefill(model, prompts: list[list[int]], pad_id: int):
    """Run the prompts, left-padded, through the model; return their cache, mask and last logits."""
    import torch

    from sdft.kv_cache import growing_cache

    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)
    cache = growing_cache(model)
    logits = forward_last(model, input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
    return cache, mask, logits


def step(model, cache, last, mask):
    """Feed each row's last token; ``mask`` already covers it. Return the next logits."""
    positions = mask.sum(-1, keepdim=True) - 1
    return forward_last(model, last[:, None], mask, positions, cache)


class TokenChooser:
    """Pick each row's next token: argmax, or a draw from the row's own seeded generator.

    Sampling applies temperature, then top-k, then top-p, as ``model.generate`` does.
    """

    def __init__(self, settings: GenerationConfig, device):
        self.seed, self.device = settings.seed, device
        self.generators: list = []  # one per batch row, in row order
        self.warpers = None
        if settings.mode == "sample":
            from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

            self.warpers = [TemperatureLogitsWarper(settings.temperature)]
            if settings.top_k:
                self.warpers.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(settings.top_p))

    def first(self, logits, prompts: list[list[int]]):
        """Tokens of the rows that just joined (appended after the others)."""
        joining = [self.generator(ids) for ids in prompts] if self.warpers else []
        self.generators += joining
        return self.pick(logits, joining)

    def next(self, logits):
        """Tokens of every row."""
        return self.pick(logits, self.generators)

    def keep(self, rows: list[int]) -> None:
        self.generators = [self.generators[row] for row in rows] if self.warpers else []

    def pick(self, logits, generators: list):
        import torch

        if self.warpers is None:
            return logits.argmax(-1)
        for warper in self.warpers:
            logits = warper(None, logits)
        probs = logits.softmax(-1)
        return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])

    def generator(self, prompt: list[int]):
        import torch

        seed = int(stable_hash(self.seed, prompt)[:15], 16)
        return torch.Generator(device=self.device).manual_seed(seed)


def forward_last(model, input_ids, mask, positions, cache):
    """Logits of the last position only: the full prefill logits would dominate the cost."""
    output = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
        **{cache_keyword(type(model)): cache},
    )
    return output.logits[:, -1]


@functools.cache
def cache_keyword(model_class) -> str:
    """transformers 5.25 renamed ``past_key_values`` to ``cache``; older releases take the former."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


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

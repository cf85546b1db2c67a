"""Generation through vLLM, for GPUs, behind the interface of ``sdft.generation``.

Optional: it needs ``pip install vllm`` on a machine with a GPU that vLLM supports,
and is chosen with ``generation.backend: vllm``. Prompts are passed as token ids,
tokenized exactly as the default backend does, and decoding stops at the same end
tokens. One engine is kept at a time: a base model's engine serves its LoRA
adapters too, so the seed, vanilla and SDFT models of one comparison share it.

Greedy outputs can differ from the default backend's in rare tokens, because
vLLM's kernels sum in a different order. Sampled outputs use one seed per
request, so they do not depend on how vLLM schedules the prompts.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

from sdft.config import ConfigError, GenerationConfig

logger = logging.getLogger(__name__)

_engine: dict = {"key": None, "llm": None, "adapters": {}}


def import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(
            "generation.backend: vllm needs the vllm package and a GPU it supports "
            f"({err}); install it with `pip install vllm` or set generation.backend: transformers"
        ) from err
    return vllm


def adapter_rank(adapter: str) -> int:
    """Read the LoRA rank from the adapter's ``adapter_config.json``."""
    config_path = Path(adapter) / "adapter_config.json"
    try:
        return int(json.loads(config_path.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{config_path}: cannot read the LoRA rank 'r' for vLLM ({err})") from err


def engine(loaded, settings: GenerationConfig):
    """Return the vLLM engine for ``loaded``'s base model, creating it on first use."""
    vllm = import_vllm()
    rank = adapter_rank(loaded.adapter) if loaded.adapter else 0
    key = (loaded.path, loaded.dtype, settings.vllm_memory, rank)
    if _engine["key"] != key:
        release()
        logger.info("starting a vLLM engine for %s (%s)", loaded.path, loaded.dtype)
        options = {"enable_lora": True, "max_lora_rank": rank} if rank else {}
        _engine["llm"] = vllm.LLM(
            model=loaded.path,
            tokenizer=loaded.path,
            dtype=loaded.dtype,
            seed=settings.seed,
            gpu_memory_utilization=settings.vllm_memory,
            **options,
        )
        _engine["key"] = key
    return _engine["llm"]


def release() -> None:
    """Drop the current engine and free its GPU memory."""
    if _engine["llm"] is None:
        return
    _engine["llm"], _engine["key"], _engine["adapters"] = None, None, {}
    gc.collect()
    try:
        import torch

        torch.cuda.empty_cache()
    except (ImportError, RuntimeError):
        pass


def sampling_params(vllm, decoding: dict, settings: GenerationConfig, end_ids: list[int]):
    """Translate sdft's decoding settings into vLLM's ``SamplingParams``."""
    common = {"max_tokens": decoding["max_new_tokens"], "stop_token_ids": end_ids, "skip_special_tokens": True}
    if decoding["mode"] == "greedy":
        return vllm.SamplingParams(temperature=0.0, **common)
    return vllm.SamplingParams(
        temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, seed=settings.seed, **common
    )


def generate_batch(loaded, prompts: list[str], settings: GenerationConfig, decoding: dict,
                   end_ids: list[int]) -> tuple[list[str], list[int]]:
    """Generate for ``prompts``; return completions and the count of new tokens of each."""
    vllm = import_vllm()
    llm = engine(loaded, settings)
    requests = [{"prompt_token_ids": loaded.tokenizer(p, add_special_tokens=False).input_ids} for p in prompts]
    lora = None
    if loaded.adapter:
        from vllm.lora.request import LoRARequest

        # vLLM caches adapters by their integer id, so each folder keeps its own.
        ids = _engine["adapters"]
        number = ids.setdefault(str(loaded.adapter), len(ids) + 1)
        lora = LoRARequest(f"adapter-{number}", number, str(loaded.adapter))
    outputs = llm.generate(
        requests, sampling_params(vllm, decoding, settings, end_ids), lora_request=lora, use_tqdm=False
    )
    completions = [output.outputs[0].text.strip() for output in outputs]
    return completions, [len(output.outputs[0].token_ids) for output in outputs]

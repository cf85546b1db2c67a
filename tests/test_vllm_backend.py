"""The vLLM backend's plumbing, checked with a stand-in ``vllm`` package.

vLLM needs a GPU, which this machine does not have, so these tests put a small fake
``vllm`` package on the path (a mock of a GPU-only dependency). The fake keeps
vLLM's contract: it loads the model folder it is given and decodes greedily from
the token ids it receives, stopping at the stop ids. Its outputs therefore show
whether sdft hands vLLM the same prompt tokens and end tokens as the default backend.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

import pytest

from sdft.config import ConfigError, GenerationConfig
from sdft.data import load_dataset_records
from sdft.generation import decoding_settings, end_token_ids, generate
from sdft.io import ResultCache
from sdft.models import load_model
from sdft.prompts import get_template, render_prompt

FAKE_VLLM = '''
"""Stand-in for vLLM: greedy decoding with transformers, recording every call."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CALLS = {"engines": [], "generate": []}


class SamplingParams:
    def __init__(self, **options):
        self.options = options


class LLM:
    def __init__(self, model, tokenizer, dtype, seed, gpu_memory_utilization, **options):
        CALLS["engines"].append(dict(model=model, dtype=dtype, seed=seed,
                                     gpu_memory_utilization=gpu_memory_utilization, **options))
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    def generate(self, requests, params, lora_request=None, use_tqdm=True):
        CALLS["generate"].append(dict(count=len(requests), params=params.options, lora=lora_request))
        results = []
        for request in requests:
            ids = torch.tensor([request["prompt_token_ids"]])
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=params.options["max_tokens"], eos_token_id=params.options["stop_token_ids"],
                    pad_token_id=self.tokenizer.pad_token_id or 0, temperature=None, top_p=None, top_k=None,
                )
            new = out[0, ids.shape[1]:].tolist()
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            results.append(Output([Completion(text, new)]))
        return results


class Output:
    def __init__(self, outputs):
        self.outputs = outputs


class Completion:
    def __init__(self, text, token_ids):
        self.text, self.token_ids = text, token_ids
'''

FAKE_LORA = '''
class LoRARequest:
    def __init__(self, name, number, path):
        self.name, self.number, self.path = name, number, path
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """Put the stand-in package first on the path and reset sdft's engine between tests."""
    package = tmp_path / "fake" / "vllm"
    (package / "lora").mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    (package / "lora" / "__init__.py").write_text("")
    (package / "lora" / "request.py").write_text(textwrap.dedent(FAKE_LORA))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    from sdft import vllm_backend

    vllm_backend.release()
    import vllm

    yield vllm.CALLS
    vllm_backend.release()


@pytest.fixture(scope="module")
def seed_model():
    return load_model("embedded")


@pytest.fixture(scope="module")
def prompts(seed_model, data_path):
    records = load_dataset_records("gsm8k_test", data_dir=data_path, limit=2)
    return [render_prompt(get_template("gsm8k_infer"), r, seed_model.tokenizer, "chat") for r in records]


def test_greedy_outputs_equal_default_backend(seed_model, prompts, fake_vllm, tmp_path):
    settings = GenerationConfig(mode="greedy", max_new_tokens=24, batch_size=2)
    expected = generate(seed_model, prompts, settings, "seed")
    chosen = dataclasses.replace(settings, backend="vllm", vllm_memory=0.3)
    cache = ResultCache(tmp_path / "cache.jsonl")
    assert generate(seed_model, prompts, chosen, "seed", cache=cache) == expected

    (engine,) = fake_vllm["engines"]
    assert engine == dict(model=seed_model.path, dtype=seed_model.dtype, seed=42, gpu_memory_utilization=0.3)
    (call,) = fake_vllm["generate"]  # both prompts in one request list
    assert call["count"] == 2
    assert call["lora"] is None
    assert call["params"] == dict(
        temperature=0.0, max_tokens=24, stop_token_ids=end_token_ids(seed_model.tokenizer, seed_model.model),
        skip_special_tokens=True,
    )
    # Results are cached under keys that name the backend, apart from the default backend's.
    assert decoding_settings(chosen)["backend"] == "vllm"
    assert "backend" not in decoding_settings(settings)
    assert generate(seed_model, prompts, chosen, "seed", cache=cache) == expected
    assert len(fake_vllm["generate"]) == 1


def test_adapters_share_one_engine(seed_model, prompts, fake_vllm, tmp_path):
    adapters = []
    for name in ("vanilla", "sdft"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
        adapters.append(folder)
    settings = GenerationConfig(mode="sample", max_new_tokens=8, backend="vllm", seed=7)
    for folder in adapters + adapters[:1]:
        loaded = dataclasses.replace(seed_model, adapter=str(folder))
        generate(loaded, prompts[:1], settings, f"model-{folder.name}")

    (engine,) = fake_vllm["engines"]
    assert engine["enable_lora"] is True
    assert engine["max_lora_rank"] == 8
    requests = [call["lora"] for call in fake_vllm["generate"]]
    assert [(r.path, r.number) for r in requests] == [
        (str(adapters[0]), 1), (str(adapters[1]), 2), (str(adapters[0]), 1)
    ]
    params = fake_vllm["generate"][0]["params"]
    assert (params["temperature"], params["top_p"], params["top_k"], params["seed"]) == (0.95, 0.7, 50, 7)


def test_missing_vllm_is_a_config_error(seed_model, prompts, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    settings = GenerationConfig(mode="greedy", max_new_tokens=4, backend="vllm")
    with pytest.raises(ConfigError, match=r"generation.backend: vllm needs the vllm package .*pip install vllm"):
        generate(seed_model, prompts[:1], settings, "seed")


def test_backend_choice_is_checked():
    with pytest.raises(ConfigError, match="generation.backend: invalid value 'vllmm'"):
        GenerationConfig(backend="vllmm")
    with pytest.raises(ConfigError, match=r"generation.vllm_memory: must be in \(0, 1\)"):
        GenerationConfig(vllm_memory=1.5)

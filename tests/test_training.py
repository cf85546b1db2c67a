"""Training examples: the loss mask covers exactly the response and end-of-turn tokens."""

from __future__ import annotations

import pytest

from sdft.data import Record
from sdft.models import load_tokenizer, resolve_model_path
from sdft.prompts import get_template
from sdft.training import build_example, build_examples


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("embedded"))


RECORD = Record("0", "What is 2 + 3?", "2 + 3 = 5.\nThe answer is 5.")


def test_chat_mask_covers_response_and_end(tokenizer):
    example = build_example(RECORD, get_template("gsm8k"), tokenizer, "chat")
    supervised = [t for t, m in zip(example.input_ids, example.completion_mask) if m]
    assert tokenizer.decode(supervised) == RECORD.response + "<|im_end|>\n"
    unsupervised = [t for t, m in zip(example.input_ids, example.completion_mask) if not m]
    assert tokenizer.decode(unsupervised).endswith("<|im_start|>assistant\n")


def test_raw_mask_ends_with_eos(tokenizer):
    example = build_example(RECORD, get_template("gsm8k"), tokenizer, "raw")
    supervised = [t for t, m in zip(example.input_ids, example.completion_mask) if m]
    assert tokenizer.decode(supervised) == " " + RECORD.response + tokenizer.eos_token
    assert example.completion_mask[0] == 0


def test_mask_is_prompt_then_completion(tokenizer):
    example = build_example(RECORD, get_template("alpaca"), tokenizer, "chat")
    first = example.completion_mask.index(1)
    assert all(m == 0 for m in example.completion_mask[:first])
    assert all(m == 1 for m in example.completion_mask[first:])


def test_overlong_truncate_and_skip(tokenizer):
    long = Record("1", "Count.", " ".join(["one"] * 400))
    records = [RECORD, long]
    template = get_template("gsm8k")
    truncated, counts = build_examples(records, template, tokenizer, "chat", 128, "truncate")
    assert counts == {"records": 2, "used": 2, "truncated": 1, "skipped": 0}
    assert len(truncated[1].input_ids) == 128
    skipped, counts = build_examples(records, template, tokenizer, "chat", 128, "skip")
    assert counts == {"records": 2, "used": 1, "truncated": 0, "skipped": 1}
    assert len(skipped) == 1


# Chat templates of three families, written for these tests in the style of each
# family's published template; the SmolLM2 tokenizer renders and tokenizes them.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if loop.index0 == 0 and system %}{{ bos_token }}[INST] <<SYS>>\n{{ system }}\n<</SYS>>\n\n"
    "{{ m['content'] }} [/INST]{% else %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endif %}"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
MULTI_TURN = Record("7", "Second question?", "Second answer.", "", [("First question?", "First answer.")])


@pytest.mark.parametrize(
    "family, template, turn_end",
    [
        ("chatml", None, "{answer}<|im_end|>\n"),
        ("llama3", LLAMA3_TEMPLATE, "{answer}<|eot_id|>"),
        ("llama2", LLAMA2_TEMPLATE, " {answer} <|im_end|>"),
    ],
)
def test_mask_covers_every_assistant_turn(tokenizer, family, template, turn_end):
    import copy

    local = copy.deepcopy(tokenizer)
    if template is not None:
        local.chat_template = template
    example = build_example(MULTI_TURN, get_template("alpaca"), local, "chat")
    supervised = [t for t, m in zip(example.input_ids, example.completion_mask) if m]
    expected = turn_end.format(answer="First answer.") + turn_end.format(answer="Second answer.")
    assert local.decode(supervised) == expected
    full = local.decode(example.input_ids)
    assert "First question?" in full
    assert full.endswith(turn_end.format(answer="Second answer."))


def test_raw_multi_turn_masks_history_answers(tokenizer):
    example = build_example(MULTI_TURN, get_template("alpaca"), tokenizer, "raw")
    supervised = [t for t, m in zip(example.input_ids, example.completion_mask) if m]
    assert tokenizer.decode(supervised) == "First answer.Second answer." + tokenizer.eos_token


@pytest.mark.parametrize(
    "model_dtype, train_dtype, method, device, bf16_cpu, expected",
    [
        ("auto", "auto", "lora", "cpu", True, "bfloat16"),  # native bf16: LoRA on bf16 base weights
        ("auto", "auto", "lora", "cpu", False, "float32"),  # emulated bf16 would be slower
        ("auto", "auto", "full", "cpu", True, "float32"),  # full fine-tuning keeps float32 weights
        ("float32", "auto", "lora", "cpu", True, "float32"),  # an explicit model.dtype wins over auto
        ("auto", "float32", "lora", "cpu", True, "float32"),  # train.dtype wins over everything
        ("auto", "float16", "full", "cpu", False, "float16"),
        ("auto", "auto", "lora", "mps", True, "float32"),
    ],
)
def test_training_dtype(monkeypatch, model_dtype, train_dtype, method, device, bf16_cpu, expected):
    from sdft import models

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: bf16_cpu)
    assert models.training_dtype(model_dtype, train_dtype, method, device) == expected

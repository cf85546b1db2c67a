"""The fast paths compute what the plain ones do.

Batched, length-bucketed, compacting greedy generation gives the outputs of
``model.generate`` run one prompt at a time, and the chunked loss over supervised
positions equals the standard cross-entropy over full logits (and TRL's own loss).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdft.config import Config, GenerationConfig
from sdft.data import load_dataset_records
from sdft.generation import end_token_ids, generate
from sdft.models import load_model
from sdft.prompts import get_template, render_prompt, resolve_rendering
from sdft.training import build_examples, build_trainer, supervised_loss

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def seed_model():
    return load_model("embedded")


@pytest.fixture(scope="module")
def examples(seed_model, data_path):
    records = load_dataset_records("gsm8k", data_dir=data_path, limit=3)
    tokenizer = seed_model.tokenizer
    built, _ = build_examples(
        records, get_template("gsm8k"), tokenizer, resolve_rendering("auto", tokenizer), 1024, "truncate"
    )
    return built


def one_at_a_time(loaded, prompts: list[str]) -> tuple[list[str], list[int]]:
    """Plain ``generate`` per prompt; return completions and their token counts."""
    model, tokenizer = loaded.model, loaded.tokenizer
    texts, lengths = [], []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=end_token_ids(tokenizer, model),
            )
        new = output[0, inputs["input_ids"].shape[1] :]
        texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        lengths.append(len(new))
    return texts, lengths


@pytest.mark.parametrize("batch_size", [4, 16])
def test_compacting_batches_equal_batch_one(seed_model, data_path, batch_size):
    """Batch 4: rows join as others finish. Batch 16: all start together and leave one by one.

    Three of the prompts share a long template prefix, so prefill reuses its keys and values.
    """
    tokenizer = seed_model.tokenizer
    math = load_dataset_records("gsm8k_test", data_dir=data_path, limit=3)
    safety = load_dataset_records("advbench", data_dir=data_path, limit=3, require_response=False)
    prompts = [render_prompt(get_template("gsm8k_infer"), r, tokenizer, "chat") for r in math]
    prompts += [render_prompt(get_template("alpaca"), r, tokenizer, "chat") for r in safety]
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    assert len(set(lengths)) > 1, "prompts of one length would not exercise the padding"

    # These prompts rarely reach the end of turn within 48 tokens. Ending at the first period
    # as well makes rows finish at different steps, so compacting drops rows from each batch.
    config = seed_model.model.generation_config
    saved = config.eos_token_id
    period = tokenizer(".", add_special_tokens=False).input_ids
    assert len(period) == 1
    config.eos_token_id = sorted(set(end_token_ids(tokenizer, seed_model.model)) | set(period))
    try:
        expected, produced = one_at_a_time(seed_model, prompts)
        settings = GenerationConfig(mode="greedy", max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size, compact=True)
        batched = generate(seed_model, prompts, settings, "test")
    finally:
        config.eos_token_id = saved
    assert batched == expected
    assert len(set(produced)) > 1, "every row stopped at the same step, so none was dropped from a batch"
    assert len(set(expected)) == len(expected)


def padded_batch(examples, pad_id: int) -> dict:
    """Right-padded batch with labels on the completion only, as TRL's collator builds it."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.where(
            torch.tensor(example.completion_mask, dtype=torch.bool), torch.tensor(example.input_ids), -100
        )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_chunked_loss_equals_full_logits(seed_model, examples):
    """Loss and gradients (tied LM head included) match the cross-entropy of full logits."""
    model = seed_model.model
    batch = padded_batch(examples, seed_model.tokenizer.pad_token_id)
    lengths = {len(e.input_ids) for e in examples}
    assert len(lengths) > 1, "the batch needs padding"
    head = model.get_output_embeddings()
    watched = [head.weight, model.model.norm.weight, model.model.layers[-1].self_attn.q_proj.weight]

    def loss_and_grads(chunked: bool):
        model.zero_grad(set_to_none=True)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        if chunked:
            hidden = model.model(**inputs, use_cache=False).last_hidden_state
            loss, _, _, count = supervised_loss(hidden, head, batch["labels"], chunk_tokens=64)
            assert count > 64, "the test needs more than one chunk"
        else:
            logits = model(**inputs, use_cache=False).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
            )
        loss.backward()
        return loss.item(), [p.grad.clone() for p in watched]

    try:
        chunked, chunked_grads = loss_and_grads(True)
        full, full_grads = loss_and_grads(False)
    finally:
        model.zero_grad(set_to_none=True)
    assert chunked == pytest.approx(full, abs=1e-4)
    # Float32 rounding alone moves single gradient entries of deep layers by up to ~1e-3 of
    # the tensor's largest entry (measured against float64: the full-logits path errs more
    # than the chunked one), so compare directions tightly and entries loosely.
    for mine, theirs in zip(chunked_grads, full_grads):
        cosine = torch.nn.functional.cosine_similarity(mine.flatten(), theirs.flatten(), dim=0).item()
        assert cosine > 0.99999, cosine
        error = ((mine - theirs).abs().max() / theirs.abs().max()).item()
        assert error < 5e-3, error


def test_trainer_loss_equals_trl_loss(seed_model, examples, tmp_path):
    """sdft's trainer gives TRL's loss on a real batch, also with gradient accumulation's denominator."""
    from trl import SFTTrainer

    config = Config()
    config.train.dtype = "float32"  # an exactness check: bfloat16 would round both losses differently
    assert config.train.loss_chunk_tokens > 0
    trainer = build_trainer(
        config, examples, seed_model.tokenizer, seed_model.path, Path(tmp_path), [],
        max_steps=1, save_strategy="no", per_device_train_batch_size=len(examples),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter, not the zero start
            torch.nn.init.normal_(parameter, std=0.01)
    with torch.no_grad():
        for items in (None, torch.tensor(1000)):
            ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
            theirs = SFTTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=items)
            assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def first_batch_and_loss(config: Config, examples, seed_model, folder: Path):
    """The trainer's first micro-batch (all examples) and its loss, with dropout off."""
    trainer = build_trainer(
        config, examples, seed_model.tokenizer, seed_model.path, folder, [],
        max_steps=1, save_strategy="no", per_device_train_batch_size=len(examples),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    for module in trainer.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    return batch, loss


def test_packed_losses_equal_unpacked(seed_model, examples, tmp_path):
    """A packed (padding-free) micro-batch gives each record the loss it has alone."""
    config = Config()
    config.train.dtype = "float32"  # compares with the float32 model of the fixture
    config.train.packing = True
    packed, packed_loss = first_batch_and_loss(config, examples, seed_model, tmp_path / "packed")
    assert packed["input_ids"].shape[0] == 1
    assert "attention_mask" not in packed
    positions = packed["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) == len(examples)

    model = seed_model.model
    with torch.no_grad():
        hidden = model.model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).last_hidden_state
        losses = torch.nn.functional.cross_entropy(
            model.lm_head(hidden)[0, :-1], packed["labels"][0, 1:], ignore_index=-100, reduction="none"
        )
    targets = packed["labels"][0, 1:]
    by_ids = {tuple(e.input_ids): e for e in examples}
    for start, end in zip(starts, starts[1:] + [len(positions)]):
        example = by_ids[tuple(packed["input_ids"][0, start:end].tolist())]
        supervised = targets[start : end - 1] != -100
        packed_record = losses[start : end - 1][supervised].mean().item()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0, :-1]
        labels = torch.tensor(example.input_ids[1:])
        alone = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        alone = alone[torch.tensor(example.completion_mask[1:], dtype=torch.bool)].mean().item()
        assert packed_record == pytest.approx(alone, abs=1e-5)

    # The trainer's loss over the whole micro-batch is the same packed and padded.
    config.train.packing = False
    padded, padded_loss = first_batch_and_loss(config, examples, seed_model, tmp_path / "padded")
    assert padded["input_ids"].shape[0] == len(examples)
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)

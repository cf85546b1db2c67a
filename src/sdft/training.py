"""Supervised fine-tuning with TRL's SFTTrainer, LoRA (PEFT) or full.

    sdft train configs/quickstart.yaml --dataset runs/x/distill/distilled.json --output-dir runs/x/sdft

The loss covers only response tokens and the end-of-turn token: records are
tokenized here into ``input_ids`` plus a ``completion_mask`` that TRL turns into
labels. Writes into the output folder:
    adapter/             the PEFT adapter (or the full model with method: full)
    train_meta.json      config, templates, data hash, versions, token counts
    losses.json          training loss per logged step
    loss_curve.png       the same as a plot
    checkpoints/         trainer checkpoints; an interrupted run resumes from the last
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from sdft.config import Config
from sdft.data import Record, records_fingerprint
from sdft.io import atomic_save_figure, atomic_write_json
from sdft.prompts import Template, get_template, render_training_segments, resolve_rendering
from sdft.provenance import provenance

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
META_FILE = "train_meta.json"
LOSSES_FILE = "losses.json"
CURVE_FILE = "loss_curve.png"


@dataclass
class Example:
    """One tokenized training example."""

    input_ids: list[int]
    completion_mask: list[int]
    truncated: bool = False


def build_example(record: Record, template: Template, tokenizer, rendering: str) -> Example:
    """Tokenize each segment separately so the mask covers exactly the assistant turns."""
    input_ids, mask = [], []
    for text, supervised in render_training_segments(template, record, tokenizer, rendering):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        input_ids += ids
        mask += [int(supervised)] * len(ids)
    return Example(input_ids, mask)


def build_examples(
    records: list[Record], template: Template, tokenizer, rendering: str, max_length: int, overlong: str
) -> tuple[list[Example], dict]:
    """Tokenize every record and apply the over-length policy; return examples and counts.

    ``truncate`` cuts the end of the completion; a record whose prompt alone fills
    ``max_length`` has nothing left to learn from and is skipped in both policies.
    """
    examples, truncated, skipped = [], 0, []
    for record in records:
        example = build_example(record, template, tokenizer, rendering)
        if len(example.input_ids) > max_length:
            prompt_length = example.completion_mask.index(1)
            if overlong == "skip" or prompt_length >= max_length:
                skipped.append(record.id)
                continue
            example = Example(example.input_ids[:max_length], example.completion_mask[:max_length], True)
            truncated += 1
        examples.append(example)
    counts = {"records": len(records), "used": len(examples), "truncated": truncated, "skipped": len(skipped)}
    if truncated or skipped:
        logger.warning(
            "%d record(s) longer than train.max_length=%d truncated, %d skipped (ids: %s)",
            truncated, max_length, len(skipped), ", ".join(skipped[:10]) or "-",
        )
    return examples, counts


def train(config: Config, records: list[Record], output_dir: Path, model_path: str) -> Path:
    """Fine-tune the seed model on ``records`` and save the adapter; return its folder."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from sdft.models import load_tokenizer, pick_device, pick_dtype

    settings = config.train
    tokenizer = load_tokenizer(model_path)
    rendering = resolve_rendering(config.prompt.rendering, tokenizer)
    template = get_template(settings.template)
    examples, counts = build_examples(
        records, template, tokenizer, rendering, settings.max_length, settings.overlong
    )
    if not examples:
        raise ValueError(
            f"no training records left: all {len(records)} are longer than train.max_length="
            f"{settings.max_length}; raise it or use shorter records"
        )
    dataset = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "completion_mask": [e.completion_mask for e in examples],
        }
    )

    device = pick_device(config.model.device)
    dtype = pick_dtype(config.model.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    peft_config = lora_config(settings) if settings.method == "lora" else None
    checkpoints = output_dir / "checkpoints"
    trainer = SFTTrainer(
        model=model,
        args=sft_config(settings, checkpoints, device, dtype),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[LogLineCallback(examples, settings)],
    )

    resume = last_checkpoint(checkpoints)
    if resume:
        logger.info("resuming training from %s", resume)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - started

    save_model(trainer, tokenizer, output_dir / ADAPTER_DIR)
    losses = [
        {"step": entry["step"], "loss": entry["loss"], "learning_rate": entry.get("learning_rate")}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    atomic_write_json(output_dir / LOSSES_FILE, losses)
    plot_losses(losses, output_dir / CURVE_FILE, title=f"{settings.method} fine-tuning loss")
    tokens = sum(len(e.input_ids) for e in examples) * settings.epochs
    atomic_write_json(
        output_dir / META_FILE,
        provenance(
            config,
            [settings.template],
            rendering=rendering,
            base_model=model_path,
            data_hash=records_fingerprint(records),
            examples=counts,
            train_loss=result.training_loss,
            steps=trainer.state.global_step,
            seconds=round(elapsed, 1),
            tokens_per_second=round(tokens / elapsed, 1) if elapsed and not resume else None,
        ),
    )
    shutil.rmtree(checkpoints, ignore_errors=True)
    return output_dir / ADAPTER_DIR


def lora_config(settings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_targets,
        task_type="CAUSAL_LM",
    )


def sft_config(settings, checkpoints: Path, device: str, dtype: str):
    """Map our settings onto SFTConfig, overriding TRL defaults that differ from the paper's."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # a value below 1 is a fraction of all steps
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=1,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        gradient_checkpointing=settings.gradient_checkpointing,
        completion_only_loss=True,
        max_length=None,
        packing=False,
        use_cpu=device == "cpu",
        report_to=[],
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def last_checkpoint(checkpoints: Path) -> str | None:
    """Return the newest complete checkpoint folder, if any."""
    if not checkpoints.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints))


def save_model(trainer, tokenizer, target: Path) -> None:
    """Save the adapter (or full model) into a staging folder, then rename it into place."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def plot_losses(losses: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([entry["step"] for entry in losses], [entry["loss"] for entry in losses], marker=".")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    atomic_save_figure(figure, path)
    plt.close(figure)


class LogLineCallback(TrainerCallback):
    """Log one fixed-format line per logging interval: step, loss, lr, tokens/s."""

    def __init__(self, examples: list[Example], settings):
        mean_tokens = sum(len(e.input_ids) for e in examples) / len(examples)
        self.tokens_per_step = mean_tokens * settings.batch_size * settings.gradient_accumulation
        self.last_time, self.last_step = time.perf_counter(), 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        steps = state.global_step - self.last_step
        rate = steps * self.tokens_per_step / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, state.global_step
        logger.info(
            "step %d/%d | loss %.4f | lr %.2e | %.0f tokens/s",
            state.global_step, state.max_steps, logs["loss"], logs.get("learning_rate", math.nan), rate,
        )

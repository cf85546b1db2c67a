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

import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from sdft.config import Config
from sdft.data import DataError, Record, records_fingerprint
from sdft.distributed import is_main
from sdft.io import atomic_save_figure, atomic_write_json
from sdft.prompts import Template, get_template, render_training_segments, resolve_rendering
from sdft.provenance import provenance
from sdft.resources import peak_rss_mb

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
    from sdft.models import load_tokenizer, pick_device, training_dtype

    settings = config.train
    tokenizer = load_tokenizer(model_path)
    rendering = resolve_rendering(config.prompt.rendering, tokenizer)
    template = get_template(settings.template)
    examples, counts = build_examples(
        records, template, tokenizer, rendering, settings.max_length, settings.overlong
    )
    if not examples:
        raise DataError(
            f"{config.data.train}: no training records left: all {len(records)} are longer than "
            f"train.max_length={settings.max_length}; raise it or use shorter records"
        )
    checkpoints = output_dir / "checkpoints"
    trainer = build_trainer(
        config, examples, tokenizer, model_path, checkpoints, [LogLineCallback(examples, settings)]
    )

    resume = last_checkpoint(checkpoints)
    if resume:
        logger.info("resuming training from %s", resume)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - started
    logger.info("training done in %.0f s; peak RSS of this process %.0f MiB", elapsed, peak_rss_mb())

    if trainer.is_world_process_zero():
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
            peak_rss_mb=round(peak_rss_mb()),
            base_dtype=training_dtype(config.model.dtype, settings.dtype, settings.method, pick_device(config.model.device)),
        ),
    )
    if trainer.is_world_process_zero():
        shutil.rmtree(checkpoints, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return output_dir / ADAPTER_DIR


def build_trainer(config: Config, examples: list[Example], tokenizer, model_path: str, checkpoints: Path,
                  callbacks: list, **overrides):
    """Load the model and set up the trainer exactly as ``train`` runs it.

    ``overrides`` replace SFTConfig fields (the throughput benchmark sets ``max_steps``).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from sdft.models import pick_device, training_dtype

    settings = config.train
    dataset = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "completion_mask": [e.completion_mask for e in examples],
        }
    )
    device = pick_device(config.model.device)
    dtype = training_dtype(config.model.dtype, settings.dtype, settings.method, device)
    logger.info("training on %s with %s base weights", device, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    peft_config = lora_config(settings) if settings.method == "lora" else None
    trainer_class = chunked_loss_trainer() if settings.loss_chunk_tokens else sft_trainer()
    trainer = trainer_class(
        model=model,
        args=sft_config(settings, checkpoints, device, dtype, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.loss_chunk_tokens = settings.loss_chunk_tokens
    return trainer


def sft_trainer():
    from trl import SFTTrainer

    return SFTTrainer


@functools.cache
def chunked_loss_trainer():
    """Return an SFTTrainer subclass whose training loss is ``supervised_loss``.

    TRL's own loss scores every position, prompt and padding included, and computes
    entropy and accuracy for its logs on each; this one projects only the supervised
    positions through the LM head, a chunk at a time, and computes the gradient of
    each chunk while its logits are at hand, so they are never kept for backward.
    """
    from trl import SFTTrainer

    class ChunkedLossSFTTrainer(SFTTrainer):
        loss_chunk_tokens = 256

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            causal = causal_lm(self.accelerator.unwrap_model(model))
            if return_outputs or not model.training or "labels" not in inputs or not plain_lm_head(causal):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            backbone_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            backbone_inputs["use_cache"] = False
            # accelerate applies mixed precision by wrapping ``model.forward``, which this path
            # does not call, so it enters the same autocast context itself.
            with self.accelerator.autocast():
                hidden = getattr(causal, causal.base_model_prefix)(**backbone_inputs).last_hidden_state
                loss, correct, entropy, count = supervised_loss(
                    hidden, causal.get_output_embeddings(), labels, self.loss_chunk_tokens, num_items_in_batch
                )
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            self.record_metrics(inputs, correct, entropy, count)
            return loss

        def record_metrics(self, inputs, correct, entropy, count):
            """Keep TRL's logged fields: token accuracy, entropy and the running token count."""
            metrics = getattr(self, "_metrics", None)
            if metrics is None:
                return
            gather = self.accelerator.gather_for_metrics
            total = gather(count).sum()
            if total > 0:
                metrics["train"]["mean_token_accuracy"].append((gather(correct).sum() / total).item())
                metrics["train"]["entropy"].append((gather(entropy).sum() / total).item())
            if "attention_mask" in inputs:
                tokens = gather(inputs["attention_mask"].sum()).sum().item()
            else:
                tokens = gather(torch.tensor(inputs["input_ids"].numel())).sum().item()
            self._total_train_tokens = getattr(self, "_total_train_tokens", 0) + tokens
            metrics["train"]["num_tokens"] = [self._total_train_tokens]

    return ChunkedLossSFTTrainer


def causal_lm(model):
    """Return the causal LM under a PEFT wrapper (the LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_lm_head(causal) -> bool:
    """Whether logits are exactly ``lm_head(hidden)``: no scaling, soft-capping or bias."""
    config = causal.config.get_text_config() if hasattr(causal.config, "get_text_config") else causal.config
    scaled = any(
        getattr(config, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling")
    )
    head = causal.get_output_embeddings()
    return not scaled and head is not None and getattr(head, "bias", None) is None


def supervised_loss(hidden, lm_head, labels, chunk_tokens: int, num_items_in_batch=None):
    """Cross-entropy of the next-token labels, over supervised positions only, in chunks.

    Args:
        hidden: Final hidden states ``[batch, length, width]``.
        lm_head: The output projection (its weight is ``[vocab, width]``).
        labels: ``[batch, length]``, -100 where not supervised; shifted here as in TRL.
        chunk_tokens: Positions projected through the LM head at a time.
        num_items_in_batch: Denominator over all accumulated micro-batches, as TRL
            uses it; the count of supervised positions here when None.

    Returns:
        The loss and, for logging only, the counts of top-1 hits, the entropy sum and
        the count of supervised positions.

    NOTE: under DDP each process divides by its own count, so from the second step on
    two processes drift slightly (about 1e-3 relative) from one process with the same batch.
    """
    targets = labels[:, 1:]
    mask = targets != -100
    selected = hidden[:, :-1][mask]
    total, correct, entropy = SupervisedCrossEntropy.apply(selected, lm_head.weight, targets[mask], chunk_tokens)
    count = mask.sum()
    denominator = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return total / denominator, correct, entropy, count


class SupervisedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk.

    The forward pass computes each chunk's logits once and turns them straight into
    the gradients (softmax minus one-hot); only those, of the size of ``hidden`` (and
    of ``weight`` when it is trained), are kept for the backward pass.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if need_weight else None
        exact = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 logits are summed in fp32
        total = torch.zeros((), dtype=exact, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        entropy = torch.zeros((), dtype=exact, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            piece, target = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits = (piece @ weight.t()).to(exact)
            log_norm = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(-1, target[:, None]).squeeze(-1)
            total += (log_norm - target_logit).sum()
            correct += (logits.argmax(-1) == target).sum()
            log_probs = logits.sub_(log_norm[:, None])  # in place: the raw logits are not needed again
            probs = log_probs.exp()
            entropy -= torch.linalg.vecdot(probs, log_probs).sum()
            del logits, log_probs
            probs[torch.arange(len(target), device=probs.device), target] -= 1.0  # now d(loss)/d(logits)
            if need_hidden:
                grad_hidden[start : start + chunk_tokens] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += probs.t() @ piece.to(probs.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct, entropy)
        return total, correct, entropy

    @staticmethod
    def backward(ctx, grad_total, *_):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def lora_config(settings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_targets,
        task_type="CAUSAL_LM",
    )


def sft_config(settings, checkpoints: Path, device: str, dtype: str, **overrides):
    """Map our settings onto SFTConfig, overriding TRL defaults that differ from the paper's."""
    from trl import SFTConfig

    chosen = dict(
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
        padding_free=settings.packing,
        use_cpu=device == "cpu",
        report_to=[],
        disable_tqdm=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
    )
    return SFTConfig(**{**chosen, **overrides})


def last_checkpoint(checkpoints: Path) -> str | None:
    """Return the newest complete checkpoint folder, if any.

    A kill during a save leaves a checkpoint folder without a readable
    ``trainer_state.json``, which the trainer writes last; such folders are
    removed so the run resumes from the previous complete one.
    """
    if not checkpoints.is_dir():
        return None
    candidates = [p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for folder in sorted(candidates, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
            return str(folder)
        except (OSError, ValueError):
            logger.warning("%s: incomplete checkpoint (interrupted save), removing it", folder)
            if is_main():
                shutil.rmtree(folder, ignore_errors=True)
    return None


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

"""Generation and training throughput of sdft on this machine, against plain baselines.

    python bench/throughput.py                       # the full run, about 15 minutes on 2 quiet cores
    python bench/throughput.py --prompts 16 --max-new-tokens 64 --train-records 16   # a quick check

Generation (greedy, float32, the embedded SmolLM2-135M-Instruct) runs three ways.
The batch-1 baseline is plain ``model.generate``, one prompt at a time, on a subset
of the prompts. ``sdft.generation.generate`` runs on all prompts at each batch size,
as a stream (``compact: true``, the default) and batch by batch through
``model.generate`` (``compact: false``). llama.cpp runs on the same GGUF file when ``llama_cpp``
(llama-cpp-python) is importable. The prompts are GSM8K test
questions in the ``gsm8k_infer`` template and AdvBench goals in the ``alpaca``
template, both in the chat rendering, as ``sdft eval`` builds them.

Training (LoRA): sdft's trainer as ``sdft train`` sets it up, a few variants of
it, and TRL's ``SFTTrainer`` with its defaults on the same records as
prompt/completion conversations, each for the same number of optimizer steps.

Every configuration runs in its own subprocess; its peak RSS is that process's
``ru_maxrss`` as returned by ``os.wait4``. Output tokens are counted the same way
for every backend: the tokens of the decoded completion, re-tokenized. Training
tokens are the real (non-padding) tokens of the batches processed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAILURES: dict[str, str] = {}  # label of a failed worker -> reason shown in the tables
BASELINE_PROMPTS = 8
LLAMA_SWEEP_PROMPTS = 32
LLAMA_PARALLEL = (8, 16, 32)
TRL_KEPT_DEFAULTS = (
    "per_device_train_batch_size=8, gradient_accumulation_steps=1, gradient_checkpointing=True, "
    "bf16=True (autocast on CPU), max_length=1024, padded batches (no padding_free, no packing), "
    "optim=adamw_torch_fused, completion-only loss, TRL's fused chunked LM-head loss"
)
TRL_CHANGED = (
    "use_cpu=True (SFTConfig refuses bf16 without it on a machine without GPU); learning_rate, "
    "lr_scheduler_type and the LoRA adapter set to sdft's so the loss curves are comparable (no "
    "effect on speed); max_steps, logging_steps=1, save_strategy=no, report_to=[] for the measurement"
)


# ----------------------------------------------------------------------------- prompts and data


def data_dir() -> Path:
    chosen = os.environ.get("SDFT_DATA_DIR")
    return Path(chosen) if chosen else REPO.parent / "shared" / "data"


def bench_prompts(tokenizer, count: int) -> tuple[list[str], list[int]]:
    """Return ``count`` prompts (GSM8K first, then AdvBench) and the indices of the baseline subset."""
    from sdft.data import load_dataset_records
    from sdft.prompts import get_template, render_prompt

    math_count, safety_count = (count + 1) // 2, count // 2
    math = load_dataset_records("gsm8k_test", data_dir=data_dir(), limit=math_count)
    safety = load_dataset_records("advbench", data_dir=data_dir(), limit=safety_count, require_response=False)
    prompts = [render_prompt(get_template("gsm8k_infer"), r, tokenizer, "chat") for r in math]
    prompts += [render_prompt(get_template("alpaca"), r, tokenizer, "chat") for r in safety]
    half = min(BASELINE_PROMPTS // 2, safety_count)
    subset = list(range(min(BASELINE_PROMPTS - half, math_count))) + [math_count + i for i in range(half)]
    return prompts, subset


def count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts)


def train_records(count: int):
    from sdft.data import load_dataset_records

    return load_dataset_records("gsm8k", data_dir=data_dir(), limit=count)


# ----------------------------------------------------------------------------- generation workers


def warm_up(model, tokenizer) -> None:
    import torch

    inputs = tokenizer("Hello", return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)


def work_baseline(spec: dict) -> dict:
    """Plain ``model.generate``, one prompt at a time."""
    import torch

    from sdft.generation import end_token_ids
    from sdft.models import load_model

    loaded = load_model("embedded")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts, subset = bench_prompts(tokenizer, spec["prompts"])
    warm_up(model, tokenizer)
    outputs = []
    started = time.perf_counter()
    for index in subset:
        inputs = tokenizer(prompts[index], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=spec["max_new_tokens"],
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=end_token_ids(tokenizer, model),
            )
        new = output[0, inputs["input_ids"].shape[1] :]
        outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    elapsed = time.perf_counter() - started
    return {"outputs": outputs, "indices": subset, "seconds": elapsed, "tokens": count_tokens(tokenizer, outputs)}


def work_sdft_generate(spec: dict) -> dict:
    """``sdft.generation.generate`` on all prompts at one batch size."""
    from sdft.config import GenerationConfig
    from sdft.generation import generate
    from sdft.models import load_model

    loaded = load_model("embedded")
    prompts, subset = bench_prompts(loaded.tokenizer, spec["prompts"])
    warm_up(loaded.model, loaded.tokenizer)
    settings = GenerationConfig(
        mode="greedy", max_new_tokens=spec["max_new_tokens"], batch_size=spec["batch_size"], compact=spec["compact"]
    )
    started = time.perf_counter()
    outputs = generate(loaded, prompts, settings, "bench", description="sdft generate")
    elapsed = time.perf_counter() - started
    return {
        "outputs": [outputs[i] for i in subset],
        "indices": subset,
        "seconds": elapsed,
        "tokens": count_tokens(loaded.tokenizer, outputs),
    }


def work_llama_cpp(spec: dict) -> dict:
    """llama.cpp on the embedded GGUF: batch 1 on the subset, a sweep of parallel sequences, the best on all."""
    import llama_cpp

    from sdft.models import find_embedded_gguf, load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("embedded"))
    prompts, subset = bench_prompts(tokenizer, spec["prompts"])
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    end_ids = {tokenizer.eos_token_id}
    threads = max(1, len(os.sched_getaffinity(0)))
    longest = max(len(ids) for ids in encoded) + spec["max_new_tokens"] + 8

    silence = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept alive while in use
    llama_cpp.llama_log_set(silence, None)
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    # The extra buffer types include the AMX matmul kernel, which crashes (SIGSEGV in
    # ggml_backend_amx_mul_mat) on CPUs that report AMX inside a VM that does not grant it.
    model_params.use_extra_bufts = spec.get("llama_extra_bufts", False)
    model = llama_cpp.llama_model_load_from_file(str(find_embedded_gguf()).encode(), model_params)
    if not model:
        raise RuntimeError("llama.cpp could not load the GGUF file")
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    def run(indices: list[int], parallel: int) -> dict:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = longest * parallel
        params.n_batch = max(512, longest + parallel)
        params.n_seq_max = parallel
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.kv_unified = False  # a KV buffer per sequence
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {parallel} sequences")
        try:
            started = time.perf_counter()
            ids = llama_greedy(
                llama_cpp, ctx, vocab, [encoded[i] for i in indices], parallel, params.n_batch,
                spec["max_new_tokens"], end_ids,
            )
            elapsed = time.perf_counter() - started
        finally:
            llama_cpp.llama_free(ctx)
        texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
        return {"texts": texts, "seconds": elapsed, "tokens": count_tokens(tokenizer, texts)}

    results = {"version": llama_cpp.__version__, "threads": threads, "runs": []}
    try:
        single = run(subset, 1)
        results["runs"].append({"setting": "batch 1", "prompts": len(subset), **rate(single)})
        results["outputs"] = single["texts"]
        sweep = list(range(min(LLAMA_SWEEP_PROMPTS, len(prompts))))
        best = None
        for parallel in LLAMA_PARALLEL:
            if parallel > len(sweep):
                continue
            row = {"setting": f"{parallel} sequences (sweep)", "prompts": len(sweep), **rate(run(sweep, parallel))}
            results["runs"].append(row)
            if best is None or row["tokens_per_s"] > best[1]:
                best = (parallel, row["tokens_per_s"])
        if best is not None:
            final = run(list(range(len(prompts))), best[0])
            results["runs"].append({"setting": f"{best[0]} sequences (best)", "prompts": len(prompts), **rate(final)})
            results["batched_outputs"] = [final["texts"][i] for i in subset]
    finally:
        llama_cpp.llama_model_free(model)
    return results


def rate(measured: dict) -> dict:
    return {
        "seconds": measured["seconds"],
        "tokens": measured["tokens"],
        "tokens_per_s": measured["tokens"] / max(measured["seconds"], 1e-9),
    }


def llama_greedy(llama_cpp, ctx, vocab: int, prompts: list[list[int]], parallel: int, capacity: int,
                 max_new: int, end_ids: set) -> list[list[int]]:
    """Decode greedily with up to ``parallel`` sequences in flight (continuous batching).

    Each call of ``llama_decode`` carries the last token of every running sequence and
    the prompts of sequences started in free slots. A finished sequence frees its slot
    and its KV cells for the next prompt at once.
    """
    import numpy as np

    batch = llama_cpp.llama_batch_init(capacity, 0, 1)
    memory = llama_cpp.llama_get_memory(ctx)
    outputs: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))
    slots: dict[int, dict] = {}  # sequence id -> prompt index, next position, last token
    try:
        while waiting or slots:
            entries = [(state["last"], state["position"], seq, True) for seq, state in slots.items()]
            for seq in range(parallel):
                if seq in slots or not waiting:
                    continue
                tokens = prompts[waiting[0]]
                if len(entries) + len(tokens) > capacity:
                    break
                index = waiting.pop(0)
                llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
                entries += [(token, position, seq, position == len(tokens) - 1) for position, token in enumerate(tokens)]
                slots[seq] = {"prompt": index, "position": len(tokens), "last": None}
            batch.n_tokens = len(entries)
            rows = {}
            for row, (token, position, seq, wants) in enumerate(entries):
                batch.token[row] = token
                batch.pos[row] = position
                batch.n_seq_id[row] = 1
                batch.seq_id[row][0] = seq
                batch.logits[row] = wants
                if wants:
                    rows[seq] = row
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for seq, row in rows.items():
                state = slots[seq]
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(vocab,))
                token = int(logits.argmax())
                produced = outputs[state["prompt"]]
                if token in end_ids or len(produced) + 1 >= max_new:
                    if token not in end_ids:
                        produced.append(token)
                    del slots[seq]
                    llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
                    continue
                produced.append(token)
                if state["last"] is not None:
                    state["position"] += 1
                state["last"] = token
    finally:
        llama_cpp.llama_batch_free(batch)
    return outputs


# ----------------------------------------------------------------------------- training workers


def step_timer():
    """Return a callback that times optimizer steps and reads the trainer's count of real tokens."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.marks: list[tuple[float, int, int]] = []

        def tokens(self) -> int:
            count = getattr(self.trainer, "_total_train_tokens", None)
            if count is None:
                raise RuntimeError("this TRL version keeps no _total_train_tokens; cannot count tokens")
            return int(count)

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), 0, 0))

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.global_step, self.tokens()))

    return StepTimer()


def training_result(trainer, timer) -> dict:
    marks = timer.marks
    first = marks[1] if len(marks) > 2 else marks[0]  # the first optimizer step is warm-up
    last = marks[-1]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "steps": trainer.state.global_step,
        "tokens": last[2] - first[2],
        "seconds": last[0] - first[0],
        "all_tokens": last[2],
        "all_seconds": last[0] - marks[0][0],
        "losses": losses,
    }


def work_train_ours(spec: dict) -> dict:
    import dataclasses

    from sdft.config import Config
    from sdft.models import load_tokenizer, resolve_model_path
    from sdft.prompts import get_template, resolve_rendering
    from sdft.training import build_examples, build_trainer

    config = Config()
    config.train = dataclasses.replace(config.train, **spec["overrides"])
    config.model = dataclasses.replace(config.model, **spec.get("model_overrides", {}))
    settings = config.train
    path = resolve_model_path("embedded")
    tokenizer = load_tokenizer(path)
    rendering = resolve_rendering(config.prompt.rendering, tokenizer)
    examples, _ = build_examples(
        train_records(spec["records"]), get_template(settings.template), tokenizer, rendering,
        settings.max_length, settings.overlong,
    )
    timer = step_timer()
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(
            config, examples, tokenizer, path, Path(scratch), [timer],
            max_steps=spec["steps"], save_strategy="no", logging_steps=1, disable_tqdm=True,
            **spec.get("sft_overrides", {}),
        )
        timer.trainer = trainer
        trainer.train()
    return {
        **training_result(trainer, timer),
        "micro_batch": settings.batch_size,
        "accumulation": settings.gradient_accumulation,
    }


def work_train_trl(spec: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sdft.config import TrainConfig
    from sdft.models import load_tokenizer, resolve_model_path
    from sdft.prompts import chat_messages, get_template, resolve_rendering
    from sdft.training import build_examples, lora_config

    settings = TrainConfig()
    path = resolve_model_path("embedded")
    records = train_records(spec["records"])
    template = get_template(settings.template)
    dataset = Dataset.from_dict(
        {
            "prompt": [chat_messages(template, r) for r in records],
            "completion": [[{"role": "assistant", "content": r.response}] for r in records],
        }
    )
    timer = step_timer()
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            use_cpu=True,
            bf16=spec["bf16"],
            learning_rate=settings.learning_rate,
            lr_scheduler_type=settings.lr_scheduler,
            max_steps=spec["steps"],
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
        )
        trainer = SFTTrainer(model=path, args=args, train_dataset=dataset, peft_config=lora_config(settings), callbacks=[timer])
        timer.trainer = trainer
        trainer.train()
    # Do TRL's tokens and labels (its completion mask turned into labels) equal sdft's for the same records?
    tokenizer = load_tokenizer(path)
    ours, _ = build_examples(records, template, tokenizer, resolve_rendering("auto", tokenizer), 1024, "truncate")
    same = sum(
        e.input_ids == row["input_ids"]
        and [t if m else -100 for t, m in zip(e.input_ids, e.completion_mask)] == row["labels"]
        for e, row in zip(ours, trainer.train_dataset)
    )
    return {
        **training_result(trainer, timer),
        "micro_batch": args.per_device_train_batch_size,
        "accumulation": args.gradient_accumulation_steps,
        "same_tokens": same,
        "records": len(records),
    }


WORKERS = {
    "baseline": work_baseline,
    "sdft_generate": work_sdft_generate,
    "llama_cpp": work_llama_cpp,
    "train_ours": work_train_ours,
    "train_trl": work_train_trl,
}


def worker_main(kind: str, spec_path: str, result_path: str) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[kind](spec)
    Path(result_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- the parent


def run_worker(kind: str, spec: dict, label: str, logs: Path) -> dict | None:
    """Run one configuration in a fresh process; return its result with its peak RSS, or None."""
    logs.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
    spec_path, result_path, log_path = (logs / f"{slug}.{suffix}" for suffix in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, str(spec_path), str(result_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started

    if process.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        if process.returncode < 0:
            FAILURES[label] = f"crashed: {signal.Signals(-process.returncode).name}"
        else:
            FAILURES[label] = f"failed: {tail[-1][:120] if tail else f'exit {process.returncode}'}"
        print(f"  failed (exit {process.returncode}); log {log_path}:\n    " + "\n    ".join(tail), flush=True)
        return None
    result = json.loads(result_path.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports kilobytes
    result["wall_s"] = wall
    print(f"  done in {wall:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def hardware() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "usable cores": len(os.sched_getaffinity(0)), "memory": memory}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "llama-cpp-python"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def llama_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def same_count(outputs: list[str], reference: list[str]) -> str:
    return f"{sum(a == b for a, b in zip(outputs, reference))}/{len(reference)}"


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def generation_section(args, baseline, ours: list, llama, llama_note: str) -> tuple[str, list[str]]:
    header = ["backend", "setting", "prompts", "output tokens", "seconds", "tokens/s", "vs batch 1",
              "same as batch 1", "peak RSS MB"]
    rows, verdicts = [], []
    base_rate = baseline["tokens"] / baseline["seconds"] if baseline else None
    reference = baseline["outputs"] if baseline else None

    def add(backend, setting, prompts, result, outputs, rss):
        speed = result["tokens"] / max(result["seconds"], 1e-9)
        rows.append([
            backend, setting, str(prompts), str(result["tokens"]), fmt(result["seconds"]), fmt(speed),
            f"{speed / base_rate:.1f}x" if base_rate else "-",
            same_count(outputs, reference) if reference and outputs is not None else "-", fmt(rss, 0),
        ])
        return speed

    if baseline:
        add("transformers generate", "batch 1", len(baseline["indices"]), baseline, baseline["outputs"],
            baseline["peak_rss_mb"])
    best = None
    for setting, result in ours:
        if result is None:
            reason = FAILURES.get(f"sdft generate {setting}", "failed")
            rows.append(["sdft generate", setting, str(args.prompts), reason, "-", "-", "-", "-", "-"])
            continue
        speed = add("sdft generate", setting, args.prompts, result, result["outputs"], result["peak_rss_mb"])
        if "stream" in setting and (best is None or speed > best[1]):
            best = (setting, speed, result)
    if llama:
        for run in llama["runs"]:
            outputs = llama["outputs"] if run["setting"] == "batch 1" else (
                llama.get("batched_outputs") if "(best)" in run["setting"] else None
            )
            add(f"llama.cpp {llama['version']}", run["setting"], run["prompts"], run, outputs, llama["peak_rss_mb"])
    else:
        rows.append(["llama.cpp", llama_note, "-", "-", "-", "-", "-", "-", "-"])
    if best and base_rate:
        ratio = best[1] / base_rate
        identical = best[2]["outputs"] == reference
        verdicts.append(
            f"- Generation target (at least 10x batch 1, identical outputs): {ratio:.1f}x at {best[0]}, "
            f"outputs {'identical' if identical else 'NOT identical'} on the {len(reference)} shared prompts: "
            f"{'met' if ratio >= 10 and identical else 'not met'}."
        )
    llama_best = next((run for run in llama["runs"] if "(best)" in run["setting"]), None) if llama else None
    if llama_best and best:
        ratio = best[1] / llama_best["tokens_per_s"]
        verdicts.append(
            f"- llama.cpp target (at least its best throughput): sdft generate ({best[0]}) runs at {ratio:.2f}x "
            f"llama.cpp's best ({llama_best['setting']}, {llama['threads']} threads, flash attention, a KV buffer "
            f"per sequence, the GGUF's Q4_1 weights): {'met' if ratio >= 1 else 'not met'}."
        )
    text = markdown_table(header, rows)
    return text, verdicts


def training_section(args, results: list) -> tuple[str, str, list[str]]:
    header = ["setup", "micro-batch x accumulation", "steps timed", "real tokens", "seconds", "tokens/s",
              "vs TRL default", "peak RSS MB", "first / last loss", "mean abs loss diff vs TRL"]
    trl = next((r for label, r in results if label == "TRL default" and r), None)
    rows, verdicts = [], []
    for label, result in results:
        if result is None:
            rows.append([label, "-", "-", FAILURES.get(label, "failed"), "-", "-", "-", "-", "-", "-"])
            continue
        speed = result["tokens"] / max(result["seconds"], 1e-9)
        trl_speed = trl["tokens"] / max(trl["seconds"], 1e-9) if trl else None
        diff = None
        if trl and result is not trl:
            pairs = list(zip(result["losses"], trl["losses"]))
            diff = sum(abs(a - b) for a, b in pairs) / max(len(pairs), 1)
        losses = result["losses"]
        rows.append([
            label, f"{result['micro_batch']} x {result['accumulation']}", str(max(result["steps"] - 1, 1)),
            str(result["tokens"]), fmt(result["seconds"]), fmt(speed),
            f"{speed / trl_speed:.2f}x" if trl_speed else "-", fmt(result["peak_rss_mb"], 0),
            f"{losses[0]:.3f} / {losses[-1]:.3f}" if losses else "-", fmt(diff, 3) if diff is not None else "-",
        ])
    ours = next((r for label, r in results if label == "sdft (defaults)" and r), None)
    if ours and trl:
        speed = (ours["tokens"] / ours["seconds"]) / (trl["tokens"] / trl["seconds"])
        memory = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        verdicts.append(
            f"- Training target (at least 1.5x TRL's tokens/s at no more than half its peak memory): "
            f"{speed:.2f}x, peak RSS {memory:.2f} of TRL's: {'met' if speed >= 1.5 and memory <= 0.5 else 'not met'}."
        )
        if "same_tokens" in trl:
            verdicts.append(
                f"- TRL's tokenization and loss mask equal sdft's for {trl['same_tokens']} of {trl['records']} records."
            )
    curves = ""
    if ours and trl:
        steps = max(len(ours["losses"]), len(trl["losses"]))
        curve_rows = [
            [str(step + 1)] + [
                f"{r['losses'][step]:.4f}" if r and step < len(r["losses"]) else "-"
                for _, r in results
            ]
            for step in range(steps)
        ]
        curves = markdown_table(["step"] + [label for label, _ in results], curve_rows)
    return markdown_table(header, rows), curves, verdicts


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64, help="generation prompts, half GSM8K, half AdvBench")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", default="32,64", help="comma-separated batch sizes of sdft generate")
    parser.add_argument("--train-records", type=int, default=32, help="GSM8K training records")
    parser.add_argument("--train-steps", type=int, default=4, help="optimizer steps per training setup (first is warm-up)")
    parser.add_argument("--train-variants", default="mb1,packed,fp32,trl-loss,trl-fp32",
                        help="extra setups: mb1 (micro-batch 1), group (group_by_length), packed (padding-free "
                             "micro-batches), fp32 (float32 base weights), trl-loss "
                             "(sdft with TRL's loss), trl-fp32 (TRL default with bf16=False); 'none' for none")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--output", default="docs/benchmarks.md")
    parser.add_argument("--logs", default=None, help="folder for worker logs (default: a temporary folder)")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    variants = [] if args.train_variants == "none" else [v.strip() for v in args.train_variants.split(",")]
    command = " ".join(["python bench/throughput.py", *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])

    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="sdft-bench-"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    sections, verdicts = [], []

    if not args.skip_generation:
        common = {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens}
        baseline = run_worker("baseline", common, "baseline batch 1", logs)
        ours = []
        for size in batch_sizes:
            for compact in (True, False):
                setting = f"batch {size}, {'stream' if compact else 'model.generate per batch'}"
                ours.append((setting, run_worker("sdft_generate", {**common, "batch_size": size, "compact": compact},
                                                 f"sdft generate {setting}", logs)))
        llama, note = None, ""
        if args.skip_llama_cpp:
            note = "skipped (--skip-llama-cpp)"
        elif not llama_available():
            note = "not installed (pip install llama-cpp-python builds it, about 5 min)"
        else:
            llama = run_worker("llama_cpp", common, "llama.cpp", logs)
            note = f"{FAILURES.get('llama.cpp', 'failed')} (log: {logs})" if llama is None else ""
        table, found = generation_section(args, baseline, ours, llama, note)
        verdicts += found
        sections.append(
            f"## Generation\n\nGreedy, float32, up to {args.max_new_tokens} new tokens, {args.prompts} prompts "
            f"({(args.prompts + 1) // 2} GSM8K test questions in `gsm8k_infer`, {args.prompts // 2} AdvBench "
            f"goals in `alpaca`, chat rendering). Batch 1 and the identity check use "
            f"{len(baseline['indices']) if baseline else '-'} of them (half from each set). Output tokens: "
            f"the decoded completions re-tokenized, the same count for every backend.\n\n{table}\n"
        )

    if not args.skip_training:
        base = {"records": args.train_records, "steps": args.train_steps}
        setups = [
            ("sdft (defaults)", "train_ours", {**base, "overrides": {}}),
            ("TRL default", "train_trl", {**base, "bf16": True}),
        ]
        extra = {
            "mb1": ("sdft, micro-batch 1 x 8", "train_ours",
                    {**base, "overrides": {"batch_size": 1, "gradient_accumulation": 8}}),
            "group": ("sdft, group_by_length", "train_ours",
                      {**base, "overrides": {}, "sft_overrides": {"train_sampling_strategy": "group_by_length"}}),
            "packed": ("sdft, packed (train.packing)", "train_ours", {**base, "overrides": {"packing": True}}),
            "fp32": ("sdft, float32 weights (train.dtype=float32)", "train_ours",
                     {**base, "overrides": {"dtype": "float32"}}),
            "trl-loss": ("sdft, TRL's loss (loss_chunk_tokens=0)", "train_ours",
                         {**base, "overrides": {"loss_chunk_tokens": 0}}),
            "trl-fp32": ("TRL default, bf16=False", "train_trl", {**base, "bf16": False}),
        }
        for name in variants:
            if name not in extra:
                parser.error(f"--train-variants: unknown {name!r}; choose from {', '.join(extra)}")
            setups.append(extra[name])
        results = [(label, run_worker(kind, spec, label, logs)) for label, kind, spec in setups]
        table, curves, found = training_section(args, results)
        verdicts += found
        from sdft.config import TrainConfig

        from sdft.models import training_dtype

        settings = TrainConfig()
        ours_dtype = training_dtype("auto", settings.dtype, settings.method, "cpu")
        sections.append(
            f"## LoRA training\n\nThe first {args.train_records} GSM8K training records in the `gsm8k` template, "
            f"chat rendering; {args.train_steps} optimizer steps of 8 records each, timed from the end of the "
            f"first (warm-up) step. Tokens/s counts real (non-padding) tokens. sdft: r={settings.lora_r} on "
            f"{', '.join(settings.lora_targets)}, base weights in {ours_dtype} (train.dtype auto on this machine; "
            f"float32 adapter weights, autocast), no gradient checkpointing, learning rate "
            f"{settings.learning_rate}, {settings.lr_scheduler} schedule, loss on the completion only"
            f"{f', in chunks of {settings.loss_chunk_tokens} supervised tokens' if settings.loss_chunk_tokens else ''}."
            f"\n\nTRL default: `SFTTrainer(model=path, peft_config=...)` on prompt/completion conversations. Kept "
            f"defaults: {TRL_KEPT_DEFAULTS}. Changed: {TRL_CHANGED}.\n\n{table}\n\n"
            f"Training loss per optimizer step (LoRA dropout makes runs differ a little):\n\n{curves}\n"
        )

    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    machine = hardware()
    header = [
        "# Throughput benchmarks",
        "",
        f"Measured {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} in {elapsed / 60:.1f} min with:",
        "",
        f"    {command}",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores ({machine['usable cores']} usable), {machine['memory']}",
        f"- Load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f}"
        + (" -- a busy machine: treat the numbers as rough" if max(load_before[0], load_after[0]) > machine["cores"] else ""),
        "- " + ", ".join(f"{name} {version}" for name, version in versions().items()),
        "- Model: the embedded SmolLM2-135M-Instruct (`sdft.models.load_model(\"embedded\")`; llama.cpp reads the "
        "same GGUF file)",
        "- llama.cpp: extra buffer types off (`use_extra_bufts=False`); with them its AMX matmul kernel crashes "
        "on this machine's CPU.",
        "- Peak RSS: each configuration runs in its own process, model loading included (llama.cpp runs all "
        "its settings in one process).",
        "",
    ]
    if verdicts:
        header += ["## Targets", ""] + verdicts + [""]
    text = "\n".join(header) + "\n" + "\n".join(sections)
    print("\n" + text)
    output = Path(args.output)
    if not output.is_absolute():
        output = REPO / output
    output.parent.mkdir(parents=True, exist_ok=True)
    from sdft.io import atomic_write_text

    atomic_write_text(output, text)
    print(f"written to {output}; worker logs in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

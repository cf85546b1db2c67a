"""Run configuration: typed sections read from YAML and overridden from the CLI.

    sdft run configs/quickstart.yaml --set train.epochs=3 --set eval.limit=32

Unknown keys are rejected with the nearest valid name; values are type-checked
before any model is loaded. Generation defaults follow the paper (sampling with
temperature 0.95, top_p 0.7, top_k 50, 512 new tokens); ``mode: greedy`` gives
reproducible outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sdft.prompts import TEMPLATES

from sdft.benchmarks import benchmark_names

CHECKS = ("math", "openfunction", "code", "none")
BENCHMARKS = benchmark_names()


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


@dataclass
class ModelConfig:
    """The seed model."""

    name: str = "embedded"
    """Hugging Face id, local folder, .gguf file, or 'embedded' (SmolLM2-135M-Instruct)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """auto (float32 on CPU, bfloat16 on GPUs), float32, bfloat16 or float16."""

    def __post_init__(self):
        check_choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class DataConfig:
    """The task dataset used for fine-tuning."""

    train: str = "gsm8k"
    """File path, dataset name (gsm8k, alpaca, dolly, lima, openfunction, ...) or Hub id."""
    data_dir: str | None = None
    """Local folder of named datasets; falls back to $SDFT_DATA_DIR, then the Hub."""
    format: str = "auto"
    """auto, alpaca, messages, gsm8k, advbench or multiarith."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map from instruction/input/response/history/messages/id to the file's column names."""
    limit: int | None = None
    """Use only the first N training records."""
    invalid: str = "error"
    """Rows with a missing, empty or mistyped field: error (stop) or skip (drop and count)."""

    def __post_init__(self):
        from sdft.data import FORMATS

        check_choice("data.format", self.format, FORMATS)
        check_choice("data.invalid", self.invalid, ("error", "skip"))
        check_positive("data.limit", self.limit)
        valid = {"instruction", "input", "response", "history", "messages", "id"}
        for key in self.columns:
            if key not in valid:
                raise ConfigError(
                    f"data.columns.{key}: unknown field{suggest(key, valid)}; "
                    f"valid fields: {', '.join(sorted(valid))}"
                )


@dataclass
class GenerationConfig:
    """Decoding settings for rewriting and generative evaluation."""

    mode: str = "sample"
    """sample (the paper's settings) or greedy (reproducible)."""
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    max_new_tokens: int = 512
    batch_size: int = 32
    """Prompts generated together; larger is faster until memory runs out."""
    seed: int = 42
    compact: bool = True
    """Decode as one stream in which finished rows leave the batch and waiting prompts take their
    places (continuous batching). Off runs ``model.generate`` batch by batch, where one
    seeded generator serves each batch, so sampled outputs then depend on ``batch_size``."""
    backend: str = "transformers"
    """transformers (any device) or vllm (GPUs, needs the vllm package; single process)."""
    vllm_memory: float = 0.5
    """vllm only: fraction of GPU memory for its engine; the transformers copy of the model
    (used for likelihoods and the harness) keeps the rest."""

    def __post_init__(self):
        check_choice("generation.mode", self.mode, ("sample", "greedy"))
        check_choice("generation.backend", self.backend, ("transformers", "vllm"))
        if not 0 < self.vllm_memory < 1:
            raise ConfigError("generation.vllm_memory: must be in (0, 1)")
        check_positive("generation.max_new_tokens", self.max_new_tokens)
        check_positive("generation.batch_size", self.batch_size)
        if self.temperature <= 0:
            raise ConfigError("generation.temperature: must be > 0; use mode: greedy instead")


@dataclass
class PromptConfig:
    """Prompt rendering: the layout that turns templates into model input."""

    rendering: str = "auto"
    """raw (the authors' plain-text layout), chat (the model's chat template) or auto
    (chat when the tokenizer has a chat template)."""

    def __post_init__(self):
        check_choice("prompt.rendering", self.rendering, ("auto", "raw", "chat"))


@dataclass
class DistillConfig:
    """Rewriting the training responses with the seed model."""

    template: str = "gsm8k_distill"
    check: str = "math"
    """Task check of the selection rule: math, openfunction, code or none."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    nll_gap: bool = True
    """Measure the seed model's per-token NLL of original vs distilled responses."""
    nll_limit: int | None = None
    """Measure the NLL gap on the first N records only."""
    mix: float = 1.0
    """Share of records (0 to 1) that train on their accepted rewrites; the rest keep the originals."""
    mix_seed: int = 42

    def __post_init__(self):
        check_positive("distill.nll_limit", self.nll_limit)
        if not 0.0 <= self.mix <= 1.0:
            raise ConfigError(f"distill.mix: must be between 0 and 1, got {self.mix}")
        check_choice("distill.template", self.template, tuple(TEMPLATES))
        check_choice("distill.check", self.check, CHECKS)
        if not TEMPLATES[self.template].rewrite:
            raise ConfigError(
                f"distill.template: {self.template!r} does not show a reference answer; use "
                "gsm8k_distill, alpaca_distill_using or alpaca_distill_refer"
            )


@dataclass
class TrainConfig:
    """Supervised fine-tuning (LoRA or full)."""

    template: str = "gsm8k"
    method: str = "lora"
    """lora or full."""
    epochs: float = 5.0
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps with a linear warm-up, below 1."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 2
    """Micro-batch size per device."""
    gradient_accumulation: int = 4
    max_length: int = 1024
    """Maximum tokens of prompt plus response."""
    overlong: str = "truncate"
    """Policy for records longer than max_length: truncate or skip."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    """Put records of similar length into the same micro-batch (less padding; changes the record order)."""
    dtype: str = "auto"
    """Dtype of the base weights while training: auto, float32, bfloat16 or float16. auto follows
    model.dtype when it is set. Otherwise LoRA trains on bfloat16 base weights on CPUs with native
    bfloat16, with float32 adapter weights and autocast."""
    packing: bool = False
    """Join the records of each micro-batch into one row without padding; position ids restart at
    each record and attention stays inside it. Pays on GPUs with padding-heavy batches, not on CPUs."""
    loss_chunk_tokens: int = 256
    """Compute the loss on supervised positions only, through the LM head this many tokens at a time,
    so the full-vocabulary logits are never all in memory; 0 uses TRL's own loss."""
    logging_steps: int = 1
    save_steps: int = 50
    """Checkpoint every N optimizer steps so an interrupted run resumes."""
    seed: int = 42

    def __post_init__(self):
        check_choice("train.template", self.template, tuple(TEMPLATES))
        check_choice("train.method", self.method, ("lora", "full"))
        check_choice("train.overlong", self.overlong, ("truncate", "skip"))
        check_choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        for name in ("batch_size", "gradient_accumulation", "max_length", "lora_r", "save_steps"):
            check_positive(f"train.{name}", getattr(self, name))
        if self.epochs <= 0:
            raise ConfigError("train.epochs: must be > 0")
        if self.learning_rate <= 0:
            raise ConfigError("train.learning_rate: must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train.warmup_ratio: must be in [0, 1)")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("train.lora_dropout: must be in [0, 1)")
        if self.loss_chunk_tokens < 0:
            raise ConfigError("train.loss_chunk_tokens: must be >= 0 (0 uses TRL's own loss)")


@dataclass
class JudgeConfig:
    """A judge model: a local model (Hub id, folder, .gguf, embedded) or an OpenAI-compatible endpoint."""

    model: str | None = None
    """Local judge model; with an endpoint, the model name sent to it."""
    endpoint: str | None = None
    """Base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable that contains the endpoint's API key (never written to outputs)."""
    max_new_tokens: int = 16
    batch_size: int = 8
    format: str = "auto"
    """Safety judges only: generic (answers safe/unsafe), llama_guard, or auto (llama_guard
    when the model name contains "guard")."""

    def __post_init__(self):
        check_choice("judge.format", self.format, ("auto", "generic", "llama_guard"))
        check_positive("judge.max_new_tokens", self.max_new_tokens)
        check_positive("judge.batch_size", self.batch_size)

    @property
    def configured(self) -> bool:
        return bool(self.model or self.endpoint)


@dataclass
class EvalConfig:
    """Benchmarks and drift measures."""

    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k", "multiarith", "advbench", "advbench_jailbreak"])
    template: str = "gsm8k_infer"
    """Template for the math benchmarks."""
    limit: int | None = None
    """Evaluate only the first N examples of every benchmark."""
    limits: dict[str, int] = field(default_factory=dict)
    """Per-benchmark limits that override limit, e.g. {advbench: 64}."""
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    """Per-benchmark caps that override generation.max_new_tokens."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    drift: bool = True
    """Embedding similarity of each model's AdvBench answers to the seed's."""
    embedding_model: str = "auto"
    """Sentence-transformers model for drift; auto uses the packaged all-MiniLM-L6-v2."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Pairwise judge for AlpacaEval win rates."""
    alpaca_eval_reference: str = "1.0"
    """AlpacaEval reference outputs: 1.0 (text-davinci-003) or 2.0 (gpt4_turbo)."""
    safety_judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Classifier judge for advbench_judge, e.g. a Llama Guard checkpoint."""
    harness_batch_size: int = 8
    """Batch size of lm-evaluation-harness log-likelihood requests."""
    rerun: bool = False
    """Recompute benchmarks whose results already exist in the output folder."""

    def __post_init__(self):
        check_choice("eval.template", self.template, tuple(TEMPLATES))
        for name in self.benchmarks:
            check_choice("eval.benchmarks", name, BENCHMARKS)
        for mapping in ("limits", "max_new_tokens"):
            for name, value in getattr(self, mapping).items():
                check_choice(f"eval.{mapping}", name, BENCHMARKS)
                check_positive(f"eval.{mapping}.{name}", value)
        check_positive("eval.limit", self.limit)
        if "advbench_judge" in self.benchmarks and not self.safety_judge.configured:
            raise ConfigError(
                "eval.safety_judge: not set, but eval.benchmarks includes advbench_judge; set "
                "eval.safety_judge.model (a local model such as a Llama Guard checkpoint) or "
                "eval.safety_judge.endpoint, or drop advbench_judge"
            )
        check_positive("eval.harness_batch_size", self.harness_batch_size)
        check_choice("eval.alpaca_eval_reference", self.alpaca_eval_reference, ("1.0", "2.0"))

    def limit_for(self, benchmark: str) -> int | None:
        return self.limits.get(benchmark, self.limit)


@dataclass
class Config:
    """Everything one run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/sdft"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(
            f"{key}: invalid value {value!r}{suggest(str(value), choices)}; "
            f"valid values: {', '.join(map(str, choices))}"
        )


def check_positive(key: str, value) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key}: must be a positive integer, got {value!r}")


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate everything.

    Raises:
        ConfigError: a file, key or value is invalid.
    """
    data = {}
    if path is not None:
        data = read_with_base(Path(path), seen=(Path(path).resolve(),))
    for override in overrides or []:
        apply_override(data, override)
    return build(Config, data, "")


def read_with_base(path: Path, seen: tuple) -> dict:
    """Read a config; a top-level ``base: FILE`` (relative to it) is read first and overlaid."""
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file path, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        chain = " -> ".join(p.name for p in seen + (base_path,))
        raise ConfigError(
            f"{path}: base: {base} includes itself (cycle: {chain}); remove one of the base: lines"
        )
    return deep_merge(read_with_base(base_path, seen + (base_path,)), data)


def deep_merge(base: dict, overlay: dict) -> dict:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid UTF-8; re-save the file as UTF-8") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def apply_override(data: dict, override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"--set {override!r}: invalid value ({problem}); write the value in YAML, "
            "e.g. train.lora_targets=[q_proj,v_proj]"
        ) from err
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1], start=1):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {'.'.join(parts[:depth])} is not a section")
    node[parts[-1]] = value


def build(cls, data, prefix: str):
    """Build a dataclass from a dict, checking keys and value types."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"{name}: unknown key{suggest(str(key), fields)}; valid keys: {', '.join(fields)}"
            )
        kwargs[key] = convert(hints[key], value, name)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(qualify(str(err), prefix)) from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def qualify(message: str, prefix: str) -> str:
    """Give a nested section's message its full key: generation.x becomes distill.generation.x."""
    head, dot, rest = message.partition(".")
    if not prefix or message.startswith(prefix) or not dot or " " in head or ":" in head:
        return message
    return prefix + rest


def convert(hint, value, name: str):
    """Check ``value`` against a type hint, converting ints to floats where allowed."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, name + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(inner[0], value, name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [convert(args[0], item, f"{name}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return {str(k): convert(args[1], v, f"{name}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as text; accept it as the number it plainly is.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads 1.0 or 2 as numbers; text fields take them as written.
    if hint in (float, str) and not isinstance(value, hint):
        expected = "a number" if hint is float else "text"
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")
    return value

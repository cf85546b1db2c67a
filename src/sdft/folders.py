"""Output folders: which command wrote a folder, and whether a new command may reuse it.

``sdft distill``, ``sdft train`` and ``sdft eval`` record their kind, model and
input in ``sdft_output.json``; a folder holding another command's output, or
output made from other input, is rejected before any model loads.
"""

from __future__ import annotations

import os

from pathlib import Path

from sdft.config import Config, ConfigError
from sdft.data import Record, records_fingerprint
from sdft.io import atomic_write_json, read_json

RUN_FILE = "run.json"

# Files that show which command wrote a folder; OUTPUT_FILE names it from now on.
OUTPUT_FILE = "sdft_output.json"
KIND_FILES = {
    "run": (RUN_FILE,),
    "distill": ("distilled.json", "distill_stats.json", "selection.jsonl"),
    "train": ("adapter", "checkpoints", "train_meta.json"),
    "eval": ("scores.json", "results"),
}


def output_identity(kind: str, config: Config, records: list[Record] | None = None, adapter: str | None = None) -> dict:
    """What makes two ``sdft distill|train|eval`` outputs the same: kind, model and input.

    Distillation and evaluation may change other settings between reruns (cached
    generations are keyed by their decoding settings); training also fixes its
    settings, because checkpoints resume only under the settings that wrote them.
    """
    identity = {"kind": kind, "model": config.model.name}
    if records is not None:
        identity["dataset"] = records_fingerprint(records)
    if kind == "train":
        skip = ("logging_steps", "save_steps")
        identity["train"] = {k: v for k, v in config.to_dict()["train"].items() if k not in skip}
        identity["rendering"] = config.prompt.rendering
    if kind == "eval":
        identity["adapter"] = str(Path(adapter).expanduser().resolve()) if adapter else None
    return identity


def check_creatable(output_dir: Path) -> None:
    """Reject a new output folder whose nearest existing parent is not a writable folder."""
    parent = next(folder for folder in output_dir.absolute().parents if folder.exists())
    if not parent.is_dir():
        raise ConfigError(f"{output_dir}: cannot create the folder, {parent} is a file; choose another --output-dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{output_dir}: cannot create the folder, {parent} is not writable; choose another --output-dir"
        )


def claim_output(output_dir: Path, identity: dict, write: bool = True) -> None:
    """Record which command, model and input an output folder contains, or reject the folder.

    A folder is rejected when it contains another command's output, or this command's
    output made from different input (or, for training, other settings). A folder
    without any output of this command is taken over. Called once before the model
    loads (``write=False``) and again under the folder lock.

    Raises:
        ConfigError: the folder contains other output; the message names what differs.
    """
    kind = identity["kind"]
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{output_dir}: exists and is not a folder; choose another --output-dir")
    if not output_dir.exists():
        check_creatable(output_dir)
        if write:
            atomic_write_json(output_dir / OUTPUT_FILE, identity)
        return
    path = output_dir / OUTPUT_FILE
    try:
        previous = read_json(path) if path.exists() else legacy_identity(output_dir, identity)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); delete it if the folder is yours") from err
    if previous and previous.get("kind") != kind:
        raise ConfigError(
            f"{output_dir}: folder contains the output of 'sdft {previous.get('kind')}'; choose another "
            f"--output-dir for 'sdft {kind}'"
        )
    has_output = any((output_dir / name).exists() for name in KIND_FILES[kind])
    changed = changed_keys(previous, identity) if previous else []
    if changed and has_output:
        raise ConfigError(
            f"{output_dir}: folder contains 'sdft {kind}' output made with a different {', '.join(changed)}; "
            "choose another --output-dir, or delete the folder to start over"
        )
    if write and (changed or not path.exists()):
        atomic_write_json(path, identity)


def legacy_identity(output_dir: Path, identity: dict) -> dict | None:
    """Identify a folder written before OUTPUT_FILE existed, from the files it contains."""
    for kind, names in KIND_FILES.items():
        if kind != identity["kind"] and any((output_dir / name).exists() for name in names):
            return {"kind": kind}
    stats = output_dir / "distill_stats.json"
    if identity["kind"] == "distill" and stats.exists():
        recorded = read_json(stats).get("provenance", {}).get("input_hash")
        return {**identity, "dataset": recorded}
    meta = output_dir / "train_meta.json"
    if identity["kind"] == "train" and meta.exists():
        return {**identity, "dataset": read_json(meta).get("data_hash")}
    return None


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys

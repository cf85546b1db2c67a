"""Provenance recorded with every output so it can be rerun: config, versions, hashes, templates."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

from sdft.prompts import TEMPLATES

PACKAGES = ("sdft", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "sentence-transformers")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_revision() -> str | None:
    """Return the commit of the sdft source tree, when it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def provenance(config, templates: list[str], **extra) -> dict:
    """Collect the record saved beside an adapter, dataset or result file.

    It contains no timestamp, so rerunning the same settings writes identical files.
    """
    return {
        "config": config.to_dict(),
        "templates": {name: TEMPLATES[name].text_hash() for name in templates},
        "versions": library_versions(),
        "git_revision": git_revision(),
        **extra,
    }

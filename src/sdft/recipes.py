"""Shipped configs ("recipes"): find them and describe each in one line."""

from __future__ import annotations

from pathlib import Path

from sdft.config import ConfigError


def default_config_dir() -> Path:
    """Return ``configs/`` of the source tree this package runs from."""
    return Path(__file__).resolve().parents[2] / "configs"


def find_recipes(directory: str | None = None) -> list[tuple[str, str]]:
    """List (path relative to the folder, first comment line) for every runnable config.

    Files whose name starts with ``_`` hold shared settings and are not listed, and
    ``accelerate/`` holds launcher configs, not sdft configs.

    Raises:
        ConfigError: the folder does not exist.
    """
    root = Path(directory) if directory else default_config_dir()
    if not root.is_dir():
        # NOTE: configs ship with the source tree, not inside a built wheel.
        raise ConfigError(f"{root}: configs folder not found; pass --dir with the path of sdft's configs/")
    recipes = []
    for path in sorted(root.rglob("*.yaml")):
        if path.name.startswith("_") or "accelerate" in path.relative_to(root).parts:
            continue
        recipes.append((str(path.relative_to(root)), summary_line(path)))
    return recipes


def summary_line(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""

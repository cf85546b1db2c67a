"""File helpers: atomic writes, an append-only result cache and a run-folder lock.

Every output file is written to a temporary file in the same folder and renamed
into place, so a reader sees either the old file or the complete new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from sdft.distributed import is_main, rank, world_size

logger = logging.getLogger(__name__)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` through a temporary file and an atomic rename.

    Under a multi-process launch only the main process writes, because every
    process has the same merged results.
    """
    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, data) -> None:
    """Write JSON (indented, UTF-8, key order kept) atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows) -> None:
    """Write one JSON object per line atomically."""
    lines = [json.dumps(row, ensure_ascii=False, default=str) for row in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def atomic_save_figure(figure, path: str | os.PathLike) -> None:
    """Save a matplotlib figure atomically (main process only)."""
    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=120, bbox_inches="tight")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def stable_hash(*parts) -> str:
    """Hash JSON-serialisable parts into a short hex key."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class ResultCache:
    """Append-only JSON-lines store of finished items, keyed by a content hash.

    Each finished item is one line ``{"key": ..., "value": ...}``, flushed and
    fsynced as soon as it is known, so a killed process loses at most the item it
    was writing. A torn last line from a kill is ignored on the next read.
    Under a multi-process launch each process appends to its own shard file
    (``NAME.rankN.jsonl``) and ``refresh`` reads every shard.
    """

    def __init__(self, path: str | os.PathLike):
        self.base_path = Path(path)
        self.path = self.base_path
        if world_size() > 1:
            self.path = self.base_path.with_name(f"{self.base_path.stem}.rank{rank()}{self.base_path.suffix}")
        self.entries: dict[str, object] = {}
        self.refresh()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def shard_paths(self) -> list[Path]:
        pattern = f"{self.base_path.stem}.rank*{self.base_path.suffix}"
        return [self.base_path] + sorted(self.base_path.parent.glob(pattern))

    def refresh(self) -> None:
        """Read every shard file of this cache, own and other processes'."""
        for path in self.shard_paths():
            if path.exists():
                self._load(path)

    def _load(self, path: Path) -> None:
        data = path.read_bytes()
        own, torn = [], 0
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                # Bytes, so a line cut inside a UTF-8 character is one more torn line.
                entry = json.loads(line)
                self.entries[entry["key"]] = entry["value"]
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            own.append(entry)
        if path != self.path:
            return
        if torn:
            logger.warning("%s: ignored %d incomplete cache line(s)", path, torn)
        if torn or (data and not data.endswith(b"\n")):
            # Rewrite without the torn lines, ending in a newline, so appends start on a
            # clean line. Only this process's own file is rewritten; other shards are
            # read as they are.
            write_lines_atomically(path, own)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str):
        return self.entries[key]

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        self._file.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_lines_atomically(path: Path, rows: list) -> None:
    """Rewrite one process's own JSON-lines file, on any rank."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class FolderLockedError(RuntimeError):
    """Another process is writing into the same output folder."""


@contextmanager
def folder_lock(folder: str | os.PathLike):
    """Hold an exclusive lock on ``folder`` for the duration of a run.

    Raises:
        FolderLockedError: another live process holds the lock.
    """
    folder = Path(folder)
    if not is_main():
        # The launcher's main process holds the lock for the whole group.
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / ".sdft.lock"
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FolderLockedError(
            f"{folder}: another sdft process is writing to this folder; wait for it to finish "
            "or choose another output folder"
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()

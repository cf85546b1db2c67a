"""Dataset loading: files, named datasets and the Hugging Face Hub, into records.

Every format ends as a list of ``Record``: one instruction (with optional input),
its response, and the earlier turns of a multi-turn conversation. Bad input stops
with a ``DataError`` naming file, row and field.

Named datasets resolve from a local data directory (``data.data_dir`` or the
environment variable ``SDFT_DATA_DIR``) laid out as ``<dir>/gsm8k/sdft_gsm8k_train.json``
and so on, and otherwise from the Hugging Face Hub.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

FORMATS = ("auto", "alpaca", "messages", "gsm8k", "advbench", "multiarith")
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class DataError(ValueError):
    """Invalid or missing dataset input; the message names file, row and field."""


@dataclass
class Record:
    """One dataset row, normalised.

    Attributes:
        id: Stable identifier: the file's ``id`` field when present, else the row number.
        instruction: The current user turn.
        response: The dataset's target for the current turn ("" for prompt-only sets).
        input: Optional extra input, joined to the instruction with a newline.
        history: Earlier (user, assistant) turns, oldest first.
        source: The row as read from the file, so outputs can keep its fields.
        response_field: Name of the row's field that contains the response.
    """

    id: str
    instruction: str
    response: str = ""
    input: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)
    source: dict | None = field(default=None, repr=False, compare=False)
    response_field: str | None = field(default=None, repr=False, compare=False)

    def with_response(self, response: str) -> "Record":
        """Return a copy whose response (and source row) carry a new text."""
        source = None
        if self.source is not None:
            source = dict(self.source)
            if self.response_field == "messages":
                messages = [dict(m) for m in source["messages"]]
                last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
                messages[last]["content"] = response
                source["messages"] = messages
            elif self.response_field:
                source[self.response_field] = response
        return Record(
            self.id, self.instruction, response, self.input, list(self.history), source,
            self.response_field,
        )

    def turns(self) -> list[tuple[str, str]]:
        """Return every (user, assistant) turn, the current one last."""
        return list(self.history) + [(instruction_with_input(self), self.response)]

    def at_turn(self, index: int) -> "Record":
        """Return the conversation cut after turn ``index``: earlier turns become history."""
        turns = self.turns()
        user, assistant = turns[index]
        if index == len(turns) - 1:
            return Record(self.id, self.instruction, assistant, self.input, list(self.history))
        return Record(self.id, user, assistant, "", turns[:index])

    def with_turn_responses(self, responses: list[str]) -> "Record":
        """Return a copy whose assistant turns are replaced, oldest first."""
        history = [(user, new) for (user, _), new in zip(self.history, responses[:-1])]
        record = self.with_response(responses[-1])
        record.history = history
        if record.source is not None and self.history:
            key = "history"
            if key in record.source:
                record.source[key] = [[user, new] for user, new in history]
            elif record.response_field == "messages":
                replace_assistant_messages(record.source, responses)
        return record

    def to_source_dict(self) -> dict:
        """Return the record with the file's own field names when it came from a file."""
        return dict(self.source) if self.source is not None else self.to_dict()

    def to_dict(self) -> dict:
        data = {"id": self.id, "instruction": self.instruction, "input": self.input}
        data["output"] = self.response
        if self.history:
            data["history"] = [list(turn) for turn in self.history]
        return data


def instruction_with_input(record: "Record") -> str:
    """Join instruction and input as the authors' code does: ``instruction\ninput``."""
    if record.input:
        return f"{record.instruction}\n{record.input}"
    return record.instruction


def replace_assistant_messages(source: dict, responses: list[str]) -> None:
    """Write new assistant texts, oldest first, into a ``messages`` row in place."""
    messages = [dict(m) for m in source["messages"]]
    positions = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    for position, response in zip(positions, responses):
        messages[position]["content"] = response
    source["messages"] = messages


@dataclass(frozen=True)
class NamedDataset:
    """A dataset known by name: its file under the data directory and its Hub fallback."""

    path: str
    format: str
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"


NAMED_DATASETS: dict[str, NamedDataset] = {
    "gsm8k": NamedDataset("gsm8k/sdft_gsm8k_train.json", "gsm8k", "openai/gsm8k", "main", "train"),
    "gsm8k_test": NamedDataset("gsm8k/sdft_gsm8k_test.json", "gsm8k", "openai/gsm8k", "main", "test"),
    "multiarith": NamedDataset(
        "multiarith/sdft_multiarith_test.json", "alpaca", "ChilleD/MultiArith", None, "test"
    ),
    "openfunction": NamedDataset("openfunctions/sdft_openfunction_train.json", "alpaca"),
    "openfunction_test": NamedDataset("openfunctions/sdft_openfunction_test.json", "alpaca"),
    "alpaca": NamedDataset("alpaca/sdft_alpaca_train.json", "alpaca", "tatsu-lab/alpaca"),
    "dolly": NamedDataset(
        "dolly/sdft_dolly_train.json", "alpaca", "databricks/databricks-dolly-15k"
    ),
    "lima": NamedDataset("lima/sdft_lima_train.json", "alpaca", "GAIR/lima"),
    "codealpaca": NamedDataset(
        "codealpaca/code_alpaca_2k.json", "alpaca", "sahil280114/codealpaca"
    ),
    "advbench": NamedDataset(
        "advbench/harmful_behaviors.csv", "advbench", "walledai/AdvBench", None, "train"
    ),
    "alpaca_eval": NamedDataset(
        "alpaca_eval/sdft_alpaca_eval.json", "alpaca", "tatsu-lab/alpaca_eval", "alpaca_eval", "eval"
    ),
}

# Field names per format, first match wins: (instruction, input, response).
FIELD_ALIASES = {
    "alpaca": (("instruction",), ("input",), ("output", "response")),
    "gsm8k": (("question",), (), ("answer",)),
    "advbench": (("goal", "prompt"), (), ("target",)),
    "multiarith": (("sQuestion", "question"), (), ("lSolutions", "final_answer", "answer")),
}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """Pick the data directory: the setting, else ``SDFT_DATA_DIR``, else none."""
    chosen = data_dir or os.environ.get("SDFT_DATA_DIR")
    return Path(chosen).expanduser() if chosen else None


def load_dataset_records(
    source: str,
    data_dir: str | os.PathLike | None = None,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    limit: int | None = None,
    require_response: bool = True,
    invalid: str = "error",
) -> list[Record]:
    """Load records from a file path, a named dataset or a Hub dataset id.

    Args:
        source: A file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``), a name from
            ``NAMED_DATASETS``, or a Hub id such as ``openai/gsm8k``.
        data_dir: Local folder laid out like the named datasets' paths.
        format: One of ``FORMATS``; ``auto`` guesses from the field names.
        columns: Mapping from our field names (instruction, input, response,
            history, messages, id) to the file's column names.
        limit: Keep only the first ``limit`` records.
        require_response: Reject records whose response is missing or empty.
        invalid: ``error`` stops at the first invalid row; ``skip`` drops invalid
            rows with a warning that counts them and names the first few.

    Raises:
        DataError: the source cannot be found or a row is invalid.
    """
    path, format, origin = locate(source, data_dir, format)
    rows = read_rows(path) if path is not None else read_hub_rows(origin)
    if limit is not None:
        rows = rows[:limit]
    name = str(path) if path is not None else origin.hub_id
    records = parse_rows(rows, name, format, columns or {}, require_response, invalid)
    if not records:
        raise DataError(f"{name}: the dataset is empty; nothing to process")
    return records


def locate(source: str, data_dir, format: str) -> tuple[Path | None, str, NamedDataset | None]:
    """Find where a source lives: a local file, the data directory or the Hub."""
    candidate = Path(source).expanduser()
    directory = resolve_data_dir(data_dir)
    if candidate.suffix in SUFFIXES or candidate.exists():
        if candidate.is_file():
            return candidate, format, None
        # A relative path may name a file inside the data directory.
        if directory is not None and not candidate.is_absolute() and (directory / candidate).is_file():
            return directory / candidate, format, None
        where = f" (also looked in the data directory {directory})" if directory and not candidate.is_absolute() else ""
        raise DataError(f"{source}: data file not found{where}; check the path")

    named = NAMED_DATASETS.get(source)
    if named is not None:
        format = named.format if format == "auto" else format
        if directory is not None:
            local = directory / named.path
            if local.is_file():
                return local, format, named
            if named.hub_id is None:
                raise DataError(
                    f"{local}: data file for dataset {source!r} not found in the data directory "
                    f"{directory}; download it there or point data.data_dir at a folder that has it"
                )
        if named.hub_id is None:
            raise DataError(
                f"dataset {source!r} has no Hub copy; set data.data_dir or SDFT_DATA_DIR to a "
                f"folder containing {named.path}"
            )
        return None, format, named

    if "/" in source:
        return None, format, NamedDataset("", format, source)
    raise DataError(
        f"{source}: not a file, a known dataset name ({', '.join(sorted(NAMED_DATASETS))}) "
        "or a Hub id (owner/name)"
    )


def read_rows(path: Path) -> list[dict]:
    """Read a JSON array, JSON lines, CSV or parquet file into dictionaries."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        try:
            return pd.read_parquet(path).to_dict(orient="records")
        except Exception as err:
            raise DataError(f"{path}: cannot read parquet file: {err}") from err
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not valid UTF-8 at byte {err.start}; re-save the file as UTF-8"
        ) from err
    if suffix == ".csv":
        return read_csv_rows(path, text)
    if suffix == ".jsonl":
        return read_json_lines(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def read_csv_rows(path: Path, text: str) -> list[dict]:
    """Read CSV rows; a row with more values than the header has columns is an error.

    The text is read with ``newline=""`` so quoted values keep their line breaks.
    """
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(
            f"{path}: the header names column {repeated[0]!r} twice; give every column its own name"
        )
    rows = []
    for number, row in enumerate(reader, start=1):
        if None in row:
            raise DataError(
                f"{path}: row {number} (line {reader.line_num}): {len(header) + len(row[None])} values "
                f"but the header has {len(header)} columns; quote values that contain commas"
            )
        rows.append(row)
    return rows


def read_json_lines(path: Path, text: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number}: invalid JSON: {err.msg}") from err
    return rows


def read_hub_rows(named: NamedDataset) -> list[dict]:
    """Download a dataset split from the Hugging Face Hub."""
    import datasets

    try:
        dataset = datasets.load_dataset(named.hub_id, named.hub_config, split=named.hub_split)
    except Exception as err:
        raise DataError(
            f"{named.hub_id}: cannot load from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); set data.data_dir or "
            "SDFT_DATA_DIR to a local copy"
        ) from err
    return [dict(row) for row in dataset]


def parse_rows(
    rows: list, name: str, format: str, columns: dict[str, str], require_response: bool, invalid: str = "error"
) -> list[Record]:
    """Validate rows and turn them into records; ids must be unique."""
    if rows and format == "auto":
        format = guess_format(rows[0], name, columns)
    records, seen, skipped = [], {}, []
    for number, row in enumerate(rows, start=1):
        where = f"{name}: row {number}"
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where}: {not_an_object(row)}")
            record = parse_row(row, where, format, columns, require_response, default_id=str(number - 1))
        except DataError as err:
            if invalid != "skip":
                raise
            skipped.append(str(err))
            continue
        if record.id in seen:
            raise DataError(
                f"{where}: field 'id': duplicate id {record.id!r} (first at row {seen[record.id]}); "
                "make ids unique or drop the id column"
            )
        seen[record.id] = number
        records.append(record)
    if skipped:
        logger.warning("%s: skipped %d invalid row(s), first: %s", name, len(skipped), "; ".join(skipped[:3]))
    return records


def not_an_object(row) -> str:
    return f"expected an object with named fields, got {type(row).__name__}"


def guess_format(row, name: str, columns: dict[str, str]) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{name}: row 1: {not_an_object(row)}")
    keys = set(row) | {columns.get(k) for k in ("instruction", "messages")}
    if "messages" in keys or columns.get("messages"):
        return "messages"
    if "instruction" in keys or columns.get("instruction"):
        return "alpaca"
    if "question" in keys:
        return "gsm8k"
    if "goal" in keys:
        return "advbench"
    if "sQuestion" in keys:
        return "multiarith"
    raise DataError(
        f"{name}: row 1: cannot tell the format from fields {sorted(row)}; expected "
        "instruction/output, messages, question/answer or goal; set data.format and "
        "data.columns to map your fields"
    )


def parse_row(row, where, format, columns, require_response, default_id) -> Record:
    record_id = parse_id(row, where, columns.get("id", "id"), default_id)
    if format == "messages":
        return parse_messages(row, where, columns, require_response, record_id)
    if format not in FIELD_ALIASES:
        raise DataError(f"{where}: unknown format {format!r}; valid formats: {', '.join(FORMATS)}")
    instruction_keys, input_keys, response_keys = FIELD_ALIASES[format]
    instruction = pick(row, where, "instruction", columns, instruction_keys, required=True)
    input_text = pick(row, where, "input", columns, input_keys, required=False)
    response = pick(
        row, where, "response", columns, response_keys, required=require_response,
        allow_list=format == "multiarith",
    )
    if format == "multiarith" and isinstance(response, list):
        answer = response[0]
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)
        response = f"The answer is {answer}"
    history = parse_history(row, where, columns)
    response_field = columns.get("response") or next((k for k in response_keys if k in row), None)
    return Record(record_id, instruction, response, input_text, history, row, response_field)


def parse_id(row, where, key, default_id) -> str:
    """Read the record id: text or a whole number; without the field, the row number."""
    if key not in row:
        return default_id
    value = row[key]
    if is_missing(value) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: field {key!r}: empty; fill it or drop the id column")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f"{where}: field {key!r}: expected text or a number, got {type(value).__name__}; "
            "fix it or drop the id column"
        )
    return str(value)


def is_missing(value) -> bool:
    """None, and the NaN that pandas puts in empty numeric cells."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def pick(row, where, field_name, columns, aliases, required, allow_list=False) -> str:
    """Read one text field, stripped; a missing or empty required field is an error.

    ``allow_list`` accepts a list (MultiArith's solutions), returned as it is.
    """
    keys = (columns[field_name],) if field_name in columns else aliases
    key = next((k for k in keys if k in row), None)
    if key is None or is_missing(row[key]):
        if required:
            wanted = " or ".join(repr(k) for k in keys)
            raise DataError(
                f"{where}: field {wanted}: missing; add it or map your column with "
                f"data.columns.{field_name}"
            )
        return ""
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, list) and allow_list:
        if required and not value:
            raise DataError(f"{where}: field {key!r}: empty; fill it or remove the row")
        return value  # MultiArith solutions; converted by the caller.
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r}: expected text, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise DataError(f"{where}: field {key!r}: empty; fill it or remove the row")
    return value


def parse_history(row, where, columns) -> list[tuple[str, str]]:
    key = columns.get("history", "history")
    history = row.get(key)
    if history is None:
        return []
    if not isinstance(history, list):
        raise DataError(f"{where}: field {key!r}: expected a list of [user, assistant] pairs")
    turns = []
    for index, turn in enumerate(history):
        if (
            not isinstance(turn, (list, tuple))
            or len(turn) != 2
            or not all(isinstance(text, str) for text in turn)
        ):
            raise DataError(
                f"{where}: field {key!r}[{index}]: expected a [user, assistant] pair of strings"
            )
        user, assistant = turn[0].strip(), turn[1].strip()
        if not user or not assistant:
            raise DataError(
                f"{where}: field {key!r}[{index}]: empty {'user' if not user else 'assistant'} text; "
                "fill it or remove the turn"
            )
        turns.append((user, assistant))
    return turns


def parse_messages(row, where, columns, require_response, record_id) -> Record:
    """Turn a chat ``messages`` list into a record: the last user turn plus history."""
    key = columns.get("messages", "messages")
    messages = row.get(key)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {key!r}: expected a non-empty list of messages")
    turns, user, system = [], None, ""
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(
                f"{where}: field {key!r}[{index}]: expected an object with 'role' and text 'content'"
            )
        role, content = message.get("role"), message["content"].strip()
        if role in ("user", "assistant") and not content and index < len(messages) - 1:
            raise DataError(
                f"{where}: field {key!r}[{index}].content: empty {role} turn; fill it or remove the message"
            )
        if role == "system":
            system = content
        elif role == "user":
            if user is not None:
                raise DataError(
                    f"{where}: field {key!r}[{index}]: user turn follows another user turn; merge "
                    "them or put the assistant reply between them"
                )
            user = content
        elif role == "assistant":
            if user is None:
                raise DataError(f"{where}: field {key!r}[{index}]: assistant turn without a user turn")
            turns.append((user, content))
            user = None
        else:
            raise DataError(
                f"{where}: field {key!r}[{index}].role: unknown role {role!r}; "
                "expected system, user or assistant"
            )
    if user is not None:
        turns.append((user, ""))
    if not turns:
        raise DataError(f"{where}: field {key!r}: no user turn")
    *history, (instruction, response) = turns
    if not instruction:
        raise DataError(f"{where}: field {key!r}: the last user turn is empty")
    if require_response and not response:
        raise DataError(f"{where}: field {key!r}: the last assistant turn is missing or empty")
    del system  # NOTE: a per-record system message is dropped; templates supply the system text.
    return Record(record_id, instruction, response, "", list(history), row, "messages")


def records_fingerprint(records: list[Record]) -> str:
    """Hash the records' content, for provenance and cache keys."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def write_records_json(records: list[Record], path: Path) -> None:
    """Write records as an alpaca-style JSON array, atomically."""
    from sdft.io import atomic_write_json

    atomic_write_json(path, [record.to_source_dict() for record in records])

"""Selection rules: keep a rewrite only if it passes the banned-phrase and task checks.

A rejected rewrite falls back to the original response, so the distilled dataset
has one record per input record. Every decision carries its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BANNED_PHRASES = (
    "reference answer",
    "your response",
    "my response",
    "your own response",
    "now it's your turn",
)
BANNED_START = "Your turn"
NUMBER_PATTERN = re.compile(r"-?\d+(?:[,\s]\d+)*(?:\.\d+)?")
CODE_STARTS = ("I have", "Here is", "I implemented")

ACCEPTED = "accepted"
EMPTY = "empty"
BANNED = "banned_phrase"
TASK_FAILED = {
    "math": "answer_mismatch",
    "openfunction": "call_mismatch",
    "code": "code_format",
}


@dataclass(frozen=True)
class Decision:
    """Whether a rewrite is used, and why not when it is not."""

    accepted: bool
    reason: str
    detail: str = ""


def select(rewrite: str, original: str, check: str) -> Decision:
    """Apply the banned-phrase rule, then the task check named by ``check``.

    Args:
        rewrite: The seed model's rewrite.
        original: The dataset's response.
        check: ``math``, ``openfunction``, ``code`` or ``none``.
    """
    rewrite, original = rewrite.strip(), original.strip()
    if not rewrite:
        return Decision(False, EMPTY)
    phrase = banned_phrase(rewrite)
    if phrase is not None:
        return Decision(False, BANNED, phrase)
    if check == "none":
        return Decision(True, ACCEPTED)
    if check == "math":
        passed, detail = math_check(rewrite, original)
    elif check == "openfunction":
        passed, detail = function_call_check(rewrite, original)
    elif check == "code":
        passed, detail = code_check(rewrite)
    else:
        raise ValueError(f"unknown check {check!r}; valid checks: math, openfunction, code, none")
    if passed:
        return Decision(True, ACCEPTED)
    return Decision(False, TASK_FAILED[check], detail)


def banned_phrase(text: str) -> str | None:
    """Return the first banned phrase found in ``text``, or None."""
    lowered = text.lower()
    for phrase in BANNED_PHRASES:
        if phrase in lowered:
            return phrase
    if text.startswith(BANNED_START):
        return BANNED_START
    return None


def last_number(text: str) -> int | None:
    """Extract the last number as an integer; None when absent or fractional.

    Commas and spaces inside the number are dropped ("1,000" is 1000). A number
    with a non-zero fractional part ("2.5") is invalid; "3.00" counts as 3.
    """
    matches = NUMBER_PATTERN.findall(text)
    if not matches:
        return None
    number = re.sub(r"[,\s]", "", matches[-1])
    integer, _, fraction = number.partition(".")
    if fraction and int(fraction) != 0:
        return None
    if integer in ("", "-"):
        return None
    return int(integer)


def math_check(rewrite: str, original: str) -> tuple[bool, str]:
    expected, found = last_number(original), last_number(rewrite)
    passed = expected is not None and found == expected
    return passed, f"expected {expected}, found {found}"


def normalize_call(text: str) -> str:
    """Collapse whitespace, turn single quotes into double, and drop spaces after commas between strings."""
    text = re.sub(r"\s+", " ", text)
    return text.replace("'", '"').replace('", "', '","')


CALL_PATTERN = re.compile(r"([\w.]+)\((.*)\)", re.DOTALL)


def function_call_check(rewrite: str, original: str) -> tuple[bool, str]:
    """Find the original's ``name(args)`` in the rewrite after normalising both."""
    original_call = CALL_PATTERN.search(normalize_call(original))
    if original_call is None:
        return False, "no function call in the original"
    name, args = original_call.group(1), original_call.group(2)
    pattern = r"\b" + re.escape(f"{name}({args})")
    passed = re.search(pattern, normalize_call(rewrite)) is not None
    return passed, f"expected {name}({args})"


def code_check(rewrite: str) -> tuple[bool, str]:
    if "```python" not in rewrite:
        return False, "no ```python block"
    if not rewrite.startswith(CODE_STARTS):
        return False, "does not start with 'I have', 'Here is' or 'I implemented'"
    return True, ""

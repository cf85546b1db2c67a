"""Selection rules for rewrites: banned phrases and the per-task checks.

Every expected value is worked out by hand from the published rule, not read
back from the code.
"""

import pytest

from sdft.selection import last_number, select

BANNED = [
    "reference answer",
    "your response",
    "my response",
    "your own response",
    "now it's your turn",
]


def is_accepted(rewrite, original="", check="none"):
    return select(rewrite, original, check).accepted


# Banned phrases.


@pytest.mark.parametrize("phrase", BANNED)
def test_banned_phrase_rejected(phrase):
    decision = select(f"Here it is. {phrase} follows.", "", "none")
    assert not decision.accepted
    assert decision.reason == "banned_phrase"


@pytest.mark.parametrize("phrase", BANNED)
def test_banned_phrase_uppercase_rejected(phrase):
    assert not is_accepted(f"Note: {phrase.upper()}.")


@pytest.mark.parametrize(
    "text",
    [
        "As the Reference Answer says, it is blue.",
        "Your Response: blue.",
        "In My Response I say blue.",
        "Here is Your Own Response: blue.",
        "Now It's Your Turn to answer.",
    ],
)
def test_banned_phrase_mixed_case(text):
    assert not is_accepted(text)


def test_banned_phrase_at_end():
    assert not is_accepted("The color is blue, as in the reference answer")


def test_your_turn_start_rejected():
    decision = select("Your turn: the color is blue.", "", "none")
    assert not decision.accepted
    assert decision.reason == "banned_phrase"


def test_your_turn_after_strip_rejected():
    assert not is_accepted("  \n Your turn: blue.")


def test_your_turn_lowercase_start_accepted():
    assert is_accepted("your turn is next, and the color is blue.")


def test_your_turn_uppercase_start_accepted():
    assert is_accepted("YOUR TURN: blue.")


def test_your_turn_middle_accepted():
    assert is_accepted("I think so. Your turn to pick a color.")


def test_plain_rewrite_accepted():
    decision = select("The color is blue.", "Blue.", "none")
    assert decision.accepted
    assert decision.reason == "accepted"


def test_response_word_alone_accepted():
    assert is_accepted("A good response is short. The reference is the sky.")


# Empty rewrites.


def test_empty_rewrite_rejected():
    decision = select("", "Blue.", "none")
    assert not decision.accepted
    assert decision.reason == "empty"


def test_whitespace_rewrite_rejected():
    decision = select(" \n\t ", "Blue.", "none")
    assert not decision.accepted
    assert decision.reason == "empty"


def test_unknown_check_rejected():
    with pytest.raises(ValueError, match="valid checks"):
        select("text", "text", "maths")


# Math: last number, commas and spaces dropped, integer parts compared.


def test_math_same_answer_accepted():
    assert is_accepted("So 2 + 2 = 4. The answer is 4.", "The answer is 4.", "math")


def test_math_wrong_answer_rejected():
    decision = select("The answer is 5.", "The answer is 4.", "math")
    assert not decision.accepted
    assert decision.reason == "answer_mismatch"


def test_math_comma_thousands_equal():
    assert is_accepted("The answer is 1,000.", "The answer is 1000.", "math")


def test_math_comma_in_original():
    assert is_accepted("The answer is 1000", "The answer is 1,000", "math")


def test_math_space_thousands_equal():
    assert is_accepted("The answer is 1 000.", "The answer is 1000.", "math")


def test_math_space_joins_numbers():
    # "4 5" is one match of the pattern, so it reads as 45.
    assert is_accepted("Rows 4 5", "The answer is 45.", "math")


def test_math_negative_equal():
    assert is_accepted("The change is -12 degrees.", "The answer is -12.", "math")


def test_math_negative_sign_matters():
    assert not is_accepted("The answer is 12.", "The answer is -12.", "math")


def test_math_zero_fraction_equal():
    assert is_accepted("The answer is 3.00", "The answer is 3.", "math")


def test_math_zero_fraction_original():
    assert is_accepted("The answer is 3", "The answer is 3.0", "math")


def test_math_fraction_rewrite_rejected():
    assert not is_accepted("The answer is 2.5", "The answer is 2.", "math")


def test_math_fraction_both_rejected():
    assert not is_accepted("The answer is 2.5", "The answer is 2.5", "math")


def test_math_fraction_original_rejected():
    assert not is_accepted("The answer is 2", "The answer is 2.5", "math")


def test_math_no_number_rejected():
    assert not is_accepted("The answer is four.", "The answer is 4.", "math")


def test_math_original_without_number():
    assert not is_accepted("The answer is 4.", "The answer is four.", "math")


def test_math_last_number_wins():
    assert is_accepted("First 7 then 3, so the answer is 9.", "The answer is 9.", "math")


def test_math_first_number_ignored():
    assert not is_accepted("The answer is 9, not 7.", "The answer is 9.", "math")


def test_math_earlier_fraction_ignored():
    assert is_accepted("Half is 2.5, doubled is 5.", "The answer is 5.", "math")


def test_math_trailing_period_ignored():
    assert is_accepted("The answer is 72.", "72", "math")


def test_math_banned_before_check():
    decision = select("The reference answer is 4.", "The answer is 4.", "math")
    assert not decision.accepted
    assert decision.reason == "banned_phrase"


@pytest.mark.parametrize(
    "text, value",
    [
        ("1,000", 1000),
        ("1 000", 1000),
        ("a 1,234,567 b", 1234567),
        ("-5", -5),
        ("3.00", 3),
        ("10.0 and 8", 8),
        ("18.", 18),
        ("10-4=6", 6),
        ("down to -3", -3),
    ],
)
def test_last_number_values(text, value):
    assert last_number(text) == value


@pytest.mark.parametrize("text", ["2.5", "no digits", "", "1,000.5"])
def test_last_number_invalid(text):
    assert last_number(text) is None


# OpenFunctions: normalise both, then search for \bname(args) in the rewrite.

CALL = "pyarrow.Timestamp(unit='s')"


def test_call_quotes_normalised():
    assert is_accepted('Use pyarrow.Timestamp(unit="s") here', CALL, "openfunction")


def test_call_exact_copy_accepted():
    assert is_accepted(CALL, CALL, "openfunction")


def test_call_word_prefix_rejected():
    # No word boundary between "x" and "p", so the name does not match.
    decision = select('xpyarrow.Timestamp(unit="s")', CALL, "openfunction")
    assert not decision.accepted
    assert decision.reason == "call_mismatch"


def test_call_underscore_prefix_rejected():
    assert not is_accepted('_pyarrow.Timestamp(unit="s")', CALL, "openfunction")


def test_call_dotted_prefix_accepted():
    # "." is not a word character, so a boundary sits before "pyarrow".
    assert is_accepted('lib.pyarrow.Timestamp(unit="s")', CALL, "openfunction")


def test_call_backticks_accepted():
    assert is_accepted('Call `pyarrow.Timestamp(unit="s")`.', CALL, "openfunction")


def test_call_suffix_name_accepted():
    # The original "Timestamp(...)" matches after the dot of a longer name.
    assert is_accepted('pa.Timestamp(unit="s")', "Timestamp(unit='s')", "openfunction")


def test_call_shorter_name_rejected():
    assert not is_accepted('Timestamp(unit="s")', CALL, "openfunction")


def test_call_other_args_rejected():
    assert not is_accepted('pyarrow.Timestamp(unit="ms")', CALL, "openfunction")


def test_call_whitespace_collapsed():
    original = "f(a=1,  b=2)"
    assert is_accepted("Try f(a=1,\n\tb=2) now.", original, "openfunction")


def test_call_string_list_comma():
    original = "f(names=['x', 'y'])"
    assert is_accepted('f(names=["x","y"])', original, "openfunction")


def test_call_string_list_spaces():
    original = "f(names=['x','y'])"
    assert is_accepted("f(names=['x',   'y'])", original, "openfunction")


def test_call_number_comma_space_kept():
    # Only `", "` loses its space, so "1, b" and "1,b" stay different.
    assert not is_accepted("f(a=1,b=2)", "f(a=1, b=2)", "openfunction")


def test_call_regex_chars_escaped():
    original = "re.sub(r'a+b?', '.', s)"
    assert is_accepted('re.sub(r"a+b?",".", s)', original, "openfunction")


def test_call_regex_chars_literal():
    original = "re.sub(r'a+b?', '.', s)"
    assert not is_accepted('re.sub(r"aab",".", s)', original, "openfunction")


def test_call_missing_rejected():
    assert not is_accepted("Use the Timestamp type.", CALL, "openfunction")


def test_call_original_without_call():
    assert not is_accepted("anything(1)", "no call here", "openfunction")


# Code: a ```python block and a fixed opening.


@pytest.mark.parametrize("start", ["I have", "Here is", "I implemented"])
def test_code_allowed_starts(start):
    rewrite = f"{start} the function:\n```python\ndef f():\n    return 1\n```"
    assert is_accepted(rewrite, "", "code")


def test_code_start_after_strip():
    rewrite = "\n  Here is the code:\n```python\npass\n```\n"
    assert is_accepted(rewrite, "", "code")


def test_code_without_block_rejected():
    decision = select("Here is the code:\n```\npass\n```", "", "code")
    assert not decision.accepted
    assert decision.reason == "code_format"


def test_code_other_start_rejected():
    assert not is_accepted("Sure! Here is the code:\n```python\npass\n```", "", "code")


def test_code_lowercase_start_rejected():
    assert not is_accepted("here is the code:\n```python\npass\n```", "", "code")


# No task check.


@pytest.mark.parametrize(
    "text",
    ["x", "The answer is 2.5", "```python\npass\n```", "Sure thing!", "your turn"],
)
def test_none_check_accepts(text):
    assert is_accepted(text, "unrelated original", "none")

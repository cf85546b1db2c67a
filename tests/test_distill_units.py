"""Distillation bookkeeping: mixing, reassembly of turns and per-turn counts."""

from __future__ import annotations

from sdft.data import Record
from sdft.distill import MIXED_OUT, apply_mix, assemble, selection_stats, turn_stats
from sdft.selection import Decision

ACCEPT = Decision(True, "accepted")
REJECT = Decision(False, "answer_mismatch", "expected 3, found 4")


def test_mix_one_keeps_decisions():
    decisions = [ACCEPT, REJECT, ACCEPT]
    turns = [(0, 0), (1, 0), (2, 0)]
    assert apply_mix(decisions, turns, [None] * 3, 1.0, 42) == decisions


def test_mix_zero_drops_every_rewrite():
    decisions = [ACCEPT, REJECT, ACCEPT]
    mixed = apply_mix(decisions, [(0, 0), (1, 0), (2, 0)], [None] * 3, 0.0, 42)
    assert [d.accepted for d in mixed] == [False, False, False]
    assert [d.reason for d in mixed] == [MIXED_OUT, "answer_mismatch", MIXED_OUT]


def test_mix_half_is_seeded():
    decisions = [ACCEPT] * 10
    turns = [(i, 0) for i in range(10)]
    first = apply_mix(decisions, turns, [None] * 10, 0.5, 7)
    second = apply_mix(decisions, turns, [None] * 10, 0.5, 7)
    assert first == second
    assert sum(d.accepted for d in first) == 5


def test_assemble_replaces_accepted_turns():
    record = Record("r", "q2", "a2", "", [("q1", "a1")], {"instruction": "q2", "output": "a2", "history": [["q1", "a1"]]}, "output")
    turns = [(0, 0), (0, 1)]
    views = [record.at_turn(0), record.at_turn(1)]
    result = assemble([record], turns, views, [" new a1 ", "new a2"], [ACCEPT, REJECT])[0]
    assert result.history == [("q1", "new a1")]
    assert result.response == "a2"
    assert result.to_source_dict()["history"] == [["q1", "new a1"]]


def test_turn_and_selection_counts():
    turns = [(0, 0), (0, 1), (1, 0)]
    decisions = [ACCEPT, REJECT, ACCEPT]
    assert turn_stats(turns, decisions) == {"0": {"turns": 2, "accepted": 2}, "1": {"turns": 1, "accepted": 0}}
    stats = selection_stats(decisions)
    assert stats["accepted"] == 2
    assert stats["rejected"] == {"answer_mismatch": 1}

"""The promotion policy, alone: better, worse, tie, margin, guard failed, first candidate."""

from __future__ import annotations

import pytest

from peftflow.config import Guard, PromoteParams
from peftflow.promote import decide

POLICY = PromoteParams(
    metric="test_accuracy",
    higher_is_better=True,
    min_delta=0.0,
    guards={"test_loss": Guard(higher_is_better=False, tolerance=0.01)},
)
CHAMPION = {"test_accuracy": 0.80, "test_loss": 0.30}


def test_first_candidate_is_promoted():
    decision = decide({"test_accuracy": 0.5, "test_loss": 1.0}, None, POLICY)
    assert decision.promote and "no champion" in decision.reasons[0]


def test_better_candidate_is_promoted():
    decision = decide({"test_accuracy": 0.85, "test_loss": 0.29}, CHAMPION, POLICY)
    assert decision.promote
    assert "better by 0.0500" in decision.reasons[0] and "ok" in decision.reasons[1]


def test_worse_candidate_is_not_promoted():
    decision = decide({"test_accuracy": 0.75, "test_loss": 0.20}, CHAMPION, POLICY)
    assert not decision.promote and "worse" in decision.reasons[0]


def test_tie_is_not_promoted():
    decision = decide(dict(CHAMPION), CHAMPION, POLICY)
    assert not decision.promote and "a tie" in decision.reasons[0]


def test_gain_within_margin_is_not_promoted():
    policy = POLICY.model_copy(update={"min_delta": 0.02})
    assert not decide({"test_accuracy": 0.81, "test_loss": 0.30}, CHAMPION, policy).promote
    assert decide({"test_accuracy": 0.83, "test_loss": 0.30}, CHAMPION, policy).promote


def test_failed_guard_blocks_a_better_primary_metric():
    decision = decide({"test_accuracy": 0.90, "test_loss": 0.35}, CHAMPION, POLICY)
    assert not decision.promote
    assert "better" in decision.reasons[0]
    assert "guard test_loss 0.3500 vs 0.3000: worse by 0.0500 > tolerance 0.01" in decision.reasons[1]


def test_guard_within_tolerance_passes():
    assert decide({"test_accuracy": 0.90, "test_loss": 0.305}, CHAMPION, POLICY).promote


def test_lower_is_better_primary_metric():
    policy = PromoteParams(metric="test_loss", higher_is_better=False, guards={})
    assert decide({"test_loss": 0.2}, {"test_loss": 0.3}, policy).promote
    assert not decide({"test_loss": 0.4}, {"test_loss": 0.3}, policy).promote


def test_missing_metric_names_it():
    with pytest.raises(KeyError, match="candidate has no metric 'test_accuracy'"):
        decide({"test_loss": 0.1}, CHAMPION, POLICY)

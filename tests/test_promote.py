"""The promotion policy, alone: a paired test on the validation split decides, not a point figure.

Per-example values are built by hand: ``correct`` (0/1 per example) and ``nll``/``tokens``, as
an evaluation writes them to selection.json."""

from __future__ import annotations

import random

import pytest

from peftflow.config import Guard, Params, ParamsError, PromoteParams
from peftflow.promote import Evidence, decide

POLICY = PromoteParams()  # the defaults: val_accuracy, guard val_loss, 95%, min_delta 0
N = 200  # the default validation split


def _side(correct: list[int], nll: list[float] | None = None, metrics: dict | None = None) -> Evidence:
    nll = nll if nll is not None else [0.3 if c else 1.2 for c in correct]
    examples = {"ids": [f"ex{i}" for i in range(len(correct))], "correct": correct, "nll": nll,
                "tokens": [2] * len(correct)}  # fmt: skip
    figures = {"val_accuracy": sum(correct) / len(correct), "val_loss": sum(nll) / (2 * len(nll)), **(metrics or {})}
    return Evidence(figures, examples)


def _champion(right: int = 176) -> list[int]:
    """A champion right on ``right`` of N examples (88%: the README's figure), in a shuffled order."""
    correct = [1] * right + [0] * (N - right)
    random.Random(0).shuffle(correct)
    return correct


def _flip(correct: list[int], to_right: int, to_wrong: int = 0) -> list[int]:
    """The champion's answers with ``to_right`` of its errors fixed and ``to_wrong`` of its hits lost."""
    out = list(correct)
    wrong = [i for i, c in enumerate(out) if not c]
    right = [i for i, c in enumerate(out) if c]
    for i in wrong[:to_right]:
        out[i] = 1
    for i in right[:to_wrong]:
        out[i] = 0
    return out


def test_first_candidate_is_promoted():
    decision = decide(_side(_champion()), None, POLICY)
    assert decision.promote and "no champion yet" in decision.reasons[0] and "n=200" in decision.summary


def test_one_example_better_is_not_promoted():
    champ = _champion()
    decision = decide(_side(_flip(champ, 1)), _side(champ), POLICY)
    assert not decision.promote, decision.reasons
    assert decision.comparison.gain == pytest.approx(0.005) and decision.comparison.low <= 0
    assert "not significantly better" in decision.reasons[0]
    assert decision.summary.startswith("val_accuracy +0.5 pt, 95% CI [") and decision.summary.endswith(
        "n=200, McNemar p=1: kept (not significantly better)"
    )


def test_a_gap_as_large_as_seed_noise_is_not_promoted():
    """+1.75 pt, the README's LoRA vs IA3 gap, made of 6 fixed and 2.5 lost: noise at n=200."""
    champ = _champion()
    decision = decide(_side(_flip(champ, 7, 3)), _side(champ), POLICY)
    assert decision.comparison.gain == pytest.approx(0.02) and not decision.promote


def test_clearly_better_is_promoted_with_its_interval():
    champ = _champion()
    decision = decide(_side(_flip(champ, 16)), _side(champ), POLICY)  # 88% -> 96%, no example lost
    assert decision.promote, decision.reasons
    c = decision.comparison
    assert c.gain == pytest.approx(0.08) and 0 < c.low < c.gain < c.high and c.n == N and c.p_value < 1e-3
    assert decision.summary.startswith("val_accuracy +8.0 pt, 95% CI [") and decision.summary.endswith(": promoted")


def test_tie_is_not_promoted():
    champ = _side(_champion())
    decision = decide(champ, champ, POLICY)
    assert not decision.promote and "a tie" in decision.reasons[0]
    assert "CI [0.0, 0.0]" in decision.summary


def test_worse_is_not_promoted():
    champ = _champion()
    decision = decide(_side(_flip(champ, 0, 20)), _side(champ), POLICY)
    assert not decision.promote and ": worse" in decision.reasons[0]


def test_min_delta_applies_to_the_interval_not_the_point():
    champ = _champion()
    better = _side(_flip(champ, 16))  # +8 pt, its interval's low end about +4
    assert decide(better, _side(champ), POLICY.model_copy(update={"min_delta": 0.02})).promote
    assert not decide(better, _side(champ), POLICY.model_copy(update={"min_delta": 0.07})).promote


def test_a_significantly_worse_guard_blocks_a_better_candidate():
    champ = _champion()
    better = _flip(champ, 16)
    worse_loss = [3.0 if c else 4.0 for c in better]  # every example's loss far higher
    decision = decide(_side(better, worse_loss), _side(champ), POLICY)
    assert not decision.promote
    assert "better" in decision.reasons[0] and "guard val_loss" in decision.reasons[1]
    assert "worse by more than tolerance 0.0" in decision.reasons[1]
    assert decision.summary.endswith("kept (guard val_loss)")


def test_a_guard_within_its_noise_passes():
    champ = _champion()
    better = _flip(champ, 16)
    rng = random.Random(1)
    noisy = [(0.3 if c else 1.2) + rng.uniform(-0.05, 0.06) for c in better]  # a hair worse on average, no signal
    assert decide(_side(better, noisy), _side(champ), POLICY).promote


def test_lower_is_better_primary_metric():
    policy = PromoteParams(metric="val_loss", higher_is_better=False, guards={})
    champ = _champion()
    lower = [0.1 if c else 0.9 for c in champ]
    assert decide(_side(champ, lower), _side(champ), policy).promote
    assert not decide(_side(champ), _side(champ, lower), policy).promote


def test_point_metrics_without_per_example_values_still_compare():
    policy = PromoteParams(guards={"peak_memory_bytes": Guard(higher_is_better=False, tolerance=1e6)})
    champ = _champion()
    heavy = _side(_flip(champ, 16), metrics={"peak_memory_bytes": 5e9})
    decision = decide(heavy, _side(champ, metrics={"peak_memory_bytes": 2e9}), policy)
    assert not decision.promote and "guard peak_memory_bytes" in decision.reasons[1]


def test_several_seeds_are_judged_by_their_mean_and_the_reason_names_the_registered_one():
    champ = _champion()
    seeds = [{"seed": 42, "run_id": "r42", "value": 0.965}, {"seed": 43, "run_id": "r43", "value": 0.955}]
    cand = _side(_flip(champ, 16))
    decision = decide(Evidence(cand.metrics, cand.examples, seeds), _side(champ), POLICY)
    assert decision.promote
    assert "the mean of 2 seeds, val_accuracy 0.9600 ± 0.0071" in decision.reasons[-1]
    assert "registered: seed 42 (val_accuracy 0.9650, run r42)" in decision.reasons[-1]


def test_different_examples_are_never_paired():
    champ = _side(_champion())
    other = Evidence(champ.metrics, {**champ.examples, "ids": [f"other{i}" for i in range(N)]})
    with pytest.raises(ValueError, match="scored on different examples"):
        decide(champ, other, POLICY)


def test_missing_metric_names_it():
    policy = PromoteParams(metric="tokens_per_s", guards={})
    with pytest.raises(KeyError, match="candidate has no metric 'tokens_per_s'"):
        decide(_side(_champion()), _side(_champion()), policy)


@pytest.mark.parametrize(
    "promote", [{"metric": "test_accuracy"}, {"guards": {"test_loss": {"higher_is_better": False}}}]
)
def test_the_test_split_cannot_decide(promote):
    with pytest.raises((ParamsError, ValueError), match="test-split figure: the test split is reported, never used"):
        Params.model_validate({"promote": promote})

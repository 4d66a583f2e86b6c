"""The promotion policy: does the ``candidate`` beat the ``champion``? A pure function.

The candidate is promoted only if its primary metric is better than the champion's by more than
``min_delta`` (so a tie never promotes) and no guard metric is worse than the champion's by more
than that guard's tolerance. With no champion yet, the first candidate is promoted. Metrics must
come from the same test data: comparing figures from two data versions says nothing, so the
caller evaluates the champion on the candidate's data first (see ``registry.evaluate_version``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peftflow.config import PromoteParams


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return ("promote: " if self.promote else "keep the champion: ") + "; ".join(self.reasons)


def _better(a: float, b: float, higher_is_better: bool) -> float:
    """How much better a is than b (negative: worse)."""
    return a - b if higher_is_better else b - a


def _value(metrics: dict[str, Any], key: str, who: str) -> float:
    if key not in metrics:
        raise KeyError(f"promote: the {who} has no metric {key!r}; it has: {', '.join(sorted(metrics))}")
    value = float(metrics[key])
    if math.isnan(value):
        raise ValueError(f"promote: the {who}'s {key} is NaN")
    return value


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, policy: PromoteParams) -> Decision:
    """Whether ``candidate`` replaces ``champion``, with a reason for each check."""
    cand = _value(candidate, policy.metric, "candidate")
    for key in policy.guards:
        _value(candidate, key, "candidate")
    if champion is None:
        return Decision(True, [f"no champion yet; candidate {policy.metric} = {cand:.4f}"])

    reasons, ok = [], True
    champ = _value(champion, policy.metric, "champion")
    gain = _better(cand, champ, policy.higher_is_better)
    if gain > policy.min_delta:
        reasons.append(f"{policy.metric} {cand:.4f} vs {champ:.4f}: better by {gain:.4f} > {policy.min_delta}")
    else:
        ok = False
        verdict = "a tie" if gain == 0 else ("worse" if gain < 0 else "not better by more than the margin")
        reasons.append(f"{policy.metric} {cand:.4f} vs {champ:.4f}: {verdict} (needs > {policy.min_delta} better)")
    for key, guard in policy.guards.items():
        c, h = _value(candidate, key, "candidate"), _value(champion, key, "champion")
        loss = -_better(c, h, guard.higher_is_better)  # > 0: the candidate is worse
        if loss > guard.tolerance:
            ok = False
            reasons.append(f"guard {key} {c:.4f} vs {h:.4f}: worse by {loss:.4f} > tolerance {guard.tolerance}")
        else:
            reasons.append(f"guard {key} {c:.4f} vs {h:.4f}: ok")
    return Decision(ok, reasons)

"""The promotion policy: is the ``candidate`` really better than the ``champion``? A pure function.

Decided on the **validation split** (``evaluate.SELECTION_SPLIT``), never on test, which stays the
held-out figure reported beside it. On the same examples, in the same order (checked by content
hash), the candidate and the champion are compared **paired**: the difference of the metric is
bootstrapped over examples (``promote.resamples`` resamples, percentile interval at
``promote.confidence``), and the candidate is promoted only if the interval's lower end is above
``promote.min_delta``. So a tie never promotes, nor does a gain the split is too small to tell from
noise (one example of 200 is 0.5 points; the binomial standard error near 88% is about 2.3). For
accuracy, McNemar's exact test on the discordant examples is reported beside the interval.

A guard (``promote.guards``) blocks a candidate that is *significantly* worse on it by more than
its tolerance: the lower end of the worsening's interval above the tolerance. Metrics without
per-example values (``tokens_per_s``, ``peak_memory_bytes``...) are compared as point figures.

With ``promote.seeds`` > 1 the candidate is the mean over its seeds (each example's correctness
and loss averaged over the seeds), and the interval resamples seeds as well as examples, so the
test is about the method, not a lucky seed; the reasons give the seeds' spread, and which seed's
adapter was registered.

The bootstrap is scipy's; what is written here is which statistic is resampled (a ratio of sums,
so ``val_loss`` is exactly the token-weighted mean the run logs), the two-level resampling of a
multi-seed candidate (scipy resamples one level) and the decision rule.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftflow.config import PromoteParams

# metric -> (per-example numerator, denominator or None for a plain mean), as selection.json holds them
PAIRED = {"val_accuracy": ("correct", None), "val_loss": ("nll", "tokens")}


@dataclass(frozen=True)
class Evidence:
    """One side of the comparison: its figures (MLflow metrics; the mean over seeds), and its
    per-example values on the selection split (``selection.json``: ids, nll, tokens, correct)."""

    metrics: dict[str, float]
    examples: dict[str, Any] | None = None
    seeds: list[dict[str, Any]] = field(default_factory=list)  # [{seed, run_id, value}], registered one first
    per_seed: list[dict[str, Any]] = field(default_factory=list)  # each seed's selection.json (2 or more)
    label: str = ""  # "version 3 (lora)", for the reasons


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of one metric: the candidate's gain (positive: better), its interval."""

    metric: str
    candidate: float
    champion: float
    gain: float
    low: float
    high: float
    n: int
    confidence: float
    p_value: float | None = None  # McNemar's exact test, for 0/1 per-example values

    def interval(self) -> str:
        """'+1.2 pt, 95% CI [0.3, 2.1], n=400' (points for accuracies, the metric's units else)."""
        show = _points if "accuracy" in self.metric else _units
        p = f", McNemar p={self.p_value:.3g}" if self.p_value is not None else ""
        return (
            f"{show(self.gain, sign=True)}, {100 * self.confidence:g}% CI [{show(self.low)}, {show(self.high)}], "
            f"n={self.n}{p}"
        )


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    summary: str = ""  # one line a user reads: "val_accuracy +1.2 pt, 95% CI [0.3, 2.1], n=400: promoted"
    comparison: Comparison | None = None  # of the primary metric; None without a champion

    def __str__(self) -> str:
        return ("promote: " if self.promote else "keep the champion: ") + "; ".join(self.reasons)

    def record(self) -> dict[str, Any]:
        """The decision as JSON (MLflow artifact, Prefect results)."""
        c = self.comparison
        return {
            "promoted": self.promote,
            "summary": self.summary,
            "reasons": self.reasons,
            "comparison": None if c is None else c.__dict__,
        }


def _points(value: float, sign: bool = False) -> str:
    return f"{100 * value:+.1f} pt" if sign else f"{100 * value:.1f}"


def _units(value: float, sign: bool = False) -> str:
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def example_figure(examples: dict[str, Any] | None, key: str) -> float | None:
    """``key``'s value from per-example values (a ratio of sums, as the run logged it), or None if
    they do not hold it."""
    if examples is None or key not in PAIRED or PAIRED[key][0] not in examples:
        return None
    num, den = _arrays(examples, key)
    return float(num.sum() / den.sum())


def _value(side: Evidence, key: str, who: str) -> float:
    from_examples = example_figure(side.examples, key)
    if from_examples is not None:
        return from_examples
    if key not in side.metrics:
        raise KeyError(f"promote: the {who} has no metric {key!r}; it has: {', '.join(sorted(side.metrics))}")
    value = float(side.metrics[key])
    if math.isnan(value):
        raise ValueError(f"promote: the {who}'s {key} is NaN")
    return value


def _arrays(examples: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    num_key, den_key = PAIRED[key]
    num = np.asarray(examples[num_key], dtype=np.float64)
    den = np.asarray(examples[den_key], dtype=np.float64) if den_key else np.ones_like(num)
    return num, den


def _paired(key: str, cand: Evidence, champ: Evidence) -> bool:
    """Whether ``key`` can be compared example by example (else: as point figures)."""
    if key not in PAIRED:
        return False
    have = [s.examples is not None and PAIRED[key][0] in s.examples for s in (cand, champ)]
    if not all(have):
        missing = "candidate" if not have[0] else "champion"
        raise ValueError(f"promote: the {missing} has no per-example values for {key} (selection.json)")
    if list(cand.examples["ids"]) != list(champ.examples["ids"]):
        raise ValueError(
            f"promote: the candidate and the champion were scored on different examples ({len(cand.examples['ids'])}"
            f" vs {len(champ.examples['ids'])}); re-score the champion on the candidate's data"
        )
    return True


def compare(
    key: str, cand: Evidence, champ: Evidence, higher_is_better: bool, confidence: float, resamples: int
) -> Comparison:
    """The candidate's paired gain on ``key`` over the champion, with its bootstrap interval."""
    from scipy import stats

    c_num, c_den = _arrays(cand.examples, key)
    h_num, h_den = _arrays(champ.examples, key)
    sign = 1.0 if higher_is_better else -1.0

    def gain(cn, cd, hn, hd, axis=-1):
        return sign * (cn.sum(axis) / cd.sum(axis) - hn.sum(axis) / hd.sum(axis))

    point = float(gain(c_num, c_den, h_num, h_den))
    if np.array_equal(c_num, h_num) and np.array_equal(c_den, h_den):
        low = high = point  # the same answers on every example: nothing to resample
    elif len(cand.per_seed) > 1:
        seeds = [_arrays(e, key) for e in cand.per_seed]
        low, high = _two_level(np.stack([a for a, _ in seeds]), np.stack([b for _, b in seeds]), h_num, h_den,
                               sign, confidence, resamples)  # fmt: skip
    else:
        res = stats.bootstrap(
            (c_num, c_den, h_num, h_den), gain, paired=True, vectorized=True, n_resamples=resamples,
            confidence_level=confidence, method="percentile", rng=np.random.default_rng(0), batch=1000,
        )  # fmt: skip
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    p_value = None
    binary = PAIRED[key][1] is None and all(np.isin(a, (0.0, 1.0)).all() for a in (c_num, h_num))
    if binary:
        wins, losses = int(((c_num == 1) & (h_num == 0)).sum()), int(((c_num == 0) & (h_num == 1)).sum())
        p_value = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return Comparison(key, _value(cand, key, "candidate"), _value(champ, key, "champion"), point, low, high,
                      len(c_num), confidence, p_value)  # fmt: skip


def _two_level(
    c_num: np.ndarray, c_den: np.ndarray, h_num: np.ndarray, h_den: np.ndarray, sign: float, confidence: float,
    resamples: int,
) -> tuple[float, float]:  # fmt: skip
    """The percentile interval of the gain of a multi-seed candidate ((S, n) arrays) over the
    champion ((n,)), resampling seeds as well as examples: a bootstrap over examples alone would
    take one lucky seed's lead, averaged in, for a real one. scipy's bootstrap resamples one level,
    hence this by hand."""
    rng = np.random.default_rng(0)
    n_seeds, n = c_num.shape
    batch = max(1, 2_000_000 // (n_seeds * n))
    gains = []
    for start in range(0, resamples, batch):
        b = min(batch, resamples - start)
        ex = rng.integers(0, n, (b, n))
        seed = rng.integers(0, n_seeds, (b, n_seeds))
        rows, cols = seed[:, :, None], ex[:, None, :]  # (b, S, n) picks
        cand = (c_num[rows, cols].sum(-1) / c_den[rows, cols].sum(-1)).mean(-1)
        champ = h_num[ex].sum(-1) / h_den[ex].sum(-1)
        gains.append(sign * (cand - champ))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(np.concatenate(gains), [tail, 100 - tail])
    return float(low), float(high)


def _seeds_reason(cand: Evidence, metric: str) -> str | None:
    if len(cand.seeds) < 2:
        return None
    values = [s["value"] for s in cand.seeds]
    best = cand.seeds[0]
    return (
        f"candidate: the mean of {len(values)} seeds, {metric} {statistics.fmean(values):.4f} ± "
        f"{statistics.stdev(values):.4f} (range {min(values):.4f}-{max(values):.4f}); registered: seed {best['seed']} "
        f"({metric} {best['value']:.4f}, run {best['run_id']})"
    )


def decide(candidate: Evidence, champion: Evidence | None, policy: PromoteParams) -> Decision:
    """Whether ``candidate`` replaces ``champion``, with a reason for each check."""
    cand = _value(candidate, policy.metric, "candidate")
    for key in policy.guards:
        _value(candidate, key, "candidate")
    seeds = _seeds_reason(candidate, policy.metric)
    if champion is None:
        n = f" (n={len(candidate.examples['ids'])})" if candidate.examples else ""
        reasons = [f"no champion yet; candidate {policy.metric} = {cand:.4f}{n}", *([seeds] if seeds else [])]
        return Decision(True, reasons, f"{policy.metric} {cand:.4f}{n}, no champion yet: promoted")

    reasons, ok, comparison = [], True, None
    champ = _value(champion, policy.metric, "champion")
    if _paired(policy.metric, candidate, champion):
        comparison = compare(policy.metric, candidate, champion, policy.higher_is_better, policy.confidence,
                             policy.resamples)  # fmt: skip
        gain, low, what = comparison.gain, comparison.low, comparison.interval()
    else:
        gain = low = (cand - champ) if policy.higher_is_better else (champ - cand)
        what = f"{gain:+.4f} (point figures: no per-example values to pair)"
    head = f"{policy.metric} {cand:.4f} vs {champ:.4f}: {what}"
    if low > policy.min_delta:
        verdict = f"better (the interval is above {policy.min_delta})" if comparison else "better"
    else:
        ok = False
        if comparison and comparison.low == comparison.high == 0 or not comparison and gain == 0:
            verdict = "a tie"
        elif gain < 0:
            verdict = "worse"
        elif comparison:
            verdict = f"not significantly better (the interval's low end must be above {policy.min_delta})"
        else:
            verdict = f"not better by more than the margin {policy.min_delta}"
    reasons.append(f"{head}: {verdict}")
    blocked = []
    for key, guard in policy.guards.items():
        c, h = _value(candidate, key, "candidate"), _value(champion, key, "champion")
        if _paired(key, candidate, champion):
            g = compare(key, candidate, champion, guard.higher_is_better, policy.confidence, policy.resamples)
            worse_low, shown = -g.high, f"gain {g.interval()}"  # the worsening's lower end
        else:
            worse_low = -((c - h) if guard.higher_is_better else (h - c))
            shown = f"gain {-worse_low:+.4f}"
        if worse_low > guard.tolerance:
            ok = False
            blocked.append(key)
            reasons.append(f"guard {key} {c:.4f} vs {h:.4f}: {shown}: worse by more than tolerance {guard.tolerance}")
        else:
            reasons.append(f"guard {key} {c:.4f} vs {h:.4f}: ok")
    if seeds:
        reasons.append(seeds)
    why = [] if low > policy.min_delta else [verdict.split(" (")[0]]
    why += [f"guard {', '.join(blocked)}"] if blocked else []
    outcome = "promoted" if ok else f"kept ({'; '.join(why)})"
    return Decision(ok, reasons, f"{policy.metric} {what}: {outcome}", comparison)

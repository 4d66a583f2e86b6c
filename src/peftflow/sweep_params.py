"""The ``sweep:`` params section: the search space (any params keys) and how trials are sampled,
scored and pruned. Its own module so that the params schema imports no sweep machinery."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from peftflow.methods import DEFAULT as DEFAULT_METHOD
from peftflow.schema import Strict

OBJECTIVES = {"val_accuracy": "maximize", "val_loss": "minimize"}


class Dimension(Strict):
    """One searched key: ``choices``, or a range ``low``..``high`` (integers if both are; ``log``
    for a log-uniform range, ``step`` for a grid)."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _valid(self) -> Dimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("expected choices: [...], or low: and high:")
        if not self.low < self.high:
            raise ValueError(f"low {self.low} is not below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step do not go together (Optuna)")
        return self


class SweepParams(Strict):
    """`peftflow sweep` / the sweep flow."""

    method: str = DEFAULT_METHOD
    trials: int = Field(12, ge=1)
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"  # at the trial's last periodic validation
    sampler: Literal["tpe", "random"] = "tpe"  # seeded by the params' seed: the same sweep samples the same trials
    pruner: Literal["median", "none"] = "median"
    startup_trials: int = Field(4, ge=0)  # random trials before TPE models, and before the pruner prunes
    warmup_evals: int = Field(1, ge=0)  # periodic validations a trial runs before it may be pruned
    space: dict[str, dict[str, Any]] = {
        "train.lr": {"low": 1.0e-4, "high": 3.0e-3, "log": True},
        "method.r": {"choices": [4, 8, 16, 32]},
    }
    storage: str | None = None  # an Optuna storage URL (a database); null: a journal file in out_dir
    out_dir: Path = Path("reports/sweep")  # trials.csv, sweep.md and best.yaml, per method

    @model_validator(mode="after")
    def _space(self) -> SweepParams:
        if not self.space:
            raise ValueError("space: empty; give at least one key to search, e.g. train.lr: {low: 1e-4, high: 1e-3}")
        for key, spec in self.space.items():
            try:
                Dimension(**spec) if isinstance(spec, dict) else Dimension(choices=spec)
            except ValueError as e:
                raise ValueError(f"space.{key}: {_first_error(e)}") from None
        return self

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.metric]

    def dimensions(self) -> dict[str, Dimension]:
        return {k: Dimension(**v) if isinstance(v, dict) else Dimension(choices=v) for k, v in self.space.items()}


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return f"{loc + ': ' if loc else ''}{first['msg'].removeprefix('Value error, ')}"
    return str(e)

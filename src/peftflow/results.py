"""What crosses the layers, typed: a training run's summary, and the metric names in one place.

``train_summary.json`` is a :class:`TrainSummary`; ``metrics.json`` an :class:`EvalResult`: the
test figures of a run beside the base model's zero-shot ones, plus the :data:`EFFICIENCY` figures
copied from the training summary.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# what training logs to its MLflow run once it ends (evaluation does not log them again)
TRAIN_METRICS = (
    "final_train_loss",
    "artifact_bytes",
    "peak_memory_bytes",
    "trainable_params",
    "total_params",
    "trainable_pct",
    "tokens_per_s",
    "train_seconds",
    "train_tokens",
    "cut_examples",
)
# the training figures metrics.json repeats beside the test metrics
EFFICIENCY = (*(k for k in TRAIN_METRICS if k not in ("final_train_loss", "cut_examples")), "wall_seconds", "steps")
# the metrics reproduce checks (efficiency figures vary with the machine's load)
QUALITY_METRICS = ("final_train_loss", "val_loss", "test_loss", "test_perplexity", "test_accuracy", "test_macro_f1")


def metric_names() -> tuple[set[str], tuple[str, ...]]:
    """What a run's MLflow metrics can be called (for checking ``promote.metric`` and its guards
    before anything trains): the names, and the prefixes of per-label figures."""
    scores = {k for k in Scores.model_fields if k != "test_per_label_accuracy"}
    names = {*scores, *(f"zeroshot_{k}" for k in scores), *TRAIN_METRICS, *EFFICIENCY}
    names |= {"train_loss", "lr", "val_loss", "val_ppl", "val_accuracy", "val_macro_f1"}
    return names, ("test_per_label_accuracy.", "zeroshot_test_per_label_accuracy.")


class TrainSummary(BaseModel):
    """One supervised training run, as ``train_summary.json`` records it."""

    model_config = ConfigDict(extra="forbid")

    method: str
    steps: int
    finished: bool
    final_train_loss: float | None
    first_train_loss: float | None
    history: list[dict[str, float]]  # {step, loss, lr} per optimizer step
    evals: list[dict[str, float]]  # {step, val_loss} per periodic validation
    trainable_params: int
    total_params: int
    trainable_pct: float
    train_tokens: int  # prompt + completion tokens, no padding, all processes
    train_seconds: float  # in optimizer steps only
    tokens_per_s: float
    peak_memory_bytes: int  # the largest of the run's processes
    cut_examples: int = 0  # training examples longer than data.max_length, cut to fit
    wall_seconds: float  # the whole call: loading, training, evaluations, saving
    device: str
    mixed_precision: str
    num_processes: int = 1  # processes that trained the run (distributed.num_processes)
    strategy: str = "none"  # distributed.strategy
    artifact_bytes: int | None = None  # set once the run finished and saved its artifact

    def final_metrics(self) -> dict[str, float]:
        """The :data:`TRAIN_METRICS` as numbers (a missing artifact counts 0 bytes)."""
        values = self.model_dump()
        values["artifact_bytes"] = values["artifact_bytes"] or 0
        return {k: float(values[k]) for k in TRAIN_METRICS if values[k] is not None}


class Scores(BaseModel):
    """One model's figures on a test split."""

    model_config = ConfigDict(extra="forbid")

    test_loss: float  # mean cross-entropy per completion token (a classifier: per example), nats
    test_perplexity: float
    test_accuracy: float | None = None  # text_label data: the most likely label is the true one
    test_macro_f1: float | None = None  # the mean over labels of each label's F1 (text_label data)
    test_per_label_accuracy: dict[str, float] | None = None  # each true label's share picked right (recall)


class EvalResult(Scores):
    """A trained run on the test split, beside the base model zero-shot (``metrics.json``)."""

    method: str
    data_version: str
    base_model: str
    zeroshot: Scores
    task: str = "causal_lm"  # model.task, resolved: a sequence_classification loss is per example
    # the run on the whole validation split, what promotion decides on (absent in older metrics.json)
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_macro_f1: float | None = None
    # copied from the training summary (absent for an artifact evaluated without one)
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_pct: float | None = None
    tokens_per_s: float | None = None
    train_seconds: float | None = None
    train_tokens: int | None = None
    wall_seconds: float | None = None
    peak_memory_bytes: int | None = None
    artifact_bytes: int | None = None
    steps: int | None = None

    def flat(self) -> dict:
        """metrics.json as a dict (absent figures left out)."""
        return self.model_dump(exclude_none=True)

"""The params schema's building blocks: strict sections, and which keys matter.

Whether a key changes a run's result is a fact about the key, declared once, on its field
(``affects``), and every fingerprint is derived from that declaration by :func:`fingerprint`:
the resume check of a checkpoint, the nightly skip and the RLHF stages' reuse.
"""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# The levels of ``affects``:
#   "model"   changes what is trained (the default for every field and section)
#   "figures" changes the evaluated figures, not the trained model
#   "nothing" where runs go, what they are called, how often they log, save or validate, when and
#             what is promoted: neither
MODEL, FIGURES, NOTHING = "model", "figures", "nothing"


def affects(level: str, default: Any = ..., **kw: Any) -> Any:
    """A pydantic Field whose ``affects`` level is declared (``Field`` arguments in ``kw``)."""
    return Field(default, json_schema_extra={"affects": level}, **kw)


def operational(default: Any = ..., **kw: Any) -> Any:
    """A field that changes neither the trained model nor its figures."""
    return affects(NOTHING, default, **kw)


class Strict(BaseModel):
    """A params section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _declared(field: Any) -> dict[str, Any]:
    """What a field declares: ``affects`` (default "model", else its section's) and ``stages``."""
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _is_section(annotation: Any) -> bool:
    """Whether a field's type is (optionally) a params section, e.g. ``RlhfParams | None``."""
    if typing.get_args(annotation):  # X | None, SerializeAsAny[X], ...
        return any(_is_section(arg) for arg in typing.get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def fingerprint(params: BaseModel, scope: str = MODEL, stage: str | None = None) -> dict[str, Any]:
    """The flattened params (``train.lr``: value) that can change a run's result, from the
    ``affects`` declarations: ``scope`` "model" keeps what changes the trained model (what resuming a
    checkpoint must match), "figures" also what changes its evaluated figures (nightly retraining,
    RLHF stage reuse). ``stage``: an RLHF stage; sections declared for other stages (``stages``)
    are left out. The one place that decides which keys matter."""
    wanted = {MODEL} if scope == MODEL else {MODEL, FIGURES}
    out: dict[str, Any] = {}

    def walk(obj: BaseModel, prefix: str, inherited: str) -> None:
        for name, field in type(obj).model_fields.items():
            declared = _declared(field)
            level = declared.get("affects", inherited)
            if level not in wanted or (stage is not None and stage not in declared.get("stages", [stage])):
                continue
            value = getattr(obj, name)
            if value is None and _is_section(field.annotation):
                continue  # an optional section that is absent (no method, no RLHF): as params.yaml has it
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.", level)
            else:
                out[f"{prefix}{name}"] = value

    walk(params, "", MODEL)
    return flatten(json.loads(json.dumps(out, default=str)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out

"""The method registry: every module in this package is a fine-tuning method.

A method module defines
- ``Params``: a subclass of :class:`MethodParams` whose ``name`` is ``Literal["<module name>"]``;
- ``apply(model, params) -> model``: make the chosen parameters trainable (wrapping the model if
  needed) and freeze the rest;
and may define any of these optional hooks (see :data:`HOOKS`):

- ``bind(params, run) -> params``: fill method params derived from the run (e.g. total steps);
- ``load_kwargs(params) -> dict``: extra ``from_pretrained`` arguments (e.g. 4-bit quantization);
- ``optimizer(trainable, lr, weight_decay, params)``: an optimizer other than torch's AdamW;
- ``extra_loss(model) -> Tensor``: a regularizer added to the training loss;
- ``after_step(model, step)``: called after each optimizer step, before gradients are cleared;
- ``state(model) -> dict`` / ``load_state(model, state)``: training state beyond the weights and
  the optimizer that a checkpoint must carry for exact resume (AdaLoRA's importance scores);
- ``save(model, out_dir)`` / ``load(base_model, out_dir, params)``: when peft's adapter files do not
  fit (hand-written methods);
- ``merge(model) -> nn.Module``: fold the trained weights into the base (no added latency).

Adding a method is adding one module here and one ``params/methods/<name>.yaml``: nothing else
lists the methods.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict


class MethodParams(BaseModel):
    """Base of every method's params: the method's ``name`` and nothing else unknown."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str


HOOKS = (
    "bind",
    "load_kwargs",
    "optimizer",
    "extra_loss",
    "after_step",
    "state",
    "load_state",
    "save",
    "load",
    "merge",
)


@dataclass(frozen=True)
class Method:
    name: str
    Params: type[MethodParams]
    apply: Callable[[Any, MethodParams], Any]
    module: ModuleType
    doc: str

    def hook(self, name: str) -> Callable | None:
        """The module's optional hook ``name`` (one of HOOKS), or None."""
        if name not in HOOKS:
            raise ValueError(f"unknown method hook {name!r}; hooks are: {', '.join(HOOKS)}")
        return getattr(self.module, name, None)

    @property
    def mergeable(self) -> bool:
        return self.hook("merge") is not None


@cache
def _registry() -> dict[str, Method]:
    methods = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        params_cls = getattr(module, "Params", None)
        apply = getattr(module, "apply", None)
        if params_cls is None or apply is None:
            raise TypeError(f"method module {module.__name__} must define Params and apply()")
        declared = params_cls.model_fields["name"].default
        if declared != info.name:
            raise TypeError(f"{module.__name__}.Params.name defaults to {declared!r}, expected {info.name!r}")
        summary = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        methods[info.name] = Method(info.name, params_cls, apply, module, summary)
    return methods


def method_names() -> list[str]:
    return sorted(_registry())


def get_method(name: str) -> Method:
    """Look a method up by name; KeyError names the ones available."""
    try:
        return _registry()[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(method_names())}") from None

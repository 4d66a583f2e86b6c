"""The method contract and its registry: every public module in this package is one fine-tuning method.

A method module defines a typed ``Params`` (a :class:`MethodParams` whose ``name`` is
``Literal["<module name>"]``) and one :class:`Method` subclass, registered with :func:`register`.
The class **declares what the method is** (the capabilities below), which the core asks instead of
testing names, and **does what it must** (``apply``), overriding any hook whose default does not fit.

Capabilities (class attributes):

- ``trains``: what becomes trainable: ``"all weights"``, ``"some weights"`` (of the base), ``"added
  weights"`` (new tensors beside the frozen base) or ``"prompts"`` (virtual tokens);
- ``weight_adapter``: a peft adapter over the weights; switched off, the model is the base model;
- ``quantizes_base``: the base is loaded changed (QLoRA: 4 bits), so "adapter off" is not the base;
- ``input_virtual_tokens(params)``: soft tokens the method puts before the input (0 for most);
- ``mergeable``: ``merge`` is overridden, so the trained update folds into the base weights.

Hooks (methods with a default): ``bind``, ``load_kwargs``, ``optimizer``, ``extra_loss``,
``after_step``, ``state``/``load_state``, ``save``/``load``, ``merge``, ``expected_trainable``,
``unsupported`` (the distributed strategies it cannot train under, and why).

Adding a method is one module here and one ``params/methods/<name>.yaml``: nothing else lists the
methods. Modules whose name starts with ``_`` hold helpers several methods share.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

Trains = Literal["all weights", "some weights", "added weights", "prompts"]
DEFAULT = "lora"  # the method a command uses when none is named


class MethodParams(BaseModel):
    """Base of every method's params: the method's ``name`` and nothing else unknown."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str


class Method:
    """One fine-tuning method: declared capabilities and the hooks the training core calls."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    trains: ClassVar[Trains]
    weight_adapter: ClassVar[bool] = False
    quantizes_base: ClassVar[bool] = False
    doc: str = ""  # the module docstring's first line (set at registration)

    def apply(self, model: nn.Module, params: Any) -> nn.Module:
        """Make what the method trains trainable (wrapping the model if needed); freeze the rest."""
        raise NotImplementedError

    def input_virtual_tokens(self, params: Any) -> int:
        """Soft tokens put before the input embeddings (prompt tuning, P-tuning); 0 otherwise."""
        return 0

    def bind(self, params: Any, run: Any) -> Any:
        """Method params derived from the whole run's params (e.g. AdaLoRA's total steps)."""
        return params

    def load_kwargs(self, params: Any) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments for the base model (e.g. 4-bit quantization)."""
        return {}

    def optimizer(self, trainable: list, lr: float, weight_decay: float, params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A regularizer added to the training loss, or None."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step, before gradients are cleared."""

    def state(self, model: nn.Module) -> dict | None:
        """Training state beyond weights and optimizer that exact resume needs (None: nothing)."""
        return None

    def load_state(self, model: nn.Module, state: dict) -> None:
        """Restore what :meth:`state` returned."""

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained artifact's weights (default: ``save_pretrained``; a PeftModel writes its adapter)."""
        model.save_pretrained(out_dir)

    def load(self, base: nn.Module, out_dir: Path, params: Any) -> nn.Module | None:
        """The trained model from ``out_dir`` over ``base``; None: the files are peft's or a whole model."""
        return None

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the trained update into the base weights: a plain model, no added latency."""
        raise NotImplementedError(f"method {self.name} cannot be merged into the base weights")

    @property
    def mergeable(self) -> bool:
        return type(self).merge is not Method.merge

    def unsupported(self, strategy: str, params: Any) -> str | None:
        """Why the method cannot train under ``strategy`` (``distributed.strategy``), or None if it can.
        Checked before any worker starts."""
        return None

    def expected_trainable(self, base: nn.Module, params: Any) -> int | None:
        """The closed-form trainable parameter count on ``base`` (a Llama), for the tests; None if
        there is none for these params."""
        return None


_REGISTERED: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under its params' ``name`` (= its module's name)."""
    name = cls.Params.model_fields["name"].default
    module = cls.__module__.rsplit(".", 1)[-1]
    if name != module:
        raise TypeError(f"{cls.__module__}.Params.name defaults to {name!r}, expected {module!r} (the module name)")
    if name in _REGISTERED and type(_REGISTERED[name]) is not cls:
        raise TypeError(f"method {name!r} registered twice")
    if not hasattr(cls, "trains"):
        raise TypeError(f"method {name}: declare what it trains (Method.trains)")
    cls.name = name
    method = cls()
    doc = sys.modules[cls.__module__].__doc__ or ""
    method.doc = doc.strip().splitlines()[0] if doc.strip() else ""
    _REGISTERED[name] = method
    return cls


@cache
def _registry() -> dict[str, Method]:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
            if info.name not in _REGISTERED:
                raise TypeError(f"method module {__name__}.{info.name} registers no method (use @register)")
    return dict(_REGISTERED)


def method_names() -> list[str]:
    return sorted(_registry())


def get_method(name: str) -> Method:
    """Look a method up by name; KeyError names the ones available."""
    try:
        return _registry()[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(method_names())}") from None


def mergeable_names() -> list[str]:
    return [n for n in method_names() if get_method(n).mergeable]


def weight_adapter_names() -> list[str]:
    return [n for n in method_names() if get_method(n).weight_adapter]

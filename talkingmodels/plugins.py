"""The user's own code named in a config: ``"package.module:attribute"`` import paths.

A config names a model class (or any function returning a model) with its arguments, a
function returning the data, a metric, or a ``Distiller`` subclass this way; nothing in the
package has to be edited or registered.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from talkingmodels.errors import UserError


def import_object(path: str, what: str = "object"):
    """The attribute named by ``"package.module:attribute"`` (dots after the colon reach
    nested attributes); modules are also looked up in the working directory."""
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise UserError(f"{what} {path!r} is not an import path; write it as 'package.module:Name'")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: the user's own modules
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(f"{what} {path!r}: no module named {exc.name!r} (is it installed or in "
                        "the working directory?)") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = ", ".join(n for n in dir(target) if not n.startswith("_"))[:200]
            raise UserError(f"{what} {path!r}: {type(target).__name__} {module_name!r} has no "
                            f"attribute {part!r}; it has: {names}")
        target = getattr(target, part)
    return target


class ModelSpec(BaseModel):
    """A model named by import path: ``{class: "my_pkg.nets:TinyCNN", args: {width: 32}}``,
    optionally with weights to load (a safetensors file or a saved state dict)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    cls: str = Field(alias="class", description="import path of a model class or a function "
                     "returning an nn.Module")
    args: dict = Field(default_factory=dict, description="keyword arguments of the call")
    weights: Path | None = Field(None, description="weights to load: .safetensors or a torch "
                                 "state dict file")

    def build(self, what: str) -> nn.Module:
        factory = import_object(self.cls, what)
        if not callable(factory):
            raise UserError(f"{what} {self.cls!r} is not a class or function")
        try:
            model = factory(**self.args)
        except TypeError as exc:
            raise UserError(f"{what} {self.cls!r} cannot be built with args {self.args}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"{what} {self.cls!r} returned a {type(model).__name__}, not a torch nn.Module")
        if self.weights is not None:
            self._load(model, what)
        return model

    def _load(self, model: nn.Module, what: str) -> None:
        import torch

        if not self.weights.is_file():
            raise UserError(f"{what} weights {self.weights} do not exist")
        try:
            if self.weights.suffix == ".safetensors":
                from safetensors.torch import load_model

                load_model(model, str(self.weights), strict=True)
            else:
                model.load_state_dict(torch.load(self.weights, weights_only=True, map_location="cpu"))
        except (RuntimeError, OSError, ValueError) as exc:
            raise UserError(f"{what} weights {self.weights} do not fit {self.cls!r}: "
                            f"{str(exc).splitlines()[0]}") from None

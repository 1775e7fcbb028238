"""Validated options: pydantic models, and one clear line for the first mistake in them."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from talkingmodels.errors import UserError


def describe(error: ValidationError, where: str, model: type[BaseModel] | None = None) -> str:
    """One line for the first problem pydantic found, naming the valid keys on a typo."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden" and model is not None:
        valid = ", ".join(model.model_fields)
        return f"{where}: unknown key {loc!r}; valid keys: {valid}"
    return f"{where}: {loc}: {first['msg']} (got {first.get('input')!r})"


def validate(model: type[BaseModel], data, where: str):
    """``model`` validated from ``data``; a :class:`UserError` of one line otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise UserError(describe(error, where, model)) from None

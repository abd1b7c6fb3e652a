"""One check YAML needs that pydantic's lax mode skips: a yes/no value is not a number.

YAML 1.1 reads `yes`, `no`, `on`, `off`, `true` and `false` as booleans, and pydantic's lax mode turns a
boolean into 1 or 0 for a number field, so `max_concurrent: yes` would quietly become 1. Numbers written
as strings (`lr: 1e-3`, which YAML 1.1 reads as text) stay accepted: that is what users mean.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel


def _is_number(annotation: Any) -> bool:
    """int/float, or an Optional/union of them without bool."""
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return bool.__name__ not in {getattr(a, "__name__", "") for a in args} and any(
            _is_number(a) for a in args)
    if origin is typing.Annotated:
        return _is_number(args[0])
    return False


def refuse_yes_no(model: type[BaseModel], field: str | None, value: Any) -> Any:
    """The value unchanged, or a ValueError when a boolean is given for a number field."""
    info = model.model_fields.get(field or "")
    if isinstance(value, bool) and info is not None and _is_number(info.annotation):
        raise ValueError(f"{str(value).lower()} is a yes/no value, not a number (YAML reads yes/no/on/off/"
                         "true/false as booleans); write a number")
    return value

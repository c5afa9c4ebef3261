"""The base of every recipe section: a recipe means exactly what it says.

- Unknown fields are refused (a typo is an error, not a default).
- Strict types: `true` is not an integer, `"3"` is not a number, `1.5` (or `2.0`) is not a step
  count; an integer is still a number.
- NaN and infinities are refused wherever a number is expected.
- `NonBlank` strings (paths, URIs, names) may not be empty or only whitespace.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=False)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


NonBlank = Annotated[str, AfterValidator(_not_blank)]

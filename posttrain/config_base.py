"""The base of every recipe section: unknown fields are refused (a typo is an error, not a default)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)

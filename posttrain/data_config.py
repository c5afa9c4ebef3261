"""The recipe's `data` section: where the rows are, how they become training sequences, and where
that preparation runs. Torch-free and airflow-free (see recipe.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.config_base import NonBlank, Strict


class PackingConfig(Strict):
    enabled: bool = True
    mode: Literal["offline", "streaming"] = "offline"
    buffer_docs: int = Field(512, ge=1)  # streaming: documents packed together per buffer
    overlong: Literal["truncate", "drop"] = "truncate"


class DataValidationConfig(Strict):
    min_rows: int = Field(100, ge=1)
    max_duplicate_fraction: float = Field(0.05, ge=0, le=1)
    max_overlong_fraction: float = Field(0.05, ge=0, le=1)  # rows longer than max_seq_len (checked when tokenized)
    allowed_roles: list[Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: ["system", "user", "assistant"], min_length=1)


class DataConfig(Strict):
    format: Literal["chat", "preference", "prompt"] = "chat"
    train: NonBlank = Field(min_length=1, description="Training data: a JSONL file (a path relative to the recipe, "
                                                      "or a URI)")
    eval: NonBlank | None = Field(None, description="Evaluation data: a JSONL file of the same format (path or URI)")
    max_seq_len: int = Field(2048, gt=0, le=1_048_576)
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = "all_assistant_turns"
    fold_system_prompt: bool = Field(False, description="Merge a leading system message into the first user turn "
                                     "(system text, a blank line, user text) before the chat template renders it, "
                                     "for templates without a system role (Gemma 2)")
    packing: PackingConfig = Field(default_factory=PackingConfig)
    prepare: Literal["local", "ray"] = Field(
        "local", description="Where the prepare stage runs: local (in the Airflow task; fine for small data) or ray "
        "(a Ray Data job on the run's cluster, started before it: tokenizes and packs in parallel, same output)")
    validation: DataValidationConfig = Field(default_factory=DataValidationConfig)

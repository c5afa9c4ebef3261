"""Task components a recipe injects into the model (`model.components`), checked torch-free.

A component is named by an import path ``"package.module:Name"``, the way trl takes user pieces.
Implemented so far, by name:

- ``head``: an ``nn.Module`` class built as ``Name(config)`` from the base model's transformers
  config (read ``config.hidden_size``; the vocabulary size must not matter to it: the export holds
  the unpadded vocabulary, training the padded one). Its ``forward(hidden)`` takes the final hidden
  states ``[..., hidden_size]`` (after the final norm) and returns a tensor of the same shape and
  dtype, which the model's output projection then scores: a projection or ranking head on the final
  hidden states. The losses stay chunked from those (transformed) hidden states, so full logits
  never exist. Its parameters train (also with LoRA, where the base is frozen), start from what
  the constructor draws under a seed derived from `training.seed` (the same on every rank and
  world size), are sharded with the model's root by FSDP2, checkpointed, and exported next to the
  Hugging Face weights (`model/components/`, see training_lib/models/components.py).

The check imports the user's module only when user code imports are on (`rewards.user_code_imports`;
the DAG processor parses recipes without them, and then only the form is checked). Whether the
class is an ``nn.Module`` is read from its MRO by name, so this module never imports torch itself.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from posttrain.import_path import import_object
from posttrain.rewards import user_code_enabled

# name → what the component does to the model
COMPONENTS = {"head": "transforms the final hidden states before the output projection"}
_PATH = re.compile(r"[\w.]+:[\w.]+")


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and any(
        c.__name__ == "Module" and c.__module__ == "torch.nn.modules.module" for c in obj.__mro__)


def resolve_component(name: str, path: str) -> type:
    """The class `path` names, checked for component `name`; raises ValueError saying what is wrong."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; allowed: {', '.join(COMPONENTS)}")
    if not _PATH.fullmatch(path):
        raise ValueError(f"{path!r} is not an import path of the form 'package.module:Name'")
    module_name, _, attr_path = path.partition(":")
    obj = import_object(module_name, attr_path, repr(path))
    if not _is_module_class(obj):
        raise ValueError(f"{path!r} is {obj!r}, not a torch.nn.Module class; a {name} is a module class built "
                         "as Name(config)")
    try:
        inspect.signature(obj).bind(object())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r}: a {name} is built as Name(config), and {obj.__name__}"
                         f"{inspect.signature(obj)} cannot be called so: {exc}") from exc
    return obj


def check_component(name: str, path: str) -> str:
    """The schema's check of `model.components.<name>`: the form always, the class itself when user
    code imports are on. Returns `path`."""
    if user_code_enabled():
        resolve_component(name, path)
    elif not _PATH.fullmatch(path):
        raise ValueError(f"{path!r} is not an import path of the form 'package.module:Name'")
    return path

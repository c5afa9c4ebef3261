"""A recipe's custom components on the training side: built, initialised, exported and reloaded.

The contract is posttrain/components.py's (``Name(config)``, ``forward(hidden) -> same shape``).
Only the ``head`` exists so far; it lives in ``CausalLMWithLoss.head``.

- Training builds it on the meta device with the rest of the model; its initial values are drawn
  once on the CPU by its own constructor under a seed derived from ``training.seed`` (so every
  rank and world size start from the same head, and so does a single-process reference) and each
  rank copies its own shard of them in ``sharded_load.materialize``.
- The export writes ``<export>/components/``: ``head.safetensors`` (the head's own state dict),
  ``components.json`` (name → import path, file, constructor) and a README saying how to load it.
  ``load_components`` is that recipe in code.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file

from posttrain.components import COMPONENTS, resolve_component
from posttrain.recipe import Recipe
from posttrain.training_lib.models.loading import load_for_training
from posttrain.training_lib.models.with_loss import CausalLMWithLoss, base_model
from posttrain.training_lib.seeding import derive_seed

FOLDER = "components"
INDEX = "components.json"
_README = """# Custom components of this model

The recipe injected these components (`model.components`); the Hugging Face weights next to this
folder do not contain them, and a server that loads only those (vLLM, `from_pretrained`) runs the
model without them. {names}

To run the model as it was trained:

```python
import json, importlib
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(EXPORT_DIR)
spec = json.load(open(f"{{EXPORT_DIR}}/components/components.json"))["head"]
module, _, name = spec["class"].partition(":")
head = getattr(importlib.import_module(module), name)(model.config)
head.load_state_dict(load_file(f"{{EXPORT_DIR}}/components/{{spec['file']}}"))
hidden = model.model(input_ids=ids).last_hidden_state       # final hidden states (after the norm)
logits = model.lm_head(head(hidden))                         # the head applies before the output layer
```

(`posttrain.training_lib.models.components.load_components(EXPORT_DIR, model.config)` does the same.)
"""


def head_class(recipe: Recipe) -> type | None:
    path = recipe.model.components.head
    return None if path is None else resolve_component("head", path)


def head_seed(seed: int) -> int:
    return derive_seed(seed, zlib.crc32(b"model.components.head"))


def initial_head(recipe: Recipe, config: Any) -> torch.nn.Module | None:
    """The head as its constructor initialises it, on the CPU, under the recipe's derived seed; the
    global RNG is left as it was."""
    cls = head_class(recipe)
    if cls is None:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed(recipe.training.seed))
        return cls(config)


def meta_head(recipe: Recipe, config: Any) -> tuple[torch.nn.Module | None, dict[str, torch.Tensor]]:
    """(the head with its parameters on the meta device, the full initial value of each of them keyed
    by its name in CausalLMWithLoss: `head.<name>`), for the sharded load to fill."""
    real = initial_head(recipe, config)
    if real is None:
        return None, {}
    with init_empty_weights(include_buffers=False):
        head = head_class(recipe)(config)
    with torch.no_grad():  # buffers are built for real: the seeded ones, not whatever this build drew
        for name, buf in real.named_buffers():
            head.get_buffer(name).copy_(buf)
    return head, {f"head.{k}": v.detach().float() for k, v in real.named_parameters()}


def training_model(recipe: Recipe, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The training model in one process (CausalLMWithLoss over load_for_training, with the recipe's
    head as the sharded build initialises it): the single-worker reference."""
    lm = load_for_training(recipe, dtype)
    return CausalLMWithLoss(lm, recipe.training.loss_chunk_tokens, head=initial_head(recipe, base_model(lm).config))


def split_state(full: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A CausalLMWithLoss state dict → (the rest, {component name: its own state dict})."""
    rest: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in full.items():
        name, dot, sub = key.partition(".")
        if dot and name in COMPONENTS:
            parts.setdefault(name, {})[sub] = value
        else:
            rest[key] = value
    return rest, parts


def save_components(folder: Path, recipe: Recipe, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write `folder/components/` for the recipe's components (nothing without any)."""
    named = recipe.model.components.named()
    if not named:
        return
    missing = sorted(set(named) - set(parts))
    if missing:
        raise RuntimeError(f"model.components {missing}: the trained model holds no weights for them")
    out = folder / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, path in named.items():
        tensors = {k: v.detach().float().contiguous() for k, v in parts[name].items()}
        save_file(tensors, str(out / f"{name}.safetensors"))
        index[name] = {"class": path, "file": f"{name}.safetensors", "constructor": "Name(config)",
                       "applies": COMPONENTS[name]}
    (out / INDEX).write_text(json.dumps(index, indent=2))
    listed = ", ".join(f"`{n}`: `{p}` ({COMPONENTS[n]})" for n, p in named.items())
    (out / "README.md").write_text(_README.format(names=listed))


def components_of(model_dir: Path) -> dict[str, dict]:
    """The components an export carries (components.json), {} for none."""
    index = Path(model_dir) / FOLDER / INDEX
    return json.loads(index.read_text()) if index.exists() else {}


def load_components(model_dir: Path, config: Any) -> dict[str, torch.nn.Module]:
    """The export's components built from `config` and loaded with their trained weights (strict)."""
    out = {}
    for name, spec in components_of(model_dir).items():
        module = resolve_component(name, spec["class"])(config)
        module.load_state_dict(load_file(str(Path(model_dir) / FOLDER / spec["file"])), strict=True)
        out[name] = module.float().eval()
    return out

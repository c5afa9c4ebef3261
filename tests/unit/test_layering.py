"""The house rules on the package's imports, read from the source (module level and inside
functions, so a lazy import can't hide a wrong direction):

- no import cycle in posttrain/;
- dags → operators → hooks/triggers, never back;
- training_lib imports no airflow and nothing of the Airflow side (operators, hooks, triggers,
  dags, provider, ...);
- the torch-free shared layer (the recipe, the plan, data preparation, rewards, URIs) and the
  operators import nothing from training_lib, and the shared layer no torch, ray, vllm or airflow;
- inside training_lib, the leaves (losses, data, seeding) don't reach up into models, parallel,
  trainers, rl or evaluation, and nothing reaches into trainers but the entrypoint;
- no module over 400 lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "posttrain"
MAX_LINES = 400

# Torch-free, airflow-free modules both sides use.
SHARED = ("posttrain.recipe", "posttrain.data_config", "posttrain.paradigm_config", "posttrain.ec2_config",
          "posttrain.config_base",
          "posttrain.recipe_yaml", "posttrain.planning", "posttrain.prep", "posttrain.rewards", "posttrain.uris",
          "posttrain.overrides", "posttrain.eval_metrics", "posttrain.instance_types", "posttrain.paths",
          "posttrain.samples", "posttrain.report", "posttrain.import_path", "posttrain.components",
          "posttrain.model_cache", "posttrain.promotion_config", "posttrain.promotion_decision")
AIRFLOW_SIDE = ("posttrain.operators", "posttrain.hooks", "posttrain.triggers", "posttrain.dags",
                "posttrain.provider", "posttrain.links", "posttrain.gc", "posttrain.summary", "posttrain.cli",
                "posttrain.live_view",
                "posttrain.validation")
GPU_STACK = ("torch", "ray", "vllm", "transformers", "peft", "accelerate", "safetensors")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.Module, module: str, is_package: bool) -> Iterator[tuple[str, bool]]:
    """(imported module, at module level) for every import that runs (TYPE_CHECKING blocks don't)."""

    def walk(node: ast.AST, top: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                yield from ((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this module's package
                    base = module.split(".")[: len(module.split(".")) - child.level + (1 if is_package else 0)]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                yield name, top
                # `from posttrain.x import y` may import the submodule posttrain.x.y
                yield from ((f"{name}.{alias.name}", top) for alias in child.names)
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from walk(child, inner)

    yield from walk(tree, True)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = package_modules()


def import_graph() -> dict[str, dict[str, bool]]:
    """module → {posttrain module it imports: whether at module level}, plus third-party roots."""
    graph: dict[str, dict[str, bool]] = {}
    for name, path in MODULES.items():
        edges: dict[str, bool] = {}
        tree = ast.parse(path.read_text(), str(path))
        for target, top in imports(tree, name, path.name == "__init__.py"):
            if target.startswith("posttrain"):
                if target not in MODULES:
                    continue  # a name imported from a module, not a module
            else:
                target = target.split(".")[0]
            edges[target] = edges.get(target, False) or top
        graph[name] = edges
    return graph


GRAPH = import_graph()


def inside(module: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def offenders(sources: tuple[str, ...] | str, targets: tuple[str, ...] | str) -> list[str]:
    return sorted(f"{m} imports {t}" for m, edges in GRAPH.items() if inside(m, sources)
                  for t in edges if inside(t, targets) and not inside(t, sources))


def test_the_graph_sees_the_package() -> None:
    assert "posttrain.training_lib.trainers.sft" in GRAPH and "posttrain.recipe" in GRAPH
    assert "torch" in GRAPH["posttrain.training_lib.trainers.sft"]
    assert "posttrain.recipe" in GRAPH["posttrain.planning"]


def test_no_import_cycles() -> None:
    """No cycle, counting imports inside functions too: an import moved into a function to break a
    cycle still means two modules that need each other."""
    top = {m: [t for t in edges if t in GRAPH] for m, edges in GRAPH.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in top[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(top):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_training_lib_never_imports_the_airflow_side() -> None:
    assert offenders("posttrain.training_lib", ("airflow",) + AIRFLOW_SIDE) == []


def test_shared_layer_and_operators_import_nothing_from_training_lib() -> None:
    assert offenders(SHARED + ("posttrain.operators", "posttrain.dags", "posttrain.hooks", "posttrain.triggers"),
                     "posttrain.training_lib") == []


def test_shared_layer_imports_no_gpu_stack_and_no_airflow() -> None:
    bad = offenders(SHARED, ("airflow", "torch", "ray", "vllm", "peft", "accelerate", "safetensors")
                    + AIRFLOW_SIDE)
    # transformers loads tokenizers without torch; the shared layer may only reach for it lazily.
    eager = sorted(f"{m} imports transformers at module level" for m in GRAPH
                   if inside(m, SHARED) and GRAPH[m].get("transformers"))
    assert bad + eager == []


def test_airflow_side_imports_no_gpu_stack() -> None:
    assert offenders(AIRFLOW_SIDE, GPU_STACK) == []


@pytest.mark.parametrize(("layer", "never_imports"), [
    ("posttrain.hooks", ("posttrain.operators", "posttrain.dags")),
    ("posttrain.triggers", ("posttrain.operators", "posttrain.dags")),
    ("posttrain.operators", ("posttrain.dags",)),
])
def test_dags_operators_hooks_direction(layer: str, never_imports: tuple[str, ...]) -> None:
    assert offenders(layer, never_imports) == []


@pytest.mark.parametrize(("layer", "never_imports"), [
    ("posttrain.training_lib.losses", ("posttrain.training_lib.models", "posttrain.training_lib.parallel",
                                       "posttrain.training_lib.trainers", "posttrain.training_lib.rl",
                                       "posttrain.training_lib.evaluation", "posttrain.training_lib.runtime")),
    ("posttrain.training_lib.data", ("posttrain.training_lib.models", "posttrain.training_lib.parallel",
                                     "posttrain.training_lib.trainers", "posttrain.training_lib.rl",
                                     "posttrain.training_lib.evaluation", "posttrain.training_lib.runtime")),
    ("posttrain.training_lib.seeding", ("posttrain.training_lib",)),
    ("posttrain.training_lib.rl", ("posttrain.training_lib.trainers", "posttrain.training_lib.evaluation")),
    ("posttrain.training_lib.evaluation", ("posttrain.training_lib.trainers", "posttrain.training_lib.rl")),
    ("posttrain.training_lib.models", ("posttrain.training_lib.trainers", "posttrain.training_lib.rl",
                                       "posttrain.training_lib.evaluation", "posttrain.training_lib.runtime")),
])
def test_training_lib_layers_dont_reach_up(layer: str, never_imports: tuple[str, ...]) -> None:
    assert offenders(layer, never_imports) == []


def test_no_module_over_400_lines() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}

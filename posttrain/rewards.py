"""Reward functions that score one completion of a GRPO rollout.

Every reward function has the signature ``fn(completion, *, prompt, answer, **params) -> float``:
``prompt`` is the chat messages the completion answers, ``answer`` the reference answer of the prompt
(``None`` when the data has none) and ``params`` come from the recipe. A recipe names a reward either by
a built-in name (``exact_match``, ``regex``, ``length_penalty``) or by an import path
``"package.module:function"``, the way trl takes user rewards.

``RewardSpec`` is the recipe's entry for one reward (part of the schema); building one runs
``check_reward_spec``: it resolves the name, checks the function can be called with the recipe's params
and, for built-ins, the params' types and values, and raises ``ValueError`` naming the reward. The
registry, the checks and ``score`` run on the scheduler and in the Ray job alike, so this module
imports no torch.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_validator

from posttrain.config_base import NonBlank, Strict
from posttrain.import_path import import_object

RewardFn = Callable[..., float]
TOTAL = "total"
# Whether building a RewardSpec imports the user function it names. A context variable, not
# pydantic's validation context: RewardSpec has its own __init__, through which pydantic validates
# nested specs without passing the context on.
_IMPORT_USER_CODE: ContextVar[bool] = ContextVar("posttrain_import_user_code", default=True)


@contextmanager
def user_code_imports(enabled: bool) -> Iterator[None]:
    """RewardSpecs built inside import their user functions (`enabled`) or check only their form."""
    token = _IMPORT_USER_CODE.set(enabled)
    try:
        yield
    finally:
        _IMPORT_USER_CODE.reset(token)


def user_code_enabled() -> bool:
    """Whether recipe checks may import the user code a recipe names (see user_code_imports)."""
    return _IMPORT_USER_CODE.get()


def exact_match(completion: str, *, prompt: list[dict], answer: str | None, normalize: bool = False) -> float:
    """1.0 when the completion equals the answer (surrounding whitespace ignored); with ``normalize``
    also case and runs of whitespace."""
    if answer is None:
        raise ValueError("exact_match needs an answer for every prompt and this prompt has none")
    if normalize:
        return float(" ".join(completion.lower().split()) == " ".join(answer.lower().split()))
    return float(completion.strip() == answer.strip())


def regex(completion: str, *, prompt: list[dict], answer: str | None, pattern: str, fullmatch: bool = False) -> float:
    """1.0 when ``pattern`` is found in the completion (``re.search``), or with ``fullmatch`` matches
    the whole completion: a format reward."""
    compiled = re.compile(pattern)
    return float((compiled.fullmatch if fullmatch else compiled.search)(completion) is not None)


def length_penalty(completion: str, *, prompt: list[dict], answer: str | None, target_chars: int,
                   penalty_per_char: float) -> float:
    """−penalty_per_char for every character beyond ``target_chars``; never positive, so it only
    discourages rambling and never rewards an empty answer."""
    return -penalty_per_char * max(0, len(completion) - target_chars)


def _is_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _is_pattern(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {value!r}"
    try:
        re.compile(value)
    except re.error as exc:
        return f"is not a valid regular expression ({exc}): {value!r}"
    return None


def _is_count(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else f"must be an integer >= 0, got {value!r}"


def _is_rate(value: Any) -> str | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return None if ok else f"must be a number >= 0, got {value!r}"


@dataclass(frozen=True)
class _Builtin:
    fn: RewardFn
    params: Mapping[str, Callable[[Any], str | None]]  # param → check returning the problem, or None
    required: tuple[str, ...]


BUILTINS: dict[str, _Builtin] = {
    "exact_match": _Builtin(exact_match, {"normalize": _is_bool}, ()),
    "regex": _Builtin(regex, {"pattern": _is_pattern, "fullmatch": _is_bool}, ("pattern",)),
    "length_penalty": _Builtin(length_penalty, {"target_chars": _is_count, "penalty_per_char": _is_rate},
                               ("target_chars", "penalty_per_char")),
}


def resolve_reward(name_or_path: str) -> RewardFn:
    """The function a recipe names: a built-in name, or ``"package.module:function"`` imported (the
    part after the colon may be dotted, e.g. ``module:Class.method``). Raises ``ValueError``."""
    if name_or_path in BUILTINS:
        return BUILTINS[name_or_path].fn
    if ":" not in name_or_path:
        raise ValueError(f"reward {name_or_path!r}: unknown built-in (allowed: {', '.join(BUILTINS)}); "
                         "name a user function as 'package.module:function'")
    module_name, _, attr_path = name_or_path.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward {name_or_path!r}: an import path is 'package.module:function'")
    obj = import_object(module_name, attr_path, f"reward {name_or_path!r}")
    if not callable(obj):
        raise ValueError(f"reward {name_or_path!r}: {attr_path!r} is a {type(obj).__name__}, not a function")
    return obj


def check_reward_spec(name: str, params: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the reward when it would fail at its first call: unknown name,
    import path that does not import, not callable, a signature that does not accept
    ``(completion, prompt=..., answer=..., **params)``, and for built-ins a missing, unknown or
    invalid param (a bad regex included)."""
    fn = resolve_reward(name)
    builtin = BUILTINS.get(name)
    if builtin is not None:
        missing = [p for p in builtin.required if p not in params]
        if missing:
            raise ValueError(f"reward {name!r}: missing required param(s) {', '.join(missing)}")
        for key, value in params.items():
            check = builtin.params.get(key)
            if check is None:
                raise ValueError(f"reward {name!r}: unknown param {key!r} (allowed: {', '.join(builtin.params)})")
            problem = check(value)
            if problem:
                raise ValueError(f"reward {name!r}: param {key!r} {problem}")
        return
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"reward {name!r}: cannot read its signature ({exc})") from exc
    try:
        signature.bind("", prompt=[], answer=None, **params)
    except TypeError as exc:
        given = ", ".join(["completion", "prompt=", "answer=", *(f"{k}=" for k in params)])
        raise ValueError(f"reward {name!r}: signature {signature} cannot be called as fn({given}): {exc}") from exc


class RewardError(RuntimeError):
    """A reward function raised or returned something that is not a finite number."""

    def __init__(self, reward: str, index: int, problem: str) -> None:
        super().__init__(f"reward {reward!r} failed on completion {index}: {problem}")
        self.reward = reward
        self.index = index


class RewardSpec(Strict):
    """One reward of a recipe (an entry of `grpo.rewards`): a built-in name or an import path, its
    weight in the total and its params. ``label`` is the key of its scores (default: ``name``); give
    one when the same function is used twice, e.g. two ``regex`` rewards.

    Checked when built: the name resolves, the function takes the params (`check_reward_spec`). The
    DAG processor parses recipes inside ``user_code_imports(False)``: user modules may import torch,
    so there only the form of an import path is checked (the first task and `posttrain validate`
    import and check them)."""

    name: NonBlank
    weight: float = Field(1.0, allow_inf_nan=True)  # a NaN or infinity is refused below, naming the reward
    params: dict[str, Any] = Field(default_factory=dict)
    label: NonBlank | None = None

    def __init__(self, name: str | None = None, /, **data: Any) -> None:
        # The reward's name may be given positionally, as scoring code writes RewardSpec("regex", ...).
        super().__init__(**({"name": name} if name is not None else {}), **data)

    @model_validator(mode="after")
    def _resolvable(self) -> RewardSpec:
        if ":" in self.name and not _IMPORT_USER_CODE.get():
            self._check_weight()
            if not re.fullmatch(r"[\w.]+:[\w.]+", self.name):
                raise ValueError(f"reward {self.name!r}: not an import path of the form 'package.module:function'")
            return self
        self.check()
        return self

    @property
    def key(self) -> str:
        return self.label or self.name

    def check(self) -> None:
        """The weight, and the function with its params (importing a user function)."""
        self._check_weight()
        check_reward_spec(self.name, self.params)

    def _check_weight(self) -> None:
        if not math.isfinite(self.weight):
            raise ValueError(f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}")


def score(specs: Sequence[RewardSpec], completions: Sequence[str], prompts: Sequence[list[dict]],
          answers: Sequence[str | None] | None = None) -> dict[str, list[float]]:
    """Scores of every completion by every reward (keyed by ``RewardSpec.key``) and their weighted
    sum under ``"total"``. ``completions[i]`` answers ``prompts[i]`` (repeat each prompt G times for
    a group of G). A reward that raises, or returns anything but a finite number, raises
    ``RewardError`` naming it and the completion index: a silent 0 would train on a wrong signal."""
    answers = [None] * len(completions) if answers is None else answers
    if not len(completions) == len(prompts) == len(answers):
        raise ValueError(f"score: {len(completions)} completions, {len(prompts)} prompts and {len(answers)} "
                         "answers; give one prompt and one answer per completion")
    keys = [spec.key for spec in specs]
    duplicated = sorted({k for k in keys if keys.count(k) > 1 or k == TOTAL})
    if duplicated:
        raise ValueError(f"score: reward key(s) {', '.join(map(repr, duplicated))} used twice or reserved; "
                         "give each reward a distinct label")
    out: dict[str, list[float]] = {}
    total = [0.0] * len(completions)
    for spec in specs:
        fn = resolve_reward(spec.name)
        values = []
        for i, (completion, prompt, answer) in enumerate(zip(completions, prompts, answers, strict=True)):
            try:
                raw = fn(completion, prompt=prompt, answer=answer, **spec.params)
            except Exception as exc:
                raise RewardError(spec.name, i, f"{type(exc).__name__}: {exc}") from exc
            value = _as_finite_float(raw)
            if value is None:
                raise RewardError(spec.name, i, f"returned {raw!r}, not a finite number")
            values.append(value)
            total[i] += spec.weight * value
        out[spec.key] = values
    out[TOTAL] = total
    return out


def _as_finite_float(raw: Any) -> float | None:
    """``raw`` as a float (bools, ints, numpy and torch scalars convert), or None for anything else,
    a string included, and for NaN and infinities."""
    if isinstance(raw, str | bytes):
        return None
    try:
        value = float(raw)
    except Exception:  # a list, None, a tensor of several elements...
        return None
    return value if math.isfinite(value) else None

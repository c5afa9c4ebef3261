"""Reward functions: the built-ins on hand examples, user functions by import path, every bad spec
refused at recipe load with the reward's name, and failures of a user function surfacing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.rewards import (
    BUILTINS,
    RewardError,
    RewardSpec,
    check_reward_spec,
    exact_match,
    length_penalty,
    regex,
    resolve_reward,
    score,
)
from tests.fixtures import rewards_example

REPO = Path(__file__).resolve().parents[2]
USER = "tests.fixtures.rewards_example"
PROMPT = [{"role": "user", "content": "What is 2+2?"}]


def test_exact_match() -> None:
    assert exact_match("  4\n", prompt=PROMPT, answer="4") == 1.0
    assert exact_match("four", prompt=PROMPT, answer="4") == 0.0
    assert exact_match("The  Answer\tIS 4", prompt=PROMPT, answer="the answer is 4") == 0.0
    assert exact_match("The  Answer\tIS 4", prompt=PROMPT, answer="the answer is 4", normalize=True) == 1.0
    with pytest.raises(ValueError, match="exact_match needs an answer"):
        exact_match("4", prompt=PROMPT, answer=None)


def test_regex() -> None:
    assert regex("so <answer>4</answer>", prompt=PROMPT, answer=None, pattern=r"<answer>\d+</answer>") == 1.0
    assert regex("so <answer>4</answer>", prompt=PROMPT, answer=None, pattern=r"<answer>\d+</answer>",
                 fullmatch=True) == 0.0
    assert regex("<answer>4</answer>", prompt=PROMPT, answer=None, pattern=r"<answer>\d+</answer>",
                 fullmatch=True) == 1.0
    assert regex("no tags", prompt=PROMPT, answer=None, pattern=r"<answer>") == 0.0


def test_length_penalty() -> None:
    kw = {"prompt": PROMPT, "answer": None, "target_chars": 5, "penalty_per_char": 0.1}
    assert length_penalty("", **kw) == 0.0
    assert length_penalty("12345", **kw) == 0.0
    assert length_penalty("1234567", **kw) == pytest.approx(-0.2)
    assert length_penalty("x" * 105, **kw) == pytest.approx(-10.0)


def test_user_function_by_import_path() -> None:
    assert resolve_reward(f"{USER}:bonus") is rewards_example.bonus
    assert resolve_reward("regex") is regex
    check_reward_spec(f"{USER}:bonus", {"amount": 2.0})
    check_reward_spec(f"{USER}:contains_answer", {"anything": 1})  # **params accepts any
    out = score([RewardSpec(f"{USER}:bonus", params={"amount": 2.0})], ["a long answer", "4"], [PROMPT, PROMPT])
    assert out == {f"{USER}:bonus": [2.0, 0.0], "total": [2.0, 0.0]}


def test_score_weights_and_labels() -> None:
    specs = [RewardSpec("exact_match", weight=1.0, params={"normalize": True}),
             RewardSpec("regex", weight=0.5, params={"pattern": r"^\s*\d+\s*$"}, label="format"),
             RewardSpec("length_penalty", weight=2.0, params={"target_chars": 3, "penalty_per_char": 0.25}),
             RewardSpec(f"{USER}:contains_answer", weight=-1.0)]
    for spec in specs:
        spec.check()
    completions = ["4", "5", "the answer is 4"]
    out = score(specs, completions, [PROMPT] * 3, ["4", "4", "4"])
    assert out["exact_match"] == [1.0, 0.0, 0.0]
    assert out["format"] == [1.0, 1.0, 0.0]
    assert out["length_penalty"] == [0.0, 0.0, pytest.approx(-3.0)]
    assert out[f"{USER}:contains_answer"] == [1.0, 0.0, 1.0]
    assert out["total"] == pytest.approx([1.0 + 0.5 - 1.0, 0.5, -6.0 - 1.0])
    assert list(out) == ["exact_match", "format", "length_penalty", f"{USER}:contains_answer", "total"]


@pytest.mark.parametrize(("name", "params", "problem"), [
    ("exact", {}, "unknown built-in (allowed: exact_match, regex, length_penalty)"),
    ("nonexistent_pkg_xyz.rewards:fn", {}, "module 'nonexistent_pkg_xyz' not found"),
    (f"{USER}:missing", {}, "has no attribute 'missing'"),
    (f"{USER}:", {}, "'package.module:function'"),
    (f"{USER}:NOT_A_FUNCTION", {}, "is a int, not a function"),
    (f"{USER}:wrong_signature", {}, "cannot be called as fn(completion, prompt=, answer=)"),
    (f"{USER}:bonus", {"amonut": 2}, "unexpected keyword argument 'amonut'"),
    ("regex", {}, "missing required param(s) pattern"),
    ("regex", {"pattern": "(unclosed"}, "param 'pattern' is not a valid regular expression"),
    ("regex", {"pattern": "a", "full_match": True}, "unknown param 'full_match' (allowed: pattern, fullmatch)"),
    ("regex", {"pattern": "a", "fullmatch": "yes"}, "param 'fullmatch' must be true or false"),
    ("exact_match", {"normalize": 1}, "param 'normalize' must be true or false"),
    ("length_penalty", {"target_chars": 10}, "missing required param(s) penalty_per_char"),
    ("length_penalty", {"target_chars": "10", "penalty_per_char": 0.1}, "param 'target_chars' must be an integer"),
    ("length_penalty", {"target_chars": 10, "penalty_per_char": -1}, "param 'penalty_per_char' must be a number >= 0"),
])
def test_bad_specs_name_the_reward(name: str, params: dict, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        check_reward_spec(name, params)
    message = str(info.value)
    assert message.startswith(f"reward {name!r}: "), message
    assert problem in message, message


def test_every_builtin_has_checked_params() -> None:
    assert set(BUILTINS) == {"exact_match", "regex", "length_penalty"}
    with pytest.raises(ValueError, match="reward 'regex': weight must be a finite number"):
        RewardSpec("regex", weight=float("nan"), params={"pattern": "a"}).check()


def test_a_failing_user_function_names_itself_and_the_completion() -> None:
    spec = RewardSpec(f"{USER}:boom")
    with pytest.raises(RewardError) as info:
        score([spec], ["fine", "fine", "it went boom"], [PROMPT] * 3)
    assert str(info.value) == (f"reward '{USER}:boom' failed on completion 2: "
                               "ZeroDivisionError: the completion said boom")
    assert (info.value.reward, info.value.index) == (f"{USER}:boom", 2)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(RewardError, match=rf"reward '{USER}:returns_none' failed on completion 0: returned None"):
        score([RewardSpec(f"{USER}:returns_none")], ["x"], [PROMPT])
    with pytest.raises(RewardError, match="reward 'exact_match' failed on completion 1: ValueError: exact_match needs"):
        score([RewardSpec("exact_match")], ["4", "4"], [PROMPT, PROMPT], ["4", None])


def test_score_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="3 completions, 2 prompts and 3 answers"):
        score([RewardSpec("exact_match")], ["a", "b", "c"], [PROMPT] * 2, ["a", "b", "c"])
    with pytest.raises(ValueError, match="'regex' used twice"):
        score([RewardSpec("regex", params={"pattern": "a"}), RewardSpec("regex", params={"pattern": "b"})],
              ["a"], [PROMPT])
    with pytest.raises(ValueError, match="'total' used twice or reserved"):
        score([RewardSpec("regex", params={"pattern": "a"}, label="total")], ["a"], [PROMPT])


def test_checking_and_scoring_import_no_torch() -> None:
    code = ("import sys\n"
            "from posttrain.rewards import RewardSpec, check_reward_spec, score\n"
            "check_reward_spec('regex', {'pattern': 'a+'})\n"
            f"check_reward_spec('{USER}:bonus', {{'amount': 2.0}})\n"
            "score([RewardSpec('exact_match')], ['4'], [[{'role': 'user', 'content': 'q'}]], ['4'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'numpy', 'transformers'}))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                            timeout=60)
    assert result.stdout.strip() == "[]", result.stdout

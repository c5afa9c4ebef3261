"""`model.components` refusals at recipe validation (each names the field and says why) and the
head's contract in the model; the head trained through the real train job is in
tests/integration/test_training_job.py (test_lora_under_fsdp_trains_only_the_adapters_and_the_custom_head)."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.recipe import RecipeError, load_recipe
from tests.conftest import write_recipe

USER = "tests.fixtures.heads_example"


def errors_of(path: Path, import_user_code: bool = True) -> list[tuple[str, str]]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, import_user_code=import_user_code)
    return info.value.errors


def model(tiny_model: Path, **components: str) -> dict:
    return {"base": str(tiny_model), "components": components}


@pytest.mark.parametrize(("components", "field", "message"), [
    ({"tokenizer": f"{USER}:ResidualProjection"}, "model.components.tokenizer", "unknown component; allowed: head"),
    ({"head": "not a path"}, "model.components.head", "not an import path of the form 'package.module:Name'"),
    ({"head": "tests.fixtures.no_such_module:Head"}, "model.components.head",
     "cannot import 'tests.fixtures.no_such_module'"),
    ({"head": f"{USER}:Missing"}, "model.components.head", f"{USER!r} has no attribute 'Missing'"),
    ({"head": f"{USER}:not_a_class"}, "model.components.head", "not a torch.nn.Module class"),
    ({"head": f"{USER}:NotAModule"}, "model.components.head", "not a torch.nn.Module class"),
    ({"head": f"{USER}:NoConfig"}, "model.components.head", "a head is built as Name(config)"),
])
def test_bad_components_are_refused_naming_the_field(tmp_path: Path, tiny_model: Path, components: dict,
                                                      field: str, message: str) -> None:
    errors = errors_of(write_recipe(tmp_path, model=model(tiny_model, **components)))
    assert any(loc == field and message in msg for loc, msg in errors), errors


def test_without_user_code_imports_only_the_form_is_checked(tmp_path: Path, tiny_model: Path) -> None:
    """The DAG processor parses recipes without importing user modules (they may import torch)."""
    path = write_recipe(tmp_path, model=model(tiny_model, head="tests.fixtures.no_such_module:Head"))
    recipe = load_recipe(path, import_user_code=False)
    assert recipe.model.components.named() == {"head": "tests.fixtures.no_such_module:Head"}
    assert errors_of(path)  # imported: refused
    bad = write_recipe(tmp_path / "bad", model=model(tiny_model, head="not a path"))
    assert [loc for loc, _ in errors_of(bad, import_user_code=False)] == ["model.components.head"]


def test_what_a_head_cannot_do_yet_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    head = model(tiny_model, head=f"{USER}:ResidualProjection")
    recipe = load_recipe(write_recipe(tmp_path / "ok", model=head))
    assert recipe.evaluation.metrics == ["eval_loss"] and recipe.promotion.metric == "eval_loss"
    generation = errors_of(write_recipe(tmp_path / "gen", model=head,
                                        evaluation={"metrics": ["eval_loss", "exact_match"]}))
    assert any("['exact_match']" in msg and "vLLM, which cannot run the custom model.components.head" in msg
               for _, msg in generation), generation
    dpo = errors_of(write_recipe(tmp_path / "dpo", model=head, paradigm="dpo",
                                 data={"format": "preference"}))
    assert any("model.components.head is implemented for paradigm 'sft' only" in msg for _, msg in dpo), dpo
    assert load_recipe(write_recipe(tmp_path / "none", model=model(tiny_model))).model.components.named() == {}


def test_head_transforms_the_hidden_states_the_loss_scores(tmp_path: Path, tiny_model: Path) -> None:
    """The head's output is what the chunked loss projects (same as the naive loss over
    lm_head(head(hidden))), its parameters get gradients, its start is the same for the same seed,
    and a head that changes the shape is refused at its first forward, naming it."""
    import torch

    from posttrain.training_lib.models.components import training_model

    recipe = load_recipe(write_recipe(tmp_path, model=model(tiny_model, head=f"{USER}:ResidualProjection")))
    ours = training_model(recipe)
    again = training_model(recipe)
    assert all(a.equal(b) for a, b in zip(ours.head.state_dict().values(), again.head.state_dict().values(),
                                          strict=True))
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).repeat(2, 1)
    loss = ours(ids, positions, labels=ids)
    lm = ours.lm
    hidden = lm.model(input_ids=ids, position_ids=positions).last_hidden_state
    naive = torch.nn.functional.cross_entropy(lm.lm_head(ours.head(hidden)).reshape(-1, lm.config.vocab_size),
                                              ids.reshape(-1), reduction="sum")
    plain = torch.nn.functional.cross_entropy(lm.lm_head(hidden).reshape(-1, lm.config.vocab_size),
                                              ids.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-4)
    assert abs(float(plain.detach()) - float(naive.detach())) > 1e-2
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.head.parameters())

    wrong = load_recipe(write_recipe(tmp_path / "wrong", model=model(tiny_model, head=f"{USER}:WrongShape")))
    with pytest.raises(ValueError, match=r"model.components.head WrongShape returned \(2, 24, 3\)"):
        training_model(wrong)(ids, positions, labels=ids)

"""Recipe loading: schema, readable errors, base inheritance, --set overrides, single source of truth."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from codetr.assembly import load_recipe, load_recipe_dict
from codetr.core.config import RecipeError, recipe_to_yaml
from codetr.core.config.loader import apply_overrides, parse_override

from .conftest import TOY_RECIPE


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def recipe(**changes):
    data = copy.deepcopy(TOY_RECIPE)
    for dotted, value in changes.items():
        data = apply_overrides(data, [f"{dotted.replace('__', '.')}={value}"])
    return data


def test_valid_recipe_injects_shared_dims():
    r = load_recipe_dict(recipe())
    assert r.model.variant.hidden_dim == 64
    assert r.model.variant.num_queries == 10
    assert r.model.neck.hidden_dim == 64
    assert r.model.aux_heads[1].num_classes == 3
    assert r.model.aux_heads[1].assigner.topk == 3
    assert type(r.model.aux_heads[0].assigner).__name__ == "ToyAssigner"


def test_error_names_file_path_value(tmp_path):
    data = recipe()
    data["model"]["aux_heads"][1]["assigner"]["topk"] = 0
    path = write(tmp_path / "x.yaml", data)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert f"{path}: model.aux_heads[1].assigner.topk: must be >= 1, got 0" in str(exc.value)


def test_typo_suggests_closest_key(tmp_path):
    data = recipe()
    data["model"]["aux_heads"][0]["assigner"]["topkk"] = 4
    data["optim"] = {"lrr": 0.1}
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path / "t.yaml", data))
    text = str(exc.value)
    assert "model.aux_heads[0].assigner.topkk: unknown key 'topkk'; did you mean 'topk'?" in text
    assert "optim.lrr: unknown key 'lrr'; did you mean 'lr'?" in text
    assert len(exc.value.issues) == 2  # every problem listed at once


def test_unknown_component_type_lists_available():
    data = recipe()
    data["model"]["variant"] = {"type": "toy_variantt"}
    with pytest.raises(RecipeError) as exc:
        load_recipe_dict(data)
    msg = str(exc.value)
    assert "model.variant" in msg and "unknown variant type 'toy_variantt'" in msg
    assert "toy_variant" in msg and "Did you mean 'toy_variant'" in msg


def test_conflicting_shared_value_rejected():
    data = recipe()
    data["model"]["variant"]["hidden_dim"] = 128
    with pytest.raises(RecipeError) as exc:
        load_recipe_dict(data)
    assert "model.variant.hidden_dim: 128 conflicts with model.hidden_dim = 64" in str(exc.value)
    # the same value twice is consistent, so accepted
    data["model"]["variant"]["hidden_dim"] = 64
    assert load_recipe_dict(data).model.variant.hidden_dim == 64


def test_num_classes_required_without_data():
    data = recipe()
    del data["model"]["num_classes"]
    with pytest.raises(RecipeError, match="model.num_classes: cannot be derived"):
        load_recipe_dict(data)


def test_base_inheritance_one_level(tmp_path):
    write(tmp_path / "base.yaml", recipe())
    write(tmp_path / "child.yaml", {"base": "base.yaml", "name": "child", "optim": {"lr": 1e-3},
                                    "model": {"variant": {"dropout": 0.5}}})
    r = load_recipe(tmp_path / "child.yaml")
    assert r.name == "child" and r.optim.lr == 1e-3
    assert r.model.variant.dropout == 0.5 and r.model.num_queries == 10  # merged, not replaced
    write(tmp_path / "grandchild.yaml", {"base": "child.yaml"})
    with pytest.raises(RecipeError, match="one level deep"):
        load_recipe(tmp_path / "grandchild.yaml")
    write(tmp_path / "orphan.yaml", {"base": "missing.yaml"})
    with pytest.raises(RecipeError, match="base recipe 'missing.yaml' not found"):
        load_recipe(tmp_path / "orphan.yaml")


def test_base_type_change_replaces_section(tmp_path):
    base = recipe()
    base["model"]["variant"]["dropout"] = 0.3
    write(tmp_path / "base.yaml", base)
    write(tmp_path / "child.yaml", {"base": "base.yaml", "model": {"backbone": {"type": "toy_backbone", "depth": 34}}})
    assert load_recipe(tmp_path / "child.yaml").model.backbone.depth == 34


def test_set_overrides_are_typed(tmp_path):
    path = write(tmp_path / "r.yaml", recipe())
    r = load_recipe(path, ["optim.lr=1e-3", "model.aux_heads.1.assigner.topk=5", "schedule.milestones=[2]",
                           "model.aux_heads[0].loss_weight=2"])
    assert r.optim.lr == pytest.approx(1e-3) and isinstance(r.optim.lr, float)
    assert r.model.aux_heads[1].assigner.topk == 5
    assert r.schedule.milestones == [2]
    assert r.model.aux_heads[0].loss_weight == 2.0
    with pytest.raises(RecipeError, match=r"model.aux_heads\[1\].assigner.topk: must be >= 1, got 0"):
        load_recipe(path, ["model.aux_heads.1.assigner.topk=0"])
    with pytest.raises(RecipeError, match="index 5 out of range"):
        load_recipe(path, ["model.aux_heads.5.loss_weight=1"])
    with pytest.raises(RecipeError, match="must look like key.path=value"):
        load_recipe(path, ["optim.lr"])


def test_parse_override():
    assert parse_override("a.b[2].c=[1, 2]") == (["a", "b", 2, "c"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=hello") == (["a"], "hello")


def test_schedule_checks():
    with pytest.raises(RecipeError, match="set exactly one of 'epochs' or 'iterations'"):
        load_recipe_dict(recipe(schedule__iterations=10))
    with pytest.raises(RecipeError, match=r"milestones \[5\] outside 1..2 epochs"):
        load_recipe_dict(recipe(schedule__milestones="[5]"))


def test_yaml_errors_are_readable(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: invalid YAML at line \d+, column \d+"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(lst)


def test_resolved_yaml_round_trips():
    r = load_recipe_dict(recipe())
    text = recipe_to_yaml(r)
    again = load_recipe_dict(yaml.safe_load(text))
    assert again == r
    assert "topk: 3" in text  # component fields serialised with their own class


def test_recipe_is_frozen():
    r = load_recipe_dict(recipe())
    with pytest.raises(Exception):
        r.optim.lr = 1.0  # type: ignore[misc]

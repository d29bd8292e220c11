"""One ``key=value`` dialect and one typed loader for every configuration file: the experiment config
(`cscctrl train`), the sweep file (`cscctrl tune`) and any other dataclass tree (the workflow file)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import yaml

from pipeline.config import (ConfigError, ExperimentConfig, apply_overrides, from_dict, load_config,
                             parse_override, set_dotted)
from tuning.spec import SweepSpec, load_sweep

# Items of every kind of value, with the typed result `cscctrl train` must give.
ITEMS = {
    "optim.encoder.lr=1e-4": ("optim.encoder.lr", 1e-4),
    "optim.decoder.lr=2E-3": ("optim.decoder.lr", 2e-3),
    "optim.encoder.betas=[0.0, 0.9]": ("optim.encoder.betas", (0.0, 0.9)),
    "optim.decoder.betas=(0.5, 0.99)": ("optim.decoder.betas", (0.5, 0.99)),
    "model.lam=1": ("model.lam", 1.0),
    "train.steps=1_000": ("train.steps", 1000),
    "model.nonneg=false": ("model.nonneg", False),
    "objective.mode=multiclass": ("objective.mode", "multiclass"),
    "run.name=2026-01-01": ("run.name", "2026-01-01"),
    "data.shards=s3://bucket/shards": ("data.shards", "s3://bucket/shards"),
    "tracking.experiment=my run #3": ("tracking.experiment", "my run #3"),
}


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_train_items_read_as_yaml_values():
    cfg = load_config(None, list(ITEMS))
    for item, (key, expected) in ITEMS.items():
        assert get(cfg, key) == expected, item
        assert type(get(cfg, key)) is type(expected), item


def test_the_sweep_file_and_its_items_give_the_train_dialect_the_same_values(tmp_path):
    """`cscctrl tune KEY=V`, a sweep file's base, and `cscctrl train KEY=V` give one config."""
    train = load_config(None, list(ITEMS))
    from_items = load_sweep(None, list(ITEMS)).base
    f = tmp_path / "sweep.yaml"
    in_yaml = [i for i in ITEMS if "#" not in i and "(" not in i]   # a comment and a Python tuple in a file
    f.write_text("base:\n" + "".join(f"  {i.split('=', 1)[0]}: {i.split('=', 1)[1]}\n" for i in in_yaml))
    from_file = load_sweep(str(f)).base
    assert load_config(None, from_items) == train
    assert load_config(None, from_file) == load_config(None, in_yaml)


def test_sweep_fields_take_the_same_values_as_config_keys():
    spec = load_sweep(None, ["scheduler=none", "seed=1_000", "asha.reduction_factor=3e0", "name=2026-01-01",
                             "space=[sparsity, unroll]", "resources.use_gpu=false"])
    assert spec.scheduler == "none"            # a word, not Python's None
    assert spec.seed == 1000 and spec.asha.reduction_factor == 3.0
    assert spec.name == "2026-01-01" and spec.space == ["sparsity", "unroll"] and spec.resources.use_gpu is False


@pytest.mark.parametrize("train_item, sweep_item", [
    ("train.steps=two", "num_samples=two"),
    ("train.steps=1.5", "num_samples=1.5"),
    ("model.nonneg=3", "resources.use_gpu=3"),
    ("model.lam=abc", "asha.reduction_factor=abc"),
])
def test_the_same_wrong_value_is_the_same_error(train_item, sweep_item):
    with pytest.raises(ConfigError) as train:
        load_config(None, [train_item])
    with pytest.raises(ConfigError) as sweep:
        load_sweep(None, [sweep_item])
    tkey, skey = train_item.split("=")[0], sweep_item.split("=")[0]
    assert str(sweep.value).replace(f"'{skey}'", "KEY").split(";")[0] == \
        str(train.value).replace(f"'{tkey}'", "KEY").split(";")[0]


def test_numbers_in_strings_are_numbers_for_float_fields():
    """YAML 1.1 (yaml.safe_load) hands over '1e-4' as a string: a float field takes it."""
    tree = yaml.safe_load("optim:\n  encoder:\n    lr: 1e-4\n")
    assert tree["optim"]["encoder"]["lr"] == "1e-4"
    assert from_dict(ExperimentConfig, tree).optim.encoder.lr == 1e-4
    assert load_config(None, {"optim.encoder.lr": "1e-4"}).optim.encoder.lr == 1e-4
    with pytest.raises(ConfigError, match="'optim.encoder.lr' must be a number; got 'fast'"):
        from_dict(ExperimentConfig, {"optim": {"encoder": {"lr": "fast"}}})
    with pytest.raises(ConfigError, match="finite"):
        from_dict(ExperimentConfig, {"optim": {"encoder": {"lr": "inf"}}})
    with pytest.raises(ConfigError, match="must be an integer"):
        from_dict(ExperimentConfig, {"train": {"steps": "1e3"}})


def test_parse_override_values():
    assert parse_override("space=[sparsity, unroll]") == ("space", ["sparsity", "unroll"])
    assert parse_override("base={train.steps: 5}") == ("base", {"train.steps": 5})
    assert parse_override("a.b=") == ("a.b", "")
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=none") == ("a.b", "none")
    assert parse_override("a.b=x: y: z") == ("a.b", "x: y: z")
    assert parse_override("data.shards=/data/set: 2") == ("data.shards", "/data/set: 2")
    assert parse_override("a.b=- x") == ("a.b", "- x")
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("novalue")


# An arbitrary dataclass tree with the shapes of the workflow file: a required key, an optional section,
# a tuple of sections, free-form mappings, nested sections.
@dataclass
class Leaf:
    split: str
    label: str = ""


@dataclass
class Inner:
    lr: float = 1.0
    kind: Literal["a", "b"] = "a"
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class Root:
    name: str
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    leaves: tuple[Leaf, ...] = ()
    sizes: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    resize: int | None = None


def test_any_dataclass_tree():
    tree = {"name": "w", "inner": {"lr": "1e-4", "set": {"train.steps": 3}}, "maybe": {},
            "leaves": [{"split": "val"}, {"split": "unseen", "label": "u"}], "sizes": [1, 2],
            "options": {"train": 10}, "resize": None}
    r = from_dict(Root, tree)
    assert r == Root(name="w", inner=Inner(lr=1e-4, set={"train.steps": 3}), maybe=Inner(),
                     leaves=(Leaf("val"), Leaf("unseen", "u")), sizes=[1, 2], options={"train": 10})
    assert from_dict(Root, {"name": "w", "maybe": None, "inner": None}) == Root(name="w")
    assert from_dict(Root, {"name": "w", "resize": "None"}).resize is None


@pytest.mark.parametrize("tree, fragment", [
    ({}, "'name' must be given"),
    ({"name": "w", "leaves": [{"label": "x"}]}, "'leaves[0].split' must be given"),
    ({"name": "w", "inner": {"lrr": 1}}, "unknown config key 'inner.lrr'. Did you mean 'lr'?"),
    ({"name": "w", "maybe": {"kind": "c"}}, "'maybe.kind' must be one of 'a', 'b'; got 'c'"),
    ({"name": "w", "leaves": {"split": "val"}}, "'leaves' must be a list"),
    ({"name": "w", "sizes": [1, "x"]}, "'sizes[1]' must be an integer"),
    ({"name": "w", "options": [1]}, "'options' must be a mapping"),
    ({"name": "w", "inner": 3}, "'inner' is a section"),
    ({"name": "w", "resize": 1.5}, "'resize' must be an integer"),
    ({"nmae": "w"}, "Did you mean 'name'?"),
])
def test_any_dataclass_tree_errors_name_the_key(tree, fragment):
    with pytest.raises(ConfigError) as e:
        from_dict(Root, tree)
    assert fragment in str(e.value)


def test_dotted_keys_on_any_root():
    tree: dict[str, Any] = {"maybe": None}
    for item in ["inner.lr=1e-4", "maybe.kind=b", "inner.set.train.steps=5", "options.train=10", "name=w"]:
        set_dotted(tree, *parse_override(item), root=Root)
    assert from_dict(Root, tree) == Root(name="w", inner=Inner(lr=1e-4, set={"train.steps": 5}),
                                         maybe=Inner(kind="b"), options={"train": 10})
    set_dotted(tree, "maybe", None, root=Root)       # an optional section may be switched off
    assert from_dict(Root, tree).maybe is None
    with pytest.raises(ConfigError, match="'inner' is a section, not a value"):
        set_dotted(tree, "inner", 3, root=Root)
    with pytest.raises(ConfigError, match="'name' is a value, not a section"):
        set_dotted(tree, "name.x", 3, root=Root)
    with pytest.raises(ConfigError, match="unknown config key 'inner.lrr'. Did you mean 'lr'"):
        set_dotted(tree, "inner.lrr", 3, root=Root)
    assert apply_overrides({}, ["asha.grace_period=3", "base.train.steps=4"], root=SweepSpec) == {
        "asha": {"grace_period": 3}, "base": {"train.steps": 4}}

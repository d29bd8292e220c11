"""Config precedence, type checking, error messages and the dict round trip (the Ray boundary)."""
from __future__ import annotations

import pytest
import yaml

from pipeline.config import (ConfigError, ExperimentConfig, apply_overrides, diff_from_defaults, flatten,
                             load_config, parse_override)


def test_defaults_match_reference_settings():
    cfg = ExperimentConfig()
    assert cfg.objective.eps_sq == 0.5
    assert cfg.model.n_steps == 2 and cfg.model.lam == 0.1 and cfg.model.nonneg
    assert cfg.optim.encoder.lr == 1.5e-4 and cfg.optim.schedule == "linear"


def test_precedence_defaults_yaml_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump({"train": {"steps": 10, "batch_size_per_worker": 8},
                                 "optim": {"encoder": {"lr": 1e-3}}}))
    cfg = load_config(f, ["train.steps=20", "optim.encoder.betas=[0.0, 0.9]"])
    assert cfg.train.steps == 20                      # override beats YAML
    assert cfg.train.batch_size_per_worker == 8       # YAML beats default
    assert cfg.optim.encoder.lr == 1e-3
    assert cfg.optim.encoder.betas == (0.0, 0.9)      # list -> typed tuple
    assert cfg.optim.decoder.lr == 1.5e-4             # untouched default


def test_unknown_key_names_it_and_lists_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.encoder.lrr=1e-3"])
    msg = str(e.value)
    assert "optim.encoder.lrr" in msg and "Did you mean 'lr'" in msg and "betas" in msg
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(None, ["modle.lam=0.1"])


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match="train.stpes"):
        load_config(f)


@pytest.mark.parametrize("override, fragment", [
    ("train.steps=1.5", "must be an integer"),
    ("train.steps=true", "must be an integer"),
    ("model.nonneg=3", "must be true or false"),
    ("objective.mode=ternary", "one of 'binary', 'multiclass'"),
    ("optim.encoder.betas=[0.5]", "must have 2 values"),
    ("model.lam=abc", "must be a number"),
    ("train=3", "is a section"),
])
def test_wrong_types_are_errors_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)
    assert override.split("=")[0] in str(e.value) or "section" in str(e.value)


def test_value_checks_show_the_problem():
    with pytest.raises(ConfigError, match="eps_sq"):
        load_config(None, ["objective.eps_sq=0"])
    with pytest.raises(ConfigError, match="lam_per_stage has 2 values .* 4 CSC stages"):
        load_config(None, ["model.lam_per_stage=[0.1, 0.2]"])


def test_int_accepted_for_float_and_strings_for_bare_words():
    cfg = load_config(None, ["model.lam=1", "run.name=my-run", "run.storage_path=/tmp/x"])
    assert isinstance(cfg.model.lam, float) and cfg.model.lam == 1.0
    assert cfg.run.name == "my-run"
    assert parse_override("data.shards=s3://b/x") == ("data.shards", "s3://b/x")


def test_dict_round_trip_is_exact():
    cfg = load_config(None, ["model.lam_per_stage=[0.1, 0.2, 0.3, 0.4]", "optim.decoder.betas=[0.0, 0.9]",
                             "objective.mode=multiclass"])
    d = cfg.to_dict()
    assert ExperimentConfig.from_dict(d) == cfg
    assert isinstance(d["optim"]["decoder"]["betas"], list)   # plain builtins only
    yaml.safe_dump(d)                                         # serialisable


def test_tune_style_mapping_overrides_are_checked():
    tree = apply_overrides({}, {"model.lam": 0.05, "model.n_steps": 3})
    assert ExperimentConfig.from_dict(tree).model.n_steps == 3
    with pytest.raises(ConfigError):
        apply_overrides({}, {"model.lambda": 0.05})


def test_diff_from_defaults_and_flatten():
    cfg = load_config(None, ["train.steps=7"])
    assert diff_from_defaults(cfg) == {"train": {"steps": 7}}
    flat = flatten(cfg.to_dict())
    assert flat["train.steps"] == 7 and "optim.encoder.lr" in flat


def test_missing_config_file_lists_bundled_ones():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-config.yaml")


def test_apply_overrides_leaves_the_input_untouched():
    tree = {"model": {"lam": 0.1}}
    out = apply_overrides(tree, {"model.lam": 0.5})
    assert tree == {"model": {"lam": 0.1}} and out["model"]["lam"] == 0.5


def test_yaml_exponent_floats_are_numbers(tmp_path):
    f = tmp_path / "lr.yaml"
    f.write_text("optim:\n  encoder:\n    lr: 1e-4\n")   # YAML 1.1 would read a string
    assert load_config(f).optim.encoder.lr == 1e-4

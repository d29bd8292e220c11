"""Search spaces: every key of every space is a real config path; bad definitions fail naming the key;
Tune / Optuna receive what they can hold and the driver gets back exactly the sampled values."""
from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
import yaml

from pipeline.config import ExperimentConfig, apply_overrides, load_config
from tuning.spaces import (PRESETS, SpaceError, apply_point, grid_size, overrides_from_trial, parse_space,
                           resolve_space, to_param_space)


def leaf_paths(cls: type = ExperimentConfig, prefix: str = "") -> set[str]:
    """Every settable dotted path, walked independently of the code under test."""
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out |= leaf_paths(hints[f.name], path)
        else:
            out.add(path)
    return out


def preset_dims(name: str):
    return parse_space(PRESETS[name](), load_config(None, {"model.preset": "csc_ctrl_debug"}))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_key_of_every_preset_is_a_real_config_path(name):
    paths = leaf_paths()
    space = PRESETS[name]()
    assert space, name
    for key in space:
        assert key in paths, f"preset {name}: {key} is not a config path"
        # and the CLI's own override function accepts it
        apply_overrides(ExperimentConfig().to_dict(), {key: None})


def test_every_key_of_every_bundled_sweep_file_is_a_real_config_path():
    from tuning.spec import SWEEP_DIR, load_sweep

    files = sorted(SWEEP_DIR.glob("*.yaml"))
    assert files
    paths = leaf_paths()
    for f in files:
        spec = load_sweep(f)
        for key in [*resolve_space(spec.space), *spec.base]:
            assert key in paths, f"{f.name}: {key}"


def test_presets_cover_what_reference_section_6_sweeps():
    keys = {k for f in PRESETS.values() for k in f()}
    for key in ("model.lam", "model.lam_per_stage", "model.n_steps", "model.solver", "model.nonneg",
                "model.decoder_dictionaries", "model.ndf", "model.nz", "objective.eps_sq", "optim.encoder.lr",
                "optim.decoder.lr", "optim.encoder.betas", "optim.decoder.betas",
                "train.encoder_steps_per_decoder_step", "train.batch_size_per_worker",
                "objective.consistency_weight", "objective.rate_weight", "objective.dictionary_weight"):
        assert key in keys, key
    assert PRESETS["sparsity"]()["model.lam"]["grid"] == [0.0, 0.01, 0.05, 0.1, 0.2, 0.5]
    assert PRESETS["unroll"]()["model.n_steps"]["grid"] == [1, 2, 3, 5]


@pytest.mark.parametrize("raw, fragment", [
    ({"model.lamb": {"grid": [0.1]}}, "unknown config key 'model.lamb'. Did you mean 'lam'?"),
    ({"modle.lam": {"grid": [0.1]}}, "unknown config key 'modle'"),
    ({"lam": {"grid": [0.1]}}, "not a dotted config path"),
    ({"model": {"grid": [0.1]}}, "not a dotted config path"),
    ({"optim.encoder": {"grid": [0.1]}}, "is a section, not a value"),
    ({"model.lam": {"grid": []}}, "model.lam': grid has an empty list"),
    ({"model.lam": {"choice": []}}, "choice has an empty list"),
    ({"model.lam": {"uniform": [0.5, 0.5]}}, "uniform [0.5, 0.5] is empty"),
    ({"model.lam": {"uniform": [0.5, 0.1]}}, "is empty; need low < high"),
    ({"optim.encoder.lr": {"loguniform": [0.0, 1e-3]}}, "loguniform needs 0 < low"),
    ({"model.n_steps": {"randint": [3, 3]}}, "randint [3, 3) is empty"),
    ({"model.n_steps": {"randint": [1, 4.5]}}, "randint takes integer bounds"),
    ({"model.lam": {"uniform": [0.1]}}, "takes [low, high] as two numbers"),
    ({"model.lam": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
    ({"model.lam": {"grid": [0.1], "choice": [0.2]}}, "exactly one of"),
    ({"model.lam": [0.1, 0.2]}, "exactly one of"),
    ({"model.lam": {"grid": [0.1, 0.1]}}, "lists a value twice"),
    ({"model.solver": {"grid": ["fista", "adam"]}}, "'adam' is rejected by the config"),
    ({"model.lam": {"grid": [0.1, -0.2]}}, "-0.2 is rejected by the config"),
    ({"model.lam": {"uniform": [-1.0, 0.5]}}, "-1.0 is rejected"),
    ({"model.n_steps": {"randint": [0, 4]}}, "model.n_steps"),
    ({"optim.encoder.betas": {"choice": [[0.5, 1.0]]}}, "rejected by the config"),
    ({"optim.encoder.betas": {"choice": [[0.5]]}}, "must have 2 values"),
    ({"model.nonneg": {"grid": [1, 0]}}, "must be true or false"),
    ({"run.seed": {"grid": [1, 2]}}, "run.* section is set by the sweep"),
    ({"scaling.num_workers": {"grid": [1, 2]}}, "resources:"),
    ({"tracking.experiment": {"grid": ["a"]}}, "tracking.* section"),
    ({"model.preset": {"grid": ["csc_ctrl_32"]}}, "a preset is resolved once"),
    ({"model.lam_per_stage": {"each": [{"grid": [0.1]}, {"grid": [0.2]}]}}, "lists 2 specs but the key has 4"),
    ({"model.lam": {"each": {"grid": [0.1]}}}, "'each' needs a tuple-valued key"),
    ({"model.lam_per_stage": {"each": {"uniform": [-0.5, 0.5]}}}, "rejected by the config"),
    ({}, "the search space is empty"),
])
def test_bad_space_definitions_fail_naming_the_key(raw, fragment):
    base = load_config(None, {"model.preset": "csc_ctrl_debug"})
    with pytest.raises(SpaceError) as e:
        parse_space(raw, base)
    assert fragment in str(e.value)


def test_a_lam_sweep_a_per_stage_lam_would_override_is_refused():
    per_stage = load_config(None, {"model.preset": "csc_ctrl_debug", "model.lam_per_stage": [0.1, 0.005, 0.1, 0.1]})
    with pytest.raises(SpaceError, match=r"'model.lam' would change nothing: the base config sets "
                                         r"model.lam_per_stage=\[0.1, 0.005, 0.1, 0.1\] \(from model.preset=csc_ctrl_debug\)"):
        parse_space(PRESETS["sparsity"](), per_stage)
    parse_space({**PRESETS["sparsity"](), **PRESETS["sparsity_per_stage"]()}, per_stage)   # both swept: fine
    parse_space(PRESETS["sparsity"](), load_config(None, {"model.preset": "csc_ctrl_debug"}))


def test_bad_space_from_yaml_text():
    raw = yaml.safe_load("model.lam: {loguniform: [0, 0.5]}\n")
    with pytest.raises(SpaceError, match="model.lam"):
        parse_space(raw)


def test_unknown_and_overlapping_presets():
    with pytest.raises(SpaceError, match="unknown search space preset 'sparsityy'.*sparsity_unroll"):
        resolve_space("sparsityy")
    with pytest.raises(SpaceError, match="both set 'model.lam'"):
        resolve_space(["sparsity", "sparsity_unroll"])
    union = resolve_space(["sparsity", "unroll"])
    assert set(union) == {"model.lam", "model.n_steps", "model.solver"}


def test_grid_search_needs_discrete_keys():
    dims = parse_space({"model.lam": {"grid": [0.0, 0.1]}, "optim.encoder.lr": {"loguniform": [1e-5, 1e-3]}})
    with pytest.raises(SpaceError, match="optim.encoder.lr is a range"):
        to_param_space(dims, "grid")


def test_param_space_per_search_algorithm():
    from ray.tune.search.sample import Categorical, Float, Integer

    dims = parse_space({"model.lam": {"grid": [0.0, 0.1, 0.2]}, "model.n_steps": {"choice": [1, 2]},
                        "optim.encoder.lr": {"loguniform": [1e-5, 1e-3]}, "model.ndf": {"randint": [4, 9]}})
    random_space = to_param_space(dims, "random")
    assert random_space["model.lam"] == {"grid_search": [0.0, 0.1, 0.2]}   # crossed
    assert isinstance(random_space["model.n_steps"], Categorical)        # drawn
    assert isinstance(random_space["optim.encoder.lr"], Float)
    assert isinstance(random_space["model.ndf"], Integer)
    optuna_space = to_param_space(dims, "optuna")
    assert isinstance(optuna_space["model.lam"], Categorical)             # Optuna has no grid
    assert optuna_space["model.lam"].categories == [0.0, 0.1, 0.2]
    assert grid_size(dims, "random") == 3 and grid_size(dims, "optuna") == 1
    grid_dims = [d for d in dims if d.discrete]
    assert to_param_space(grid_dims, "grid")["model.n_steps"] == {"grid_search": [1, 2]}
    assert grid_size(grid_dims, "grid") == 6


def test_sampled_points_round_trip_through_the_override_function():
    """Draw from Tune's own distributions; decode; apply with the CLI's function; the config holds them."""
    base = load_config(None, {"model.preset": "csc_ctrl_debug"})
    raw = {**PRESETS["optimization"](), **PRESETS["sparsity_per_stage"](), "model.n_steps": {"randint": [1, 6]}}
    dims = parse_space(raw, base)
    space = to_param_space(dims, "optuna")
    rng = np.random.default_rng(0)
    for _ in range(50):
        sampled = {k: v.sample(random_state=rng) for k, v in space.items()}
        point = overrides_from_trial(sampled, dims)
        cfg = ExperimentConfig.from_dict(apply_point(base.to_dict(), point))
        assert 0.1 <= cfg.objective.eps_sq <= 1.0
        assert 1e-5 <= cfg.optim.encoder.lr <= 1e-3 and 1e-5 <= cfg.optim.decoder.lr <= 1e-3
        assert cfg.optim.encoder.betas in {(0.5, 0.999), (0.0, 0.9)}
        assert len(cfg.model.lam_per_stage) == base.model.num_stages == 4
        assert all(v in (0.0, 0.01, 0.05, 0.1, 0.2, 0.5) for v in cfg.model.lam_per_stage)
        assert 1 <= cfg.model.n_steps <= 5 and isinstance(cfg.model.n_steps, int)
        assert cfg.train.encoder_steps_per_decoder_step in (1, 2)
    # the base tree itself was never modified by applying points
    assert base.to_dict() == load_config(None, {"model.preset": "csc_ctrl_debug"}).to_dict()


def test_loguniform_is_uniform_in_log_space():
    dims = parse_space({"optim.encoder.lr": {"loguniform": [1e-5, 1e-3]}})
    dist = to_param_space(dims, "random")["optim.encoder.lr"]
    rng = np.random.default_rng(1)
    logs = np.log10([dist.sample(random_state=rng) for _ in range(4000)])
    assert logs.min() >= -5 and logs.max() <= -3
    assert abs(np.mean(logs < -4) - 0.5) < 0.04     # half the mass below the geometric mid-point


def test_non_scalar_choices_travel_as_text_and_come_back_as_tuples():
    dims = parse_space({"optim.decoder.betas": {"choice": [[0.5, 0.999], [0.0, 0.9]]}})
    space = to_param_space(dims, "optuna")
    assert space["optim.decoder.betas"].categories == ["[0.5, 0.999]", "[0.0, 0.9]"]
    assert overrides_from_trial({"optim.decoder.betas": "[0.0, 0.9]"}, dims) == {"optim.decoder.betas": (0.0, 0.9)}
    strings = parse_space({"model.solver": {"grid": ["fista", "ista"]}})
    assert overrides_from_trial({"model.solver": "ista"}, strings) == {"model.solver": "ista"}


def test_optuna_accepts_every_preset_space():
    """Optuna's categorical distributions hold only scalars: the real searcher must take each space."""
    from ray.tune.search.optuna import OptunaSearch

    base = load_config(None, {"model.preset": "csc_ctrl_debug"})
    for name in PRESETS:
        dims = parse_space(PRESETS[name](), base)
        searcher = OptunaSearch(metric="eval/psnr", mode="max", seed=0)
        assert searcher.set_search_properties("eval/psnr", "max", to_param_space(dims, "optuna"))
        sampled = searcher.suggest("trial_0")
        point = overrides_from_trial(sampled, dims)
        ExperimentConfig.from_dict(apply_point(base.to_dict(), point))


def test_each_with_one_spec_per_element():
    dims = parse_space({"optim.encoder.betas": {"each": [{"uniform": [0.0, 0.9]}, {"choice": [0.9, 0.999]}]}})
    assert [d.key for d in dims] == ["optim.encoder.betas:0", "optim.encoder.betas:1"]
    point = overrides_from_trial({"optim.encoder.betas:0": 0.3, "optim.encoder.betas:1": 0.999}, dims)
    assert point == {"optim.encoder.betas": (0.3, 0.999)}

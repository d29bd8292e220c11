"""Knowledge with one home: the architecture check, content-based names, metric names."""
from __future__ import annotations

import pytest

from models.config import ARCHITECTURE_KEYS, ModelConfig
from pipeline.checkpoint import architecture_differences, check_architecture
from pipeline.config import load_config
from pipeline.content_hash import config_identity, content_hash
from pipeline.launch import default_run_name
from pipeline.metric_names import HISTORY_METRICS, evaluation_metrics, training_metrics
from tuning.spec import load_sweep, sweep_name

DEBUG = {"model.preset": "csc_ctrl_debug"}


def test_architecture_differences_of_a_checkpoint_config_and_of_mlflow_params():
    ours = load_config(None, DEBUG).model
    stored = {k: getattr(ours, k) for k in ARCHITECTURE_KEYS}
    assert architecture_differences(stored, ours) == []
    assert architecture_differences({**stored, "layer": "conv", "nz": 7}, ours) == [
        ("layer", "conv", "csc"), ("nz", 7, ours.nz)]
    # a run's MLflow params: text under model.KEY, compared with the text of our values
    params = {f"model.{k}": str(getattr(ours, k)) for k in ARCHITECTURE_KEYS} | {"train.steps": "5"}
    assert architecture_differences(params, ours) == []
    assert architecture_differences({**params, "model.ndf": "64"}, ours) == [("ndf", "64", ours.ndf)]
    # a key the record lacks: ModelConfig's default (old checkpoints are CSC models), or not compared
    conv = load_config(None, {**DEBUG, "model.layer": "conv"}).model
    assert architecture_differences({}, conv) != []
    assert ("layer", "csc", "conv") in architecture_differences({}, conv)
    assert architecture_differences({}, conv, missing="skip") == []
    with pytest.raises(ValueError, match="model.layer: checkpoint 'csc', this config 'conv'"):
        check_architecture({"config": {"model": stored}}, conv)
    check_architecture({"config": {"model": stored}}, ours)
    assert isinstance(ours, ModelConfig)


def test_content_hash_names_are_stable_and_content_based():
    cfg = load_config(None, {**DEBUG, "train.steps": 7})
    # the names runs and sweeps got before this module existed: a re-run must still resume them
    assert default_run_name(cfg) == "ctrl-32px-binary-d93e29204e"
    assert sweep_name(load_sweep(None, ["space=sparsity"]), cfg) == "sweep-d9c44311af"
    same = load_config(None, {**DEBUG, "train.steps": 7, "run.name": "x", "tracking.experiment": "other"})
    assert config_identity(same) == config_identity(cfg)     # name and tracking do not identify a run
    assert default_run_name(load_config(None, {**DEBUG, "train.steps": 8})) != default_run_name(cfg)
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert len(content_hash({"a": 1}, 16, "sha256")) == 16
    assert content_hash({"a": 1}, 16, "sha256") != content_hash({"a": 2}, 16, "sha256")


def test_metric_names_cover_the_report_curves():
    """Every curve the evaluation report draws is a name some training run reports."""
    reported = set()
    for mode in ("binary", "multiclass"):
        reported |= training_metrics(load_config(None, {**DEBUG, "objective.mode": mode}))
    assert set(HISTORY_METRICS) <= reported
    assert "eval/psnr" in evaluation_metrics(load_config(None, DEBUG))

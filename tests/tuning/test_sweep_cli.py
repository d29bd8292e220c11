"""`cscctrl tune` before Ray: the resolved plan, and bad input refused with exit code 2 before anything
runs (no Tune experiment, no MLflow run); the trial config the driver function builds."""
from __future__ import annotations

import argparse

import pytest

from pipeline.config import ExperimentConfig, load_config
from tuning import sweep
from tuning.spaces import parse_space


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    return sweep.main(parser.parse_args(argv))


def test_print_plan(tmp_path, capsys):
    rc = run_cli(["-c", "debug", "--print-plan", "data.synthetic=true", "metric=train/recon_psnr",
                  f"run.storage_path={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "trials: 2" in out and "search: grid" in out and "metric: train/recon_psnr (max)" in out
    assert "model.lam: grid [0.0, 0.1]" in out
    assert "preset: csc_ctrl_debug" in out                       # the resolved base config follows
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("items, fragment", [
    (["space={model.lamb: {grid: [0.1]}}"], "unknown config key 'model.lamb'. Did you mean 'lam'?"),
    (["space={optim.encoder.lr: {loguniform: [1e-3, 1e-5]}}"], "loguniform [0.001, 1e-05] is empty"),
    (["space={model.n_steps: {grid: []}}"], "grid has an empty list of values"),
    (["space={model.solver: {grid: [fista, adam]}}"], "'adam' is rejected by the config"),
    (["space=sparsityy"], "unknown search space preset 'sparsityy'"),
    (["metric=eval/psnrr"], "never reported by a trial. Did you mean 'eval/psnr'?"),
    (["metric=eval/psnr"], "data.synthetic=true"),                       # no held-out split to measure
    (["scheduler=asha", "asha.metric=eval/ssim", "metric=train/recon_psnr"], "measured only by the end-of-training"),
    (["scheduler=asha", "asha.grace_period=99", "metric=train/recon_psnr"], "exceeds train.steps=20"),
    (["search=grid", "space={optim.encoder.lr: {uniform: [1e-5, 1e-3]}}", "metric=train/recon_psnr"],
     "search: grid needs every key to be a grid or a choice"),
    (["train.stepz=3"], "unknown config key 'train.stepz'"),
    (["resources.num_workers=0"], "needs at least 1 Ray Train worker"),
])
def test_bad_input_is_refused_before_anything_runs(items, fragment, tmp_path, capsys):
    rc = run_cli(["-c", "debug", "data.synthetic=true", f"run.storage_path={tmp_path}", *items])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err, err
    assert err.startswith("cscctrl tune: error: ")
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_trial_config_applies_the_point_with_the_cli_function():
    base = load_config(None, {"model.preset": "csc_ctrl_debug", "train.steps": 7})
    dims = parse_space({"model.lam_per_stage": {"each": {"choice": [0.0, 0.2]}},
                        "optim.decoder.betas": {"choice": [[0.5, 0.999], [0.0, 0.9]]},
                        "model.solver": {"grid": ["fista", "ista"]}}, base)
    tree = base.to_dict()
    sampled = {"model.lam_per_stage:0": 0.2, "model.lam_per_stage:1": 0.0, "model.lam_per_stage:2": 0.2,
               "model.lam_per_stage:3": 0.0, "optim.decoder.betas": "[0.0, 0.9]", "model.solver": "ista"}
    cfg = sweep.trial_config(tree, dims, sampled,
                             run_name=sweep.trial_run_name("sw", "abc_00001"), storage="/s/runs", parent_run_id="p1")
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.lam_per_stage == (0.2, 0.0, 0.2, 0.0)
    assert cfg.optim.decoder.betas == (0.0, 0.9) and cfg.model.solver == "ista"
    assert cfg.run.name == "sw-abc_00001" and cfg.run.storage_path == "/s/runs"
    assert cfg.tracking.parent_run_id == "p1"
    assert cfg.train.steps == 7 and cfg.model.ndf == 8          # the rest is the base
    assert tree == base.to_dict()                               # the shared base is untouched


def test_trainer_failure_settings_go_in_base_and_reach_the_trials(tmp_path):
    """Failures are handled at both levels: Tune's max_failures, and the trainer's scaling.max_failures."""
    plan = sweep.plan_sweep(sweep.load_sweep("debug", ["data.synthetic=true", "metric=train/recon_psnr",
                                                       "scaling.max_failures=5", "max_failures=3",
                                                       "resources.num_workers=2", f"run.storage_path={tmp_path}"]))
    assert plan.spec.max_failures == 3
    assert plan.base.scaling.max_failures == 5 and plan.base.scaling.num_workers == 2


def test_carry_keys_are_what_tune_ranks_on():
    plan = sweep.plan_sweep(sweep.load_sweep("debug", ["data.synthetic=true", "metric=train/recon_psnr",
                                                       "scheduler=asha", "asha.metric=sparsity/stage1",
                                                       "asha.mode=min", "run.storage_path=/tmp/unused-sweep"]))
    assert plan.carry_keys() == ("train/recon_psnr", "sparsity/stage1", "train/step")
    assert plan.grace_period == 5 and plan.max_t == 20          # a quarter of train.steps


def test_asha_stops_the_worse_trial_at_its_rung_and_lets_the_evaluation_report_through(tmp_path):
    """Tune's real ASHA, fed reports completed as SweepReportCallback completes them."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from tuning.callbacks import complete_report

    plan = sweep.plan_sweep(sweep.load_sweep("debug", [
        "data.synthetic=true", "metric=train/recon_psnr", "scheduler=asha", "asha.metric=sparsity/stage1",
        "asha.mode=min", "asha.grace_period=5", f"run.storage_path={tmp_path}"]))
    scheduler = sweep.build_scheduler(plan)
    sparse, dense = (Trial("__fake", config={}, trial_id=i, stub=True) for i in ("a_00000", "a_00001"))
    for t in (sparse, dense):
        scheduler.on_trial_add(None, t)

    def report(step: int, nonzero: float, **extra) -> dict:
        return complete_report({"train/step": step, "sparsity/stage1": nonzero, "train/recon_psnr": 9.0, **extra},
                               plan.carry_keys(), {})

    assert scheduler.on_trial_result(None, sparse, report(5, 0.1)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, dense, report(5, 0.6)) == TrialScheduler.STOP       # worse at the rung
    for step in (10, 15, 20):                                                                  # train.steps = 20
        assert scheduler.on_trial_result(None, sparse, report(step, 0.1)) == TrialScheduler.CONTINUE
    final = report(20, 0.1, **{"eval/psnr": 12.0})                                            # the evaluation
    assert scheduler.on_trial_result(None, sparse, final) == TrialScheduler.CONTINUE

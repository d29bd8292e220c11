"""`cscctrl tune`: a Ray Tune sweep in which every trial is a Ray Train run of the CTRL trainer.

    cscctrl tune [-c SWEEP.yaml] [key=value ...]

Each Tune trial runs ``train_trial``, a driver function that applies the trial's point to the base
config with the CLI's override function and fits a ``TorchTrainer`` (Ray Train V2: ``Tuner(trainer)``
is gone). The trainer forwards its reports to Tune through ``SweepReportCallback``; the last report holds
the end-of-training evaluation on the exact evaluation split. ASHA stops trials early on a metric every
report carries; Optuna (or random / grid search) proposes the points.

What ends up where (run.storage_path of the base config; local or shared storage):

    <storage>/sweeps/<sweep>/                    Tune's experiment: resume state, one folder per trial
    <storage>/sweeps/<sweep>/runs/<sweep>-<id>/  each trial's Ray Train run (checkpoints)
    <storage>/sweeps/<sweep>/summary/            trials.csv, metric_vs_lam_n.png, best_config.yaml

MLflow: one parent run named after the sweep; each trial's training run (params, metrics, images,
model) is its child. Re-running the same command resumes an interrupted sweep (``Tuner.restore``):
finished trials are kept, interrupted ones restart their Train run from its last checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, ExperimentConfig, load_config
from pipeline.launch import build_trainer, repair_checkpoints, resolve_run_config, with_command
from pipeline.ray_init import init_ray
from pipeline.tracking import MLflowTracker, find_run
from sharding.ensure import demo_plan, describe_shards, existing_manifest
from sharding.manifest import read_manifest
from sharding.storage import Destination
from tuning import analysis, state_seal
from tuning.resources import ResourceError, TrialResources, max_concurrent_trials, node_resources
from tuning.spaces import (PRESETS, Dimension, apply_point, describe_space, grid_size, overrides_from_trial,
                           parse_space, resolve_space, to_param_space)
from tuning.spec import TIME_ATTR, SweepSpec, asha_grace_period, check_metric, load_sweep, sweep_name
from tuning.state_seal import StateTrustError

log = logging.getLogger(__name__)

SWEEP_KIND_TAG = "cscctrl.kind"
TRIAL_STATUS_TAG = "cscctrl.sweep.trial_status"
TRIAL_ID_TAG = "cscctrl.sweep.trial_id"

HELP_EPILOG = """\
examples:
  cscctrl tune -c debug                                  # configs/sweeps/debug.yaml: 2 tiny trials
  cscctrl tune -c sparsity_unroll data.shards=/data/fmnist-shards
  cscctrl tune space=unroll search=grid scheduler=none train.steps=300
  cscctrl tune -c sparsity_unroll resources.num_workers=4 resources.use_gpu=true resources.gpus_per_worker=1
  cscctrl tune -c debug --print-plan                     # the resolved sweep and trial count, no Ray

key=value items whose first part is a config section (model, objective, optim, train, data, run, tracking)
override the trials' base config; any other key sets a field of the sweep file (name, space, search,
num_samples, metric, mode, scheduler, asha.*, max_concurrent_trials, max_failures, seed, resources.*).
Running the same sweep again resumes it. Space presets: {presets} (tuning/spaces.py, docs/tuning.md).
"""


@dataclass
class SweepPlan:
    """Everything decided before Ray starts: a checked spec, the resolved base config (resolve_run_config), the space."""

    spec: SweepSpec
    name: str
    base: ExperimentConfig
    dims: list[Dimension]
    param_space: dict[str, Any]
    num_trials: int
    max_t: int
    grace_period: int
    pending_shards: dict[str, Any] | None = None
    """A plan print only: the default demo shards the sweep would write first (sharding/ensure.py)."""

    @property
    def experiment_root(self) -> str:
        return f"{self.base.run.storage_path.rstrip('/')}/sweeps"

    @property
    def experiment_path(self) -> str:
        return f"{self.experiment_root}/{self.name}"

    @property
    def trial_storage(self) -> str:
        return f"{self.experiment_path}/runs"

    @property
    def summary_dir(self) -> str:
        return f"{self.experiment_path}/summary"

    def carry_keys(self) -> tuple[str, ...]:
        """Keys every report to Tune must hold (the ones Tune ranks or schedules on)."""
        keys = [self.spec.metric]
        if self.spec.scheduler == "asha":
            keys += [self.spec.asha.metric, TIME_ATTR]
        return tuple(dict.fromkeys(keys))


@dataclass
class SweepOutcome:
    name: str
    rows: list[analysis.TrialRow]
    best: analysis.TrialRow | None
    complete: bool
    parent_run_id: str
    experiment_path: str
    best_config_path: str


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = HELP_EPILOG.format(presets=", ".join(PRESETS))
    p.add_argument("-c", "--config", help="sweep YAML file (or the name of one in configs/sweeps/)")
    p.add_argument("items", nargs="*", metavar="key=value",
                   help="config overrides for the trials (section.key=value) or sweep fields (num_samples=4)")
    p.add_argument("--print-plan", action="store_true",
                   help="print the resolved sweep (space, trial count, base config) and exit without Ray")
    p.add_argument("--retry-errored", action="store_true",
                   help="when resuming, run errored trials again (from their last checkpoint)")
    p.add_argument("--worker-logs", action="store_true",
                   help="show the trials' training logs in this terminal (default: Ray's log files only)")
    p.add_argument("--trust-sweep-state", action="store_true",
                   help="resume from Tune state that carries no valid seal of this machine (tuning/state_seal.py), "
                        "sealing it first: only when you know who wrote it")


def main(args: argparse.Namespace) -> int:
    try:
        spec = load_sweep(args.config, args.items)
        plan = plan_sweep(spec, dry_run=args.print_plan)
        if args.print_plan:
            print(describe_plan(plan), end="")
            return 0
    except (ConfigError, FileNotFoundError, ConnectionError, ValueError) as e:
        print(f"cscctrl tune: error: {e}", file=sys.stderr)
        return 2
    try:
        outcome = run_sweep(plan, retry_errored=args.retry_errored, worker_logs=args.worker_logs,
                            trust_state=args.trust_sweep_state)
    except (ResourceError, StateTrustError) as e:
        print(f"cscctrl tune: error: {e}", file=sys.stderr)
        return 2
    if not outcome.complete:
        return 130
    return 0 if outcome.best is not None else 1


def describe_plan(plan: SweepPlan) -> str:
    s = plan.spec
    doc = {
        "sweep": plan.name,
        "experiment": plan.experiment_path,
        "search": s.search, "num_samples": s.num_samples, "trials": plan.num_trials,
        "metric": f"{s.metric} ({s.mode})",
        "scheduler": (f"asha on {s.asha.metric} ({s.asha.mode}), {TIME_ATTR} {plan.grace_period}..{plan.max_t}, "
                      f"reduction factor {s.asha.reduction_factor:g}") if s.scheduler == "asha" else "none",
        "space": describe_space(plan.dims),
        "resources per trial": dataclasses.asdict(s.resources),
    }
    if plan.pending_shards is not None:
        doc["shards (written by the first run)"] = plan.pending_shards
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True) + "base config:\n" + "".join(
        f"  {line}\n" for line in yaml.safe_dump(plan.base.to_dict(), sort_keys=False).splitlines())


# ----------------------------------------------------------------------------------------------
# Planning: every check that does not need Ray
# ----------------------------------------------------------------------------------------------


def plan_sweep(spec: SweepSpec, dry_run: bool = False) -> SweepPlan:
    """Resolve and check the sweep: base config, space keys and values, metrics, ASHA's rungs, shards and
    MLflow. Raises ConfigError (or FileNotFoundError / ConnectionError) before anything runs. ``dry_run``
    (a plan print) writes nothing: default demo shards not written yet are described instead."""
    base = load_config(spec.config or None, {**spec.base, **spec.resources.scaling_overrides()})
    dims = parse_space(resolve_space(spec.space), base)
    param_space = to_param_space(dims, spec.search)
    base = resolve_run_config(base, dry_run=dry_run)
    splits = None
    pending = None
    if not base.data.synthetic:
        manifest = existing_manifest(base.data.shards) if dry_run else None
        if dry_run and manifest is None:  # the default demo shards were planned, not written
            planned = demo_plan()
            pending = describe_shards(planned, base.data.shards)
            splits = planned.splits
        else:
            splits = list((manifest or read_manifest(base.data.shards)).splits)
    check_metric(spec.metric, "metric", base, splits, every_report=False)
    max_t = _max_steps(base, dims)
    grace = 0
    if spec.scheduler == "asha":
        check_metric(spec.asha.metric, "asha.metric", base, splits, every_report=True)
        grace = asha_grace_period(spec, dataclasses.replace(base, train=dataclasses.replace(base.train, steps=max_t)))
    num_trials = spec.num_samples * grid_size(dims, spec.search)
    return SweepPlan(spec=spec, name=sweep_name(spec, base), base=base, dims=dims, param_space=param_space,
                     num_trials=num_trials, max_t=max_t, grace_period=grace, pending_shards=pending)


def _max_steps(base: ExperimentConfig, dims: list[Dimension]) -> int:
    """The longest trial in steps (train.steps may itself be swept)."""
    steps = [base.train.steps]
    for d in dims:
        if d.path == "train.steps":
            steps += [int(v) for v in d.probe_values()]
    return max(steps)


# ----------------------------------------------------------------------------------------------
# One trial: the driver function Tune runs
# ----------------------------------------------------------------------------------------------


def trial_run_name(sweep: str, trial_id: str) -> str:
    """Deterministic (no timestamp), so a restarted trial resumes its Train run and its MLflow run."""
    return f"{sweep}-{trial_id}"


def trial_config(base: dict[str, Any], dims: list[Dimension], sampled: dict[str, Any], *, run_name: str,
                 storage: str, parent_run_id: str) -> ExperimentConfig:
    """The trial's config: its point applied to the base with the CLI's ``apply_overrides``, plus its
    run name, storage and MLflow parent."""
    point = overrides_from_trial(sampled, dims)
    tree = apply_point(base, {**point, "run.name": run_name, "run.storage_path": storage,
                              "tracking.parent_run_id": parent_run_id})
    return ExperimentConfig.from_dict(tree)


def train_trial(config: dict[str, Any], *, base: dict[str, Any], dims: list[Dimension], sweep: str,
                storage: str, parent_run_id: str, carry: tuple[str, ...]) -> None:
    """Tune's trainable: build and fit this trial's TorchTrainer; its reports reach Tune through the
    callback. A failed Train run (after the trainer's own FailureConfig retries) fails the trial, which
    Tune's FailureConfig may retry: same trial id, same run name, so it resumes from its checkpoint."""
    import ray.tune

    from tuning.callbacks import SweepReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, dims, config, run_name=trial_run_name(sweep, trial_id), storage=storage,
                       parent_run_id=parent_run_id)
    repair_checkpoints(cfg)
    build_trainer(cfg, callbacks=[SweepReportCallback(carry)]).fit()


def _trial_name(trial: Any) -> str:
    return trial.trial_id


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


def trial_resources(spec: SweepSpec) -> TrialResources:
    r = spec.resources
    return TrialResources(driver_cpus=r.driver_cpus, num_workers=r.num_workers, cpus_per_worker=r.cpus_per_worker,
                          gpus_per_worker=r.gpus_per_worker if r.use_gpu else 0.0)


def make_trainable(plan: SweepPlan, parent_run_id: str) -> Any:
    from ray import tune
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    # The command is read here, in the driver: a trial's own process was not started by it.
    fn = tune.with_parameters(train_trial, base=with_command(plan.base).to_dict(), dims=plan.dims, sweep=plan.name,
                              storage=plan.trial_storage, parent_run_id=parent_run_id, carry=plan.carry_keys())
    # Only the driver lives in Tune's placement group; Ray Train reserves the workers' own group.
    return tune.with_resources(fn, PlacementGroupFactory([{"CPU": plan.spec.resources.driver_cpus}]))


def build_scheduler(plan: SweepPlan) -> Any:
    """ASHA on ``asha.metric`` at rungs of train/step (grace period × reduction factor^k), or FIFO.

    ASHA stops every trial whose time reaches its max_t; the last training report and the evaluation
    report both come at the last step, so max_t is one past it: trials that survive the rungs finish
    and report their held-out metric."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    s = plan.spec
    if s.scheduler != "asha":
        return FIFOScheduler()
    return AsyncHyperBandScheduler(time_attr=TIME_ATTR, metric=s.asha.metric, mode=s.asha.mode,
                                   max_t=plan.max_t + 1, grace_period=plan.grace_period,
                                   reduction_factor=s.asha.reduction_factor)


def build_tuner(plan: SweepPlan, trainable: Any, concurrency: int) -> Any:
    from ray import tune

    from tuning.callbacks import SealState, TrialTable

    s = plan.spec
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=s.metric, mode=s.mode, seed=s.seed)
        limit = {"max_concurrent_trials": concurrency}  # Tune wraps a Searcher in a ConcurrencyLimiter
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores TuneConfig.max_concurrent_trials for this generator: it takes its own limit.
        search_alg = BasicVariantGenerator(max_concurrent=concurrency, random_state=s.seed)
        limit = {}
    return tune.Tuner(
        trainable,
        param_space=plan.param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=build_scheduler(plan), num_samples=s.num_samples,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname, **limit),
        run_config=tune.RunConfig(name=plan.name, storage_path=plan.experiment_root,
                                  failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                  callbacks=[TrialTable(plan.dims, s.metric, plan.base.train.steps),
                                             SealState(plan.experiment_path)], verbose=0),
    )


def run_sweep(plan: SweepPlan, *, retry_errored: bool = False, worker_logs: bool = False,
              trust_state: bool = False) -> SweepOutcome:
    """Start or resume the sweep, wait for it, then summarise it in MLflow and on the terminal. Tune's
    resume state is restored only when its seal verifies (tuning/state_seal.py; StateTrustError before Ray
    starts otherwise), or after ``trust_state`` sealed it."""
    import ray
    from ray import tune

    resumed = tune.Tuner.can_restore(plan.experiment_path)
    if resumed and trust_state:
        sealed = state_seal.seal(plan.experiment_path)
        print(f"[cscctrl] --trust-sweep-state: sealed {len(sealed)} state file(s) in {plan.experiment_path} as "
              f"they are now", flush=True)
    elif resumed:
        state_seal.verify(plan.experiment_path)
    init_ray(log_to_driver=worker_logs, tune=True)
    nodes = node_resources(ray.nodes())
    concurrency, note = max_concurrent_trials(trial_resources(plan.spec), nodes, plan.spec.max_concurrent_trials,
                                              plan.num_trials)
    if note:
        log.warning(note)
    tracker = open_parent_run(plan)
    trainable = make_trainable(plan, tracker.run_id)
    print(f"[cscctrl] sweep {plan.name}{' (resuming)' if resumed else ''}: {plan.num_trials} trial(s), "
          f"{concurrency} at a time ({trial_resources(plan.spec).describe()} each); {plan.spec.search} search"
          f"{', ASHA' if plan.spec.scheduler == 'asha' else ''}; metric {plan.spec.metric} ({plan.spec.mode}); "
          f"MLflow parent run {tracker.run_id}; storage {plan.experiment_path}", flush=True)
    if resumed:
        tuner = tune.Tuner.restore(plan.experiment_path, trainable, resume_unfinished=True,
                                   resume_errored=retry_errored)
    else:
        tuner = build_tuner(plan, trainable, concurrency)
        state_seal.seal(plan.experiment_path)  # tuner.pkl, written when the tuner was built
    try:
        tuner.fit()  # each save of Tune's state is sealed by the SealState callback before it is uploaded
    except BaseException:
        tracker.finish("FAILED")
        raise
    return summarize(plan, tracker)


def open_parent_run(plan: SweepPlan) -> Any:
    """The sweep's MLflow run (re-attached by name on resume); its params are the base config plus the
    sweep's own settings, and the resolved sweep file is an artifact."""
    tracker = MLflowTracker(plan.base, plan.name)
    if not tracker.resumed:
        s = plan.spec
        tracker.set_tags({SWEEP_KIND_TAG: "sweep"})
        params = {"sweep.search": s.search, "sweep.num_samples": s.num_samples, "sweep.trials": plan.num_trials,
                  "sweep.metric": s.metric, "sweep.mode": s.mode, "sweep.scheduler": s.scheduler}
        params.update({f"sweep.space.{k}": v for k, v in describe_space(plan.dims).items()})
        for k, v in params.items():
            tracker.client.log_param(tracker.run_id, k, str(v)[:6000])
        tracker.log_text(yaml.safe_dump({**s.to_dict(), "name": plan.name}, sort_keys=False, allow_unicode=True),
                         "sweep/sweep.yaml")
    return tracker


def summarize(plan: SweepPlan, tracker: Any) -> SweepOutcome:
    """Rows from Tune's experiment state; best trial; table, plot and best config to storage and to the
    parent run; the children's MLflow status; the terminal summary."""
    from ray import tune

    trials = tune.ExperimentAnalysis(plan.experiment_path).trials
    rows = analysis.rows_from_trials(trials, plan.dims, plan.base.train.steps,
                                     lambda tid: trial_run_name(plan.name, tid))
    s = plan.spec
    complete = len(rows) >= plan.num_trials and all(r.status in ("done", "stopped", "error") for r in rows)
    best = analysis.best_row(rows, s.metric, s.mode)
    records = analysis.table_records(rows, plan.dims, s.metric, s.mode)
    best_config_path = ""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / analysis.TABLE_FILE).write_text(analysis.records_csv(records))
        (out / analysis.TABLE_JSON_FILE).write_text(analysis.records_json(records))
        analysis.plot_tradeoff(rows, s.metric, s.mode, plan.base, out / analysis.PLOT_FILE)
        if best is not None:
            header = (f"Best trial of sweep {plan.name}: {best.trial_id} (run {best.run_name}), "
                      f"{s.metric} = {best.value(s.metric):.4f}\nTrain it: cscctrl train -c {analysis.BEST_CONFIG_FILE}")
            (out / analysis.BEST_CONFIG_FILE).write_text(
                analysis.best_config_yaml(s.config, s.base, best.point, header))
            best_config_path = f"{plan.summary_dir}/{analysis.BEST_CONFIG_FILE}"
        copy_summary(out, plan.summary_dir)
        log_summary(tracker, out, best, s.metric, complete)
    update_children(tracker, rows)
    print(analysis.summary_text(rows, best, s.metric, plan.name, parent_run_id=tracker.run_id,
                                tracking_uri=tracker.uri, best_config_path=best_config_path, complete=complete),
          flush=True)
    return SweepOutcome(name=plan.name, rows=rows, best=best, complete=complete, parent_run_id=tracker.run_id,
                        experiment_path=plan.experiment_path, best_config_path=best_config_path)


def copy_summary(src: Path, dest: str) -> None:
    """The summary files to storage (a local path or any fsspec URL), each file atomically
    (sharding/storage.py)."""
    loc = Destination(dest)
    loc.makedirs()
    loc.upload_folder(src)


def log_summary(tracker: Any, files: Path, best: analysis.TrialRow | None, metric: str, complete: bool) -> None:
    client, run_id = tracker.client, tracker.run_id
    for f in sorted(files.iterdir()):  # replaces the files of an earlier (interrupted) summary
        client.log_artifact(run_id, str(f), "sweep")
    tags = {"cscctrl.sweep.complete": str(complete).lower()}
    if best is not None:
        tags.update({"cscctrl.sweep.best_trial": best.trial_id, "cscctrl.sweep.best_run_name": best.run_name})
        child = _find_child(tracker, best.run_name)
        if child:
            tags["cscctrl.sweep.best_run_id"] = child
        tracker.log_metrics(0, {f"best/{metric}": best.value(metric), "best/nonzero_mean": best.nonzero})
    tracker.set_tags(tags)
    tracker.finish("FINISHED" if complete and best is not None else ("KILLED" if not complete else "FAILED"))


def _find_child(tracker: Any, run_name: str) -> str | None:
    return find_run(tracker.client, tracker.experiment_id, run_name)


def update_children(tracker: Any, rows: list[analysis.TrialRow]) -> None:
    """Tag each trial's MLflow run with its sweep status; close the runs the sweep ended without the
    trainer closing them (stopped early by ASHA, or interrupted)."""
    for r in rows:
        child = _find_child(tracker, r.run_name)
        if child is None:
            continue
        tracker.client.set_tag(child, TRIAL_STATUS_TAG, r.status)
        tracker.client.set_tag(child, TRIAL_ID_TAG, r.trial_id)
        status = tracker.client.get_run(child).info.status
        if status == "RUNNING" and r.status in ("stopped", "running", "pending", "paused"):
            tracker.client.set_terminated(child, status="KILLED")
        elif status == "RUNNING" and r.status == "error":
            tracker.client.set_terminated(child, status="FAILED")

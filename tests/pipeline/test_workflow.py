"""`cscctrl run WORKFLOW.yaml` end to end on tiny real data through real Ray and a real MLflow store.

- bad input (unknown key / stage, missing source, best-of-sweep without a sweep, a registered name of
  another architecture) fails with exit 2 before any stage runs (no stage record is written);
- a full run (shard on Ray tasks -> verify -> 2-trial sweep -> train the best trial -> evaluate on val and
  unseen -> register) whose first attempt fails at the evaluate stage (a split that does not exist): the
  stage is named, and the next run reuses every completed stage; a third identical run skips everything;
  the shards equal `shard_source` written in one process, byte for byte; MLflow holds the parent run,
  the stage runs, the sweep under the tune stage with its trials under it, and the registered alias;
- killing the driver during training and running again resumes the training run from its checkpoint
  without writing any shard again.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.workflow import STAGES, load_workflow, main, split_ranges

CSCCTRL = [sys.executable, "-m", "pipeline", "run"]
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1",
       "PYTHONUNBUFFERED": "1"}
ENV.pop("RAY_ADDRESS", None)

TRAINING = {"model.preset": "csc_ctrl_debug", "train.steps": 4, "train.batch_size_per_worker": 16,
            "train.precision": "fp32", "train.log_every": 2, "train.checkpoint_every": 2, "train.image_every": 0,
            "train.eval_batches": 1, "data.loader_workers": 0, "scaling.num_workers": 1}


def workflow_file(tmp: Path, name: str, *, sweep: bool = True, sets=("val", "unseen"), **training) -> Path:
    tree = {
        "name": name, "source": "demo", "source_options": {"train": 96, "val": 32, "unseen": 32, "size": 32},
        "storage": str(tmp / "store"), "experiment": f"wf-{name}",
        "shards": {"shard_maxcount": 24, "tasks": 2},
        "training": {"from_sweep": sweep, "set": {**TRAINING, **training}},
        "evaluate": {"sets": [s if isinstance(s, dict) else {"split": s} for s in sets], "batch_size": 32},
        "register": {"model": f"{name}-model", "alias": "candidate"},
    }
    if sweep:
        tree["sweep"] = {"config": "debug", "set": {"space": {"model.lam": {"grid": [0.05, 0.1]}},
                                                     "train.steps": 2, "train.checkpoint_every": 2,
                                                     "train.eval_batches": 1}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def run_cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([*CSCCTRL, "--no-progress", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def records(storage: Path, name: str) -> dict:
    return json.loads((storage / "workflows" / name / "stages.json").read_text())


def summary_states(stdout: str) -> dict[str, str]:
    """The final table: `stage state duration note` lines."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in STAGES and parts[1] in ("done", "skipped", "failed"):
            out[parts[0]] = parts[1]
    return out


# ----------------------------------------------------------------------------------------------
# No Ray: plans and bad input
# ----------------------------------------------------------------------------------------------


def test_split_ranges_are_disjoint_and_cover_every_shard():
    for n, tasks in [(1, 4), (7, 2), (10, 3), (64, 16), (5, 5)]:
        ranges = split_ranges(n, tasks)
        flat = [i for r in ranges for i in r]
        assert flat == list(range(n)), (n, tasks)
        assert len(ranges) == min(n, tasks)
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
        assert all(r == list(range(r[0], r[-1] + 1)) for r in ranges)  # contiguous


def test_command_line_items_reach_the_right_sections(tmp_path):
    wf = load_workflow(str(workflow_file(tmp_path, "items")),
                       ["train.steps=9", "sweep.num_samples=3", "shards.tasks=5", "register.alias=staging"])
    assert wf.training.set["train.steps"] == 9
    assert wf.sweep.set["num_samples"] == 3
    assert wf.shards.tasks == 5 and wf.register.alias == "staging"
    assert wf.stages == ["shard", "verify", "tune", "train", "evaluate", "register"]
    bundled = load_workflow("demo")
    assert bundled.stages == list(STAGES) and bundled.training.from_sweep
    for name in ("fashion_mnist", "imagenet128_cluster"):
        assert load_workflow(name).register.model


@pytest.mark.parametrize("name", ["demo", "fashion_mnist"])
def test_bundled_workflows_evaluate_splits_their_sources_have(name):
    from sharding.sources import find_fashion_mnist, open_source

    wf = load_workflow(name)
    if wf.source == "fashion-mnist" and find_fashion_mnist() is None:
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    own = set(open_source(wf.source, **wf.source_options).list().splits)
    for s in wf.evaluate.sets:
        if s.data:
            continue
        splits = own if not s.source else set(open_source(s.source, **s.source_options).list().splits)
        assert s.split in splits, (name, s.name, sorted(splits))


def _main(path: Path, *items: str, from_stage: str | None = None) -> int:
    return main(argparse.Namespace(workflow=str(path), items=list(items), from_stage=from_stage,
                                   print_plan=False, no_progress=True))


@pytest.mark.parametrize("items, from_stage, message", [
    (["shards.tasks_per_node=2"], None, "unknown workflow key 'shards.tasks_per_node'"),
    (["train.stepz=2"], None, "train.stepz"),
    ([], "trian", "--from 'trian': unknown stage"),
    (["source=/no/such/folder"], None, "does not exist"),
    (["sweep=null"], None, "needs a sweep section"),
    (["sweep.space={model.no_such_key: {grid: [1, 2]}}"], None, "model.no_such_key"),
    (["evaluate.sets=[{split: unseen, data: /x, source: demo}]"], None, "give data or source, not both"),
    (["evaluate.sets=[{split: val, source: fashion-mnist, source_options: {train: 3}}]"], None,
     "takes no source_options"),
    (["evaluate.sets=[{split: unseen, source: demo, source_options: {crop: [0.9, 0.1]}}]"], None,
     "demo crop must be"),
])
def test_bad_input_fails_before_any_stage(tmp_path, capsys, items, from_stage, message):
    path = workflow_file(tmp_path, "bad")
    assert _main(path, *items, from_stage=from_stage) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store" / "workflows").exists()
    assert not (tmp_path / "store" / "shards").exists()


def test_shards_of_another_plan_at_the_destination_are_kept_and_the_fix_is_named(tmp_path, capsys):
    """An earlier version of a workflow left shards of another source/options at its destination: the shard
    stage fails naming the folder and the ways out, and leaves those shards as they were."""
    from sharding.plan import plan_shards
    from sharding.sources import open_source
    from sharding.storage import Destination
    from sharding.write import shard_source

    dest = tmp_path / "store" / "shards"
    shard_source(plan_shards(open_source("demo", train=8, val=0, unseen=0, size=16, seed=9), shard_maxcount=4),
                 Destination(str(dest)))
    before = {p.name: p.read_bytes() for p in dest.glob("*.tar")}
    assert _main(workflow_file(tmp_path, "other", sweep=False)) == 1
    err = capsys.readouterr().err
    assert f"{dest} holds shards of another source" in err and "another storage=" in err
    assert {p.name: p.read_bytes() for p in dest.glob("*.tar")} == before


def test_registered_name_of_another_architecture_is_refused(tmp_path, capsys):
    from mlflow import MlflowClient

    path = workflow_file(tmp_path, "arch", sweep=False)
    store = tmp_path / "store"
    store.mkdir()
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.create_experiment("other")
    run = client.create_run(exp).info.run_id
    client.log_param(run, "model.ndf", "64")  # csc_ctrl_debug has a different ndf
    client.log_param(run, "model.layer", "conv")  # the plain-convolution baseline: same shapes, other weights
    client.create_registered_model("arch-model")
    client.create_model_version("arch-model", source=str(tmp_path), run_id=run)
    assert _main(path) == 2
    err = capsys.readouterr().err
    assert "already taken by another architecture" in err and "model.ndf: registered 64" in err
    assert "model.layer: registered conv, this workflow csc" in err
    assert not (store / "workflows").exists()


# ----------------------------------------------------------------------------------------------
# Through Ray
# ----------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_workflow_end_to_end_failure_reuse_and_skip(tmp_path):
    from mlflow import MlflowClient

    from sharding.plan import plan_shards
    from sharding.sources import open_source
    from sharding.storage import Destination
    from sharding.write import shard_source

    storage = tmp_path / "store"
    # 1. A split that does not exist: the evaluate stage fails, named; the stages before it are done.
    bad = run_cli(str(workflow_file(tmp_path, "e2e", sets=("val", "no-such-split"))))
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "stage 'evaluate' failed" in bad.stderr and "no-such-split" in bad.stderr
    rec = records(storage, "e2e")
    assert {s: rec[s]["state"] for s in rec} == {"shard": "done", "verify": "done", "tune": "done",
                                                 "train": "done", "evaluate": "failed"}
    assert len(rec["shard"]["outputs"]["nodes"]) == 1  # local Ray: one node

    # 2. The fixed workflow reuses shard..train and runs evaluate (with a set of its own source, sharded by
    # the stage) and register.
    photos = {"split": "unseen", "source": "demo", "label": "photos",
              "source_options": {"train": 0, "val": 0, "unseen": 16, "size": 32, "seed": 1}}
    good_path = workflow_file(tmp_path, "e2e", sets=("val", "unseen", photos))
    good = run_cli(str(good_path))
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    assert summary_states(good.stdout) == {"shard": "skipped", "verify": "skipped", "tune": "skipped",
                                           "train": "skipped", "evaluate": "done", "register": "done"}

    # 3. Identical again: every stage skipped, without starting Ray.
    start = time.time()
    again = run_cli(str(good_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert set(summary_states(again.stdout).values()) == {"skipped"} and len(summary_states(again.stdout)) == 6
    assert "Started a local Ray instance" not in again.stdout + again.stderr
    assert time.time() - start < 60

    # Shards written by Ray tasks == one process writing the same plan.
    source = open_source("demo", train=96, val=32, unseen=32, size=32)
    reference = tmp_path / "reference"
    shard_source(plan_shards(source, shard_maxcount=24), Destination(str(reference)))
    tars = sorted(p.name for p in reference.glob("*.tar"))
    assert len(tars) >= 4 and tars == sorted(p.name for p in (storage / "shards").glob("*.tar"))
    for name in tars:
        assert (reference / name).read_bytes() == (storage / "shards" / name).read_bytes(), name

    # MLflow: parent runs, stage runs, sweep nested under its stage run, trials under the sweep.
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("wf-e2e").experiment_id
    parents = client.search_runs([exp], "tags.`cscctrl.kind` = 'workflow'", order_by=["attributes.start_time ASC"])
    assert [p.data.tags["cscctrl.workflow.state"] for p in parents] == ["failed", "done", "done"]
    last = parents[-1]
    assert {f"cscctrl.stage.{s}.state" for s in STAGES} <= set(last.data.tags)
    stage_runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parents[1].info.run_id}'")
    by_stage = {r.data.tags["cscctrl.stage"]: r for r in stage_runs}
    assert set(by_stage) == set(STAGES)
    tune_stage = client.search_runs([exp], "tags.`cscctrl.stage` = 'tune' and tags.`cscctrl.stage.state` = 'done'")
    sweep_runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{tune_stage[0].info.run_id}'")
    assert [r.data.tags.get("cscctrl.kind") for r in sweep_runs] == ["sweep"]
    trials = client.search_runs([exp], f"tags.mlflow.parentRunId = '{sweep_runs[0].info.run_id}'")
    assert len(trials) == 2
    train_out = rec["train"]["outputs"]
    train_run = client.get_run(train_out["run_id"])
    assert train_run.data.tags["mlflow.parentRunId"] in {r.info.run_id for r in client.search_runs(
        [exp], "tags.`cscctrl.stage` = 'train'")}
    best = yaml.safe_load(Path(rec["tune"]["outputs"]["best_config"]).read_text())
    assert float(train_run.data.params["model.lam"]) == best["model"]["lam"]  # trained the best trial
    # The registered model: alias, version from the training run, evaluation table attached.
    mv = client.get_model_version_by_alias("e2e-model", "candidate")
    assert mv.run_id == train_out["run_id"] or mv.tags["cscctrl.run_name"] == train_out["run_name"]
    evaluation = records(storage, "e2e")["evaluate"]["outputs"]["table"]
    assert [row["set"] for row in evaluation] == ["val", "unseen", "photos"]
    assert evaluation[2]["data"] == str(storage / "eval-shards" / "photos") and evaluation[2]["generalisation"]
    from sharding.manifest import read_manifest

    assert read_manifest(evaluation[2]["data"]).num_samples("unseen") == 16
    for row in evaluation:
        assert float(mv.tags[f"eval.{row['set']}.psnr"]) == pytest.approx(row["psnr"], rel=1e-5)
    artifacts = {a.path for a in client.list_artifacts(train_out["run_id"], "evaluation")}
    assert "evaluation/table.json" in artifacts


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_driver_resumes_training_without_resharding(tmp_path):
    path = workflow_file(tmp_path, "kill", sweep=False, sets=("val",), **{"train.steps": 40})
    storage = tmp_path / "store"
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 (the child's output while it runs)
    proc = subprocess.Popen([*CSCCTRL, "--no-progress", str(path)], stdout=log, stderr=subprocess.STDOUT,
                            env=ENV, start_new_session=True)  # its own group: Ray's local processes too
    deadline = time.time() + 300
    try:
        # Ray Train's own record of a reported checkpoint (a checkpoint folder alone may not be registered yet).
        while not list(storage.glob("kill-train-*/checkpoint_manager_snapshot.json")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    rec = records(storage, "kill")
    assert rec["shard"]["state"] == "done" and rec["train"]["state"] == "running"
    shard_times = {p.name: p.stat().st_mtime_ns for p in (storage / "shards").glob("*.tar")}
    assert shard_times

    second = run_cli(str(path), timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    states = summary_states(second.stdout)
    assert states["shard"] == "skipped" and states["verify"] == "skipped" and states["train"] == "done"
    assert "resuming kill-train-" in second.stdout + second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (storage / "shards").glob("*.tar")} == shard_times
    assert records(storage, "kill")["train"]["state"] == "done"

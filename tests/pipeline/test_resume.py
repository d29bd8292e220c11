"""A resume compares the config with the one the run was trained with: changes to the model, objective,
optimizer or data are refused with the list of differences before Ray starts; steps, cadences and
resources may change and the change is recorded in MLflow (issue 17, item 5). In-process runs
(scaling.num_workers=0) with a real sqlite MLflow store."""
from __future__ import annotations

from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.config import ExperimentConfig, load_config
from pipeline.resume import config_changes
from tests.pipeline.trainer_helpers import TINY


def _train(capsys, tmp_path, *items: str) -> tuple[int, str, str]:
    code = main(["train", *TINY, f"run.storage_path={tmp_path}", "run.name=same", "train.log_every=2",
                 "train.checkpoint_every=2", *items])
    out, err = capsys.readouterr()
    return code, out, err


def _run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cscctrl").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_resume_with_other_model_or_optimizer_settings_is_refused(tmp_path, capsys):
    code, _, err = _train(capsys, tmp_path, "train.steps=2")
    assert code == 0, err[-3000:]
    code, out, err = _train(capsys, tmp_path, "train.steps=2", "model.lam=0.5", "optim.decoder.lr=0.01")
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "run.name='same' exists" in line and "checkpoint_step000000002" in line
    assert "model.lam: 0.1 -> 0.5" in line and "optim.decoder.lr: " in line and "-> 0.01" in line
    assert "choose another run.name" in line
    assert "[cscctrl] run" not in out and "resuming" not in out  # refused before anything started
    _client, run = _run(tmp_path)
    assert run.data.params["model.lam"] == "0.1" and run.info.status == "FINISHED"


def test_resume_applies_steps_and_cadences_and_records_the_change(tmp_path, capsys):
    code, _, err = _train(capsys, tmp_path, "train.steps=2")
    assert code == 0, err[-3000:]
    code, out, err = _train(capsys, tmp_path, "train.steps=4", "train.log_every=1")
    assert code == 0, err[-3000:]
    assert "resuming same from step 2" in out and "train.steps: 2 -> 4" in out
    client, run = _run(tmp_path)
    assert run.data.tags["cscctrl.resume.train.steps"] == "2 -> 4 (at step 2)"
    assert run.data.tags["cscctrl.resume.train.log_every"] == "2 -> 1 (at step 2)"
    assert run.data.params["train.steps"] == "2"  # params stay as the run began; the tags say what changed
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "resume")]
    assert artifacts == ["resume/step000000002.yaml"]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/step"))
    assert steps == [2, 3, 4]  # the new cadence applies from the resumed step


def test_keys_an_older_checkpoint_lacks_compare_as_their_defaults():
    current = load_config(None, TINY).to_dict()
    stored = load_config(None, TINY).to_dict()
    del stored["model"]["layer"], stored["train"]["eval_batches"]
    assert config_changes(stored, current) == []
    stored["objective"]["eps_sq"] = 0.25
    changes = config_changes(stored, current)
    assert [(c.key, c.mutable) for c in changes] == [("objective.eps_sq", False)]
    assert ExperimentConfig.from_dict(current).objective.eps_sq == 0.5

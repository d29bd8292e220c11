"""The CTRL loop in-process: schedules, the sign convention, metrics, non-finite handling, and resume
through Ray Train's local mode (scaling.num_workers=0) with a real sqlite MLflow store."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.trainer import CTRLTrainer, NonFiniteObjectiveError, lr_factor, player_loss, undersampled_warning
from tests.pipeline.trainer_helpers import TINY, Recorder


def test_lr_schedule_is_linear_to_zero_with_warmup():
    assert lr_factor(0, 100, 0, "linear") == 1.0
    assert lr_factor(50, 100, 0, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "linear") == 0.0
    assert [lr_factor(s, 100, 4, "linear") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(99, 100, 0, "constant") == 1.0


def test_sign_is_flipped_once():
    class T:
        objective = torch.tensor(2.0)
        consistency = torch.tensor(0.5)

    assert player_loss(T, "encoder", 0.0).item() == -2.0
    assert player_loss(T, "decoder", 0.0).item() == 2.0
    # the sample-wise consistency is a constraint both players minimise: the same sign in both losses
    assert player_loss(T, "encoder", 1.0).item() == -1.5
    assert player_loss(T, "decoder", 1.0).item() == 2.5


def _batches(n_good: int, b: int = 8, bad_from: int | None = None):
    g = torch.Generator().manual_seed(0)
    i = 0
    while True:
        x = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
        if bad_from is not None and i >= bad_from:
            x[0, 0, 0, 0] = float("nan")
        i += 1
        yield x, torch.zeros(b, dtype=torch.long)


def test_undersampled_warning_when_a_class_has_fewer_images_than_dimensions():
    assert undersampled_warning(2048, 10, 128) is None          # LDR's MNIST recipe: 205 per class
    assert undersampled_warning(1600, 1, 512) is None            # binary: one set of 1600
    message = undersampled_warning(1600, 10, 512)                # docs/method.md §5 32 px row: 160 per class
    assert message is not None and "160 images per class" in message and "model.nz=512" in message
    assert "at most 160" in message


def test_trainer_warns_at_start_when_classes_are_undersampled(caplog):
    cfg = load_config(None, TINY + ["train.steps=1", "model.nz=16", "objective.mode=multiclass",
                                    "objective.num_classes=2"])
    with caplog.at_level("WARNING", logger="pipeline.trainer"):
        CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=2, batches=_batches(1), reporter=Recorder())
    assert any("4 images per class" in r.getMessage() for r in caplog.records)
    caplog.clear()
    cfg = load_config(None, TINY + ["train.steps=1", "model.nz=4"])
    with caplog.at_level("WARNING", logger="pipeline.trainer"):
        CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=_batches(1), reporter=Recorder())
    assert not any("images per class" in r.getMessage() for r in caplog.records)


def test_players_move_only_their_own_parameters():
    cfg = load_config(None, TINY + ["train.steps=1"])
    tr = CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=_batches(1), reporter=Recorder())
    x, y = next(_batches(1))
    enc0 = [p.detach().clone() for p in tr.encoder_params]
    dec0 = [p.detach().clone() for p in tr.decoder_params]
    tr.encoder_step(x, y)
    assert any(not torch.equal(a, p) for a, p in zip(enc0, tr.encoder_params))
    assert all(torch.equal(a, p) for a, p in zip(dec0, tr.decoder_params))
    enc1 = [p.detach().clone() for p in tr.encoder_params]
    tr.decoder_step(x, y)
    assert all(torch.equal(a, p) for a, p in zip(enc1, tr.encoder_params))
    assert any(not torch.equal(a, p) for a, p in zip(dec0, tr.decoder_params))


def test_encoder_step_ascends_and_decoder_step_descends_the_objective():
    """With a small learning rate, one encoder step raises T on the same batch; one decoder step lowers it."""
    cfg = load_config(None, TINY + ["train.steps=1", "optim.encoder.lr=1e-4", "optim.decoder.lr=1e-4"])
    tr = CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=_batches(1), reporter=Recorder())
    # (train-mode BatchNorm uses the batch's moments, so T is a function of the weights for a fixed batch)
    x, y = next(_batches(1))

    def value():
        with torch.no_grad():
            z = tr.encoder(x)
            return tr.objective(z, tr.encoder(tr.decoder(z)), y).objective.item()

    t0 = value()
    tr.encoder_step(x, y)
    t1 = value()
    tr.decoder_step(x, y)
    t2 = value()
    assert t1 > t0 and t2 < t1


def test_metrics_and_nonfinite_stop_before_the_next_checkpoint():
    cfg = load_config(None, TINY + ["train.steps=8", "train.log_every=4", "train.checkpoint_every=2"])
    rec = Recorder()
    tr = CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=_batches(8, bad_from=2), reporter=rec)
    with pytest.raises(NonFiniteObjectiveError) as e:
        tr.fit()
    assert rec.checkpoints == [2]          # step 2 was good; nothing after the NaN was saved
    assert "step 3" in str(e.value) and "delta_r" in str(e.value)


def test_metrics_are_named_and_finite():
    cfg = load_config(None, TINY + ["train.steps=2", "train.log_every=2"])
    rec = Recorder()
    CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=_batches(2), reporter=rec).fit()
    step, m = rec.logged[-1]
    assert step == 2
    for key in ("encoder/delta_r_z_zhat", "decoder/objective", "train/recon_mse", "train/recon_psnr",
                "sparsity/stage1", "perf/images_per_s", "perf/data_wait_fraction", "optim/encoder_lr"):
        assert key in m and math.isfinite(m[key]), key
    assert 0.0 <= m["sparsity/stage1"] <= 1.0


def test_in_process_run_tracks_to_mlflow_and_resumes_the_same_run(tmp_path):
    from pipeline.launch import resolve_run_config, run_training

    base = TINY + [f"run.storage_path={tmp_path}", "run.name=resume-me", "train.log_every=2",
                   "train.checkpoint_every=2"]
    cfg = resolve_run_config(load_config(None, base + ["train.steps=4"]))
    assert run_training(cfg) is not None
    assert sorted(p.name for p in (tmp_path / "resume-me").glob("checkpoint_step*")) == \
        ["checkpoint_step000000002", "checkpoint_step000000004"]

    cfg = resolve_run_config(load_config(None, base + ["train.steps=6"]))
    assert run_training(cfg) is not None

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("cscctrl")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "a resumed run continues its MLflow run"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/step"))
    assert steps == [2, 4, 6]
    params = runs[0].data.params
    assert params["model.preset"] == "csc_ctrl_debug"
    assert "config.yaml" in [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    # keep-N: the two newest checkpoints remain
    assert sorted(p.name for p in (tmp_path / "resume-me").glob("checkpoint_step*"))[-1] == "checkpoint_step000000006"


def _running_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var)]


@pytest.mark.parametrize("player", ["encoder", "decoder"])
def test_encoder_running_stats_follow_real_images_only(player):
    """Both players run f on X and on X̂ in train mode; only f(X) may move f's BatchNorm running
    statistics (evaluation normalises real images with them). Reference: a copy of f taking one
    train-mode forward of X from the same state."""
    import copy

    cfg = load_config(None, TINY + ["train.steps=5"])
    trainer = CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=iter(()), reporter=Recorder())
    x, labels = next(_batches(1))
    reference = copy.deepcopy(trainer.raw_encoder).train()
    with torch.no_grad():
        reference(x)
    expected = _running_stats(reference)
    before = _running_stats(trainer.raw_encoder)
    if player == "encoder":
        trainer.encoder_step(x, labels)
    else:
        trainer.decoder_step(x, labels)
    after = _running_stats(trainer.raw_encoder)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # f(X) did update them
    for a, e in zip(after, expected):
        torch.testing.assert_close(a, e)
    assert [m.momentum for m in trainer.raw_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)] == [0.1] * 2


def test_logging_forward_leaves_the_model_unchanged():
    cfg = load_config(None, TINY + ["train.steps=5"])
    trainer = CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=iter(()), reporter=Recorder())
    x, _ = next(_batches(1))
    before = _running_stats(trainer.raw_encoder)
    trainer.coding_measures(x)
    for a, b in zip(_running_stats(trainer.raw_encoder), before):
        assert torch.equal(a, b)


def test_logged_model_loads_back_and_reconstructs_like_the_networks(tmp_path):
    """The registered model is g∘f saved by MLflow as a torch.export program (no pickled classes of this
    package); it loads through the alias, gives the networks' outputs at a batch size other than the
    example's, and states its requirements (torch without a local version label)."""
    import mlflow

    from models.presets import create_model
    from pipeline.tracking import Autoencoder, MLflowTracker, tracking_uri_set_to

    cfg = load_config(None, TINY + [f"run.storage_path={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                                    "tracking.registered_model=loadme", "tracking.alias=candidate"])
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    torch.manual_seed(0)
    encoder, decoder = create_model("csc_ctrl_debug")
    tracker = MLflowTracker(cfg, "loadme")
    assert tracker.log_model(encoder, decoder) == "1"
    tracker.finish()

    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before  # logging left the process's environment alone
    with tracking_uri_set_to(cfg.tracking.uri):
        loaded = mlflow.pytorch.load_model("models:/loadme@candidate")
        artifacts = Path(mlflow.artifacts.download_artifacts("models:/loadme@candidate"))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = Autoencoder(encoder, decoder).eval()(x)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    assert (artifacts / "data" / "model.pt2").is_file()
    lines = (artifacts / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in lines and not any("+" in line for line in lines)

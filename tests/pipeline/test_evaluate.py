"""`cscctrl eval` on a real trained checkpoint and real demo shards: metrics, the offline report,
generalisation to unseen photos, and clear errors for bad sources."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline.checkpoint import find_latest, load_state, save_state
from pipeline.config import load_config
from pipeline.launch import resolve_run_config, run_training


@pytest.fixture(scope="module")
def trained_run(demo_shards, tmp_path_factory):
    storage = tmp_path_factory.mktemp("eval-run")
    cfg = resolve_run_config(load_config(None, [
        "model.preset=csc_ctrl_debug", "objective.mode=multiclass", "train.batch_size_per_worker=16",
        "train.steps=4", "train.log_every=2", "train.checkpoint_every=4", "train.image_every=0",
        "train.precision=fp32", "scaling.num_workers=0", "data.loader_workers=0", f"data.shards={demo_shards}",
        f"run.storage_path={storage}", "run.name=evalme", "tracking.log_model=false"]))
    assert run_training(cfg) is not None
    return storage / "evalme", cfg


def _eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "eval", *args], capture_output=True, text=True,
                          timeout=600)


def test_eval_writes_metrics_and_an_offline_report(trained_run, tmp_path):
    run_dir, cfg = trained_run
    out = tmp_path / "report"
    proc = _eval(str(run_dir), "--split", "val", "--batch-size", "32", "--max-batches", "2", "--device", "cpu",
                 "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    for key in ("mse", "psnr", "ssim", "sparsity/stage1", "objective/delta_r_z", "fd_effnetlite0", "kid_effnetlite0",
                "knn_accuracy", "nearest_subspace_accuracy"):
        assert key in m, key
    assert 0 < m["psnr"] < 100 and -1 <= m["ssim"] <= 1 and 0 <= m["sparsity/stage1"] <= 1
    assert m["images"] == 64 and m["fd_effnetlite0"] > 0
    assert 0 <= m["knn_accuracy"] <= 1
    html = (out / "report.html").read_text()
    for png in ("recon.png", "atoms_stage1.png", "atoms_stage2.png", "code_maps.png", "sparsity_hist.png",
                "curves.png"):  # curves: the run's MLflow history (log_every=2 over 4 steps)
        assert (out / png).stat().st_size > 100 and png in html
    assert report["trained_on"] == cfg.data.shards and report["generalisation"] is False


def test_eval_on_unseen_photos_states_both_datasets(trained_run, tmp_path):
    run_dir, _cfg = trained_run
    out = tmp_path / "unseen"
    proc = _eval(str(run_dir), "--split", "unseen", "--no-fd", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["evaluated_on"].endswith("[unseen]")
    assert "knn_accuracy" not in report["metrics"]  # the unseen photos are classes the model never saw


def test_bad_sources_give_a_message_not_a_traceback(trained_run, tmp_path):
    run_dir, _ = trained_run
    proc = _eval("no-such-run-id", "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}")
    assert proc.returncode == 2 and "neither a checkpoint path nor an MLflow run id" in proc.stderr
    assert "Traceback" not in proc.stderr

    # a checkpoint whose weights do not match the architecture its config describes
    state = load_state(find_latest(run_dir))
    state["config"]["model"]["ndf"] = 16
    save_state(state, tmp_path / "other-arch")
    proc = _eval(str(tmp_path / "other-arch"), "--no-fd")
    assert proc.returncode == 2 and "does not match the architecture" in proc.stderr

    proc = _eval(str(run_dir), "--split", "test", "--no-fd")
    assert proc.returncode == 2 and "split 'test' not in" in proc.stderr


def test_report_atoms_decode_through_the_decoder(trained_run):
    from pipeline.evaluate import load_trained
    from pipeline.report import decoded_atoms

    run_dir, _ = trained_run
    _cfg, enc, dec, _ = load_trained(str(run_dir))
    atoms = decoded_atoms(enc, dec, stage=2, count=5)
    assert atoms.shape == (5, 3, 32, 32) and torch.isfinite(atoms).all()
    assert atoms.abs().flatten(1).amax(1).gt(0).all()  # every decoded atom leaves a mark

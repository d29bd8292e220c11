"""A grey model (model.in_channels = 1) on real demo shards read as grey: the training batches, the
evaluation pass with its standard SSIM, the end-of-training evaluation, and the `cscctrl eval` report.
No training and no Ray: an initialised model is enough to run every data and picture path."""
from __future__ import annotations

import argparse
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from models import build_models
from pipeline import metrics
from pipeline.checkpoint import save_state
from pipeline.config import load_config
from sharding.manifest import read_manifest
from sharding.stream import make_eval_loader

BATCH = 16


@pytest.fixture(scope="module")
def grey_model(demo_shards, tmp_path_factory):
    """(config, encoder, decoder, checkpoint dir) of a freshly initialised 32 px grey debug model."""
    storage = tmp_path_factory.mktemp("grey-run")
    k = read_manifest(demo_shards).num_classes_in("train")
    cfg = load_config(None, [
        "model.preset=csc_ctrl_debug", "model.in_channels=1", "objective.mode=multiclass",
        f"objective.num_classes={k}", f"train.batch_size_per_worker={BATCH}", "train.eval_batches=1",
        "data.loader_workers=0", "data.shuffle_buffer=16", f"data.shards={demo_shards}",
        f"run.storage_path={storage}", "run.name=grey", "tracking.log_model=false"])
    torch.manual_seed(0)
    encoder, decoder = build_models(cfg.model)
    # BatchNorm running statistics from one train-mode pass (no gradients) over the train split: with the
    # initial ones (mean 0, variance 1) this untrained model reconstructs a constant image in eval mode.
    with torch.no_grad():
        for x, _ in make_eval_loader(demo_shards, "train", image_size=32, batch_size=64, num_workers=0, channels=1):
            decoder(encoder(x))
    ckpt = storage / "grey" / "checkpoint_step000000000"
    save_state({"config": cfg.to_dict(), "encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
                "step": 0}, ckpt)
    return cfg, encoder, decoder, ckpt


def test_training_batches_have_the_models_channels(grey_model, one_thread):
    from pipeline.worker import make_batches

    cfg, *_ = grey_model
    x, labels = next(make_batches(cfg, rank=0, world_size=1, start_step=0, device=torch.device("cpu")))
    assert x.shape == (BATCH, 1, 32, 32) and labels.shape == (BATCH,)
    synthetic = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, synthetic=True))
    x, _ = next(make_batches(synthetic, rank=0, world_size=1, start_step=0, device=torch.device("cpu")))
    assert x.shape == (BATCH, 1, 32, 32)


def test_evaluation_reports_the_standard_ssim_of_grey_reconstructions(grey_model, one_thread):
    from pipeline.evaluate import evaluate_model

    cfg, encoder, decoder, _ = grey_model
    loader = make_eval_loader(cfg.data.shards, "val", image_size=32, batch_size=BATCH, num_workers=0, channels=1)
    result = evaluate_model(encoder, decoder, loader, device=torch.device("cpu"), mode="multiclass",
                            num_classes=cfg.objective.num_classes, eps_sq=cfg.objective.eps_sq, max_batches=1)
    x, x_hat = result.example
    assert x.shape == x_hat.shape == (BATCH, 1, 32, 32) and result.metrics["images"] == BATCH
    assert x_hat.flatten(1).std(1).min() > 0.01  # reconstructions with structure, not constant images
    # eval/ssim is scikit-image's SSIM of the images mapped to [0, 1] with data range 1, averaged.
    unit = [((t.double() + 1.0) / 2.0).numpy() for t in (x, x_hat)]
    expected = np.mean([structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, channel_axis=0)
                        for a, b in zip(*unit)])
    assert result.metrics["ssim"] == pytest.approx(expected, abs=1e-4)
    old = metrics.ssim(x, x_hat, data_range=2.0).item()  # the [-1, 1], L = 2 number evaluation used to report
    assert abs(result.metrics["ssim"] - old) > 0.01, (result.metrics["ssim"], old)


class RecordingTracker:
    """What evaluate_at_end hands to MLflow, kept in memory."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.images: dict[str, Image.Image] = {}

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.metrics.update(values)

    def log_image(self, image: Image.Image, name: str) -> None:
        self.images[name] = image


def test_end_of_training_evaluation_and_training_pictures_are_grey(grey_model, one_thread):
    from pipeline.evaluate import evaluate_at_end, training_images

    cfg, encoder, decoder, _ = grey_model
    from pipeline.diagnostics import initial_dictionaries

    trainer = SimpleNamespace(raw_encoder=encoder, raw_decoder=decoder, device=torch.device("cpu"),
                              num_classes=cfg.objective.num_classes, step=0,
                              initial_atoms=initial_dictionaries(cfg.model, cfg.run.seed))
    tracker = RecordingTracker()
    out = evaluate_at_end(cfg, trainer, tracker)
    assert out["eval/images"] == BATCH and 0 < out["eval/ssim"] <= 1 and tracker.metrics == out
    assert tracker.images["eval/val_recon.png"].mode == "L"
    x = next(iter(make_eval_loader(cfg.data.shards, "val", image_size=32, batch_size=4, num_workers=0,
                                   channels=1)))[0]
    pictures = training_images(trainer, x)
    assert pictures["recon"].mode == "L" and pictures["atoms_stage1"].mode == "L"  # atoms (8, 1, 4, 4)


def test_cscctrl_eval_of_a_grey_checkpoint_writes_a_report(grey_model, tmp_path, capsys, one_thread):
    from pipeline import evaluate

    _, _, _, ckpt = grey_model
    out = tmp_path / "report"
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args([str(ckpt), "--split", "val", "--batch-size", str(BATCH), "--max-batches", "1",
                              "--device", "cpu", "--out", str(out)])
    assert evaluate.main(args) == 0, capsys.readouterr().err[-3000:]
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["images"] == BATCH and m["fd_effnetlite0"] > 0 and 0 < m["ssim"] <= 1
    assert "knn_accuracy" in m  # the reference split (train) was read as grey too
    for png, mode in (("recon.png", "L"), ("atoms_stage1.png", "L"), ("atoms_stage2.png", "L"),
                      ("code_maps.png", "RGB")):
        with Image.open(out / png) as img:
            assert img.mode == mode, png

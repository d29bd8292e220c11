"""The plain-convolution baseline (model.layer=conv) through the pipeline: the override and its errors,
a short in-process CTRL run, checkpoints of the other layer type refused by their stored config (their
tensors would load), and the evaluation report."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.checkpoint import check_architecture, save_state
from pipeline.config import ConfigError, load_config
from pipeline.trainer import CTRLTrainer
from tests.pipeline.trainer_helpers import TINY, Recorder

CONV = TINY + ["model.layer=conv"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _batches(b: int = 8):
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.rand(b, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 2, (b,), generator=g)


def _checkpoint(overrides: list[str]) -> dict:
    """What the trainer writes as a checkpoint, at step 0 (a CSC step's cold-start power iterations take
    seconds on a busy CPU; the architecture check needs none)."""
    cfg = load_config(None, overrides)
    return CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=_batches(),
                       reporter=Recorder()).state_dict()


def test_layer_is_a_config_key_with_checked_values():
    assert load_config(None, TINY).model.layer == "csc"
    assert load_config(None, CONV).model.layer == "conv"
    with pytest.raises(ConfigError, match="model.layer' must be one of 'csc', 'conv'"):
        load_config(None, ["model.layer=dense"])
    with pytest.raises(ConfigError, match="decoder_dictionaries='tied'"):
        load_config(None, ["model.preset=csc_ctrl_prototype32", "model.layer=conv"])  # a tied preset


def test_a_short_ctrl_run_with_plain_convolutions():
    cfg = load_config(None, CONV + ["train.steps=3", "train.log_every=3", "objective.mode=multiclass",
                                    "objective.num_classes=2"])
    rec = Recorder()
    tr = CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=2, batches=_batches(), reporter=rec)
    first = tr.raw_encoder.stages[0].csc.weight.detach().clone()
    tr.fit()
    step, m = rec.logged[-1]
    assert step == 3
    for key in ("encoder/objective", "decoder/objective", "train/recon_psnr"):
        assert math.isfinite(m[key]), key
    # conv outputs are dense: every stage's fraction of non-zero entries is 1
    assert all(m[f"sparsity/stage{i + 1}"] > 0.99 for i in range(cfg.model.num_stages))
    w = tr.raw_encoder.stages[0].csc.weight
    assert not torch.equal(w, first)  # the encoder moved ...
    norms = torch.linalg.vector_norm(w.detach(), dim=(1, 2, 3))
    assert not torch.allclose(norms, torch.ones_like(norms))  # ... and nothing projected it to unit norm
    assert rec.states[-1]["config"]["model"]["layer"] == "conv"


def test_a_checkpoint_of_the_other_layer_type_is_refused_by_its_config():
    csc_state = _checkpoint(TINY)
    conv_cfg = load_config(None, CONV)
    # The tensors alone do not tell: the CSC decoder's weights load into the conv decoder without complaint.
    trainer = CTRLTrainer(conv_cfg, device=torch.device("cpu"), num_classes=1, batches=_batches(),
                          reporter=Recorder())
    trainer.raw_decoder.load_state_dict(csc_state["decoder"])
    # The stored config does.
    with pytest.raises(ValueError, match=r"written by another architecture \(model\.layer: checkpoint 'csc', "
                                         r"this config 'conv'\)"):
        check_architecture(csc_state, conv_cfg.model, "ckpt")
    conv_state = _checkpoint(CONV)
    with pytest.raises(ValueError, match="model.layer: checkpoint 'conv', this config 'csc'"):
        check_architecture(conv_state, load_config(None, TINY).model)
    check_architecture(conv_state, conv_cfg.model)  # same architecture: accepted
    # a checkpoint written before model.layer existed is a CSC one
    del csc_state["config"]["model"]["layer"]
    check_architecture(csc_state, load_config(None, TINY).model)
    with pytest.raises(ValueError, match="model.layer: checkpoint 'csc'"):
        check_architecture(csc_state, conv_cfg.model)


def test_resuming_a_csc_run_as_conv_fails_with_the_reason(tmp_path):
    """The worker's resume path (local mode: the newest checkpoint under storage_path/run name)."""
    from pipeline.worker import _resume_state

    save_state(_checkpoint(TINY), tmp_path / "same-name" / "checkpoint_step000000000")
    cfg = load_config(None, CONV + [f"run.storage_path={tmp_path}", "run.name=same-name"])
    with pytest.raises(ValueError, match="checkpoint_step000000000 was written by another architecture.*model.layer"):
        _resume_state(cfg, local_mode=True)
    same = load_config(None, TINY + [f"run.storage_path={tmp_path}", "run.name=same-name"])
    assert _resume_state(same, local_mode=True)["config"]["model"]["layer"] == "csc"


def test_the_report_of_a_conv_model_speaks_of_filters(tmp_path):
    from pipeline.evaluate import evaluate_model
    from pipeline.report import write_report

    cfg = load_config(None, CONV + ["run.name=conv-report"])
    trainer = CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=_batches(), reporter=Recorder())
    enc, dec = trainer.raw_encoder, trainer.raw_decoder
    batches = _batches()
    result = evaluate_model(enc, dec, (next(batches) for _ in range(2)), device=torch.device("cpu"), mode="binary",
                            num_classes=1, eps_sq=0.5)
    assert result.metrics["sparsity/stage1"] > 0.99
    report = {"model": "test", "layer": cfg.model.layer, "trained_on": "-", "evaluated_on": "-",
              "generalisation": False, "metrics": result.metrics}
    html = write_report(tmp_path, report, enc, dec, result, cfg).read_text()
    for png in ("recon.png", "atoms_stage1.png", "atoms_stage2.png", "atoms_stage3.png", "code_maps.png",
                "sparsity_hist.png"):
        assert (tmp_path / png).stat().st_size > 100 and png in html
    assert "Stage-1 filters in pixel space" in html and "CTRL with plain convolutions evaluation" in html
    assert "atom" not in html.replace("atoms_stage", "") and "<b>layer</b>: conv" in html

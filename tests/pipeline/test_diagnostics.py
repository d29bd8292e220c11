"""The sparse-coding side of training: the stage-local dictionary loss in the encoder's step, the
per-player atom learning-rate scale, and the coding measures logged by the trainer and `cscctrl eval`
(pipeline/diagnostics.py)."""
from __future__ import annotations

import pytest
import torch

from models import build_models
from models.dictionary import dictionary_loss
from pipeline import metrics as M
from pipeline.config import ConfigError, load_config
from pipeline.diagnostics import atom_measures, code_measures, initial_dictionaries
from pipeline.trainer import CTRLTrainer, param_groups
from tests.pipeline.trainer_helpers import TINY, Recorder

GREY = TINY + ["model.in_channels=1"]


def _synthetic(b: int = 8, channels: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.rand(b, channels, 32, 32, generator=g) * 2 - 1, torch.randint(0, 2, (b,), generator=g)


def test_initial_dictionaries_rebuild_the_runs_first_atoms_without_touching_the_rng():
    cfg = load_config(None, GREY + ["run.seed=3"])
    trainer = CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=_synthetic(), reporter=Recorder())
    state = torch.get_rng_state()
    rebuilt = initial_dictionaries(cfg.model, 3)
    assert torch.equal(torch.get_rng_state(), state)
    for w0, layer in zip(rebuilt, trainer.raw_encoder.csc_layers()):
        torch.testing.assert_close(w0, layer.weight.detach())
    other = initial_dictionaries(cfg.model, 4)
    assert not torch.equal(other[0], rebuilt[0])


def test_code_measures_of_a_csc_encoder_match_a_direct_computation():
    cfg = load_config(None, GREY + ["model.n_steps_per_stage=(8,2,2,2)"])
    torch.manual_seed(0)
    encoder, _ = build_models(cfg.model)
    encoder.eval()
    x, _ = next(_synthetic(4))
    out = code_measures(encoder, x)
    _, codes, inputs = encoder.forward_stages(x)
    layers = encoder.csc_layers()
    for i in range(4):
        assert float(out[f"sparsity/stage{i + 1}"]) == pytest.approx(float((codes[i] != 0).float().mean()))
        h, z = inputs[i], codes[i]
        direct = (h - layers[i].synthesize(z, tuple(h.shape[-2:]))).norm() / h.norm()
        assert float(out[f"code/stage{i + 1}/residual"]) == pytest.approx(float(direct), rel=1e-4)
    a1z1 = layers[0].synthesize(codes[0], (32, 32)).clamp(-1, 1)
    assert float(out["code/stage1_psnr"]) == pytest.approx(float(M.psnr(a1z1, x)), rel=1e-4)
    # more unrolled steps explain more of the image: stage 1 with 8 steps beats 2
    fewer = load_config(None, GREY)
    torch.manual_seed(0)
    enc2, _ = build_models(fewer.model)
    assert float(code_measures(enc2.eval(), x)["code/stage1/residual"]) > float(out["code/stage1/residual"])


def test_conv_baseline_has_filter_measures_but_no_residual():
    cfg = load_config(None, GREY + ["model.layer=conv"])
    torch.manual_seed(0)
    encoder, _ = build_models(cfg.model)
    out = code_measures(encoder.eval(), next(_synthetic(4))[0])
    assert not any(k.startswith("code/") for k in out)
    filters = atom_measures(encoder, initial_dictionaries(cfg.model, 0))
    assert float(filters["filters/stage1/drift"]) == pytest.approx(0.0, abs=1e-6)
    assert "filters/stage1/roughness" in filters and "filters/stage1/chroma_fraction" not in filters
    assert not any(k.startswith("atoms/") for k in filters)  # the baseline has no atoms


def test_trainer_logs_the_coding_measures_and_the_mean_cosine():
    cfg = load_config(None, GREY + ["train.steps=3", "train.log_every=3", "objective.consistency_weight=0.01",
                                    "objective.rate_weight=1"])
    rec = Recorder()
    trainer = CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=_synthetic(), reporter=rec)
    trainer.fit()
    (_step, logged), = rec.logged
    for key in ("code/stage1/residual", "code/stage3/residual", "code/stage1_psnr", "atoms/stage1/roughness",
                "atoms/stage1/flat_fraction", "atoms/stage1/drift", "atoms/stage4/drift", "sparsity/stage1"):
        assert key in logged, key
    assert 0.0 < logged["atoms/stage1/drift"] < 0.5  # the atoms moved a little in 3 steps
    assert logged["train/cos_z_zhat"] == pytest.approx(1.0 - logged["decoder/consistency"] / 8)


def test_dictionary_loss_reaches_only_the_listed_stages_atoms():
    cfg = load_config(None, GREY + ["objective.dictionary_weight=1", "objective.dictionary_stages=(1,3)"])
    trainer = CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=1, batches=_synthetic(), reporter=Recorder())
    x, _ = next(_synthetic(8))
    _, codes, inputs = trainer.raw_encoder.forward_stages(x)
    layers = trainer.raw_encoder.csc_layers()
    loss = trainer.dictionary_loss(codes, inputs)
    expected = dictionary_loss(layers[0], inputs[0], codes[0]) + dictionary_loss(layers[2], inputs[2], codes[2])
    torch.testing.assert_close(loss, expected)
    trainer.encoder_opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in trainer.encoder_params]
    got = {id(p) for p, g in zip(trainer.encoder_params, grads) if g is not None and float(g.abs().sum()) > 0}
    assert got == {id(layers[0].weight), id(layers[2].weight)}


def test_bad_dictionary_settings_fail_with_the_key():
    with pytest.raises(ConfigError, match="model.layer='conv' has none"):
        load_config(None, GREY + ["model.layer=conv", "objective.dictionary_weight=1"])
    with pytest.raises(ConfigError, match="no stage 5"):
        load_config(None, GREY + ["objective.dictionary_weight=1", "objective.dictionary_stages=(1,5)"])
    with pytest.raises(ConfigError, match="numbered from 1"):
        load_config(None, GREY + ["objective.dictionary_stages=(0,)"])


def test_atom_lr_scale_steps_each_filter_at_its_size():
    cfg = load_config(None, GREY + ["model.init=dcgan"])
    torch.manual_seed(0)
    encoder, _ = build_models(cfg.model)
    params = list(encoder.parameters())
    assert param_groups(params, 1e-3, False) == [{"params": params}]
    groups = param_groups(params, 1e-3, True)
    first = encoder.csc_layers()[0].weight  # 1×4×4 unit-norm atoms: entry rms 1/4
    (g,) = [g for g in groups if any(p is first for p in g["params"])]
    assert g["lr"] == pytest.approx(1e-3 * 0.25 / 0.02, rel=1e-5)
    rest = [g for g in groups if "lr" not in g]
    assert rest and all(p.dim() != 4 for p in rest[0]["params"])
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_progress_line_shows_the_coding_measures_when_logged():
    from pipeline.worker import progress_line

    base = {"perf/images_per_s": 100.0, "perf/step_ms": 10.0, "decoder/objective": 1.0, "train/recon_psnr": 12.3}
    assert "cos(z,ẑ)" not in progress_line(10, 100, base)
    line = progress_line(10, 100, {**base, "train/cos_z_zhat": 0.913, "code/stage1/residual": 0.2,
                                   "sparsity/stage1": 0.44})
    assert "cos(z,ẑ)=0.91 residual1=0.20 nonzero1=0.44" in line


@pytest.mark.parametrize("overrides", [["model.in_channels=1"], ["model.layer=conv"], ["model.image_size=48"]],
                         ids=["csc-grey", "conv-rgb", "csc-48px"])
def test_coding_metric_names_are_what_the_measures_give(overrides):
    from pipeline.diagnostics import coding_metric_names

    cfg = load_config(None, TINY + overrides)
    torch.manual_seed(0)
    encoder, _ = build_models(cfg.model)
    s, c = cfg.model.image_size, cfg.model.in_channels
    got = set(code_measures(encoder.eval(), torch.rand(2, c, s, s) * 2 - 1))
    got |= set(atom_measures(encoder, initial_dictionaries(cfg.model, 0)))
    assert got == set(coding_metric_names(cfg.model))

"""Every registered preset: its documented architecture, and a CTRL forward + backward (encoder and
decoder, tied and separate dictionaries) at its resolution with finite outputs and gradients."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from skimage import data, transform

from models import build_models, create_model, list_presets, preset_config
from models.config import ModelConfig
from models.ctrl import ctrl_objective, ctrl_statistics
from models.decoder import Decoder
from models.encoder import Encoder
from models.presets import LAM, UnknownPresetError, register_preset

# name: (image_size, ndf, nz, decoder dictionaries, channels after each halving stage)
DOCUMENTED = {
    "csc_ctrl_32": (32, 64, 512, "separate", [64, 128, 256]),
    "csc_ctrl_prototype32": (32, 128, 512, "tied", [128, 256, 512]),
    "csc_ctrl_48": (48, 64, 128, "separate", [64, 128, 256]),
    "csc_ctrl_128": (128, 64, 128, "separate", [64, 128, 256, 512, 1024]),
    "csc_ctrl_debug": (32, 8, 16, "separate", [8, 16, 32]),
}


def test_registry_lists_the_documented_presets():
    assert list_presets() == sorted(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_preset_values_and_architecture(name):
    size, ndf, nz, dictionaries, widths = DOCUMENTED[name]
    cfg = preset_config(name)
    assert (cfg.preset, cfg.image_size, cfg.ndf, cfg.nz, cfg.decoder_dictionaries) == (name, size, ndf, nz,
                                                                                         dictionaries)
    assert preset_config(name) is not cfg  # a fresh instance every time: callers may modify it
    encoder = Encoder(cfg)
    assert [l.num_atoms for l in encoder.csc_layers()] == widths + [nz]
    assert encoder.final.kernel_size == cfg.resolutions[-1]


def test_unknown_preset_lists_the_registered_names():
    with pytest.raises(KeyError) as info:
        preset_config("csc_ctrl_64")
    message = str(info.value)
    assert message.startswith("unknown model preset 'csc_ctrl_64'")
    assert all(name in message for name in DOCUMENTED)
    assert isinstance(info.value, UnknownPresetError) and isinstance(info.value, ValueError)


def test_register_preset_rejects_duplicates():
    def csc_ctrl_debug() -> ModelConfig:
        return ModelConfig(preset="csc_ctrl_debug")

    with pytest.raises(ValueError, match="'csc_ctrl_debug' is already registered"):
        register_preset(csc_ctrl_debug)
    assert preset_config("csc_ctrl_debug").ndf == 8  # the registered one is untouched


def test_stage_lams_lower_stage_two_and_free_the_features():
    for name in DOCUMENTED:
        cfg = preset_config(name)
        assert cfg.stage_lams() == pytest.approx([LAM] + [LAM / 20] + [LAM] * (cfg.num_stages - 3) + [0.0])
        # a global λ override still reaches every thresholded stage (the sweeps rely on it)
        bigger = dataclasses.replace(cfg, lam=0.2)
        assert bigger.stage_lams() == pytest.approx([0.2, 0.01] + [0.2] * (cfg.num_stages - 3) + [0.0])
        uniform = dataclasses.replace(cfg, stage2_lam_scale=1.0, final_lam_scale=1.0)
        assert uniform.stage_lams() == pytest.approx([LAM] * cfg.num_stages)


# ----------------------------------------------------------------------------------------------
# Liveness at initialisation on real photos (scikit-image ships them)
# ----------------------------------------------------------------------------------------------


def photo_crops(size: int) -> torch.Tensor:
    """16 real-photo crops (b, 3, size, size) in [−1, 1]: 4 photos resized to 2·size, cut in quarters."""
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    crops = []
    for photo in photos:
        big = transform.resize(photo, (2 * size, 2 * size), anti_aliasing=True)
        crops += [big[i:i + size, j:j + size] for i in (0, size) for j in (0, size)]
    return torch.tensor(np.stack(crops), dtype=torch.float32).permute(0, 3, 1, 2) * 2 - 1


def stage_densities(cfg: ModelConfig, x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    torch.manual_seed(0)
    encoder = Encoder(cfg)
    with torch.no_grad():
        z, codes = encoder.forward_with_codes(x)
    return z, [(c != 0).float().mean().item() for c in codes]


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_every_stage_is_alive_at_init_on_real_photos(name):
    cfg = preset_config(name)
    x = photo_crops(cfg.image_size)
    if name == "csc_ctrl_128":
        x, cfg = x[:4], dataclasses.replace(cfg, power_iters=10)  # seconds instead of tens on a CPU
    z, densities = stage_densities(cfg, x)
    assert torch.allclose(z.norm(dim=1), torch.ones(len(x)), atol=1e-5)  # no crop maps to z = 0
    assert all(0.1 < d < 0.9 for d in densities[:-1]), densities  # sparse, alive halving stages
    assert densities[-1] == 1.0  # the features: no ℓ₁ term on the last stage (ModelConfig.final_lam_scale)


def test_uniform_lambda_kills_stage_two_of_the_prototype():
    """Why ModelConfig.stage2_lam_scale exists: with λ = 0.1 on every stage, stage 2 (fed by stage 1's un-normalised code)
    is almost entirely thresholded away and most crops get z = 0. If this test starts failing, the
    architecture changed (e.g. BatchNorm after stage 1) and the scale may no longer be needed."""
    cfg = dataclasses.replace(preset_config("csc_ctrl_prototype32"), stage2_lam_scale=1.0, final_lam_scale=1.0,
                              nonneg_features=True)
    z, densities = stage_densities(cfg, photo_crops(32))
    assert densities[1] < 0.01
    assert (z.norm(dim=1) < 0.5).sum() > 4


def ctrl_forward_backward(cfg: ModelConfig, batch: int) -> None:
    """Z = f(X), X̂ = g(Z), Ẑ = f(X̂); the binary game value; one backward into both players."""
    torch.manual_seed(0)
    encoder, decoder = build_models(cfg)
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size) * 2 - 1
    z = encoder(x)
    x_hat = decoder(z)
    z_hat = encoder(x_hat)
    assert z.shape == z_hat.shape == (batch, cfg.nz)
    assert torch.allclose(z.norm(dim=1), torch.ones(batch), atol=1e-5)
    assert x_hat.shape == x.shape and x_hat.abs().max() <= 1.0
    terms = ctrl_objective(ctrl_statistics(z, z_hat, None, 1, "binary"), "binary", 0.5)
    (terms.objective + terms.consistency).backward()
    assert torch.isfinite(terms.objective)
    for module in (encoder, decoder):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in decoder.parameters()) > 0


@pytest.mark.parametrize("dictionaries", ["separate", "tied"])
@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_preset_forward_backward(name, dictionaries):
    # 5 cold-start power steps instead of 50: the architecture is unchanged, and the step size is
    # tested in test_csc.py
    cfg = dataclasses.replace(preset_config(name), decoder_dictionaries=dictionaries, power_iters=5)
    if name == "csc_ctrl_128":
        cfg = dataclasses.replace(cfg, ndf=8)  # same stages and sizes, 64x fewer weights: seconds on a CPU
    ctrl_forward_backward(cfg, batch=2)


def test_full_size_128px_preset_forward_backward():
    ctrl_forward_backward(dataclasses.replace(preset_config("csc_ctrl_128"), power_iters=5), batch=1)


def test_create_model():
    encoder, decoder = create_model("csc_ctrl_debug")
    assert isinstance(encoder, Encoder) and isinstance(decoder, Decoder)
    assert encoder.cfg.preset == "csc_ctrl_debug" and decoder.cfg is encoder.cfg
    tied_encoder, tied_decoder = create_model("csc_ctrl_prototype32")
    assert tied_decoder.synthesis_layers()[0].dictionary is tied_encoder.final.weight


def test_wrong_image_size_for_the_preset():
    encoder, _ = create_model("csc_ctrl_48")
    with pytest.raises(ValueError, match=r"encoder expects \(b, 3, 48, 48\) images, got \(2, 3, 32, 32\)"):
        encoder(torch.zeros(2, 3, 32, 32))

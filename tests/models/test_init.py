"""models/init.py: ModelConfig.init ('torch' | 'dcgan') and ModelConfig.decoder_bn_gamma."""
import pytest
import torch
from torch import nn

from models import ModelConfig, build_models


def _bns(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_dcgan_init_draws_conv_weights_at_std_002_and_bn_gamma_near_one():
    torch.manual_seed(0)
    enc, dec = build_models(ModelConfig(layer="conv", init="dcgan", ndf=16, nz=32))
    weights = torch.cat([p.detach().flatten() for p in list(enc.parameters()) + list(dec.parameters())
                         if p.dim() == 4])
    assert weights.numel() > 50_000
    assert weights.mean().abs() < 1e-3
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    gammas = torch.cat([m.weight.detach() for m in _bns(enc) + _bns(dec)])
    betas = torch.cat([m.bias.detach() for m in _bns(enc) + _bns(dec)])
    assert gammas.mean().item() == pytest.approx(1.0, abs=0.01)
    assert 0.01 < gammas.std().item() < 0.03
    assert torch.all(betas == 0)


def test_torch_init_is_the_layers_own_draw():
    torch.manual_seed(0)
    enc, _ = build_models(ModelConfig(layer="conv", init="torch", ndf=16, nz=32))
    w = enc.stages[1].csc.weight.detach()  # U(−b, b), b = 1/√(16·4·4): std b/√3 ≈ 0.036
    bound = 1.0 / (16 * 4 * 4) ** 0.5
    assert w.abs().max() <= bound
    assert w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    assert all(torch.all(m.weight == 1) for m in _bns(enc))


def test_dcgan_init_keeps_csc_atoms_unit_norm_after_projection():
    torch.manual_seed(0)
    enc, dec = build_models(ModelConfig(init="dcgan", ndf=8, nz=16))
    # Unit norm straight after building (before any forward): the optimizer's per-tensor learning-rate
    # scale and the drift measures read these weights.
    layers = enc.csc_layers() + dec.synthesis_layers()
    for layer in layers:
        atoms = layer.weight.detach().flatten(1)
        torch.testing.assert_close(atoms.norm(dim=1), torch.ones(len(atoms)), atol=1e-5, rtol=0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    dec(enc(x))  # forwards keep them so
    for layer in layers:
        atoms = layer.weight.detach().flatten(1)
        torch.testing.assert_close(atoms.norm(dim=1), torch.ones(len(atoms)), atol=1e-5, rtol=0)


def test_decoder_bn_gamma_sets_every_decoder_batchnorm_and_only_those():
    torch.manual_seed(0)
    enc, dec = build_models(ModelConfig(init="dcgan", ndf=8, nz=16, decoder_bn_gamma=0.1))
    assert _bns(dec) and all(torch.all(m.weight == 0.1) and torch.all(m.bias == 0) for m in _bns(dec))
    assert all(abs(m.weight.mean().item() - 1.0) < 0.05 for m in _bns(enc))


def test_small_decoder_bn_gamma_starts_the_tanh_unsaturated():
    """With unit-norm atoms and γ = 1 a large share of x̂ sits at the Tanh's rails; with γ = 0.1 none does."""
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    saturated = {}
    for gamma in (1.0, 0.1):
        torch.manual_seed(0)
        enc, dec = build_models(ModelConfig(ndf=16, nz=32, decoder_bn_gamma=gamma))
        with torch.no_grad():
            saturated[gamma] = (dec(enc(x)).abs() > 0.9).float().mean().item()
    assert saturated[1.0] > 0.05
    assert saturated[0.1] == 0.0


@pytest.mark.parametrize("kwargs, match", [({"init": "xavier"}, "model.init"),
                                           ({"decoder_bn_gamma": 0.0}, "decoder_bn_gamma")])
def test_bad_init_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)

"""The "CTRL with plain convolutions" baseline (ModelConfig.layer = "conv", models/conv.py): the networks
equal a conv2d / conv_transpose2d chain written out here, have the CSC model's shapes and parameter count,
keep the output contracts (z on the sphere, x̂ in [−1, 1] at the image size), and nothing normalises
their weights."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models import build_models, list_presets, preset_config
from models.config import ModelConfig
from models.conv import ConvLayer, ConvTransposeLayer
from models.csc import CSCLayer, SynthesisLayer, refresh_dictionaries


def conv_cfg(**kwargs) -> ModelConfig:
    base = dict(image_size=32, ndf=4, nz=8, layer="conv")
    base.update(kwargs)
    return ModelConfig(**base)


def images(cfg: ModelConfig, b: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1


def randomise_(module: torch.nn.Module, seed: int = 1) -> None:
    """Fixed, non-trivial values for every parameter (weights and BatchNorm affine parameters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def test_the_conv_encoder_is_a_conv2d_chain():
    """f(x) = normalise(conv_L(… LeakyReLU(BN(conv_2(LeakyReLU(conv_1 x)))) …)), written out with F."""
    cfg = conv_cfg()
    torch.manual_seed(0)
    encoder, _ = build_models(cfg)
    randomise_(encoder)
    x = images(cfg)
    z, codes = encoder.forward_with_codes(x)

    h, expected_codes = x, []
    for i, stage in enumerate(encoder.stages):
        y = F.conv2d(h, stage.csc.weight, stride=2, padding=1)  # k4 s2 p1, no bias
        expected_codes.append(y)
        if i > 0:  # train-mode BatchNorm: the batch's moments
            y = F.batch_norm(y, None, None, stage.norm.weight, stage.norm.bias, training=True, eps=stage.norm.eps)
        h = F.leaky_relu(y, 0.2)
    y = F.conv2d(h, encoder.final.weight, stride=1, padding=0)  # valid k4: 4×4 → 1×1
    expected_codes.append(y)
    expected_z = y.flatten(1) / y.flatten(1).norm(dim=1, keepdim=True)

    assert len(codes) == len(expected_codes) == cfg.num_stages
    for c, e in zip(codes, expected_codes):
        torch.testing.assert_close(c, e)
    torch.testing.assert_close(z, expected_z)


def test_the_conv_decoder_is_a_conv_transpose2d_chain():
    """g(z) = tanh(convT_1(… ReLU(BN(convT_L z)) …)), written out with F (every output padding is 0 here:
    1 → 4 with k4 s1 p0, then h → 2h with k4 s2 p1)."""
    cfg = conv_cfg()
    torch.manual_seed(0)
    _, decoder = build_models(cfg)
    randomise_(decoder)
    g = torch.Generator().manual_seed(2)
    z = F.normalize(torch.randn(3, cfg.nz, generator=g), dim=1)

    h = z[:, :, None, None]
    for i, stage in enumerate(decoder.stages):
        stride, padding = (1, 0) if i == 0 else (2, 1)
        h = F.conv_transpose2d(h, stage.synthesis.weight, stride=stride, padding=padding)
        if i < len(decoder.stages) - 1:
            h = F.relu(F.batch_norm(h, None, None, stage.norm.weight, stage.norm.bias, training=True,
                                    eps=stage.norm.eps))
        else:
            h = torch.tanh(h)
    torch.testing.assert_close(decoder(z), h)


@pytest.mark.parametrize("preset", ["csc_ctrl_debug", "csc_ctrl_48", "csc_ctrl_128"])
def test_conv_networks_have_the_csc_stage_shapes_and_output_contracts(preset):
    """Same code shapes at every stage as the CSC model; z on the unit sphere; x̂ in [−1, 1] at the image size.
    (ndf 2 keeps the 128 px case cheap.)"""
    csc = dataclasses.replace(preset_config(preset), ndf=2)
    conv = dataclasses.replace(csc, layer="conv")
    torch.manual_seed(0)
    csc_enc, _ = build_models(csc)
    encoder, decoder = build_models(conv)
    x = images(conv, b=2)
    z, codes = encoder.forward_with_codes(x)
    _, csc_codes = csc_enc.forward_with_codes(x)
    assert [c.shape for c in codes] == [c.shape for c in csc_codes]
    assert all(isinstance(l, ConvLayer) for l in encoder.csc_layers())
    assert all(isinstance(l, ConvTransposeLayer) for l in decoder.synthesis_layers())
    assert z.shape == (2, conv.nz)
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-6)
    assert (codes[0] != 0).float().mean() > 0.99  # dense: plain convolutions do not shrink
    x_hat = decoder(z)
    assert x_hat.shape == x.shape
    assert x_hat.abs().max() <= 1.0 and torch.isfinite(x_hat).all()


@pytest.mark.parametrize("size", [28, 40])
def test_odd_final_sides_come_out_exact(size):
    cfg = conv_cfg(image_size=size, ndf=2)
    encoder, decoder = build_models(cfg)
    x = images(cfg, b=2)
    assert decoder(encoder(x)).shape == x.shape


@pytest.mark.parametrize("preset", sorted(list_presets()))
def test_same_parameter_count_and_shapes_as_the_csc_model(preset):
    """Every CSC weight (M, C, k, k) becomes a conv weight of that shape; neither has a bias. The decoders'
    state dicts even coincide key for key, which is why checkpoints are told apart by their config."""
    csc = dataclasses.replace(preset_config(preset), decoder_dictionaries="separate")  # conv cannot be tied
    conv = dataclasses.replace(csc, layer="conv")
    torch.manual_seed(0)
    (ce, cd), (ve, vd) = build_models(csc), build_models(conv)

    def shapes(m):
        return [(name, tuple(p.shape)) for name, p in m.named_parameters()]

    assert shapes(ve) == shapes(ce) and shapes(vd) == shapes(cd)
    assert sum(p.numel() for p in ve.parameters()) == sum(p.numel() for p in ce.parameters())
    assert sum(p.numel() for p in vd.parameters()) == sum(p.numel() for p in cd.parameters())
    assert {k: v.shape for k, v in vd.state_dict().items()} == {k: v.shape for k, v in cd.state_dict().items()}
    # the encoder differs only by the CSC layers' step-size record (a buffer, not a parameter)
    extra = set(ce.state_dict()) - set(ve.state_dict())
    assert extra and all(k.endswith(".lipschitz") for k in extra) and set(ve.state_dict()) <= set(ce.state_dict())


def test_nothing_normalises_conv_weights():
    """refresh_dictionaries is a no-op on conv networks (no unit-norm projection, no power iteration), and so
    are the forward passes' update_atoms steps; on a CSC network it projects every atom."""
    cfg = conv_cfg()
    torch.manual_seed(0)
    encoder, decoder = build_models(cfg)
    with torch.no_grad():
        for p in list(encoder.parameters()) + list(decoder.parameters()):
            if p.dim() == 4:
                p.mul_(3.0)
    before = [p.detach().clone() for p in list(encoder.parameters()) + list(decoder.parameters())]
    assert refresh_dictionaries(encoder) == 0 and refresh_dictionaries(decoder) == 0
    decoder(encoder(images(cfg)))
    after = list(encoder.parameters()) + list(decoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    norms = torch.linalg.vector_norm(encoder.stages[0].csc.weight, dim=(1, 2, 3))
    assert not torch.allclose(norms, torch.ones_like(norms))  # not unit norm, and left so
    assert not any(isinstance(m, (CSCLayer, SynthesisLayer)) for m in list(encoder.modules()) + list(decoder.modules()))

    csc_encoder, _ = build_models(dataclasses.replace(cfg, layer="csc"))
    with torch.no_grad():
        csc_encoder.final.weight.mul_(3.0)
    assert refresh_dictionaries(csc_encoder) == cfg.num_stages
    torch.testing.assert_close(torch.linalg.vector_norm(csc_encoder.final.weight, dim=(1, 2, 3)), torch.ones(cfg.nz))


def test_conv_networks_train_by_gradient():
    """Both players' weights receive gradients through the plain layers (f twice in one graph, as in CTRL)."""
    cfg = conv_cfg()
    torch.manual_seed(0)
    encoder, decoder = build_models(cfg)
    x = images(cfg)
    z = encoder(x)
    z_hat = encoder(decoder(z))
    (z * z_hat).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())


def test_conv_with_tied_dictionaries_or_an_unknown_layer_is_rejected():
    with pytest.raises(ValueError, match="model.layer='conv' cannot have model.decoder_dictionaries='tied'"):
        ModelConfig(layer="conv", decoder_dictionaries="tied")
    with pytest.raises(ValueError, match="model.layer='dense'.*'csc'.*'conv'"):
        ModelConfig(layer="dense")
    with pytest.raises(ValueError, match="tied"):
        dataclasses.replace(preset_config("csc_ctrl_prototype32"), layer="conv")  # a tied preset

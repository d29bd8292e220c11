"""Encoder f and decoder g: stage structure per resolution, output contracts, tied vs separate
dictionaries, the CTRL alternation (f used twice per graph, optimizer steps, refresh), errors."""
from __future__ import annotations

import pytest
import torch

from models import build_decoder, build_encoder, build_models
from models.config import ModelConfig
from models.csc import CSCLayer, SynthesisLayer, refresh_dictionaries
from models.ctrl import ctrl_objective, ctrl_statistics


def tiny(**kwargs) -> ModelConfig:
    base = dict(image_size=32, ndf=4, nz=8)
    base.update(kwargs)
    return ModelConfig(**base)


def images(cfg: ModelConfig, b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1


@pytest.mark.parametrize("size,sides,final_kernel", [
    (32, [16, 8, 4], 4),
    (48, [24, 12, 6], 6),
    (128, [64, 32, 16, 8, 4], 4),
    (28, [14, 7], 7),          # Fashion-MNIST's native size: an odd final side
    (40, [20, 10, 5], 5),
])
def test_encoder_stages_follow_the_resolution_table(size, sides, final_kernel):
    cfg = tiny(image_size=size, ndf=2)
    torch.manual_seed(0)
    encoder, decoder = build_models(cfg)
    z, codes = encoder.forward_with_codes(images(cfg))
    widths = [2 * 2 ** i for i in range(len(sides))]
    assert [tuple(c.shape) for c in codes] == [(2, w, s, s) for w, s in zip(widths, sides)] + [(2, 8, 1, 1)]
    assert encoder.final.kernel_size == final_kernel and encoder.final.stride == 1 and encoder.final.padding == 0
    assert all((l.kernel_size, l.stride, l.padding) == (4, 2, 1) for l in encoder.csc_layers()[:-1])
    # stage 1: CSC → LeakyReLU(0.2), later stages CSC → BatchNorm → LeakyReLU(0.2)
    assert isinstance(encoder.stages[0].norm, torch.nn.Identity)
    assert all(isinstance(s.norm, torch.nn.BatchNorm2d) for s in encoder.stages[1:])
    assert all(s.act.negative_slope == 0.2 for s in encoder.stages)
    x_hat = decoder(z)
    assert x_hat.shape == (2, 3, size, size)
    # the decoder mirrors the encoder: output sides final → … → size
    assert [st.out_size for st in decoder.stages] == [final_kernel] + sides[-2::-1] + [size]


def test_encoder_output_contract():
    cfg = tiny(nonneg=True)
    torch.manual_seed(1)
    encoder = build_encoder(cfg)
    z, codes = encoder.forward_with_codes(images(cfg, b=3))
    assert z.shape == (3, 8)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-6)  # on the unit sphere
    assert torch.equal(encoder(images(cfg, b=3)), z)
    assert all((c >= 0).all() for c in codes[:-1])  # non-negative codes at every halving stage
    assert (codes[-1] < 0).any() and (codes[-1] != 0).all()  # features: signed, unthresholded (defaults)
    assert 0 < (codes[0] == 0).float().mean() < 1  # sparse, not dead
    alike = build_encoder(tiny(nonneg=True, nonneg_features=True, final_lam_scale=1.0))
    assert all((c >= 0).all() for c in alike.forward_with_codes(images(cfg, b=3))[1])  # every stage alike
    signed = build_encoder(tiny(nonneg=False))
    _, signed_codes = signed.forward_with_codes(images(cfg))
    assert (signed_codes[0] < 0).any()


def test_lam_per_stage_and_solver_settings_reach_the_layers():
    cfg = tiny(lam_per_stage=(0.0, 0.05, 0.1, 0.2), n_steps=3, mu=0.01, solver="ista", power_iters=7,
               power_iters_warm=2)
    layers = build_encoder(cfg).csc_layers()
    assert [l.lam for l in layers] == [0.0, 0.05, 0.1, 0.2]
    assert all((l.n_steps, l.mu, l.solver, l.power_iters, l.power_iters_warm) == (3, 0.01, "ista", 7, 2)
               for l in layers)


def test_n_steps_per_stage_reaches_each_layer_and_is_checked():
    layers = build_encoder(tiny(n_steps_per_stage=(10, 2, 3, 1))).csc_layers()
    assert [l.n_steps for l in layers] == [10, 2, 3, 1]
    assert [l.n_steps for l in build_encoder(tiny(n_steps=4)).csc_layers()] == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="n_steps_per_stage has 2 values"):
        tiny(n_steps_per_stage=(10, 2))
    with pytest.raises(ValueError, match="must be >= 1"):
        tiny(n_steps_per_stage=(10, 0, 2, 2))


def test_decoder_output_contract_separate():
    cfg = tiny()
    torch.manual_seed(2)
    encoder, decoder = build_models(cfg)
    z = encoder(images(cfg))
    x_hat = decoder(z)
    assert x_hat.shape == (2, 3, 32, 32)
    assert x_hat.abs().max() <= 1.0
    layers = decoder.synthesis_layers()
    assert all(l.tied_to is None for l in layers)
    # own unit-norm dictionaries mirroring the encoder's shapes, no parameter shared with the encoder
    for syn, csc in zip(layers, reversed(encoder.csc_layers())):
        assert syn.weight.shape == csc.weight.shape
        assert torch.allclose(syn.weight.flatten(1).norm(dim=1), torch.ones(syn.num_atoms), atol=1e-6)
    enc_ids = {id(p) for p in encoder.parameters()}
    assert not enc_ids & {id(p) for p in decoder.parameters()}
    assert decoder.own_parameters() == list(decoder.parameters())


def test_tied_decoder_reuses_encoder_dictionaries():
    cfg = tiny(decoder_dictionaries="tied")
    torch.manual_seed(3)
    encoder, decoder = build_models(cfg)
    for syn, csc in zip(decoder.synthesis_layers(), reversed(encoder.csc_layers())):
        assert syn.dictionary is csc.weight
    own = decoder.own_parameters()
    batch_norms = [m for m in decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in own} == {id(p) for m in batch_norms for p in (m.weight, m.bias)}
    assert not {id(p) for p in encoder.parameters()} & {id(p) for p in own}
    assert not any(key.endswith("synthesis.weight") for key in decoder.state_dict())
    # the decoder's output depends on the encoder's atoms: gradient reaches them through g
    encoder.zero_grad()
    decoder(encoder(images(cfg)).detach()).pow(2).sum().backward()
    assert encoder.stages[0].csc.weight.grad.abs().sum() > 0


def test_tied_decoder_configuration_errors():
    encoder = build_encoder(tiny())
    with pytest.raises(ValueError, match=r"needs the encoder"):
        build_decoder(tiny(decoder_dictionaries="tied"))
    with pytest.raises(ValueError, match=r"ngf == ndf.*ngf=8, ndf=4"):
        build_decoder(tiny(decoder_dictionaries="tied", ngf=8), encoder)
    assert build_decoder(tiny(ngf=8)).stages[-1].synthesis.num_atoms == 8  # separate: any width


def test_input_shape_errors():
    encoder, decoder = build_models(tiny())
    with pytest.raises(ValueError, match=r"encoder expects \(b, 3, 32, 32\) images, got \(2, 1, 28, 28\)"):
        encoder(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"encoder expects \(b, 3, 32, 32\) images, got \(3, 32, 32\)"):
        encoder(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"decoder expects z of shape \(b, 8\), got \(2, 8, 1, 1\)"):
        decoder(torch.zeros(2, 8, 1, 1))


@pytest.mark.parametrize("dictionaries", ["separate", "tied"])
def test_ctrl_alternation_runs_and_keeps_dictionaries_unit_norm(dictionaries):
    """Two CTRL iterations as the trainer runs them: the encoder step (Ẑ = f(g(Z) without graph)), then the
    decoder step through the whole loop; f is applied twice per graph; refresh after every step."""
    cfg = tiny(decoder_dictionaries=dictionaries)
    torch.manual_seed(4)
    encoder, decoder = build_models(cfg)
    encoder_opt = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    decoder_opt = torch.optim.Adam(decoder.own_parameters(), lr=1e-2)
    x = images(cfg, b=8)
    values = []
    for _ in range(2):
        z = encoder(x)
        with torch.no_grad():
            x_hat = decoder(z)
        terms = ctrl_objective(ctrl_statistics(z, encoder(x_hat), None, 1, "binary"), "binary", 0.5)
        encoder_opt.zero_grad()
        (-terms.objective).backward()
        encoder_opt.step()
        assert refresh_dictionaries(encoder) == cfg.num_stages

        with torch.no_grad():
            z = encoder(x)
        terms = ctrl_objective(ctrl_statistics(z, encoder(decoder(z)), None, 1, "binary"), "binary", 0.5)
        decoder_opt.zero_grad()
        terms.objective.backward(inputs=decoder.own_parameters())
        decoder_opt.step()
        assert refresh_dictionaries(decoder) == cfg.num_stages
        values.append(terms.objective.item())
    assert all(torch.isfinite(torch.tensor(values)))
    atoms = [l.weight for l in encoder.csc_layers()] + [l.dictionary for l in decoder.synthesis_layers()]
    for w in atoms:
        assert torch.allclose(w.detach().flatten(1).norm(dim=1), torch.ones(w.shape[0]), atol=1e-5)
    assert all(isinstance(l, CSCLayer) for l in encoder.csc_layers())
    assert all(isinstance(l, SynthesisLayer) for l in decoder.synthesis_layers())



def test_networks_refresh_changed_dictionaries_by_themselves():
    """Without refresh_dictionaries after an optimizer step, the next forward of f (and of a tied g, whose
    atoms are f's) projects the changed atoms and re-estimates the step sizes before computing."""
    cfg = tiny(decoder_dictionaries="tied")
    torch.manual_seed(6)
    encoder, decoder = build_models(cfg)
    x = images(cfg, b=4)
    encoder(x)[:, 0].sum().backward()  # (‖z‖² would be constant: rows are unit-norm)
    torch.optim.SGD(encoder.parameters(), lr=1.0).step()
    layers = encoder.csc_layers()
    before = [l.lipschitz.clone() for l in layers]
    assert any(not torch.allclose(l.weight.flatten(1).norm(dim=1), torch.ones(l.num_atoms)) for l in layers)
    decoder(torch.nn.functional.normalize(torch.randn(2, cfg.nz), dim=1))  # tied: projects f's atoms
    for l in layers:
        assert torch.allclose(l.weight.detach().flatten(1).norm(dim=1), torch.ones(l.num_atoms), atol=1e-6)
    with torch.no_grad():
        encoder(x)  # re-estimates L for the new atoms
    assert all(not torch.equal(l.lipschitz, b) for l, b in zip(layers, before))


def test_encoder_and_decoder_compile_to_one_graph_each():
    """The per-forward bookkeeping (atoms, step sizes) runs before the traced region, so torch.compile sees
    each network as one graph without breaks (per-layer breaks made dynamo recompile per stage)."""
    cfg = tiny(decoder_dictionaries="tied")
    torch.manual_seed(5)
    encoder, decoder = build_models(cfg)
    x = images(cfg)
    for module, arg in ((encoder, x), (decoder, encoder(x).detach())):
        explanation = torch._dynamo.explain(module)(arg)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()


def test_nonneg_features_switch_reaches_only_the_final_stage():
    from models.config import ModelConfig
    from models.encoder import Encoder

    enc = Encoder(ModelConfig(image_size=32, ndf=4, nz=8, nonneg_features=False))
    layers = enc.csc_layers()
    assert all(layer.nonneg for layer in layers[:-1]) and not layers[-1].nonneg
    torch.manual_seed(0)
    z = enc(torch.rand(16, 3, 32, 32) * 2 - 1)
    assert (z < 0).any()  # signed features: the whole sphere, not its positive orthant

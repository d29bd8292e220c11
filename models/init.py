"""Weight initialisation of the encoder and decoder (``ModelConfig.init``, ``ModelConfig.decoder_bn_gamma``).

'torch' keeps what the layers draw themselves: CSC dictionaries and plain (transposed) convolutions
U(−b, b) with b = 1/√fan_in (kaiming_uniform, a = √5), BatchNorm γ = 1, β = 0.
'dcgan' is the initialisation of the DCGAN paper that LDR (the authors' CTRL code) applies to its MNIST
networks: every convolution / dictionary weight ~ N(0, 0.02²), BatchNorm γ ~ N(1, 0.02²), β = 0.
CSC dictionaries are projected to unit-norm atoms before every forward, so for them only the direction
of each atom matters (a Gaussian draw gives uniformly random directions); the scale matters for the
plain-convolution baseline (``layer='conv'``), whose weights are free.
"""
from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.csc import refresh_dictionaries


@torch.no_grad()
def dcgan_init_(module: nn.Module, std: float = 0.02) -> None:
    """Re-draw ``module``'s 4-d weights ~ N(0, std²) and its BatchNorm affine parameters γ ~ N(1, std²),
    β = 0, in place. A tied decoder registers no dictionaries of its own, so its encoder's are drawn once."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                m.weight.normal_(1.0, std)
                m.bias.zero_()
            continue
        weight = m._parameters.get("weight")
        if weight is not None and weight.dim() == 4:
            weight.normal_(0.0, std)


@torch.no_grad()
def init_models_(encoder: nn.Module, decoder: nn.Module, cfg: ModelConfig) -> None:
    """Apply ``cfg.init`` to both networks, then set every decoder BatchNorm's γ to ``cfg.decoder_bn_gamma``."""
    if cfg.init == "dcgan":
        dcgan_init_(encoder)
        dcgan_init_(decoder)
        # The re-drawn dictionaries are unit-normed now, not at the first forward: whoever reads the
        # weights before it (the optimizer's per-tensor scale, the atoms' drift from initialisation)
        # must see the atoms the network synthesises with.
        refresh_dictionaries(encoder)
        refresh_dictionaries(decoder)
    if cfg.decoder_bn_gamma != 1.0:
        for m in decoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.fill_(cfg.decoder_bn_gamma)

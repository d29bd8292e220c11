"""The decoder g of CSC-CTRL: a stack of sparse deconvolutions mirroring the encoder (docs/method.md §3).

    z (b, nz) → (b, nz, 1, 1)
      ── Synthesis(k = final side, s1 p0) → BatchNorm → ReLU           nz → ngf·2^(m−1) at the final side
      ── Synthesis(k4 s2 p1) → BatchNorm → ReLU                        halving the channels, doubling the side
      ── …
      ── Synthesis(k4 s2 p1) → Tanh                                    ngf → C at S×S;  x̂ ∈ [−1, 1]

Every synthesis stage is x = A z = conv_transpose2d(z, W, …) with unit-norm atoms (models.csc.SynthesisLayer)
and an explicit output size (output padding derived from it), so odd or non-power-of-two sizes come out
exact. Dictionaries: 'separate' (default) gives the decoder its own atoms, a true second player as in CTRL;
'tied' synthesises stage j with the matching encoder CSCLayer's dictionary A_l (shape (M_l, C_l, k, k):
M_l atoms back to C_l channels, exactly the synthesis operator of that layer), as in the authors' prototype.
Tied decoders then own only their BatchNorm affine parameters. With ``ModelConfig.layer = "conv"`` (the
plain-convolution baseline) every synthesis stage is a ``models.conv.ConvTransposeLayer`` of the same shape,
whose weights are not normalised; the rest of the stack is unchanged.
"""
from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.conv import ConvTransposeLayer
from models.csc import CSCLayer, SynthesisLayer
from models.encoder import Encoder, encoder_widths


def make_synthesis_layer(cfg: ModelConfig, num_atoms: int, out_channels: int, kernel_size: int, stride: int,
                         padding: int, tied_to: CSCLayer | None = None) -> SynthesisLayer | ConvTransposeLayer:
    """A decoder layer of ``cfg.layer``: a SynthesisLayer (own unit-norm atoms, or ``tied_to``'s), or for the
    baseline ``cfg.layer == "conv"`` a ConvTransposeLayer of the same shape (ModelConfig rejects conv + tied)."""
    if cfg.layer == "conv":
        return ConvTransposeLayer(num_atoms, out_channels, kernel_size, stride, padding)
    return SynthesisLayer(num_atoms, out_channels, kernel_size, stride, padding, tied_to=tied_to)


class DecoderStage(nn.Module):
    """Synthesis to an explicit output size → (BatchNorm → ReLU | Tanh). The owning decoder updates the atoms of the
    synthesis layer (unit-norm atoms) before calling it."""

    def __init__(self, synthesis: SynthesisLayer | ConvTransposeLayer, out_size: int, last: bool) -> None:
        super().__init__()
        self.synthesis = synthesis
        self.out_size = out_size
        self.norm: nn.Module = nn.Identity() if last else nn.BatchNorm2d(synthesis.out_channels)
        self.act: nn.Module = nn.Tanh() if last else nn.ReLU()

    def forward(self, z: Tensor) -> Tensor:
        return self.act(self.norm(self.synthesis.synthesize(z, self.out_size)))


class Decoder(nn.Module):
    """g: features z (b, nz) → images x̂ (b, C, S, S) in [−1, 1]; its stages synthesise with CSC dictionaries
    or, with model.layer=conv, transposed convolutions (``make_synthesis_layer``)."""

    def __init__(self, cfg: ModelConfig, encoder: Encoder | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        tied = cfg.decoder_dictionaries == "tied"
        if tied:
            if not isinstance(encoder, Encoder):
                raise ValueError("decoder_dictionaries='tied' needs the encoder whose dictionaries the decoder "
                                 f"reuses: pass Decoder(cfg, encoder), got encoder={type(encoder).__name__}")
            if cfg.decoder_width != cfg.ndf:
                raise ValueError(f"decoder_dictionaries='tied' needs ngf == ndf (the decoder reuses the encoder's "
                                 f"dictionaries), got ngf={cfg.ngf}, ndf={cfg.ndf}")
            # CSCLayers: ModelConfig rejects layer='conv' with tied dictionaries
            encoder_layers: list[CSCLayer | None] = [cast(CSCLayer, layer) for layer in encoder.csc_layers()]
        elif cfg.decoder_dictionaries != "separate":
            raise ValueError(f"decoder_dictionaries must be 'separate' or 'tied', got {cfg.decoder_dictionaries!r}")
        else:
            encoder_layers = [None] * cfg.num_stages

        resolutions = cfg.resolutions
        widths = encoder_widths(cfg, cfg.decoder_width)  # channels at resolutions[1], resolutions[2], …
        # Mirror order: the final 1×1 stage first, then the halving stages from deep to shallow.
        stages = [DecoderStage(make_synthesis_layer(cfg, cfg.nz, widths[-1], resolutions[-1], 1, 0,
                                                    tied_to=encoder_layers[-1]),
                               out_size=resolutions[-1], last=False)]
        for j in reversed(range(len(widths))):
            out_channels = widths[j - 1] if j > 0 else cfg.in_channels
            synthesis = make_synthesis_layer(cfg, widths[j], out_channels, 4, 2, 1, tied_to=encoder_layers[j])
            stages.append(DecoderStage(synthesis, out_size=resolutions[j], last=j == 0))
        self.stages = nn.ModuleList(stages)

    @property
    def tied(self) -> bool:
        return self.cfg.decoder_dictionaries == "tied"

    def own_parameters(self) -> list[nn.Parameter]:
        """The parameters the decoder's optimizer should step: its own dictionaries (separate) and BatchNorm
        affine parameters. A tied decoder's dictionaries belong to the encoder and are not registered
        here, so this equals ``list(self.parameters())``; it is spelled out for the trainer's intent."""
        return list(self.parameters())

    def synthesis_layers(self) -> list[SynthesisLayer | ConvTransposeLayer]:
        """The synthesis layers in decoder order (1×1 → image); for the baseline (cfg.layer == "conv") the
        ConvTransposeLayers in their place."""
        return [cast(DecoderStage, stage).synthesis for stage in self.stages]

    @torch.compiler.disable  # Python-side bookkeeping, once per forward: the stages then form one graph
    def update_atoms(self) -> None:
        """Project every dictionary whose atoms changed (a tied one through its encoder layer)."""
        for layer in self.synthesis_layers():
            layer.update_atoms()

    def forward(self, z: Tensor) -> Tensor:
        """x̂ = g(z): z (b, nz) → x̂ (b, C, S, S) in [−1, 1]."""
        if z.dim() != 2 or z.shape[1] != self.cfg.nz:
            raise ValueError(f"decoder expects z of shape (b, {self.cfg.nz}), got {tuple(z.shape)}")
        self.update_atoms()
        h = z[:, :, None, None]
        for stage in self.stages:
            h = stage(h)
        return h

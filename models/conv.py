"""Plain convolutions in place of the CSC layers: the "CTRL with plain convolutions" baseline.

``ModelConfig.layer = "conv"`` builds the same encoder and decoder as CSC-CTRL (same stages, kernels,
strides, paddings, widths, BatchNorm, activations, normalisation of z onto the sphere, same CTRL game)
with every CSC stage replaced by an ordinary convolution and every synthesis stage by an ordinary
transposed convolution. Comparing the two on the same data and budget isolates what convolutional sparse
coding adds (issue #7 item 4). The layers below have the interface the encoder and decoder call on
``models.csc.CSCLayer`` / ``SynthesisLayer`` (``update_atoms``, ``solve`` / ``synthesize``, ``weight``,
``num_atoms``, ``out_channels``): only the construction (``make_analysis_layer``, ``make_synthesis_layer``)
looks at ``layer``, the forward passes are the same code.

| CSC stage (models/csc.py)                              | this module                                   |
|--------------------------------------------------------|-----------------------------------------------|
| z = P(ηAᵀx), then n − 1 proximal-gradient steps        | y = Aᵀx = conv2d(x, W, s, p): one linear map  |
| A z = conv_transpose2d(z, W, s, p, o), unit-norm atoms | the same map, W free (not normalised)         |
| weight (M, C, k, k), no bias                           | weight (M, C, k, k), no bias                  |
| λ, μ, n, nonneg, solver, L (power iteration)           | none                                          |

The parameters have exactly the CSC networks' names and shapes (neither has a bias), so a conv model of a
config has the CSC model's parameter count; the decoders' state dicts even coincide key for key (the CSC
encoder adds only its step-size buffers). A checkpoint's stored config, not its tensors, tells the two
apart (pipeline/checkpoint.py ``check_architecture``). Outputs are dense (fraction of non-zero entries
≈ 1), which the sparsity metrics then show.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.csc import synthesize_with


def _check_sizes(kind: str, **values: int) -> None:
    for name, value in values.items():
        low = 0 if name == "padding" else 1
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{kind} {name} must be an int >= {low}, got {value!r}")


def _reset_uniform_(weight: Tensor) -> None:
    """torch.nn's default initialisation of Conv2d / ConvTranspose2d weights: U(−b, b), b = 1/√(W.shape[1]·k²)
    (kaiming_uniform_ with a = √5). Atom norms start near 1/√3, the scale of the CSC layers' unit atoms."""
    bound = 1.0 / math.sqrt(weight.shape[1] * weight.shape[2] * weight.shape[3])
    with torch.no_grad():
        weight.uniform_(-bound, bound)


class ConvLayer(nn.Module):
    """An ordinary bias-free convolution y = conv2d(x, W, stride=s, padding=p), in place of a CSCLayer.

    Shapes: x (b, in_channels, H, W) → y (b, out_channels, H_y, W_y), H_y = ⌊(H + 2p − k)/s⌋ + 1 (the size
    of the CSC code). ``weight`` (out_channels, in_channels, k, k) is the shape of CSCLayer's dictionary.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__()
        _check_sizes("ConvLayer", in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                     stride=stride, padding=padding)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.reset_parameters()

    @property
    def num_atoms(self) -> int:
        """CSCLayer's name for the output channels (the encoder sizes its BatchNorm with it)."""
        return self.out_channels

    def reset_parameters(self) -> None:
        _reset_uniform_(self.weight)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")

    def update_atoms(self, size: tuple[int, int]) -> None:
        """Nothing to bring up to date (no atoms to project, no step size): the encoder calls it on every layer."""

    def solve(self, x: Tensor) -> Tensor:
        """y = conv2d(x, W, s, p): (b, in_channels, H, W) → (b, out_channels, H_y, W_y)."""
        return F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.solve(x)


class ConvTransposeLayer(nn.Module):
    """An ordinary bias-free transposed convolution x = conv_transpose2d(z, W, s, p, output_padding=o), in
    place of a SynthesisLayer; o from models/csc.py eq. (4), so the output is exactly ``out_size``.

    Shapes: z (b, in_channels, h, w) → x (b, out_channels, *out_size). ``weight`` (in_channels, out_channels,
    k, k) is the shape of SynthesisLayer's dictionary; it is not normalised.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__()
        _check_sizes("ConvTransposeLayer", in_channels=in_channels, out_channels=out_channels,
                     kernel_size=kernel_size, stride=stride, padding=padding)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, kernel_size, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_uniform_(self.weight)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")

    def update_atoms(self) -> None:
        """Nothing to bring up to date (the weights are not normalised): the decoder calls it on every layer."""

    def synthesize(self, z: Tensor, out_size: int | tuple[int, int]) -> Tensor:
        """x = conv_transpose2d(z, W, s, p, o): (b, in_channels, h, w) → (b, out_channels, *out_size)."""
        return synthesize_with(z, self.weight, out_size, self.stride, self.padding)

    def forward(self, z: Tensor, out_size: int | tuple[int, int]) -> Tensor:
        return self.synthesize(z, out_size)

"""Convolutional sparse coding (CSC) layers: the encoder's analysis stage and the decoder's synthesis stage.

References: the CSC layer of SDNet (Dai et al., "Revisiting Sparse Convolutional Model for Visual
Recognition", NeurIPS 2022, its ``DictBlock``); CSC-CTRL (Dai et al., arXiv 2302.09347); FISTA (Beck &
Teboulle, SIAM J. Imaging Sci. 2009, Algorithm 2.1 / eq. 4.1-4.3). docs/method.md §2 states the algorithm.

Notation (paper → code):

| Paper                          | Code                            | Note                                         |
|--------------------------------|---------------------------------|----------------------------------------------|
| x, signal                      | ``x`` (b, C, H, W)              |                                              |
| dictionary A, M atoms of C×k×k | ``weight`` (M, C, k, k)         | every atom ``weight[m]`` has unit ℓ₂ norm     |
| A z  (synthesis)               | ``synthesize(z, out_size)``     | conv_transpose2d                             |
| Aᵀ r (analysis)                | ``analyze(r)``                  | conv2d, the adjoint of A                     |
| z, sparse code                 | ``z`` (b, M, H_z, W_z)          | H_z = ⌊(H + 2p − k) / s⌋ + 1                 |
| λ, μ                           | ``lam``, ``mu``                 | ``lambda`` is reserved in Python             |
| L = ‖A‖₂² = λ_max(AᵀA)         | ``lipschitz`` (buffer)          | power iteration at the code's spatial size   |
| η = 0.9 / L                    | ``step_size``                   | not learned                                  |
| n, unrolled steps              | ``n_steps``                     |                                              |
| s, p, o                        | ``stride``, ``padding``, ``o``  | o = output_padding                           |

Equations:

    (1) z*(x) = argmin_z  λ‖z‖₁ + (μ/2)‖z‖₂² + ½‖x − A z‖₂²          (and z ≥ 0 when nonneg)
    (2) P(u)  = softshrink(u / (1 + μη), λη / (1 + μη)),  then ReLU when nonneg,
              i.e. nonneg: P(u) = relu(u − λη) / (1 + μη)
    (3) z¹ = P(η Aᵀx);  t₁ = 1;  for k = 1 … n−1:
              t_{k+1} = (1 + √(1 + 4 t_k²)) / 2
              y       = z^k + ((t_k − 1) / t_{k+1}) (z^k − z^{k−1})      (coefficient 0 for ISTA)
              z^{k+1} = P(y + η Aᵀ(x − A y))
    (4) o = H − ((H_z − 1) s − 2p + k),  0 ≤ o < s,  so that A maps a code back to exactly H pixels.

Step-size maintenance: L depends only on the dictionary and on the input's spatial size. It is estimated
by power iteration on AᵀA outside autograd: a cold start (``power_iters`` steps, relative tolerance
1e-5, host synchronisation allowed because it happens once per size) whenever the input size changes,
and a warm start (``power_iters_warm`` fixed steps, no host synchronisation) in ``refresh()`` after the
dictionary changed. ``forward`` refreshes by itself when the weight's autograd version counter moved
(an optimizer step or ``load_state_dict`` bumps it) and never touches an unchanged weight, so the layer
can be applied twice in one autograd graph (Z = f(X) and Ẑ = f(X̂)). The encoder and decoder run this
bookkeeping (``update_atoms``) for all their layers at the top of their forward and then call the pure tensor
parts (``solve``, ``synthesize``), so torch.compile sees each network as one graph.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STEP_SIZE_FACTOR = 0.9
"""η = STEP_SIZE_FACTOR / L: a margin below the largest stable step 1/L of proximal gradient."""

POWER_TOLERANCE = 1e-5
"""Relative change of the L estimate at which a cold-start power iteration stops."""

POWER_SEED = 0
"""Seed of the cold-start vector: every rank of a run gets the same L without touching the global RNG."""

NORM_FLOOR = 1e-12
"""Smallest atom norm divided by in the unit-norm projection (an all-zero atom stays zero)."""


# ----------------------------------------------------------------------------------------------
# Operators shared by the analysis and synthesis layers
# ----------------------------------------------------------------------------------------------


def _pair(size: int | tuple[int, int] | torch.Size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    pair = tuple(int(v) for v in size)
    if len(pair) != 2:
        raise ValueError(f"a spatial size is an int or (height, width), got {pair}")
    return pair[0], pair[1]


def code_size(in_size: int | tuple[int, int], kernel_size: int, stride: int, padding: int) -> tuple[int, int]:
    """Spatial size of the code: H_z = ⌊(H + 2p − k) / s⌋ + 1 per dimension."""
    h, w = _pair(in_size)
    return (h + 2 * padding - kernel_size) // stride + 1, (w + 2 * padding - kernel_size) // stride + 1


def output_padding(z_size: tuple[int, int], out_size: tuple[int, int], kernel_size: int, stride: int,
                   padding: int) -> tuple[int, int]:
    """Eq. (4): o = H − ((H_z − 1)s − 2p + k) per dimension, validated to 0 ≤ o < max(s, dilation = 1)."""
    pads = []
    for h_z, h in zip(z_size, out_size):
        base = (h_z - 1) * stride - 2 * padding + kernel_size  # conv_transpose2d's size without o
        o = h - base
        if not 0 <= o < stride:
            raise ValueError(
                f"cannot synthesize {h} pixels from a code of {h_z} with kernel {kernel_size}, stride {stride}, "
                f"padding {padding}: conv_transpose2d gives {base} + output_padding o with 0 <= o < {stride}, "
                f"so the output side must be in [{base}, {base + stride - 1}]")
        pads.append(o)
    return pads[0], pads[1]


def synthesize_with(z: Tensor, weight: Tensor, out_size: int | tuple[int, int], stride: int,
                    padding: int) -> Tensor:
    """A z = conv_transpose2d(z, W, s, p, output_padding=o), o from eq. (4) so the output is exactly
    ``out_size``. z: (b, M, H_z, W_z), weight: (M, C, k, k) → (b, C, H, W)."""
    h_z, w_z = z.shape[-2:]
    o = output_padding((h_z, w_z), _pair(out_size), weight.shape[-1], stride, padding)
    return F.conv_transpose2d(z, weight, stride=stride, padding=padding, output_padding=o)


def project_atoms_(weight: Tensor) -> None:
    """In place, outside autograd: W[m] ← W[m] / ‖W[m]‖₂ for every atom m (dimension 0)."""
    with torch.no_grad():
        norms = torch.linalg.vector_norm(weight, dim=(1, 2, 3), keepdim=True)
        weight.div_(norms.clamp_min(NORM_FLOOR))


def check_finite(x: Tensor, name: str = "x") -> None:
    """Raise ValueError if ``x`` holds NaN or ±inf. CPU-GPU sync point: call it where a sync is
    acceptable (data checks, tests), never inside a training step."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite, but {bad} of its {x.numel()} values are NaN or inf")


# ----------------------------------------------------------------------------------------------
# Analysis: the CSC layer of the encoder
# ----------------------------------------------------------------------------------------------


class CSCLayer(nn.Module):
    """Convolutional sparse coding by n unrolled proximal-gradient (FISTA or ISTA) steps, eq. (1)-(3).

    Shapes: x (b, in_channels, H, W) → z (b, num_atoms, H_z, W_z), H_z = ⌊(H + 2p − k)/s⌋ + 1.
    ``weight`` (num_atoms, in_channels, k, k) is the dictionary A; its atoms are kept at unit ℓ₂ norm.
    """

    # Buffers (register_buffer in __init__), declared for the type checker: nn.Module.__getattr__ is
    # typed as returning Tensor | Module.
    lipschitz: Tensor
    power_vector: Tensor

    def __init__(self, in_channels: int, num_atoms: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 n_steps: int = 2, lam: float = 0.1, mu: float = 0.0, nonneg: bool = True, *,
                 solver: Literal["fista", "ista"] = "fista", power_iters: int = 50,
                 power_iters_warm: int = 5) -> None:
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("num_atoms", num_atoms, 1),
                                 ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                                 ("n_steps", n_steps, 1), ("power_iters", power_iters, 1),
                                 ("power_iters_warm", power_iters_warm, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"CSCLayer {name} must be an int >= {low}, got {value!r}")
        if not (lam >= 0 and mu >= 0 and math.isfinite(lam) and math.isfinite(mu)):
            raise ValueError(f"CSCLayer lam and mu must be finite and >= 0, got lam={lam}, mu={mu}")
        if solver not in ("fista", "ista"):
            raise ValueError(f"CSCLayer solver must be 'fista' or 'ista', got {solver!r}")
        self.in_channels, self.num_atoms, self.kernel_size = in_channels, num_atoms, kernel_size
        self.stride, self.padding, self.n_steps = stride, padding, n_steps
        self.lam, self.mu, self.nonneg, self.solver = float(lam), float(mu), bool(nonneg), solver
        self.power_iters, self.power_iters_warm = power_iters, power_iters_warm

        self.weight = nn.Parameter(torch.empty(num_atoms, in_channels, kernel_size, kernel_size))
        # L = λ_max(AᵀA) for inputs of size ``_input_size``; saved with the model as a record of the step
        # size used (it is re-estimated after loading, because loading changes the weight).
        self.register_buffer("lipschitz", torch.ones(()))
        # Warm-start vector of the power iteration, shape (1, M, H_z, W_z): it depends on the input size,
        # so it is not part of the state dict.
        self.register_buffer("power_vector", torch.empty(0), persistent=False)
        self._input_size: tuple[int, int] | None = None  # spatial size L was computed for
        self._refreshed_version: int | None = None  # weight._version right after the last projection
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Atoms drawn uniformly on the unit sphere (Gaussian, then normalised)."""
        with torch.no_grad():
            self.weight.normal_()
        self._project()
        self._input_size = None  # L must be estimated anew for the new dictionary

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.num_atoms}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, n_steps={self.n_steps}, lam={self.lam}, mu={self.mu}, "
                f"nonneg={self.nonneg}, solver={self.solver!r}")

    # ---- the operator A and its adjoint ----

    def analyze(self, r: Tensor) -> Tensor:
        """Aᵀ r = conv2d(r, W, s, p): (b, C, H, W) → (b, M, H_z, W_z)."""
        return F.conv2d(r, self.weight, stride=self.stride, padding=self.padding)

    def synthesize(self, z: Tensor, out_size: int | tuple[int, int]) -> Tensor:
        """A z = conv_transpose2d(z, W, s, p, output_padding=o): (b, M, H_z, W_z) → (b, C, *out_size)."""
        return synthesize_with(z, self.weight, out_size, self.stride, self.padding)

    @property
    def step_size(self) -> Tensor:
        """η = 0.9 / L (a 0-dim tensor: computed from the buffer, never cached as a Python float)."""
        return STEP_SIZE_FACTOR / self.lipschitz

    # ---- the unrolled solver ----

    def forward(self, x: Tensor) -> Tensor:
        """Eq. (3): n unrolled proximal-gradient steps from z⁰ = 0. x (b, C, H, W) → z (b, M, H_z, W_z).
        Brings atoms and step size up to date first (``update_atoms``)."""
        self.update_atoms(self.check_input(x))
        return self.solve(x)

    def solve(self, x: Tensor) -> Tensor:
        """Eq. (3) alone, for callers that ran ``update_atoms`` themselves: the encoder updates the atoms of all its layers
        once per forward, so that under torch.compile its stages form one graph (``update_atoms`` is Python
        bookkeeping that dynamo leaves out of the graph)."""
        size = (int(x.shape[-2]), int(x.shape[-1]))
        eta = self.step_size
        shrink = 1.0 / (1.0 + self.mu * eta)  # 1 / (1 + μη)
        thresh = self.lam * eta  # λη: (λη/(1+μη)) · (1+μη), the shrinkage applied before scaling

        def prox(u: Tensor) -> Tensor:
            # Eq. (2). softshrink(v, τ) = v − clamp(v, −τ, τ); scaling by 1/(1+μη) commutes with it.
            if self.nonneg:
                return torch.relu(u - thresh) * shrink
            return (u - torch.clamp(u, -thresh, thresh)) * shrink

        z = prox(eta * self.analyze(x))  # z¹: one gradient step from z⁰ = 0 needs only Aᵀx
        z_prev, t = z, 1.0
        for _ in range(self.n_steps - 1):
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            momentum = (t - 1.0) / t_next if self.solver == "fista" else 0.0  # 0 at k = 1 since t₁ = 1
            y = z + momentum * (z - z_prev) if momentum else z
            z_prev, z = z, prox(y + eta * self.analyze(x - self.synthesize(y, size)))
            t = t_next
        return z

    def check_input(self, x: Tensor) -> tuple[int, int]:
        """Validate x (b, in_channels, H, W) with H, W + 2·padding ≥ kernel; return (H, W)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"CSCLayer expects x of shape (b, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if min(h, w) + 2 * self.padding < self.kernel_size:
            raise ValueError(
                f"CSCLayer input of spatial size {h}x{w} is too small for kernel {self.kernel_size} with padding "
                f"{self.padding}: needs size + 2*padding >= kernel")
        return h, w

    # ---- dictionary maintenance (outside autograd) ----

    @torch.compiler.disable  # Python-side bookkeeping: runs eagerly under torch.compile
    def update_atoms(self, size: tuple[int, int]) -> None:
        """Bring atoms and L up to date for inputs of spatial ``size`` (H, W): a cold start if the size is
        new, ``refresh()`` if the weight changed since the last refresh, else nothing. Only touches the
        weight if it changed. A no-op while torch.export traces the model (saving it, e.g. for MLflow): the
        exported graph is the solver alone, with the state of the last eager forward."""
        if torch.compiler.is_exporting():
            return
        changed = self.weight._version != self._refreshed_version
        if size != self._input_size:
            if changed:
                self._project()
            self._cold_start(size)
        elif changed:
            self.refresh()

    def forget_step_size(self) -> None:
        """Make the next forward estimate L from a cold start, as it does after ``load_state_dict``. A model
        saved after this (e.g. exported for MLflow) is then the same function as its checkpoint loaded back:
        during training L is tracked by a few warm-started power iterations, which a cold start refines."""
        self._input_size = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Project the atoms to unit norm, then re-estimate L by ``power_iters_warm`` warm-started power
        iterations (a fixed count: no host-device synchronisation). Call after each optimizer step of the
        dictionary's owner. Before the first forward (no input size yet) only the projection runs."""
        self._project()
        if self._input_size is not None:
            self._power(self.power_vector, self.power_iters_warm, tolerance=None)

    def _project(self) -> None:
        project_atoms_(self.weight)
        self._refreshed_version = self.weight._version

    @torch.no_grad()
    def _cold_start(self, size: tuple[int, int]) -> None:
        """Power iteration from a seeded random vector, at most ``power_iters`` steps, stopping when the
        estimate changes by less than POWER_TOLERANCE relative (host sync per step: once per size)."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        generator = torch.Generator(device=self.weight.device).manual_seed(POWER_SEED)
        z_size = code_size(size, self.kernel_size, self.stride, self.padding)
        v = torch.randn((1, self.num_atoms, *z_size), generator=generator, device=self.weight.device, dtype=dtype)
        self._input_size = size
        self._power(v / torch.linalg.vector_norm(v), self.power_iters, tolerance=POWER_TOLERANCE)

    def _power(self, v: Tensor, iters: int, tolerance: float | None) -> None:
        """v ← AᵀA v / ‖AᵀA v‖, L ← ‖AᵀA v‖ (‖v‖ = 1), in ≥ fp32 with autocast off; stores v and L."""
        assert self._input_size is not None
        weight = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        v = v.to(weight.dtype)
        estimate: Tensor | None = None
        with torch.autocast(device_type=weight.device.type, enabled=False):
            for _ in range(iters):
                w = F.conv2d(synthesize_with(v, weight, self._input_size, self.stride, self.padding), weight,
                             stride=self.stride, padding=self.padding)  # AᵀA v
                norm = torch.linalg.vector_norm(w)
                v = w / norm.clamp_min(NORM_FLOOR)
                # CPU-GPU sync point (cold start only)
                if (tolerance is not None and estimate is not None
                        and abs(float(norm) - float(estimate)) <= tolerance * float(norm)):
                    estimate = norm
                    break
                estimate = norm
        assert estimate is not None  # iters >= 1
        self.power_vector = v
        self.lipschitz.copy_(estimate)


# ----------------------------------------------------------------------------------------------
# Synthesis: one stage of the decoder
# ----------------------------------------------------------------------------------------------


class SynthesisLayer(nn.Module):
    """Sparse deconvolution x = A z = conv_transpose2d(z, W, s, p, output_padding=o) with unit-norm atoms.

    Shapes: z (b, num_atoms, H_z, W_z) → x (b, out_channels, *out_size); o from eq. (4).
    Either it owns ``weight`` (num_atoms, out_channels, k, k), or, with ``tied_to``, it synthesises with
    that CSCLayer's dictionary and owns no parameter (the reference is kept outside the module tree, so
    ``parameters()`` and ``state_dict()`` do not repeat the encoder's atoms).
    """

    _tied_to: CSCLayer | None  # set with object.__setattr__ in __init__: not a submodule

    def __init__(self, num_atoms: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 *, tied_to: CSCLayer | None = None) -> None:
        super().__init__()
        for name, value, low in (("num_atoms", num_atoms, 1), ("out_channels", out_channels, 1),
                                 ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"SynthesisLayer {name} must be an int >= {low}, got {value!r}")
        self.num_atoms, self.out_channels, self.kernel_size = num_atoms, out_channels, kernel_size
        self.stride, self.padding = stride, padding
        object.__setattr__(self, "_tied_to", tied_to)  # not a submodule: the encoder owns it
        if tied_to is not None:
            expected = (num_atoms, out_channels, kernel_size, kernel_size)
            if tuple(tied_to.weight.shape) != expected or (tied_to.stride, tied_to.padding) != (stride, padding):
                raise ValueError(
                    f"SynthesisLayer tied to a CSCLayer needs its dictionary of shape {expected} with stride {stride}, "
                    f"padding {padding}; got {tuple(tied_to.weight.shape)} with stride {tied_to.stride}, "
                    f"padding {tied_to.padding}")
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(torch.randn(num_atoms, out_channels, kernel_size, kernel_size))
        self._refreshed_version: int | None = None
        if tied_to is None:
            self.refresh()

    @property
    def tied_to(self) -> CSCLayer | None:
        return self._tied_to

    @property
    def dictionary(self) -> Tensor:
        """The atoms used: this layer's own weight, or the tied CSCLayer's."""
        return self._tied_to.weight if self._tied_to is not None else self.weight

    def extra_repr(self) -> str:
        tied = ", tied" if self._tied_to is not None else ""
        return (f"{self.num_atoms}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}{tied}")

    def forward(self, z: Tensor, out_size: int | tuple[int, int]) -> Tensor:
        """x = A z with unit-norm atoms (projected first if they changed): z (b, M, h, w) → (b, C, *out_size)."""
        if z.dim() != 4 or z.shape[1] != self.num_atoms:
            raise ValueError(f"SynthesisLayer expects z of shape (b, {self.num_atoms}, h, w), got {tuple(z.shape)}")
        self.update_atoms()
        return self.synthesize(z, out_size)

    def synthesize(self, z: Tensor, out_size: int | tuple[int, int]) -> Tensor:
        """A z alone, for callers that ran ``update_atoms`` themselves (the decoder, once per forward)."""
        return synthesize_with(z, self.dictionary, out_size, self.stride, self.padding)

    @torch.compiler.disable  # Python-side bookkeeping: runs eagerly under torch.compile
    def update_atoms(self) -> None:
        """Project the atoms only if they changed since the last projection (never an unchanged weight).
        A no-op while torch.export traces the model (as ``CSCLayer.update_atoms``)."""
        if torch.compiler.is_exporting():
            return
        if self._tied_to is not None:
            if self._tied_to.weight._version != self._tied_to._refreshed_version:
                self._tied_to.refresh()
        elif self.weight._version != self._refreshed_version:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Unit-norm projection of the atoms. Tied: refreshes the owning CSCLayer, and only if its atoms
        changed since its own last refresh (the encoder's optimizer owns them)."""
        if self._tied_to is not None:
            self.update_atoms()
            return
        project_atoms_(self.weight)
        self._refreshed_version = self.weight._version


def refresh_dictionaries(module: nn.Module) -> int:
    """Call ``refresh()`` on every CSCLayer and SynthesisLayer inside ``module`` (after an optimizer step
    of its owner). Returns how many layers were refreshed. The plain convolutions of the baseline
    (models/conv.py) have no atoms to project and no step size, so they are left alone: for a
    ``layer="conv"`` network this is a no-op that returns 0."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, (CSCLayer, SynthesisLayer)):
            layer.refresh()
            count += 1
    return count

"""The per-worker CTRL training loop (docs/method.md §5).

    Z = f(X),  X̂ = g(Z),  Ẑ = f(X̂)
    encoder f (θ) maximises, decoder g (η) minimises the game value T:
        binary:      T = ΔR(Z, Ẑ)
        multiclass:  T = ΔR(Z|Π) + ΔR(Ẑ|Π) + Σⱼ ΔR(Zⱼ, Ẑⱼ)
        (+ rate_weight · R(Z) + λ₂ Σᵢ (1 − cos(zᵢ, ẑᵢ)), the sample-wise consistency)

Three levels, each a screen: ``fit`` → ``train_step`` → ``encoder_step`` / ``decoder_step``.
The sign is flipped in exactly one place: ``player_loss``. Rate reduction is a statistic of the
global batch: per-rank Gram statistics are summed across ranks before the logdets (pipeline/distributed.py
states the gradient-scale convention). Nothing in a step synchronises host and device; metrics are
accumulated on the device and read every ``train.log_every`` steps.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from models import build_models
from models.csc import refresh_dictionaries
from models.ctrl import CTRLStats, CTRLTerms, ctrl_objective, ctrl_statistics
from models.dictionary import dictionary_loss
from pipeline import distributed
from pipeline import metric_names as N
from pipeline.config import ExperimentConfig, TrainConfig
from pipeline.diagnostics import atom_measures, code_measures

log = logging.getLogger(__name__)


class NonFiniteObjectiveError(RuntimeError):
    """The objective or one of its terms became NaN/inf; the run stops before any checkpoint is written."""


class Reporter(Protocol):
    """Where the loop sends what it measured (pipeline/worker.py: Ray + MLflow; tests: a list)."""

    def metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def images(self, step: int, trainer: CTRLTrainer, x: Tensor) -> None: ...

    def checkpoint(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None: ...


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based).

    1) warm-up: linear from 1/warmup to 1 over ``warmup`` steps;
    2) 'linear': decays linearly to 0 at ``total`` (docs/method.md §5); 'constant': stays 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, 1.0 - step / max(1, total))


REFERENCE_WEIGHT_RMS = 0.02
"""Entry size of a DCGAN-initialised filter, N(0, 0.02²): the scale at which optim.*.lr is meant."""


def param_groups(params: list[nn.Parameter], lr: float, atom_lr_scale: bool) -> list[dict[str, Any]]:
    """Adam parameter groups: one group at ``lr``, or with ``atom_lr_scale`` one group per 4-d weight at
    lr × rms(W₀) / REFERENCE_WEIGHT_RMS (W₀ = the weight now, at construction) and one for the rest."""
    if not atom_lr_scale:
        return [{"params": params}]
    groups: list[dict[str, Any]] = [{"params": [p for p in params if p.dim() != 4]}]
    for p in params:
        if p.dim() == 4:
            rms = float(p.detach().float().pow(2).mean().sqrt())
            groups.append({"params": [p], "lr": lr * max(rms, 1e-8) / REFERENCE_WEIGHT_RMS})
    return [g for g in groups if g["params"]]


def player_loss(terms: CTRLTerms, player: str, consistency_weight: float) -> Tensor:
    """The only sign flip of the game (docs/method.md eq. 12-13):

        f minimises  −T + λ₂ Σᵢ d(zᵢ, ẑᵢ)        g minimises  +T + λ₂ Σᵢ d(zᵢ, ẑᵢ),    d = 1 − cos

    The sample-wise consistency is a constraint both players satisfy, not a term of the game: it enters
    both losses with the same sign (u-CTRL). Measured with the encoder maximising it instead, it fights
    reconstruction (measured on CPU in the demo setting, issue 15: 9.7 against 12.0 dB)."""
    value = -terms.objective if player == "encoder" else terms.objective
    if consistency_weight:
        value = value + consistency_weight * terms.consistency
    return value


def undersampled_warning(global_batch: int, num_classes: int, nz: int) -> str | None:
    """A warning when a class has fewer images per global batch than the feature dimension d, else None.

    With nⱼ < d the class's features span an nⱼ-dimensional subspace, and the encoder can place Ẑⱼ
    orthogonal to Zⱼ; there ΔR(Zⱼ, Ẑⱼ) is at its maximum and its gradient in Ẑⱼ vanishes, so the
    decoder stops learning. Measured: with 160 images per class at d = 512 (docs/method.md §5's 32 px row)
    neither model reconstructed Fashion-MNIST in 2000 H200 iterations; with 205 at d = 128 (LDR's MNIST
    recipe) the plain-convolution model reached 15.7 dB; on CPU (256 images, 10 classes) d = 16
    reconstructs and d = 64 does not (benchmarks/results/fashion_mnist32/README.md)."""
    per_class = global_batch / max(1, num_classes)
    if per_class >= nz:
        return None
    return (f"about {per_class:.0f} images per class in each global batch of {global_batch} ({num_classes} "
            f"classes) but the feature dimension is model.nz={nz}: each class's features span fewer "
            f"dimensions than z has, so the encoder can make every Ẑⱼ orthogonal to Zⱼ and the decoder's "
            f"gradient vanishes (measured: no reconstructions). Raise the batch or lower model.nz to at most "
            f"{int(per_class)}.")


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm that normalises with the batch's own moments but leaves the running
    statistics as they are (momentum 0 for the duration).

    The encoder runs in train mode on real images X and on reconstructions X̂. Its running statistics,
    which evaluation normalises with, must be those of real images: when f(X̂) updated them too, they
    became a mixture of two distributions, and in evaluation mode real images were normalised with it
    (measured: on Fashion-MNIST the final CSC stage then thresholded every code to 0, z = 0)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def checkpoint_due(train: TrainConfig, step: int) -> bool:
    """Whether the loop checkpoints after ``step`` (1-based): every train.checkpoint_every steps and at the end."""
    return step % train.checkpoint_every == 0 or step == train.steps


class CTRLTrainer:
    """Closed-loop transcription: max over f, min over g, of T(f, g) on the global batch."""

    def __init__(self, cfg: ExperimentConfig, *, device: torch.device, num_classes: int,
                 batches: Iterator[tuple[Tensor, Tensor]], reporter: Reporter,
                 state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.device = device
        self.mode = cfg.objective.mode
        self.num_classes = num_classes if self.mode == "multiclass" else 1
        self.batches = batches
        self.reporter = reporter
        self.step = 0
        warning = undersampled_warning(cfg.global_batch_size, self.num_classes, cfg.model.nz)
        if warning and distributed.rank() == 0:
            log.warning(warning)

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        encoder, decoder = build_models(cfg.model)
        # The atoms the run starts from (also after a resume: the same seed draws them), for their drift.
        self.initial_atoms = [layer.weight.detach().clone().to(device) for layer in encoder.csc_layers()]
        if distributed.is_distributed() and cfg.scaling.sync_batchnorm:
            distributed.convert_batchnorm(encoder)
            distributed.convert_batchnorm(decoder)
        fmt = torch.channels_last if (device.type == "cuda" and cfg.train.channels_last) else torch.contiguous_format
        self.dtype = torch.float64 if cfg.train.precision == "fp64" else torch.float32
        self.raw_encoder = encoder.to(device, dtype=self.dtype, memory_format=fmt)
        self.raw_decoder = decoder.to(device, dtype=self.dtype, memory_format=fmt)
        distributed.broadcast_parameters(self.raw_encoder)
        distributed.broadcast_parameters(self.raw_decoder)
        self.memory_format = fmt

        # Each player's optimizer holds only that player's parameters (a tied decoder owns only its BN).
        self.encoder_params = [p for p in self.raw_encoder.parameters() if p.requires_grad]
        self.decoder_params = [p for p in self.raw_decoder.own_parameters() if p.requires_grad]
        o = cfg.optim
        self.encoder_opt = torch.optim.Adam(
            param_groups(self.encoder_params, o.encoder.lr, o.encoder.atom_lr_scale), lr=o.encoder.lr,
            betas=o.encoder.betas, weight_decay=o.encoder.weight_decay)
        self.decoder_opt = torch.optim.Adam(
            param_groups(self.decoder_params, o.decoder.lr, o.decoder.atom_lr_scale), lr=o.decoder.lr,
            betas=o.decoder.betas, weight_decay=o.decoder.weight_decay)
        # The encoder takes `inner` optimizer steps per CTRL iteration: its schedule counts iterations.
        inner = cfg.train.encoder_steps_per_decoder_step
        steps, warmup, schedule = cfg.train.steps, o.warmup_steps, o.schedule
        self.encoder_sched = torch.optim.lr_scheduler.LambdaLR(
            self.encoder_opt, lambda s: lr_factor(s // inner, steps, warmup, schedule))
        self.decoder_sched = torch.optim.lr_scheduler.LambdaLR(
            self.decoder_opt, lambda s: lr_factor(s, steps, warmup, schedule))
        if state is not None:
            self.load_state_dict(state)
        torch.manual_seed(cfg.run.seed + distributed.rank() + 7919 * self.step)

        self.amp_dtype = autocast_dtype(cfg.train.precision, device)
        if cfg.train.precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.encoder: nn.Module = self.raw_encoder
        self.decoder: nn.Module = self.raw_decoder
        if cfg.train.compile and device.type == "cuda":
            self.encoder = torch.compile(self.raw_encoder)
            self.decoder = torch.compile(self.raw_decoder)
        self._reset_window()

    # ------------------------------------------------------------------------------------------
    # Level 1: the loop
    # ------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        cfg = self.cfg.train
        last: dict[str, float] = {}
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            x, labels = next(self.batches)
            x = x.to(self.device, dtype=self.dtype, non_blocking=True).contiguous(memory_format=self.memory_format)
            labels = labels.to(self.device, non_blocking=True)
            self._data_wait += time.perf_counter() - t0
            self.train_step(x, labels)
            self.step += 1
            final = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or final:
                last = self.log_metrics(x)
            if (cfg.image_every and self.step % cfg.image_every == 0) or final:
                self.reporter.images(self.step, self, x)
            if checkpoint_due(cfg, self.step):
                self.raise_if_nonfinite()  # never let a bad state overwrite the last good checkpoint
                self.reporter.checkpoint(self.step, self.state_dict(), last)
        return last

    # ------------------------------------------------------------------------------------------
    # Level 2: one CTRL iteration
    # ------------------------------------------------------------------------------------------

    def train_step(self, x: Tensor, labels: Tensor) -> None:
        for _ in range(self.cfg.train.encoder_steps_per_decoder_step):
            enc_terms = self.encoder_step(x, labels)  # ascend T in f
        dec_terms, x_hat = self.decoder_step(x, labels)  # descend T in g
        self._accumulate(enc_terms, dec_terms, x, x_hat)

    # ------------------------------------------------------------------------------------------
    # Level 3: the players
    # ------------------------------------------------------------------------------------------

    def encoder_step(self, x: Tensor, labels: Tensor) -> CTRLTerms:
        """One Adam step of f on −T (+ λ₂ C, + the dictionary loss of the stages it names: eq. 12 of
        docs/method.md). Gradient reaches f through Z = f(X) and Ẑ = f(X̂); X̂ = g(Z) is detached (computed
        without a graph), so no gradient flows through g (as in LDR). With the dictionary loss, f(X) runs
        uncompiled (``forward_stages`` also returns every stage's code and input)."""
        objective = self.cfg.objective
        with self._autocast():
            if objective.dictionary_weight:
                z, codes, inputs = self.raw_encoder.forward_stages(x)
            else:
                z = self.encoder(x)
            with torch.no_grad():  # X̂ is a constant for the encoder's step
                x_hat = self.decoder(z.detach())
            with frozen_running_stats(self.raw_encoder):
                z_hat = self.encoder(x_hat)
        terms = self.objective(z, z_hat, labels)
        loss = player_loss(terms, "encoder", objective.consistency_weight)
        if objective.dictionary_weight:
            loss = loss + objective.dictionary_weight * self.dictionary_loss(codes, inputs)
        self._update(self.encoder_opt, self.encoder_sched, self.encoder_params, loss)
        refresh_dictionaries(self.raw_encoder)  # unit-norm atoms and a new step size, once per step
        return terms

    def decoder_step(self, x: Tensor, labels: Tensor) -> tuple[CTRLTerms, Tensor]:
        """One Adam step of g on +T through the whole loop X → Z → X̂ → Ẑ. Z = f(X) does not depend on
        g, so it is computed without a graph; f's parameters receive no gradient (backward(inputs=…))."""
        with self._autocast():
            with torch.no_grad():  # Z is a constant for the decoder's step
                z = self.encoder(x)
            x_hat = self.decoder(z)
            with frozen_running_stats(self.raw_encoder):
                z_hat = self.encoder(x_hat)
        terms = self.objective(z, z_hat, labels)
        self._update(self.decoder_opt, self.decoder_sched, self.decoder_params,
                     player_loss(terms, "decoder", self.cfg.objective.consistency_weight))
        refresh_dictionaries(self.raw_decoder)
        return terms, x_hat.detach()

    def dictionary_loss(self, codes: list[Tensor], inputs: list[Tensor]) -> Tensor:
        """Σ over objective.dictionary_stages of eq. (5) of models/dictionary.py: the sparse-coding update of
        those stages' atoms (inputs and codes detached). Each rank codes its own images; the gradient is
        averaged over ranks with the rest of the encoder's."""
        layers = self.raw_encoder.csc_layers()
        return sum(dictionary_loss(layers[s - 1], inputs[s - 1], codes[s - 1])
                   for s in self.cfg.objective.dictionary_stages)

    def objective(self, z: Tensor, z_hat: Tensor, labels: Tensor) -> CTRLTerms:
        """T on the global batch: per-rank Gram statistics, summed across ranks (one differentiable
        all-reduce), then all logdets in one fp32 batched Cholesky (models/ctrl.py)."""
        stats = ctrl_statistics(z, z_hat, labels, self.num_classes, self.mode,
                                tf32_grams=self.amp_dtype == torch.bfloat16 and self.device.type == "cuda")
        flat = distributed.all_reduce_sum(stats.to_flat())
        stats = CTRLStats.from_flat(flat, self.num_classes, z.shape[1])
        return ctrl_objective(stats, self.mode, self.cfg.objective.eps_sq, self.cfg.objective.rate_weight)

    def _update(self, opt: torch.optim.Optimizer, sched: Any, params: list[nn.Parameter], loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        distributed.average_gradients(params)
        opt.step()
        sched.step()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------------------------------
    # Metrics: accumulated on the device, read at the logging cadence
    # ------------------------------------------------------------------------------------------

    def _reset_window(self) -> None:
        self._keys: list[str] = getattr(self, "_keys", [])
        self._sums: Tensor | None = None
        self._count = 0
        self._data_wait = 0.0
        self._t_window = time.perf_counter()
        self._step_window = self.step

    def _accumulate(self, enc: CTRLTerms, dec: CTRLTerms, x: Tensor, x_hat: Tensor) -> None:
        """Add this step's terms to the window's sums, and remember (on the device) the first step at
        which any term went non-finite. A few vector kernels, no host sync."""
        values = {N.player_metric("encoder", k): v for k, v in enc.as_dict().items()}
        values.update({N.player_metric("decoder", k): v for k, v in dec.as_dict().items()})
        values[N.RECON_MSE] = (x_hat.float() - x.float()).pow(2).mean()
        if not self._keys:
            self._keys = list(values)
            self._first_bad = torch.zeros(len(self._keys), device=self.device)
        vec = torch.stack([values[k].detach().float().reshape(()) for k in self._keys])
        self._sums = vec if self._sums is None else self._sums + vec
        now_bad = ~torch.isfinite(vec) & (self._first_bad == 0)
        self._first_bad = torch.where(now_bad, torch.full_like(vec, float(self.step + 1)), self._first_bad)
        self._count += 1

    def raise_if_nonfinite(self) -> None:
        """Host-device sync: only at the logging and checkpoint cadence."""
        if not self._keys:
            return
        bad = {k: int(s) for k, s in zip(self._keys, self._first_bad.tolist()) if s > 0}
        if bad:
            first_step = min(bad.values())
            names = ", ".join(f"{k} (step {s})" for k, s in sorted(bad.items(), key=lambda kv: kv[1]))
            raise NonFiniteObjectiveError(
                f"non-finite objective at step {first_step}: {names}. The run stops here; the last "
                f"checkpoint (before step {first_step}) is kept. Try a lower learning rate or a larger "
                f"objective.eps_sq.")

    @torch.no_grad()
    def coding_measures(self, x: Tensor) -> dict[str, Tensor]:
        """Sparsity, residual and stage-1 PSNR of f's codes on a batch (one extra forward), and the atoms'
        roughness and drift from initialisation (pipeline/diagnostics.py), at the logging cadence."""
        with self._autocast(), frozen_running_stats(self.raw_encoder):  # logging must not change the model
            out = code_measures(self.raw_encoder, x)
        out.update(atom_measures(self.raw_encoder, self.initial_atoms))
        return out

    def log_metrics(self, x: Tensor) -> dict[str, float]:
        self.raise_if_nonfinite()
        n = max(1, self._count)
        tensors = dict(zip(self._keys, self._sums / n)) if self._sums is not None else {}
        tensors.update(self.coding_measures(x))
        keys = list(tensors)
        values = torch.stack([tensors[k].float().reshape(()) for k in keys])
        distributed.all_reduce_sum_(values)  # mean over ranks (ΔR terms are already global)
        values = (values / distributed.world_size()).tolist()  # the one host-device sync of the window
        metrics = dict(zip(keys, values))
        elapsed = max(time.perf_counter() - self._t_window, 1e-9)
        steps = self.step - self._step_window
        mse = metrics[N.RECON_MSE]
        metrics[N.RECON_PSNR] = 10.0 * math.log10(4.0 / mse) if mse > 0 else float("inf")
        consistency = N.player_metric("decoder", "consistency")
        if consistency in metrics:  # Σᵢ (1 − cos(zᵢ, ẑᵢ)) over the global batch
            metrics[N.COS_Z_ZHAT] = 1.0 - metrics[consistency] / self.cfg.global_batch_size
        metrics[N.IMAGES_PER_S] = steps * self.cfg.global_batch_size / elapsed
        metrics[N.STEP_MS] = 1000.0 * elapsed / max(1, steps)
        metrics[N.DATA_WAIT] = self._data_wait / elapsed
        metrics[N.ENCODER_LR] = self.encoder_opt.param_groups[0]["lr"]
        metrics[N.DECODER_LR] = self.decoder_opt.param_groups[0]["lr"]
        metrics[N.STEP] = float(self.step)
        self.reporter.metrics(self.step, metrics)
        self._reset_window()
        return metrics

    # ------------------------------------------------------------------------------------------
    # Checkpoint state
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: both networks and optimizers, schedules, step, RNG
        states, the data position (the resampled stream is re-seeded from (seed, rank, step)), config."""
        return {
            "step": self.step,
            "encoder": self.raw_encoder.state_dict(),
            "decoder": self.raw_decoder.state_dict(),
            "encoder_opt": self.encoder_opt.state_dict(),
            "decoder_opt": self.decoder_opt.state_dict(),
            "encoder_sched": self.encoder_sched.state_dict(),
            "decoder_sched": self.decoder_sched.state_dict(),
            "rng": rng_state(),
            "data": {"seed": self.cfg.run.seed, "position": self.step},
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw_encoder.load_state_dict(state["encoder"])
        self.raw_decoder.load_state_dict(state["decoder"])
        self.encoder_opt.load_state_dict(state["encoder_opt"])
        self.decoder_opt.load_state_dict(state["decoder_opt"])
        self.encoder_sched.load_state_dict(state["encoder_sched"])
        self.decoder_sched.load_state_dict(state["decoder_sched"])
        self.step = int(state["step"])
        set_rng_state(state["rng"])
        refresh_dictionaries(self.raw_encoder)
        refresh_dictionaries(self.raw_decoder)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

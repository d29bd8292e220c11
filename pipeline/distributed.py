"""Rank helpers and the collectives that make rate reduction a statistic of the global batch.

Ray Train owns the process group (it calls ``init_process_group``); this module never does.

Gradient-scale convention (pinned by tests/pipeline/test_parity.py)
-------------------------------------------------------------------
Every quantity that mixes samples across ranks — the CTRL Gram statistics and the BatchNorm moments —
is summed with the autograd-aware ``torch.distributed.nn.functional.all_reduce``. Every rank then holds
the same global objective T. The backward of a SUM all-reduce is a SUM all-reduce of the incoming
gradients, so on rank r autograd produces Σ_s ∂T_s/∂θ|_r = W · ∂T/∂θ|_r: W (world size) times the
contribution of rank r's own samples to the exact gradient. ``average_gradients`` then all-reduces the
parameter gradients and divides by W:  (1/W) Σ_r W · ∂T/∂θ|_r = ∂T/∂θ, exactly the gradient of one
worker holding the whole global batch. No DDP wrapper is used: the players call their networks
several times per step and only one player's parameters are stepped at a time, which DDP's hooks
would fight; the explicit bucket below is one all-reduce per optimizer step.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce

# torch marks torch.distributed.nn.functional as deprecated, but its suggested replacement
# (_functional_collectives) has no autograd for all_reduce in the torch versions we support.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """Σ over ranks, differentiable (backward = Σ over ranks of the gradients; see the module docstring)."""
    if not is_distributed():
        return t

    return all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_sum_(t: Tensor) -> Tensor:
    """In-place Σ over ranks without autograd (metrics, counters)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def average_gradients(params: list[nn.Parameter]) -> None:
    """Mean of the gradients over ranks, as one flat all-reduce (see the module docstring for why the
    mean, not the sum, gives the exact global-batch gradient). A missing gradient counts as zero."""
    if not is_distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size())
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        chunk = flat[offset:offset + n].view_as(g)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n


def broadcast_parameters(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical start on every worker)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode moments are those of the global batch across ranks.

        μ = Σ_r Σ x / N,   σ² = Σ_r Σ x² / N − μ²,   N = Σ_r b_r·h·w

    Two implementations of the same statistics, chosen per call:

    * CUDA tensors on an NCCL group: ``_FusedGlobalBatchNorm``, torch's fused batch-norm kernels (one
      Welford pass for the local moments, one all-gather, one elementwise pass; the backward likewise
      with one all-reduce). It is what ``nn.SyncBatchNorm`` computes, minus SyncBatchNorm's filtering of
      empty ranks by a boolean mask: that indexing copies the mask to the host, i.e. one host-device
      synchronisation per BatchNorm call (dozens per CTRL step; it cost 2-GPU scaling ~15 %). Every
      rank holds a full batch here, so no rank is empty and nothing needs filtering.
    * elsewhere (CPU/gloo, which the parity test uses): plain autograd ops around one differentiable
      all-reduce of (Σx, Σx², n), in fp32 (fp64 for float64 inputs) whatever the autocast dtype.

    Evaluation mode uses the running statistics.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        if x.is_cuda and self.momentum is not None and is_distributed() and dist.get_backend() == "nccl":
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
            return _FusedGlobalBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                               self.eps, self.momentum, world_size())
        return self._forward_autograd(x)

    def _forward_autograd(self, x: Tensor) -> Tensor:
        xf = x if x.dtype == torch.float64 else x.float()
        # new_full is a fill kernel; torch.tensor([...], device=cuda) would be a host-to-device copy
        # that makes the host wait for the GPU at every BatchNorm call.
        n_local = xf.new_full((1,), xf.numel() / xf.shape[1])
        moments = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), n_local])
        moments = all_reduce_sum(moments)
        c = x.shape[1]
        n = moments[-1]
        mean = moments[:c] / n
        var = (moments[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


class _FusedGlobalBatchNorm(torch.autograd.Function):
    """Global-batch BatchNorm on CUDA/NCCL with torch's fused kernels and no host synchronisation.

    forward:  local (μ_r, 1/σ_r, n_r) by one Welford pass → all-gather (2C+1 values per rank) →
              global (μ, 1/σ) from the per-rank moments and counts (also updates the running stats)
              → y = (x − μ)/σ · γ + β in one elementwise pass.
    backward: local Σdy and Σdy·(x − μ) (and ∂γ, ∂β of the local samples) → all-reduce SUM of the
              two channel sums → dx in one elementwise pass. Summing the incoming gradients over ranks
              is the convention of this module's docstring; ∂γ, ∂β stay local and are averaged by
              ``average_gradients`` with the other parameters.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, eps: float, momentum: float, world: int) -> Tensor:
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()
        c = x.shape[1]
        mean, invstd = torch.batch_norm_stats(x, eps)
        count = mean.new_full((1,), x.numel() // c)
        local = torch.cat([mean, invstd, count])
        gathered = local.new_empty(world * local.numel())
        dist.all_gather_into_tensor(gathered, local)
        mean_all, invstd_all, count_all = gathered.view(world, 2 * c + 1).split([c, c, 1], dim=1)
        counts = count_all.reshape(-1)
        if running_mean is not None:
            counts = counts.to(running_mean.dtype)
        mean, invstd = torch.batch_norm_gather_stats_with_counts(
            x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts)
        ctx.save_for_backward(x, weight, mean, invstd, count_all.reshape(-1).to(torch.int32))
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if not grad_out.is_contiguous(memory_format=torch.channels_last):
            grad_out = grad_out.contiguous()
        x, weight, mean, invstd, counts = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu, grad_w, grad_b = torch.batch_norm_backward_reduce(
            grad_out, x, mean, invstd, weight, need_x, need_w, need_b)
        grad_x = None
        if need_x:
            c = sum_dy.shape[0]
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            sum_dy, sum_dy_xmu = sums.split(c)
            w = weight.to(mean.dtype) if weight is not None else None
            grad_x = torch.batch_norm_backward_elemt(grad_out, x, mean, invstd, w, sum_dy, sum_dy_xmu, counts)
        return (grad_x, grad_w if need_w else None, grad_b if need_b else None,
                None, None, None, None, None)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d in ``module`` by a ``GlobalBatchNorm2d`` (in place, keeping parameters
    and running statistics): global-batch moments, with fused kernels on CUDA/NCCL and with plain
    autograd ops elsewhere.

    Both paths follow the gradient convention above: the backward sums the incoming gradients over
    ranks, exactly like the autograd all-reduce of ``all_reduce_sum``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=child.weight.device if child.affine else None)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


__all__ = [
    "GlobalBatchNorm2d", "all_reduce_sum", "all_reduce_sum_", "average_gradients", "broadcast_parameters",
    "convert_batchnorm", "is_distributed", "is_main", "rank", "world_size",
]

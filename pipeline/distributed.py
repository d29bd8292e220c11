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
    from torch.distributed.nn.functional import all_reduce

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

        μ = Σ_r Σ x / N,   σ² = Σ_r Σ x² / N − μ²,   N = Σ_r b_r·h·w     (one differentiable all-reduce)

    Unlike ``nn.SyncBatchNorm`` it runs on CPU (gloo) too, which the parity test needs. The moments
    are computed in fp32 (fp64 for float64 inputs) whatever the autocast dtype. Evaluation mode uses the running statistics.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
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


def convert_batchnorm(module: nn.Module, device: torch.device | None = None) -> nn.Module:
    """Global-batch BatchNorm for every nn.BatchNorm2d in ``module`` (in place, keeping parameters and
    running statistics): torch's fused ``nn.SyncBatchNorm`` on CUDA, ``GlobalBatchNorm2d`` elsewhere.

    Both follow the gradient convention above: SyncBatchNorm's backward sums the incoming gradients over
    ranks, exactly like the autograd all-reduce of GlobalBatchNorm2d's moments."""
    if device is not None and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=child.weight.device if child.affine else None)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child, device)
    return module


__all__ = [
    "GlobalBatchNorm2d", "all_reduce_sum", "all_reduce_sum_", "average_gradients", "broadcast_parameters",
    "convert_batchnorm", "is_distributed", "is_main", "rank", "world_size",
]

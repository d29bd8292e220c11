"""Sizes that no machine can hold are refused before anything is allocated.

A lower bound of the memory one training worker needs, from the config alone (the networks are built on
PyTorch's meta device, which allocates nothing):

    params  = parameters of f and g                            (exact)
    weights = params · s · (4 if on the CPU else 1)            (weights, gradients, Adam's two moments; on
                                                                a GPU only the copy built on the host)
    batch   = b · C · H² · s                                   (one input batch, where it is decoded)
    codes   = b · ndf · (H/2)² · s  (CPU training only)        (the first stage's codes of that batch)
    need   >= weights + batch + codes

with s = 8 bytes for fp64, else 4, b = train.batch_size_per_worker, C = model.in_channels, H =
model.image_size. The true need is several times larger (every stage's activations, the FISTA iterates,
autograd's saved tensors), so a config this refuses can never run; one it passes may still run out of
memory later.
"""
from __future__ import annotations

import os

import torch

from models import build_models
from pipeline.config import ConfigError, ExperimentConfig


def host_memory_bytes() -> int:
    """Physical memory of this machine (0 when the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def parameter_count(cfg: ExperimentConfig) -> int:
    """Parameters of the encoder and decoder of ``cfg.model``, counted on the meta device."""
    with torch.device("meta"):
        encoder, decoder = build_models(cfg.model)
    return sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for p in decoder.parameters())


def worker_memory_lower_bound(cfg: ExperimentConfig) -> tuple[int, str]:
    """(bytes, how they add up): the lower bound of the module docstring for one training worker."""
    m, b = cfg.model, cfg.train.batch_size_per_worker
    s = 8 if cfg.train.precision == "fp64" else 4
    params = parameter_count(cfg)
    on_cpu = not cfg.scaling.use_gpu
    weights = params * s * (4 if on_cpu else 1)
    batch = b * m.in_channels * m.image_size ** 2 * s
    codes = b * m.ndf * (m.image_size // 2) ** 2 * s if on_cpu else 0
    how = (f"{params / 1e6:,.1f} M parameters (model.ndf={m.ndf}, model.nz={m.nz}, model.image_size={m.image_size})"
           f" and a batch of train.batch_size_per_worker={b} images of {m.in_channels}×{m.image_size}×{m.image_size}")
    return weights + batch + codes, how


def batch_bytes(batch_size: int, channels: int, image_size: int) -> int:
    """Bytes of one float32 batch of images."""
    return batch_size * channels * image_size ** 2 * 4


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"


def check_worker_memory(cfg: ExperimentConfig, available: int, where: str = "this machine") -> None:
    """ConfigError when one worker's lower bound exceeds ``available`` bytes (0 = unknown: no check)."""
    if available <= 0:
        return
    need, how = worker_memory_lower_bound(cfg)
    if need > available:
        raise ConfigError(f"one training worker needs at least {format_bytes(need)} of memory ({how}), but "
                          f"{where} has {format_bytes(available)}. Lower train.batch_size_per_worker, "
                          f"model.image_size or model.ndf.")


def check_batch_memory(batch_size: int, channels: int, image_size: int, available: int, option: str) -> None:
    """ConfigError when one float32 batch alone exceeds ``available`` bytes (0 = unknown: no check)."""
    need = batch_bytes(batch_size, channels, image_size)
    if available > 0 and need > available:
        raise ConfigError(f"{option}={batch_size}: one batch of {channels}×{image_size}×{image_size} images needs "
                          f"{format_bytes(need)}, but this machine has {format_bytes(available)}; lower {option}")

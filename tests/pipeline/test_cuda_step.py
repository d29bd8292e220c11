"""The training step on a CUDA GPU: no host-device synchronisation inside it, bf16 networks with fp32
statistics, and the same global objective with the fused global BatchNorm on 2 GPUs.

Skipped without a GPU (marker ``gpu``); run on the GPU machine with ``pytest -m gpu``.
``torch.cuda.set_sync_debug_mode("error")`` makes every operation that would make the host wait for
the device (an ``.item()``, a boolean-mask index, a blocking copy) raise instead.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import load_config

pytestmark = pytest.mark.gpu


class _Null:
    def metrics(self, *a): ...
    def images(self, *a): ...
    def checkpoint(self, *a): ...


def _trainer(mode: str, rank: int = 0, world: int = 1, extra: list[str] | None = None):
    from pipeline.trainer import CTRLTrainer

    cfg = load_config(None, [
        "model.preset=csc_ctrl_debug", f"objective.mode={mode}", "objective.num_classes=4",
        "train.batch_size_per_worker=64", "train.steps=100", "data.synthetic=true", "train.precision=bf16",
        f"scaling.num_workers={world}", "scaling.use_gpu=true", "objective.consistency_weight=0.1",
        "train.encoder_steps_per_decoder_step=2", *(extra or [])])
    device = torch.device(f"cuda:{rank}")
    g = torch.Generator(device=device).manual_seed(rank)
    x = torch.rand(64, 3, 32, 32, device=device, generator=g) * 2 - 1
    labels = torch.arange(64, device=device) % 4
    trainer = CTRLTrainer(cfg, device=device, num_classes=4, batches=iter(()), reporter=_Null())
    return trainer, x.contiguous(memory_format=trainer.memory_format), labels


def _steps_without_sync(trainer, x, labels, n: int = 2) -> None:
    trainer.train_step(x, labels)  # warm-up: cold-start power iterations, cuBLAS/cuDNN handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(n):
            trainer.train_step(x, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_train_step_never_waits_for_the_device(mode):
    trainer, x, labels = _trainer(mode)
    _steps_without_sync(trainer, x, labels)
    assert trainer.raise_if_nonfinite() is None  # the accumulated terms are finite


def test_networks_in_bf16_statistics_in_fp32():
    trainer, x, labels = _trainer("multiclass")
    with trainer._autocast():
        z = trainer.encoder(x)
        x_hat = trainer.decoder(z)
    assert x_hat.dtype == torch.bfloat16  # the networks' arithmetic
    terms = trainer.objective(z, trainer.encoder(x_hat.float()), labels)
    assert terms.objective.dtype == torch.float32 and terms.delta_r_z.dtype == torch.float32


def _sync_free_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    try:
        trainer, x, labels = _trainer("multiclass", rank=rank, world=2)
        from pipeline.distributed import GlobalBatchNorm2d

        assert any(isinstance(m, GlobalBatchNorm2d) for m in trainer.raw_encoder.modules())
        _steps_without_sync(trainer, x, labels)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_step_never_waits_for_the_device():
    """Global BatchNorm, Gram all-reduce and gradient averaging on NCCL add no host synchronisation."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_sync_free_worker, args=(port,), nprocs=2, join=True, start_method="spawn")


def test_tf32_class_grams_stay_close_to_fp32():
    """The trainer's bf16 mode forms the class Grams on TF32 tensor cores (models.rate_reduction.class_gram):
    the Grams, their gradients and the multiclass objective stay within 1e-3 of fp32."""
    from models.ctrl import ctrl_objective, ctrl_statistics
    from models.rate_reduction import class_gram

    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(2000, 512, device="cuda", generator=g), dim=1)
    z_hat = torch.nn.functional.normalize(z + 0.5 * torch.randn(2000, 512, device="cuda", generator=g), dim=1)
    labels = torch.randint(0, 10, (2000,), device="cuda", generator=g)
    weights = torch.randn(10, 512, 512, device="cuda", generator=g)
    out = {}
    for tf32 in (False, True):
        leaf = z.clone().requires_grad_()
        grams = class_gram(leaf, labels, 10, tf32=tf32)[0]
        (grad,) = torch.autograd.grad((grams * weights).sum(), leaf)
        terms = ctrl_objective(ctrl_statistics(z, z_hat, labels, 10, "multiclass", tf32_grams=tf32), "multiclass", 0.5)
        out[tf32] = (grams, grad, terms.objective)
    for fast, exact in zip(out[True], out[False]):
        assert ((fast - exact).norm() / exact.norm()).item() < 1e-3

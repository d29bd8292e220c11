"""Global-batch parity: 2 workers × batch b optimise exactly the objective of 1 worker × batch 2b.

Two gloo processes on CPU each take half of a fixed batch; one process takes all of it. In float64 (so
that only the order of summation differs), after one full CTRL iteration (encoder step, then decoder step) the objective terms, the averaged gradients of both
players and the updated parameters must agree. This pins the gradient-scale convention written in
pipeline/distributed.py: autograd all-reduce of the statistics (×W per rank) + mean of the gradients.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import load_config

B = 6  # per-worker batch


def _config(mode: str, world: int):
    return load_config(None, [
        "model.preset=csc_ctrl_debug", f"objective.mode={mode}", "objective.num_classes=3",
        f"train.batch_size_per_worker={B * (2 // world)}", "train.steps=1", "data.synthetic=true",
        "train.precision=fp64", f"scaling.num_workers={world}", "optim.encoder.lr=1e-2", "optim.decoder.lr=1e-2",
        "objective.consistency_weight=0.1",
    ])


def _inputs():
    g = torch.Generator().manual_seed(1234)
    x = torch.rand(2 * B, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.arange(2 * B) % 3
    return x, labels


def _one_iteration(mode: str, world: int, rank: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    from pipeline.trainer import CTRLTrainer

    class Null:
        def metrics(self, *a): ...
        def images(self, *a): ...
        def checkpoint(self, *a): ...

    cfg = _config(mode, world)
    x, labels = _inputs()
    if world == 2:
        x, labels = x[rank * B:(rank + 1) * B], labels[rank * B:(rank + 1) * B]
    if device == "cuda":
        device = f"cuda:{rank}"
        x, labels = x.to(device), labels.to(device)
    trainer = CTRLTrainer(cfg, device=torch.device(device), num_classes=3, batches=iter(()), reporter=Null())
    out: dict[str, torch.Tensor] = {}
    enc_terms = trainer.encoder_step(x, labels)
    out.update({f"enc_term/{k}": v.detach() for k, v in enc_terms.as_dict().items()})
    out.update({f"enc_grad/{n}": p.grad.clone() for n, p in trainer.raw_encoder.named_parameters() if p.grad is not None})
    dec_terms, _ = trainer.decoder_step(x, labels)
    out.update({f"dec_term/{k}": v.detach() for k, v in dec_terms.as_dict().items()})
    own = {id(p) for p in trainer.decoder_params}
    out.update({f"dec_grad/{n}": p.grad.clone() for n, p in trainer.raw_decoder.named_parameters()
                if id(p) in own and p.grad is not None})
    out.update({f"param/enc/{n}": p.detach().clone() for n, p in trainer.raw_encoder.named_parameters()})
    out.update({f"param/dec/{n}": p.detach().clone() for n, p in trainer.raw_decoder.named_parameters()})
    return {k: v.cpu() for k, v in out.items()}


def _worker(rank: int, mode: str, port: int, path: str, device: str = "cpu") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=2)
    try:
        out = _one_iteration(mode, 2, rank, device)
        torch.save(out, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.parametrize("device", [
    "cpu",
    # NCCL and the fused global BatchNorm of pipeline/distributed.py (its CUDA path).
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _two_gpus(), reason="needs 2 GPUs")]),
])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_two_workers_equal_one_worker_with_twice_the_batch(mode, device, tmp_path):
    single = _one_iteration(mode, 1, 0, device)
    path = str(tmp_path / "out")
    mp.start_processes(_worker, args=(mode, _free_port(), path, device), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(f"{path}.rank{r}", weights_only=True) for r in range(2)]

    assert set(single) == set(ranks[0])
    for key, ref in single.items():
        for r in range(2):
            torch.testing.assert_close(ranks[r][key], ref, rtol=1e-6, atol=1e-9, msg=lambda m, key=key, r=r: f"{key} rank {r}: {m}")
    # The comparison is not vacuous: the step changed the parameters and the gradients are non-zero.
    assert any(single[k].abs().sum() > 0 for k in single if k.startswith("enc_grad/"))
    assert any(single[k].abs().sum() > 0 for k in single if k.startswith("dec_grad/"))


def test_per_rank_objective_would_differ():
    """Sanity: ΔR of one half of the batch is not ΔR of the whole batch, so the parity above is a real test."""
    from models.ctrl import ctrl_objective, ctrl_statistics

    def pair_rate_reduction(a, b):
        return ctrl_objective(ctrl_statistics(a, b, None, 1, "binary"), "binary", 0.5).delta_r_z_zhat

    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(2 * B, 16), dim=1)
    zh = torch.nn.functional.normalize(torch.randn(2 * B, 16), dim=1)
    whole = pair_rate_reduction(z, zh)
    half = pair_rate_reduction(z[:B], zh[:B])
    assert not torch.allclose(whole, half, rtol=1e-3)

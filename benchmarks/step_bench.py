"""Time the full CSC-CTRL training step against its networks alone, on one GPU.

    python benchmarks/step_bench.py [--configs prototype32-multi,...] [--precisions fp32,tf32,bf16] [--out FILE]

"Full step" = one CTRL iteration of pipeline/trainer.py exactly as training runs it: `inner` encoder
steps (f(X), g(Z) without graph, f(X̂), Gram statistics, batched-Cholesky ΔR, backward, Adam, dictionary
refresh) then one decoder step. "Networks only" = the same calls, backward passes, optimizers and
refreshes with the rate-reduction objective replaced by a trivial linear read-out of Z and Ẑ, so the
difference between the two is the cost of the loss. Synthetic data on the device (the data path is
measured separately). Timing: warm-up, then CUDA events around each iteration; medians reported.
FLOPs per image are counted with torch.utils.flop_counter on one iteration.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config
from pipeline.trainer import CTRLTrainer

CONFIGS = {
    # name: (overrides, num_classes)
    "prototype32-multi": (["model.preset=csc_ctrl_prototype32", "objective.mode=multiclass",
                           "train.batch_size_per_worker=2000", "train.encoder_steps_per_decoder_step=1"], 10),
    "prototype32-binary": (["model.preset=csc_ctrl_prototype32", "objective.mode=binary",
                            "train.batch_size_per_worker=2000", "train.encoder_steps_per_decoder_step=1"], 1),
    "default32-multi": (["model.preset=csc_ctrl_32", "objective.mode=multiclass",
                         "train.batch_size_per_worker=1600", "train.encoder_steps_per_decoder_step=2"], 10),
    "preset128-binary": (["model.preset=csc_ctrl_128", "objective.mode=binary",
                          "train.batch_size_per_worker=300", "optim.encoder.betas=[0.0, 0.9]",
                          "optim.decoder.betas=[0.0, 0.9]"], 1),
}


class _Terms:
    """Stand-in for CTRLTerms with the objective replaced by a linear read-out (networks-only timing)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.objective = value
        self.consistency = value.detach() * 0

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"objective": self.objective}


class NetworksOnly(CTRLTrainer):
    def objective(self, z, z_hat, labels):
        return _Terms((z.float() * self._w).sum() + (z_hat.float() * self._w).sum())


def build(name: str, precision: str, compile_: bool, networks_only: bool) -> tuple[CTRLTrainer, torch.Tensor, torch.Tensor]:
    overrides, k = CONFIGS[name]
    cfg = load_config(None, overrides + [f"train.precision={precision}",
                                         "data.synthetic=true", "scaling.num_workers=0", "scaling.use_gpu=true",
                                         f"train.compile={str(compile_).lower()}", "train.steps=1000000"])
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    device = torch.device("cuda")
    cls = NetworksOnly if networks_only else CTRLTrainer
    tr = cls(cfg, device=device, num_classes=k, batches=iter(()), reporter=None)
    if networks_only:
        tr._w = torch.randn(cfg.model.nz, device=device) / cfg.model.nz
    b, m = cfg.train.batch_size_per_worker, cfg.model
    x = (torch.rand(b, m.in_channels, m.image_size, m.image_size, device=device) * 2 - 1)
    x = x.contiguous(memory_format=tr.memory_format)
    labels = torch.randint(0, k, (b,), device=device)
    return tr, x, labels


def time_steps(tr: CTRLTrainer, x: torch.Tensor, labels: torch.Tensor, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        tr.train_step(x, labels)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        tr.train_step(x, labels)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def count_flops(tr: CTRLTrainer, x: torch.Tensor, labels: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        tr.train_step(x, labels)
    return float(fc.get_total_flops())


def profile_step(tr: CTRLTrainer, x: torch.Tensor, labels: torch.Tensor, rows: int = 25) -> str:
    """The GPU kernels of one full step, by total device time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        tr.train_step(x, labels)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--precisions", default="fp32,tf32,bf16")
    p.add_argument("--compile", default="off", help="off, on, or both")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="")
    p.add_argument("--profile", default="", help="also write the top kernels of one full step to this file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for name in args.configs.split(","):
        for precision in args.precisions.split(","):
            for comp in compiles:
                row = {"config": name, "precision": precision, "compile": comp}
                for kind, networks_only in (("full", False), ("nets", True)):
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    tr, x, labels = build(name, precision, comp, networks_only)
                    times = time_steps(tr, x, labels, args.warmup, args.iters)
                    ms = statistics.median(times)
                    flops = count_flops(tr, x, labels) if not comp else float("nan")
                    if args.profile and not networks_only:
                        with open(args.profile, "a") as f:
                            f.write(f"## {name} {precision} compile={comp}\n{profile_step(tr, x, labels)}\n")
                    row[f"{kind}_ms"] = ms
                    row[f"{kind}_img_s"] = x.shape[0] / (ms / 1000)
                    row[f"{kind}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    row[f"{kind}_gflop_img"] = flops / x.shape[0] / 1e9
                    row[f"{kind}_tflops"] = flops / (ms / 1000) / 1e12
                    del tr, x, labels
                rows.append(row)
                print(f"{name:20s} {precision:5s} compile={comp!s:5s} full {row['full_img_s']:9.0f} img/s "
                      f"({row['full_ms']:.2f} ms) | nets {row['nets_img_s']:9.0f} img/s ({row['nets_ms']:.2f} ms) | "
                      f"full/nets {row['full_ms'] / row['nets_ms']:.3f} | peak {row['full_peak_gib']:.1f} GiB", flush=True)
    header = (f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"{datetime.date.today().isoformat()} | warmup {args.warmup}, median of {args.iters}\n\n")
    table = ["| config | precision | compile | full step img/s | full ms | nets-only img/s | nets ms | full/nets "
             "| peak GiB (full) | GFLOP/img | achieved TFLOP/s (full) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['config']} | {r['precision']} | {r['compile']} | {r['full_img_s']:,.0f} | "
                     f"{r['full_ms']:.2f} | {r['nets_img_s']:,.0f} | {r['nets_ms']:.2f} | "
                     f"{r['full_ms'] / r['nets_ms']:.3f} | {r['full_peak_gib']:.1f} | {r['full_gflop_img']:.2f} | "
                     f"{r['full_tflops']:.1f} |")
    text = header + "\n".join(table) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

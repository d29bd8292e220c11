"""End-to-end `cscctrl train` throughput on GPUs: real shards through the streaming reader vs synthetic
data (same run otherwise), and 1 vs N Ray Train workers at equal per-GPU batch.

    python benchmarks/train_bench.py --shards DIR [--gpus 1,2] [--steps 200] [--out FILE] [KEY=VALUE ...]

Trailing KEY=VALUE overrides go to every case (e.g. scaling.sync_batchnorm=false).

Each case is a real `python -m pipeline train` subprocess (Ray Train, global-batch rate reduction,
MLflow in a local sqlite store). Throughput is read from the progress lines: the median images/s of
the logging windows after the first (which holds start-up and warm-up).
"""
from __future__ import annotations

import argparse
import datetime
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LINE = re.compile(r"step (\d+)/\d+ \| ([\d,]+) img/s .*data wait (\d+)%")

BASE = ["model.preset=csc_ctrl_prototype32", "objective.mode=multiclass", "objective.num_classes=10",
        "train.batch_size_per_worker=2000", "train.image_every=0", "train.eval_batches=0",
        "tracking.log_model=false", "scaling.use_gpu=true", "scaling.cpus_per_worker=4"]


def run_case(name: str, overrides: list[str], steps: int, log_every: int) -> dict:
    with tempfile.TemporaryDirectory() as storage:
        cmd = [sys.executable, "-m", "pipeline", "train", *BASE, *overrides, f"train.steps={steps}",
               f"train.log_every={log_every}", f"train.checkpoint_every={steps}", f"run.storage_path={storage}",
               f"run.name={name}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    windows = [(int(s), float(r.replace(",", "")), int(w)) for s, r, w in LINE.findall(proc.stdout)]
    if proc.returncode != 0 or len(windows) < 2:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{name} failed (rc {proc.returncode}):\n{tail}")
    rates = [r for _, r, _ in windows[1:]]
    waits = [w for _, _, w in windows[1:]]
    return {"case": name, "img_s": statistics.median(rates), "data_wait_pct": statistics.median(waits),
            "windows": len(rates)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="", help="shard set (the demo crops at 32 px are fine)")
    p.add_argument("--gpus", default="1", help="comma-separated worker counts to compare (one GPU each)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--loader-workers", type=int, default=6, help="DataLoader processes per GPU worker")
    p.add_argument("--synthetic-only", action="store_true", help="skip the shard cases (scaling only)")
    p.add_argument("--out", default="")
    p.add_argument("overrides", nargs="*", help="config overrides for every case (KEY=VALUE)")
    args = p.parse_args()
    rows = []
    for n in [int(g) for g in args.gpus.split(",")]:
        common = [f"scaling.num_workers={n}", f"data.loader_workers={args.loader_workers}", *args.overrides]
        syn = run_case(f"synthetic-{n}gpu", common + ["data.synthetic=true"], args.steps, args.log_every)
        cases = [syn]
        if not args.synthetic_only:
            cases.append(run_case(f"shards-{n}gpu", common + [f"data.shards={args.shards}"], args.steps, args.log_every))
        for r in cases:
            r["gpus"] = n
            rows.append(r)
            print(r, flush=True)
    base = {r["case"].split("-")[0]: r["img_s"] for r in rows if r["gpus"] == 1}
    lines = [f"`cscctrl train` end to end | prototype-equal 32 px config, multiclass (10), batch 2000 per GPU, "
             f"bf16 | {datetime.date.today().isoformat()} | {args.steps} steps, median of logging windows after the first"
             f"{' | ' + ' '.join(args.overrides) if args.overrides else ''}\n",
             "| case | GPUs | images/s | per GPU | vs synthetic (same GPUs) | scaling vs 1 GPU | data wait % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kind = r["case"].split("-")[0]
        syn = next(x["img_s"] for x in rows if x["gpus"] == r["gpus"] and x["case"].startswith("synthetic"))
        scale = r["img_s"] / base[kind] if kind in base else float("nan")
        lines.append(f"| {r['case']} | {r['gpus']} | {r['img_s']:,.0f} | {r['img_s'] / r['gpus']:,.0f} | "
                     f"{r['img_s'] / syn:.3f} | {scale:.2f}x | {r['data_wait_pct']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

"""`cscctrl demo`: the whole pipeline on the embedded default, in minutes on a laptop CPU.

It runs the bundled workflow pipeline/workflows/demo.yaml (`cscctrl run demo`); the stages are cached,
so running it again skips what is done and resumes what was interrupted:

1. shard: a seeded 10 000-image subset of each Fashion-MNIST split (Debian's dataset-fashion-mnist, which
   scripts/setup.sh installs) → WebDataset shards + manifest, as Ray tasks;
2. verify the shards; tune: a 2-trial λ sweep;
3. train the best trial's config longer: a small 32 px CSC-CTRL model, multiclass game over the 10
   classes, with 2 Ray Train workers, tracked in a local MLflow store, checkpointed; its logged PSNR
   rises from ~7 dB (the untrained decoder) as the reconstructions form;
4. evaluate on held-out test images and on crops of real photos it never saw (the demo source, sharded
   by the evaluate stage), writing reports; register the model; print how to browse the run in the
   MLflow UI and where the pictures are.

The photo crops are not the training data because, measured on 2 CPUs, CTRL (CSC or plain convolutions,
binary or with the photo as class) does not learn to reconstruct natural-image crops in minutes.
`ensure_demo_shards` (sharding/ensure.py) still writes them: `cscctrl train` without data.shards trains on them, and tests use
them as small real colour images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.workflow import run as run_workflow_command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default="runs/demo", help="where shards, checkpoints and the MLflow store go")
    p.add_argument("--steps", type=int, default=150, help="training steps (default 150: about 3 minutes on 2 cores)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (CPU)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="extra training config overrides")


def main(args: argparse.Namespace) -> int:
    """Run the bundled workflow pipeline/workflows/demo.yaml (shard -> verify -> 2-trial sweep -> train ->
    evaluate on val and unseen -> register csc-ctrl-demo@candidate) with the options mapped to its keys."""
    storage = str(Path(args.storage).expanduser().resolve())
    items = [f"storage={storage}", f"train.steps={args.steps}", f"scaling.num_workers={args.workers}",
             *args.overrides]
    rc = run_workflow_command("demo", items)
    if rc == 0:
        print("\n[demo] done. Browse the runs:\n"
              f"  {Path(sys.executable).with_name('mlflow')} ui --backend-store-uri sqlite:///{storage}/mlflow.db "
              f"--host 127.0.0.1 --port 5000\n  then open http://127.0.0.1:5000 (experiment 'cscctrl-demo'; "
              f"model 'csc-ctrl-demo', alias 'candidate')\n  stage records: {storage}/workflows/demo/stages.json",
              flush=True)
    return rc

"""Fidelity probe: train CSC-CTRL in-process on in-memory images and measure what issue 15 asks for.

The project's own trainer (pipeline.trainer.CTRLTrainer, no Ray, no MLflow) on Fashion-MNIST or photo crops
held in memory, so that many variants run side by side on one GPU (or quickly on CPU). Each run prints
one JSON line per evaluation: test PSNR / standard SSIM, stage-1 PSNR (A₁z₁ against x), per-stage residual
and non-zero fraction, atom roughness / drift / flat / chroma, mean cos(z, ẑ), and wall time.

    python benchmarks/fidelity/probe.py --data fmnist --steps 300 --eval-every 100 \
        model.preset=csc_ctrl_debug model.in_channels=1 ...overrides

The final results of benchmarks/results/ come from `cscctrl train` + `cscctrl eval`; this script is for
the experiments that choose what those runs use.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models import build_models
from models.dictionary import dictionary_summary, nonzero_fraction, relative_residual
from pipeline.config import load_config
from pipeline.metrics import psnr
from pipeline.trainer import CTRLTrainer


def load_fmnist(size: int, channels: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from PIL import Image

    from sharding.sources import FASHION_MNIST_FILES, _idx_path, find_fashion_mnist, read_idx

    root = str(find_fashion_mnist())
    out = {}
    for split, (im, lb) in FASHION_MNIST_FILES.items():
        images = read_idx(_idx_path(root, im))
        labels = read_idx(_idx_path(root, lb))
        arr = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC)) for a in images])
        x = torch.from_numpy(arr).float().div(127.5).sub(1.0)[:, None]
        if channels == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
        out[split] = (x, torch.from_numpy(labels.astype(np.int64)))
    return out


def load_photos(size: int, channels: int, n_train: int, n_test: int, seed: int = 0):
    """Crops of the bundled photos (sharding.sources.DemoSource) in memory."""
    import io

    from PIL import Image

    from sharding.sources import DemoSource

    src = DemoSource(seed=seed, train=n_train, val=n_test, unseen=n_test, size=size)
    listing = src.list()
    out = {}
    for split, items in listing.splits.items():
        arrs, labels = [], []
        for it in items:
            im = Image.open(io.BytesIO(src.read(it))).convert("RGB" if channels == 3 else "L")
            a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
            arrs.append(a.transpose(2, 0, 1) if channels == 3 else a[None])
            labels.append(it.label)
        out[split] = (torch.from_numpy(np.stack(arrs)), torch.tensor(labels))
    return out


def ssim01(x: torch.Tensor, y: torch.Tensor) -> float:
    from pipeline.metrics import ssim

    return float(ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0))


def batches(x, y, batch, device, generator, flip):
    n = x.shape[0]
    while True:
        idx = torch.randint(0, n, (batch,), generator=generator, device=generator.device)
        xb = x[idx]
        if flip:
            m = torch.rand(batch, generator=generator, device=generator.device) < 0.5
            xb[m] = xb[m].flip(-1)
        yield xb, y[idx]


class Silent:
    def __init__(self):
        self.history = []

    def metrics(self, step, metrics):
        self.history.append((step, metrics))

    def images(self, step, trainer, x):
        pass

    def checkpoint(self, step, state, metrics):
        pass


@torch.no_grad()
def measure(trainer, initial, x, dev, batch=1000, pictures=""):
    enc, dec = trainer.raw_encoder.eval(), trainer.raw_decoder.eval()
    out = {"psnr": [], "ssim": [], "stage1_psnr": [], "cos": []}
    res, nnz = None, None
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch].to(dev, dtype=trainer.dtype)
        with trainer._autocast():
            z, codes, inputs = enc.forward_stages(xb)
            xh = dec(z)
            zh = enc(xh)
        xh = xh.float()
        out["psnr"].append(float(psnr(xh, xb.float())) * len(xb))
        out["ssim"].append(ssim01(xh.clamp(-1, 1).cpu(), xb.float().cpu()) * len(xb))
        out["cos"].append(float(F.cosine_similarity(z.float(), zh.float(), dim=1).sum()))
        layers = enc.csc_layers()
        if hasattr(layers[0], "lipschitz"):
            a1z1 = layers[0].synthesize(codes[0].float(), tuple(xb.shape[-2:]))
            out["stage1_psnr"].append(float(psnr(a1z1.clamp(-1, 1), xb.float())) * len(xb))
            r = [float(relative_residual(l, h, c)) for l, h, c in zip(layers[:-1], inputs[:-1], codes[:-1])]
            res = r if res is None else [a + b for a, b in zip(res, r)]
        z_nnz = [float(nonzero_fraction(c)) for c in codes]
        nnz = z_nnz if nnz is None else [a + b for a, b in zip(nnz, z_nnz)]
    # Same item, not its class: is x̂ᵢ nearer (in pixels) to xᵢ than to every other image of the first 1000?
    k = min(1000, x.shape[0])
    xs = x[:k].to(dev).float().flatten(1)
    with trainer._autocast():
        xh_all = dec(enc(x[:k].to(dev, dtype=trainer.dtype))).float().flatten(1)
    out["item_match"] = [float((torch.cdist(xh_all, xs).argmin(1) == torch.arange(k, device=dev)).float().sum())
                         * x.shape[0] / k]
    if pictures:
        from pipeline.pictures import atom_tiles, recon_grid

        recon_grid(x[:32].float(), xh_all[:32].view(32, *x.shape[1:]).cpu()).save(f"{pictures}-recon.png")
        w = enc.csc_layers()[0].weight.detach().float().cpu()
        atom_tiles(w.mean(1, keepdim=True) if w.shape[1] == 3 else w, zoom=6).save(f"{pictures}-atoms1-luma.png")
    n, nb = x.shape[0], math.ceil(x.shape[0] / batch)
    result = {k: sum(v) / n for k, v in out.items() if v}
    result["cos"] = sum(out["cos"]) / n
    if res:
        result["residual"] = [round(v / nb, 3) for v in res]
    result["nonzero"] = [round(v / nb, 3) for v in nnz]
    w = enc.csc_layers()[0].weight
    summ = dictionary_summary(w, initial)
    result.update({f"atoms1_{k}": round(float(v), 3) for k, v in summ.items()})
    enc.train(), dec.train()
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["fmnist", "photos"], default="fmnist")
    p.add_argument("--train-subset", type=int, default=0, help="use the first N training images (0 = all)")
    p.add_argument("--test-n", type=int, default=2000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default="")
    p.add_argument("-c", "--config", default="")
    p.add_argument("--pictures", default="", help="folder for the final reconstruction grid and stage-1 atoms")
    p.add_argument("--consistency-players", choices=["both", "decoder"], default="both",
                   help="diagnostic: 'decoder' drops the sample-wise term from the encoder's loss")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.consistency_players == "decoder":  # diagnostic: the encoder ignores the sample-wise term
        import pipeline.trainer as T

        original = T.player_loss
        T.player_loss = lambda terms, player, w: original(terms, player, w if player == "decoder" else 0.0)
    cfg = load_config(a.config or None, ["scaling.num_workers=0", f"train.steps={a.steps}",
                                               "train.log_every=1000000", "train.checkpoint_every=1000000",
                                               "train.image_every=0", *a.overrides])
    size, ch = cfg.model.image_size, cfg.model.in_channels
    t0 = time.time()
    if a.data == "fmnist":
        data = load_fmnist(size, ch)
        test = data["val"][0][: a.test_n]
    else:
        data = load_photos(size, ch, n_train=a.train_subset or 8192, n_test=a.test_n)
        test = data["val"][0]
        data["unseen_x"] = data["unseen"][0]
    xtr, ytr = data["train"]
    if a.train_subset and a.data == "fmnist":
        xtr, ytr = xtr[: a.train_subset], ytr[: a.train_subset]
    dev = torch.device(a.device)
    xtr, ytr = xtr.to(dev), ytr.to(dev)
    g = torch.Generator(device=dev).manual_seed(cfg.run.seed)
    num_classes = int(ytr.max()) + 1
    torch.manual_seed(cfg.run.seed)
    initial = build_models(cfg.model)[0].csc_layers()[0].weight.detach().clone()
    it = batches(xtr, ytr, cfg.train.batch_size_per_worker, dev, g, cfg.data.flip)
    rep = Silent()
    trainer = CTRLTrainer(cfg, device=dev, num_classes=num_classes, batches=it, reporter=rep)
    load_s = time.time() - t0
    t_train = 0.0
    while trainer.step < cfg.train.steps:
        t1 = time.perf_counter()
        target = min(cfg.train.steps, trainer.step + a.eval_every)
        while trainer.step < target:
            xb, yb = next(it)
            trainer.train_step(xb.to(trainer.dtype), yb)
            trainer.step += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t1
        final = trainer.step >= cfg.train.steps
        pics = f"{a.pictures}/{a.tag}" if (a.pictures and final) else ""
        r = measure(trainer, initial, test, dev, pictures=pics)
        if a.data == "photos":
            u = measure(trainer, initial, data["unseen_x"], dev, pictures=pics + "-unseen" if pics else "")
            r.update({f"unseen_{k}": v for k, v in u.items() if k in ("psnr", "ssim", "stage1_psnr", "item_match")})
        r.update(step=trainer.step, train_s=round(t_train, 1), tag=a.tag)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    print(f"# load {load_s:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()

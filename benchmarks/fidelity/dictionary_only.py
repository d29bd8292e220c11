"""Stage 1 alone as convolutional dictionary learning: no game, no decoder.

One CSCLayer (64 atoms of C×4×4, stride 2) codes image batches with n unrolled FISTA steps. Its atoms then
take an Adam step on the dictionary loss (docs/method.md §2.2 eq. 5), and are projected back to unit norm.
At the end it codes held-out images and prints one JSON line:
- the residual, the non-zero share and the PSNR of A z;
- the atoms' roughness, flat and chroma fractions and drift.

Held-out images are the Fashion-MNIST test split, or photo crops of the `unseen` split, whose photos
training never sees. This shows what sparse coding alone does to the atoms, without the closed-loop game.

    python benchmarks/fidelity/dictionary_only.py --data photos --n-steps 10 --lam 0.1 --lr 1e-2 --steps 600
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models.csc import CSCLayer
from models.dictionary import dictionary_loss, dictionary_summary, nonzero_fraction
from probe import load_fmnist, load_photos


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["fmnist", "photos"], default="fmnist")
    p.add_argument("--n-steps", type=int, default=10, help="unrolled FISTA steps")
    p.add_argument("--lam", type=float, default=0.1, help="sparsity weight λ")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the atoms")
    p.add_argument("--steps", type=int, default=600, help="dictionary updates (batches of 128)")
    p.add_argument("--atoms", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    if a.data == "fmnist":
        data = load_fmnist(32, 1)
        x, test = data["train"][0][:10000], data["val"][0][:500]
    else:
        data = load_photos(32, 3, 4096, 256)
        x, test = data["train"][0], data["unseen"][0]
    layer = CSCLayer(x.shape[1], a.atoms, 4, 2, 1, n_steps=a.n_steps, lam=a.lam)
    initial = layer.weight.detach().clone()
    opt = torch.optim.Adam([layer.weight], lr=a.lr)
    t0 = time.time()
    for _ in range(a.steps):
        batch = x[torch.randint(0, len(x), (128,))]
        loss = dictionary_loss(layer, batch, layer(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.refresh()
    with torch.no_grad():
        z = layer(test)
        residual = float(dictionary_loss(layer, test, z)) ** 0.5
        recon = layer.synthesize(z, (32, 32)).clamp(-1, 1)
        psnr = float(10 * torch.log10(4 / (recon - test).pow(2).mean()))
    atoms = {k: round(float(v), 3) for k, v in dictionary_summary(layer.weight, initial).items()}
    print(json.dumps({"data": a.data, "n_steps": a.n_steps, "lam": a.lam, "lr": a.lr, "steps": a.steps,
                      "heldout_residual": round(residual, 3), "heldout_nonzero": round(float(nonzero_fraction(z)), 3),
                      "heldout_psnr": round(psnr, 2), **atoms, "seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()

"""Issue 24's check: does `--hflip` close the gap to a plain PyTorch loop on digits?

scikit-learn's handwritten digits (1797 images, 8×8, 10 classes) written as a class-sorted
ImageFolder (train/<digit>/, val/<digit>/; every 5th image of a class is val), upscaled ×4
to 32 px (nearest), indexed with `dynaprep index --order source` (shards stay class by
class), 4-px patches. A 2-block ViT (timm vit_tiny with img_size 32, patch 4, dim 64,
2 heads), trained dense (K = 100) with the same recipe four ways:

    dynatrain --hflip 0        plain loop without flips
    dynatrain --hflip 0.5      plain loop with torch flips at p = 0.5

The plain loop reads the same stored PNGs with webdataset's reader, shuffles with
torch.randperm each epoch and uses the same initial weights (same seed), AdamW with timm's
weight-decay groups and a constant LR. Done when |dynatrain − plain| ≤ 3 points both ways
(best top-1 over the epochs; final top-1 printed too).

    .venv/bin/python docs/digits_flip_check.py [--epochs 40] [--work /tmp/digits-flip]

Needs scikit-learn (not a dynavit dependency). `--epochs 30` took 3 min 43 s of CPU here
(OMP_NUM_THREADS=1); the numbers are in docs/RECIPES.md. Exit 1 when a gap exceeds 3 points.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from timm.optim import param_groups_weight_decay

from dynavit.manifests import read_shards, resolve

MODEL = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
BATCH, LR, WD, SEED = 64, 1e-3, 0.05, 0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # dynaprep's default normalisation
BIN = Path(sys.executable).parent


def write_imagefolder(root: Path) -> None:
    from sklearn.datasets import load_digits
    digits = load_digits()
    count = {}
    for image, label in zip(digits.images, digits.target):
        n = count[label] = count.get(label, -1) + 1
        split = "val" if n % 5 == 4 else "train"
        px = np.kron(image * (255 / 16), np.ones((4, 4))).round().astype(np.uint8)  # 8x8 -> 32x32
        d = root / split / str(label)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([px] * 3, -1)).save(d / f"{n:04d}.png")


def read_split(ds: Path, split: str):
    images, labels = [], []
    for row in read_shards(ds).to_pylist():
        if row["split"] == split:
            for s in wds.WebDataset(str(resolve(ds, row["images"])), shardshuffle=False).decode("rgb8"):
                images.append(s["png"])
                labels.append(int(s["cls"]))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.tensor(labels)


def plain_loop(ds: Path, epochs: int, flip: float) -> tuple[float, float]:
    xt, yt = read_split(ds, "train")
    xv, yv = read_split(ds, "val")
    torch.manual_seed(SEED)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **MODEL)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, WD, no_weight_decay_list=model.no_weight_decay()),
                            lr=LR, weight_decay=WD)
    gen = torch.Generator().manual_seed(SEED)
    accs = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(perm) - BATCH + 1, BATCH):
            idx = perm[i:i + BATCH]
            x = xt[idx]
            flips = torch.rand(len(idx), generator=gen) < flip
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            accs.append(100.0 * (model(xv).argmax(1) == yv).float().mean().item())
    return max(accs), accs[-1]


def dynatrain(ds: Path, out: Path, epochs: int, hflip: float) -> tuple[float, float]:
    subprocess.run([str(BIN / "dynatrain"), "--shards", str(ds), "--out", str(out), "--overwrite", "--k", "100",
                    "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(MODEL), "--epochs", str(epochs),
                    "--batch-size", str(BATCH), "--lr", str(LR), "--weight-decay", str(WD), "--sched", "step",
                    "--step-epochs", "100000", "--workers", "0", "--seed", str(SEED), "--hflip", str(hflip)],
                   check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return summary["best_acc1"], summary["final_acc1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--work", type=Path, default=Path("/tmp/digits-flip"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    src, ds = args.work / "imagefolder", args.work / "ds"
    if not (ds / "dataset.json").exists():
        write_imagefolder(src)
        subprocess.run([str(BIN / "dynaprep"), "index", "--data", "imagefolder", "--src", str(src), "--out", str(ds),
                        "--k", "50", "--image-size", "32", "--patch-size", "4", "--format", "png", "--order",
                        "source", "--workers", "1", "--overwrite", "--no-progress"], check=True,
                       stdout=subprocess.DEVNULL)
    rows = {}
    for name, fn in (("plain, no flip", lambda: plain_loop(ds, args.epochs, 0.0)),
                     ("dynatrain --hflip 0", lambda: dynatrain(ds, args.work / "run-hflip0", args.epochs, 0.0)),
                     ("plain, flip p=0.5", lambda: plain_loop(ds, args.epochs, 0.5)),
                     ("dynatrain --hflip 0.5", lambda: dynatrain(ds, args.work / "run-hflip05", args.epochs, 0.5))):
        t = time.perf_counter()
        rows[name] = (*fn(), time.perf_counter() - t)
        print(f"{name:24s} best {rows[name][0]:5.1f} %  final {rows[name][1]:5.1f} %  ({rows[name][2]:.0f} s)",
              flush=True)
    gap0 = rows["dynatrain --hflip 0"][0] - rows["plain, no flip"][0]
    gap1 = rows["dynatrain --hflip 0.5"][0] - rows["plain, flip p=0.5"][0]
    ok = abs(gap0) <= 3 and abs(gap1) <= 3
    print(f"{args.epochs} epochs: dynatrain − plain (best top-1): no flip {gap0:+.1f}, flip {gap1:+.1f} points → "
          f"{'within' if ok else 'NOT within'} 3 points")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

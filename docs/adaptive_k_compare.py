"""Issue 28's comparison: adaptive K (`--k-rule budget:K`) against fixed K at the same mean
kept count, on a real class-sorted data set, 3 seeds each.

scikit-learn's handwritten digits (1797 images, 10 classes) as a class-sorted ImageFolder
(every 5th image of a class is val), upscaled ×4 to 32 px, indexed with
`dynaprep index --order source` at 4-px patches (an 8×8 grid, N = 64) with the `sobel`
scorer (digits are flat black around white strokes: l2 would keep the black background,
contrast is 0 on every nearest-upscaled 4-px patch). A 2-block ViT (vit_tiny with img_size
32, patch 4, dim 64, 2 heads) trained from scratch, AdamW lr 1e-3, constant LR, per pair:

    dynatrain --k K              fixed K (k_count(K, 64) patches per image)
    dynatrain --k-rule budget:K  per-image K, τ* calibrated so the mean kept count is the same

then `dynatrain compare` over all runs (one table, mean ± std over seeds 0, 1, 2, and
acc_vs_gmacs.png). Needs scikit-learn (the bench extra).

    .venv/bin/python docs/adaptive_k_compare.py [--ks 25,50] [--epochs 20] [--work /tmp/adaptive-k]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_flip_check import write_imagefolder  # noqa: E402

MODEL = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
BIN = Path(sys.executable).parent
SEEDS = (0, 1, 2)


def train(ds: Path, out: Path, select: list[str], seed: int, epochs: int) -> None:
    if (out / "summary.json").is_file():
        return  # done by an earlier call
    subprocess.run([str(BIN / "dynatrain"), "--shards", str(ds), "--out", str(out), "--overwrite", *select,
                    "--scorer", "sobel", "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(MODEL),
                    "--epochs", str(epochs), "--batch-size", "64", "--lr", "1e-3", "--sched", "step",
                    "--step-epochs", "100000", "--workers", "0", "--seed", str(seed)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="25,50")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("/tmp/adaptive-k"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo" / "adaptive_k")
    args = ap.parse_args()
    src, ds = args.work / "src", args.work / "ds"
    ks = [int(k) for k in args.ks.split(",")]
    if not (ds / "dataset.json").is_file():
        write_imagefolder(src)
        subprocess.run([str(BIN / "dynaprep"), "index", "--data", "imagefolder", "--src", str(src), "--out", str(ds),
                        "--k", ",".join(map(str, ks)), "--scorer", "sobel", "--image-size", "32", "--patch-size", "4",
                        "--format", "png", "--order", "source", "--workers", "1", "--overwrite", "--no-progress"],
                       check=True)
    runs = []
    for k in ks:
        for seed in SEEDS:
            for name, select in ((f"k{k}-s{seed}", ["--k", str(k)]),
                                 (f"budget{k}-s{seed}", ["--k-rule", f"budget:{k}"])):
                train(ds, args.work / name, select, seed, args.epochs)
                runs.append(str(args.work / name))
    subprocess.run([str(BIN / "dynatrain"), "compare", *runs, "--out", str(args.out), "--batch", "64"], check=True)
    print((args.out / "compare.md").read_text())


if __name__ == "__main__":
    main()

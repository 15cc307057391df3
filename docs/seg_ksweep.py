"""The segmentation K-sweep of docs/SEGMENTATION.md: mIoU vs GMACs of Dyna-ViT with and without
preserved tokens and of SViT (budget-matched to Dyna-ViT at each K), plus the dense model, on
the VOC-layout photo set (dynavit.pipeline.seg_photo_data.voc_seg).

    .venv/bin/python docs/seg_ksweep.py WORK [--ks 25,50,75] [--epochs 12] [--seeds 0,1]
        [--n-train 60] [--n-val 20] [--out docs/demo/seg_ksweep]

Every run trains from scratch with the same recipe (`dynatrain --task segment`, AdamW at a
constant lr); the figure plots the best val mIoU (mean over seeds, error bars: min..max) at
the MACs its dense forward really did on the val images (summary.json `best.measured_macs`,
macs.MacCounter); SViT is also drawn at the expected MACs its ρ was matched at (every image at
its targets), which its dynamic rate need not reach. Writes OUT.png and OUT.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
MODEL = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}


def sh(*args) -> None:
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL)


def dataset(work: Path, n_train: int, n_val: int) -> Path:
    from dynavit.pipeline.seg_photo_data import voc_seg

    ds = work / "ds"
    if not (ds / "dataset.json").is_file():
        voc_seg(work / "src", n_train, n_val)
        sh(BIN / "dynaprep", "index", "--data", "voc-seg", "--src", work / "src", "--out", ds,
           "--image-size", MODEL["img_size"], "--patch-size", MODEL["patch_size"], "--k", "25,50,75",
           "--scorer", "l2", "--format", "png", "--workers", "1", "--no-progress")
    return ds


def run(ds: Path, out: Path, method: str, k: int, seed: int, epochs: int, *extra) -> dict:
    if not (out / "summary.json").is_file():
        sh(BIN / "dynatrain", "--shards", ds, "--out", out, "--task", "segment", "--method", method,
           "--k", k, "--seed", seed, "--epochs", epochs, "--model", "vit_tiny_patch16_224",
           "--model-kwargs", json.dumps(MODEL), "--batch-size", 10, "--workers", 0, "--lr", "2e-3",
           "--weight-decay", "0.01", "--device", "cpu", *extra)
    s = json.loads((out / "summary.json").read_text())
    return {"method": method, "k": k, "seed": seed, "miou": s["best_miou"], "macs": s["macs"],
            "measured_macs": s["best"]["measured_macs"],
            "param": s["method_param"], "preserve": s["preserve"],
            "kept_share": s["best"].get("kept_share"), "kept_share_targets": s.get("kept_share_targets")}


def sweep(work: Path, ks, seeds, epochs: int, ds: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        rows.append({**run(ds, work / f"dense-s{seed}", "dynavit", 100, seed, epochs), "variant": "dense"})
        for k in ks:
            rows.append({**run(ds, work / f"dv-k{k}-s{seed}", "dynavit", k, seed, epochs),
                         "variant": "Dyna-ViT, preserved tokens"})
            rows.append({**run(ds, work / f"dvz-k{k}-s{seed}", "dynavit", k, seed, epochs, "--no-preserve"),
                         "variant": "Dyna-ViT, pruned = 0"})
            rows.append({**run(ds, work / f"svit-k{k}-s{seed}", "svit", k, seed, epochs),
                         "variant": "SViT (dynamic, expected MACs)"})
    return rows


def _points(rows, variant, key):
    import numpy as np

    pts = {}
    for r in rows:
        if r["variant"] == variant:
            pts.setdefault(r["k"], []).append((r[key], 100 * r["miou"]))
    ks = sorted(pts, key=lambda k: np.mean([m for m, _ in pts[k]]))
    x = np.array([np.mean([m for m, _ in pts[k]]) / 1e6 for k in ks])
    y = np.array([np.mean([v for _, v in pts[k]]) for k in ks])
    err = [y - [min(v for _, v in pts[k]) for k in ks], [max(v for _, v in pts[k]) for k in ks] - y]
    return ks, x, y, err


def plot(rows: list[dict], png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for variant, marker in (("Dyna-ViT, preserved tokens", "o-"), ("Dyna-ViT, pruned = 0", "s--"),
                            ("SViT (dynamic, expected MACs)", "^-"), ("dense", "k*")):
        ks, x, y, err = _points(rows, variant, "measured_macs")
        label = "SViT (measured MACs)" if variant.startswith("SViT") else variant
        ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label=label, markersize=6)
        if variant != "dense":
            for k, xi, yi in zip(ks, x, y):
                ax.annotate(f"K={k}", (xi, yi), fontsize=6, xytext=(3, -9), textcoords="offset points")
        if variant.startswith("SViT"):  # where its budget was matched: every image at the targets
            _, xe, ye, _ = _points(rows, variant, "macs")
            ax.plot(xe, ye, "^:", mfc="none", color="C2", alpha=0.6, label="SViT at its matched (expected) MACs")
    ax.set_xlabel("MMACs per image of the dense forward (exact count, macs.MacCounter)")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("Segmentation K-sweep: ViT (4 blocks, D=64, 8-px patches) on 64-px VOC-layout photos",
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--ks", default="25,50,75")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-val", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "demo" / "seg_ksweep")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    ds = dataset(a.work, a.n_train, a.n_val)
    rows = sweep(a.work, [int(k) for k in a.ks.split(",")], [int(s) for s in a.seeds.split(",")], a.epochs, ds)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, Path(f"{a.out}.png"))
    for r in rows:
        print(f"{r['variant']:<32} K={r['k']:>3} seed {r['seed']} {r['measured_macs'] / 1e6:8.2f} MMACs "
              f"(matched {r['macs'] / 1e6:.2f}) "
              f"mIoU {100 * r['miou']:5.1f}  {r['param']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

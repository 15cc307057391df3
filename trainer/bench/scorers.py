"""Scorer benchmark on real data (issue 29): which scorer's top-K trains best?

    python -m dynavit.trainer.bench.scorers [--seeds 3] [--epochs 12] [--out docs/BENCHMARKS.md]

Two real data sets that nobody here drew (needs scikit-learn and scikit-image):
- **digits**: scikit-learn's 1,797 8×8 scans (white strokes on black), bilinear-upsampled to
  32×32 (nearest upsampling would make every 4-px patch one flat pixel);
- **photos**: crops of 10 scikit-image sample photos squeezed into mid-grey and pasted on flat
  dark or white ground (pipeline/photo_data.py), class = the photo: the case where l2 keeps
  the ground. 1,000 train / 300 val at 32×32.

Each is indexed by `dynaprep index` (imagefolder, png, 4-px patches: 64 per image) with every
scorer; then the same tiny timm ViT (32 px, patch 4, dim 64, depth 3, 2 heads) is trained on
each selection at K=50 and K=25 — every scorer's stored top-K, a random K (a fresh seeded
draw per sample and epoch in training, a fixed one in evaluation, as `dynatrain --select
random`), and dense as the reference — with the same recipe and seeds, in this process with
`sparse_forward` (no flips, no crops: nothing else differs between rows). The table (val top-1,
mean ± std over seeds) and the flat-patch shares of dataset.json are written to the section
between the BEGIN/END markers of --out (docs/BENCHMARKS.md), below its kept-by-make-bench line.
Sized for about 15 minutes on one core; not part of `make test`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

BEGIN = "<!-- bench_scorers: begin (python -m dynavit.trainer.bench.scorers writes this section) -->"
END = "<!-- bench_scorers: end -->"
SIZE, PATCH = 32, 4
KS = (50, 25)


def make_data(work: Path) -> dict:
    from dynavit.pipeline.photo_data import PHOTOS, digits, grey_objects

    sets = {}
    if not (work / "digits-src").exists():
        digits(work / "digits-src.tmp", size=SIZE, n_val=360, resample="bilinear")
        os.replace(work / "digits-src.tmp", work / "digits-src")
    sets["digits"] = work / "digits-src"
    if not (work / "photos-src").exists():
        grey_objects(work / "photos-src.tmp", n_train=1000, n_val=300, size=SIZE, classes=PHOTOS, seed=1)
        os.replace(work / "photos-src.tmp", work / "photos-src")
    sets["photos"] = work / "photos-src"
    return sets


def index(src: Path, out: Path) -> None:
    from click.testing import CliRunner

    from dynavit.manifests.schema import SCORER_NAMES
    from dynavit.pipeline.cli import main

    if (out / "dataset.json").exists():
        return
    r = CliRunner().invoke(main, ["index", "--data", "imagefolder", "--src", str(src), "--out", str(out),
                                  "--overwrite", "--image-size", str(SIZE), "--patch-size", str(PATCH),
                                  "--resize", "squash", "--format", "png", "--k", ",".join(map(str, KS)),
                                  "--scorer", ",".join(SCORER_NAMES), "--workers", "1", "--no-progress"])
    if r.exit_code:
        raise RuntimeError(f"dynaprep index {src} failed:\n{r.output}")
    print(r.output.rstrip())


def load(out: Path, split: str) -> dict:
    """Images [N,H,W,3], labels [N] and kept sets {scorer: {K: [N,k]}} of a split, from the tars."""
    info = json.loads((out / "dataset.json").read_text())
    samples: dict = {}
    for tar_path in sorted((out / split).glob("*.tar")):
        kind = tar_path.name.split("-")
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                data = tf.extractfile(m).read()
                s = samples.setdefault(key, {"kept": {}})
                if kind[0] == "images":
                    if ext == "png":
                        from PIL import Image

                        s["image"] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                    elif ext == "cls":
                        s["label"] = int(data)
                elif ext.startswith("k") and ext.endswith(".npy"):
                    s["kept"].setdefault(kind[1], {})[int(ext[1:-4])] = np.load(io.BytesIO(data)).astype(np.int64)
    keys = sorted(samples)
    return {"images": np.stack([samples[k]["image"] for k in keys]),
            "labels": np.array([samples[k]["label"] for k in keys]),
            "keys": keys,
            "kept": {s: {k: np.stack([samples[key]["kept"][s][k] for key in keys]) for k in KS}
                     for s in info["scorers"]},
            "classes": len(info["classes"]), "scorers": info["scorers"]}


def tiny_vit(classes: int, seed: int):
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=PATCH,
                             embed_dim=64, depth=3, num_heads=2, num_classes=classes)


def _normalize(u8):
    import torch

    from dynavit.trainer.infer.scoring import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _random_keep(n_images: int, k: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch, 7919])
    n = (SIZE // PATCH) ** 2
    return np.sort(np.argsort(rng.random((n_images, n)), axis=1)[:, :k], axis=1)


def train_eval(train: dict, val: dict, selection: str, k: int, seed: int, epochs: int, batch: int = 64,
               lr: float = 2e-3) -> float:
    """Val top-1 (%) of the tiny ViT trained on `selection`'s kept patches at K."""
    import torch

    from dynavit.manifests import k_count
    from dynavit.trainer.methods.sparse import sparse_forward

    model = tiny_vit(train["classes"], seed)
    xt, yt = _normalize(train["images"]), torch.from_numpy(train["labels"])
    xv, yv = _normalize(val["images"]), torch.from_numpy(val["labels"])
    kk = k_count(k, (SIZE // PATCH) ** 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(xt) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)

    def keep_for(data, epoch):
        if selection == "dense":
            return None
        if selection == "random":
            return torch.from_numpy(_random_keep(len(data["images"]), kk, seed, epoch))
        return torch.from_numpy(data["kept"][selection][k])

    for epoch in range(epochs):
        model.train()
        keep = keep_for(train, epoch)
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            logits = sparse_forward(model, xt[idx], None if keep is None else keep[idx], validate=False)
            loss = torch.nn.functional.cross_entropy(logits, yt[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    keep = keep_for(val, 10_000)  # eval: one fixed draw for random
    correct = 0
    with torch.no_grad():
        for idx in torch.arange(len(xv)).split(256):
            logits = sparse_forward(model, xv[idx], None if keep is None else keep[idx], validate=False)
            correct += int((logits.argmax(1) == yv[idx]).sum())
    return 100.0 * correct / len(xv)


def _fmt(v: list[float]) -> str:
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}"


def table(results: dict, flat: dict, sets, selections, seeds) -> list[str]:
    head = "| selection | " + " | ".join(f"{d} K={k}" for d in sets for k in KS) + " |"
    lines = [head, "|" + "---|" * (1 + len(sets) * len(KS))]
    for sel in selections:
        cells = []
        for d in sets:
            for k in KS:
                v = results.get((d, sel, k))
                cells.append(_fmt(v) if v else "")
        lines.append(f"| {sel} | " + " | ".join(cells) + " |")
    dense = [f"{d}: {_fmt(results[(d, 'dense', 100)])}" for d in sets if (d, "dense", 100) in results]
    lines += ["", f"Dense (all 64 patches), same recipe: {'; '.join(dense)}.", "",
              "Share of flat patches (std < 1 grey level) in the kept set, from dataset.json (val, sampled images; "
              "random = the expected share of a random selection):", "",
              "| scorer | " + " | ".join(f"{d} K={k}" for d in sets for k in KS) + " |",
              "|" + "---|" * (1 + len(sets) * len(KS))]
    for sel in selections:
        cells = []
        for d in sets:
            for k in KS:
                f = flat[d]
                cells.append(f"{100 * (f['random'] if sel == 'random' else f['kept_share'][sel][str(k)]):.0f} %")
        lines.append(f"| {sel} | " + " | ".join(cells) + " |")
    return lines


def write_section(out: Path, lines: list[str]) -> None:
    from dynavit.trainer.bench.report import write_marked_section

    write_marked_section(out, BEGIN, END, lines)


def plot(results: dict, path) -> Path:
    """Grouped bars (mean ± std over seeds) of val top-1 per selection, one group per set and
    K, the dense run as a dashed line per set: the README's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sets = sorted({d for d, _, _ in results}, key=["digits", "photos"].index)
    sels = [s for s in ("random", "l2", "sobel", "entropy", "contrast", "distinct")
            if any(r[1] == s for r in results)]
    groups = [(d, k) for d in sets for k in KS]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    width = 0.8 / len(sels)
    for j, sel in enumerate(sels):
        accs = [results.get((d, sel, k), [np.nan]) for d, k in groups]
        ax.bar(np.arange(len(groups)) + (j - (len(sels) - 1) / 2) * width, [np.mean(a) for a in accs], width,
               yerr=[np.std(a) for a in accs], label=sel, capsize=2,
               color="0.6" if sel == "random" else None)
    for g, (d, k) in enumerate(groups):
        dense = results.get((d, "dense", 100))
        if dense:
            ax.hlines(np.mean(dense), g - 0.45, g + 0.45, colors="k", linestyles="dashed", linewidth=1,
                      label="dense (all patches)" if g == 0 else None)
    ax.set_xticks(range(len(groups)), [f"{d} K={k}" for d, k in groups])
    ax.set_ylabel("val top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=7, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dynavit.trainer.bench.scorers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    ap.add_argument("--epochs", type=int, default=12, help="training epochs per run (default 12)")
    ap.add_argument("--sets", default="digits,photos", help="data sets, comma-separated (default digits,photos)")
    ap.add_argument("--workdir", default=None, help="where data and indices are made (kept for re-runs)")
    ap.add_argument("--out", default=None, help="Markdown file whose bench_scorers section is (re)written")
    ap.add_argument("--json", default=None, help="also write every accuracy here")
    ap.add_argument("--plot", default=None, help="also draw the figure (PNG) here")
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="only draw --plot from a --json file of an earlier run (no training)")
    args = ap.parse_args(argv)
    if args.replot:
        if not args.plot:
            ap.error("--replot needs --plot")
        raw = json.loads(Path(args.replot).read_text())
        loaded = {(d, s, int(k)): v for key, v in raw.items() for d, s, k in [key.split("/")]}
        print(plot(loaded, args.plot))
        return
    if args.seeds < 1 or args.epochs < 1:
        ap.error("--seeds and --epochs must be >= 1")
    sets = [s for s in args.sets.split(",") if s]
    if not sets or any(s not in ("digits", "photos") for s in sets):
        ap.error("--sets takes digits and/or photos")
    import torch

    torch.set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scorers-"))
    work.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    src = make_data(work)
    data, flat = {}, {}
    for d in sets:
        index(src[d], work / f"{d}-idx")
        data[d] = (load(work / f"{d}-idx", "train"), load(work / f"{d}-idx", "val"))
        flat[d] = json.loads((work / f"{d}-idx" / "dataset.json").read_text())["flat_patches"]["splits"]["val"]
    selections = ["random", *data[sets[0]][0]["scorers"]]
    results: dict = {}
    for d in sets:
        train, val = data[d]
        for seed in range(args.seeds):
            results.setdefault((d, "dense", 100), []).append(train_eval(train, val, "dense", 100, seed, args.epochs))
            for sel in selections:
                for k in KS:
                    acc = train_eval(train, val, sel, k, seed, args.epochs)
                    results.setdefault((d, sel, k), []).append(acc)
                    print(f"{d} {sel:>8} K={k} seed {seed}: {acc:.1f} %  ({time.perf_counter() - t0:.0f} s)", flush=True)
    minutes, cpu_minutes = (time.perf_counter() - t0) / 60, (time.process_time() - c0) / 60
    lines = table(results, flat, sets, selections, args.seeds)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{d}/{s}/{k}": v for (d, s, k), v in results.items()}, indent=2))
    if args.plot:
        plot(results, args.plot)
    if args.out:
        cmd = f"python -m dynavit.trainer.bench.scorers --seeds {args.seeds} --epochs {args.epochs}"
        intro = ["## Scorers on real data (issue 29)", "",
                 f"`{cmd} --out {args.out}` ({cpu_minutes:.1f} min of CPU time on {torch.get_num_threads()} "
                 f"thread, {minutes:.1f} min wall clock on a shared machine). "
                 f"Val top-1 (%) of the same tiny ViT (32 px, 4-px patches, dim 64, depth 3), mean ± std over "
                 f"{args.seeds} seeds, {args.epochs} epochs, trained and evaluated on each selection's kept patches. "
                 "digits: scikit-learn's scans (1,437 train / 360 val); photos: scikit-image photos as mid-grey "
                 "objects on flat dark or white ground (1,000 / 300, 10 classes). Scorer definitions: docs/FORMAT.md.",
                 ""]
        write_section(Path(args.out), intro + lines)


if __name__ == "__main__":
    main()

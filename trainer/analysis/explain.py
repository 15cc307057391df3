"""`dynatrain explain RUN IMAGES... --out DIR`: LIME explanations (analysis/lime.py, our own
implementation of Ribeiro et al. 2016, not the `lime` package) of trained Dyna-ViT runs,
drawn beside the patches each run keeps, and their overlap.

Per image and per (run, K): the model as deployed (DynaViT: scores computed from the image,
top-K kept, sparse forward), explained for the class it predicts on the unperturbed image.
Every perturbed image is scored again, as the model would be. Written to DIR:

- ``explain-<n>-<stem>.png``: a row per (run, K): the image, the kept patches, the top
  superpixels, each panel labelled, the row titled with run, K, class and probability;
- ``overlap.csv``: run, image, k, kept_share, overlap (share of the top superpixels' pixels
  inside kept patches; chance is kept_share), r2 (the local fit's weighted R²), label, prob.

Runs of the in-encoder methods (ToMe, EViT, the learned ones) keep no patch set before the
encoder and are refused here.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import click
import numpy as np
import torch

from dynavit.pipeline.cli_types import FiniteFloat, out_dir

__all__ = ["explain_command", "explain_runs"]


def _load_run(run: Path):
    """(vit, classes, info, k) of a Dyna-ViT run folder (its best.pt) or checkpoint file."""
    from dynavit.trainer.infer.predict import PredictError, _read_checkpoint, _unpack_checkpoint, load_model
    ckpt = run / "best.pt" if run.is_dir() else run
    if not ckpt.is_file():
        raise click.BadParameter(f"{run}: no best.pt (a dynatrain run folder or a checkpoint file)", param_hint="RUN")
    try:
        vit, classes, info = load_model(ckpt)
        cfg = _unpack_checkpoint(ckpt, _read_checkpoint(ckpt), None)[2]
    except PredictError as e:
        raise click.BadParameter(str(e), param_hint="RUN") from None
    if cfg.get("method", "dynavit") != "dynavit":
        raise click.BadParameter(f"{run}: method {cfg.get('method')!r} keeps no patch set before the encoder; "
                                 f"explain draws Dyna-ViT runs", param_hint="RUN")
    if cfg.get("k_rule"):  # adaptive: no single K to draw unless --k names one
        return vit, classes, info, None
    k = cfg.get("eval_k") or cfg.get("k") or 100
    return vit, classes, info, int(k)


def _predictor(net, mean, std):
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def normalise(batch: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 255 - m) / s

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(net(normalise(batch)).float(), -1).numpy()
    return predict, normalise


def explain_one(vit, info, k: int, rgb: np.ndarray, samples: int, segments: np.ndarray, top: int, seed: int) -> dict:
    """LIME of one run at K on one image: the explanation, the kept mask and the numbers."""
    from dynavit.trainer.analysis.lime import explain_image, overlap, patch_mask, top_mask
    from dynavit.trainer.infer.online import DynaViT
    from dynavit.trainer.infer.scoring import IMAGENET_MEAN, IMAGENET_STD
    mean, std = info.get("mean", IMAGENET_MEAN), info.get("std", IMAGENET_STD)
    net = DynaViT(vit, k=k, scorer=info.get("scorer", "l2"), mean=mean, std=std).eval()
    predict, normalise = _predictor(net, mean, std)
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    keep = net.keep_indices(normalise(rgb[None]))[0].numpy() if net.keep < net.n else np.arange(net.n)
    kept = patch_mask(keep, grid, net.patch)
    exp = explain_image(predict, rgb, segments, num_samples=samples, seed=seed)
    mask = top_mask(exp, top)
    prob = float(predict(rgb[None])[0, exp.label])
    return dict(exp=exp, kept=kept, mask=mask, overlap=overlap(mask, kept), kept_share=float(kept.mean()),
                label=exp.label, prob=prob, r2=exp.r2)


def _draw(path: Path, rgb: np.ndarray, rows: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    shade = rgb.astype(float) / 255
    tint = 0.35 * shade + 0.65 * np.array([0.15, 0.25, 0.6])  # outside the mask: blue, visible on black too

    def masked(mask):
        return np.where(mask[..., None], shade, tint)
    for ax_row, r in zip(axes, rows):
        ax_row[0].imshow(rgb)
        ax_row[0].set_title(f"{r['run']}  K={r['k']}\n{r['class']} ({r['prob']:.2f})", fontsize=8)
        ax_row[1].imshow(masked(r["kept"]))
        ax_row[1].set_title(f"kept patches ({100 * r['kept_share']:.0f} %)", fontsize=8)
        ax_row[2].imshow(masked(r["mask"]))
        ov = "n/a" if math.isnan(r["overlap"]) else f"{r['overlap']:.2f}"
        ax_row[2].set_title(f"LIME top superpixels\noverlap with kept {ov}", fontsize=8)
        for a in ax_row:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(title + "\nblue: not kept / not among the top superpixels", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def explain_runs(runs: list[Path], images: list[Path], out: Path, ks: tuple[int, ...] = (), samples: int = 300,
                 n_segments: int = 40, top: int = 5, seed: int = 0, crop_pct: float = 0.875) -> list[dict]:
    """Write the figures and overlap.csv; return the csv rows."""
    from dynavit.trainer.analysis.lime import superpixels
    from dynavit.trainer.infer.predict import _decode
    loaded = [(run, *_load_run(run)) for run in runs]
    if not ks and any(k is None for *_, k in loaded):
        raise click.BadParameter("an adaptive-K run (--k-rule) has no single K: pass --k", param_hint="--k")
    size = loaded[0][3]["image_size"]
    if any(info["image_size"] != size for _, _, _, info, _ in loaded):
        raise click.BadParameter("the runs take different input sizes; explain them separately", param_hint="RUN")
    patch = int(loaded[0][1].patch_embed.patch_size[0])
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for n, path in enumerate(images):
        d, err = _decode(path, size, patch, crop_pct)  # as predict: dynaprep's resize of the training images
        if d is None:
            click.echo(f"explain: skipping {path}: {err}", err=True)
            continue
        rgb = d.rgb
        segments = superpixels(rgb, n_segments)
        rows = []
        for run, vit, classes, info, run_k in loaded:
            for k in (ks or (run_k,)):
                r = explain_one(vit, info, k, rgb, samples, segments, top, seed)
                r.update(run=run.name, k=k, image=str(path),
                         **{"class": classes[r["label"]] if classes else str(r["label"])})
                rows.append(r)
        _draw(out / f"explain-{n:03d}-{path.stem[:40]}.png", rgb, rows,
              f"{path.name}: kept patches vs LIME (own implementation, Ribeiro et al. 2016)")
        table += [{c: r[c] for c in ("run", "image", "k", "kept_share", "overlap", "r2", "label", "prob")}
                  for r in rows]
    with open(out / "overlap.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "image", "k", "kept_share", "overlap", "r2", "label", "prob"])
        w.writeheader()
        w.writerows(table)
    return table


@click.command("explain", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), callback=out_dir,
              help="Folder for the figures (one PNG per image) and overlap.csv.")
@click.option("--run", "more_runs", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Another run to draw beside RUN (repeatable).")
@click.option("--k", "ks", multiple=True, type=click.IntRange(1, 100),
              help="K to explain at (repeatable). [default: each run's evaluation K]")
@click.option("--samples", type=click.IntRange(10, 100000), default=300, show_default=True,
              help="Perturbed images per explanation.")
@click.option("--segments", type=click.IntRange(2, 10000), default=40, show_default=True,
              help="SLIC superpixels asked for per image.")
@click.option("--top", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="Top superpixels drawn and used for the overlap.")
@click.option("--crop-pct", type=FiniteFloat(0, 1, min_open=True), default=0.875, show_default=True,
              help="Center-crop fraction, as `predict` (resize short side to size/crop_pct): match the dataset's.")
@click.option("--seed", type=int, default=0, show_default=True)
def explain_command(run, images, out, more_runs, ks, samples, segments, top, crop_pct, seed):
    """LIME explanations of RUN (and --run ...) on IMAGES beside the kept patches, with the
    overlap between the two per K (our implementation of Ribeiro et al. 2016's LIME)."""
    from dynavit.trainer.infer.predict import PredictError, list_images
    try:
        files = list_images(images)
    except PredictError as e:
        raise click.BadParameter(str(e), param_hint="IMAGES") from None
    if not files:
        raise click.BadParameter("no images found", param_hint="IMAGES")
    try:
        table = explain_runs([run, *more_runs], files, out, tuple(ks), samples, segments, top, seed, crop_pct)
    except RuntimeError as e:  # scikit-image missing
        raise click.ClickException(str(e)) from None
    for key in sorted({(r["run"], r["k"]) for r in table}):
        sel = [r for r in table if (r["run"], r["k"]) == key and not math.isnan(r["overlap"])]
        if sel:
            click.echo(f"{key[0]} K={key[1]}: overlap {np.mean([r['overlap'] for r in sel]):.3f} "
                       f"(chance {np.mean([r['kept_share'] for r in sel]):.3f}) over {len(sel)} images")
    click.echo(f"explain: {len(table)} explanations -> {out}", err=True)

"""`dynaprep show`: look at what the index kept, one figure row per sample.

    dynaprep show OUT --split val --n 8 --k 70,50,25 --out fig.png

Columns of a row: the stored image; the patch-score heatmap of every scorer in the dataset
(nearest-upsampled to the image, own colour bar: the scorers have different units); then,
for each K and the first selected scorer, the image with pruned patches dimmed to 25 %
and the binary keep mask (white kept, black pruned), titled "K=25 (k kept of N)".

Everything drawn comes from the shards, never recomputed: images from the image shards,
scores from `{key}.scores.npy`, kept sets from `{key}.k{K}.npy`. Samples are a seeded
random choice from the split's manifest rows (status ok), or the keys given.

matplotlib is the `viz` extra: it is imported only when a figure is drawn, through the Agg
canvas (no pyplot, no global backend switch).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynavit.manifests import FormatError, atomic_path, read_dataset_info, read_manifest, read_npy
from dynavit.manifests.inputs import open_regular
from dynavit.manifests.options import ArgumentError, check_output_file
from dynavit.manifests.schema import SCORES_EXT, k_ext
from dynavit.manifests.samples import MemberError, ShardError, build_table, read_member
from dynavit.manifests.shards import UNLABELED, MismatchError

DIM = 0.25  # brightness factor of pruned patches in the "kept" panels
PANEL_INCHES = 2.0
DPI = 100
VIZ_HINT = "matplotlib is required for this command: install dynavit[viz]"


class ShowError(ValueError):
    """A bad argument, found before anything is drawn or written; `param` names the option."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class MissingExtra(RuntimeError):
    """matplotlib (the `viz` extra) is not installed."""


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra(VIZ_HINT) from None
    return Figure, FigureCanvasAgg


# --- what to draw ---------------------------------------------------------------------------

@dataclass
class ShowPlan:
    out_dir: Path
    info: object  # DatasetInfo
    split: str
    ks: list[int]
    scorers: list[str]  # heatmap columns; scorers[0] picks the kept patches
    keys: list[str]
    key_shard: dict[str, int]
    images_root: str | None = None  # --images-root: the user's own, may be a URL
    trust_urls: bool = False        # --trust-dataset-urls


def plan_show(out_dir, split: str | None, n: int, ks, keys=None, seed: int = 0, scorers=None,
              images_root: str | None = None, trust_urls: bool = False, png=None) -> ShowPlan:
    """Check every argument against the dataset and pick the samples. Raises ShowError."""
    out_dir = Path(out_dir)
    if png is not None:
        try:
            check_output_file(png, "--out")
        except ArgumentError as e:
            raise ShowError(str(e), e.param) from None
    try:
        info = read_dataset_info(out_dir)
    except FormatError as e:
        raise ShowError(str(e), "OUT") from None
    if split is None:
        split = "val" if "val" in info.splits else ("test" if "test" in info.splits else next(iter(info.splits), ""))
    if split not in info.splits:
        raise ShowError(f"no split {split!r} in {out_dir} (has {', '.join(info.splits) or 'none'})", "--split")
    available = info.k_values()
    if ks is None:
        ks = available
    ks = [int(k) for k in ks]
    bad = [k for k in ks if k not in available]
    if bad or not ks:
        raise ShowError(f"K={','.join(map(str, bad)) or '(none)'} not indexed in {out_dir} "
                        f"(dataset.json ks: {','.join(map(str, available))})", "--k")
    ks = sorted(set(ks), reverse=True)
    if scorers is None or scorers == "all" or list(scorers) == ["all"]:
        scorers = list(info.scorers)
    scorers = list(dict.fromkeys(scorers))
    bad = [s for s in scorers if s not in info.scorers]
    if bad or not scorers:
        raise ShowError(f"scorer {', '.join(bad) or '(none)'} not in {out_dir} "
                        f"(dataset.json scorers: {', '.join(info.scorers)})", "--scorer")
    if n < 1:
        raise ShowError(f"--n must be >= 1, got {n}", "--n")

    try:
        manifest = read_manifest(out_dir).to_pylist()
    except (FormatError, OSError) as e:
        raise ShowError(str(e), "OUT") from None
    rows = [r for r in manifest if r["split"] == split and r["status"] == "ok"]
    key_shard = {r["key"]: int(r["shard"]) for r in rows}
    if not rows:
        raise ShowError(f"split {split!r} of {out_dir} has no samples", "--split")
    if keys:
        keys = list(dict.fromkeys(keys))
        missing = [k for k in keys if k not in key_shard]
        if missing:
            raise ShowError(f"key {', '.join(missing[:5])} not in split {split!r} of {out_dir} "
                            f"(e.g. {rows[0]['key']})", "--keys")
    else:
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(len(rows), size=min(n, len(rows)), replace=False))
        keys = [rows[i]["key"] for i in picked]
    return ShowPlan(out_dir, info, split, ks, scorers, keys, {k: key_shard[k] for k in keys}, images_root,
                    trust_urls)


def load_samples(plan: ShowPlan) -> list[dict]:
    """Image, label, scores per scorer and kept indices per K (first scorer) of each key,
    read by offset through the shard reader the trainer uses."""
    from dynavit.pipeline.decode import DecodeError, load_image

    tables = {}
    for scorer in plan.scorers:
        try:
            tables[scorer] = build_table(plan.out_dir, plan.info, plan.split, scorer, images_root=plan.images_root,
                                         trust_urls=plan.trust_urls)
        except ShardError as e:
            raise FormatError(str(e)) from None
        if tables[scorer].problems:
            raise FormatError(tables[scorer].problems[0][0])
    first = tables[plan.scorers[0]]
    where = {key: i for i, key in enumerate(first.keys)}
    missing = [k for k in plan.keys if k not in where]
    if missing:
        raise FormatError(f"{plan.out_dir}: samples {', '.join(missing[:5])} listed in manifest.parquet "
                          f"are missing from their {plan.split} shards")
    out = []
    for key in plan.keys:
        i = where[key]
        shard = first.shards[first.shard[i]]
        fd = open_regular(shard.images)
        try:
            data = read_member(fd, first, i)
        except MemberError as e:  # the shard changed since indexing: one line, as other bad data
            raise FormatError(f"{shard.images}: sample {key}: {e}") from None
        finally:
            os.close(fd)
        # The indexer's decoder: EXIF orientation and odd modes of a user's wds images
        # must give the pixels the scores were computed on.
        try:
            # Stored images are kept; a user's (wds) are resized as dynaprep resized them to score.
            resize = plan.info.resize
            rgb = load_image(data, tuple(plan.info.image_size), resize.get("policy", "center-crop"),
                             float(resize.get("crop_pct", 0.875)), patch_size=1, keep_size=True).rgb
        except DecodeError as e:
            raise FormatError(f"{shard.images}: sample {key}: {e}") from None
        label = int(first.label[i])
        sample = {"key": key, "image": rgb, "label": None if label == UNLABELED else label, "scores": {},
                  "indices": {}, "kept_by": {}}
        for scorer, table in tables.items():
            index = table.shards[table.shard[i]]
            fd = open_regular(index.index)
            try:
                sample["scores"][scorer] = read_npy(index.layout.read(fd, int(table.pos[i]), key, SCORES_EXT)
                                                    ).astype(np.float32)
                sample["kept_by"][scorer] = {
                    k: read_npy(index.layout.read(fd, int(table.pos[i]), key, k_ext(k))).astype(np.int64)
                    for k in plan.ks}
            except (KeyError, MismatchError) as e:
                raise FormatError(f"{index.index}: sample {key}: {e}") from None
            finally:
                os.close(fd)
        sample["indices"] = sample["kept_by"][plan.scorers[0]]
        out.append(sample)
    return out


def flat_check(samples: list[dict], plan: "ShowPlan") -> dict:
    """The flat-patch check of `dynaprep index` (pipeline/flatness.py) on the shown samples:
    each shown scorer's kept sets as stored, flatness from the stored pixels."""
    from dynavit.pipeline import flatness
    from dynavit.pipeline.saliency import score_patches

    counts = flatness.empty_counts()
    patch = plan.info.patch_size
    for s in samples:
        contrast = score_patches(np.ascontiguousarray(s["image"][None]), patch, "contrast")
        flatness.add_counts(counts, flatness.flat_mask(contrast),
                            {sc: {k: v[None] for k, v in by_k.items()} for sc, by_k in s["kept_by"].items()})
    return flatness.summarize(counts, plan.scorers)


def keep_mask(indices: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """bool [Gh·P, Gw·P]: True on the pixels of kept patches."""
    gh, gw = grid
    cells = np.zeros(gh * gw, dtype=bool)
    cells[np.asarray(indices, dtype=np.int64)] = True
    return np.kron(cells.reshape(gh, gw), np.ones((patch, patch), dtype=bool)).astype(bool)


def upsample(grid_values: np.ndarray, patch: int) -> np.ndarray:
    return np.repeat(np.repeat(grid_values, patch, axis=0), patch, axis=1)


# --- drawing --------------------------------------------------------------------------------

def _draw_kept(row, c: int, s: dict, rgb, ks, grid, patch: int, n_patches: int, mask_images: list, r: int):
    """The kept-patches and mask panels of one sample, two per K, from column c on."""
    masks, kept = {}, {}
    for k in ks:
        idx = s["indices"][k]
        mask = keep_mask(idx, grid, patch)
        dimmed = np.where(mask[..., None], rgb, (rgb.astype(np.float32) * DIM).round().astype(np.uint8))
        title = f"K={k} ({len(idx)} kept of {n_patches})"
        row[c].imshow(dimmed, interpolation="nearest")
        row[c].set_title(title, fontsize=8)
        im = row[c + 1].imshow(mask.astype(np.uint8) * 255, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        row[c + 1].set_title(f"mask {title}", fontsize=8)
        row[c + 1].set_axis_on()  # a frame: white kept patches must not melt into the page
        row[c + 1].set_xticks([])
        row[c + 1].set_yticks([])
        mask_images.append((r, k, im))
        masks[k], kept[k] = mask, len(idx)
        c += 2
    return masks, kept


def render_show(out_dir, split, n, ks, png_path, keys=None, seed=0, scorers=None,
                panel_inches: float = PANEL_INCHES, dpi: int = DPI, images_root: str | None = None,
                trust_urls: bool = False) -> dict:
    """Draw the figure to `png_path` (atomically) and return its layout facts:
    size_px (width, height), nrows/ncols, columns (panel kinds), and per sample the key,
    label, keep masks per K (bool at image resolution), kept counts, indices, and the pixel
    box (left, top, right, bottom) of every mask panel in the PNG."""
    plan = plan_show(out_dir, split, n, ks, keys=keys, seed=seed, scorers=scorers, images_root=images_root,
                     trust_urls=trust_urls, png=png_path)
    Figure, FigureCanvasAgg = require_matplotlib()
    info = plan.info
    samples = load_samples(plan)
    patch, grid, n_patches = info.patch_size, info.grid, info.num_patches
    main_scorer = plan.scorers[0]
    flat = flat_check(samples, plan)

    columns = ["image"] + [f"score:{s}" for s in plan.scorers]
    for k in plan.ks:
        columns += [f"kept:{k}", f"mask:{k}"]
    nrows, ncols = len(samples), len(columns)
    fig = Figure(figsize=(ncols * panel_inches, nrows * panel_inches + 0.4), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    top = 1.0 - 0.4 / (nrows * panel_inches + 0.4)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top - 0.03, wspace=0.25, hspace=0.3)
    fig.suptitle(f"{info.dataset} · {plan.split} · kept patches by {main_scorer} · N={n_patches} patches "
                 f"({grid[0]}×{grid[1]} of {patch}px)", fontsize=10)
    axes = fig.subplots(nrows, ncols, squeeze=False)

    mask_images = []  # (sample index, K, AxesImage) to measure after drawing
    out_samples = []
    for r, s in enumerate(samples):
        rgb = s["image"]
        if rgb.shape[:2] != tuple(info.image_size):
            raise FormatError(f"{plan.split} sample {s['key']}: stored image is {rgb.shape[1]}x{rgb.shape[0]}, "
                              f"dataset.json says {info.image_size[1]}x{info.image_size[0]}")
        row = axes[r]
        for ax in row:
            ax.set_axis_off()
        name = ""
        if s["label"] is not None:
            name = info.classes[s["label"]] if 0 <= s["label"] < len(info.classes) else str(s["label"])
        row[0].imshow(rgb, interpolation="nearest")
        row[0].set_title(f"{s['key']}" + (f" · {name}" if name else ""), fontsize=8)
        c = 1
        for scorer in plan.scorers:
            heat = upsample(s["scores"][scorer], patch)
            im = row[c].imshow(heat, cmap="viridis", interpolation="nearest")
            fig.colorbar(im, ax=row[c], fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
            row[c].set_title(f"{scorer} score", fontsize=8)
            c += 1
        masks, kept = _draw_kept(row, c, s, rgb, plan.ks, grid, patch, n_patches, mask_images, r)
        out_samples.append({"key": s["key"], "label": s["label"], "class_name": name or None, "masks": masks,
                            "kept": kept, "indices": {k: v.copy() for k, v in s["indices"].items()},
                            "mask_boxes": {}})

    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
        renderer = canvas.get_renderer()
        from PIL import Image
        with Image.open(tmp) as written:
            width, height = written.size
        for r, k, im in mask_images:
            box = im.get_window_extent(renderer)  # display pixels, origin bottom-left
            out_samples[r]["mask_boxes"][k] = (float(box.x0), float(height - box.y1), float(box.x1),
                                               float(height - box.y0))
    return {"png": str(png_path), "size_px": (width, height), "dpi": dpi, "nrows": nrows, "ncols": ncols,
            "columns": columns, "split": plan.split, "ks": plan.ks, "scorers": plan.scorers,
            "scorer": main_scorer, "num_patches": n_patches, "grid": grid, "samples": out_samples,
            "flat": flat, "flat_dataset": (info.flat_patches or {}).get("splits", {}).get(plan.split)}

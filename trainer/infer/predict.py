"""`dynatrain predict`: classify image files with online Dyna-ViT (docs/ONLINE.md).

    dynatrain predict runs/k70/best.pt photos/ extra.jpg --k 70 --scorer l2 --out preds.csv

Each image is decoded exactly as ``dynaprep`` stores it (``pipeline.decode.load_image``,
center-crop, crop_pct 0.875, to the model's input size), normalized on the device, scored and
pruned online by :class:`dynavit.trainer.infer.online.DynaViT`, and classified. The output has one
row per input, in input order (files as given; folders walked recursively, sorted, image
extensions only): path, status ``ok``/``failed``, error (the one-line reason for failed rows:
unreadable, empty, truncated, not an image, too small, ...), original size, and the top-N
class indices, names and softmax probabilities (empty when the model has fewer classes).

CHECKPOINT is a ``dynatrain`` checkpoint (a dict with ``model`` (state_dict), ``model_name``,
``config`` (``model``, ``model_kwargs``, optionally ``input_size``) and ``classes``) or a
plain timm state_dict, which needs ``--model`` (``--num-classes`` defaults to the rows of
``head.weight``). The input size is ``--image-size``, else the checkpoint's ``input_size``,
else the size its ``pos_embed`` was trained at (square grids), else the model's default.

Bad arguments (unreadable checkpoint, unknown model, size mismatch, bad --out) print one line
and exit with code 2 before anything is written; the output file is written atomically.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from dynavit.manifests.inputs import read_regular
from dynavit.pipeline.decode import DecodeError, load_image
from dynavit.trainer.model import check_model_size
from dynavit.trainer.rundir import load_error
from dynavit.trainer.infer.online import DynaViT
from dynavit.trainer.infer.scoring import IMAGENET_MEAN, IMAGENET_STD, SCORERS
from dynavit.trainer.methods.sparse import check_model

# SCORERS is re-exported: the CLI (cli_tools) takes the scorer names from here.
__all__ = ["predict", "load_model", "list_images", "write_rows",
           "IMAGE_EXTENSIONS", "PredictError", "SCORERS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".jfif")


class PredictError(ValueError):
    """One-line reason why the model or the inputs cannot be used."""


# ---------------------------------------------------------------------------------------------
# inputs

def list_images(paths: Iterable) -> list[Path]:
    """Files as given (any extension), folders walked recursively (sorted, image extensions
    only, hidden files skipped). A missing path is a PredictError."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
                           and (f.is_file() or f.is_symlink()))
            out.extend(found)
        elif p.exists() or p.is_symlink():
            out.append(p)
        else:
            raise PredictError(f"{p}: no such file or folder")
    return out


def _decode(path: Path, image_size, patch: int, crop_pct: float, max_file_bytes: Optional[int] = None):
    try:  # a regular file under the cap only: a FIFO or a link to /dev/zero is a failed row
        data = read_regular(path, max_file_bytes)
    except OSError as e:
        return None, f"cannot read file: {e.strerror or e}"
    try:
        d = load_image(data, image_size, policy="center-crop", crop_pct=crop_pct, patch_size=patch)
    except DecodeError as e:
        return None, str(e)
    except Exception as e:  # a decoder bug must not stop the run; report it on the row
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return d, None


# ---------------------------------------------------------------------------------------------
# model

def _strip_prefixes(sd: dict) -> dict:
    for pre in ("module.", "_orig_mod.", "vit."):
        if sd and all(isinstance(k, str) and k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
    return sd


def load_model(checkpoint, model_name: Optional[str] = None, num_classes: Optional[int] = None,
               image_size: Optional[int] = None, model_kwargs: Optional[dict] = None) -> tuple[nn.Module, Optional[list[str]], dict]:
    """(timm ViT in eval mode on CPU, class names or None, info) from a checkpoint file.

    info: model_name, image_size (H, W), mean/std if the checkpoint records them."""
    path = Path(checkpoint)
    # Not Checkpoint.load: a plain timm state_dict is accepted here too, and a dynatrain
    # checkpoint needs only its model / config / classes entries.
    sd, name, cfg, classes, info = _unpack_checkpoint(path, _read_checkpoint(path), model_name)
    num_classes = _num_classes(path, sd, classes, num_classes)
    kwargs = dict(cfg.get("model_kwargs") or {})
    kwargs.update(model_kwargs or {})
    for key in ("num_classes", "pretrained", "pretrained_cfg_overlay"):
        kwargs.pop(key, None)
    size = image_size or cfg.get("input_size")

    vit = _create(name, num_classes, kwargs, size)  # outside the try: its PredictError is final
    try:
        m = check_model(vit)
    except (TypeError, ValueError) as e:
        raise PredictError(f"{name}: {e}") from None
    if not size:  # the grid the checkpoint's pos_embed was trained at (square grids)
        size = _trained_size(sd, m)
        if size:
            m = check_model(_create(name, num_classes, kwargs, size))
    _load_exact(m, sd, name)
    m.eval()
    info["model_name"] = name
    if isinstance(cfg.get("scorer"), str):  # the scorer a dynatrain run trained with
        info["scorer"] = cfg["scorer"]
    run_k = cfg.get("eval_k") or cfg.get("k")
    if cfg.get("method", "dynavit") == "dynavit" and isinstance(run_k, int) and 1 <= run_k <= 100:
        info["run_k"] = run_k  # the K a Dyna-ViT run evaluated at: predict's default
    info["image_size"] = tuple(int(v) for v in m.patch_embed.img_size)
    return m, classes, info


def _read_checkpoint(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PredictError(f"cannot read checkpoint {path}: {load_error(e)}") from None
    if not isinstance(obj, dict):
        raise PredictError(f"{path} is not a checkpoint: expected a dict, got {type(obj).__name__}")
    return obj


def _unpack_checkpoint(path: Path, obj: dict, model_name: Optional[str]):
    """(state_dict without wrapper prefixes, model name, config dict, class names or None,
    info with the mean/std the checkpoint records) of a dynatrain checkpoint or a plain
    state_dict; `model_name` overrides the checkpoint's."""
    classes = None
    cfg: dict = {}
    info: dict[str, Any] = {}
    if isinstance(obj.get("model"), dict):  # dynatrain checkpoint
        sd = obj["model"]
        cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        name = model_name or obj.get("model_name") or cfg.get("model")
        if obj.get("classes") is not None:
            classes = [str(c) for c in obj["classes"]]
        for key in ("mean", "std"):
            v = obj.get(key, cfg.get(key))
            if v is not None:
                info[key] = tuple(float(a) for a in v)
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
        name = model_name
        if not name:
            raise PredictError(f"{path} is a plain state_dict: pass --model (the timm model name)")
    else:
        raise PredictError(f"{path} is neither a dynatrain checkpoint (no 'model' entry) nor a "
                           f"state_dict of tensors")
    if not name:
        raise PredictError(f"{path} does not name its model: pass --model")
    return _strip_prefixes(dict(sd)), name, cfg, classes, info


def _num_classes(path: Path, sd: dict, classes: Optional[list[str]], num_classes: Optional[int]) -> int:
    """`num_classes`, else the checkpoint's class count, else the rows of head.weight."""
    head = sd.get("head.weight")
    if num_classes is None:
        if classes is not None:
            num_classes = len(classes)
        elif isinstance(head, torch.Tensor) and head.ndim == 2:
            num_classes = int(head.shape[0])
        else:
            raise PredictError(f"{path} has no classifier head.weight: pass --num-classes")
    if classes is not None and len(classes) != num_classes:
        raise PredictError(f"--num-classes {num_classes} differs from the checkpoint's "
                           f"{len(classes)} classes")
    return num_classes


def _create(name: str, num_classes: int, kwargs: dict, img_size) -> nn.Module:
    """A fresh (random-weight) timm model; `img_size` only when one is known."""
    import timm

    kw = dict(kwargs)
    if img_size:
        kw["img_size"] = img_size
    try:
        check_model_size(name, num_classes, kw)
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PredictError(f"cannot build model {name!r}: {msg}") from None


def _trained_size(sd: dict, m: nn.Module) -> Optional[int]:
    """The square input size the checkpoint's pos_embed was trained at, or None when it
    fits `m` already (or is not a square grid)."""
    pe = sd.get("pos_embed")
    if isinstance(pe, torch.Tensor) and pe.ndim == 3 and tuple(pe.shape) != tuple(m.pos_embed.shape):
        n = int(pe.shape[1]) - (0 if m.no_embed_class else int(m.num_prefix_tokens))
        side = math.isqrt(max(n, 0))
        if side > 0 and side * side == n:
            return side * int(m.patch_embed.patch_size[0])
    return None


def _load_exact(m: nn.Module, sd: dict, name: str) -> None:
    """Load `sd` into `m`; any shape mismatch, missing or unexpected key is a PredictError
    (no resampling or head dropping as in model.load_weights: prediction needs the trained
    weights as they are)."""
    try:
        res = m.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise PredictError(f"checkpoint does not fit {name}: {detail[:300]}") from None
    if res.missing_keys or res.unexpected_keys:
        parts = []
        for what, keys in (("missing", res.missing_keys), ("unexpected", res.unexpected_keys)):
            if keys:
                parts.append(f"{len(keys)} {what} keys (e.g. {keys[0]})")
        raise PredictError(f"checkpoint does not fit {name}: {', '.join(parts)}; check --model / "
                           f"--model-kwargs")


# ---------------------------------------------------------------------------------------------
# prediction

def _columns(top: int) -> list[str]:
    cols = ["path", "status", "error", "orig_width", "orig_height"]
    for i in range(1, top + 1):
        cols += [f"top{i}_index", f"top{i}_name", f"top{i}_prob"]
    return cols


def predict(model: nn.Module, paths: Sequence, *, k: int = 100, scorer: str = "l2",
            device="cpu", batch_size: int = 32, image_size=None, mean=IMAGENET_MEAN,
            std=IMAGENET_STD, top: int = 5, classes: Optional[Sequence[str]] = None,
            round_to: Optional[int] = None, crop_pct: float = 0.875, progress: bool = False,
            workers: Optional[int] = None, max_file_bytes: Optional[int] = None,
            k_rule=None) -> list[dict[str, Any]]:
    """One dict per input image (see the module docstring for the columns), in input order.
    ``k_rule``: adaptive K (a KRule with τ known); each row then records its ``kept`` count.

    ``model`` is a timm VisionTransformer (or a DynaViT, whose ViT is used); ``paths`` are
    files and folders as for the command line."""
    from tqdm.auto import tqdm

    vit = model.vit if isinstance(model, DynaViT) else check_model(model)
    if batch_size < 1 or top < 1:
        raise PredictError("batch_size and top must be at least 1")
    model_hw = tuple(int(v) for v in vit.patch_embed.img_size)
    if image_size is not None:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if tuple(hw) != model_hw:
            raise PredictError(f"image size {hw} differs from the model's input size {model_hw}")
    dev = torch.device(device)
    net = DynaViT(vit, k=k, scorer=scorer, mean=mean, std=std, round_to=round_to, k_rule=k_rule).to(dev).eval()
    num_classes = int(getattr(vit, "num_classes", 0) or 0)
    if num_classes < 1:
        raise PredictError("the model has no classifier head (num_classes=0)")
    if classes is not None and len(classes) != num_classes:
        raise PredictError(f"{len(classes)} class names for a model with {num_classes} classes")
    files = list_images(paths)
    ntop = min(top, num_classes)
    mean_t = net.mean.view(1, 3, 1, 1)
    std_t = net.std.view(1, 3, 1, 1)
    rows: list[dict[str, Any]] = []
    workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=workers) as pool, torch.inference_mode():
        chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]

        def submit(i):  # decode the next batch in threads while the model runs on this one
            if i >= len(chunks):
                return []
            return [pool.submit(_decode, p, model_hw, net.patch, crop_pct, max_file_bytes) for p in chunks[i]]

        futures = submit(0)
        for ci, chunk in enumerate(chunks):
            decoded = [f.result() for f in futures]
            futures = submit(ci + 1)
            batch_rows, arrays = [], []
            for path, (d, err) in zip(chunk, decoded):
                row: dict[str, Any] = {c: None for c in _columns(top)}
                row.update(path=str(path), status="failed" if d is None else "ok", error=err or "")
                if d is not None:
                    row.update(orig_width=d.orig_width, orig_height=d.orig_height)
                    arrays.append(d.rgb)
                batch_rows.append(row)
            if arrays:
                x = torch.from_numpy(np.stack(arrays)).to(dev, non_blocking=True)
                x = (x.permute(0, 3, 1, 2).float() / 255.0 - mean_t) / std_t
                probs = torch.softmax(net(x).float(), dim=-1)
                p, idx = probs.topk(ntop, dim=-1)
                p, idx = p.cpu().numpy(), idx.cpu().numpy()
                ok_rows = [r for r in batch_rows if r["status"] == "ok"]
                if net.last_counts is not None:
                    for r, c in zip(ok_rows, net.last_counts.tolist()):
                        r["kept"] = int(c)
                for r, pi, ii in zip(ok_rows, p, idx):
                    for j in range(ntop):
                        r[f"top{j + 1}_index"] = int(ii[j])
                        r[f"top{j + 1}_name"] = classes[int(ii[j])] if classes is not None else None
                        r[f"top{j + 1}_prob"] = float(pi[j])
            rows.extend(batch_rows)
            bar.update(len(chunk))
    bar.close()
    return rows


def write_rows(rows: list[dict[str, Any]], out, top: int) -> None:
    """Write rows to out (.csv or .parquet) atomically (temp file + rename)."""
    out = Path(out)
    cols = _columns(top)
    kept = any("kept" in r for r in rows)  # adaptive K: each image's kept patch count
    cols = cols + ["kept"] if kept else cols
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if out.suffix.lower() == ".csv":
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                for r in rows:
                    w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            fields = [pa.field("path", pa.string()), pa.field("status", pa.string()),
                      pa.field("error", pa.string()), pa.field("orig_width", pa.int32()),
                      pa.field("orig_height", pa.int32())]
            for i in range(1, top + 1):
                fields += [pa.field(f"top{i}_index", pa.int32()), pa.field(f"top{i}_name", pa.string()),
                           pa.field(f"top{i}_prob", pa.float32())]
            if kept:
                fields.append(pa.field("kept", pa.int32()))
            schema = pa.schema(fields)
            table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows], schema=schema)
            pq.write_table(table, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""`dynatrain bench`: step throughput per K, and the data loader against the bare decode floor.

    dynatrain bench --shards out/demo/data --model vit_tiny_patch16_224 --k 100,50,25 --workers 1,2

(a) train-step and inference images/s for dense timm and each K on synthetic input of the
dataset's image size, with the ideal speed-up from exact MAC counts (bench_step.bench), and
the same train step fed by the real loader (is the loader keeping up?).
(b) the loader alone (read tars, decode, select, flip, collate) against the floor: decoding
the same images from the same tars with PIL and nothing else, in the same number of processes.
"""
from __future__ import annotations

import io
import itertools
import multiprocessing as mp
import os
import tarfile
import time

import numpy as np
import torch

from dynavit.manifests import read_shards, resolve, schema


from dynavit.trainer.bench.step import bench as bench_step
from dynavit.trainer.data import build_loader, open_dataset
import click
import json
from dynavit.pipeline.cli_types import AmpType, DeviceType, renamed, resolve_amp_name
from dynavit.pipeline.cli_types import k_list
from dynavit.pipeline.cli_types import out_file
from dynavit.manifests import write_json_atomic

IMAGE_EXTS = tuple(f".{e}" for e in schema.IMAGE_EXTS)


def _decode_tar(path: str) -> int:
    """The floor: every image of one tar decoded to an RGB uint8 array, nothing more."""
    from PIL import Image

    n = 0
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(IMAGE_EXTS):
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    np.asarray(im.convert("RGB"))
                n += 1
    return n


def _noop(_):
    return 0


def decode_floor(tars: list[str], processes: int) -> float:
    """Steady state: a pool that is already up, as the loader's workers are once the first
    batch has arrived (process start-up is excluded on both sides)."""
    if processes <= 1:
        t0 = time.perf_counter()
        n = sum(_decode_tar(t) for t in tars)
        return n / (time.perf_counter() - t0)
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_noop, range(processes * 4), chunksize=1)  # every worker started and importing done
        t0 = time.perf_counter()
        n = sum(pool.map(_decode_tar, tars, chunksize=1))
        return n / (time.perf_counter() - t0)


def loader_rate(dataset_dir, k: int, scorer: str, batch: int, workers: int) -> float:
    """One training epoch of the loader (shuffle, decode, select, flip, collate), no model,
    timed from the first batch on so that worker start-up is not counted."""
    loader = build_loader(dataset_dir, "train", k=k, scorer=scorer, batch_size=batch, workers=workers,
                          train=True, seed=0, recycle_buffers=True)  # as the training loop reads it
    loader.set_epoch(0)
    n, t0 = 0, None
    for b in loader:
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += len(b)
    return n / (time.perf_counter() - t0)


def bench_loader(dataset_dir, k: int, scorer: str, batch: int, worker_counts: list[int]) -> list[dict]:
    rows = read_shards(dataset_dir).to_pylist()
    tars = [str(resolve(dataset_dir, r["images"])) for r in rows if r["split"] == "train"]
    decode_floor(tars[:1], 1)  # warm the page cache so both sides read from memory
    out = []
    for w in worker_counts:
        procs = max(1, w)
        floor = decode_floor(tars, procs)
        ours = loader_rate(dataset_dir, k, scorer, batch, w)
        out.append({"workers": w, "processes": procs, "loader_img_s": ours, "floor_img_s": floor,
                    "loader_per_worker": ours / procs, "floor_per_worker": floor / procs, "ratio": ours / floor})
    return out


def bench_real_steps(dataset_dir, model_name, model_kwargs, ks, scorer, batch, workers, steps, amp,
                     device: str = "cpu") -> list[dict]:
    """Train steps fed by the real loader: images/s end to end for each K (loader + model)."""
    import timm

    from dynavit.trainer.data import normalize
    from dynavit.trainer.methods.sparse import sparse_forward

    info = open_dataset(dataset_dir)
    dev = torch.device(device)
    model = timm.create_model(model_name, pretrained=False, num_classes=len(info.classes),
                              img_size=info.image_size, **model_kwargs).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"off": None, "bf16": torch.bfloat16}[amp]
    out = []
    for k in ks:
        # As the training loop reads it: pinned batches on CUDA, so that the non_blocking copy
        # below overlaps the step (from pageable memory it would be a synchronous copy).
        loader = build_loader(dataset_dir, "train", k=k, scorer=scorer, batch_size=batch, workers=workers, seed=0,
                              recycle_buffers=True, pin_memory=dev.type == "cuda")
        loader.set_epoch(0)
        it = iter(loader)
        n, t0 = 0, None
        for i, b in enumerate(itertools.islice(it, steps + 1)):
            if i == 1:  # the first batch pays worker start-up
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
            b = b.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                x = normalize(b.images, info.mean, info.std)
                loss = torch.nn.functional.cross_entropy(sparse_forward(model, x, b.keep_idx), b.labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            n += len(b) if i else 0
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        del it
        out.append({"K": k, "img_s": n / (time.perf_counter() - t0) if t0 else float("nan")})
    return out


def _table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def run_bench(shards, model_name, model_kwargs, ks, batch, steps, repeats, amp, device, worker_counts, scorer):
    info = open_dataset(shards)
    scorer = scorer or info.scorers[0]
    kwargs = {"img_size": info.image_size[0], "num_classes": len(info.classes), **model_kwargs}
    sparse_ks = [k for k in ks if k != 100]
    result = {"dataset": str(shards), "model": model_name, "model_kwargs": kwargs, "batch": batch, "amp": amp,
              "device": device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__}
    result["train_step"] = bench_step(model_name, sparse_ks, batch, steps, 1, repeats, amp, device, False,
                                      model_kwargs=kwargs)
    result["inference"] = bench_step(model_name, sparse_ks, batch, steps, 1, repeats, amp, device, True,
                                     model_kwargs=kwargs)
    loader_k = min(k for k in info.k_values())
    result["loader_k"] = loader_k
    result["loader"] = bench_loader(shards, loader_k, scorer, batch, worker_counts)
    result["real_steps"] = bench_real_steps(shards, model_name, model_kwargs, ks, scorer, batch,
                                            max(worker_counts), steps * 2, amp, device)
    return result


def format_bench(r: dict) -> str:
    out = [f"{r['model']} {r['model_kwargs']} batch {r['batch']} amp {r['amp']} on {r['device']} "
           f"({r['threads']} threads, {r['cpus']} CPUs), torch {r['torch']}"]
    for name in ("train_step", "inference"):
        out += ["", f"{name.replace('_', ' ')} (synthetic input):",
                _table(["K", "S", "img/s", "speed-up", "ideal", "achieved"],
                       [[x["K"], x["S"], f"{x['imgs_per_s']:.1f}", f"{x['speedup']:.2f}x", f"{x['ideal_speedup']:.2f}x",
                         f"{x['efficiency']:.2f}"] for x in r[name]])]
    out += ["", f"train step fed by the real loader on {r['device']} (workers {max(x['workers'] for x in r['loader'])}):",
            _table(["K", "img/s"], [[x["K"], f"{x['img_s']:.1f}"] for x in r["real_steps"]])]
    out += ["", f"loader alone at K={r['loader_k']} vs bare JPEG/PNG decode of the same tars:",
            _table(["workers", "loader img/s", "floor img/s", "loader/worker", "floor/worker", "ratio"],
                   [[x["workers"], f"{x['loader_img_s']:.1f}", f"{x['floor_img_s']:.1f}", f"{x['loader_per_worker']:.1f}",
                     f"{x['floor_per_worker']:.1f}", f"{x['ratio']:.2f}"] for x in r["loader"]])]
    return "\n".join(out)


@click.command("bench", short_help="Training and inference img/s per K, and the loader.")
@renamed("--batch", "--batch-size", "batch_size", type=click.IntRange(1))
@click.option("--shards", type=click.Path(exists=True, file_okay=False), required=True,
              help="A dataset directory written by dynaprep (its image size sets the model's).")
@click.option("--model", "model_name", default="vit_tiny_patch16_224", show_default=True, help="timm ViT name.")
@click.option("--model-kwargs", default="{}", show_default=True, help="Extra timm.create_model kwargs (JSON).")
@click.option("--k", "ks", default="100,50,25", show_default=True, callback=k_list,
              help="K values (100 = dense via sparse_forward).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Images per step.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(1), help="Timed steps per repeat.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="Interleaved repeats (median).")
@click.option("--amp", type=AmpType(), default="off", show_default=True,
              help="Autocast dtype (auto: bf16 on CUDA, off on CPU; fp16 is not measured here).")
@click.option("--device", type=DeviceType(), default="auto", show_default=True, help="Where to run (auto: cuda if available).")
@click.option("--workers", default="1,2", show_default=True, help="Loader worker counts to measure.")
@click.option("--scorer", default=None, help="Index shard set the loader reads. [default: the dataset's first scorer]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=out_file, help="Also write the results here.")
def bench_command(shards, model_name, model_kwargs, ks, batch_size, steps, repeats, amp, device, workers, scorer, json_path):
    """Train-step / inference images/s per K with ideal speed-ups, and loader vs decode floor."""
    try:
        kwargs = json.loads(model_kwargs)
        worker_counts = [int(w) for w in workers.split(",")]
    except ValueError as e:
        raise click.UsageError(f"bad --model-kwargs or --workers: {e}") from None
    amp = resolve_amp_name(amp, device)
    if amp == "fp16":
        raise click.BadParameter("fp16 is not measured by bench; use bf16", param_hint="--amp")
    result = run_bench(shards, model_name, kwargs, ks, batch_size, steps, repeats, amp, device, worker_counts, scorer)
    click.echo(format_bench(result))
    if json_path:
        write_json_atomic(json_path, result)


if __name__ == "__main__":
    bench_command()

"""Inference benchmark of online Dyna-ViT *with* its overhead (the paper's protocol).

    python -m dynavit.trainer.bench.infer --model vit_tiny_patch16_224 --batch 32 --k 100,70,50,25 --device cpu

For one model, batch size and precision it measures, side by side in one process:

- ``dense``: ``model(x)`` on all N patches (the baseline of every ratio);
- ``sparse idx``: ``sparse_forward(model, x, keep_idx)`` with indices computed beforehand
  (the offline path: what training and pre-indexed evaluation pay);
- ``online <scorer>``: ``DynaViT(model, k, scorer)(x)``: scoring + top-K + sparse forward,
  all on the device, per scorer;

- ``adaptive <rule>`` (``--k-rule``, repeatable): ``DynaViT(model, k_rule=rule)(x)``, each
  image keeping its own count (trainer/adaptive_k.py), the batch run packed
  (methods/packing.py); S is the mean over the batch;

each per K, with and without rounding the sequence length S up to a multiple of
``--round-to`` (8). Reported: images/s at ``--batch``, the speed-up over dense measured in
the same run, the share of the online step spent on scoring + selection
(``DynaViT.keep_indices`` timed alone / the online step), and the batch-1 latency (ms).

Protocol: weights are random (timing does not depend on them), inputs are fixed synthetic
images (smooth random fields plus noise, uint8, normalized once; not timed); every
configuration is warmed up, then the configurations are timed round-robin ``--reps`` times
(``--iters`` calls each, device synchronized) and the median is reported, so slow drifts of
the machine (clocks, other load) hit every configuration alike. ``--precision bf16/fp16``
runs the model under autocast; the scores are computed in float32 either way.
"""
from __future__ import annotations

import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dynavit.trainer.data import normalize
from dynavit.trainer.adaptive_k import parse_k_rule
from dynavit.trainer.infer.online import DynaViT
from dynavit.trainer.runtime import autocast
from dynavit.trainer.infer.scoring import IMAGENET_MEAN, IMAGENET_STD, SCORERS, keep_count
from dynavit.trainer.methods.sparse import check_model, num_patches, sparse_forward
import click
import json
from dynavit.pipeline.cli_types import AmpType, DeviceType, renamed, resolve_amp_name
from dynavit.pipeline.cli_types import out_file

__all__ = ["run_bench", "format_table"]


def _sync(dev: torch.device) -> Callable[[], None]:
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def synthetic_images(batch: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [B,H,W,3]: bilinearly upsampled coarse random fields plus pixel noise, so patches
    differ in energy, edges and entropy like natural images do (constant or pure-noise images
    would make every scorer's work and ties atypical)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (batch, 3, max(2, h // 16), max(2, w // 16))))
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear",
                                             align_corners=False).numpy()
    img = smooth.transpose(0, 2, 3, 1) + rng.normal(0, 12, (batch, h, w, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _normalize(u8: np.ndarray, dev, mean, std) -> torch.Tensor:
    return normalize(torch.from_numpy(u8).to(dev).permute(0, 3, 1, 2), mean, std).contiguous()


def _time_round_robin(fns: dict[str, Callable[[], object]], reps: int, iters: int, warmup: int,
                      sync) -> dict[str, float]:
    """Median seconds per call of every fn, timed round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def run_bench(model_name: str = "vit_tiny_patch16_224", batch: int = 32, ks=(100, 70, 50, 25),
              scorers=SCORERS, device: str = "cpu", precision: str = "fp32", round_to: int = 8,
              reps: int = 3, iters: int = 1, warmup: int = 1, latency: bool = True,
              image_size=None, model_kwargs=None, compile: bool = False,
              log=lambda s: None, k_rules=()) -> dict:
    """Measure every configuration; returns {'meta': ..., 'rows': [...]} (see format_table)."""
    dev = torch.device(device)
    vit = _build_vit(model_name, image_size, model_kwargs, dev)
    n = num_patches(vit)
    prefix = int(vit.num_prefix_tokens)
    h, w = (int(v) for v in vit.patch_embed.img_size)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # fp32 runs under no autocast context at all (not a disabled one): nothing extra is timed.
    ctx = (lambda: autocast(dev, amp)) if amp is not None else nullcontext
    wrap = (lambda m: torch.compile(m)) if compile else (lambda m: m)

    xs = {batch: _normalize(synthetic_images(batch, h, w, seed=0), dev, IMAGENET_MEAN, IMAGENET_STD)}
    if latency and batch != 1:
        xs[1] = xs[batch][:1].contiguous()
    bench = _Bench(vit=vit, dev=dev, n=n, prefix=prefix, wrap=wrap, ctx=ctx,
                   dense=wrap(vit), sparse=wrap(_Sparse(vit)))
    rows = []
    for b, x in xs.items():
        # The scoring share (select-*) is measured at the main batch size only.
        fns, info = _configs(bench, x, ks, scorers, round_to, with_select=b == batch)
        _adaptive_configs(bench, x, k_rules, scorers, fns, info)
        log(f"  timing {len(fns)} configurations at batch {b} ...")
        t = _time_round_robin(fns, reps=reps, iters=iters, warmup=warmup, sync=_sync(dev))
        for key, sec in t.items():
            rows.append({"batch": b, "key": key, "seconds": sec, **info[key]})

    meta = {"model": model_name, "batch": batch, "precision": precision, "device": _device_name(dev),
            "n_patches": n, "prefix": prefix, "image_size": [h, w], "reps": reps, "iters": iters,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "compile": compile,
            "round_to": round_to}
    return {"meta": meta, "rows": rows}


def _build_vit(model_name: str, image_size, model_kwargs, dev: torch.device) -> torch.nn.Module:
    """A random-weight timm ViT in eval mode on `dev` (timing does not depend on weights)."""
    import timm

    kw = dict(model_kwargs or {})
    if image_size:
        kw["img_size"] = image_size
    return check_model(timm.create_model(model_name, pretrained=False, **kw)).to(dev).eval()


@dataclass
class _Bench:
    """What every configuration of one run shares: the model, its patch counts, and how a
    module is wrapped (torch.compile or not) and called (autocast or not)."""

    vit: torch.nn.Module
    dev: torch.device
    n: int                  # patches of the input
    prefix: int             # CLS (+ register) tokens
    wrap: Callable
    ctx: Callable
    dense: Callable         # wrap(vit)
    sparse: Callable        # wrap(_Sparse(vit))


def _configs(bench: _Bench, x: torch.Tensor, ks, scorers, round_to,
             with_select: bool) -> tuple[dict[str, Callable[[], object]], dict[str, dict]]:
    """({key: zero-argument call}, {key: row fields}) of every configuration on input `x`:
    dense, then per K and rounding variant the precomputed-index path (when K < 100), and
    per scorer the online step and (`with_select`) its scoring + selection alone."""
    fns: dict[str, Callable[[], object]] = {}
    info: dict[str, dict] = {}
    n, prefix, wrap = bench.n, bench.prefix, bench.wrap

    def add(key, fn, **meta):
        def run(fn=fn):
            with torch.inference_mode(), bench.ctx():
                return fn()
        fns[key] = run
        info[key] = meta

    add("dense", lambda: bench.dense(x), K=100, mode="dense", scorer="", round_to=None, S=prefix + n)
    for k in ks:
        for r in [None] + ([round_to] if round_to else []):
            kept = keep_count(k, n, r, prefix)
            if r is not None and kept == keep_count(k, n, None, prefix):
                continue  # rounding changes nothing (e.g. K=100)
            if kept < n:
                with torch.inference_mode():
                    idx = DynaViT(bench.vit, k=k, scorer="l2", round_to=r).to(bench.dev).keep_indices(x)
                add(f"idx-{k}-{r}", lambda idx=idx: bench.sparse(x, idx), K=k, mode="sparse idx",
                    scorer="(precomputed)", round_to=r, S=prefix + kept)
            for sc in scorers:
                net = DynaViT(bench.vit, k=k, scorer=sc, round_to=r).to(bench.dev).eval()
                cnet = wrap(net)
                add(f"online-{k}-{sc}-{r}", lambda cnet=cnet: cnet(x), K=k, mode="online",
                    scorer=sc, round_to=r, S=prefix + kept)
                if with_select and kept < n:
                    sel = wrap(_Select(net))
                    add(f"select-{k}-{sc}-{r}", lambda sel=sel: sel(x), K=k, mode="select",
                        scorer=sc, round_to=r, S=prefix + kept)
    return fns, info


def _adaptive_configs(bench: _Bench, x: torch.Tensor, rules, scorers, fns: dict, info: dict) -> None:
    """Add the online adaptive-K configurations (one per rule and scorer) to fns/info."""
    for rule in rules:
        for sc in scorers:
            net = DynaViT(bench.vit, scorer=sc, k_rule=rule).to(bench.dev).eval()
            with torch.inference_mode():
                net(x)
            s_mean = bench.prefix + float(net.last_counts.float().mean())
            cnet = bench.wrap(net)

            def run(cnet=cnet):
                with torch.inference_mode(), bench.ctx():
                    return cnet(x)
            key = f"adaptive-{rule.text}-{sc}"
            fns[key] = run
            info[key] = dict(K=rule.text, mode="online adaptive (packed)", scorer=sc, round_to=None,
                             S=round(s_mean, 1))


class _Sparse(torch.nn.Module):  # so --compile can wrap the precomputed-index path too
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, idx):
        return sparse_forward(self.m, x, idx, validate=False)


class _Select(torch.nn.Module):
    def __init__(self, net: DynaViT):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.keep_indices(x)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    big = [r for r in rows if r["batch"] == meta["batch"]]
    by = {r["key"]: r for r in big}
    lat = {r["key"]: r for r in rows if r["batch"] == 1}
    dense = by["dense"]["seconds"]
    b = meta["batch"]
    lines = [f"### {meta['model']}: batch {b}, {meta['precision']}, {meta['device']}",
             "",
             f"N = {meta['n_patches']} patches, image {meta['image_size'][0]}x{meta['image_size'][1]}, "
             f"torch {meta['torch']}, median of {meta['reps']} round-robin reps x {meta['iters']} "
             f"call(s){', torch.compile' if meta['compile'] else ''}. Speed-up = dense time / "
             f"time, same run. Scoring share = score + top-K alone / online step.",
             "",
             "| K | path | scorer | S | img/s | × dense | scoring share | batch-1 ms |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for key, r in by.items():
        if r["mode"] == "select":
            continue
        share = ""
        if r["mode"] == "online":
            sk = key.replace("online-", "select-", 1)
            if sk in by:
                share = f"{100 * by[sk]['seconds'] / r['seconds']:.1f} %"
            else:
                share = "0 % (K=100: no scoring)" if r["K"] == 100 else ""
        l1 = f"{1000 * lat[key]['seconds']:.2f}" if key in lat else ""
        path = r["mode"] + (f", S↑{r['round_to']}" if r["round_to"] else "")
        lines.append(f"| {r['K']} | {path} | {r['scorer']} | {r['S']} | {b / r['seconds']:.1f} | "
                     f"{dense / r['seconds']:.2f} | {share} | {l1} |")
    return "\n".join(lines)


# --- bench-infer ---------------------------------------------------------------------------------

def _bench_infer_list(ctx, param, value):
    try:
        out = [v.strip() for v in value.split(",") if v.strip()]
    except AttributeError:
        raise click.BadParameter("expected a comma-separated list") from None
    if not out:
        raise click.BadParameter("expected a comma-separated list")
    if param.name == "k":
        try:
            ks = [int(v) for v in out]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a list of integers") from None
        if any(not 1 <= k <= 100 for k in ks):
            raise click.BadParameter("K must be in 1..100")
        return ks
    bad = [v for v in out if v not in SCORERS]
    if bad:
        raise click.BadParameter(f"unknown scorer(s) {', '.join(bad)}; valid: {', '.join(SCORERS)}")
    return out


@click.command("bench-infer", short_help="Inference img/s: dense, sparse, online.", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@renamed("--batch", "--batch-size", "batch_size", type=click.IntRange(min=1))
@renamed("--scorers", "--scorer", "scorers", type=str, callback=_bench_infer_list)
@renamed("--precision", "--amp", "amp", type=click.Choice(["fp32", "bf16", "fp16"]))
@renamed("--reps", "--repeats", "repeats", type=click.IntRange(min=1))
@renamed("--json-out", "--json", "json_out", type=click.Path(dir_okay=False), callback=out_file)
@click.option("--model", default="vit_tiny_patch16_224", show_default=True, help="timm ViT name.")
@click.option("--model-kwargs", default="{}", show_default=True, help="Extra timm.create_model kwargs (JSON).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per forward.")
@click.option("--k", default="100,70,50,25", show_default=True, callback=_bench_infer_list,
              help="Percents of patches kept.")
@click.option("--scorer", "scorers", default=",".join(SCORERS), show_default=True, callback=_bench_infer_list,
              help="Online scorers to time, comma-separated.")
@click.option("--device", type=DeviceType(), default="auto", show_default=True, help="Where to run (auto: cuda if available).")
@click.option("--amp", type=AmpType(), default="off", show_default=True,
              help="Autocast dtype (auto: bf16 on CUDA, off on CPU).")
@click.option("--round-to", type=click.IntRange(min=0), default=8, show_default=True,
              help="Also time S rounded up to a multiple of this (0: off).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timings per configuration (interleaved); the median is reported.")
@click.option("--iters", type=click.IntRange(min=1), default=1, show_default=True, help="Forwards per timing.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Untimed forwards per configuration first.")
@click.option("--k-rule", "k_rules", multiple=True, metavar="mass:TAU[,floor=F,ceil=C]",
              help="Also time online adaptive K with this rule (repeatable; images run packed).")
@click.option("--latency/--no-latency", default=True, show_default=True, help="Also time batch 1.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile every module first.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, callback=out_file,
              help="Also write the raw timings to this JSON file.")
def bench_infer_command(model, model_kwargs, batch_size, k, scorers, device, amp, round_to, repeats, iters, warmup,
                        k_rules, latency, compile_, threads, json_out):
    """Images/s of dense vs sparse (precomputed indices) vs online Dyna-ViT per scorer and K."""
    try:
        kwargs = json.loads(model_kwargs)
        assert isinstance(kwargs, dict)
    except (json.JSONDecodeError, AssertionError):
        raise click.BadParameter("must be a JSON object", param_hint="--model-kwargs") from None
    amp = resolve_amp_name(amp, device)
    precision = "fp32" if amp == "off" else amp  # run_bench's names
    rules = []
    for text in k_rules:
        try:
            rules.append(parse_k_rule(text))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--k-rule") from None
        if rules[-1].tau is None:
            raise click.BadParameter("budget:K needs a data set to calibrate τ; give mass:TAU", param_hint="--k-rule")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    click.echo(f"bench_infer: {model} batch {batch_size} K={k} on {device} ...", err=True)
    res = run_bench(model, batch_size, k, scorers, device, precision, round_to or None, repeats, iters,
                    warmup, latency, model_kwargs=kwargs, compile=compile_,
                    log=lambda s: click.echo(s, err=True), k_rules=tuple(rules))
    click.echo(format_table(res))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=1)
    click.echo(f"bench_infer: done in {time.perf_counter() - t0:.0f}s", err=True)


if __name__ == "__main__":
    bench_infer_command()

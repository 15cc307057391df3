"""Train-step (or inference) throughput of the sparse forward vs dense, on synthetic input.

    dynatrain bench-step --model vit_tiny_patch16_224 --batch 32 \
        --k 100,70,50,25 --steps 5 --repeats 3 --device cpu [--amp bf16] [--infer] [--json F]

One model, one optimizer, one batch for every configuration, so the only thing that
differs is the kept-index tensor. Configurations are interleaved inside each repeat
(order rotated per repeat) so that drift (thermal, other load) spreads over all of them;
the reported speed is the median over repeats. "dense" is timm's own ``model(x)``;
K=100 goes through ``sparse_forward`` with every index, which shows the gather overhead.
Ideal speed-up = dense MACs / sparse MACs (count_macs); a train step also pays the
optimizer and per-step overheads, which do not shrink with K.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from dynavit.manifests import k_count
from dynavit.trainer.methods.flops import build_meta_model, count_macs
from dynavit.trainer.methods.sparse import sparse_forward
import click
from dynavit.pipeline.cli_types import AmpType, DeviceType, renamed, resolve_amp_name
from dynavit.pipeline.cli_types import k_list
from dynavit.pipeline.cli_types import out_file
from dynavit.manifests import write_json_atomic

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_keep(batch: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values
                        for _ in range(batch)])


def bench(model_name: str, ks: list[int], batch: int = 32, steps: int = 5, warmup: int = 2,
          repeats: int = 3, amp: str = "off", device: str = "cpu", infer: bool = False,
          seed: int = 0, model_kwargs: dict | None = None) -> list[dict]:
    """Rows: dense first, then one per K (K, S, imgs_per_s, speedup, ideal_speedup,
    efficiency = speedup / ideal_speedup, macs per image, times_s per repeat and their
    spread = (max - min) / min, which says how much to trust the row)."""
    import timm

    dev = torch.device(device)
    torch.manual_seed(seed)
    model_kwargs = dict(model_kwargs or {})
    model = timm.create_model(model_name, pretrained=False, **model_kwargs).to(dev)
    model.train(not infer)
    n = int(model.patch_embed.grid_size[0] * model.patch_embed.grid_size[1])
    h, w = model.patch_embed.img_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, h, w, generator=gen).to(dev)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = AMP_DTYPES[amp]
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16 and dev.type == "cuda")

    configs = [("dense", None)] + [(k, _random_keep(batch, n, k_count(k, n), gen).to(dev))
                                   for k in ks]

    def forward(keep):
        return model(x) if keep is None else sparse_forward(model, x, keep, validate=False)

    def step(keep):
        autocast = (torch.autocast(dev.type, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        if infer:
            with torch.inference_mode(), autocast:
                forward(keep)
            return
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(forward(keep), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _, keep in configs:
        for _ in range(warmup):
            step(keep)
    _sync(dev)
    times: dict = {name: [] for name, _ in configs}
    for r in range(repeats):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for name, keep in order:
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(keep)
            _sync(dev)
            times[name].append(time.perf_counter() - t0)

    meta = build_meta_model(model_name, **model_kwargs)
    dense_macs = count_macs(meta, 100)
    rows = []
    for name, _ in configs:
        ips = batch * steps / statistics.median(times[name])
        k = 100 if name == "dense" else name
        macs = count_macs(meta, k)
        rows.append(dict(K=name, S=1 + k_count(k, n), imgs_per_s=ips, macs=macs,
                         ideal_speedup=dense_macs / macs,
                         spread=(max(times[name]) - min(times[name])) / min(times[name]),
                         times_s=times[name]))
    dense_ips = rows[0]["imgs_per_s"]
    for row in rows:
        row["speedup"] = row["imgs_per_s"] / dense_ips
        row["efficiency"] = row["speedup"] / row["ideal_speedup"]
    return rows


@click.command("bench-step", short_help="Sparse vs dense step speed-up, synthetic data.")
@renamed("--batch", "--batch-size", "batch_size", type=click.IntRange(1))
@click.option("--model", "model_name", default="vit_tiny_patch16_224", show_default=True,
              help="timm VisionTransformer name (random weights, pretrained=False).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1),
              help="Images per step.")
@click.option("--k", "ks", default="100,70,50,25", show_default=True, callback=k_list,
              help="Comma-separated keep percentages; dense timm forward is always added.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(1),
              help="Timed steps per configuration per repeat.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0),
              help="Untimed steps per configuration before timing.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1),
              help="Interleaved rounds over all configurations; the median is reported.")
@click.option("--amp", type=AmpType(), default="off", show_default=True,
              help="Autocast dtype (auto: bf16 on CUDA, off on CPU).")
@click.option("--device", type=DeviceType(), default="auto", show_default=True,
              help="Where to run (auto: cuda if available).")
@click.option("--infer", is_flag=True, help="Time inference (forward only) instead of a "
              "train step (forward, backward, AdamW step).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=out_file,
              help="Also write the rows and the settings to this JSON file.")
def bench_step_command(model_name, batch_size, ks, steps, warmup, repeats, amp, device, infer, json_path):
    """Measured vs ideal speed-up of the sparse forward over dense timm, synthetic data."""
    amp, batch = resolve_amp_name(amp, device), batch_size
    try:
        rows = bench(model_name, ks, batch, steps, warmup, repeats, amp, device, infer)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise click.BadParameter(str(e).splitlines()[0], param_hint="--model")
        raise
    what = "inference" if infer else "train step (fwd+bwd+AdamW)"
    click.echo(f"{model_name} batch={batch} amp={amp} device={device} "
               f"threads={torch.get_num_threads()} {what}")
    click.echo(f"{'K':>6} {'S':>5} {'img/s':>9} {'speedup':>8} {'ideal':>7} {'ratio':>6} "
               f"{'spread':>7}")
    for r in rows:
        click.echo(f"{r['K']!s:>6} {r['S']:>5} {r['imgs_per_s']:9.1f} {r['speedup']:8.3f} "
                   f"{r['ideal_speedup']:7.3f} {r['efficiency']:6.3f} {r['spread']:7.1%}")
    if json_path:
        doc = dict(model=model_name, batch=batch, amp=amp, device=device, infer=infer,
                   steps=steps, warmup=warmup, repeats=repeats,
                   threads=torch.get_num_threads(), torch=torch.__version__, rows=rows)
        write_json_atomic(json_path, doc)
    return rows


if __name__ == "__main__":
    bench_step_command()

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
from dynavit.trainer.flops import build_meta_model, count_macs
from dynavit.trainer.sparse import sparse_forward

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


if __name__ == "__main__":
    from .cli_tools import bench_step_command

    bench_step_command()

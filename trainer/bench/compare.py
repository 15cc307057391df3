"""Dyna-ViT vs ToMe vs EViT at matched compute: exact MACs and inference speed side by side.

    python -m dynavit.trainer.bench.compare --model vit_tiny_patch16_224 --k 70,50 --batch 32

For every K the ToMe r and EViT keep rate are matched to Dyna-ViT's exact MACs
(``budget.match_budgets``) on the benchmarked model, and separately on the reference model
(default vit_base_patch16_224, counted on the meta device), whose parameter and GMACs are
printed alongside. Then one randomly initialised model runs inference on one random batch
for every configuration: dense (timm's ``model(x)``), Dyna-ViT (``sparse_forward`` with
random kept indices of the right count: speed does not depend on which patches are kept),
ToMe and EViT. Configurations are interleaved inside each repeat (order rotated per repeat)
so that drift spreads over all of them; the speed is the median over repeats. Weights are
random, so this measures speed and compute, not accuracy (ToMe and EViT run their full
matching / selection on whatever the random weights produce).
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from dynavit.trainer.methods.budget import match_budgets
from dynavit.trainer.methods.evit import evit_forward
from dynavit.trainer.methods.flops import build_meta_model
from dynavit.trainer.methods.sparse import sparse_forward
from dynavit.trainer.methods.tome import tome_forward
import click
import json
from dynavit.pipeline.cli_types import AmpType, DeviceType, json_object, renamed, resolve_amp_name
from dynavit.pipeline.cli_types import k_list
import os
from dynavit.pipeline.cli_types import out_file
import tempfile

__all__ = ["compare", "format_compare"]


def _random_keep(batch: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values
                        for _ in range(batch)])


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def compare(model_name: str, ks: list[int], batch: int = 32, steps: int = 3,
            repeats: int = 3, warmup: int = 1, ref_model: Optional[str] = "vit_base_patch16_224",
            device: str = "cpu", seed: int = 0, model_kwargs: Optional[dict] = None,
            clock: str = "wall", amp: str = "off") -> dict:
    """{'model', 'ref_model', 'batch', 'device', 'dense': row, 'ks': [{K, rows}]}; each row:
    method, param, macs (bench model, per image), ref_param, ref_macs, imgs_per_s (median
    time), speedup (vs dense), best_imgs_per_s / best_speedup (fastest repeat, the steadier
    figure on a shared machine), spread ((max-min)/min time), ideal (dense MACs / MACs),
    times_s (per repeat). ``clock='cpu'`` times with the process CPU clock (CPU devices
    only): on a machine shared with other jobs it measures the work of this process rather
    than the time it waited for a core (use it with 1 thread). ``amp='bf16'``: every forward
    under torch.autocast(bfloat16), as training and inference with --amp bf16 run."""
    import timm

    now = _clock(clock, device)
    model_kwargs = dict(model_kwargs or {})
    budgets = match_budgets(model_name, ks, model_kwargs)
    refs = (match_budgets(ref_model, ks) if ref_model and ref_model != model_name
            else budgets) if ref_model else [None] * len(ks)

    dev = torch.device(device)
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **model_kwargs).to(dev).eval()
    gen = torch.Generator().manual_seed(seed)
    configs = _configs(model, budgets, refs, batch, gen, dev, ref_model)
    if amp not in ("off", "bf16"):
        raise ValueError(f"amp must be 'off' or 'bf16', got {amp!r}")
    times = _time_configs(configs, warmup, repeats, steps, dev, now, torch.bfloat16 if amp == "bf16" else None)

    dense_macs = configs[0]["macs"]
    dense = _row(configs[0], times, batch, steps, dense_macs)
    dense["speedup"] = dense["best_speedup"] = 1.0
    out_ks = []
    for b in budgets:
        rows = []
        for c in configs[1:]:
            if c["key"][0] == b["K"]:
                rr = _row(c, times, batch, steps, dense_macs)
                rr["speedup"] = rr["imgs_per_s"] / dense["imgs_per_s"]
                rr["best_speedup"] = rr["best_imgs_per_s"] / dense["best_imgs_per_s"]
                rows.append(rr)
        out_ks.append(dict(K=b["K"], rows=rows))
    return dict(model=model_name, ref_model=ref_model, batch=batch, steps=steps,
                repeats=repeats, device=str(dev), threads=torch.get_num_threads(), clock=clock,
                amp=amp, model_kwargs=model_kwargs, dense=dense, ks=out_ks)


def _clock(clock: str, device: str):
    """The timer for `clock` ('wall' or 'cpu'; the process CPU clock needs a CPU device)."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and torch.device(device).type != "cpu":
        raise ValueError("clock='cpu' only measures CPU devices")
    return time.perf_counter if clock == "wall" else time.process_time


def _configs(model, budgets: list[dict], refs: list, batch: int, gen: torch.Generator,
             dev: torch.device, ref_model: Optional[str] = None) -> list[dict]:
    """Dense first, then Dyna-ViT / ToMe / EViT and the learned methods per K: key, method, param, macs, ref_param,
    ref_macs and `run` (one forward of a fixed random batch)."""
    gh, gw = model.patch_embed.grid_size
    n = int(gh) * int(gw)
    h, w = model.patch_embed.img_size
    # Drawn from `gen` in this order (the batch, then the kept indices per K): same seed,
    # same inputs.
    x = torch.randn(batch, model.in_chans, h, w, generator=gen).to(dev)
    prefix = model.num_prefix_tokens
    configs = [dict(key="dense", method="dense", param="K=100", macs=budgets[0]["dense"]["macs"],
                    ref_param="K=100", ref_macs=refs[0]["dense"]["macs"] if refs[0] else None,
                    run=lambda: model(x))]
    for b, ref in zip(budgets, refs):
        k = b["K"]
        keep = _random_keep(batch, n, b["dynavit"]["S"] - prefix, gen).to(dev)
        r, kr = b["tome"]["r"], b["evit"]["keep_rate"]
        configs += [
            dict(key=(k, "dynavit"), method="dynavit", param=f"K={k} (S={b['dynavit']['S']})",
                 macs=b["dynavit"]["macs"], ref_param=f"K={k}",
                 ref_macs=ref["dynavit"]["macs"] if ref else None,
                 run=lambda keep=keep: sparse_forward(model, x, keep, validate=False)),
            dict(key=(k, "tome"), method="tome", param=f"r={r}", macs=b["tome"]["macs"],
                 ref_param=f"r={ref['tome']['r']}" if ref else "-",
                 ref_macs=ref["tome"]["macs"] if ref else None,
                 run=lambda r=r: tome_forward(model, x, r)),
            dict(key=(k, "evit"), method="evit", param=f"keep={kr:g}", macs=b["evit"]["macs"],
                 ref_param=f"keep={ref['evit']['keep_rate']:g}" if ref else "-",
                 ref_macs=ref["evit"]["macs"] if ref else None,
                 run=lambda kr=kr: evit_forward(model, x, kr)),
        ]
        configs += _learned_configs(model, x, k, ref_model)
    return configs


def _learned_configs(model, x: torch.Tensor, k: int, ref_model) -> list[dict]:
    """DynamicViT, TNT, Token Cropr and SViT at K's budget (their heads randomly initialised: the
    cost of a forward does not depend on the weights; exact MACs include the heads)."""
    from dynavit.trainer.model import budget_record, make_heads, method_forward
    from dynavit.trainer.selection import LEARNED

    out = []
    ref = build_meta_model(ref_model) if ref_model else None
    for method in LEARNED:
        try:
            heads = make_heads(model, method, model.num_classes).to(x.device).eval()
            rec = budget_record(model, method, k, heads)  # the same record training writes
        except ValueError:  # a model the method refuses (e.g. too shallow for its stages): no row
            continue
        param = rec["param"]
        ref_param = ref_macs = None
        if ref is not None:
            ref_rec = budget_record(ref, method, k, make_heads(ref, method, ref.num_classes))
            ref_param, ref_macs = ref_rec["param"], ref_rec["macs"]
        out.append(dict(key=(k, method), method=method, param=rec["described"].split(" (")[0],
                        macs=rec["macs"], ref_param="-" if ref_param is None else f"{ref_param}",
                        ref_macs=ref_macs,
                        run=_learned_run(model, x, method, param, heads)))
    return out


def _learned_run(model, x: torch.Tensor, method: str, param, heads):
    """The timed forward. SViT's rate is dynamic (its random selectors would keep about half
    of the tokens): it is timed with every image at its targets, the forward its MACs count."""
    from dynavit.trainer.model import method_forward

    if method == "svit":
        from dynavit.trainer.methods.svit import svit_forward, svit_keep_counts
        counts = svit_keep_counts(model.patch_embed.num_patches, heads, param)
        return lambda: svit_forward(model, heads, x, counts=counts)
    return lambda: method_forward(model, x, None, method, param, heads=heads)


def _time_configs(configs: list[dict], warmup: int, repeats: int, steps: int, dev: torch.device,
                  now, dtype: Optional[torch.dtype] = None) -> dict:
    """Seconds of `steps` runs per repeat, per config key. The order is rotated every repeat
    so that drift of the machine spreads over all configurations."""
    times = {c["key"]: [] for c in configs}
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        for c in configs:  # warm-up (allocator, kernels)
            for _ in range(warmup):
                c["run"]()
        for rep in range(repeats):
            shift = rep % len(configs)
            for c in configs[shift:] + configs[:shift]:
                _sync(dev)
                t0 = now()
                for _ in range(steps):
                    c["run"]()
                _sync(dev)
                times[c["key"]].append(now() - t0)
    return times


def _row(c: dict, times: dict, batch: int, steps: int, dense_macs) -> dict:
    """The result row of config `c` (without the speed-ups, which need the dense row)."""
    med = statistics.median(times[c["key"]])
    best = min(times[c["key"]])
    return dict(method=c["method"], param=c["param"], macs=c["macs"],
                ref_param=c["ref_param"], ref_macs=c["ref_macs"],
                imgs_per_s=batch * steps / med, best_imgs_per_s=batch * steps / best,
                spread=(max(times[c["key"]]) - best) / best, times_s=times[c["key"]],
                ideal=dense_macs / c["macs"])


def format_compare(res: dict) -> str:
    ref = res["ref_model"] or "-"
    lines = [f"{res['model']} on {res['device']} ({res['threads']} threads, {res['clock']} "
             f"clock, amp {res.get('amp', 'off')}), batch {res['batch']}, {res['steps']} batches x {res['repeats']} repeats; "
             f"GMACs per image (exact counts); img/s from the median and the fastest repeat; "
             f"ref = {ref}, its parameter matched there separately"]
    head = (f"{'K':>4} {'method':<8} {'parameter':<16} {'GMACs':>7} {'vs dyna':>8} "
            f"{'img/s':>7} {'speed-up':>8} {'best':>7} {'speed-up':>8} {'spread':>6} "
            f"{'ideal':>6}   {'ref param':<11} {'ref GMACs':>9}")
    lines.append(head)

    def fmt(k, r, dyna_macs):
        vs = f"{(r['macs'] - dyna_macs) / dyna_macs:+7.1%}" if dyna_macs else f"{'':>7}"
        refm = f"{r['ref_macs'] / 1e9:9.3f}" if r["ref_macs"] is not None else f"{'-':>9}"
        return (f"{k:>4} {r['method']:<8} {r['param']:<16} {r['macs'] / 1e9:7.3f} {vs:>8} "
                f"{r['imgs_per_s']:7.1f} {r['speedup']:7.2f}x {r['best_imgs_per_s']:7.1f} "
                f"{r['best_speedup']:7.2f}x {r['spread']:6.0%} {r['ideal']:5.2f}x   "
                f"{r['ref_param']:<11} {refm}")

    lines.append(fmt(100, res["dense"], None))
    for kk in res["ks"]:
        dyna = next(r["macs"] for r in kk["rows"] if r["method"] == "dynavit")
        for r in kk["rows"]:
            lines.append(fmt(kk["K"], r, dyna))
    return "\n".join(lines)


# --- bench-compare -------------------------------------------------------------------------------

@click.command("bench-compare", short_help="Methods at matched MACs: GMACs and img/s.")
@renamed("--batch", "--batch-size", "batch_size", type=click.IntRange(1))
@click.option("--model", "model_name", default="vit_tiny_patch16_224", show_default=True,
              help="timm VisionTransformer to benchmark (random weights, nothing downloaded).")
@click.option("--k", "ks", default="70,50", show_default=True, callback=k_list,
              help="Comma-separated Dyna-ViT keep percentages K; ToMe and EViT are matched "
                   "to each K's exact MACs.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1),
              help="Images per forward.")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(1),
              help="Forwards per timing.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1),
              help="Timings per configuration (interleaved); median and fastest are reported.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0),
              help="Untimed forwards per configuration first.")
@click.option("--ref-model", default="vit_base_patch16_224", show_default=True,
              help="Model whose matched parameters and GMACs are printed alongside "
                   "(counted on the meta device); '' for none.")
@click.option("--device", type=DeviceType(), default="auto", show_default=True, help="Where to run (auto: cuda if available).")
@click.option("--threads", default=0, type=click.IntRange(0),
              help="torch intra-op threads (0: torch's default).")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="wall: elapsed time; cpu: this process's CPU time (steadier on a machine "
                   "shared with other jobs; use with --threads 1).")
@click.option("--amp", type=AmpType(), default="off", show_default=True,
              help="Run every forward under bf16 autocast (as --amp bf16 trains and infers); auto: bf16 on "
                   "CUDA, off on CPU; fp16 is not measured here.")
@click.option("--model-kwargs", default=None, callback=json_object, metavar="JSON",
              help="Extra timm.create_model kwargs, e.g. '{\"depth\": 6}'.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=out_file,
              help="Also write the results to this JSON file.")
def bench_compare_command(model_name, ks, batch_size, steps, repeats, warmup, ref_model, device, threads, clock,
                          amp, model_kwargs, json_path):
    """Dyna-ViT vs ToMe vs EViT at matched exact MACs: GMACs and inference img/s."""
    if threads:
        torch.set_num_threads(threads)
    amp = resolve_amp_name(amp, device)
    if amp == "fp16":
        raise click.BadParameter("fp16 is not measured by bench-compare; use bf16", param_hint="--amp")
    try:
        res = compare(model_name, ks, batch=batch_size, steps=steps, repeats=repeats,
                      warmup=warmup, ref_model=ref_model or None, device=device, clock=clock, amp=amp,
                      model_kwargs=model_kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise click.UsageError(str(e).splitlines()[0])
    click.echo(format_compare(res))
    if json_path:
        d = os.path.dirname(os.path.abspath(json_path))
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, json_path)


if __name__ == "__main__":
    bench_compare_command()

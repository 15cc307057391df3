"""`dynatrain compare`: the paper's Table 3 from finished runs, one row per run.

    method · parameter · GMACs · train img/s · inference img/s · best top-1

Every number is measured, none copied: the parameter is the one the run recorded when it
started (config.json ``run.budget``; matched again only for a run that predates the record,
and then marked); GMACs are its exact count (``macs.MacCounter``, attention included) of the
run's own forward (Dyna-ViT's sparse forward at K, ToMe at its r, EViT at its keep rate, the
learned methods with their heads) on a meta-device copy of the run's model; train img/s is the mean of the
run's metrics.jsonl; inference img/s is timed here, side by side for every run in one
process (interleaved repeats, median), on random input of the model's size; best top-1 is
the highest acc1 of metrics.jsonl. Runs are typically trained with `--method` at one `--k`
(the budget), so that their GMACs match.
"""
from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import torch

from dynavit.manifests import atomic_path, k_count

from dynavit.trainer.config import TrainConfig
from dynavit.trainer.methods.budget_limit import LIMIT_NOTE, at_limit
from dynavit.trainer.methods.flops import build_meta_model
from dynavit.trainer.model import make_heads, match_method, method_forward, method_macs  # noqa: F401 (method_macs re-exported)
from dynavit.trainer.analysis.report import load_run
from dynavit.trainer.analysis.adaptive import adaptive_keep_batch, adaptive_parameter
from dynavit.trainer.selection import DENSE_K

FIELDS = ("run", "method", "parameter", "seed", "gmacs", "train_img_s", "infer_img_s", "infer_img_s_min",
          "infer_img_s_max", "best_acc1", "budget_source", "at_limit")
GROUP_FIELDS = ("method", "parameter", "n", "seeds", "gmacs", "train_img_s", "infer_img_s", "infer_img_s_min",
                "infer_img_s_max", "acc1_mean", "acc1_std", "runs", "at_limit")


def _model(cfg: TrainConfig, run_meta: dict, device: str = "cpu"):
    import timm

    kwargs = {"img_size": tuple(run_meta["run"]["input_size"]), **cfg.model_kwargs,
              "num_classes": run_meta["dataset"]["num_classes"]}
    kwargs.pop("pretrained", None)
    if device == "meta":
        return build_meta_model(cfg.model, **kwargs)
    return timm.create_model(cfg.model, pretrained=False, **kwargs).to(device).eval()


def compare_runs(run_dirs, *, batch: int = 32, steps: int = 3, repeats: int = 3, device: str = "cpu") -> list[dict]:
    rows, forwards = [], []
    for run_dir in run_dirs:
        run = load_run(run_dir)
        cfg = TrainConfig.from_dict(run.config)
        k = run.metrics[-1].get("k", cfg.k)
        num_classes = run.meta["dataset"]["num_classes"]
        meta_model = _model(cfg, run.meta, "meta")
        meta_heads = make_heads(meta_model, cfg.method, num_classes)
        if cfg.k_rule is not None:  # adaptive K: its recorded mean MACs (analysis/adaptive.py)
            param, source = None, "recorded"
            described, macs = adaptive_parameter(cfg.k_rule, run.metrics[-1])
            limit = False
        else:
            param, described, macs, source = run_budget(run, cfg, k, meta_model, meta_heads)
            limit = at_limit(meta_model, cfg.method, k, macs, method_macs(meta_model, "dynavit", k, None), meta_heads)
        best = max(run.metrics, key=lambda m: (m["acc1"], -m["epoch"]))
        method = cfg.method if cfg.select == "saliency" or cfg.method != "dynavit" else f"dynavit ({cfg.select})"
        rows.append({"run": run.name, "method": method + (" adaptive" if cfg.k_rule else ""), "parameter": described, "seed": cfg.seed, "gmacs": macs / 1e9,
                     "train_img_s": statistics.mean(m["images_per_s"] for m in run.metrics),
                     "infer_img_s": None, "best_acc1": best["acc1"], "budget_source": source,
                     "at_limit": limit})
        model = _model(cfg, run.meta, device)
        heads = make_heads(model, cfg.method, num_classes)
        heads = None if heads is None else heads.to(device).eval()
        n = model.patch_embed.num_patches
        keep = None
        if cfg.k_rule is not None:
            keep = adaptive_keep_batch(run.metrics[-1], batch, n, device)
        elif cfg.method == "dynavit" and k != DENSE_K:
            gen = torch.Generator().manual_seed(0)
            keep = torch.stack([torch.randperm(n, generator=gen)[:k_count(k, n)].sort().values
                                for _ in range(batch)]).to(device)
        x = torch.randn(batch, 3, *model.patch_embed.img_size, device=device)
        forwards.append(lambda m=model, x=x, keep=keep, method=cfg.method, p=param, h=heads:
                        method_forward(m, x, keep, method, p, heads=h))
    times: list[list[float]] = [[] for _ in forwards]
    with torch.no_grad():
        for f in forwards:  # warm-up
            f()
        for _ in range(repeats):  # interleaved, so that machine noise hits every run alike
            for i, f in enumerate(forwards):
                t0 = time.perf_counter()
                for _ in range(steps):
                    f()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[i].append((time.perf_counter() - t0) / steps)
    for row, t in zip(rows, times):
        row["infer_img_s"] = batch / statistics.median(t)
        row["infer_img_s_min"], row["infer_img_s_max"] = batch / max(t), batch / min(t)
        row["_infer_repeats"] = [batch / x for x in t]
    return rows


def group_rows(rows: list[dict]) -> list[dict]:
    """One row per (method, recorded parameter), in first-seen order: the paper's protocol runs
    each method at one budget over several seeds, so a row is the mean ± sample std of best
    top-1 over its runs (std None for a single run); inference img/s is the median and range
    over every timing repeat of its runs; train img/s the mean of the runs' means."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["parameter"]), []).append(r)
    out = []
    for (method, parameter), rs in groups.items():
        acc = [r["best_acc1"] for r in rs]
        reps = [x for r in rs for x in r.get("_infer_repeats", [r["infer_img_s"]])]
        out.append({"method": method, "parameter": parameter, "n": len(rs),
                    "seeds": " ".join(str(r.get("seed")) for r in rs),
                    "gmacs": statistics.mean(r["gmacs"] for r in rs),
                    "train_img_s": statistics.mean(r["train_img_s"] for r in rs),
                    "infer_img_s": statistics.median(reps), "infer_img_s_min": min(reps),
                    "infer_img_s_max": max(reps), "acc1_mean": statistics.mean(acc),
                    "acc1_std": statistics.stdev(acc) if len(acc) > 1 else None,
                    "runs": " ".join(r["run"] for r in rs),
                    "at_limit": any(r.get("at_limit", False) for r in rs),
                    "budget_source": "recorded" if all(r.get("budget_source", "recorded") == "recorded" for r in rs)
                    else "re-matched"})
    return out


def run_budget(run, cfg: TrainConfig, k: int, meta_model, meta_heads) -> tuple[object, str, int, str]:
    """(param, described, macs, source) of a run: the budget it recorded when it started
    (source "recorded"), its MACs recounted here to check them; a run that predates the
    record is matched again (source "re-matched")."""
    budget = run.meta.get("run", {}).get("budget") if isinstance(run.meta.get("run"), dict) else None
    if isinstance(budget, dict) and budget.get("method") == cfg.method and "param" in budget:
        param, described = budget["param"], str(budget.get("described", ""))
        macs = method_macs(meta_model, cfg.method, k, param, meta_heads)
        if budget.get("macs") is not None and int(budget["macs"]) != macs:
            return param, f"{described} [recorded {int(budget['macs']) / 1e9:.4f} GMACs, counted here]", macs, "recounted"
        return param, described, macs, "recorded"
    param, described = match_method(meta_model, cfg.method, k, meta_heads)
    return param, described, method_macs(meta_model, cfg.method, k, param, meta_heads), "re-matched"


def _limit_mark(row: dict) -> str:
    return f" **({LIMIT_NOTE})**" if row.get("at_limit") else ""


def _gm(gmacs: float) -> str:
    """GMACs with 4 significant digits: tiny test models cost a few MMACs."""
    return f"{gmacs:.3f}" if gmacs >= 1 else f"{gmacs:.4g}"


def write_compare(rows: list[dict], out_dir) -> list[Path]:
    """compare.md (one row per method and parameter, mean ± std over its runs, then one row per
    run), compare.csv (per run), compare_groups.csv and (with matplotlib) acc_vs_gmacs.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_rows(rows)
    lines = ["| method | parameter | runs (seeds) | GMACs | train img/s | inference img/s (median, range) | "
             "best top-1 (mean ± std) |", "|:--|:--|:--|--:|--:|--:|--:|"]
    for g in groups:
        mark = ("" if g["budget_source"] == "recorded" else " †") + _limit_mark(g)
        std = "n = 1, no std" if g["acc1_std"] is None else f"± {g['acc1_std']:.1f}"
        lines.append(f"| {g['method']} | {g['parameter']}{mark} | {g['n']} ({g['seeds']}) | {_gm(g['gmacs'])} | "
                     f"{g['train_img_s']:.1f} | {g['infer_img_s']:.1f} ({g['infer_img_s_min']:.1f}–"
                     f"{g['infer_img_s_max']:.1f}) | {g['acc1_mean']:.1f} % {std} |")
    lines += ["", "Per run:", "", "| run | method | parameter | seed | GMACs | train img/s | inference img/s | best top-1 |",
              "|:--|:--|:--|--:|--:|--:|--:|--:|"]
    for r in rows:
        mark = ("" if r.get("budget_source", "recorded") == "recorded" else " †") + _limit_mark(r)
        lines.append(f"| {r['run']} | {r['method']} | {r['parameter']}{mark} | {r.get('seed')} | {_gm(r['gmacs'])} | "
                     f"{r['train_img_s']:.1f} | "
                     f"{r['infer_img_s']:.1f} | {r['best_acc1']:.1f} % |")
    lines.append("")
    lines.append("parameter: as each run recorded it when it started (config.json run.budget); GMACs: that "
                 "parameter's exact count (dynavit.trainer.methods.macs); a grouped row is every run of one method at one "
                 "parameter (its seeds), best top-1 its mean ± sample std; inference img/s the median and range of "
                 "all its interleaved timing repeats")
    if any(r.get("budget_source", "recorded") != "recorded" for r in rows):
        lines.append("† re-matched here: the run predates recorded budgets, or its recorded MACs differ from "
                     "today's count")
    if any(r.get("at_limit") for r in rows):
        lines.append(f"{LIMIT_NOTE}: the method's cheapest parameter still costs more than Dyna-ViT at this K on "
                     "this model, so the row is not at equal compute (dynavit.trainer.methods.budget_limit)")
    files = [out / "compare.md", out / "compare.csv", out / "compare_groups.csv"]
    with atomic_path(files[0]) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(files[1]) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k) for k in FIELDS} for r in rows)
    with atomic_path(files[2]) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=GROUP_FIELDS)
            w.writeheader()
            w.writerows({k: g[k] for k in GROUP_FIELDS} for g in groups)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for g in groups:  # one point per method and parameter, its error bar the std over seeds
        ax.errorbar(g["gmacs"], g["acc1_mean"], yerr=g["acc1_std"] or 0, fmt="o", capsize=3)
        ax.annotate(f"{g['method']} {g['parameter'].split(' (')[0]}", (g["gmacs"], g["acc1_mean"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("GMACs per image (exact)")
    ax.set_ylabel("best top-1 (%, mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out / "acc_vs_gmacs.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return files + [out / "acc_vs_gmacs.png"]

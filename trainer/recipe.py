"""Fine-tuning recipe knobs of `dynatrain train` that people expect from timm's train.py:
flip probabilities, EMA of the weights, layer-wise LR decay, gradient accumulation and
--drop-path, plus the checks of all of them (the colour augmentations are in augment.py).

None of them moves a pixel relative to the kept-patch indices: flips are applied by the
loader together with the index map (data.py), everything else acts on weights or gradients.
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from dynavit.trainer.augment import check_augment
from dynavit.trainer.errors import ConfigError
from dynavit.trainer.mixing import check_mixing

if TYPE_CHECKING:  # only for annotations: config imports this module
    from dynavit.trainer.config import TrainConfig


def check_recipe(cfg: TrainConfig) -> None:
    """One-line ConfigError for a recipe option out of range (no side effects)."""
    def bad(name: str, value, ok: bool) -> None:
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{name} {value} is out of range", name)

    bad("--hflip", cfg.hflip, 0 <= cfg.hflip <= 1)
    bad("--vflip", cfg.vflip, 0 <= cfg.vflip <= 1)
    bad("--accum-steps", cfg.accum_steps, isinstance(cfg.accum_steps, int) and cfg.accum_steps >= 1)
    if cfg.model_ema_decay is not None:
        bad("--model-ema-decay", cfg.model_ema_decay, 0 < cfg.model_ema_decay < 1)
    if cfg.layer_decay is not None:
        bad("--layer-decay", cfg.layer_decay, 0 < cfg.layer_decay <= 1)
    if cfg.drop_path is not None:
        bad("--drop-path", cfg.drop_path, 0 <= cfg.drop_path < 1)
        given = cfg.model_kwargs.get("drop_path_rate") if isinstance(cfg.model_kwargs, dict) else None
        if given is not None and given != cfg.drop_path:
            raise ConfigError(f"--drop-path {cfg.drop_path} contradicts --model-kwargs drop_path_rate={given}",
                              "--drop-path")
    check_augment(cfg)
    check_mixing(cfg)


def model_kwargs(cfg: TrainConfig) -> dict:
    """--model-kwargs with --drop-path as timm's drop_path_rate."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    return kwargs


# --- optimizer groups ---------------------------------------------------------------------------

def param_groups(vit: nn.Module, heads: nn.Module | None, cfg: TrainConfig) -> list[dict]:
    """timm's weight-decay groups; with --layer-decay, timm's param_groups_layer_decay (BEiT:
    block i of D gets lr × decay^(D−i), patch/pos embeddings and tokens decay^(D+1), the
    final norm as the last block, the head 1) with each group's lr set from its lr_scale, so that the per-step
    schedule (a LambdaLR factor on every group's initial lr) keeps the ratios. A learned
    method's heads are not layers of the ViT: they train at the full lr."""
    no_wd = vit.no_weight_decay()
    if cfg.layer_decay is None:
        groups = param_groups_weight_decay(vit, cfg.weight_decay, no_weight_decay_list=no_wd)
    else:
        groups = param_groups_layer_decay(vit, cfg.weight_decay, no_weight_decay_list=no_wd,
                                          layer_decay=cfg.layer_decay)
        for g in groups:
            g["lr"] = cfg.lr * g.pop("lr_scale", 1.0)
    if heads is not None:
        groups += param_groups_weight_decay(heads, cfg.weight_decay)
    return groups


# --- EMA of the weights -------------------------------------------------------------------------

class ModelEma:
    """An exponential moving average of the ViT's (and a learned method's heads') state:
    after every optimizer step, ema ← decay·ema + (1−decay)·weights for floating-point
    entries, buffers of other types copied; as timm's ModelEmaV3 without warm-up, kept in
    float32 on the model's device. Evaluated every epoch beside the raw weights; saved in
    last.pt and best.pt (`model_ema`, a plain timm state_dict, and `method_ema`)."""

    def __init__(self, vit: nn.Module, heads: nn.Module | None, decay: float):
        self.decay = decay
        self.vit = copy.deepcopy(vit).eval().requires_grad_(False)
        self.heads = None if heads is None else copy.deepcopy(heads).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, vit: nn.Module, heads: nn.Module | None) -> None:
        pairs = [(self.vit, vit)] + ([(self.heads, heads)] if heads is not None else [])
        for ema, live in pairs:
            ema_sd, live_sd = ema.state_dict(), live.state_dict()
            floats = [k for k, v in ema_sd.items() if v.is_floating_point()]
            torch._foreach_lerp_([ema_sd[k] for k in floats], [live_sd[k].detach() for k in floats],
                                 1.0 - self.decay)
            for k, v in ema_sd.items():
                if not v.is_floating_point():
                    v.copy_(live_sd[k])

    def state(self) -> tuple[dict, dict | None]:
        return self.vit.state_dict(), None if self.heads is None else self.heads.state_dict()

    def load(self, vit_state: dict, heads_state: dict | None) -> None:
        self.vit.load_state_dict(vit_state)
        if self.heads is not None and heads_state is not None:
            self.heads.load_state_dict(heads_state)


def make_ema(vit: nn.Module, heads: nn.Module | None, cfg: TrainConfig) -> ModelEma | None:
    return None if cfg.model_ema_decay is None else ModelEma(vit, heads, cfg.model_ema_decay)


# --- gradient accumulation ----------------------------------------------------------------------

def optimizer_steps(cfg: TrainConfig, loader_steps: int) -> int:
    """Optimizer steps per epoch: every --accum-steps loader batches make one; a tail of fewer
    is not read (as a batch of accum × batch-size would drop it: the loader's batches are
    consecutive slices of one permutation, so the two see the same samples)."""
    steps = loader_steps // cfg.accum_steps
    if steps < 1:
        raise ConfigError(f"--accum-steps {cfg.accum_steps} is more than the {loader_steps} batches of an epoch",
                          "--accum-steps")
    return steps


# --- description (dynatrain report) -------------------------------------------------------------

RECIPE_DEFAULTS = {"hflip": 0.5, "vflip": 0.0, "trivial_color": False, "color_jitter": None, "reprob": 0.0, "model_ema_decay": None,
                   "layer_decay": None, "accum_steps": 1, "drop_path": None, "mixup": 0.0, "cutmix": 0.0}


def describe(config: dict) -> str:
    """The recipe options a run's config.json sets away from their defaults, e.g.
    "hflip 0 · ema 0.9998 · cutmix 1"; "default" for none (runs before these options:
    hflip 0.5, no other)."""
    names = {"model_ema_decay": "ema", "color_jitter": "jitter", "accum_steps": "accum", "drop_path": "drop-path",
             "layer_decay": "layer-decay"}
    parts = []
    for key, default in RECIPE_DEFAULTS.items():
        value = config.get(key, default)
        if value != default:
            if isinstance(value, bool):
                parts.append(key.replace("_", "-"))
                continue
            shown = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"
            parts.append(f"{names.get(key, key)} {shown}")
    if config.get("reprob", 0.0) and config.get("remode", "pixel") != "pixel":
        parts.append(f"remode {config['remode']}")
    if config.get("mixup", 0.0) or config.get("cutmix", 0.0):
        parts += [f"{k.replace('_', '-')} {config[k]:g}" for k, d in (("mixup_prob", 1.0), ("mixup_switch_prob", 0.5))
                  if config.get(k, d) != d]
    return " · ".join(parts) or "default"


def epoch_batches(loader, count: int):
    """The loader's batches of one epoch, only the first `count` (< loader.steps with
    --accum-steps): then the loader is closed after them, which stops its workers at once.
    All of them: the loader itself, so that its end-of-epoch checks run."""
    if count >= loader.steps:
        yield from loader
        return
    batches = iter(loader)
    try:
        for _ in range(count):
            yield next(batches)
    finally:
        batches.close()


__all__ = ["ModelEma", "check_recipe", "epoch_batches", "describe", "make_ema", "model_kwargs", "optimizer_steps", "param_groups"]

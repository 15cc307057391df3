"""Each token-reduction method's fine-tuning recipe, as its authors run it.

A recipe applies when a run fine-tunes (``--checkpoint`` or ``--pretrained``): the authors'
recipes start from a trained dense model. From scratch every method trains the whole model
with the task loss (a frozen or 1 %-rate random backbone would learn nothing).

What a recipe sets (each overridable on the command line):
- ``backbone_lr_scale``: the timm backbone's learning rate is ``--lr`` × this (0: frozen, left
  out of the optimizer); the method's own modules (predictors, heads, routers) train at
  ``--lr``. A classifier that ``--checkpoint`` could not load (another class count) is fresh
  and trains at ``--lr`` whatever the scale.
- ``backbone_frozen_in_warmup``: the backbone stays fixed during ``--warmup-epochs``.
- ``untrained``: backbone parameters left out of the optimizer altogether.
- ``teacher``: with ``--teacher auto`` the method distils from its own start weights.
- ``layer_decay``: layer-wise learning-rate decay (``--layer-decay`` when the command line
  gives none): block i of D at ``--lr`` × decay^(D−i).
- ``warmup_share``: linear warm-up over this share of the epochs, when the run uses
  ``--sched cosine`` and gives no ``--warmup-epochs`` (0).

Sources (read at the pinned commits):
- DynamicViT (raoyongming/DynamicViT 1322e62): main.py ``--lr_scale`` 0.01 for the backbone,
  optim_factory.py ``get_parameter_groups`` (backbone groups ``fix_step`` 5 = its 5 warm-up
  epochs with lr 0, cls_token and pos_embed skipped), losses.py
  ``DistillDiffPruningLoss_dynamic`` for DeiT: CE + 2·ratio + 0.5·KL(teacher logits) +
  0.5·MSE(kept tokens, teacher tokens), teacher = the pretrained dense model.
- TNT (mx-ethan-rao/tnt d095619): main.py freezes the whole ViT and trains the alpha heads;
  the training forward adds the noise (trainer/methods/tnt.py).
- EViT (youweiliang/evit 5ca95a7): finetune.sh fine-tunes the whole model at the final keep
  rate from the first step (``--shrink_start_epoch 0 --shrink_epochs 0``). From scratch
  (run_code.sh: 300 epochs, ``--shrink_start_epoch 10 --shrink_epochs 100``) the keep rate is
  1 for the first 10 epochs, then goes from 1 to the final rate along a half cosine over 100
  epochs (helpers.py ``adjust_keep_rate``, per iteration); here the same fractions of the
  run's epochs (``keep_rate_at``).
- ToMe (facebookresearch/ToMe af95e4b): no recipe of its own (off the shelf, or trained like
  the model); prop_attn as its timm patch.
- Token Cropr (benbergner/cropr 2f8b624): the whole model with its routers' auxiliary losses
  (trainer/model.py ``training_loss``) under its own schedule (cls/main.py, cls/utils.py):
  AdamW, layer-wise lr decay 0.75 (``param_groups_lrd``, BEiT's: block i of D at
  0.75^(D−i), embeddings 0.75^(D+1), the rest, routers included, at 1), linear warm-up over
  5 of 50 epochs then cosine (``cosine_scheduler``; to min_lr 1e-6, here to 0), peak lr
  1e-3 × batch / 256. The peak lr and the epochs stay the run's ``--lr`` and ``--epochs``.
- Dyna-ViT: the whole model on the kept patches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    backbone_lr_scale: float = 1.0
    backbone_frozen_in_warmup: bool = False
    untrained: tuple[str, ...] = ()
    teacher: bool = False
    keep_warmup: tuple[float, float] | None = None  # EViT: (start, length) as fractions of the epochs
    layer_decay: float | None = None
    warmup_share: float | None = None
    source: str = ""


FROM_SCRATCH = Recipe(source="from scratch: the whole model, task loss")

RECIPES = {
    "dynavit": Recipe(source="Dyna-ViT: the whole model on the kept patches"),
    "tome": Recipe(source="ToMe af95e4b: no recipe of its own, trained like the model"),
    "evit": Recipe(source="EViT 5ca95a7 finetune.sh: the whole model at the final keep rate"),
    "dynamicvit": Recipe(backbone_lr_scale=0.01, backbone_frozen_in_warmup=True,
                         untrained=("cls_token", "pos_embed"), teacher=True,
                         source="DynamicViT 1322e62: backbone lr x0.01, fixed in warm-up, "
                                "cls/pos frozen; CE + 2 ratio + 0.5 KL + 0.5 token MSE to the "
                                "start weights"),
    "tnt": Recipe(backbone_lr_scale=0.0,
                  source="TNT d095619: frozen backbone, alpha heads trained under noise"),
    "cropr": Recipe(layer_decay=0.75, warmup_share=5 / 50,
                    source="Cropr 2f8b624: the whole model + router auxiliary losses, layer-wise lr "
                           "decay 0.75, warm-up 5/50 of the epochs then cosine"),
    "svit": Recipe(source="SViT 0d81069: the whole model + 4 x its dynamic ratio loss"),
}


EVIT_FROM_SCRATCH = Recipe(keep_warmup=(10 / 300, 100 / 300),
                           source="EViT 5ca95a7 run_code.sh: keep rate 1 for 10/300 of the epochs, "
                                  "then a half cosine to the final rate over 100/300")


def recipe_for(method: str, fine_tune: bool) -> Recipe:
    """The method's recipe when the run fine-tunes, else ``FROM_SCRATCH`` (EViT: with its
    keep-rate warm-up)."""
    if fine_tune:
        return RECIPES[method]
    return EVIT_FROM_SCRATCH if method == "evit" else FROM_SCRATCH


def keep_rate_at(recipe: Recipe, final: float, epochs: int, steps_per_epoch: int):
    """EViT's ``adjust_keep_rate`` over this run: a function of the global step (None when
    the recipe has no keep-rate warm-up). 1 before the start, ``final`` after the end, in
    between final + (1 − final)·(cos(π·t) + 1)/2 with t the share of the shrinking done."""
    if recipe.keep_warmup is None:
        return None
    start = recipe.keep_warmup[0] * epochs * steps_per_epoch
    length = recipe.keep_warmup[1] * epochs * steps_per_epoch

    def rate(step: int) -> float:
        if step < start:
            return 1.0
        if step >= start + length:
            return final
        return final + (1.0 - final) * (math.cos((step - start) / length * math.pi) + 1.0) * 0.5

    return rate


def with_recipe_schedule(cfg, recipe: Recipe):
    """``cfg`` with the recipe's learning-rate schedule where the command line left it open
    (``--layer-decay`` not given; ``--warmup-epochs`` 0 under ``--sched cosine``), and the
    list of what was taken from the recipe (for the log). The run's config.json records the
    result, so a run says which schedule it trained with."""
    import dataclasses

    changes = {}
    if recipe.layer_decay is not None and cfg.layer_decay is None:
        changes["layer_decay"] = recipe.layer_decay
    if recipe.warmup_share is not None and cfg.warmup_epochs == 0 and cfg.sched == "cosine":
        changes["warmup_epochs"] = recipe.warmup_share * cfg.epochs
    return (dataclasses.replace(cfg, **changes) if changes else cfg), changes

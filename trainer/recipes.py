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

Sources (read at the pinned commits):
- DynamicViT (raoyongming/DynamicViT 1322e62): main.py ``--lr_scale`` 0.01 for the backbone,
  optim_factory.py ``get_parameter_groups`` (backbone groups ``fix_step`` 5 = its 5 warm-up
  epochs with lr 0, cls_token and pos_embed skipped), losses.py
  ``DistillDiffPruningLoss_dynamic`` for DeiT: CE + 2·ratio + 0.5·KL(teacher logits) +
  0.5·MSE(kept tokens, teacher tokens), teacher = the pretrained dense model.
- TNT (mx-ethan-rao/tnt d095619): main.py freezes the whole ViT and trains the alpha heads;
  the training forward adds the noise (trainer/tnt.py).
- EViT (youweiliang/evit 5ca95a7): fine-tunes the whole model at the run's rate; its keep-rate
  warm-up (engine.py ``adjust_keep_rate``) is not implemented here (dynatrain trains at the
  final keep rate from the first step).
- ToMe (facebookresearch/ToMe af95e4b): no recipe of its own (off the shelf, or trained like
  the model); prop_attn as its timm patch.
- Token Cropr (benbergner/cropr 2f8b624): the whole model with its routers' auxiliary losses
  (trainer/model.py ``training_loss``); its own schedule is not reproduced.
- Dyna-ViT: the whole model on the kept patches.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    backbone_lr_scale: float = 1.0
    backbone_frozen_in_warmup: bool = False
    untrained: tuple[str, ...] = ()
    teacher: bool = False
    source: str = ""


FROM_SCRATCH = Recipe(source="from scratch: the whole model, task loss")

RECIPES = {
    "dynavit": Recipe(source="Dyna-ViT: the whole model on the kept patches"),
    "tome": Recipe(source="ToMe af95e4b: no recipe of its own, trained like the model"),
    "evit": Recipe(source="EViT 5ca95a7: the whole model (keep-rate warm-up not implemented)"),
    "dynamicvit": Recipe(backbone_lr_scale=0.01, backbone_frozen_in_warmup=True,
                         untrained=("cls_token", "pos_embed"), teacher=True,
                         source="DynamicViT 1322e62: backbone lr x0.01, fixed in warm-up, "
                                "cls/pos frozen; CE + 2 ratio + 0.5 KL + 0.5 token MSE to the "
                                "start weights"),
    "tnt": Recipe(backbone_lr_scale=0.0,
                  source="TNT d095619: frozen backbone, alpha heads trained under noise"),
    "cropr": Recipe(source="Cropr 2f8b624: the whole model + router auxiliary losses"),
}


def recipe_for(method: str, fine_tune: bool) -> Recipe:
    """The method's recipe when the run fine-tunes, else ``FROM_SCRATCH``."""
    return RECIPES[method] if fine_tune else FROM_SCRATCH

"""The model side of a run: an unmodified timm ViT behind the sparse forward, built for a
dataset, and started from timm's or a local checkpoint's weights."""
from __future__ import annotations

from typing import Callable

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from dynavit.trainer.config import ConfigError, TrainConfig
from dynavit.trainer.recipe import model_kwargs
from dynavit.trainer.rundir import load_error
from dynavit.trainer.selection import METHODS  # noqa: F401 (re-exported for the CLI)
from dynavit.trainer.methods.counts import method_macs  # noqa: F401 (callers import it from here too)
from dynavit.trainer.methods.sparse import check_model, sparse_forward
from dynavit.trainer.methods.packing import RaggedKeep, packed_forward


class SparseViT(nn.Module):
    """`forward(images, keep_idx)`: the wrapped timm ViT through the run's token-reduction
    method: Dyna-ViT's sparse_forward on the kept patches, or a method inside the encoder
    (which sees every patch; keep_idx is None): ToMe, EViT, or the learned DynamicViT, TNT
    and Token Cropr, whose own parameters live in `heads`. In training the learned methods
    return what their loss needs (training_loss).

    DDP only synchronises gradients of forwards that go through its own `forward`, so the
    method's forward has to be a module's forward for DDP to wrap; `self.vit` stays a plain
    timm model whose state_dict is what checkpoints store (the heads are saved beside it).
    """

    def __init__(self, vit: nn.Module, method: str = "dynavit", param=None, heads: nn.Module | None = None):
        super().__init__()
        self.vit, self.method, self.param, self.heads = vit, method, param, heads

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None, validate: bool = True):
        return method_forward(self.vit, images, keep_idx, self.method, self.param, validate=validate,
                              heads=self.heads, training=self.training)


def method_forward(vit: nn.Module, images: torch.Tensor, keep_idx, method: str = "dynavit", param=None,
                   validate: bool = False, heads: nn.Module | None = None, training: bool = False):
    if method == "tome":
        from dynavit.trainer.methods.tome import tome_forward
        return tome_forward(vit, images, param)
    if method == "evit":
        from dynavit.trainer.methods.evit import evit_forward
        return evit_forward(vit, images, param)
    if method == "dynamicvit":
        from dynavit.trainer.methods.dynamicvit import dynamicvit_forward
        return dynamicvit_forward(vit, heads, images, param, training=training)
    if method == "tnt":
        from dynavit.trainer.methods.tnt import tnt_forward
        return tnt_forward(vit, heads, images, param, training=training)
    if method == "cropr":
        from dynavit.trainer.methods.cropr import cropr_forward
        return cropr_forward(vit, heads, images, param, training=training)
    if isinstance(keep_idx, RaggedKeep):  # adaptive K: each sample its own count, run packed
        return packed_forward(vit, images, keep_idx.idx, keep_idx.counts)
    if method == "svit":  # param (rho) only sets the training targets: the rate is dynamic
        from dynavit.trainer.methods.svit import svit_forward
        return svit_forward(vit, heads, images, training=training)
    return sparse_forward(vit, images, keep_idx, validate=validate)


DISTILL_WEIGHT = 0.5  # DynamicViT's distill_weight (losses.py), used for every method's KL


def teacher_outputs(teacher: nn.Module | None, images: torch.Tensor):
    """(logits, final normed patch tokens) of the frozen dense teacher, or None."""
    if teacher is None:
        return None
    with torch.no_grad():
        feats = teacher.forward_features(images)
        return teacher.forward_head(feats), feats[:, teacher.num_prefix_tokens:]


def training_loss(method: str, param, out, labels: torch.Tensor, criterion, teacher=None,
                  ratio_weight: float = 2.0) -> torch.Tensor:
    """The method's training objective on the forward's output: the task loss, plus
    DynamicViT's keep-ratio loss (weight 2, as its code) or Token Cropr's auxiliary-head
    losses, or SViT's dynamic ratio loss (weight 4, its paper). TNT's training forward adds its noise and needs nothing more. ``teacher``:
    (logits, tokens) of a dense teacher (``teacher_outputs``): DynamicViT adds its
    distillation (KL of the logits + MSE of the kept tokens, 0.5 each, losses.py), the other
    methods 0.5 x KL of the logits."""
    if method == "dynamicvit":
        from dynavit.trainer.methods.dynamicvit import dynamicvit_loss
        logits, aux = out
        t_logits, t_tokens = teacher if teacher is not None else (None, None)
        return dynamicvit_loss(logits, aux, labels, param, teacher_logits=t_logits,
                               teacher_tokens=t_tokens, criterion=criterion, ratio_weight=ratio_weight)
    if method == "svit":
        from dynavit.trainer.methods.svit import svit_loss
        logits, aux = out
        loss = svit_loss(logits, aux, labels, param, criterion=criterion)
    elif method == "cropr":
        logits, aux_logits = out
        loss = criterion(logits, labels) + sum(criterion(a, labels) for a in aux_logits)
    else:
        logits = out
        loss = criterion(out, labels)
    if teacher is not None:
        from dynavit.trainer.methods.dynamicvit import distill_loss
        loss = loss + DISTILL_WEIGHT * distill_loss(logits, teacher[0])
    return loss


def make_heads(vit: nn.Module, method: str, num_classes: int) -> nn.Module | None:
    """The learned method's own parameters for this model (None for the others)."""
    if method == "dynamicvit":
        from dynavit.trainer.methods.dynamicvit import DynamicViTHeads
        return DynamicViTHeads.for_model(vit)
    if method == "tnt":
        from dynavit.trainer.methods.tnt import TNTHeads
        return TNTHeads.for_model(vit)
    if method == "svit":
        from dynavit.trainer.methods.svit import SViTSelectors
        return SViTSelectors.for_model(vit)
    if method == "cropr":
        from dynavit.trainer.methods.cropr import CroprRouters
        return CroprRouters.for_model(vit, num_classes=num_classes)
    return None


def match_method(vit: nn.Module, method: str, k: int, heads: nn.Module | None = None) -> tuple[object, str]:
    """The parameter of `method` whose exact MACs (its extra heads included) come closest to
    Dyna-ViT's at K on this model, and its description; (None, "K=k") for Dyna-ViT."""
    if method == "dynavit":
        return None, f"K={k}"
    if method in ("tome", "evit"):
        from dynavit.trainer.methods.budget import match_budget

        m = match_budget(vit, k)
        if method == "tome":
            return int(m["tome"]["r"]), f"r={m['tome']['r']} ({m['tome']['rel']:+.1%} MACs vs K={k})"
        return float(m["evit"]["keep_rate"]), f"keep_rate={m['evit']['keep_rate']} ({m['evit']['rel']:+.1%} MACs vs K={k})"
    if method == "dynamicvit":
        from dynavit.trainer.methods.dynamicvit import match_dynamicvit_budget
        m, name = match_dynamicvit_budget(vit, k, heads), "rho"
    elif method == "svit":
        from dynavit.trainer.methods.svit import match_svit_budget
        m, name = match_svit_budget(vit, k, heads), "rho"
    elif method == "tnt":
        from dynavit.trainer.methods.tnt import match_tnt_budget
        m, name = match_tnt_budget(vit, k, heads), "keep"
    else:
        from dynavit.trainer.methods.cropr import match_cropr_budget
        m, name = match_cropr_budget(vit, k, heads), "r"
    return m[name], f"{name}={m[name]} ({m['rel']:+.1%} MACs vs K={k})"


def meta_copy(module: nn.Module | None) -> nn.Module | None:
    """A copy of `module` on the meta device (shapes only: no memory, no compute), whatever
    device the original lives on."""
    if module is None:
        return None
    import copy

    memo: dict = {}
    for t in [*module.parameters(), *module.buffers()]:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


#: names the counter the recorded MACs come from (a run's budget says which figures it holds)
MAC_COUNTER = "dynavit.trainer.methods.macs/1"


def budget_record(vit: nn.Module, method: str, k: int, heads: nn.Module | None = None) -> dict:
    """The run's matched budget, computed once on a meta copy of its model (so the same on
    CPU, CUDA and meta, with any weights): {method, k, param, described, macs, dynavit_macs,
    rel, counter, at_limit} (at_limit: the parameter is at its cheapest and still above
    Dyna-ViT's MACs, budget_limit.py). Training records it in config.json and summary.json; compare and the
    reports read it back instead of matching again."""
    meta_vit, meta_heads = meta_copy(vit), meta_copy(heads)
    param, described = match_method(meta_vit, method, k, meta_heads)
    macs = method_macs(meta_vit, method, k, param, meta_heads)
    target = macs if method == "dynavit" else method_macs(meta_vit, "dynavit", k, None)
    from dynavit.trainer.methods.budget_limit import at_limit
    return {"method": method, "k": int(k), "param": param, "described": described, "macs": int(macs),
            "dynavit_macs": int(target), "rel": (macs - target) / target, "counter": MAC_COUNTER,
            "at_limit": at_limit(meta_vit, method, k, macs, target, meta_heads)}


MAX_PARAMS = 4_000_000_000  # 16 GB of fp32 weights: larger is a typo in --model-kwargs, not a model


class ModelSizeError(ValueError):
    """A model whose weights would not fit: found on the meta device, before allocating."""


def check_model_size(name: str, num_classes: int, kwargs: dict) -> None:
    """Build the model on the meta device (no memory) and refuse one over MAX_PARAMS, so that
    `{"embed_dim": 1000000}` is one line instead of the OOM killer. timm's own errors pass."""
    with torch.device("meta"):
        meta = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMS:
        raise ModelSizeError(f"{name} with {kwargs} has {n:.3g} parameters, over the {MAX_PARAMS:.0e} this "
                             "tool builds; check --model-kwargs")


def build_model(cfg: TrainConfig, info, input_hw: tuple[int, int], log: Callable[[str], None],
                dropped: list | None = None) -> nn.Module:
    """The run's timm ViT with its start weights; ``dropped`` (a list) receives the
    classifier keys that --checkpoint could not load (a fresh classifier)."""
    kwargs = {"img_size": input_hw, **model_kwargs(cfg)}  # --drop-path merged in
    if tuple(np.broadcast_to(kwargs["img_size"], 2)) != tuple(input_hw):
        raise ConfigError(f"--model-kwargs img_size={kwargs['img_size']} differs from the input size "
                          f"{tuple(input_hw)} (set by the dataset or --image-size)", "--model-kwargs")
    kwargs.pop("num_classes", None)
    try:
        check_model_size(cfg.model, len(info.classes), kwargs)
        vit = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=len(info.classes), **kwargs)
        check_model(vit)
    except ModelSizeError as e:
        raise ConfigError(str(e), "--model-kwargs") from None
    except Exception as e:  # timm's own checks raise what they like (RuntimeError for depth -1)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        option = "--model-kwargs" if cfg.model_kwargs else "--model"
        raise ConfigError(f"cannot build {cfg.model} for this dataset: {first}", option) from None
    patch = tuple(vit.patch_embed.patch_size)
    if patch != (info.patch_size, info.patch_size):
        raise ConfigError(f"{cfg.model} has patch size {patch[0]} but the dataset was indexed with patch "
                          f"{info.patch_size}; pick a matching model or pass "
                          f"--model-kwargs '{{\"patch_size\": {info.patch_size}}}'", "--model")
    if cfg.checkpoint:
        lost = load_weights(vit, cfg.checkpoint, log)
        if dropped is not None:
            dropped.extend(lost)
    elif cfg.pretrained and dropped is not None and vit.pretrained_cfg.get("num_classes") != len(info.classes):
        dropped.append(vit.pretrained_cfg.get("classifier", "head"))  # timm re-initialised it
    return vit


def load_weights(vit: nn.Module, path: str, log: Callable[[str], None]) -> list[str]:
    """Load a timm/torch state_dict or a dynatrain checkpoint into `vit`. A classifier of a
    different shape (other class count) is dropped and left freshly initialised (its keys
    are returned); a positional table of another grid is resampled the way timm does for
    pretrained weights."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, not a torch file, non-tensor payloads
        raise ConfigError(f"{path}: cannot load weights ({load_error(e)})", "--checkpoint") from None
    for key in ("model", "state_dict", "model_ema", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{path}: not a state_dict of tensors", "--checkpoint")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod.").removeprefix("vit."): v for k, v in sd.items()}

    own = vit.state_dict()
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=list(vit.patch_embed.grid_size),
                                                 num_prefix_tokens=prefix)
        log(f"note: {path}: resampled pos_embed to the {tuple(vit.patch_embed.grid_size)} grid")
    head = vit.pretrained_cfg.get("classifier", "head") if getattr(vit, "pretrained_cfg", None) else "head"
    dropped = [k for k in sd if k.startswith(head + ".") and k in own and sd[k].shape != own[k].shape]
    if dropped:
        log(f"note: {path}: classifier has another shape ({tuple(sd[dropped[0]].shape)} vs "
            f"{tuple(own[dropped[0]].shape)}); dropped {', '.join(dropped)} and kept the fresh head")
        for k in dropped:
            del sd[k]
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad:
        raise ConfigError(f"{path}: shapes differ from {type(vit).__name__} for {', '.join(bad[:4])}", "--checkpoint")
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise ConfigError(f"{path}: does not match the model (missing {missing[:4]}, unexpected {unexpected[:4]})",
                          "--checkpoint")
    return dropped

"""Records the golden fixtures in this folder by running the AUTHORS' code, once, by hand.

Not imported or run by the test suite (it needs the authors' checkouts). To regenerate one
fixture, extract the repository at the pinned commit and point the script at it:

    git --git-dir=<mirror of facebookresearch/ToMe> archive af95e4b | tar -x -C /tmp/tome
    PYTHONPATH=tests/golden .venv/bin/python tests/golden/make_golden.py tome /tmp/tome

Methods, repositories and commits:
    tome        facebookresearch/ToMe      af95e4b   tome/patch/timm.py apply_patch, model.r
    tnt         mx-ethan-rao/tnt           d095619   models.py VisionTransformerWithTNT
    evit        youweiliang/evit           5ca95a7   evit.py EViT (fused and not)
    cropr       benbergner/cropr           2f8b624   cls/vision_transformer.py (with and without LLF)
    dynamicvit  raoyongming/DynamicViT     1322e62   models/dyvit.py, losses.py (inference,
                                                     training forward and its loss)
    svit        uzh-rpg/svit               d2472c1   classification/selective_vit.py (inference,
                                                     training forward, its ratio loss)

The model is timm's VisionTransformer (the timm of this venv; the authors pinned older
ones) with the weights of ``common.seeded_``; where an author's code builds its own modules,
the same parameters are drawn under timm's names and copied in. Only what the comments
below say is adapted (stubs for imports that newer torch no longer has).
"""
from __future__ import annotations

import sys
import types

import torch
from timm.models.vision_transformer import VisionTransformer

from common import count_tokens, images, save, seeded_

SEED, IMG_SEED, BATCH, IMG, PATCH = 0, 1, 2, 32, 4
BASE = dict(img_size=IMG, patch_size=PATCH, embed_dim=96, num_heads=3, num_classes=10,
            qkv_bias=True)


def timm_vit(depth: int, **kw) -> VisionTransformer:
    return seeded_(VisionTransformer(depth=depth, **{**BASE, **kw}).eval(), SEED)


def record(name, source, command, cfg, logits, counts, **extra):
    save(name, {"source": source, "command": command, "model": cfg, "seed": SEED,
                "image_seed": IMG_SEED, "batch": BATCH, "logits": logits.tolist(),
                "counts": counts, **extra})
    print(name, counts, logits.argmax(-1).tolist())


def tome(root):
    sys.path.insert(0, root)
    import tome as tome_pkg  # noqa: F401  (the authors' package)
    from tome.patch.timm import apply_patch

    for name, kw, r in (("tome_cls", {}, 8),
                        ("tome_nocls", {"class_token": False, "global_pool": "avg"}, 8)):
        cfg = {"depth": 4, **BASE, **kw}
        m = timm_vit(4, **kw)
        apply_patch(m)          # their README: tome.patch.timm(model); model.r = r
        m.r = r
        counts, remove = count_tokens(m.blocks)
        with torch.no_grad():
            logits = m(images(IMG_SEED, BATCH, IMG))
        remove()
        record(name, "facebookresearch/ToMe af95e4b (tome.patch.timm.apply_patch, model.r)",
               f"make_golden.py tome <checkout>  # {name}: r={r}", cfg, logits, counts, r=r)


def tnt_heads_(heads: torch.nn.ModuleList) -> torch.nn.ModuleList:
    """The relevance heads after blocks 1..5, drawn from seed SEED + 1 (names "0.weight", ...)."""
    return seeded_(heads, SEED + 1)


def tnt(root):
    sys.path.insert(0, root)
    from functools import partial
    import torch.nn as nn
    from models import VisionTransformerWithTNT  # the authors' models.py

    img = 56  # 14 x 14 = 196 patches, so the README's s (25, 40) apply as they are
    cfg = {"depth": 6, **BASE, "img_size": img}
    dense = timm_vit(6, img_size=img)
    # README: single layer --pru_loc 2 --keep_rate 0.6 --sim_pru 25;
    #         multi-layer --pru_loc 2,3,4 --keep_rate 0.8,0.8,0.8 --sim_pru 40
    for name, locs, rate, s in (("tnt_single", [2], 0.6, 25), ("tnt_multi", [2, 3, 4], 0.8, 40)):
        m = VisionTransformerWithTNT(**{**cfg, "norm_layer": partial(nn.LayerNorm, eps=1e-6)})
        missing, unexpected = m.load_state_dict(dense.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("alpha_") for k in missing), missing
        tnt_heads_(m.alpha_heads[:5])
        # main.py --eval: info_pru per block, pru_stat, single_l
        info_pru = [1.0] * cfg["depth"]
        for loc in locs:
            info_pru[loc] = rate
        m.pru_stat = {"sim_pru": s, "info_pru": info_pru,
                      "after_sim_pru": m.patch_embed.num_patches - s}
        m.single_l = len(locs) == 1
        m.eval()
        x = images(IMG_SEED, BATCH, img)
        counts, remove = count_tokens(m.blocks)
        torch.manual_seed(SEED + 2)   # their random split (and importance) use the global RNG
        with torch.no_grad():
            logits = m(x)
        remove()
        m.train()                     # training forward: noise after blocks 1..5
        torch.manual_seed(SEED + 3)
        with torch.no_grad():
            train_logits = m(x)
        record(name, "mx-ethan-rao/tnt d095619 (models.py VisionTransformerWithTNT, main.py --eval pru_stat)",
               f"make_golden.py tnt <checkout>  # {name}: --pru_loc {','.join(map(str, locs))} "
               f"--keep_rate {rate} --sim_pru {s}", cfg, logits, counts,
               layers=[l + 1 for l in locs], keep=rate, s=s, heads_seed=SEED + 1,
               split_seed=SEED + 2, noise_seed=SEED + 3, train_logits=train_logits.tolist())


def dynamicvit(root):
    sys.path.insert(0, root)
    import math
    # Their utils.py imports torch._six (gone from torch 2) and tensorboardX (not needed for a
    # forward): stub both so that models/dyvit.py can import its batch_index_select.
    sys.modules.setdefault("torch._six", types.SimpleNamespace(inf=math.inf))
    sys.modules.setdefault("tensorboardX", types.SimpleNamespace(SummaryWriter=None))
    import torch.nn as nn
    from losses import DistillDiffPruningLoss_dynamic
    from models.dyvit import VisionTransformerDiffPruning, VisionTransformerTeacher

    img, depth, base_rate = 56, 4, 0.7  # their forward hard-codes init_n = 14 * 14 patches
    cfg = {"depth": depth, **BASE, "img_size": img}
    dense = timm_vit(depth, img_size=img)
    # main.py deit-s: KEEP_RATE = [r, r**2, r**3] (README --base_rate 0.7); pruning_loc scaled
    # to 4 blocks: before 0-based blocks 1, 2, 3 (= after 1-based blocks 1, 2, 3)
    keep = [base_rate, base_rate ** 2, base_rate ** 3]
    arch = dict(img_size=img, patch_size=PATCH, embed_dim=96, depth=depth, num_heads=3,
                num_classes=10, qkv_bias=True, mlp_ratio=4)
    m = VisionTransformerDiffPruning(**arch, pruning_loc=[1, 2, 3], token_ratio=keep, distill=True)
    missing, unexpected = m.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("score_predictor") for k in missing), missing
    seeded_(m.score_predictor, SEED + 1)
    teacher = VisionTransformerTeacher(**arch)
    teacher.load_state_dict(dense.state_dict())
    teacher.eval()
    x = images(IMG_SEED, BATCH, img)
    m.eval()
    counts, remove = count_tokens(m.blocks)
    with torch.no_grad():
        logits = m(x)
    remove()
    # the training path and main.py's loss for deit (clf 1, ratio 2, distill 0.5, mse_token)
    m.train()
    crit = DistillDiffPruningLoss_dynamic(teacher, nn.CrossEntropyLoss(), clf_weight=1.0,
                                          keep_ratio=keep, mse_token=True, ratio_weight=2.0,
                                          distill_weight=0.5, print_mode=False)
    labels = torch.tensor([3, 7])
    torch.manual_seed(SEED + 2)  # their Gumbel noise comes from the global RNG
    with torch.no_grad():
        out = m(x)
        loss, _ = crit(x, out, labels)
    record("dynamicvit", "raoyongming/DynamicViT 1322e62 (models/dyvit.py VisionTransformerDiffPruning, "
           "losses.py DistillDiffPruningLoss_dynamic as main.py builds it for deit)",
           "make_golden.py dynamicvit <checkout>  # base_rate 0.7, pruning_loc [1, 2, 3]", cfg, logits,
           counts, layers=[1, 2, 3], rho=base_rate, heads_seed=SEED + 1, gumbel_seed=SEED + 2,
           labels=labels.tolist(), train_logits=out[0].tolist(), train_loss=loss.item(),
           train_kept=[d.sum(1).tolist() for d in out[3]])


def evit(root):
    sys.path.insert(0, root)
    # helpers.py imports torchprofile for its speed test only: stub it.
    sys.modules.setdefault("torchprofile", types.SimpleNamespace(profile_macs=None))
    from evit import EViT  # the authors' evit.py

    depth, base_keep_rate, drop_loc = 6, 0.7, (1, 2, 4)  # README --base_keep_rate 0.7; (3, 6, 9) of 12 scaled
    cfg = {"depth": depth, **BASE}
    dense = timm_vit(depth)
    for name, fuse in (("evit_fuse", True), ("evit_nofuse", False)):
        keep = [1] * depth
        for loc in drop_loc:  # as deit_small_patch16_shrink_base builds it
            keep[loc] = base_keep_rate
        m = EViT(img_size=IMG, patch_size=PATCH, embed_dim=96, depth=depth, num_heads=3, num_classes=10,
                 qkv_bias=True, keep_rate=keep, fuse_token=fuse)
        m.load_state_dict(dense.state_dict())
        m.eval()
        counts, remove = count_tokens(m.blocks)
        with torch.no_grad():
            logits = m(images(IMG_SEED, BATCH, IMG))
        remove()
        record(name, "youweiliang/evit 5ca95a7 (evit.py EViT as deit_small_patch16_shrink_base builds it)",
               f"make_golden.py evit <checkout>  # {name}: --base_keep_rate 0.7 drop_loc {drop_loc}"
               f"{' --fuse_token' if fuse else ''}", cfg, logits, counts, keep_rate=base_keep_rate,
               layers=[l + 1 for l in drop_loc], fuse=fuse)


# our CroprRouter parameter names -> the authors' Cropr module's (cls/cropr.py)
CROPR_NAMES = {"queries": "cross_attn.queries", "mlp_norm.weight": "cross_attn.mlp_norm.weight",
               "mlp_norm.bias": "cross_attn.mlp_norm.bias", "mlp.fc1.weight": "cross_attn.mlp.fc1.weight",
               "mlp.fc1.bias": "cross_attn.mlp.fc1.bias", "mlp.fc2.weight": "cross_attn.mlp.fc2.weight",
               "mlp.fc2.bias": "cross_attn.mlp.fc2.bias", "head_norm.weight": "head.norm.weight",
               "head_norm.bias": "head.norm.bias", "head.weight": "head.head.weight",
               "head.bias": "head.head.bias"}


def cropr_names(n_routers: int) -> dict:
    return {f"{i}.{ours}": f"{i}.{theirs}" for i in range(n_routers) for ours, theirs in CROPR_NAMES.items()}


def cropr(root):
    sys.path.insert(0, root + "/cls")
    from vision_transformer import VisionTransformer as CroprViT  # the authors' cls/vision_transformer.py

    depth, r = 4, 8
    cfg = {"depth": depth, **BASE}
    dense = timm_vit(depth)
    for name, llf in (("cropr_llf", True), ("cropr", False)):
        # main.py's cropr_cfg with its argparse defaults (README: --cropr_pruning_rate 8
        # --cropr_llf true); logs/cls_cropr_llf.txt shows pre_attn_norm False
        cropr_cfg = {"use_cropr": True, "pruning_rate": r, "llf": llf, "num_queries": 1, "num_heads": 1,
                     "pre_attn_norm": False, "q_proj": False, "k_proj": False, "v_proj": False,
                     "mlp": True, "mlp_ratio": 4, "training": True}
        m = CroprViT(cropr_cfg, num_classes=10, img_size=IMG, patch_size=PATCH, global_pool="token",
                     embed_dim=96, num_heads=3, depth=depth, mlp_ratio=4.0, drop_path_rate=0.0,
                     class_token=True)
        missing, unexpected = m.load_state_dict(dense.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("cropr.") for k in missing), missing
        n = len(m.cropr)
        seeded_(m.cropr, SEED + 1, cropr_names(n))
        m.eval()
        x = images(IMG_SEED, BATCH, IMG)
        counts, remove = count_tokens(m.blocks)
        with torch.no_grad():
            logits = m(x)
        remove()
        m.train()  # training forward: every router's aux head on the detached tokens
        with torch.no_grad():
            out = m(x)
        record(name, "benbergner/cropr 2f8b624 (cls/vision_transformer.py + cls/cropr.py, main.py's cropr_cfg)",
               f"make_golden.py cropr <checkout>  # {name}: --cropr_pruning_rate {r} --cropr_llf {str(llf).lower()}",
               cfg, logits, counts, r=r, llf=llf, routers_seed=SEED + 1, train_logits=out[0].tolist(),
               train_aux=[a.tolist() for a in out[1:]])


SVIT_NAMES = {"norm.weight": "norm.weight", "norm.bias": "norm.bias", "mlp.fc1.weight": "mlp.fc1.weight",
              "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias"}


def svit_timm_to_theirs(dense, theirs) -> None:
    """Copy a timm ViT's weights into their SelectiveVisionTransformer (nn.TransformerEncoderLayer
    blocks: in_proj = timm's qkv (q, k, v rows in the same order), out_proj = proj, linear1/2 =
    the MLP)."""
    sd = {k: v for k, v in dense.state_dict().items() if not k.startswith("blocks.")}
    for i, blk in enumerate(dense.blocks):
        p = f"blocks.{i}.TransformerEncoderLayer."
        sd.update({p + "self_attn.in_proj_weight": blk.attn.qkv.weight, p + "self_attn.in_proj_bias": blk.attn.qkv.bias,
                   p + "self_attn.out_proj.weight": blk.attn.proj.weight, p + "self_attn.out_proj.bias": blk.attn.proj.bias,
                   p + "linear1.weight": blk.mlp.fc1.weight, p + "linear1.bias": blk.mlp.fc1.bias,
                   p + "linear2.weight": blk.mlp.fc2.weight, p + "linear2.bias": blk.mlp.fc2.bias,
                   p + "norm1.weight": blk.norm1.weight, p + "norm1.bias": blk.norm1.bias,
                   p + "norm2.weight": blk.norm2.weight, p + "norm2.bias": blk.norm2.bias})
    missing, unexpected = theirs.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("selective_modules") for k in missing), (missing, unexpected)


def svit(root):
    sys.path.insert(0, root + "/classification")
    # selective_vit.py imports timm's old _init_vit_weights (only used by init code it never
    # calls here): stub it on the current timm.
    import timm.models.vision_transformer as tv
    tv._init_vit_weights = None
    from selective_vit import SelectiveVisionTransformer

    img, depth, rho = 56, 4, 0.7  # their forward hard-codes 196 patches (select_mask, version 1)
    cfg = {"depth": depth, **BASE, "img_size": img}
    dense = timm_vit(depth, img_size=img)
    # svit_s scaled to 4 blocks: a selector before blocks 2, 3, 4, targets rho, rho^2, rho^3;
    # version 1 at every selector (CLS always kept: svit_s's last_version=0 may drop it)
    layers, keep = [2, 3, 4], [rho, rho ** 2, rho ** 3]
    m = SelectiveVisionTransformer(img_size=img, patch_size=PATCH, num_classes=10, embed_dim=96, depth=depth,
                                   num_heads=3, select_loc=layers, select_model_id=[0, 1, 2], ratio_loss=True,
                                   keep_ratio=keep, version=1, statistics=False)
    svit_timm_to_theirs(dense, m)
    for blk in m.blocks:  # adapted: timm's blocks use LayerNorm eps 1e-6, theirs nn's default 1e-5
        blk.TransformerEncoderLayer.norm1.eps = blk.TransformerEncoderLayer.norm2.eps = 1e-6
    heads_names = {f"{j}.{k}": f"{j}.{v}" for j in range(3) for k, v in SVIT_NAMES.items()}
    seeded_(m.selective_modules, SEED + 1, names=heads_names)
    x = images(IMG_SEED, BATCH, img)
    kept = []
    hooks = [s.register_forward_hook(lambda mod, a, out: kept.append(out[0].sum(1).tolist()))
             for s in m.selective_modules]
    m.eval()
    m.set_all_inference_to(True)  # their argmin decisions
    with torch.no_grad():
        logits, _ = m(x)
    m.train()
    m.set_all_inference_to(False)
    torch.manual_seed(SEED + 2)  # their Gumbel noise comes from the global RNG
    with torch.no_grad():
        train_logits, ratio = m(x)
    for h in hooks:
        h.remove()
    record("svit", "uzh-rpg/svit d2472c1 (classification/selective_vit.py SelectiveVisionTransformer, "
           "version=1, ratio_per_sample=False)", "make_golden.py svit <checkout>  # rho 0.7, select_loc [2, 3, 4]",
           cfg, logits, [], layers=layers, rho=rho, heads_seed=SEED + 1, gumbel_seed=SEED + 2,
           kept=kept[:3], train_kept=kept[3:], train_logits=train_logits.tolist(), ratio_loss=float(ratio))


if __name__ == "__main__":
    {"tome": tome, "tnt": tnt, "dynamicvit": dynamicvit, "evit": evit, "cropr": cropr,
     "svit": svit}[sys.argv[1]](sys.argv[2])

"""Records the golden fixtures in this folder by running the AUTHORS' code, once, by hand.

Not imported or run by the test suite (it needs the authors' checkouts). To regenerate one
fixture, extract the repository at the pinned commit and point the script at it:

    git --git-dir=<mirror of facebookresearch/ToMe> archive af95e4b | tar -x -C /tmp/tome
    PYTHONPATH=tests/golden .venv/bin/python tests/golden/make_golden.py tome /tmp/tome

Methods, repositories and commits:
    tome        facebookresearch/ToMe      af95e4b   tome/patch/timm.py apply_patch, model.r
    tnt         mx-ethan-rao/tnt           d095619   models.py VisionTransformerWithTNT
    dynamicvit  raoyongming/DynamicViT     1322e62   models/dyvit.py, losses.py

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


if __name__ == "__main__":
    {"tome": tome}[sys.argv[1]](sys.argv[2])

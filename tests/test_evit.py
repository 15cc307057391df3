"""EViT over an unmodified timm ViT (dynavit.trainer.methods.evit)."""

import math

import pytest
import torch
import timm
from timm.models.vision_transformer import VisionTransformer

from dynavit.trainer.methods.evit import (evit_forward, evit_forward_features, evit_keep_count,
                                  evit_select, evit_token_counts, resolve_layers)

VARIANTS = {
    "plain": {},
    "layerscale_qkvbias": dict(init_values=0.1, qkv_bias=True),
    "qk_norm": dict(qk_norm=True),
    "reg_tokens": dict(reg_tokens=4),
    "no_embed_class": dict(no_embed_class=True),
}


def tiny(depth=4, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                             depth=depth, num_classes=10, **kw).eval()


def images(b=2):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_keep_rate_one_is_model_bitwise(name):
    m, x = tiny(**VARIANTS[name]), images()
    with torch.no_grad():
        assert torch.equal(evit_forward(m, x, 1.0), m(x))
        assert torch.equal(evit_forward(m, x, 1, layers=(1, 2, 3)), m(x))


def test_select_keeps_exactly_the_top_tokens_of_a_handmade_map():
    T, H = 1 + 8, 2
    # CLS row per head over [cls, p0..p7]; the head mean ranks p5 > p1 > p6 > p0 > ...
    row0 = torch.tensor([0.10, 0.10, 0.20, 0.00, 0.05, 0.05, 0.30, 0.10, 0.10])
    row1 = torch.tensor([0.10, 0.12, 0.20, 0.04, 0.00, 0.04, 0.30, 0.15, 0.05])
    attn = torch.full((1, H, T, T), 1.0 / T)  # other rows must not matter
    attn[0, 0, 0], attn[0, 1, 0] = row0, row1
    keep_idx, drop_idx, cls_attn = evit_select(attn, keep=3, num_prefix=1)
    assert keep_idx.tolist() == [[1, 5, 6]]
    assert drop_idx.tolist() == [[0, 2, 3, 4, 7]]
    assert torch.allclose(cls_attn, ((row0 + row1) / 2)[1:][None])
    # the same from the CLS row alone or the head mean; reg tokens are skipped as prefix
    assert evit_select(attn[:, :, 0], 3)[0].tolist() == [[1, 5, 6]]
    assert evit_select(attn[:, :, 0].mean(1), 3)[0].tolist() == [[1, 5, 6]]
    assert evit_select(attn, 2, num_prefix=3)[0].tolist() == [[3, 4]]  # p5, p6 → 3, 4


def test_select_ties_prefer_lower_index():
    a = torch.tensor([[0.0, 0.2, 0.2, 0.2, 0.1]])
    assert evit_select(a, 2)[0].tolist() == [[0, 1]]


def _ref_evit_block(blk, x, keep):
    """Literal EViT block: explicit attention matrix, top-k by head-mean CLS row, fused token."""
    attn = blk.attn
    h = blk.norm1(x)
    B, T, C = h.shape
    q, k, v = attn.qkv(h).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    p = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
    x = x + blk.ls1(attn.proj((p @ v).transpose(1, 2).reshape(B, T, C)))
    cls = p[:, :, 0, 1:].mean(1)
    idx = cls.topk(keep, dim=1).indices.sort(1)[0]
    mask = torch.ones_like(cls, dtype=torch.bool).scatter(1, idx, False)
    rest = x[:, 1:]
    fused = torch.stack([(rest[b][mask[b]] * cls[b][mask[b]][:, None]).sum(0)
                         for b in range(B)])[:, None]
    kept = rest.gather(1, idx[..., None].expand(-1, -1, C))
    x = torch.cat([x[:, :1], kept, fused], 1)
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def test_matches_literal_evit():
    m, x = tiny(init_values=0.1, qkv_bias=True), images()
    with torch.no_grad():
        ours = evit_forward_features(m, x, 0.6, layers=(2, 3))
        t = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        n = 16
        for i, blk in enumerate(m.blocks):
            if i in (1, 2):
                keep = math.ceil(0.6 * n)
                t = _ref_evit_block(blk, t, keep)
                n = keep + 1
            else:
                t = blk(t)
        ref = m.norm(t)
    assert ours.shape == ref.shape == (2, 1 + 8, 192)  # 16 → 10+1 → 7+1
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_token_counts_and_shapes():
    # ViT-B/16 at 0.7 (the fused token counts at the next keep layer, as in EViT)
    assert evit_token_counts(196, 0.7, 12)[-1] == 71
    assert evit_token_counts(196, 0.7, 12)[3:4] + evit_token_counts(196, 0.7, 12)[6:7] \
        == [139, 99]
    assert evit_token_counts(196, 0.7, 12, fuse=False)[-1] == 68
    assert evit_keep_count(0.7, 140) == 98 and evit_keep_count(0.001, 10) == 1
    m, x = tiny(reg_tokens=4), images()
    with torch.no_grad():
        for fuse in (True, False):
            f = evit_forward_features(m, x, 0.5, layers=(1, 3), fuse=fuse)
            assert f.shape[1] == 5 + evit_token_counts(16, 0.5, 4, (1, 3), fuse)[-1]


def test_reg_tokens_are_kept_in_front():
    m, x = tiny(depth=2, reg_tokens=4), images()
    with torch.no_grad():
        # pruning in the last block changes nothing the MLP does to prefix tokens
        full = evit_forward_features(m, x, 1.0)
        pruned = evit_forward_features(m, x, 0.25, layers=(2,))
    assert pruned.shape[1] == 5 + 4 + 1
    assert torch.allclose(pruned[:, :5], full[:, :5], atol=1e-6)


def test_layers():
    assert resolve_layers(None, 12) == (3, 6, 9)
    assert resolve_layers(None, 6) == (3,)          # default clipped to the blocks there are
    assert resolve_layers((3, 1), 4) == (0, 2)
    with pytest.raises(ValueError, match="do not exist"):
        resolve_layers((4, 7), 4 + 2)
    with pytest.raises(ValueError, match="repeat"):
        resolve_layers((2, 2), 4)


def test_bad_arguments_and_refusals():
    m, x = tiny(depth=2), images()
    for kr in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep_rate"):
            evit_forward(m, x, kr)
    with pytest.raises(ValueError, match="class token"):
        evit_forward(tiny(depth=1, class_token=False, global_pool="avg"), x, 0.5)
    attn_pool = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                  num_heads=2, num_classes=3, global_pool="map").eval()
    with pytest.raises(ValueError, match="EViT: attention-pool"):
        evit_forward(attn_pool, torch.zeros(1, 3, 32, 32), 0.5)


def test_training_backward():
    m, x = tiny(depth=2, drop_path_rate=0.1), images()
    m.train()
    evit_forward(m, x, 0.5, layers=(1,)).sum().backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None


# ---- golden: the authors' own forward (tests/golden/make_golden.py evit) ---------------------

@pytest.mark.parametrize("name", ["evit_fuse", "evit_nofuse"])
def test_matches_authors_evit_golden(name):
    """Logits and per-block token counts of youweiliang/evit 5ca95a7 (evit.py ``EViT`` as
    deit_small_patch16_shrink_base builds it, base keep rate 0.7, with and without
    --fuse_token) on a seeded 6-block ViT, keep blocks 2, 3, 5 (their 0-based drop_loc 1, 2, 4),
    recorded by tests/golden/make_golden.py."""
    from golden.common import count_tokens, images as g_images, load, seeded_

    g = load(name)
    cfg = dict(g["model"])
    m = seeded_(VisionTransformer(**cfg).eval(), g["seed"])
    x = g_images(g["image_seed"], g["batch"], cfg["img_size"])
    counts, remove = count_tokens(m.blocks)
    with torch.no_grad():
        ours = evit_forward(m, x, g["keep_rate"], layers=g["layers"], fuse=g["fuse"])
    remove()
    assert counts == g["counts"]
    assert torch.allclose(ours, torch.tensor(g["logits"]), atol=1e-4, rtol=0)

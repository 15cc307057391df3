"""ToMe over an unmodified timm ViT (dynavit.trainer.methods.tome)."""

import pytest
import torch
import torch.nn.functional as F
import timm
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from dynavit.trainer.methods.tome import (bipartite_soft_matching, merge_tokens, merge_wavg,
                                  resolve_r, tome_forward, tome_forward_features,
                                  tome_schedule, tome_token_counts)

VARIANTS = {
    "plain": {},
    "layerscale_qkvbias": dict(init_values=0.1, qkv_bias=True),
    "qk_norm": dict(qk_norm=True),
    "reg_tokens": dict(reg_tokens=4),
    "no_embed_class": dict(no_embed_class=True),
    "no_cls_avg": dict(class_token=False, global_pool="avg"),
}


def tiny(depth=3, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                             depth=depth, num_classes=10, **kw).eval()


def images(b=2):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_r0_is_model_bitwise(name):
    m, x = tiny(**VARIANTS[name]), images()
    with torch.no_grad():
        assert torch.equal(tome_forward(m, x, 0), m(x))
        assert torch.equal(tome_forward(m, x, [0, 0]), m(x))


def test_r0_is_model_bitwise_manual_attention():
    m, x = tiny(init_values=0.1, qkv_bias=True), images()
    for blk in m.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad():
        assert torch.equal(tome_forward(m, x, 0), m(x))


@pytest.mark.parametrize("name", ["plain", "layerscale_qkvbias", "qk_norm", "reg_tokens"])
def test_fused_and_manual_attention_agree_when_merging(name):
    m, x = tiny(**VARIANTS[name]), images()
    with torch.no_grad():
        fused = tome_forward(m, x, 3)
        for blk in m.blocks:
            blk.attn.fused_attn = False
        manual = tome_forward(m, x, 3)
    assert torch.allclose(fused, manual, atol=1e-5, rtol=1e-5)


# ---- an independent, literal ToMe (CLS model): alternate all tokens, protect CLS by -inf --

def _ref_tome(m, x, rs):
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    size = None
    for blk, r in zip(m.blocks, rs):
        attn = blk.attn
        h = blk.norm1(x)
        B, T, C = h.shape
        q, k, v = attn.qkv(h).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + blk.ls1(attn.proj(a))
        r = min(r, (T - 1) // 2)
        if r > 0:
            met = k.mean(1)
            met = met / met.norm(dim=-1, keepdim=True)
            sc = met[:, ::2] @ met[:, 1::2].transpose(-1, -2)
            sc[:, 0, :] = -float("inf")
            node_max, node_idx = sc.max(-1)
            edge = node_max.argsort(-1, descending=True)[..., None]
            unm, src = edge[:, r:].sort(1)[0], edge[:, :r]
            dst = node_idx[..., None].gather(1, src)
            if size is None:
                size = torch.ones_like(x[..., :1])

            def mrg(t):
                c = t.shape[-1]
                ta, tb = t[:, ::2], t[:, 1::2]
                tb = tb.scatter_reduce(1, dst.expand(-1, -1, c),
                                       ta.gather(1, src.expand(-1, -1, c)), reduce="sum")
                return torch.cat([ta.gather(1, unm.expand(-1, -1, c)), tb], 1)

            x, size = mrg(x * size), mrg(size)
            x = x / size
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return m.forward_head(m.norm(x))


def test_matches_literal_tome_for_cls_models():
    m, x = tiny(depth=4, init_values=0.1, qkv_bias=True), images()
    rs = [4, 3, 2, 20]  # last one is clipped to half the tokens
    with torch.no_grad():
        ours = tome_forward(m, x, rs)
        ref = _ref_tome(m, x, rs)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


# ---- the matching / merge functions directly ---------------------------------------------

def test_two_identical_tokens_merge_into_one_of_size_two():
    e = torch.eye(6)
    v = e[2] * 3.0
    # positions: 0 = CLS, B = {1, 3, 5}, A = {2, 4}; A token 2 equals B token 3
    x = torch.stack([e[5], e[0], v, v, e[1], e[3]])[None]
    match = bipartite_soft_matching(x, r=1, num_prefix=1)
    out, size = merge_wavg(match, x)
    assert out.shape == (1, 5, 6)
    assert torch.equal(out[0, 0], x[0, 0])                 # CLS untouched, in front
    hits = [i for i in range(5) if torch.allclose(out[0, i], v)]
    assert len(hits) == 1                                  # v appears once now ...
    assert size[0, hits[0], 0] == 2                        # ... standing for two tokens
    assert size.sum() == 6 and sorted(size.flatten().tolist()) == [1, 1, 1, 1, 2]


def test_merge_is_size_weighted_average():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.1, 0.0])
    x = torch.stack([torch.tensor([0.0, 0.0, 1.0]), b, a])[None]  # cls, B=b, A=a
    match = bipartite_soft_matching(x, r=1, num_prefix=1)
    size = torch.tensor([[[1.0], [1.0], [3.0]]])
    out, new_size = merge_wavg(match, x, size)
    assert out.shape == (1, 2, 3) and new_size[0, 1, 0] == 4
    assert torch.allclose(out[0, 1], (3 * a + b) / 4)


def test_prefix_tokens_never_merge_and_r_is_clipped():
    x = torch.randn(2, 9, 8)
    for p in (0, 1, 4, 5):
        match = bipartite_soft_matching(x, r=100, num_prefix=p)
        assert match.r == (9 - p) // 2
        out = merge_tokens(x, match)
        assert out.shape[1] == 9 - match.r
        assert torch.equal(out[:, :p], x[:, :p])


def test_source_tracing_and_reg_tokens():
    m, x = tiny(reg_tokens=4), images()
    with torch.no_grad():
        feats, size, source = tome_forward_features(m, x, 100, trace_source=True,
                                                    return_state=True)
    counts = tome_token_counts(5 + 16, 100, 3, num_prefix=5)
    assert feats.shape[1] == counts[-1] == source.shape[1] == size.shape[1]
    assert torch.equal(source[:, :5, :5], torch.eye(5).expand(2, 5, 5))  # prefix stays itself
    assert torch.equal(source[:, :5, 5:], torch.zeros(2, 5, 16))
    assert torch.equal(source.sum(1), torch.ones(2, 21))                # every input once
    assert torch.equal(source.sum(2, keepdim=True), size)


def test_schedules():
    assert tome_schedule(8, 4) == [8, 8, 8, 8]
    assert tome_schedule(8, 4, inflect=-1) == [16, 10, 5, 0]
    assert tome_schedule(8, 4, inflect=1) == [0, 5, 10, 16]
    assert resolve_r(3, 4) == [3, 3, 3, 3]
    assert resolve_r([5, 1], 4) == [5, 1, 0, 0]
    assert tome_token_counts(197, 8, 12)[-1] == 197 - 12 * 8
    assert tome_token_counts(197, 16, 12)[-3:] == [37, 21, 11]  # last block: r clipped to 10
    with pytest.raises(ValueError, match="blocks"):
        resolve_r([1] * 5, 4)
    with pytest.raises(ValueError):
        resolve_r(-1, 4)
    m, x = tiny(), images()
    with torch.no_grad():
        assert tome_forward(m, x, tome_schedule(2, 3, -1)).shape == (2, 10)


def test_training_backward_and_grad_checkpointing_agree():
    m, x = tiny(drop_path_rate=0.0), images()
    m.train()

    def grads():
        m.zero_grad()
        F.cross_entropy(tome_forward(m, x, 2), torch.tensor([1, 2])).backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    g0 = grads()
    m.set_grad_checkpointing(True)
    g1 = grads()
    assert len(g0) == len(g1) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


def test_model_is_untouched():
    m, x = tiny(), images()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    types = [type(mod) for mod in m.modules()]
    with torch.no_grad():
        tome_forward(m, x, 3, trace_source=True)
    assert [type(mod) for mod in m.modules()] == types
    assert sd.keys() == m.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("kw,err,match", [
    (dict(global_pool="map"), ValueError, "attention-pool"),
    (dict(pos_embed="none"), ValueError, "pos_embed"),
    (dict(block_fn=ResPostBlock), ValueError, "ResPostBlock"),
])
def test_refuses_what_it_cannot_run(kw, err, match):
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                          num_classes=3, **kw).eval()
    with pytest.raises(err, match=match):
        tome_forward(m, torch.zeros(1, 3, 32, 32), 1)


def test_refuses_distilled_subclass():
    with torch.device("meta"):
        m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1)
    with pytest.raises(TypeError, match="ToMe"):
        tome_forward(m, torch.zeros(1, 3, 224, 224, device="meta"), 1)


def test_gated_and_scale_norm_attention():
    from timm.layers import LayerNorm
    import inspect

    from timm.models.vision_transformer import Attention

    if "gated" not in inspect.signature(Attention.__init__).parameters:
        pytest.skip("this timm's Attention has no output gate (timm >= 1.0.28)")

    m, x = tiny(depth=2), images()
    torch.manual_seed(3)
    for blk in m.blocks:  # timm's Attention with its optional gate and output norm
        blk.attn = Attention(192, num_heads=3, qkv_bias=True, gated=True, scale_norm=True,
                             norm_layer=LayerNorm).eval()
    with torch.no_grad():
        assert torch.equal(tome_forward(m, x, 0), m(x))
        fused = tome_forward(m, x, 3)
        for blk in m.blocks:
            blk.attn.fused_attn = False
        assert torch.allclose(fused, tome_forward(m, x, 3), atol=1e-5, rtol=1e-5)


# ---- golden: the authors' own forward (tests/golden/make_golden.py tome) ---------------------

@pytest.mark.parametrize("name", ["tome_cls", "tome_nocls"])
def test_matches_authors_tome_golden(name):
    """Logits and per-block token counts of facebookresearch/ToMe af95e4b (its timm patch,
    ``model.r = 8``) on a seeded 4-block ViT, recorded by tests/golden/make_golden.py. The
    no-CLS case pins ToMe's unsorted unmerged tokens (merge.py lines 67-68)."""
    from golden.common import count_tokens, images as g_images, load, seeded_

    g = load(name)
    cfg = dict(g["model"])
    m = seeded_(VisionTransformer(**cfg).eval(), g["seed"])
    x = g_images(g["image_seed"], g["batch"], cfg["img_size"])
    counts, remove = count_tokens(m.blocks)
    with torch.no_grad():
        ours = tome_forward(m, x, g["r"])
    remove()
    assert counts == g["counts"]
    assert torch.allclose(ours, torch.tensor(g["logits"]), atol=1e-4, rtol=0)

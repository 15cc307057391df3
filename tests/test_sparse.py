"""Sparse forward of an unmodified timm ViT (dynavit.trainer.methods.sparse)."""

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from dynavit.trainer.methods.sparse import (
    dense_equivalent_mask,
    num_patches,
    sparse_forward,
    sparse_forward_features,
)

IMG, PATCH = 32, 4
N = (IMG // PATCH) ** 2

VARIANTS = {
    "cls_pos_on_cls": {},
    "no_embed_class": dict(no_embed_class=True),
    "avg": dict(global_pool="avg"),
    "avg_no_cls": dict(global_pool="avg", class_token=False),
    "reg2": dict(reg_tokens=2),  # timm allows reg tokens with pos rows for them too
    "reg2_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "fc_norm": dict(fc_norm=True),
    "avgmax": dict(global_pool="avgmax"),
    "pre_norm_layerscale": dict(pre_norm=True, init_values=0.1),
}


def tiny_vit(**kw):
    torch.manual_seed(0)
    kw = {**dict(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=2, num_heads=2,
                 num_classes=10), **kw}
    m = VisionTransformer(**kw)
    with torch.no_grad():  # cls/reg init std is 1e-6; make them matter in the checks
        for p in (m.cls_token, m.reg_token):
            if p is not None:
                p.normal_(0, 0.5)
    return m


def images(b=3, seed=1):
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def random_keep(b, k, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:k].sort().values for _ in range(b)])


def masked_dense_features(m, x, keep):
    """timm's own dense forward with dropped tokens hidden as keys; prefix + kept rows.

    The fused path gets the boolean mask as is (SDPA semantics); timm's manual path gets it as
    an additive 0/-inf mask, which every timm version adds the same way (before 1.0.28 or so
    the manual path added a boolean mask as 0/1 instead of hiding the keys)."""
    p = m.num_prefix_tokens
    mask = dense_equivalent_mask(keep, N, p)
    if not m.blocks[0].attn.fused_attn:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    f = m.forward_features(x, attn_mask=mask)
    rows = torch.cat([torch.arange(p).expand(keep.shape[0], -1), keep + p], dim=1)
    return torch.gather(f, 1, rows.unsqueeze(-1).expand(-1, -1, f.shape[-1]))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_keep_all_is_bitwise_dense(name):
    m = tiny_vit(**VARIANTS[name]).eval()
    x = images()
    keep_all = torch.arange(N).expand(x.shape[0], -1)
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(sparse_forward(m, x, keep_all), ref)
        assert torch.equal(sparse_forward(m, x, None), ref)
        assert torch.equal(sparse_forward_features(m, x, keep_all), m.forward_features(x))


def test_patch_dropout_eval_is_identity_train_drops_kept_tokens():
    m = tiny_vit(patch_drop_rate=0.5).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(sparse_forward(m, x, torch.arange(N).expand(3, -1)), m(x))
        m.train()
        f = sparse_forward_features(m, x, random_keep(3, 20))
    assert f.shape[1] == 1 + 10  # timm's PatchDropout keeps int(20 * 0.5) of the kept


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_sparse_equals_masked_dense(name, fused):
    m = tiny_vit(**VARIANTS[name]).eval()
    for blk in m.blocks:  # reference only: both timm attention paths honour the mask
        blk.attn.fused_attn = fused
    x = images()
    for k in (1, 13, 45):
        keep = random_keep(3, k, seed=k)
        with torch.no_grad():
            ref_f = masked_dense_features(m, x, keep)
            f = sparse_forward_features(m, x, keep)
            torch.testing.assert_close(f, ref_f, atol=1e-5, rtol=0)
            torch.testing.assert_close(sparse_forward(m, x, keep), m.forward_head(ref_f),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["cls_pos_on_cls", "no_embed_class", "avg_no_cls", "reg2"])
def test_gradients(name):
    x = images()
    keep = random_keep(3, 20)

    dense = tiny_vit(**VARIANTS[name])
    dense(x).sum().backward()
    reached = {n for n, p in dense.named_parameters() if p.grad is not None}

    ref = tiny_vit(**VARIANTS[name])
    ref.forward_head(masked_dense_features(ref, x, keep)).sum().backward()

    m = tiny_vit(**VARIANTS[name])
    sparse_forward(m, x, keep).sum().backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None}
    assert got == reached == {n for n, _ in m.named_parameters()}
    ref_grads = dict(ref.named_parameters())
    for n, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), n
        torch.testing.assert_close(p.grad, ref_grads[n].grad, atol=1e-5, rtol=1e-4)

    first = 0 if m.no_embed_class else m.num_prefix_tokens
    row_norm = m.pos_embed.grad[0, first:].abs().sum(-1)
    kept = torch.zeros(N, dtype=torch.bool)
    kept[keep.flatten()] = True
    assert (row_norm[~kept] == 0).all() and (~kept).any()
    assert (row_norm[kept] > 0).all()
    if first:
        assert (m.pos_embed.grad[0, :first].abs().sum(-1) > 0).all()


def test_state_dict_after_sparse_step_loads_strict_into_fresh_timm_model():
    kw = dict(img_size=IMG, patch_size=PATCH, depth=2, num_classes=10)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(sparse_forward(m, images(), random_keep(3, 30)),
                                       torch.tensor([1, 2, 3]))
    loss.backward()
    opt.step()
    assert type(m) is VisionTransformer and not m._forward_hooks and not m._forward_pre_hooks
    sd = m.state_dict()
    assert not torch.equal(sd["pos_embed"], before["pos_embed"])  # the step did train it
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    fresh.load_state_dict(sd, strict=True)
    fresh.eval(), m.eval()
    with torch.no_grad():
        assert torch.equal(fresh(images()), m(images()))


def test_integer_dtypes_wrappers_and_grad_checkpointing():
    m = tiny_vit().eval()
    x = images()
    keep = random_keep(3, 25)
    with torch.no_grad():
        ref = sparse_forward(m, x, keep)
        for dt in (torch.uint8, torch.int16, torch.int32):
            assert torch.equal(sparse_forward(m, x, keep.to(dt)), ref)
        assert torch.equal(sparse_forward(nn.DataParallel(m), x, keep), ref)
        assert torch.equal(sparse_forward(torch.compile(m), x, keep), ref)  # only unwrapped
    m.set_grad_checkpointing(True)
    m.train()
    out = sparse_forward(m, x, keep)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    out.sum().backward()
    assert m.pos_embed.grad is not None


def test_meta_device_runs_without_value_checks():
    with torch.device("meta"):
        m = tiny_vit()
        out = sparse_forward(m, torch.empty(2, 3, IMG, IMG), torch.empty(2, 7, dtype=torch.long))
    assert out.shape == (2, 10) and out.device.type == "meta"
    assert num_patches(m) == N


def test_dense_equivalent_mask():
    mask = dense_equivalent_mask(torch.tensor([[0, 3], [1, 2]]), 4, 1)
    assert mask.shape == (2, 1, 1, 5) and mask.dtype == torch.bool
    assert mask[:, 0, 0].tolist() == [[True, True, False, False, True],
                                      [True, False, True, True, False]]


class _Distilled(VisionTransformer):
    def _pos_embed(self, x):
        return super()._pos_embed(x)


REFUSED_MODELS = [
    (nn.Linear(3, 3), TypeError, "timm VisionTransformer"),
    (_Distilled(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=1, num_heads=2),
     TypeError, "overrides VisionTransformer._pos_embed"),
    (dict(pos_embed="none"), ValueError, "no absolute pos_embed"),
    (dict(dynamic_img_size=True), ValueError, "dynamic_img_size"),
    (dict(global_pool="map"), ValueError, "attention-pool head"),
]


@pytest.mark.parametrize("model,exc,msg", REFUSED_MODELS, ids=lambda v: str(v)[:20])
def test_refuses_models(model, exc, msg):
    m = tiny_vit(**model) if isinstance(model, dict) else model
    with pytest.raises(exc, match=msg):
        sparse_forward(m, images(), random_keep(3, 10))


def test_refuses_real_deit_distilled():
    m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                          img_size=IMG, patch_size=PATCH, depth=1)
    with pytest.raises(TypeError, match="VisionTransformerDistilled overrides"):
        sparse_forward(m, images(), random_keep(3, 10))


REFUSED_INPUTS = [
    (torch.tensor([[0, N]] * 3), ValueError, "values must lie in 0..63"),
    (torch.tensor([[-1, 5]] * 3), ValueError, "values must lie in 0..63"),
    (torch.tensor([[5, 2]] * 3), ValueError, "strictly increasing"),
    (torch.tensor([[2, 2]] * 3), ValueError, "strictly increasing"),
    (torch.arange(5), ValueError, "shape"),
    (torch.tensor([[0, 1]] * 2), ValueError, "shape"),
    (torch.zeros(3, 0, dtype=torch.long), ValueError, "keeps 0 tokens"),
    (torch.arange(N + 1).expand(3, -1), ValueError, "keeps 65 tokens"),
    (torch.tensor([[0.0, 1.0]] * 3), TypeError, "integer dtype"),
    (torch.tensor([[True, False]] * 3), TypeError, "integer dtype"),
    (np.array([[0, 1]] * 3), TypeError, "torch integer tensor"),
]


@pytest.mark.parametrize("keep,exc,msg", REFUSED_INPUTS, ids=lambda v: str(v)[:20])
def test_refuses_bad_keep_idx(keep, exc, msg):
    with pytest.raises(exc, match=msg):
        sparse_forward(tiny_vit(), images(), keep)


@pytest.mark.parametrize("x,msg", [
    (torch.randn(3, 3, 48, 48), r"image size \(48, 48\) does not match"),
    (torch.randn(3, 1, IMG, IMG), "1 channels"),
    (torch.randn(3, IMG, IMG), r"\[B,C,H,W\]"),
])
def test_refuses_bad_images(x, msg):
    with pytest.raises(ValueError, match=msg):
        sparse_forward(tiny_vit(), x, random_keep(3, 10))

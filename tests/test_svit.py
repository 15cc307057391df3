"""SViT over an unmodified timm ViT (dynavit.trainer.methods.svit), against timm's dense forward,
a hand-written reference of the paper's Eq. 1 / Eq. 2 (uzh-rpg/svit 0d81069,
classification/selective_vit.py) and a closed form of its MACs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynavit.trainer.methods.budget import count_dynavit_macs
from dynavit.trainer.methods.flops import build_meta_model
from dynavit.trainer.methods.svit import (SViTSelectors, count_svit_macs, default_layers,
                                          default_stages, match_svit_budget, svit_forward,
                                          svit_keep_counts, svit_loss, svit_ratio_loss)
from tiny_vits import KW, one_thread, tiny_vit  # noqa: F401,E402 (one_thread: autouse, one intra-op thread)
from tiny_vits import images as shared_images  # noqa: E402
from tiny_vits import randomize  # noqa: E402


def tiny(depth=4, **kw):
    return tiny_vit(depth, **kw)


def images(b=3):
    return shared_images(b)


# ---- references written from the paper / the authors' code ----------------------------------

def ref_selector(sel, x):
    """LayerNorm → Linear → GELU → Linear → LogSoftmax, from the raw weights."""
    h = F.layer_norm(x, (x.shape[-1],), sel.norm.weight, sel.norm.bias, sel.norm.eps)
    h = F.gelu(h @ sel.mlp.fc1.weight.T + sel.mlp.fc1.bias)
    return torch.log_softmax(h @ sel.mlp.fc2.weight.T + sel.mlp.fc2.bias, dim=-1)


def ref_attention_block(blk, x, keep):
    """timm Block with pruned keys' attention columns set to 0 (softmax over kept keys)."""
    a = blk.attn
    B, T, C = x.shape
    h = blk.norm1(x)
    qkv = (h @ a.qkv.weight.T + a.qkv.bias).reshape(B, T, 3, a.num_heads, a.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    s = (q @ k.transpose(-2, -1)) * a.head_dim ** -0.5
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    x = x + (o @ a.proj.weight.T + a.proj.bias)
    return x + blk.mlp(blk.norm2(x))


def ref_inference(m, heads, x):
    """Eq. 1 at inference: x ← M ⊙ Block(x, M) + (1 − M) ⊙ x, M = argmin(log p) per token."""
    x = m._pos_embed(m.patch_embed(x))
    plan = {layer - 1: j for j, layer in enumerate(heads.layers)}
    for i, blk in enumerate(m.blocks):
        if i not in plan:
            x = blk(x)
            continue
        logp = ref_selector(heads.selectors[plan[i]], x[:, 1:])
        sel = torch.argmin(logp, dim=-1).bool()  # the authors' inference decision
        keep = torch.cat([torch.ones_like(sel[:, :1]), sel], 1)
        mk = keep[..., None].float()
        x = mk * ref_attention_block(blk, x, keep) + (1 - mk) * x
    return m.forward_head(m.norm(x))


# ---- tests --------------------------------------------------------------------------------

def test_keep_all_equals_timm_bitwise():
    m = tiny()
    heads = SViTSelectors.for_model(m)
    with torch.no_grad():
        for s in heads.selectors:  # every token's "keep" wins
            s.mlp.fc2.bias.copy_(torch.tensor([20.0, -20.0]))
    x = images()
    with torch.no_grad():
        assert torch.equal(svit_forward(m, heads, x), m(x))
        assert torch.equal(svit_forward(m, heads, x, features=True), m.forward_features(x))


def test_selector_is_the_papers_two_layer_mlp():
    m = tiny()
    heads = randomize(SViTSelectors.for_model(m))
    t = torch.randn(2, 10, 32)
    for sel in heads.selectors:
        assert [type(l).__name__ for l in sel.mlp.children() if hasattr(l, "weight")] == \
            ["Linear", "Linear"]
        assert sel.mlp.fc1.out_features == 32 // 4 and sel.mlp.fc2.out_features == 2
        torch.testing.assert_close(sel(t), ref_selector(sel, t), rtol=1e-6, atol=1e-6)


def test_inference_matches_eq1_reference_with_preserved_and_reactivated_tokens():
    m = tiny()
    heads = randomize(SViTSelectors.for_model(m))
    x = images()
    seen = []  # tokens each selected block really processes, per call
    hooks = [b.norm1.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[1]))
             for b in m.blocks[1:]]
    with torch.no_grad():
        got = svit_forward(m, heads, x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(got, ref_inference(m, heads, x), rtol=1e-4, atol=1e-4)
    assert min(seen) < 65  # something was pruned, per image (a loop of [1, n] calls)
    # reactivation: some patch dropped by selector 1 is kept by selector 2 (for this seed)
    with torch.no_grad():
        xs = m._pos_embed(m.patch_embed(x))
        xs = m.blocks[0](xs)
        d1 = ref_selector(heads.selectors[0], xs[:, 1:]).argmax(-1) == 0
        assert (~d1).any() and d1.any()


def test_dropped_tokens_skip_the_block_unchanged():
    m = tiny()
    heads = randomize(SViTSelectors.for_model(m))
    x = images(2)
    cap = {}
    blk = m.blocks[1]
    h1 = blk.register_forward_pre_hook(lambda mod, a: cap.setdefault("calls", []).append(a[0]))
    with torch.no_grad():
        xs = m.blocks[0](m._pos_embed(m.patch_embed(x)))
        keep = heads.selectors[0](xs[:, 1:]).argmax(-1) == 0
        from dynavit.trainer.methods.svit import _sparse_block
        out = _sparse_block(blk, xs, torch.cat([torch.ones_like(keep[:, :1]), keep], 1))
    h1.remove()
    dropped = ~keep
    assert dropped.any()
    assert torch.equal(out[:, 1:][dropped], xs[:, 1:][dropped])       # preserved bit for bit
    assert not torch.equal(out[:, 1:][keep], xs[:, 1:][keep])         # processed ones moved


def test_training_mask_attention_equals_the_block_on_kept_tokens():
    from dynavit.trainer.methods.svit import _masked_block
    m = tiny()
    x = torch.randn(1, 65, 32)
    keep = torch.rand(1, 65, generator=torch.Generator().manual_seed(2)) > 0.4
    keep[:, 0] = True
    with torch.no_grad():
        full = _masked_block(m.blocks[1], x, keep)
        only = m.blocks[1](x[:, keep[0]])
    torch.testing.assert_close(full[:, keep[0]], only, rtol=1e-5, atol=1e-5)


def test_dynamic_ratio_loss_is_eq2_and_lets_images_differ():
    a = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]])      # one image keeps all, one none
    b = torch.tensor([[1.0, 0, 1, 0], [1, 1, 1, 0]])
    t = [0.5, 0.25]
    want = np.mean([(a.numpy().mean() - 0.5) ** 2, (b.numpy().mean() - 0.25) ** 2])
    assert svit_ratio_loss([a, b], t).item() == pytest.approx(want)
    assert svit_ratio_loss([a], [0.5]).item() == 0.0  # batch mean on target: no penalty
    # the straight-through masks carry gradients to the selectors through both terms
    m = tiny().train()
    heads = SViTSelectors.for_model(m)
    torch.manual_seed(3)
    logits, aux = svit_forward(m, heads, images(4), training=True)
    assert len(aux["decisions"]) == 3 and aux["stages"] == (1, 2, 3)
    loss = svit_loss(logits, aux, torch.tensor([0, 1, 2, 3]), 0.7)
    ce = F.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    targets = [0.7, 0.49, 0.343]
    assert loss.item() == pytest.approx(ce.item() + 4 * svit_ratio_loss(aux, targets).item(),
                                        rel=1e-6)
    loss.backward()
    assert all(s.mlp.fc1.weight.grad.abs().sum() > 0 for s in heads.selectors)


def test_default_layers_and_stages():
    assert default_layers(12) == tuple(range(4, 13))  # the authors' select_loc for svit_s
    assert default_stages(9) == (1, 1, 1, 2, 2, 2, 3, 3, 3)
    assert default_layers(4) == (2, 3, 4) and default_stages(3) == (1, 2, 3)
    assert default_layers(2) == (2,) and default_stages(1) == (1,)
    with pytest.raises(ValueError, match="2 blocks"):
        default_layers(1)


def closed_form(m, heads, rho):
    d, n, hid = m.embed_dim, 64, m.blocks[0].mlp.fc1.out_features
    counts = svit_keep_counts(n, heads, rho)
    sel = d * (d // 4) + (d // 4) * 2
    total = n * d * 4 * 4 * 3 + d * m.num_classes
    plan = {layer - 1: c for layer, c in zip(heads.layers, counts)}
    for i in range(len(m.blocks)):
        t = 1 + plan.get(i, n)
        total += 4 * t * d * d + 2 * t * d * hid + 2 * t * t * d
        if i in plan:
            total += n * sel  # the selector scores every patch token
    return total


def test_macs_at_fixed_rate_equal_closed_form():
    m = tiny(depth=6)
    heads = SViTSelectors.for_model(m)
    for rho in (0.9, 0.5):
        assert count_svit_macs(m, heads, rho) == closed_form(m, heads, rho)
    meta = tiny(depth=6).to("meta")
    assert count_svit_macs(meta, SViTSelectors.for_model(meta), 0.5) == closed_form(m, heads, 0.5)


def test_budget_matched_to_dynavit():
    m = build_meta_model("vit_small_patch16_224", depth=4)
    res = match_svit_budget(m, 50, step=0.01)
    target = count_dynavit_macs(m, 50)["macs"]
    assert res["dynavit"]["macs"] == target and abs(res["rel"]) < 0.05
    assert count_svit_macs(m, SViTSelectors.for_model(m), res["rho"]) == res["macs"]


def test_refusals():
    m = tiny()
    with pytest.raises(TypeError, match="SViTSelectors"):
        svit_forward(m, torch.nn.Linear(2, 2), images(1))
    with pytest.raises(ValueError, match="embed_dim"):
        svit_forward(tiny(embed_dim=48), SViTSelectors.for_model(m), images(1))
    with pytest.raises(ValueError, match="exceed"):
        svit_forward(tiny(depth=2), SViTSelectors.for_model(m), images(1))
    with pytest.raises(ValueError, match="rho"):
        svit_loss(torch.zeros(1, 5), {"decisions": [torch.ones(1, 4)], "stages": (1,)},
                  torch.zeros(1, dtype=torch.long), 1.5)


# ---- golden: the authors' own forward and loss (tests/golden/make_golden.py svit) -------------

def test_matches_authors_svit_golden():
    """uzh-rpg/svit d2472c1 (classification/selective_vit.py) on a seeded 4-block ViT with 196
    patches (their forward hard-codes 196), selectors before blocks 2, 3, 4, rho 0.7: inference
    logits and the tokens each selected block processed (their argmin decisions, kept tokens
    preserved), the training path under the same Gumbel draws (global RNG seeded as theirs was),
    its kept counts and their ratio loss (ratio_per_sample=False)."""
    from timm.models.vision_transformer import VisionTransformer

    from golden.common import images as g_images, load, seeded_

    g = load("svit")
    cfg = dict(g["model"])
    m = seeded_(VisionTransformer(**cfg).eval(), g["seed"])
    heads = SViTSelectors(cfg["embed_dim"], g["layers"])
    seeded_(heads.selectors, g["heads_seed"])
    x = g_images(g["image_seed"], g["batch"], cfg["img_size"])
    seen = {layer: [] for layer in g["layers"]}
    hooks = [m.blocks[layer - 1].norm1.register_forward_pre_hook(
        lambda mod, a, layer=layer: seen[layer].extend([a[0].shape[1]] * a[0].shape[0])) for layer in g["layers"]]
    with torch.no_grad():
        ours = svit_forward(m, heads, x)
    for h in hooks:
        h.remove()
    assert [seen[layer] for layer in g["layers"]] == g["kept"]
    assert torch.allclose(ours, torch.tensor(g["logits"]), atol=1e-4, rtol=0)
    m.train()
    torch.manual_seed(g["gumbel_seed"])
    with torch.no_grad():
        logits, aux = svit_forward(m, heads, x, training=True)
    assert [(d.sum(1) + 1).tolist() for d in aux["decisions"]] == g["train_kept"]  # + the CLS
    assert torch.allclose(logits, torch.tensor(g["train_logits"]), atol=1e-4, rtol=0)
    targets = [g["rho"] ** s for s in aux["stages"]]
    assert svit_ratio_loss(aux, targets).item() == pytest.approx(g["ratio_loss"], abs=1e-6)

"""Token Cropr over an unmodified timm ViT (dynavit.trainer.methods.cropr)."""

import pytest
import timm
import torch
import torch.nn.functional as F

from dynavit.trainer.methods.budget import count_dynavit_macs
from dynavit.trainer.methods.cropr import (CroprRouters, count_cropr_macs, cropr_forward, cropr_loss,
                                   cropr_schedule, cropr_token_counts, cropr_trainable,
                                   match_cropr_budget)
from dynavit.trainer.methods.flops import build_meta_model
from dynavit.trainer.methods.learned import param_snapshot
from tiny_vits import KW, one_thread, tiny_vit  # noqa: F401,E402 (one_thread: autouse, one intra-op thread)
from tiny_vits import images as shared_images  # noqa: E402


def tiny(depth=5, **kw):
    return tiny_vit(depth, **kw)


def images(b=3):
    return shared_images(b)


# ---- hand-written reference of the inference path -------------------------------------------

def ref_inference(m, routers, x, r):
    """Per image: score = query · LayerNorm(token) (one query, one head, no projections), keep
    the highest M − R patch tokens (prefix tokens always), fuse the pruned back before the last
    block when llf."""
    P = m.num_prefix_tokens
    depth = len(m.blocks)
    n_routers = depth - (2 if routers.llf else 1)
    outs = []
    for b in range(x.shape[0]):
        t = m._pos_embed(m.patch_embed(x[b:b + 1]))[0]
        pruned = []
        for i, blk in enumerate(m.blocks):
            if routers.llf and i == depth - 1:
                t = torch.cat([t] + pruned, 0)
            t = blk(t[None])[0]
            if i < n_routers:
                rt = routers.routers[i]
                ri = r + 1 if i == 0 else r
                patches = t[P:]
                ln = F.layer_norm(patches, (m.embed_dim,), rt.norm.weight, rt.norm.bias, 1e-6)
                score = ln @ rt.queries[0, 0]
                keep = len(patches) - ri
                ranked = sorted(range(len(patches)), key=lambda j: (-float(score[j]), j))
                kept, gone = sorted(ranked[:keep]), sorted(ranked[keep:])
                pruned.append(patches[gone])
                t = torch.cat([t[:P], patches[kept]], 0)
        outs.append(m.forward_head(m.norm(t[None])))
    return torch.cat(outs)


def randomize(routers):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for rt in routers.routers:
            rt.queries.copy_(torch.randn(rt.queries.shape, generator=g))
            rt.norm.weight.copy_(1 + 0.3 * torch.randn(rt.norm.weight.shape, generator=g))
            rt.norm.bias.copy_(0.3 * torch.randn(rt.norm.bias.shape, generator=g))
    return routers


@pytest.mark.parametrize("llf,kw", [(False, {}), (True, {}),
                                    (False, dict(reg_tokens=2, global_pool="avg"))])
def test_inference_equals_handwritten_reference(llf, kw):
    m = tiny(**kw)
    routers = randomize(CroprRouters.for_model(m, llf=llf, pre_norm=True))  # the LayerNorm variant
    x = images()
    with torch.no_grad():
        got = cropr_forward(m, routers, x, 6)
        assert torch.allclose(got, ref_inference(m, routers, x, 6), atol=1e-5, rtol=1e-5)
        assert torch.equal(cropr_forward(m, routers, x, 0), m(x))


def test_schedule_and_counts():
    assert cropr_schedule(8, 3) == [9, 8, 8] and cropr_schedule(0, 2) == [0, 0]
    assert cropr_schedule([1, 2], 2) == [1, 2]
    assert cropr_token_counts(196, 8, 11)[:3] == [187, 179, 171]
    assert cropr_token_counts(10, 4, 3) == [5, 1, 1]  # clipped: one token always stays
    with pytest.raises(ValueError, match="2 counts for 3 routers"):
        cropr_schedule([1, 2], 3)


def test_training_trains_backbone_and_routers_with_separate_gradients():
    m = tiny().train()
    routers = CroprRouters.for_model(m).train()
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    # the main loss reaches no router (detached input, discrete gather) ...
    logits, aux = cropr_forward(m, routers, x, 4, training=True)
    assert len(aux) == 4 and all(a.shape == (4, 5) for a in aux)
    F.cross_entropy(logits, y).backward()
    assert all(p.grad is None for p in routers.parameters())
    m.zero_grad(set_to_none=True)
    # ... and the aux losses reach no backbone weight
    logits, aux = cropr_forward(m, routers, x, 4, training=True)
    sum(F.cross_entropy(a, y) for a in aux).backward()
    assert all(p.grad is None for p in m.parameters())
    routers.zero_grad(set_to_none=True)

    opt = torch.optim.AdamW(cropr_trainable(m, routers), lr=1e-3)
    before = param_snapshot(m, routers)
    for _ in range(3):
        logits, aux = cropr_forward(m, routers, x, 4, training=True)
        opt.zero_grad()
        cropr_loss(logits, aux, y).backward()
        opt.step()
    after = param_snapshot(m, routers)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(before)  # every backbone and router parameter trains

    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=5, **KW)
    plain.load_state_dict(m.state_dict(), strict=True)
    cfg = {k: v for k, v in routers.config().items() if k != "method"}
    again = CroprRouters(**cfg)
    again.load_state_dict(routers.state_dict(), strict=True)
    m.eval(), plain.eval(), routers.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(cropr_forward(m, routers, x, 4), cropr_forward(plain, again, x, 4))


def test_refusals():
    with pytest.raises(ValueError, match="no block to route"):
        CroprRouters.for_model(tiny(depth=2), llf=True)
    m = tiny()
    routers = CroprRouters.for_model(tiny(depth=4))
    with pytest.raises(ValueError, match="depth"):
        cropr_forward(m, routers, images(1), 2)
    with pytest.raises(ValueError, match="r must be"):
        cropr_forward(m, CroprRouters.for_model(m), images(1), -1)


def closed_form(m, r, llf):
    d, hid, P, n = m.embed_dim, m.blocks[0].mlp.fc1.out_features, 1, 64
    depth = len(m.blocks)
    n_r = depth - (2 if llf else 1)
    counts = cropr_token_counts(n, r, n_r)
    total = n * d * 4 * 4 * 3 + d * m.num_classes
    t = P + n
    for i in range(depth):
        if llf and i == depth - 1:
            t = P + n
        total += 4 * t * d * d + 2 * t * d * hid + 2 * t * t * d
        if i < n_r and counts[i] < t - P:
            total += t * d  # the router's query · keys over every token
            t = P + counts[i]
    return total


@pytest.mark.parametrize("llf", [False, True])
def test_macs_count_the_router_scores_exactly(llf):
    m = tiny()
    routers = CroprRouters.for_model(m, llf=llf)
    for r in (0, 3, 20):
        assert count_cropr_macs(m, routers, r) == closed_form(m, r, llf), r


def test_vit_base_budget_matched_within_5_percent_of_dynavit_k70():
    m = build_meta_model("vit_base_patch16_224")
    res = match_cropr_budget(m, 70)
    target = count_dynavit_macs(m, 70)["macs"]
    assert res["dynavit"]["macs"] == target
    assert abs(res["macs"] - target) <= 0.05 * target
    assert 0 < res["r"] < 196 and len(res["token_counts"]) == 11


# ---- golden: the authors' own forward (tests/golden/make_golden.py cropr) --------------------

@pytest.mark.parametrize("name", ["cropr_llf", "cropr"])
def test_matches_authors_cropr_golden(name):
    """Logits, aux-head logits and per-block token counts of benbergner/cropr 2f8b624
    (cls/vision_transformer.py with cls/cropr.py, main.py's router defaults, pruning rate 8,
    with and without last-layer fusion) on a seeded 4-block ViT, recorded by
    tests/golden/make_golden.py (routers seeded under our names, copied to theirs)."""
    from timm.models.vision_transformer import VisionTransformer

    from golden.common import count_tokens, images as g_images, load, seeded_

    g = load(name)
    cfg = dict(g["model"])
    m = seeded_(VisionTransformer(**cfg).eval(), g["seed"])
    routers = CroprRouters.for_model(m, num_classes=cfg["num_classes"], llf=g["llf"])
    seeded_(routers.routers, g["routers_seed"])
    x = g_images(g["image_seed"], g["batch"], cfg["img_size"])
    counts, remove = count_tokens(m.blocks)
    with torch.no_grad():
        ours = cropr_forward(m, routers, x, g["r"])
        remove()
        logits, aux = cropr_forward(m, routers, x, g["r"], training=True)
    assert counts == g["counts"]
    assert torch.allclose(ours, torch.tensor(g["logits"]), atol=1e-4, rtol=0)
    assert torch.allclose(logits, torch.tensor(g["train_logits"]), atol=1e-4, rtol=0)
    assert len(aux) == len(g["train_aux"])
    for a, ref in zip(aux, g["train_aux"]):
        assert torch.allclose(a, torch.tensor(ref), atol=1e-4, rtol=0)

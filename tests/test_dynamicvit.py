"""DynamicViT over an unmodified timm ViT (dynavit.trainer.methods.dynamicvit)."""

import pytest
import timm
import torch
import torch.nn.functional as F

from dynavit.trainer.methods.budget import count_dynavit_macs
from dynavit.trainer.methods.dynamicvit import (DynamicViTHeads, count_dynamicvit_macs,
                                        default_layers, distill_loss, dynamicvit_forward,
                                        dynamicvit_keep_counts, dynamicvit_loss,
                                        dynamicvit_trainable, match_dynamicvit_budget,
                                        ratio_loss)
from dynavit.trainer.methods.flops import build_meta_model
from dynavit.trainer.methods.learned import attend_with_policy, param_snapshot
from tiny_vits import KW, one_thread, tiny_vit  # noqa: F401,E402 (one_thread: autouse, one intra-op thread)
from tiny_vits import images as shared_images  # noqa: E402
from tiny_vits import randomize  # noqa: E402


def tiny(depth=8, **kw):
    return tiny_vit(depth, **kw)


def images(b=3):
    return shared_images(b)


# ---- hand-written reference of the inference path -------------------------------------------

def ref_predictor_keep_score(pred, tokens):
    """tokens [n, D] of one image → keep log-prob [n], written out from the weights."""
    ln, lin0 = pred.in_conv[0], pred.in_conv[1]
    l1, l2, l3 = pred.out_conv[0], pred.out_conv[2], pred.out_conv[4]
    h = F.gelu(F.linear(F.layer_norm(tokens, ln.normalized_shape, ln.weight, ln.bias, ln.eps),
                        lin0.weight, lin0.bias))
    d = h.shape[1] // 2
    g = h[:, d:].mean(dim=0)
    h = torch.cat([h[:, :d], g.expand(h.shape[0], -1)], dim=1)
    h = F.gelu(F.linear(h, l1.weight, l1.bias))
    h = F.gelu(F.linear(h, l2.weight, l2.bias))
    out = F.linear(h, l3.weight, l3.bias)
    return torch.log_softmax(out, dim=1)[:, 0]


def ref_inference(m, heads, x, rho):
    n = m.patch_embed.grid_size[0] * m.patch_embed.grid_size[1]
    outs = []
    for b in range(x.shape[0]):
        t = m.patch_embed(x[b:b + 1])[0]                        # [N, D]
        t = torch.cat([m.cls_token[0], t], 0) + m.pos_embed[0]  # [1+N, D]
        stage = 0
        for i, blk in enumerate(m.blocks):
            t = blk(t[None])[0]
            if stage < len(heads.layers) and i + 1 == heads.layers[stage]:
                stage += 1
                keep = int(n * rho ** stage + 1e-9)
                score = ref_predictor_keep_score(heads.predictors[stage - 1], t[1:])
                ranked = sorted(range(len(score)), key=lambda j: (-float(score[j]), j))
                chosen = sorted(ranked[:keep])
                t = torch.cat([t[:1], t[1:][chosen]], 0)
        t = m.norm(t[None])[0]
        outs.append(m.head(t[0]))
    return torch.stack(outs)


def test_inference_equals_handwritten_reference():
    m = tiny()
    heads = randomize(DynamicViTHeads.for_model(m))
    x = images()
    with torch.no_grad():
        for rho in (0.8, 0.5):
            got = dynamicvit_forward(m, heads, x, rho)
            assert torch.allclose(got, ref_inference(m, heads, x, rho), atol=1e-5, rtol=1e-5)
        assert torch.equal(dynamicvit_forward(m, heads, x, 1.0), m(x))


def test_keep_counts_and_default_layers():
    assert dynamicvit_keep_counts(196, 0.7, 3) == [137, 96, 67]
    assert dynamicvit_keep_counts(196, 1.0, 3) == [196, 196, 196]
    assert dynamicvit_keep_counts(10, 0.01, 2) == [1, 1]
    assert default_layers(12) == (3, 6, 9) and default_layers(8) == (2, 4, 6)
    assert default_layers(4) == (1, 2, 3)
    with pytest.raises(ValueError, match="at least 4 blocks"):
        default_layers(3)


def test_policy_attention_hides_dropped_keys():
    # with eps=0, kept queries under the policy see exactly the attention over kept tokens
    m = tiny(depth=1)
    attn = m.blocks[0].attn
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 1, 0]], dtype=torch.float32)
    with torch.no_grad():
        full = attend_with_policy(attn, x, keep[..., None], eps=0.0)
        for b in range(2):
            idx = keep[b].nonzero().squeeze(1)
            dense = attn(x[b:b + 1, idx])
            assert torch.allclose(full[b, idx], dense[0], atol=1e-6)
        ones = attend_with_policy(attn, x, torch.ones(2, 6, 1), eps=0.0)
        assert torch.allclose(ones, attn(x), atol=1e-6)


@pytest.mark.parametrize("freeze_backbone", [False, True])
def test_training_steps_change_exactly_the_intended_parameters(freeze_backbone):
    m = tiny(depth=4).train()
    teacher = tiny(depth=4).eval()
    heads = DynamicViTHeads.for_model(m).train()
    if freeze_backbone:
        m.requires_grad_(False)
        params = list(heads.parameters())
    else:
        params = dynamicvit_trainable(m, heads)
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = param_snapshot(m, heads)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    for _ in range(3):
        logits, aux = dynamicvit_forward(m, heads, x, 0.7, training=True)
        assert logits.shape == (4, 5) and len(aux["decisions"]) == 3
        assert aux["tokens"].shape == (4, 64, 32)
        d = aux["decisions"]
        assert all(((v == 0) | (v == 1)).all() for v in d)
        assert (d[1] <= d[0]).all() and (d[2] <= d[1]).all()  # hierarchical
        with torch.no_grad():
            t_logits = teacher(x)
            t_tokens = teacher.forward_features(x)[:, 1:]
        loss = dynamicvit_loss(logits, aux, y, 0.7, teacher_logits=t_logits,
                               teacher_tokens=t_tokens)
        opt.zero_grad()
        loss.backward()
        for p in heads.parameters():  # every predictor weight gets a gradient
            assert p.grad is not None and p.grad.abs().sum() > 0
        opt.step()
    after = param_snapshot(m, heads)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    heads_keys = {k for k in before if k.startswith("1.")}
    backbone_keys = {k for k in before if k.startswith("0.")}
    assert heads_keys <= changed
    if freeze_backbone:
        assert not (changed & backbone_keys)
    else:
        assert backbone_keys <= changed

    # the backbone is still a plain timm model; the heads reload from their config
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, **KW)
    plain.load_state_dict(m.state_dict(), strict=True)
    cfg = heads.config()
    again = DynamicViTHeads(cfg["embed_dim"], cfg["layers"])
    again.load_state_dict(heads.state_dict(), strict=True)
    m.eval(), plain.eval(), heads.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(dynamicvit_forward(m, heads, x, 0.6),
                           dynamicvit_forward(plain, again, x, 0.6))


def test_losses():
    d = [torch.tensor([[1., 1, 0, 0], [1, 0, 0, 0]]), torch.tensor([[1., 0, 0, 0], [0, 0, 0, 0]])]
    # stage 1: shares .5, .25 vs .5 → (0 + .0625)/2; stage 2: .25, 0 vs .25 → (0 + .0625)/2
    assert ratio_loss({"decisions": d}, 0.5).item() == pytest.approx(0.0625 / 2)
    z = torch.randn(2, 5)
    assert distill_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    aux = {"mask": torch.tensor([[1., 0], [0, 0]]), "tokens": torch.zeros(2, 2, 3)}
    tt = torch.ones(2, 2, 3)
    assert distill_loss(z, z, aux, tt).item() == pytest.approx(1.0)  # one kept token, MSE 1


def test_refusals():
    x = images(1)
    m = tiny(global_pool="avg")
    with pytest.raises(ValueError, match="global_pool"):
        DynamicViTHeads.for_model(m)
    with pytest.raises(ValueError, match="class token"):
        DynamicViTHeads.for_model(tiny(class_token=False, global_pool="avg"))
    m = tiny(depth=4)
    with pytest.raises(ValueError, match="1..3"):
        DynamicViTHeads.for_model(m, layers=(2, 4))
    heads = DynamicViTHeads(32, (3, 6, 9))  # built for a deeper model
    with pytest.raises(ValueError, match="do not leave a block"):
        dynamicvit_forward(m, heads, x, 0.5)
    heads = DynamicViTHeads.for_model(m)
    with pytest.raises(ValueError, match="rho"):
        dynamicvit_forward(m, heads, x, 0.0)
    with pytest.raises(ValueError, match="embed_dim"):
        dynamicvit_forward(tiny(depth=4, embed_dim=48), heads, images(1), 0.5)


def closed_form(m, heads, rho):
    d, t0 = m.embed_dim, 1 + 64
    hid = m.blocks[0].mlp.fc1.out_features
    counts = dynamicvit_keep_counts(64, rho, len(heads.layers))
    stem_head = 64 * d * 4 * 4 * 3 + d * m.num_classes
    pred = d * d + d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2
    total, t, s = stem_head, t0, 0
    for i in range(len(m.blocks)):
        total += 4 * t * d * d + 2 * t * d * hid + 2 * t * t * d
        if s < len(heads.layers) and i + 1 == heads.layers[s]:
            total += (t - 1) * pred  # the predictor scores the tokens it sees
            t = 1 + counts[s]
            s += 1
    return total


def test_macs_count_the_predictors_exactly():
    m = tiny()
    heads = DynamicViTHeads.for_model(m)
    for rho in (0.9, 0.3):
        assert count_dynamicvit_macs(m, heads, rho) == closed_form(m, heads, rho)
    meta = tiny().to("meta")
    assert count_dynamicvit_macs(meta, DynamicViTHeads.for_model(meta), 0.6) == \
        closed_form(m, heads, 0.6)


def test_vit_base_budget_matched_within_5_percent_of_dynavit_k70():
    m = build_meta_model("vit_base_patch16_224")
    res = match_dynamicvit_budget(m, 70, step=0.01)  # a coarse grid keeps the test fast
    target = count_dynavit_macs(m, 70)["macs"]
    assert res["dynavit"]["macs"] == target
    assert abs(res["macs"] - target) <= 0.05 * target
    assert 0 < res["rho"] < 1 and res["layers"] == [3, 6, 9]
    heads = DynamicViTHeads.for_model(m)
    assert count_dynamicvit_macs(m, heads, res["rho"]) == res["macs"]


# ---- golden: the authors' own forward and loss (tests/golden/make_golden.py dynamicvit) -------

def test_matches_authors_dynamicvit_golden():
    """raoyongming/DynamicViT 1322e62 on a seeded 4-block ViT with 196 patches (their forward
    hard-codes 14 x 14), base_rate 0.7 (README), stages after blocks 1, 2, 3: inference logits
    and per-block counts; the training path under the same Gumbel draws (global RNG seeded as
    theirs was), its kept counts, and main.py's deit loss (CE + 2 ratio + 0.5 KL + 0.5 token
    MSE to the dense teacher), recorded by tests/golden/make_golden.py."""
    import copy

    import torch.nn.functional as F
    from timm.models.vision_transformer import VisionTransformer

    from golden.common import count_tokens, images as g_images, load, seeded_
    from dynavit.trainer.model import teacher_outputs, training_loss

    g = load("dynamicvit")
    cfg = dict(g["model"])
    m = seeded_(VisionTransformer(**cfg).eval(), g["seed"])
    teacher = copy.deepcopy(m)
    heads = DynamicViTHeads(cfg["embed_dim"], g["layers"])
    seeded_(heads.predictors, g["heads_seed"])
    x = g_images(g["image_seed"], g["batch"], cfg["img_size"])
    counts, remove = count_tokens(m.blocks)
    with torch.no_grad():
        ours = dynamicvit_forward(m, heads, x, g["rho"])
    remove()
    assert counts == g["counts"]
    assert torch.allclose(ours, torch.tensor(g["logits"]), atol=1e-4, rtol=0)
    m.train()
    torch.manual_seed(g["gumbel_seed"])
    with torch.no_grad():
        logits, aux = dynamicvit_forward(m, heads, x, g["rho"], training=True)
        loss = training_loss("dynamicvit", g["rho"], (logits, aux), torch.tensor(g["labels"]),
                             F.cross_entropy, teacher=teacher_outputs(teacher, x))
    assert [d.sum(1).tolist() for d in aux["decisions"]] == g["train_kept"]
    assert torch.allclose(logits, torch.tensor(g["train_logits"]), atol=1e-4, rtol=0)
    assert loss.item() == pytest.approx(g["train_loss"], abs=1e-4)

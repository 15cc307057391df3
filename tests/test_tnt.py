"""TNT (Training Noise Token pruning) over an unmodified timm ViT (dynavit.trainer.tnt)."""

import math

import pytest
import timm
import torch

from dynavit.trainer.budget import count_dynavit_macs
from dynavit.trainer.flops import build_meta_model
from dynavit.trainer.learned import param_snapshot
from dynavit.trainer.tnt import (TNTHeads, count_tnt_macs, default_s, match_tnt_budget,
                                 similarity_prune, tnt_forward, tnt_token_counts,
                                 tnt_trainable)

KW = dict(img_size=32, patch_size=4, embed_dim=32, num_heads=2, num_classes=5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: a second intra-op thread only adds spin-waits on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(depth=6, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth,
                             **{**KW, **kw}).eval()


def images(b=3):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def randomize(heads):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return heads


# ---- hand-written reference of the inference path -------------------------------------------

def ref_inference(m, heads, x, keep, s, seed):
    """Per image, in plain steps. The random split uses the same draws as the method: one
    torch.rand(B, T) from a generator seeded with ``seed``, at the first pruning layer."""
    P = m.num_prefix_tokens
    gen = torch.Generator().manual_seed(seed)
    draws = None
    per_image = []
    for b in range(x.shape[0]):
        t = m.patch_embed(x[b:b + 1])[0]
        t = torch.cat([m.cls_token[0], t], 0) + m.pos_embed[0]
        per_image.append(t)
    first = True
    for i, blk in enumerate(m.blocks):
        per_image = [blk(t[None])[0] for t in per_image]
        if i + 1 not in heads.layers:
            continue
        j = heads.layers.index(i + 1)
        new = []
        n = per_image[0].shape[0] - P
        k = math.ceil(keep * n - 1e-9)
        s_eff = min(s, n - k, k) if first else 0
        if first and s_eff:
            draws = torch.rand(x.shape[0], k + s_eff, generator=gen)
        for b, t in enumerate(per_image):
            patches = t[P:]
            score = heads.heads[j](patches)[:, 0]
            alpha = torch.softmax(score, 0)
            ranked = sorted(range(n), key=lambda q: (-float(alpha[q]), q))
            cand = sorted(ranked[:k + s_eff])
            if s_eff:
                perm = draws[b].argsort().tolist()
                na = (len(cand) + 1) // 2
                A, Bset = perm[:na], perm[na:]
                best = []
                for pos, a in enumerate(A):
                    va = patches[cand[a]]
                    sims = [float(torch.dot(va, patches[cand[c]]) /
                                  (va.norm() * patches[cand[c]].norm())) for c in Bset]
                    best.append((-max(sims), pos, a))
                dropped = {a for _, _, a in sorted(best)[:s_eff]}
                cand = [c for q, c in enumerate(cand) if q not in dropped]
            new.append(torch.cat([t[:P], patches[cand]], 0))
        per_image = new
        first = False
    outs = [m.head(m.norm(t[None])[0][0]) for t in per_image]
    return torch.stack(outs)


@pytest.mark.parametrize("keep,s", [(0.7, 6), (0.5, 0), (0.9, 20)])
def test_inference_equals_handwritten_reference(keep, s):
    m = tiny()
    heads = randomize(TNTHeads.for_model(m))
    x = images()
    with torch.no_grad():
        got = tnt_forward(m, heads, x, keep, s=s, generator=torch.Generator().manual_seed(7))
        ref = ref_inference(m, heads, x, keep, s, seed=7)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_keep_one_is_the_model_and_seeded_inference_repeats():
    m = tiny(global_pool="avg", class_token=False)  # TNT needs no class token
    heads = randomize(TNTHeads.for_model(m))
    x = images()
    with torch.no_grad():
        assert torch.equal(tnt_forward(m, heads, x, 1.0), m(x))
        a = tnt_forward(m, heads, x, 0.6, generator=torch.Generator().manual_seed(3))
        b = tnt_forward(m, heads, x, 0.6, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


def test_token_counts_and_similarity_prune():
    assert default_s(196) == 40
    # ViT-B at keep 0.5: 98 + 40 candidates → 98; then 49; then 25
    assert tnt_token_counts(196, 0.5, 3) == [(138, 98), (49, 49), (25, 25)]
    assert tnt_token_counts(196, [0.9, 1.0], 2, s=40) == [(196, 177), (177, 177)]  # s ≤ n − k
    assert tnt_token_counts(10, 0.2, 1, s=5) == [(4, 2)]                       # s ≤ k
    # two identical tokens: the A one of the pair goes
    t = torch.tensor([[[1., 0], [0, 1], [1, 0.01], [-1, 0]]])
    g = torch.Generator().manual_seed(0)
    perm = torch.rand(1, 4, generator=torch.Generator().manual_seed(0)).argsort(1)[0].tolist()
    kept = similarity_prune(t, 1, g)[0].tolist()
    assert len(kept) == 3 and kept == sorted(kept)
    gone = ({0, 1, 2, 3} - set(kept)).pop()
    assert gone in perm[:2]


def test_training_noise_is_scaled_by_relevance_and_spares_the_cls_token():
    m = tiny()
    heads = randomize(TNTHeads.for_model(m, layers=(3,)))
    x = images(4)
    seen = {}
    h1 = m.blocks[2].register_forward_hook(lambda mod, i, o: seen.__setitem__("out", o))
    h2 = m.blocks[3].register_forward_pre_hook(lambda mod, i: seen.__setitem__("in", i[0]))
    try:
        with torch.no_grad():
            assert torch.equal(tnt_forward(m, heads, x, 0.5, training=True, beta=0.0), m(x))
            tnt_forward(m, heads, x, 0.5, training=True, generator=torch.Generator().manual_seed(0))
    finally:
        h1.remove(), h2.remove()
    out, inp = seen["out"], seen["in"]
    assert torch.equal(inp[:, 0], out[:, 0])  # CLS untouched
    alpha = torch.softmax(heads.heads[0](out[:, 1:])[..., 0], dim=1)
    eps = (inp[:, 1:] - out[:, 1:]) / (1 - alpha)[..., None]
    assert eps.std().item() == pytest.approx(math.sqrt(0.02), rel=0.05)
    assert abs(eps.mean().item()) < 0.01


def test_training_steps_change_only_the_heads():
    m = tiny().train()
    m.requires_grad_(False)  # TNT trains the heads on a frozen backbone
    heads = TNTHeads.for_model(m).train()
    opt = torch.optim.AdamW(tnt_trainable(m, heads), lr=1e-2)
    before = param_snapshot(m, heads)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(tnt_forward(m, heads, x, 0.5, training=True), y)
        opt.zero_grad()
        loss.backward()
        for h in heads.heads:
            assert h.weight.grad.abs().sum() > 0
            # softmax ignores a shared shift: the bias gradient is zero up to rounding
            assert h.bias.grad.abs().max() < 1e-6
        assert all(p.grad is None for p in m.parameters())
        opt.step()
    after = param_snapshot(m, heads)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {f"1.heads.{j}.weight" for j in range(3)} <= changed
    assert changed <= {k for k in before if k.startswith("1.")}  # the backbone is untouched
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=6, **KW)
    plain.load_state_dict(m.state_dict(), strict=True)
    again = TNTHeads(**{k: v for k, v in heads.config().items() if k != "method"})
    again.load_state_dict(heads.state_dict(), strict=True)


def test_refusals():
    m = tiny(depth=3)
    with pytest.raises(ValueError, match="need at least 4 blocks"):
        TNTHeads.for_model(m)
    heads = TNTHeads.for_model(m, layers=(2,))
    x = images(1)
    with pytest.raises(ValueError, match="keep"):
        tnt_forward(m, heads, x, 1.5)
    with pytest.raises(ValueError, match="rates for 1 layers"):
        tnt_forward(m, heads, x, [0.5, 0.5])
    with pytest.raises(ValueError, match="s must be"):
        tnt_forward(m, heads, x, 0.5, s=-1)
    with pytest.raises(ValueError, match="do not leave a block"):
        tnt_forward(m, TNTHeads(32, (3,)), x, 0.5)


def closed_form(m, keep, s):
    d, hid, P = m.embed_dim, m.blocks[0].mlp.fc1.out_features, 1
    plan = tnt_token_counts(64, keep, 3, s)
    total = 64 * d * 4 * 4 * 3 + d * m.num_classes
    t, j = P + 64, 0
    for i in range(len(m.blocks)):
        total += 4 * t * d * d + 2 * t * d * hid + 2 * t * t * d
        if i + 1 in (3, 4, 5):
            cand, k = plan[j]
            n = t - P
            if k < n:
                total += n * d                                   # relevance head
                if cand > k:
                    total += ((cand + 1) // 2) * (cand // 2) * d  # A·Bᵀ similarities
            t, j = P + k, j + 1
    return total


def test_macs_count_the_heads_and_the_matching_exactly():
    m = tiny()
    heads = TNTHeads.for_model(m)
    for keep, s in ((0.7, 6), (0.4, None), (1.0, 6)):
        assert count_tnt_macs(m, heads, keep, s) == closed_form(m, keep, s), (keep, s)
    meta = tiny().to("meta")
    assert count_tnt_macs(meta, TNTHeads.for_model(meta), 0.7, 6) == closed_form(m, 0.7, 6)


def test_vit_base_budget_matched_within_5_percent_of_dynavit_k70():
    m = build_meta_model("vit_base_patch16_224")
    res = match_tnt_budget(m, 70, step=0.01)
    target = count_dynavit_macs(m, 70)["macs"]
    assert res["dynavit"]["macs"] == target
    assert abs(res["macs"] - target) <= 0.05 * target
    assert 0 < res["keep"] < 1 and res["layers"] == [3, 4, 5] and res["s"] == 40
    assert count_tnt_macs(m, TNTHeads.for_model(m), res["keep"]) == res["macs"]

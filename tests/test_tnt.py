"""TNT (Training Noise Token pruning) over an unmodified timm ViT (dynavit.trainer.methods.tnt)."""


import pytest
import timm
from timm.models.vision_transformer import VisionTransformer
import torch

from dynavit.trainer.methods.budget import count_dynavit_macs
from dynavit.trainer.methods.flops import build_meta_model
from dynavit.trainer.methods.learned import param_snapshot
from dynavit.trainer.methods.tnt import (TNTHeads, count_tnt_macs, default_s, match_tnt_budget,
                                 similarity_prune, tnt_forward, tnt_plan,
                                 tnt_token_counts,
                                 tnt_trainable)
from tiny_vits import KW, one_thread, tiny_vit  # noqa: F401,E402 (one_thread: autouse, one intra-op thread)
from tiny_vits import images as shared_images  # noqa: E402
from tiny_vits import randomize as shared_randomize  # noqa: E402


def tiny(depth=6, **kw):
    return tiny_vit(depth, **kw)


def images(b=3):
    return shared_images(b)


def randomize(heads):
    return shared_randomize(heads, scale=1.0)


# ---- hand-written reference of the inference path -------------------------------------------

def _sim_drop(patches, cand, perm, s):
    """Positions (into ``cand``) of the s A tokens dropped: A = perm[:T // 2], B the rest."""
    half = len(cand) // 2
    A, Bset = perm[:half], perm[half:]
    best = []
    for pos, a in enumerate(A):
        va = patches[cand[a]]
        sims = [float(torch.dot(va, patches[cand[c]]) / (va.norm() * patches[cand[c]].norm()))
                for c in Bset]
        best.append((-max(sims), pos, a))
    return {a for _, _, a in sorted(best)[:s]}


def ref_inference(m, heads, x, keep, s, seed):
    """Per image, in plain steps, with the authors' random draws from a generator seeded
    with ``seed``: several layers: torch.rand(B, N) then one randperm(N) before block 1;
    one layer: one randperm(k + s) at that layer (candidates in descending alpha)."""
    P = m.num_prefix_tokens
    gen = torch.Generator().manual_seed(seed)
    per_image = []
    for b in range(x.shape[0]):
        t = m.patch_embed(x[b:b + 1])[0]
        t = torch.cat([m.cls_token[0], t], 0) + m.pos_embed[0]
        per_image.append(t)
    multi = len(heads.layers) > 1
    N = per_image[0].shape[0] - P
    if multi and s:
        s_pre = min(s, N // 2)
        torch.rand(x.shape[0], N, generator=gen)
        perm = torch.randperm(N, generator=gen).tolist()
        new = []
        for t in per_image:
            cand = list(range(N))
            dropped = _sim_drop(t[P:], cand, perm, s_pre)
            new.append(torch.cat([t[:P], t[P:][[c for q, c in enumerate(cand) if q not in dropped]]], 0))
        per_image = new
    for i, blk in enumerate(m.blocks):
        per_image = [blk(t[None])[0] for t in per_image]
        if i + 1 not in heads.layers:
            continue
        n = per_image[0].shape[0] - P
        k = max(1, int(keep * n + 1e-9))
        s_eff = min(s, n - k, k) if not multi else 0
        perm = torch.randperm(k + s_eff, generator=gen).tolist() if s_eff else None
        new = []
        for t in per_image:
            patches = t[P:]
            alpha = torch.softmax(heads.heads[i](patches)[:, 0], 0)
            ranked = sorted(range(n), key=lambda q: (-float(alpha[q]), q))
            cand = ranked[:k + s_eff]
            if s_eff:
                dropped = _sim_drop(patches, cand, perm, s_eff)
                cand = [c for q, c in enumerate(cand) if q not in dropped]
            new.append(torch.cat([t[:P], patches[sorted(cand)]], 0))
        per_image = new
    outs = [m.head(m.norm(t[None])[0][0]) for t in per_image]
    return torch.stack(outs)


@pytest.mark.parametrize("layers,keep,s", [((3, 4, 5), 0.7, 6), ((3, 4, 5), 0.5, 0),
                                           ((3,), 0.6, 5), ((3,), 0.9, 20)])
def test_inference_equals_handwritten_reference(layers, keep, s):
    m = tiny()
    heads = randomize(TNTHeads.for_model(m, layers=layers))
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
        assert torch.equal(tnt_forward(m, heads, x, 1.0, s=0), m(x))
        a = tnt_forward(m, heads, x, 0.6, generator=torch.Generator().manual_seed(3))
        b = tnt_forward(m, heads, x, 0.6, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


def test_token_counts_and_similarity_prune():
    assert default_s(196) == 40 and default_s(196, 1) == 25
    # the authors' README settings on ViT-B (196 patches): int(n·rate) per layer
    assert tnt_plan(196, 0.6, 1, 25) == (0, [(142, 117)])             # 117 + 25 candidates
    assert tnt_plan(196, 0.8, 3, 40) == (40, [(124, 124), (99, 99), (79, 79)])
    assert tnt_token_counts(196, 0.8, 3, 40) == [156, 124, 99, 79]      # + CLS: 157/125/100/80
    assert tnt_plan(196, [0.9, 1.0], 2, 40) == (40, [(140, 140), (140, 140)])
    assert tnt_plan(10, 0.2, 1, 5) == (0, [(4, 2)])                     # s ≤ k
    assert tnt_plan(196, 0.95, 1, 25) == (0, [(196, 186)])              # s ≤ n − k
    assert tnt_plan(10, 0.5, 2, 9) == (5, [(2, 2), (1, 1)])             # s ≤ N // 2
    # two identical tokens: the A one of the pair goes; A is the first T // 2 of the permutation
    t = torch.tensor([[[1., 0], [0, 1], [1, 0.01], [-1, 0]]]).expand(2, -1, -1)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    kept = similarity_prune(t, 1, torch.Generator().manual_seed(0))
    assert torch.equal(kept[0], kept[1])            # one permutation for the whole batch
    kept = kept[0].tolist()
    assert len(kept) == 3 and kept == sorted(kept)
    gone = ({0, 1, 2, 3} - set(kept)).pop()
    assert gone in perm[:2]
    with pytest.raises(ValueError, match="cannot drop 3 of 5"):
        similarity_prune(torch.randn(1, 5, 2), 3)


def test_training_noise_follows_the_authors_after_blocks_1_to_5():
    """models.py (mx-ethan-rao/tnt d095619), training: after every block with i < 5, whatever
    the pruning layers, x = alpha_norm(x) + 0.02·noise, noise = (1 − alpha)·N(0, I) on the
    patch tokens and 0 on CLS (alpha_norm: LayerNorm eps 1e-6 at its init)."""
    m = tiny()
    heads = randomize(TNTHeads.for_model(m, layers=(3,)))
    assert len(heads.heads) == 5 and heads.noisy(6) == {1, 2, 3, 4, 5}
    x = images(4)
    outs, ins = {}, {}
    hooks = [b.register_forward_hook(lambda mod, i, o, j=j: outs.__setitem__(j, o)) for j, b in enumerate(m.blocks)]
    hooks += [b.register_forward_pre_hook(lambda mod, i, j=j: ins.__setitem__(j, i[0])) for j, b in enumerate(m.blocks)]
    try:
        with torch.no_grad():
            assert torch.equal(tnt_forward(m, heads, x, 0.5, training=True, noise_std=0.0,
                                           alpha_norm=False), m(x))
            tnt_forward(m, heads, x, 0.5, training=True, generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    for j in range(5):  # after blocks 1..5 (0-based 0..4): block j+1's input
        out, inp = outs[j], ins[j + 1]
        normed = torch.nn.functional.layer_norm(out, out.shape[-1:], eps=1e-6)
        assert torch.allclose(inp[:, 0], normed[:, 0], atol=1e-6)  # CLS: normed, no noise
        alpha = torch.softmax(heads.heads[j](out[:, 1:])[..., 0], dim=1)
        eps = (inp[:, 1:] - normed[:, 1:]) / (0.02 * (1 - alpha)[..., None])
        assert eps.std().item() == pytest.approx(1.0, rel=0.05)
        assert abs(eps.mean().item()) < 0.03


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
    assert {f"1.heads.{j}.weight" for j in range(5)} <= changed
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
    pre, plan = tnt_plan(64, keep, 3, s)
    total = 64 * d * 4 * 4 * 3 + d * m.num_classes
    if pre:
        total += 32 * 32 * d                                     # similarity before block 1
    t, j = P + 64 - pre, 0
    for i in range(len(m.blocks)):
        total += 4 * t * d * d + 2 * t * d * hid + 2 * t * t * d
        if i + 1 in (3, 4, 5):
            cand, k = plan[j]
            n = t - P
            if k < n:
                total += n * d                                   # relevance head
                if cand > k:
                    total += (cand // 2) * (cand - cand // 2) * d  # A·Bᵀ similarities
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


# ---- golden: the authors' own forward (tests/golden/make_golden.py tnt) ----------------------

@pytest.mark.parametrize("name", ["tnt_single", "tnt_multi"])
def test_matches_authors_tnt_golden(name):
    """Logits and per-block token counts of mx-ethan-rao/tnt d095619 (models.py
    VisionTransformerWithTNT, main.py's --eval settings of its README: --pru_loc 2
    --keep_rate 0.6 --sim_pru 25, and --pru_loc 2,3,4 --keep_rate 0.8,0.8,0.8 --sim_pru 40)
    on a seeded 6-block ViT with 196 patches, recorded by tests/golden/make_golden.py; their
    global RNG seeded as our generator, so the random split is the same. Also the training
    forward (alpha_norm + 0.02 noise after blocks 1-5) with the same noise draws."""
    from golden.common import count_tokens, images as g_images, load, seeded_

    g = load(name)
    cfg = dict(g["model"])
    m = seeded_(VisionTransformer(**cfg).eval(), g["seed"])
    heads = TNTHeads(cfg["embed_dim"], g["layers"], noise_blocks=5)
    seeded_(heads.heads, g["heads_seed"])
    x = g_images(g["image_seed"], g["batch"], cfg["img_size"])
    counts, remove = count_tokens(m.blocks)
    with torch.no_grad():
        ours = tnt_forward(m, heads, x, g["keep"], g["s"],
                           generator=torch.Generator().manual_seed(g["split_seed"]))
        remove()
        train = tnt_forward(m, heads, x, g["keep"], g["s"], training=True,
                            generator=torch.Generator().manual_seed(g["noise_seed"]))
    assert counts == g["counts"]
    assert torch.allclose(ours, torch.tensor(g["logits"]), atol=1e-4, rtol=0)
    assert torch.allclose(train, torch.tensor(g["train_logits"]), atol=1e-4, rtol=0)

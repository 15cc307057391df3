"""forward_dense (dynavit.trainer.methods.dense): every method's [B, Gh, Gw, D] patch map, against
timm's dense forward_features and hand-written references of each fill rule."""

import pytest
import torch

from dynavit.trainer.methods.dense import forward_dense
from dynavit.trainer.methods.dynamicvit import DynamicViTHeads, dynamicvit_keep_counts
from dynavit.trainer.methods.learned import topk_sorted
from dynavit.trainer.methods.sparse import sparse_forward_features
from dynavit.trainer.methods.svit import SViTSelectors, svit_forward
from dynavit.trainer.methods.tome import tome_forward_features
from tiny_vits import KW, one_thread, tiny_vit  # noqa: F401,E402 (one_thread: autouse, one intra-op thread)
from tiny_vits import images as shared_images  # noqa: E402
from tiny_vits import randomize  # noqa: E402

N, G = 64, 8


def tiny(depth=4, **kw):
    return tiny_vit(depth, **kw)


def images(b=2):
    return shared_images(b)


def dense_patches(m, x):
    return m.forward_features(x)[:, m.num_prefix_tokens:].reshape(x.shape[0], G, G, -1)


def test_dynavit_k100_equals_timm_patch_tokens_bitwise():
    m, x = tiny(), images()
    with torch.no_grad():
        want = dense_patches(m, x)
        assert torch.equal(forward_dense(m, x, "dynavit", keep_idx=torch.arange(N).expand(2, N)), want)
        assert torch.equal(forward_dense(m, x, "dynavit"), want)
    assert forward_dense(m, x).shape == (2, G, G, 32)


def test_dynavit_pruned_positions_hold_their_preserved_embedding_or_zero():
    m, x = tiny(), images()
    keep = torch.stack([torch.arange(0, N, 2), torch.arange(1, N, 2)])  # K=50, per image
    with torch.no_grad():
        got = forward_dense(m, x, "dynavit", keep_idx=keep).reshape(2, N, -1)
        zero = forward_dense(m, x, "dynavit", keep_idx=keep, preserve=False).reshape(2, N, -1)
        kept = sparse_forward_features(m, x, keep)[:, 1:]           # the encoder's outputs
        emb = m.norm(m._pos_embed(m.patch_embed(x)))[:, 1:]         # embedding + position
    for b in range(2):
        dropped = torch.tensor([i for i in range(N) if i not in keep[b]])
        torch.testing.assert_close(got[b, keep[b]], kept[b], rtol=0, atol=1e-6)
        assert torch.equal(got[b, dropped], emb[b, dropped])
        assert torch.equal(zero[b, keep[b]], got[b, keep[b]])
        assert not zero[b, dropped].any()


def test_svit_preserved_tokens_are_its_own_features():
    m, x = tiny(), images()
    heads = randomize(SViTSelectors.for_model(m))
    with torch.no_grad():
        want = svit_forward(m, heads, x, features=True)[:, 1:].reshape(2, G, G, -1)
        assert torch.equal(forward_dense(m, x, "svit", heads=heads), want)
    m.train()
    grid, aux = forward_dense(m, x, "svit", heads=heads, training=True)
    assert grid.shape == (2, G, G, 32) and len(aux["decisions"]) == 3


def test_tome_unmerges_to_sources():
    m, x = tiny(), images()
    with torch.no_grad():
        assert torch.equal(forward_dense(m, x, "tome", 0), dense_patches(m, x))
        got = forward_dense(m, x, "tome", 8).reshape(2, N, -1)
        out, _, source = tome_forward_features(m, x, 8, trace_source=True, return_state=True)
    want = torch.einsum("bti,btd->bid", source.double(), out.double())[:, 1:]  # Σ over owners
    assert torch.equal(got.double(), want)
    assert source.sum(1).eq(1).all()  # each input in exactly one output token
    # positions merged into one token share its value: as many distinct rows as tokens left
    assert len(torch.unique(got[0], dim=0)) == out.shape[1] - 1


def ref_dynamicvit_dense(m, heads, x, rho):
    """DynamicViT's inference loop with the kept positions followed by hand."""
    t = m._pos_embed(m.patch_embed(x))
    pos = torch.arange(N).expand(x.shape[0], N)
    last = t[:, 1:].clone()
    counts = dynamicvit_keep_counts(N, rho, len(heads.layers))
    stage = {layer - 1: s for s, layer in enumerate(heads.layers)}
    for i, blk in enumerate(m.blocks):
        t = blk(t)
        for b in range(x.shape[0]):
            last[b, pos[b]] = t[b, 1:]
        if i in stage and counts[stage[i]] < pos.shape[1]:
            idx = topk_sorted(heads.predictors[stage[i]](t[:, 1:])[..., 0], counts[stage[i]])
            t = torch.cat([t[:, :1], torch.stack([t[b, 1:][idx[b]] for b in range(len(t))])], 1)
            pos = pos.gather(1, idx)
    return m.norm(last).reshape(x.shape[0], G, G, -1)


def test_dynamicvit_pruned_positions_keep_their_last_value():
    m, x = tiny(), images()
    heads = randomize(DynamicViTHeads.for_model(m))
    with torch.no_grad():
        assert torch.equal(forward_dense(m, x, "dynamicvit", 1.0, heads), dense_patches(m, x))
        got = forward_dense(m, x, "dynamicvit", 0.5, heads)
        assert torch.equal(got, ref_dynamicvit_dense(m, heads, x, 0.5))


def final_tokens(m, run):
    """The normed tokens a forward ends with (captured at the model's final norm)."""
    seen = []
    h = m.norm.register_forward_hook(lambda mod, a, o: seen.append(o))
    run()
    h.remove()
    return seen[-1]


def assert_each_final_token_sits_once(final, grid):
    flat = grid.reshape(grid.shape[0], N, -1)
    for b in range(flat.shape[0]):
        assert (final[b][:, None] == flat[b][None]).all(-1).sum(1).eq(1).all()


def test_evit_tnt_cropr_keep_all_equal_dense_and_pruned_maps_hold_final_tokens():
    from dynavit.trainer.methods.cropr import CroprRouters, cropr_forward
    from dynavit.trainer.methods.evit import evit_forward_features
    from dynavit.trainer.methods.tnt import TNTHeads, tnt_forward

    m, x = tiny(depth=6), images()
    with torch.no_grad():
        dense = dense_patches(m, x)
        assert torch.equal(forward_dense(m, x, "evit", 1.0), dense)
        got = forward_dense(m, x, "evit", 0.5)
        final = evit_forward_features(m, x, 0.5)[:, 1:-1]  # the fused token has no position
        assert_each_final_token_sits_once(final, got)
        tnt = randomize(TNTHeads.for_model(m))
        torch.manual_seed(3)  # TNT's random split draws from the global generator
        got = forward_dense(m, x, "tnt", 0.6, tnt)
        torch.manual_seed(3)
        assert_each_final_token_sits_once(
            final_tokens(m, lambda: tnt_forward(m, tnt, x, 0.6))[:, 1:], got)
        cropr = randomize(CroprRouters.for_model(m, num_classes=5))
        assert torch.equal(forward_dense(m, x, "cropr", 0, cropr), dense)
        got = forward_dense(m, x, "cropr", 8, cropr)
        assert_each_final_token_sits_once(
            final_tokens(m, lambda: cropr_forward(m, cropr, x, 8))[:, 1:], got)
        assert not torch.equal(got, dense)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        forward_dense(tiny(), images(), "nope")

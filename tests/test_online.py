"""Online Dyna-ViT (issue 12): torch scorers vs the Numba kernels and scipy, torch top-K vs
select_topk, DynaViT vs sparse_forward / timm's dense forward, state_dict round trips,
torch.export and torch.compile."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

from dynavit.pipeline.saliency import score_patches  # noqa: E402
from dynavit.pipeline.topk import k_count as pipeline_k_count  # noqa: E402
from dynavit.pipeline.topk import select_topk  # noqa: E402
from dynavit.trainer.infer.online import DynaViT  # noqa: E402
from dynavit.trainer.infer.scoring import (IMAGENET_MEAN, IMAGENET_STD, keep_count, score,  # noqa: E402
                                     to_pixels, topk_indices)
from dynavit.trainer.methods.sparse import sparse_forward  # noqa: E402

PATCHES = (8, 14, 16, 32)
KINDS = ("random", "smooth", "constant", "bright_pixel")


def make_images(kind: str, patch: int, b: int = 2, gh: int = 3, gw: int = 2, seed: int = 0) -> np.ndarray:
    """uint8 [B,H,W,3]."""
    rng = np.random.default_rng(seed + patch)
    h, w = gh * patch, gw * patch
    if kind == "random":
        return rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    if kind == "smooth":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        img = np.stack([127 + 100 * np.sin(xx / 7.0 + c) * np.cos(yy / 11.0 - c) for c in range(3)], -1)
        img = np.stack([img + 10 * i for i in range(b)])
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if kind == "constant":
        img = np.empty((b, h, w, 3), np.uint8)
        img[...] = np.array([[13, 200, 77]], np.uint8)
        img[1:] = 255
        return img
    if kind == "bright_pixel":
        img = np.zeros((b, h, w, 3), np.uint8)
        img[0, h // 2, w // 2] = 255            # inside
        img[1, 0, w - 1] = (255, 10, 200)       # on the corner: exercises the reflected border
        return img
    raise ValueError(kind)


def to_torch(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous()


def normalize(u8: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    x = to_torch(u8).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def assert_rel(a: np.ndarray, b: np.ndarray, rel: float = 1e-5) -> None:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b)
    bad = err > rel * np.abs(b)  # zero only where both are exactly equal
    assert not bad.any(), f"max rel err {np.max(err / np.maximum(np.abs(b), 1e-300))} at {np.argwhere(bad)[:3]}"


# ---------------------------------------------------------------------------------------------
# scorers

@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("kind", KINDS)
def test_scores_match_numba(kind, patch):
    u8 = make_images(kind, patch)
    t = to_torch(u8)
    for scorer in ("l2", "sobel"):
        ref = score_patches(u8, patch, scorer)
        got = score(t, patch, scorer).numpy()
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert_rel(got, ref)
        assert_rel(score(t.float(), patch, scorer).numpy(), ref)  # float 0..255 input
    ref = score_patches(u8, patch, "entropy")
    assert np.array_equal(score(t, patch, "entropy").numpy(), ref)
    assert np.array_equal(score(t.float(), patch, "entropy").numpy(), ref)
    # contrast: the same exact integer sums and float steps as the kernel, bit for bit;
    # distinct: only the image's mean contrast is summed in another order
    for scorer in ("contrast", "distinct"):
        ref = score_patches(u8, patch, scorer)
        got = score(t, patch, scorer).numpy()
        assert got.dtype == np.float32 and got.shape == ref.shape
        if scorer == "contrast":
            assert np.array_equal(got, ref)
        assert_rel(got, ref, 1e-6)
        assert_rel(score(t.float(), patch, scorer).numpy(), ref, 1e-6)
    if kind == "constant":
        # sobel is exactly 0; entropy is 0 up to the kernel's float64 log2(n) - n·log2(n)/n
        # (8.9e-16 for n=196, reproduced bit for bit above)
        assert not score(t, patch, "sobel").any() and score(t, patch, "entropy").max() < 1e-12


def test_l2_custom_mean_std_matches_numba():
    u8 = make_images("random", 16)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
    assert_rel(score(to_torch(u8), 16, "l2", mean, std).numpy(), score_patches(u8, 16, "l2", mean, std))


@pytest.mark.parametrize("patch", (8, 14))
def test_scores_match_float64_references(patch):
    """Independent references: scipy.ndimage.sobel (mode='reflect') and numpy histograms."""
    ndimage = pytest.importorskip("scipy.ndimage")
    u8 = make_images("smooth", patch, seed=3) ^ make_images("random", patch, seed=3) // 8
    b, h, w, _ = u8.shape
    gh, gw = h // patch, w // patch
    f = u8.astype(np.float64)
    y = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    ref_sobel = np.empty((b, gh, gw))
    ref_ent = np.empty((b, gh, gw))
    ref_l2 = np.empty((b, gh, gw))
    z = (f / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    i64 = u8.astype(np.int64)
    yi = (299 * i64[..., 0] + 587 * i64[..., 1] + 114 * i64[..., 2] + 500) // 1000
    for i in range(b):
        mag = np.hypot(ndimage.sobel(y[i], axis=1, mode="reflect"), ndimage.sobel(y[i], axis=0, mode="reflect"))
        for r in range(gh):
            for c in range(gw):
                sl = (slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch))
                ref_sobel[i, r, c] = mag[sl].mean()
                ref_l2[i, r, c] = np.sqrt((z[i][sl] ** 2).sum())
                cnt = np.bincount(yi[i][sl].ravel(), minlength=256)
                p = cnt[cnt > 0] / cnt.sum()
                ref_ent[i, r, c] = -(p * np.log2(p)).sum()
    t = to_torch(u8)
    assert_rel(score(t, patch, "sobel").numpy(), ref_sobel)
    assert_rel(score(t, patch, "l2").numpy(), ref_l2)
    np.testing.assert_allclose(score(t, patch, "entropy").numpy(), ref_ent, rtol=1e-6, atol=1e-6)


def test_scorer_argument_errors():
    t = to_torch(make_images("random", 8))
    with pytest.raises(ValueError, match="unknown scorer"):
        score(t, 8, "fft")
    with pytest.raises(ValueError, match="multiple of patch"):
        score(t, 7, "l2")
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        score(t.permute(0, 2, 3, 1), 8, "sobel")  # [B,H,W,3] is not accepted


def test_to_pixels_recovers_uint8_exactly():
    u8 = make_images("random", 16, b=4)
    assert torch.equal(to_pixels(normalize(u8)), to_torch(u8).float())


# ---------------------------------------------------------------------------------------------
# top-K

def test_k_rule_matches_pipeline():
    for n in (1, 3, 16, 49, 196, 197, 256, 576):
        for k in range(1, 101):
            assert keep_count(k, n) == pipeline_k_count(k, n)


@pytest.mark.parametrize("k", (100, 70, 50, 25, 1))
def test_topk_matches_select_topk_exactly(k):
    rng = np.random.default_rng(k)
    cases = [rng.random((5, 14, 14)).astype(np.float32),                   # distinct
             rng.integers(0, 4, (5, 14, 14)).astype(np.float32),            # many exact ties
             np.zeros((2, 4, 4), np.float32)]                               # all tied
    nan = rng.random((3, 7, 7)).astype(np.float32)
    nan[:, 1, 2] = np.nan
    nan[0, 0, 0] = np.nan
    cases.append(nan)
    for s in cases:
        got = topk_indices(torch.from_numpy(s), k)
        assert got.dtype == torch.int64
        assert np.array_equal(got.numpy(), select_topk(s, k).astype(np.int64))


def test_topk_round_to():
    rng = np.random.default_rng(0)
    s = torch.from_numpy(rng.random((3, 196)).astype(np.float32))
    for k in (70, 50, 25, 10):
        plain = topk_indices(s, k)
        r = topk_indices(s, k, round_to=8, num_prefix=1)
        assert (r.shape[1] + 1) % 8 == 0 and r.shape[1] >= plain.shape[1]
        assert r.shape[1] - plain.shape[1] < 8
        for a, b in zip(plain.tolist(), r.tolist()):
            assert set(a) <= set(b)  # same ranking: superset
    assert keep_count(100, 196, 8, 1) == 196          # capped at N
    assert keep_count(50, 196, 8, 5) == 99            # 5 + 99 = 104
    assert keep_count(50, 196, 1, 1) == keep_count(50, 196)


def test_online_selection_vs_numba_selection():
    """Indices from torch scores vs select_topk of the Numba scores: identical except where two
    scores tie within float error at the K boundary; count those."""
    u8 = np.concatenate([make_images("smooth", 16, b=4, gh=14, gw=14, seed=1),
                         make_images("random", 16, b=4, gh=14, gw=14, seed=2) // 3 + 60])
    t = to_torch(u8)
    boundary_ties = 0
    for scorer in ("l2", "sobel", "entropy", "contrast", "distinct"):
        ref_scores = score_patches(u8, 16, scorer).reshape(len(u8), -1)
        got_scores = score(t, 16, scorer).reshape(len(u8), -1)
        for k in (70, 50, 25):
            ref = select_topk(ref_scores, k).astype(np.int64)
            got = topk_indices(got_scores, k).numpy()
            for i in range(len(u8)):
                if np.array_equal(ref[i], got[i]):
                    continue
                assert scorer not in ("entropy", "contrast"), f"{scorer} scores are exact, so must the selection be"
                diff = np.setxor1d(ref[i], got[i])
                kth = np.sort(ref_scores[i])[::-1][ref.shape[1] - 1]
                assert np.all(np.abs(ref_scores[i][diff] - kth) <= 1e-5 * abs(kth)), "not a near-tie"
                boundary_ties += 1
    assert boundary_ties <= 2


# ---------------------------------------------------------------------------------------------
# DynaViT

def tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(pretrained=False, depth=2, img_size=64, num_classes=7)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


VARIANTS = {
    "cls": {},
    "reg4_avg": dict(reg_tokens=4, global_pool="avg"),
    "no_cls_avg": dict(class_token=False, global_pool="avg"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scorer", ("l2", "sobel", "entropy", "contrast", "distinct"))
def test_dynavit_equals_sparse_forward_and_dense(variant, scorer):
    vit = tiny_vit(**VARIANTS[variant])
    u8 = make_images("smooth", 16, b=3, gh=4, gw=4, seed=5)
    u8[1] = make_images("random", 16, b=1, gh=4, gw=4)[0]
    x = normalize(u8)
    with torch.no_grad():
        for k in (70, 25):
            d = DynaViT(vit, k=k, scorer=scorer).eval()
            idx = d.keep_indices(x)
            ref_idx = select_topk(score_patches(u8, 16, scorer), k).astype(np.int64)
            if scorer in ("entropy", "contrast"):  # exact scores from the un-normalized input
                assert np.array_equal(idx.numpy(), ref_idx)
            else:
                assert (idx.numpy() != ref_idx).any(axis=1).sum() <= 1
            out = d(x)
            assert torch.equal(out, sparse_forward(vit, x, idx))
            ref = sparse_forward(vit, x, torch.from_numpy(ref_idx))
            if np.array_equal(idx.numpy(), ref_idx):
                assert torch.equal(out, ref)
            assert torch.equal(d(x, keep_idx=torch.from_numpy(ref_idx)), ref)
            assert not torch.allclose(out, vit(x))  # pruning changes the logits
        d100 = DynaViT(vit, k=100, scorer=scorer)
        assert torch.equal(d100(x), vit(x))
        # round_to: S is a multiple of 8 and the logits are sparse_forward's on the larger set
        d8 = DynaViT(vit, k=50, scorer=scorer, round_to=8)
        assert d8.seq_len % 8 == 0 or d8.keep == d8.n
        assert torch.equal(d8(x), sparse_forward(vit, x, d8.keep_indices(x)))


def test_dynavit_state_dict_is_plain_timm():
    vit = tiny_vit()
    d = DynaViT(vit, k=50, scorer="sobel", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert list(d.parameters()) == list(vit.parameters())  # no parameters of its own
    sd = d.state_dict()
    assert list(sd) == list(vit.state_dict())
    plain = tiny_vit()
    torch.manual_seed(1)
    for p in plain.parameters():
        nn.init.normal_(p)
    plain.load_state_dict(sd, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), sd.values()))
    # and back: a plain timm state_dict loads into a DynaViT with strict=True
    other = DynaViT(tiny_vit(num_classes=7), k=50)
    for p in other.parameters():
        nn.init.zeros_(p)
    other.load_state_dict(plain.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(other.vit.state_dict().values(), sd.values()))
    # strictness still works: a missing key is reported under its plain name
    bad = dict(sd)
    bad.pop("head.bias")
    with pytest.raises(RuntimeError, match=r"head\.bias"):
        other.load_state_dict(bad, strict=True)
    # nested inside another module: the container's prefix is kept, 'vit.' is not added
    seq = nn.Sequential(nn.Identity(), d)
    keys = list(seq.state_dict())
    assert keys == [f"1.{k}" for k in vit.state_dict()]
    seq2 = nn.Sequential(nn.Identity(), DynaViT(tiny_vit(), k=50))
    seq2.load_state_dict(seq.state_dict(), strict=True)
    assert torch.equal(seq2[1].vit.pos_embed, vit.pos_embed)


def test_dynavit_refuses_bad_arguments():
    vit = tiny_vit()
    with pytest.raises(ValueError, match="scorer"):
        DynaViT(vit, scorer="fft")
    with pytest.raises(ValueError, match="K"):
        DynaViT(vit, k=0)
    with pytest.raises(ValueError, match="round_to"):
        DynaViT(vit, k=50, round_to=0)
    with pytest.raises(TypeError):
        DynaViT(nn.Linear(3, 3))
    d = DynaViT(vit, k=50)
    with pytest.raises(ValueError, match="strictly increasing"):
        d(normalize(make_images("random", 16, b=1, gh=4, gw=4)), keep_idx=torch.tensor([[3, 1, 2]]))


def test_export_gives_same_logits():
    vit = tiny_vit()
    x = normalize(make_images("smooth", 16, b=2, gh=4, gw=4, seed=7))
    x2 = normalize(make_images("random", 16, b=2, gh=4, gw=4, seed=8))
    for scorer in ("l2", "sobel", "entropy"):
        d = DynaViT(vit, k=50, scorer=scorer).eval()
        ep = torch.export.export(d, (x,))
        with torch.no_grad():
            for inp in (x, x2):  # a different input: the selection is not baked in
                torch.testing.assert_close(ep.module()(inp), d(inp), rtol=1e-5, atol=1e-6)
                assert torch.equal(ep.module()(inp).argmax(-1), d(inp).argmax(-1))


def test_compile_fullgraph_traces():
    """Dynamo captures the whole online forward as one graph (no graph breaks)."""
    vit = tiny_vit()
    x = normalize(make_images("smooth", 16, b=2, gh=4, gw=4, seed=7))
    x2 = normalize(make_images("random", 16, b=2, gh=4, gw=4, seed=8))
    for scorer in ("entropy",):  # scatter_add histogram + the 64-step sum: the trickiest to trace
        d = DynaViT(vit, k=50, scorer=scorer).eval()
        c = torch.compile(d, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            assert torch.equal(c(x), d(x))
            assert torch.equal(c(x2), d(x2))


@pytest.mark.slow
def test_compile_inductor_same_logits():
    """Default backend (inductor: generated C++ on CPU). Takes ~30 s on 2 cores."""
    vit = tiny_vit()
    x = normalize(make_images("smooth", 16, b=2, gh=4, gw=4, seed=7))
    x2 = normalize(make_images("random", 16, b=2, gh=4, gw=4, seed=8))
    d = DynaViT(vit, k=50, scorer="entropy").eval()
    c = torch.compile(d, fullgraph=True)
    with torch.no_grad():
        for inp in (x, x2):
            torch.testing.assert_close(c(inp), d(inp), rtol=1e-4, atol=1e-5)
            assert torch.equal(c(inp).argmax(-1), d(inp).argmax(-1))


def test_dtype_casts_keep_exact_constants():
    """model.to(dtype) casts the ViT but not DynaViT's mean/std/c·log2(c) constants, so the
    pixels (and the entropy selection) are still recovered exactly."""
    u8 = make_images("smooth", 16, b=2, gh=4, gw=4, seed=9)
    d = DynaViT(tiny_vit(), k=50, scorer="entropy").to(torch.float64)
    assert d.vit.pos_embed.dtype == torch.float64
    assert d.mean.dtype == torch.float32 and d.clog.dtype == torch.float64
    assert "mean" not in d.state_dict() and "clog" not in d.state_dict()
    x = normalize(u8).double()
    ref = select_topk(score_patches(u8, 16, "entropy"), 50).astype(np.int64)
    assert np.array_equal(d.keep_indices(x).numpy(), ref)
    with torch.no_grad():
        assert torch.equal(d(x), sparse_forward(d.vit, x, torch.from_numpy(ref)))

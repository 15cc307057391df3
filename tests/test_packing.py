"""Sequence packing (trainer/methods/packing.py): a packed forward equals the per-sample
sparse forwards, and its MACs, counted by our counter, equal the closed form."""
from __future__ import annotations

import pytest
import timm
import torch

from dynavit.trainer.methods.macs import count
from dynavit.trainer.methods.packing import pack, packed_forward, packed_macs, pad_keep
from dynavit.trainer.methods.sparse import sparse_forward


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


def random_keeps(counts, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.sort(torch.randperm(n, generator=g)[:k]).values for k in counts]


@pytest.mark.parametrize("kw", [{}, dict(global_pool="avg", reg_tokens=2), dict(no_embed_class=True, global_pool="max"),
                                dict(class_token=False, global_pool="avg")])
@pytest.mark.parametrize("budget", [None, 20])
def test_packed_equals_per_sample_forwards(kw, budget):
    m = tiny(**kw)
    counts = [3, 16, 1, 9, 5, 12]
    keeps = random_keeps(counts)
    images = torch.randn(len(counts), 3, 16, 16)
    keep_idx, c = pad_keep(keeps, fill=7)  # padding values must not matter
    with torch.no_grad():
        got = packed_forward(m, images, keep_idx, c, budget)
        want = torch.cat([sparse_forward(m, images[i:i + 1], k[None]) for i, k in enumerate(keeps)])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_packed_gradients_match():
    m = tiny()
    keeps = random_keeps([4, 10, 2])
    images = torch.randn(3, 3, 16, 16)
    keep_idx, c = pad_keep(keeps)
    packed_forward(m, images, keep_idx, c, 16).square().sum().backward()
    g1 = m.blocks[0].attn.qkv.weight.grad.clone()
    m.zero_grad()
    sum(sparse_forward(m, images[i:i + 1], k[None]).square().sum() for i, k in enumerate(keeps)).backward()
    torch.testing.assert_close(g1, m.blocks[0].attn.qkv.weight.grad, atol=1e-5, rtol=1e-4)
    m.zero_grad()
    m.set_grad_checkpointing(True)
    packed_forward(m, images, keep_idx, c, 16).square().sum().backward()
    torch.testing.assert_close(g1, m.blocks[0].attn.qkv.weight.grad, atol=1e-6, rtol=1e-5)


def test_first_fit_layout():
    p = pack([5, 8, 3, 6, 2], 10)
    assert p.row == (0, 1, 0, 2, 0) and p.start == (0, 0, 5, 0, 8) and p.rows == 3
    with pytest.raises(ValueError, match="does not fit"):
        pack([11], 10)


def test_packed_macs_counted_equal_closed_form():
    m = tiny(reg_tokens=1)
    counts = [3, 16, 1, 9, 5]
    keep_idx, c = pad_keep(random_keeps(counts))
    images = torch.zeros(len(counts), 3, 16, 16)
    for budget in (None, 20):
        mc = count(lambda: packed_forward(m, images, keep_idx, c, budget))
        want = packed_macs(m, counts, budget)
        assert (mc.total, mc.attention) == (want["total"], want["attention"])
    # 'useful' (sample_macs) is the sum of the per-sample sparse forwards, counted
    keeps = random_keeps(counts)
    each = sum(count(lambda k=k: sparse_forward(m, images[:1], k[None])).total for k in keeps)
    assert packed_macs(m, counts)["useful"] == each
    # one sample per row with its own length is the per-sample cost
    one = count(lambda: sparse_forward(m, images[:1], keep_idx[:1, :3]))
    assert packed_macs(m, [3], budget=2 + 3)["total"] == one.total == packed_macs(m, [3])["useful"]


def test_bad_counts_are_errors():
    m = tiny()
    keep_idx, c = pad_keep(random_keeps([3, 4]))
    with pytest.raises(ValueError, match="kept counts"):
        packed_forward(m, torch.zeros(2, 3, 16, 16), keep_idx, torch.tensor([0, 4]))

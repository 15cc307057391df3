"""What the method tests share: tiny seeded timm ViTs on 32-px images, a seeded input batch,
seeded random weights for a method's heads, and one intra-op thread per module (tiny
tensors on 2 shared cores: a second thread only adds spin-waits, ~8x slower)."""
from __future__ import annotations

import pytest
import timm
import torch

KW = dict(img_size=32, patch_size=4, embed_dim=32, num_heads=2, num_classes=5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Imported by a test module, it runs that module on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vit(depth: int, **kw):
    """An unmodified timm ViT of `depth` blocks, 8x8 patches of 4 px (KW, overridable), seed 0."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth, **{**KW, **kw}).eval()


def images(b: int) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def randomize(heads, scale: float = 0.5):
    """Seeded random weights for a method's heads: a fresh init gives near-tied scores, and
    a spread makes the ranking well defined."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return heads

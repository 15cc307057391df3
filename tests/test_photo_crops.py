"""photo_crops (make compare-demo's real data): a class-sorted ImageFolder of real photo crops."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")

from dynavit.pipeline.photo_data import PHOTOS, photo_crops  # noqa: E402


def test_photo_crops_is_a_class_sorted_folder_of_crops_of_its_photo(tmp_path):
    import skimage.data

    info = photo_crops(tmp_path / "a", 20, 10, size=32, classes=PHOTOS[:5], seed=3)
    for split, n in (("train", 20), ("val", 10)):
        dirs = sorted(p.name for p in (tmp_path / "a" / split).iterdir())
        assert dirs == sorted(PHOTOS[:5])
        assert all(len(list((tmp_path / "a" / split / c).glob("*.png"))) == n // 5 for c in dirs)
    assert info["counts"][("val", "coins")] == 2
    # an image's mean colour is within the range of its photo's values; same seed, same bytes
    for c in PHOTOS[:5]:
        photo = np.asarray(getattr(skimage.data, c)(), np.float64)
        for p in (tmp_path / "a" / "train" / c).glob("*.png"):
            a = np.asarray(Image.open(p), np.float64)
            assert a.shape == (32, 32, 3) and photo.min() <= a.mean() <= photo.max() and a.std() > 0
    photo_crops(tmp_path / "b", 20, 10, size=32, classes=PHOTOS[:5], seed=3)
    photo_crops(tmp_path / "c", 20, 10, size=32, classes=PHOTOS[:5], seed=4)
    first = sorted((tmp_path / "a").rglob("*.png"))
    assert all(p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes() for p in first)
    assert any(p.read_bytes() != (tmp_path / "c" / p.relative_to(tmp_path / "a")).read_bytes() for p in first)

import numpy as np
import pytest

from dynavit.pipeline.topk import index_dtype, k_count, select_topk, select_topk_multi, seq_len


def brute_topk(row, k):
    """Reference: python sort by (-score, index), keep k, return ascending."""
    order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))
    return sorted(order[:k])


def test_k_count_rule():
    assert k_count(70, 196) == 137          # floor(137.2)
    assert k_count(50, 196) == 98
    assert k_count(25, 196) == 49
    assert k_count(100, 196) == 196
    assert k_count(1, 196) == 1             # floor(1.96)
    assert k_count(1, 64) == 1              # floor(0.64) = 0 -> 1
    assert k_count(1, 1) == 1
    assert k_count(33, 300) == 99           # exact integers, no float rounding
    assert k_count(29, 100) == 29           # 29*100/100 in floats is 28.999999999999996
    assert seq_len(70, 196) == 138
    assert seq_len(1, 64) == 2


def test_index_dtype_rule():
    assert index_dtype(196) == np.uint8
    assert index_dtype(256) == np.uint8
    assert index_dtype(257) == np.uint16
    assert index_dtype(1024) == np.uint16
    with pytest.raises(ValueError, match="65537"):
        index_dtype(65537)


@pytest.mark.parametrize("bad", [0, 101, 50.5, True, "50", None, -3])
def test_bad_k(bad):
    scores = np.zeros((1, 14, 14), np.float32)
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        select_topk(scores, bad)
    with pytest.raises(ValueError):
        k_count(bad, 196)
    with pytest.raises(ValueError):
        select_topk_multi(scores, [50, bad])


def test_all_equal_scores_take_first_indices():
    scores = np.ones((3, 14, 14), np.float32)
    idx = select_topk(scores, 50)
    assert idx.shape == (3, 98) and idx.dtype == np.uint8
    np.testing.assert_array_equal(idx, np.tile(np.arange(98), (3, 1)))


def test_k1_and_k100():
    rng = np.random.default_rng(0)
    scores = rng.random((4, 14, 14)).astype(np.float32)
    one = select_topk(scores, 1)
    assert one.shape == (4, 1)
    np.testing.assert_array_equal(one[:, 0], scores.reshape(4, -1).argmax(axis=1))
    full = select_topk(scores, 100)
    np.testing.assert_array_equal(full, np.tile(np.arange(196), (4, 1)))


def test_small_grid_k_below_one_patch():
    scores = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_array_equal(select_topk(scores, 5), [[15]])   # 5*16/100 = 0.8 -> 1


@pytest.mark.parametrize("shape,dtype", [((2, 14, 14), np.uint8), ((2, 16, 16), np.uint8),
                                         ((2, 32, 32), np.uint16), ((2, 1024), np.uint16)])
def test_dtype_and_strictly_increasing(shape, dtype):
    rng = np.random.default_rng(1)
    scores = rng.standard_normal(shape).astype(np.float32)
    n = int(np.prod(shape[1:]))
    for k in (1, 25, 50, 70, 100):
        idx = select_topk(scores, k)
        assert idx.dtype == dtype
        assert idx.shape == (2, k_count(k, n))
        assert np.all(np.diff(idx.astype(np.int64), axis=1) > 0)
        assert idx.max() < n


def test_brute_force_with_many_ties():
    rng = np.random.default_rng(2)
    for trial in range(40):
        gh, gw = rng.integers(1, 9, size=2)
        scores = rng.integers(0, 3, size=(3, gh, gw)).astype(np.float32)
        for k in (1, 10, 25, 33, 50, 70, 99, 100):
            idx = select_topk(scores, k)
            for b in range(3):
                assert idx[b].tolist() == brute_topk(scores[b].ravel(), k_count(k, gh * gw))


def test_integer_and_float16_scores():
    s = np.array([[3, 0, 2, 2, 1]], np.uint8)   # unsigned: must not wrap when negated
    np.testing.assert_array_equal(select_topk(s, 40), [[0, 2]])
    np.testing.assert_array_equal(select_topk(s.astype(np.float16), 60), [[0, 2, 3]])


def test_multi_nested_and_equal_to_single():
    rng = np.random.default_rng(3)
    scores = rng.random((8, 32, 32)).astype(np.float32)
    scores[:, :4] = 0.5                          # some ties too
    multi = select_topk_multi(scores, [70, 25, 50])
    assert sorted(multi) == [25, 50, 70]
    for k, idx in multi.items():
        np.testing.assert_array_equal(idx, select_topk(scores, k))
        assert idx.dtype == np.uint16
    for b in range(8):
        s25, s50, s70 = (set(multi[k][b].tolist()) for k in (25, 50, 70))
        assert s25 <= s50 <= s70


def test_nan_ranks_lowest():
    s = np.array([[np.nan, 1.0, -np.inf, np.nan, 0.0]])
    np.testing.assert_array_equal(select_topk(s, 40), [[1, 4]])
    np.testing.assert_array_equal(select_topk(s, 60), [[1, 2, 4]])
    np.testing.assert_array_equal(select_topk(s, 80), [[0, 1, 2, 4]])   # lower-index NaN first


def test_bad_scores_shape():
    with pytest.raises(ValueError, match=r"\(5,\)"):
        select_topk(np.zeros(5), 50)

"""The vector index layer against brute-force numpy references."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxmem.index import ann
from ctxmem.index.testing import synthetic_vectors


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng, n, d, c=16):
    return synthetic_vectors(n, d, seed=int(rng.integers(2**31)), clusters=c, rank=min(8, d))


def brute_topk(x, ids, q, k):
    s = q @ x.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), ids[order]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), d=st.integers(2, 48), k=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_flat_returns_exact_topk(n, d, k, seed):
    rng = np.random.default_rng(seed)
    x, q = unit(rng, n, d), unit(rng, 5, d)
    ids = rng.choice(10 * n + 10, n, replace=False).astype(np.int64)
    index = ann.create("flat", x, ids, ann.default_params("flat", n, d))
    D, I = ann.Searcher(index, "flat").search(q, k)
    Dr, Ir = brute_topk(x, ids, q, min(k, n))
    np.testing.assert_allclose(D, Dr, rtol=0, atol=1e-5)
    for r in range(len(q)):
        # ids agree wherever the score is not tied with a neighbour
        for j in range(min(k, n)):
            if np.sum(np.abs(Dr[r] - Dr[r, j]) < 1e-5) == 1:
                assert I[r, j] == Ir[r, j]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_roundtrip_and_add_then_remove_restores_results(kind):
    rng = np.random.default_rng(1)
    d = 32
    x = clustered(rng, 3000, d)
    ids = np.arange(3000, dtype=np.int64) * 3 + 7
    q = clustered(rng, 20, d)
    params = ann.default_params(kind, len(x), d)
    index = ann.create(kind, x, ids, params)
    D0, I0 = ann.Searcher(index, kind).search(q, 10)
    # serialize -> deserialize is the identity for search
    back = ann.deserialize(ann.serialize(index))
    ann.apply_search_params(back, kind, params)
    D1, I1 = ann.Searcher(back, kind).search(q, 10)
    np.testing.assert_array_equal(I0, I1)
    np.testing.assert_array_equal(D0, D1)
    # add some vectors, then remove them again
    extra = clustered(rng, 200, d)
    extra_ids = np.arange(200, dtype=np.int64) + 100_000
    ann.add(index, kind, extra, extra_ids)
    assert index.ntotal == 3200
    index = ann.remove(index, kind, extra_ids, x, ids, params)
    assert index.ntotal == 3000
    D2, I2 = ann.Searcher(index, kind).search(q, 10)
    np.testing.assert_array_equal(I0, I2)
    np.testing.assert_allclose(D0, D2, atol=1e-6)
    assert sorted(ann.index_ids(index)) == sorted(ids)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_recall(kind):
    rng = np.random.default_rng(2)
    d = 48
    x = clustered(rng, 5000, d, c=64)
    ids = np.arange(5000, dtype=np.int64)
    q = clustered(rng, 50, d, c=64)
    index = ann.create(kind, x, ids, ann.default_params(kind, len(x), d))
    _, I = ann.Searcher(index, kind).search(q, 10)
    _, Ir = brute_topk(x, ids, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, Ir)])
    assert recall >= 0.95, recall


def test_auto_choice_by_size():
    assert ann.choose_type("auto", 10) == "flat"
    assert ann.choose_type("auto", ann.AUTO_FLAT_MAX + 1) == "hnsw"
    assert ann.choose_type("auto", ann.AUTO_HNSW_MAX + 1) == "ivfpq"
    assert ann.choose_type("ivfpq", 100) == "flat"  # too few vectors to train PQ
    with pytest.raises(ValueError):
        ann.choose_type("lsh", 10)

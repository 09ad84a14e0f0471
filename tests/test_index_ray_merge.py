"""Index shards (no Ray needed): shards filled over consecutive id ranges from one trained
template and merged in order are the index one process builds, byte for byte."""
import numpy as np
import pytest

from ctxmem.index import BadInputError, ann
from ctxmem.index.testing import synthetic_vectors


@pytest.mark.parametrize("kind,n,cuts", [("flat", 500, (0, 1, 200, 500)), ("ivfpq", 3000, (0, 1000, 1001, 3000))])
def test_merged_shards_equal_one_build(kind, n, cuts):
    dim = 32
    x = synthetic_vectors(n, dim, seed=3, clusters=40, rank=8)
    ids = np.arange(n, dtype=np.int64) * 5 + 2
    params = ann.default_params(kind, n, dim)
    whole = ann.create(kind, x, ids, params)
    rows = ann.training_rows(kind, n, params)
    template = ann.serialize(ann.new_index(kind, dim, params, None if rows is None else x[rows]))
    shards = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        s = ann.deserialize(template)
        ann.add(s, kind, x[a:b], ids[a:b], presorted=True)
        shards.append(s)
    merged = shards[0]
    for s in shards[1:]:
        ann.merge_into(merged, s, kind)
        assert s.ntotal == 0
    ann.apply_search_params(merged, kind, params)
    assert ann.serialize(merged) == ann.serialize(whole)
    assert np.array_equal(ann.index_ids(merged), ids)
    D1, I1 = ann.Searcher(whole, kind).search(x[:16], 10)
    D2, I2 = ann.Searcher(merged, kind).search(x[:16], 10)
    assert np.array_equal(I1, I2) and np.array_equal(D1, D2)


def test_hnsw_is_not_mergeable():
    x = synthetic_vectors(50, 16, seed=1, clusters=4, rank=4)
    p = ann.default_params("hnsw", 50, 16)
    a, b = ann.create("hnsw", x[:25], np.arange(25), p), ann.create("hnsw", x[25:], np.arange(25, 50), p)
    with pytest.raises(BadInputError, match="cannot be merged"):
        ann.merge_into(a, b, "hnsw")

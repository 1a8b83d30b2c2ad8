"""The VectorIndex contract for every in-process index (pgvector: tests/integration/test_pgvector.py).

`IndexContract` is written once; each backend's class only says how to make an index.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachelm.crypto import Keyring
from cachelm.errors import ConfigError
from cachelm.semantic import FlatIndex, HNSWConfig, HNSWIndex, IndexEntry, VectorIndex

DIM = 16


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def entry(
    i: int, vector: np.ndarray, tenant: str = "t1", ctx: str = "c1", rkey: str | None = None
) -> IndexEntry:
    return IndexEntry(
        entry_id=f"e{i}", tenant=tenant, context_key=ctx, response_key=rkey or f"r{i}", vector=vector
    )


class IndexContract:
    """Every VectorIndex must pass these. Subclasses provide `make(dim)`."""

    exact = True  # ANN indexes are compared on top-1 only where the data makes that unambiguous

    def make(self, dim: int = DIM) -> VectorIndex:
        raise NotImplementedError

    @pytest.fixture
    def index(self) -> Iterator[VectorIndex]:
        ix = self.make()
        yield ix
        ix.close()

    def test_is_a_vector_index(self, index: VectorIndex) -> None:
        assert isinstance(index, VectorIndex)
        assert index.dim == DIM

    def test_each_vector_finds_itself(self, index: VectorIndex) -> None:
        vecs = unit(np.random.default_rng(0), 60)
        index.add([entry(i, v) for i, v in enumerate(vecs)])
        assert len(index) == 60
        for i, v in enumerate(vecs):
            (best,) = index.search(v, tenant="t1", context_key="c1", k=1)
            assert best.entry_id == f"e{i}"
            assert best.response_key == f"r{i}"
            assert best.similarity == pytest.approx(1.0, abs=1e-4)

    def test_results_are_sorted_and_at_most_k(self, index: VectorIndex) -> None:
        vecs = unit(np.random.default_rng(1), 30)
        index.add([entry(i, v) for i, v in enumerate(vecs)])
        found = index.search(vecs[0], tenant="t1", context_key="c1", k=5)
        assert len(found) == 5
        sims = [n.similarity for n in found]
        assert sims == sorted(sims, reverse=True)
        exact = sorted((float(vecs[0] @ v) for v in vecs), reverse=True)[:5]
        assert sims == pytest.approx(exact, abs=1e-4)

    def test_other_partitions_are_never_candidates(self, index: VectorIndex) -> None:
        v = unit(np.random.default_rng(2), 1)[0]
        index.add(
            [entry(1, v, tenant="alice"), entry(2, v, tenant="bob"), entry(3, v, tenant="alice", ctx="c2")]
        )
        assert [n.entry_id for n in index.search(v, tenant="alice", context_key="c1", k=10)] == ["e1"]
        assert [n.entry_id for n in index.search(v, tenant="bob", context_key="c1", k=10)] == ["e2"]
        assert [n.entry_id for n in index.search(v, tenant="alice", context_key="c2", k=10)] == ["e3"]
        assert index.search(v, tenant="carol", context_key="c1", k=10) == []
        assert index.search(v, tenant="bob", context_key="c2", k=10) == []

    def test_randomized_multi_tenant_isolation(self, index: VectorIndex) -> None:
        rng = np.random.default_rng(3)
        pyrng = random.Random(3)
        tenants, contexts = ["a", "b", "c", "d"], ["x", "y"]
        vecs = unit(rng, 300)
        owner = {}
        entries = []
        for i, v in enumerate(vecs):
            t, c = pyrng.choice(tenants), pyrng.choice(contexts)
            owner[f"e{i}"] = (t, c)
            entries.append(entry(i, v, tenant=t, ctx=c))
        index.add(entries)
        for q in unit(rng, 40):
            for t in tenants:
                for c in contexts:
                    found = index.search(q, tenant=t, context_key=c, k=50)
                    assert all(owner[n.entry_id] == (t, c) for n in found)
                    members = [i for i, e in enumerate(entries) if owner[e.entry_id] == (t, c)]
                    assert len(found) == min(50, len(members))
                    best = max(members, key=lambda i: float(vecs[i] @ q))
                    assert found[0].entry_id == f"e{best}"  # reuse == recompute (brute force)

    def test_add_replaces_same_entry_id(self, index: VectorIndex) -> None:
        a, b = unit(np.random.default_rng(4), 2)
        index.add([entry(1, a, rkey="old")])
        index.add([entry(1, b, rkey="new")])
        assert len(index) == 1
        (best,) = index.search(a, tenant="t1", context_key="c1")
        assert best.response_key == "new"
        assert best.similarity == pytest.approx(float(a @ b), abs=1e-4)

    def test_remove_by_id_tenant_and_response_key(self, index: VectorIndex) -> None:
        vecs = unit(np.random.default_rng(5), 6)
        index.add(
            [
                entry(0, vecs[0], tenant="a", rkey="k0"),
                entry(1, vecs[1], tenant="a", rkey="k1"),
                entry(2, vecs[2], tenant="a", rkey="k1", ctx="c2"),
                entry(3, vecs[3], tenant="b", rkey="k1"),
                entry(4, vecs[4], tenant="b", rkey="k4"),
                entry(5, vecs[5], tenant="b", rkey="k5"),
            ]
        )
        assert index.remove(["e0", "missing"]) == 1
        assert index.search(vecs[0], tenant="a", context_key="c1", k=5)[0].entry_id == "e1"
        assert index.remove_response_keys("a", ["k1"]) == 2  # both contexts of tenant a, not tenant b
        assert index.search(vecs[1], tenant="a", context_key="c1") == []
        assert index.search(vecs[3], tenant="b", context_key="c1")[0].entry_id == "e3"
        assert index.remove_tenant("b") == 3
        assert len(index) == 0
        assert index.remove_tenant("b") == 0

    def test_bad_arguments_raise_config_error(self, index: VectorIndex) -> None:
        v = unit(np.random.default_rng(6), 1)[0]
        with pytest.raises(ConfigError, match="`vector`"):
            index.search(np.ones(DIM + 1, np.float32), tenant="t1", context_key="c1")
        with pytest.raises(ConfigError, match="`k`"):
            index.search(v, tenant="t1", context_key="c1", k=0)
        with pytest.raises(ConfigError, match="`tenant`"):
            index.search(v, tenant="", context_key="c1")
        with pytest.raises(ConfigError, match=r"`entries\[0\].vector`"):
            index.add([entry(1, np.ones(DIM + 2, np.float32))])
        with pytest.raises(ConfigError, match="`entry_id`"):
            IndexEntry(entry_id="", tenant="t", context_key="c", response_key="r", vector=v)
        with pytest.raises(ConfigError, match="`vector`"):
            IndexEntry(entry_id="e", tenant="t", context_key="c", response_key="r", vector=v * np.nan)


class TestFlatIndex(IndexContract):
    def make(self, dim: int = DIM) -> VectorIndex:
        return FlatIndex(dim)


class _GraphContract(IndexContract):
    backend = "hnswlib"

    def make(self, dim: int = DIM) -> VectorIndex:
        # min_graph_size=8 forces real graphs in these small tests; high ef keeps tiny graphs exact.
        config = HNSWConfig(backend=self.backend, min_graph_size=8, expansion_search=128)
        return HNSWIndex(dim, config=config)

    def test_large_partitions_become_graphs(self) -> None:
        ix = self.make()
        assert isinstance(ix, HNSWIndex)
        ix.add([entry(i, v) for i, v in enumerate(unit(np.random.default_rng(7), 20))])
        ix.add([entry(100, unit(np.random.default_rng(8), 1)[0], tenant="small")])
        assert ix.graph_partitions() == 1  # the 20-vector partition; the 1-vector one stays flat


class TestHNSWUsearch(_GraphContract):
    backend = "usearch"


class TestHNSWHnswlib(_GraphContract):
    backend = "hnswlib"


class TestHNSWFaiss(_GraphContract):
    backend = "faiss"


class TestHNSWPersisted(IndexContract):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.dir = tmp_path

    def make(self, dim: int = DIM) -> VectorIndex:
        config = HNSWConfig(min_graph_size=8, expansion_search=128)
        return HNSWIndex(dim, config=config, path=self.dir / "cache.sqlite")


class TestHNSWPersistedUsearch(TestHNSWPersisted):
    def make(self, dim: int = DIM) -> VectorIndex:
        config = HNSWConfig(backend="usearch", min_graph_size=8, expansion_search=128)
        return HNSWIndex(dim, config=config, path=self.dir / "cache.sqlite")


class TestHNSWPersistedFaiss(TestHNSWPersisted):
    def make(self, dim: int = DIM) -> VectorIndex:
        config = HNSWConfig(backend="faiss", min_graph_size=8, expansion_search=128)
        return HNSWIndex(dim, config=config, path=self.dir / "cache.sqlite")


class TestHNSWPersistedSealed(TestHNSWPersisted):
    def make(self, dim: int = DIM) -> VectorIndex:
        config = HNSWConfig(min_graph_size=8, expansion_search=128)
        return HNSWIndex(dim, config=config, path=self.dir / "cache.sqlite", keyring=Keyring.generate())


def test_hnsw_config_validates() -> None:
    with pytest.raises(ConfigError, match="`backend`"):
        HNSWConfig(backend="annoy")
    with pytest.raises(ConfigError, match="`connectivity`"):
        HNSWConfig(connectivity=0)


@settings(max_examples=25, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "remove", "drop_tenant"]), st.integers(0, 30), st.sampled_from("ab")
        ),
        max_size=60,
    )
)
def test_graph_index_matches_dict_model(ops: list[tuple[str, int, str]]) -> None:
    """Random adds/removes on a graph index agree with a dict model searched by brute force."""
    vecs = unit(np.random.default_rng(9), 31)
    ix = HNSWIndex(DIM, config=HNSWConfig(min_graph_size=4, expansion_search=256))
    model: dict[str, tuple[str, int]] = {}
    for op, i, tenant in ops:
        if op == "add":
            ix.add([entry(i, vecs[i], tenant=tenant)])
            model[f"e{i}"] = (tenant, i)
        elif op == "remove":
            assert ix.remove([f"e{i}"]) == int(model.pop(f"e{i}", None) is not None)
        else:
            gone = [k for k, (t, _) in model.items() if t == tenant]
            assert ix.remove_tenant(tenant) == len(gone)
            for k in gone:
                del model[k]
    assert len(ix) == len(model)
    for tenant in "ab":
        members = {k: i for k, (t, i) in model.items() if t == tenant}
        for q in vecs[:5]:
            found = ix.search(q, tenant=tenant, context_key="c1", k=1)
            if not members:
                assert found == []
            else:
                best = max(members.values(), key=lambda i: float(vecs[i] @ q))
                assert found[0].similarity == pytest.approx(float(vecs[best] @ q), abs=1e-5)

"""The evaluation's pieces on tiny hand-made data (no dependency on the shared data folder)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from cachelm.errors import ConfigError
from cachelm.semantic import BoundedErrorConfig, BoundedErrorPolicy, HashingEmbedder, StaticThreshold
from cachelm.semantic.datasets import PairSet, embed_cached, load_gptcache, load_meancache, load_stsb
from cachelm.semantic.evaluate import duplicate_classes, pair_scores, simulate_stream


def test_loaders_read_the_documented_formats(tmp_path: Path) -> None:
    (tmp_path / "qqp").mkdir()
    (tmp_path / "stsb").mkdir()
    (tmp_path / "qqp" / "meancache_test.csv").write_text(
        'question1,question2,is_duplicate\n"How, really?",What?,1\nA?,B?,0\n'
    )
    (tmp_path / "qqp" / "gptcache_similiar_qqp_full.json").write_text(
        json.dumps([{"text_a": f"a{i}", "text_b": f"b{i}", "label": i % 2} for i in range(10)])
    )
    (tmp_path / "stsb" / "sts-dev.csv").write_text(
        'g\tf\ty\t1\t4.2\tA "quoted" one.\tAnother.\ng\tf\ty\t2\t1.0\tX.\tY.\textra\tcols\n'
    )
    mc = load_meancache(tmp_path, "test")
    assert mc.a == ["How, really?", "A?"] and mc.labels.tolist() == [1, 0]
    gpt = load_gptcache(tmp_path, limit=4, seed=0)
    assert len(gpt) == 4 and gpt.name == "gptcache-qqp-4"
    assert load_gptcache(tmp_path, limit=4, seed=0).a == gpt.a  # the subsample is seeded
    sts = load_stsb(tmp_path, "dev")
    assert sts.a[0] == 'A "quoted" one.' and sts.labels.tolist() == [1, 0]
    with pytest.raises(ConfigError, match="`--data`"):
        load_meancache(tmp_path, "val")
    with pytest.raises(ConfigError, match="`split`"):
        load_stsb(tmp_path, "train")


def test_embedding_disk_cache_reuses_and_equals_recompute(tmp_path: Path) -> None:
    emb = HashingEmbedder(dim=32)
    first = embed_cached(emb, ["x", "y", "x"], tmp_path)
    assert len(list(tmp_path.rglob("*.npz"))) == 1
    second = embed_cached(emb, ["y", "z"], tmp_path)  # only "z" is new: one more shard
    assert len(list(tmp_path.rglob("*.npz"))) == 2
    assert np.array_equal(second[0], first[1])
    assert np.array_equal(second, emb.embed(["y", "z"]))


def test_duplicate_classes_are_connected_components() -> None:
    pairs = PairSet(
        name="t", a=["a", "b", "d", "a"], b=["b", "c", "e", "d"], labels=np.array([1, 1, 0, 0], np.int8)
    )
    c = duplicate_classes(pairs)
    assert c["a"] == c["b"] == c["c"]
    assert len({c["a"], c["d"], c["e"]}) == 3


def test_pair_scores() -> None:
    s = pair_scores(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]), 0.75)
    assert (s.precision, s.recall, s.hit_rate, s.false_hit_rate) == (0.5, 0.5, 0.5, 0.25)


def test_stream_accounting() -> None:
    # Two classes of exact paraphrases plus distractors: every repeat of a class can be a right hit.
    texts = [
        "how to cook rice",
        "how to cook rice?",
        "How to cook rice",
        "paris weather",
        "paris weather?",
        "zzz",
    ]
    classes = {t: (0 if "rice" in t else 1 if "paris" in t else 2) for t in texts}
    vectors = HashingEmbedder(dim=256).embed(texts)
    none = simulate_stream(texts, vectors, classes, StaticThreshold(1.0), "none", seed=0)
    assert none.hits == 0 and none.lookups == 6 and none.available == 3
    loose = simulate_stream(texts, vectors, classes, StaticThreshold(-1.0), "all", seed=0)
    assert loose.hits == 5  # everything after the first lookup hits, and hits are never added
    order = list(range(6))
    random.Random(0).shuffle(order)
    first = classes[texts[order[0]]]  # the only entry: every hit points at it
    assert loose.wrong_hits == sum(classes[texts[i]] != first for i in order[1:])
    assert loose.false_hit_rate == loose.wrong_hits / 6
    bounded = simulate_stream(texts, vectors, classes, BoundedErrorPolicy(BoundedErrorConfig(seed=0)), "b", 0)
    assert bounded.hits == 0  # six lookups can certify nothing


def test_main_accepts_the_cli_subcommand_and_validates_data(tmp_path: Path) -> None:
    from cachelm.semantic.evaluate import main

    with pytest.raises(ConfigError, match="`--data`"):
        main(["semantic", "--data", str(tmp_path), "--pairs-only"])
    assert main(["--data", str(tmp_path), "--seeds", "0"]) == 2  # bad option values: usage error

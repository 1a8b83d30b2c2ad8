"""Token alignment across tokenizers, sharer position ids, layer maps and the fuser config."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachelm.c2c.align import align_tokens, context_char_end, encode_with_offsets, sharer_position_ids
from cachelm.c2c.config import FuserConfig, ModelShape, make_layer_map
from cachelm.errors import ConfigError
from tests.unit.test_c2c_support import receiver_tokenizer, sharer_tokenizer


def test_multibyte_pieces_all_map_to_the_sharer_token_covering_the_character() -> None:
    # receiver: "a" + three byte pieces of 東 (all report span (1, 2)); sharer: "a東" as one token
    receiver = [(0, 1), (1, 2), (1, 2), (1, 2)]
    sharer = [(0, 0), (0, 2)]
    assert align_tokens(receiver, sharer) == [[1], [1], [1], [1]]


def test_one_sharer_token_split_in_two_by_the_receiver() -> None:
    assert align_tokens([(0, 3), (3, 4)], [(0, 4)]) == [[0], [0]]  # "caf" + "é" vs "café"


def test_one_receiver_token_covering_several_sharer_tokens() -> None:
    receiver, sharer = [(0, 4)], [(0, 3), (3, 4)]
    assert align_tokens(receiver, sharer, "last") == [[1]]
    assert align_tokens(receiver, sharer, "mean") == [[0, 1]]


def test_special_tokens_map_to_specials_at_the_same_offset_else_to_the_preceding_text() -> None:
    sharer = [(0, 0), (0, 5), (5, 9)]  # <bos>, "Hello", " you"
    assert align_tokens([(0, 0), (0, 5)], sharer) == [[0], [1]]  # BOS ↔ BOS
    assert align_tokens([(0, 5), (5, 5), (5, 9)], sharer) == [[1], [1], [2]]  # mid-text special → "Hello"
    assert align_tokens([(0, 0)], [(0, 3)]) == [[0]]  # no special in the sharer: its first token


def test_whitespace_the_sharer_dropped_maps_to_the_nearest_sharer_token_before_it() -> None:
    receiver = [(0, 3), (3, 4), (4, 7)]  # "abc", " ", "def"
    sharer = [(0, 3), (4, 7)]  # the sharer normalised the space away
    assert align_tokens(receiver, sharer) == [[0], [0], [1]]
    assert align_tokens(receiver, sharer, "mean") == [[0], [0], [1]]


def test_sharer_positions_are_receiver_positions_and_monotone() -> None:
    receiver = [(0, 2), (2, 4), (4, 6)]
    sharer = [(0, 0), (0, 3), (3, 6)]  # <bos>, "abc", "def"
    assert sharer_position_ids(receiver, sharer) == [0, 1, 2]
    assert context_char_end(receiver, 2) == 4


def test_unknown_mode_and_empty_inputs_are_rejected() -> None:
    with pytest.raises(ConfigError, match="`mode`"):
        align_tokens([(0, 1)], [(0, 1)], "first")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`sharer_spans`"):
        align_tokens([(0, 1)], [])


def test_real_tokenizers_split_the_same_text_differently() -> None:
    text = "Question: Which café is 東京?\nAnswer:"
    r_ids, r_spans = encode_with_offsets(receiver_tokenizer(), text)
    s_ids, s_spans = encode_with_offsets(sharer_tokenizer(), text)
    assert len(r_ids) != len(s_ids)
    aligned = align_tokens(r_spans, s_spans)
    # every receiver piece of 東 (span 24..25) maps to the sharer token "▁東京"
    tokyo = next(i for i, sp in enumerate(s_spans) if sp[0] <= 24 < sp[1])
    pieces = [i for i, sp in enumerate(r_spans) if sp == (24, 25)]
    assert len(pieces) == 3
    assert all(aligned[i] == [tokyo] for i in pieces)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab cé東😀\n:?.")), min_size=1, max_size=40))
def test_alignment_invariants_on_arbitrary_text(text: str) -> None:
    _, r_spans = encode_with_offsets(receiver_tokenizer(), text)
    _, s_spans = encode_with_offsets(sharer_tokenizer(), text)
    if not r_spans:
        return
    for (start, end), hits in zip(r_spans, align_tokens(r_spans, s_spans), strict=True):
        (j,) = hits
        s_start, s_end = s_spans[j]
        if end > start and s_end > s_start:
            assert s_start < end  # the chosen sharer token never starts after the receiver token ends
    for hits in align_tokens(r_spans, s_spans, "mean"):
        assert hits == sorted(hits) and hits
    positions = sharer_position_ids(r_spans, s_spans)
    assert positions == sorted(positions)
    assert all(0 <= p < len(r_spans) for p in positions)


def test_layer_maps() -> None:
    assert make_layer_map("terminal", 5, 3) == ((2, 0), (3, 1), (4, 2))
    assert make_layer_map("terminal", 2, 4) == ((0, 2), (1, 3))
    assert make_layer_map("uniform", 3, 5) == ((0, 0), (1, 2), (2, 4))
    assert len(make_layer_map("terminal", 30, 18)) == 18
    with pytest.raises(ConfigError, match="`kind`"):
        make_layer_map("middle", 3, 3)  # type: ignore[arg-type]


def test_config_json_round_trip_and_validation() -> None:
    r, s = (
        ModelShape(num_layers=4, num_kv_heads=2, head_dim=16),
        ModelShape(num_layers=3, num_kv_heads=1, head_dim=32),
    )
    cfg = FuserConfig(receiver=r, sharer=s, layer_map=((1, 0), (3, 2)), hidden_dim=8, token_alignment="mean")
    assert FuserConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="`layer_map`"):
        FuserConfig(receiver=r, sharer=s, layer_map=((1, 0), (1, 2)))
    with pytest.raises(ConfigError, match="`layer_map`"):
        FuserConfig(receiver=r, sharer=s, layer_map=((4, 0),))
    with pytest.raises(ConfigError, match="`head_dim`"):
        ModelShape(num_layers=1, num_kv_heads=1, head_dim=0)
    with pytest.raises(ConfigError):
        FuserConfig.from_json("{}")


def test_package_exports_are_sorted_and_resolve() -> None:
    import cachelm.c2c as c2c

    assert list(c2c.__all__) == sorted(c2c.__all__)
    for name in c2c.__all__:
        assert getattr(c2c, name) is not None
    with pytest.raises(AttributeError):
        _ = c2c.no_such_name

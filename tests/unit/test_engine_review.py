"""Engine review: reuse equals recompute on the edge cases of the prefix cache (block boundaries, a prompt
that is a prefix of a cached one or one token longer, one-token answers, stop tokens, seeded sampling,
through HF and through the static runner), and every entry point refuses bad input with a ConfigError
naming the argument, when called. Tiny random-weight models on CPU."""

from __future__ import annotations

from typing import Any

import pytest

from cachelm.engine.engine import Engine, SamplingParams, build_prefix_cache
from cachelm.engine.static_runner import StaticRunner
from cachelm.engine.tiny import tiny_gemma3, tiny_llama, tiny_tokenizer
from cachelm.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK = 8
TEXT = "The quick brown fox jumps over the lazy dog. There is a theory that the theatre is there. " * 2


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny_llama(initializer_range=0.1)


@pytest.fixture(scope="module", params=["llama-hf", "llama-static", "gemma-hf", "gemma-static"])
def engines(request: pytest.FixtureRequest, tokenizer: Any) -> tuple[Engine, Engine]:
    """(an engine with a prefix cache of `BLOCK`-token blocks, the same model without one)."""
    name, path = request.param.split("-")
    model = tiny_llama(initializer_range=0.1) if name == "llama" else tiny_gemma3(sliding_window=8)
    runner = StaticRunner(model, max_tokens=256) if path == "static" else None
    cache = build_prefix_cache(model, model_id=name, block_size=BLOCK)
    return Engine(model, tokenizer, prefix_cache=cache, static_runner=runner), Engine(model, tokenizer)


# -- reuse equals recompute on the edges of the prefix cache ---------------------------------------------

PARAMS = [
    SamplingParams(max_new_tokens=6),
    SamplingParams(max_new_tokens=1),
    SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3),
]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "one-token", "seeded"])
@pytest.mark.parametrize("length", [1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 4 * BLOCK, 4 * BLOCK + 1])
def test_a_hit_at_every_boundary_equals_recompute(
    engines: tuple[Engine, Engine], tokenizer: Any, length: int, params: SamplingParams
) -> None:
    cached, plain = engines
    ids = tokenizer(TEXT).input_ids[:length]
    first, again = cached.generate(ids, params), cached.generate(ids, params)
    expected = plain.generate(ids, params)
    assert first.token_ids == again.token_ids == expected.token_ids
    assert again.num_cached_tokens == (length - 1) // BLOCK * BLOCK  # capped one token short of the prompt


def test_a_prefix_of_a_cached_prompt_and_one_token_more_equal_recompute(
    engines: tuple[Engine, Engine], tokenizer: Any
) -> None:
    cached, plain = engines
    ids = tokenizer(TEXT).input_ids[: 5 * BLOCK]
    greedy = SamplingParams(max_new_tokens=4)
    answer = cached.generate(ids, greedy)  # stores the prompt's blocks and those its answer completes
    shorter = [ids[: 3 * BLOCK], ids[: 3 * BLOCK + 3]]
    for prompt in (*shorter, ids + answer.token_ids[:1], ids + answer.token_ids):
        reused = cached.generate(prompt, greedy)
        assert reused.num_cached_tokens > 0
        assert reused.token_ids == plain.generate(prompt, greedy).token_ids


def test_a_stop_token_ends_reused_and_recomputed_answers_alike(
    engines: tuple[Engine, Engine], tokenizer: Any
) -> None:
    cached, plain = engines
    ids = tokenizer(TEXT).input_ids[: 3 * BLOCK]
    free = plain.generate(ids, SamplingParams(max_new_tokens=6)).token_ids
    stop = SamplingParams(max_new_tokens=6, stop_token_ids=(free[2],))
    for result in (cached.generate(ids, stop), cached.generate(ids, stop), plain.generate(ids, stop)):
        assert result.token_ids == free[: free.index(free[2]) + 1]
        assert result.finish_reason == "stop"


# -- arguments are refused with a ConfigError naming them -------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seed": 1.5}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 1 << 64}, "seed"),
        ({"temperature": True}, "temperature"),
        ({"top_p": True}, "top_p"),
        ({"stop_token_ids": ("a",)}, "stop_token_ids"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"stop_token_ids": 7}, "stop_token_ids"),
    ],
)
def test_sampling_params_refuse_what_generation_would_trip_on(kwargs: dict[str, Any], name: str) -> None:
    # Before, a bad seed passed and failed inside torch at the first sampled token (RuntimeError), a bool
    # was taken for a number, and a stop id that is no token id never matched.
    with pytest.raises(ConfigError, match=f"`{name}`"):
        SamplingParams(**kwargs)


def test_sampling_params_take_a_list_of_stop_ids_as_a_tuple() -> None:
    params = SamplingParams(stop_token_ids=[5, 7])  # type: ignore[arg-type]
    assert params.stop_token_ids == (5, 7)
    hash(params)  # frozen and hashable, as its type says

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


def test_generate_refuses_params_that_are_not_sampling_params(llama: Any, tokenizer: Any) -> None:
    engine = Engine(llama, tokenizer)
    with pytest.raises(ConfigError, match="`params`"):  # an AttributeError on 'temperature' before
        engine.generate("Hello", {"max_new_tokens": 3})  # type: ignore[arg-type]


@pytest.mark.parametrize(("prompt", "match"), [("", "`prompt`"), ([], "`prompt`"), ([1, 10**6], "`prompt`")])
def test_stream_checks_its_prompt_when_called(llama: Any, tokenizer: Any, prompt: Any, match: str) -> None:
    # Before, `stream` was a generator function: nothing was checked until the first token was asked for,
    # so a caller that set the stream up (the proxy's local upstream) met a bad prompt mid-iteration, and an
    # empty text prompt was reported as empty `token_ids`, an argument the caller never passed.
    engine = Engine(llama, tokenizer)
    with pytest.raises(ConfigError, match=match):
        engine.stream(prompt)
    with pytest.raises(ConfigError, match="`tenant_salt`"):
        engine.stream("Hello", tenant_salt="acme")  # type: ignore[arg-type]


def test_a_prompt_longer_than_the_context_is_refused(tokenizer: Any) -> None:
    engine = Engine(tiny_llama(max_position_embeddings=32), tokenizer)
    with pytest.raises(ConfigError, match=r"`prompt` has 32 tokens.*context of 32"):
        engine.generate(list(range(5, 37)))  # before: generated past the positions the model knows
    assert len(engine.generate(list(range(5, 36)), SamplingParams(max_new_tokens=1)).token_ids) == 1


def test_generation_stops_at_the_end_of_the_context(tokenizer: Any) -> None:
    engine = Engine(tiny_llama(max_position_embeddings=32), tokenizer)
    result = engine.generate(list(range(5, 25)), SamplingParams(max_new_tokens=30, stop_token_ids=()))
    assert len(result.token_ids) == 12  # prompt + answer fill the 32 positions (before: 30 tokens)
    assert result.finish_reason == "length"


def test_chat_messages_without_a_template_or_refused_by_it_are_config_errors(llama: Any) -> None:
    # Before: transformers' ValueError (no template) or jinja's TemplateError, a 500 through the proxy.
    messages = [{"role": "user", "content": "Hello"}]
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        Engine(llama, bare).generate(messages)
    strict = tiny_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    engine = Engine(llama, strict)
    with pytest.raises(ConfigError, match="refused the messages: no system role"):
        engine.generate([{"role": "system", "content": "Be brief."}, *messages])
    assert engine.generate(messages, SamplingParams(max_new_tokens=2)).token_ids  # the template still works

"""The local generation engine: HF transformers causal LM + the KV prefix cache on the prefill.

    prompt (text | chat messages | token ids) ─► token ids
      ─► prefix cache match (longest cached prefix, ≤ len - 1 tokens) ─► load blocks into a fresh cache
      ─► prefill only the rest ─► sample token by token (greedy or seeded sampling), streaming each token
      ─► stop on EOS / stop ids / max_new_tokens / a full context ─► store the new full blocks (prompt and
         generated)

Reuse changes only *which* KV the prefill computes, never the result beyond float rounding: the tests in
``tests/unit/test_engine_*.py`` and ``tests/unit/test_kv_*.py`` compare every reuse path with recompute.

An engine runs one request at a time (the model's cache and the prefix cache's top tier are not locked
per request); run one engine per worker thread, or serialise calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cachelm.errors import ConfigError
from cachelm.keys import ModelFingerprint, tenant_salt
from cachelm.kv import hf
from cachelm.kv.codecs import dtype_name
from cachelm.kv.layout import KVLayout
from cachelm.kv.prefix_cache import KVPrefixCache

if TYPE_CHECKING:
    from cachelm.crypto import Keyring
    from cachelm.engine.static_runner import StaticRunner

DEFAULT_TENANT_SALT = tenant_salt("default")

Prompt = str | Sequence[Mapping[str, Any]] | Sequence[int]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; otherwise sampling, reproducible with `seed`."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS ids

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens):
            raise ConfigError(f"`max_new_tokens` must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"`max_new_tokens` must be >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 10:
            raise ConfigError(f"`temperature` must be in [0, 10], got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"`top_p` must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"`top_k` must be an int >= 0, got {self.top_k!r}")
        # The range torch.Generator.manual_seed takes: checked here, not at the first sampled token.
        if self.seed is not None and (not _is_int(self.seed) or not -(1 << 63) <= self.seed < 1 << 64):
            raise ConfigError(f"`seed` must be an int in [-2**63, 2**64), got {self.seed!r}")
        stops = self.stop_token_ids
        if not isinstance(stops, tuple | list) or not all(_is_int(t) and t >= 0 for t in stops):
            raise ConfigError(f"`stop_token_ids` must be a tuple of token ids (ints >= 0), got {stops!r}")
        object.__setattr__(self, "stop_token_ids", tuple(stops))  # a list is taken: frozen means hashable


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int, never meant as one


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Prefill:
    """The state after the prompt: last-position logits and the model cache, plus what reuse saved.

    `cache` (a transformers DynamicCache holding the prompt) may be built lazily, on first access, by
    `restore`: the static runner's prefill hands back logits first and copies its buffer into a
    DynamicCache only when decoding needs it, so that copy is not part of the time to the first token.
    """

    def __init__(
        self,
        *,
        logits: torch.Tensor,
        num_prompt_tokens: int,
        num_cached_tokens: int,
        cache: Any = None,
        restore: Callable[[], Any] | None = None,
    ) -> None:
        if (cache is None) == (restore is None):
            raise ConfigError("a Prefill needs exactly one of `cache` and `restore`")
        self.logits = logits  # (V,) float32, logits after the last prompt token
        self.num_prompt_tokens = num_prompt_tokens
        self.num_cached_tokens = num_cached_tokens  # tokens loaded from the prefix cache (not computed)
        self._cache = cache
        self._restore = restore

    @property
    def cache(self) -> Any:
        if self._cache is None:
            assert self._restore is not None
            self._cache, self._restore = self._restore(), None
        return self._cache


@dataclass(frozen=True, kw_only=True)
class TokenEvent:
    """One generated token, streamed."""

    index: int
    token_id: int
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)


@dataclass(kw_only=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_cached_tokens: int
    finish_reason: str  # "stop" (EOS or a stop id) or "length"
    ttft_s: float  # request start → first token sampled
    total_s: float
    first_logits: torch.Tensor | None = field(default=None, repr=False)


def make_fingerprint(model: Any, model_id: str | None = None, revision: str = "") -> ModelFingerprint:
    """The KV identity of `model`: id and revision (defaults: what `load_model` recorded — the packaged
    name or GGUF file and its SHA-256 — else the model's `name_or_path` and ""), and dtype."""
    identity = getattr(model, "cachelm_identity", None)
    if identity is not None:
        model_id = model_id or identity[0]
        revision = revision or identity[1]
    name = model_id or getattr(model, "name_or_path", "") or ""
    if not name:
        raise ConfigError("`model_id` is required: the model has no name_or_path to identify its KV cache by")
    return ModelFingerprint(model_id=name, revision=revision, dtype=dtype_name(model.dtype))


class Engine:
    """Generation with KV prefix reuse. `prefix_cache` None: plain generation, nothing cached."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        prefix_cache: KVPrefixCache | None = None,
        static_runner: StaticRunner | None = None,
    ) -> None:
        """`static_runner` (Llama or Gemma-3): run prefills through the lean static-buffer runner (CUDA
        graphs on GPU) instead of HF eager; prompts longer than its buffer fall back to the HF path."""
        self.model = model
        self.static_runner = static_runner
        self.tokenizer = tokenizer
        self.layout = KVLayout.from_model(model)
        if prefix_cache is not None and prefix_cache.layout != self.layout:
            raise ConfigError(
                f"`prefix_cache` layout {prefix_cache.layout} does not match the model's {self.layout}"
            )
        self.prefix_cache = prefix_cache
        eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
        eos_ids = list(eos) if isinstance(eos, list) else [eos]  # a copy: never mutate the model's config
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(int(i) for i in eos_ids if i is not None)
        # Positions the model was trained for: past them RoPE models produce noise rather than an error.
        self.context: int | None = getattr(model.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    # ---- prompts -------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of `prompt`: text (tokenised with special tokens), chat messages (chat template with
        the generation prompt), or token ids (returned as a list)."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        if not isinstance(prompt, Sequence) or not prompt:
            raise ConfigError(f"`prompt` must be text, chat messages or token ids, got {prompt!r}")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]
            vocab = self.model.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ConfigError(f"`prompt` token ids must be in [0, {vocab}), got {ids!r}")
            return ids
        if all(isinstance(m, Mapping) and "role" in m for m in prompt):
            return self._encode_chat(list(prompt))
        raise ConfigError(f"`prompt` must be text, chat messages or token ids, got {prompt!r}")

    def _encode_chat(self, messages: list[Any]) -> list[int]:
        """Chat messages rendered by the tokenizer's template, then tokenised without special tokens (the
        template already holds them). A tokenizer without a template, or a template that refuses the
        messages (its ``raise_exception``, say for a role it does not know), is a ConfigError."""
        import jinja2

        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("`prompt`: this model's tokenizer has no chat template; give it text instead")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as exc:
            raise ConfigError(f"`prompt`: the chat template refused the messages: {exc}") from None
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    # ---- prefill -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, token_ids: Sequence[int], *, tenant_salt: bytes = DEFAULT_TENANT_SALT) -> Prefill:
        """Run the prompt through the model, loading its longest cached prefix first."""
        if len(token_ids) == 0:
            raise ConfigError("`token_ids` must not be empty")
        if self.static_runner is not None and len(token_ids) <= self.static_runner.max_tokens:
            return self._prefill_static(token_ids, tenant_salt)
        cache = hf.new_cache(self.model)
        prefix = self._load_prefix(token_ids, tenant_salt)
        cached = prefix.shape[0] if prefix is not None else 0
        if prefix is not None and cached:
            hf.restore(cache, prefix, self.layout)
        ids = torch.tensor([list(token_ids[cached:])], device=self.device)  # (1, T - P)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1].float()  # (V,)
        return Prefill(logits=logits, cache=cache, num_prompt_tokens=len(token_ids), num_cached_tokens=cached)

    def _prefill_static(self, token_ids: Sequence[int], tenant_salt: bytes) -> Prefill:
        runner = self.static_runner
        assert runner is not None
        runner.epoch += 1  # the buffer is about to be written: earlier prefills' lazy caches are void
        prefix = self._load_prefix(token_ids, tenant_salt, out=runner.kv)  # straight into the buffer
        cached = prefix.shape[0] if prefix is not None else 0
        logits = runner(list(token_ids[cached:]), cached).clone()  # (V,); the graph reuses its output
        epoch = runner.epoch
        length = len(token_ids)

        def restore() -> Any:
            # Decoding continues in a DynamicCache, copied from the buffer when first needed. A later
            # prefill through this runner has overwritten the buffer by then: refuse rather than mix.
            if runner.epoch != epoch:
                raise ConfigError(
                    "this prefill's KV was overwritten by a later prefill on the same static runner: read "
                    "`.cache` (or finish decoding) before the next prefill"
                )
            cache = hf.new_cache(self.model)
            # whole: sliding layers keep every token, so `store` can still extract the new ones
            hf.restore(cache, runner.kv[:length].clone(), self.layout, whole=True)
            return cache

        return Prefill(logits=logits, restore=restore, num_prompt_tokens=length, num_cached_tokens=cached)

    def _load_prefix(
        self, token_ids: Sequence[int], tenant_salt: bytes, *, out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The longest cached prefix of `token_ids` (on the device, or in `out`), counting hit and miss
        tokens; None when there is no prefix cache or no cached block."""
        if self.prefix_cache is None:
            return None
        match = self.prefix_cache.match(token_ids, tenant_salt=tenant_salt)
        prefix = self.prefix_cache.load(match, device=self.device, out=out) if match.num_blocks else None
        cached = prefix.shape[0] if prefix is not None else 0
        self.prefix_cache.stats.add("hit_tokens", cached)
        self.prefix_cache.stats.add("miss_tokens", len(token_ids) - cached)
        return prefix

    def store(
        self, token_ids: Sequence[int], prefill: Prefill, *, tenant_salt: bytes = DEFAULT_TENANT_SALT
    ) -> int:
        """Store the new full blocks of the first ``cache length`` of `token_ids`; return how many."""
        if self.prefix_cache is None:
            return 0
        length = prefill.cache.get_seq_length()
        start = prefill.num_cached_tokens
        first_new_block = start // self.prefix_cache.block_size
        if length // self.prefix_cache.block_size <= first_new_block:
            return 0  # no new full block: skip the extraction copy
        kv = hf.extract(prefill.cache, length - start)  # (N, L, 2, H, D)
        return self.prefix_cache.store(list(token_ids[:length]), kv, tenant_salt=tenant_salt, start=start)

    # ---- decoding ------------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
        if params.temperature == 0:
            return int(torch.argmax(logits))
        scores = logits / params.temperature
        if params.top_k:
            kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True)
            sorted_probs = torch.softmax(sorted_scores, dim=-1)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # keep the token that crosses p
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        tenant_salt: bytes = DEFAULT_TENANT_SALT,
        result: GenerationResult | None = None,
    ) -> Iterator[TokenEvent]:
        """Yield generated tokens one by one. New KV blocks are stored when the stream ends (or is closed),
        unless a decoding step failed (then the cache may hold some layers' KV of a token and not others').

        The arguments are checked and the prompt encoded when this is called (ConfigError), not at the
        first token: a prompt must encode to at least one token and leave room in the model's context for
        one generated token; the answer ends ("length") where the context is full. `result`, when given,
        is filled in as the stream runs (token ids, text, timings, finish reason).
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"`params` must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(tenant_salt, bytes):
            raise ConfigError(f"`tenant_salt` must be bytes, got {type(tenant_salt).__name__}")
        started = time.perf_counter()
        token_ids = self.encode(prompt)
        if not token_ids:
            raise ConfigError(f"`prompt` encodes to no tokens: {prompt!r}")
        if self.context is not None and len(token_ids) >= self.context:
            raise ConfigError(
                f"`prompt` has {len(token_ids)} tokens; the model has a context of {self.context} "
                f"(at most {self.context - 1} prompt tokens, leaving room for one generated token)"
            )
        return self._decode(token_ids, params, tenant_salt, result, started)

    @torch.inference_mode()
    def _decode(
        self,
        token_ids: list[int],
        params: SamplingParams,
        tenant_salt: bytes,
        result: GenerationResult | None,
        started: float,
    ) -> Iterator[TokenEvent]:
        state = self.prefill(token_ids, tenant_salt=tenant_salt)
        generator = None
        if params.temperature > 0 and params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stops = self.eos_token_ids | set(params.stop_token_ids)
        # The answer's last token is sampled, never fed: prompt + answer fill the context at most.
        room = self.context - len(token_ids) if self.context is not None else params.max_new_tokens
        max_new_tokens = min(params.max_new_tokens, room)
        generated: list[int] = []
        text = ""
        logits = state.logits
        if result is not None:
            result.num_prompt_tokens, result.num_cached_tokens = len(token_ids), state.num_cached_tokens
            result.first_logits = logits
        # False while a forward runs: one that raises (out of memory, an interrupt) may leave the first
        # layers holding the new token and the rest not, and storing that would file misaligned KV
        # under the prompt's hashes for every later request.
        consistent = True
        try:
            for index in range(max_new_tokens):
                token = self._sample(logits, params, generator)
                generated.append(token)
                if index == 0 and result is not None:
                    result.ttft_s = time.perf_counter() - started
                if token in stops:
                    if result is not None:
                        result.finish_reason = "stop"
                    break
                full = self.tokenizer.decode(generated, skip_special_tokens=True) if self.tokenizer else ""
                # Hold back a trailing replacement char: the next token may complete the character.
                delta = full[len(text) :] if not full.endswith("\ufffd") else ""
                text += delta
                if result is not None:
                    result.token_ids, result.text = list(generated), text
                yield TokenEvent(index=index, token_id=token, text=delta)
                if index + 1 == max_new_tokens:
                    break
                ids = torch.tensor([[token]], device=self.device)
                consistent = False
                logits = (
                    self.model(input_ids=ids, past_key_values=state.cache, use_cache=True)
                    .logits[0, -1]
                    .float()
                )
                consistent = True
        finally:
            if consistent:
                self.store([*token_ids, *generated], state, tenant_salt=tenant_salt)
            if result is not None:
                result.token_ids = list(generated)
                result.text = (
                    self.tokenizer.decode(generated, skip_special_tokens=True) if self.tokenizer else ""
                )
                result.total_s = time.perf_counter() - started

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        tenant_salt: bytes = DEFAULT_TENANT_SALT,
        on_token: Callable[[TokenEvent], None] | None = None,
    ) -> GenerationResult:
        """Generate a whole answer (calling `on_token` for each token as it is produced)."""
        result = GenerationResult(
            text="",
            token_ids=[],
            num_prompt_tokens=0,
            num_cached_tokens=0,
            finish_reason="length",
            ttft_s=0.0,
            total_s=0.0,
        )
        for event in self.stream(prompt, params, tenant_salt=tenant_salt, result=result):
            if on_token is not None:
                on_token(event)
        return result


def build_prefix_cache(
    model: Any,
    *,
    model_id: str | None = None,
    revision: str = "",
    block_size: int = 64,
    gpu_bytes: int = 0,
    cpu_bytes: int = 1 << 30,
    disk_dir: str | None = None,
    disk_bytes: int = 8 << 30,
    redis_url: str | None = None,
    redis_namespace: str = "cachelm",
    redis_bytes: int = 4 << 30,
    codec: str = "raw",
    lower_codec: str | None = None,
    write_through: bool = False,
    keyring: Keyring | None = None,
) -> KVPrefixCache:
    """A prefix cache for `model` with the tiers whose budgets are given, fastest first.

    GPU (if `gpu_bytes` and the model is on CUDA) → CPU (pinned when CUDA is present) → disk (if
    `disk_dir`) → Redis (if `redis_url`). Memory tiers use `codec`; disk and Redis use `lower_codec`
    (default: `codec`). With a `keyring`, disk and Redis keep their blocks encrypted at rest.
    """
    from cachelm.kv.codecs import make_codec
    from cachelm.kv.tiers import DiskTier, MemoryTier, RedisTier, Tier

    tiers: list[Tier] = []
    if gpu_bytes and torch.device(model.device).type == "cuda":
        tiers.append(MemoryTier(capacity_bytes=gpu_bytes, device=str(model.device), codec=make_codec(codec)))
    if cpu_bytes:
        tiers.append(MemoryTier(capacity_bytes=cpu_bytes, device="cpu", codec=make_codec(codec)))
    low = make_codec(lower_codec or codec)
    if disk_dir:
        tiers.append(DiskTier(disk_dir, capacity_bytes=disk_bytes, codec=low, keyring=keyring))
    if redis_url:
        tiers.append(
            RedisTier(
                redis_url, namespace=redis_namespace, capacity_bytes=redis_bytes, codec=low, keyring=keyring
            )
        )
    return KVPrefixCache(
        layout=KVLayout.from_model(model),
        model=make_fingerprint(model, model_id, revision),
        tiers=tiers,
        block_size=block_size,
        write_through=write_through,
    )

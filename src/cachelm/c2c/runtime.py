"""The C2C runtime: prefill both models, fuse the caches, let the receiver continue.

For a prompt of `n` receiver tokens the *context* is its first `n - 1` tokens. The receiver prefills the
context; the sharer prefills the same characters with its own tokenizer (position ids in receiver
coordinates by default, see align.py); the fuser writes the sharer's projected KV into the receiver's cache;
the receiver then reads the last prompt token on the fused cache and decodes normally. Everything works on
batches: contexts are left-padded (position ids follow the real tokens), suffixes right-padded.

With a fuser whose `fuse_span` is "all", every position is fused instead: the sharer reads the prompt and
the continuation (an option being scored, a training response, the tokens generated so far), its KV is
aligned causally onto the receiver's tokens, and the fuser runs inside each fused receiver layer's cache
update (`_FusingCache`), so the receiver's own new K/V are fused before its attention reads them. During
generation the sharer re-reads the text after every new token (its tokenisation of the text so far may
change as the text grows, so its cache is not kept); the receiver keeps its cache as usual.

`C2CPipeline` with no sharer and no fuser is the receiver alone through the same code path, which is what
the baselines use, so every method is measured the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from cachelm.c2c.align import (
    align_causal,
    align_tokens,
    context_char_end,
    encode_with_offsets,
    sharer_position_ids,
)
from cachelm.c2c.fuser import KV, C2CFuser
from cachelm.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ContextBatch:
    """Tokenised, aligned contexts of a batch of prompts (B prompts, T receiver / S sharer positions)."""

    receiver_ids: torch.Tensor  # (B, T) left-padded
    receiver_mask: torch.Tensor  # (B, T) 1 for real tokens
    receiver_positions: torch.Tensor  # (B, T)
    last_token: torch.Tensor  # (B,) the prompt's last receiver token, read on the fused cache
    context_lengths: torch.Tensor  # (B,) real context tokens per prompt
    sharer_ids: torch.Tensor | None  # (B, S) left-padded
    sharer_mask: torch.Tensor | None  # (B, S)
    sharer_positions: torch.Tensor | None  # (B, S)
    alignment: torch.Tensor | None  # (B, T, S) rows sum to 1 on real receiver tokens, 0 on padding


def _pad_left(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _self_attending_padding(mask: Any) -> Any:
    """`mask` (a boolean (B, 1, Q, K) SDPA mask) with every row that attends to nothing given its own
    column; anything else (None, a float or 2D mask) as it is."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        return mask
    empty = ~mask.any(-1)  # (B, 1, Q)
    if not bool(empty.any()):
        return mask
    q, k = mask.shape[-2:]
    own = torch.zeros_like(mask)
    rows = torch.arange(q, device=mask.device)
    own[..., rows, k - q + rows] = True  # query i's own key column
    return mask | (own & empty[..., None])


def _full_text_masks(model: Any, batch: ContextBatch, cache: DynamicCache) -> Any:
    """The receiver's attention masks for a left-padded whole-text forward, with no row attending to nothing.

    A left-padding position sees no real token and no other padding, so its SDPA row is empty. Kernels
    disagree on such rows: cuDNN's backward returns NaN gradients for them (pytorch/pytorch#196678),
    older memory-efficient kernels NaN outputs, and autograd carries a NaN from any row into every
    gradient. Each padding position attends to itself here instead; no real position attends to padding,
    so real positions are unchanged. The masks come from the model's own builder (one per layer kind, e.g.
    Gemma-3's sliding layers); a model whose builder gives no boolean mask gets its 2D mask unchanged.
    """
    from transformers.masking_utils import create_masks_for_generate

    b, t = batch.receiver_ids.shape
    built = create_masks_for_generate(
        config=model.config,
        # The builder reads only the batch size, length, dtype and device of the embeddings.
        inputs_embeds=batch.receiver_ids.new_empty((b, t, 0), dtype=model.dtype),
        attention_mask=batch.receiver_mask,
        past_key_values=cache,
        position_ids=batch.receiver_positions,
    )
    if isinstance(built, dict):
        fixed = {kind: _self_attending_padding(m) for kind, m in built.items()}
        # A model with one kind of layer (Llama) takes the mask itself; hybrid ones (Gemma-3) the mapping.
        return fixed if len(fixed) > 1 else next(iter(fixed.values()))
    if built is None or (isinstance(built, torch.Tensor) and built.dim() == 2):
        return batch.receiver_mask
    return _self_attending_padding(built)


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer objects (each with `.keys` / `.values`, (B, H, T, D))."""
    return list(cache.layers)


def _check_prompts(prompts: Any) -> None:
    # A bare str is a sequence of str as well: each of its characters would silently become a prompt.
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"`prompts` must be a non-empty list of str, got {prompts!r:.80}")


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _continuation_spans(tokenizer: Any, ids: Sequence[int], offset: int) -> tuple[str, list[tuple[int, int]]]:
    """Text of continuation token `ids` and each token's character span, shifted by `offset`.

    Spans come from decoding growing prefixes; a prefix that ends inside a multi-byte character decodes to
    U+FFFD, which is not counted, so a span never claims a character its token has not completed (the
    causal alignment relies on ends never being too late).
    """
    spans: list[tuple[int, int]] = []
    previous = 0
    for k in range(len(ids)):
        text = tokenizer.decode(list(ids[: k + 1]), skip_special_tokens=True)
        end = len(text.rstrip("\ufffd"))
        spans.append((offset + min(previous, end), offset + end))
        previous = max(previous, end)
    return tokenizer.decode(list(ids), skip_special_tokens=True), spans


class _FusingCache(DynamicCache):
    """A receiver cache that fuses the sharer into every new K/V as the receiver writes it.

    `aligned[i]`: the aligned sharer (K, V) of the `i`-th layer-map pair, each (B, T_total, Hs*Ds), one row
    per receiver column of the batch; an update at column offset `o` with `t` new tokens reads rows
    `o .. o + t`. `mask` (B, T0): the first forward's attention mask; its padding columns keep the
    receiver's own K/V. Columns added later (generated tokens) are never padding.
    """

    def __init__(self, fuser: C2CFuser, aligned: list[KV], mask: torch.Tensor) -> None:
        super().__init__()
        self.fuser = fuser
        self.aligned = aligned
        self.mask = mask
        self.gates = fuser.gates()
        self.pair_of = {r: i for i, (r, _) in enumerate(fuser.config.layer_map)}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.pair_of.get(layer_idx)
        if i is not None and (self.fuser.training or float(self.gates[i]) != 0.0):
            start = self.get_seq_length(layer_idx) if layer_idx < len(self.layers) else 0
            end = start + key_states.shape[-2]
            ak, av = self.aligned[i]
            key_states, value_states = self.fuser.fuse_layer(
                i,
                (key_states, value_states),
                (ak[:, start:end], av[:, start:end]),
                self.gates[i],
                self.mask[:, start:end] if start < self.mask.shape[1] else None,
            )
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return keys, values


class C2CPipeline:
    """Receiver (+ optional sharer and fuser): scoring, training loss and generation on fused caches."""

    def __init__(
        self,
        receiver: Any,
        receiver_tokenizer: Any,
        sharer: Any | None = None,
        sharer_tokenizer: Any | None = None,
        fuser: C2CFuser | None = None,
    ):
        if (sharer is None) != (fuser is None) or (sharer is None) != (sharer_tokenizer is None):
            raise ConfigError("`sharer`, `sharer_tokenizer` and `fuser` must be given together or not at all")
        self.receiver = receiver
        self.receiver_tokenizer = receiver_tokenizer
        self.sharer = sharer
        self.sharer_tokenizer = sharer_tokenizer
        self.fuser = fuser
        self.fuse_all = fuser is not None and fuser.config.fuse_span == "all"
        self.device = next(receiver.parameters()).device

    # ---- preparation -------------------------------------------------------------------------------

    def prepare(self, prompts: Sequence[str]) -> ContextBatch:
        """Tokenise and align `prompts` (each must give the receiver at least two tokens)."""
        _check_prompts(prompts)
        r_rows, lasts, sh_rows, sh_pos, aligns = [], [], [], [], []
        for prompt in prompts:
            ids, spans = encode_with_offsets(self.receiver_tokenizer, prompt)
            if len(ids) < 2:
                raise ConfigError(f"`prompts` item {prompt!r:.60} gives the receiver fewer than 2 tokens")
            r_rows.append(ids[:-1])
            lasts.append(ids[-1])
            if self.fuser is not None:
                ctx_spans = spans[:-1]
                s_ids, s_spans = encode_with_offsets(
                    self.sharer_tokenizer, prompt[: context_char_end(spans, len(ids) - 1)]
                )
                if not s_ids:
                    raise ConfigError(f"`prompts` item {prompt!r:.60} gives the sharer no context tokens")
                sh_rows.append(s_ids)
                if self.fuser.config.sharer_positions == "receiver":
                    sh_pos.append(sharer_position_ids(ctx_spans, s_spans))
                else:
                    sh_pos.append(list(range(len(s_ids))))
                aligns.append(align_tokens(ctx_spans, s_spans, self.fuser.config.token_alignment))
        return self._batch(r_rows, lasts, sh_rows, sh_pos, aligns)

    def _batch(
        self,
        r_rows: list[list[int]],
        lasts: list[int],
        sh_rows: list[list[int]],
        sh_pos: list[list[int]],
        aligns: list[list[list[int]]],
    ) -> ContextBatch:
        """Pads receiver rows and (when fusing) sharer rows on the left and builds the alignment tensor."""
        r_ids, r_mask = _pad_left(r_rows, _pad_id(self.receiver_tokenizer))
        r_pos = (r_mask.cumsum(-1) - 1).clamp(min=0)
        sharer_ids = sharer_mask = sharer_positions = alignment = None
        if self.fuser is not None:
            sharer_ids, sharer_mask = _pad_left(sh_rows, _pad_id(self.sharer_tokenizer))
            sharer_positions = torch.zeros_like(sharer_ids)
            t, s = r_ids.shape[1], sharer_ids.shape[1]
            alignment = torch.zeros((len(r_rows), t, s))
            for b, (rows, pos) in enumerate(zip(aligns, sh_pos, strict=True)):
                sharer_positions[b, s - len(pos) :] = torch.tensor(pos, dtype=torch.long)
                r_off, s_off = t - len(rows), s - len(pos)
                for i, hits in enumerate(rows):
                    for j in hits:
                        alignment[b, r_off + i, s_off + j] = 1.0 / len(hits)
        dev = self.device
        return ContextBatch(
            receiver_ids=r_ids.to(dev),
            receiver_mask=r_mask.to(dev),
            receiver_positions=r_pos.to(dev),
            last_token=torch.tensor(lasts, dtype=torch.long, device=dev),
            context_lengths=r_mask.sum(-1).to(dev),
            sharer_ids=None if sharer_ids is None else sharer_ids.to(dev),
            sharer_mask=None if sharer_mask is None else sharer_mask.to(dev),
            sharer_positions=None if sharer_positions is None else sharer_positions.to(dev),
            alignment=None if alignment is None else alignment.to(dev),
        )

    def prepare_full(self, prompts: Sequence[str], continuations: Sequence[Sequence[int]]) -> ContextBatch:
        """Whole sequences for `fuse_span="all"`: each prompt's receiver tokens followed by its continuation
        token ids, the sharer's tokens of the same text, and their causal alignment. `last_token` is each
        row's last receiver token; `context_lengths` counts every real token."""
        assert self.fuser is not None
        _check_prompts(prompts)
        if len(prompts) != len(continuations):
            raise ConfigError("`continuations` must give one token list per prompt")
        r_rows, lasts, sh_rows, sh_pos, aligns = [], [], [], [], []
        for prompt, cont in zip(prompts, continuations, strict=True):
            if not isinstance(prompt, str):
                raise ConfigError(f"`prompts` must be str, got {type(prompt).__name__}")
            ids, spans = encode_with_offsets(self.receiver_tokenizer, prompt)
            tail, tail_spans = _continuation_spans(self.receiver_tokenizer, cont, len(prompt))
            ids, spans = ids + list(cont), spans + tail_spans
            if not ids:
                raise ConfigError(f"`prompts` item {prompt!r:.60} gives the receiver no tokens")
            s_ids, s_spans, rows = align_causal(spans, self.sharer_tokenizer, prompt + tail)
            r_rows.append(ids)
            lasts.append(ids[-1])
            sh_rows.append(s_ids)
            if self.fuser.config.sharer_positions == "receiver":
                sh_pos.append(sharer_position_ids(spans, s_spans))
            else:
                sh_pos.append(list(range(len(s_ids))))
            aligns.append(rows)
        return self._batch(r_rows, lasts, sh_rows, sh_pos, aligns)

    # ---- prefill and fusion ------------------------------------------------------------------------

    def prefill(self, batch: ContextBatch) -> DynamicCache:
        """The receiver's cache of the contexts, fused with the sharer's when a fuser is set.

        The two prefills run without gradients (both models are frozen); the fusion keeps the fuser's
        gradients when the fuser is in training mode.
        """
        with torch.no_grad():
            cache = DynamicCache()  # no config: full layers, so nothing is dropped by sliding windows
            self.receiver.model(
                input_ids=batch.receiver_ids,
                attention_mask=batch.receiver_mask,
                position_ids=batch.receiver_positions,
                past_key_values=cache,
                use_cache=True,
            )
            if self.fuser is None:
                return cache
            sharer_kv = self._sharer_kv(batch)
        assert batch.alignment is not None
        receiver_kv: list[KV] = [(layer.keys, layer.values) for layer in _layers(cache)]
        fused = self.fuser.fuse(
            receiver_kv,
            sharer_kv,
            batch.alignment,
            receiver_mask=batch.receiver_mask,
            sharer_mask=batch.sharer_mask,
        )
        for layer, (k, v) in zip(_layers(cache), fused, strict=True):
            layer.keys, layer.values = k, v
        return cache

    @torch.no_grad()
    def _sharer_kv(self, batch: ContextBatch) -> list[KV]:
        """The sharer's prefill of `batch`: per sharer layer (K, V), each (B, Hs, S, Ds). The cache has
        no config, so Gemma-3's sliding-window layers keep every token for the fuser."""
        assert self.sharer is not None and batch.sharer_ids is not None
        sharer_cache = DynamicCache()
        self.sharer.model(
            input_ids=batch.sharer_ids,
            attention_mask=batch.sharer_mask,
            position_ids=batch.sharer_positions,
            past_key_values=sharer_cache,
            use_cache=True,
        )
        return [(layer.keys, layer.values) for layer in _layers(sharer_cache)]

    def _aligned_sharer(self, batch: ContextBatch) -> list[KV]:
        """The sharer's KV of `batch`, aligned onto the receiver's columns, per layer-map pair."""
        assert self.fuser is not None and batch.alignment is not None
        sharer_kv = self._sharer_kv(batch)
        with torch.no_grad():
            return [
                self.fuser.align_sharer(sharer_kv[s_layer], batch.alignment, batch.sharer_mask)
                for _, s_layer in self.fuser.config.layer_map
            ]

    def _forward_all(self, batch: ContextBatch) -> tuple[torch.Tensor, _FusingCache]:
        """`fuse_span="all"`: the receiver over whole rows with every position fused; logits (B, T, V)."""
        assert self.fuser is not None
        cache = _FusingCache(self.fuser, self._aligned_sharer(batch), batch.receiver_mask)
        out = self.receiver(
            input_ids=batch.receiver_ids,
            attention_mask=_full_text_masks(self.receiver, batch, cache),
            position_ids=batch.receiver_positions,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits, cache

    def _continuation_logits(
        self, prompts: Sequence[str], continuations: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`fuse_span="all"` counterpart of `_suffix_logits`: (logits (P, L, V), targets (P, L), mask (P, L))
        where position t predicts target t and the mask selects the continuation tokens."""
        batch = self.prepare_full(prompts, continuations)
        logits, _ = self._forward_all(batch)
        width = batch.receiver_ids.shape[1]
        lengths = torch.tensor([len(c) for c in continuations], device=self.device)  # (P,)
        column = torch.arange(1, width, device=self.device)  # (T-1,) the predicted column
        tmask = (column[None, :] >= width - lengths[:, None]).long()  # (P, T-1)
        return logits[:, :-1], batch.receiver_ids[:, 1:], tmask

    # ---- suffixes on the fused cache ---------------------------------------------------------------

    def _suffix_logits(
        self, batch: ContextBatch, cache: DynamicCache, rows: torch.Tensor, suffixes: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits of `suffixes` (each starting after the prompt's last token) for context rows `rows`.

        Returns (logits (P, L, V), targets (P, L), target mask (P, L)): position t predicts target t.
        """
        if rows.numel() != batch.receiver_ids.shape[0] or not torch.equal(
            rows, torch.arange(rows.numel(), device=rows.device)
        ):
            for layer in _layers(cache):
                layer.keys = layer.keys.index_select(0, rows)
                layer.values = layer.values.index_select(0, rows)
        width = 1 + max(len(s) for s in suffixes)
        pad = _pad_id(self.receiver_tokenizer)
        ids = torch.full((len(suffixes), width), pad, dtype=torch.long, device=self.device)
        smask = torch.zeros((len(suffixes), width), dtype=torch.long, device=self.device)
        ids[:, 0] = batch.last_token[rows]
        smask[:, 0] = 1
        for i, s in enumerate(suffixes):
            ids[i, 1 : 1 + len(s)] = torch.tensor(list(s), dtype=torch.long, device=self.device)
            smask[i, 1 : 1 + len(s)] = 1
        mask = torch.cat([batch.receiver_mask[rows], smask], dim=1)  # (P, T + L)
        positions = batch.context_lengths[rows, None] + torch.arange(width, device=self.device)  # (P, L)
        out = self.receiver(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        logits = out.logits[:, :-1]  # (P, L-1, V): position t predicts token t+1
        return logits, ids[:, 1:], smask[:, 1:]

    def option_suffixes(self, options: Sequence[Sequence[str]]) -> tuple[list[int], list[list[int]]]:
        """Every (prompt index, option token ids) pair in order, each option read as " " + option."""
        # A str item is a sequence too: its characters would be scored as the options.
        if isinstance(options, str) or any(isinstance(o, str) or len(o) == 0 for o in options):
            raise ConfigError("`options` must give one non-empty list of options per prompt")
        rows, suffixes = [], []
        for q, opts in enumerate(options):
            for opt in opts:
                toks = self.receiver_tokenizer(" " + opt, add_special_tokens=False)["input_ids"]
                if not toks:
                    raise ConfigError(f"`options` item {opt!r} tokenises to nothing")
                rows.append(q)
                suffixes.append(list(toks))
        return rows, suffixes

    def token_logprobs(
        self, prompts: Sequence[str], rows: Sequence[int], suffixes: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each token of each suffix after its prompt, on one fused prefill.

        Suffix `k` continues `prompts[rows[k]]`; a prompt may have several suffixes (the options of a
        question, or a training response and the options), and its context is prefilled and fused once.
        Returns (log-probs (P, L) float32, mask (P, L)), zero where the mask is 0; the fuser's gradients
        are kept when it is in training mode.
        """
        _check_prompts(prompts)
        if len(rows) != len(suffixes) or not suffixes or any(len(s) == 0 for s in suffixes):
            raise ConfigError("`suffixes` must be a non-empty list of non-empty token lists, one per row")
        if any(not 0 <= q < len(prompts) for q in rows):
            raise ConfigError(f"`rows` must index `prompts` (0 … {len(prompts) - 1}), got {list(rows)!r:.80}")
        if self.fuse_all:
            logits, targets, tmask = self._continuation_logits([prompts[q] for q in rows], suffixes)
        else:
            batch = self.prepare(prompts)
            cache = self.prefill(batch)
            picked_rows = torch.tensor(list(rows), dtype=torch.long, device=self.device)
            logits, targets, tmask = self._suffix_logits(batch, cache, picked_rows, suffixes)
        logits = logits.float()
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return picked * tmask, tmask

    def loss(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean next-token cross-entropy over the receiver's response tokens (token ids per prompt)."""
        if len(prompts) != len(responses) or any(len(r) == 0 for r in responses):
            raise ConfigError("`responses` must give one non-empty token list per prompt")
        logp, mask = self.token_logprobs(prompts, range(len(prompts)), responses)
        return -logp.sum() / mask.sum()

    @torch.no_grad()
    def score(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> list[list[float]]:
        """Sum log-probability of each option (read as " " + option) after each prompt.

        The context is prefilled and fused once per prompt and shared by its options; with
        `fuse_span="all"` every (prompt, option) is one fused row, since the sharer reads the option too.
        """
        totals = self.option_logprobs(prompts, options).tolist()  # (P,)
        out: list[list[float]] = []
        k = 0
        for opts in options:
            out.append([float(x) for x in totals[k : k + len(opts)]])
            k += len(opts)
        return out

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> torch.Tensor:
        """`score` as one float32 tensor (P,) over every (prompt, option) pair in order, keeping the
        fuser's gradients when it is in training mode (the option-level training objective uses it)."""
        if len(prompts) != len(options):
            raise ConfigError("`options` must give one non-empty list of options per prompt")
        rows, suffixes = self.option_suffixes(options)
        return self.token_logprobs(prompts, rows, suffixes)[0].sum(-1)

    # ---- generation --------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_ids(
        self, prompts: Sequence[str], max_new_tokens: int = 32, *, stop_at_eos: bool = True
    ) -> Iterator[torch.Tensor]:
        """Greedy decoding on the fused cache; yields the (B,) next token ids step by step.

        Sequences that produced EOS keep yielding EOS; the loop ends when all have (unless `stop_at_eos`
        is False, as for fixed-length latency probes), or after `max_new_tokens` steps.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}")
        if self.fuse_all:
            yield from self._generate_all(prompts, max_new_tokens, stop_at_eos)
            return
        batch = self.prepare(prompts)
        cache = self.prefill(batch)
        eos = getattr(self.receiver_tokenizer, "eos_token_id", None)
        mask = batch.receiver_mask
        position = batch.context_lengths.clone()  # (B,)
        current = batch.last_token  # (B,)
        done = torch.zeros_like(current, dtype=torch.bool)
        for _ in range(max_new_tokens):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T + t + 1)
            out = self.receiver(
                input_ids=current[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            nxt = out.logits[:, -1].argmax(-1)  # (B,)
            if eos is not None and stop_at_eos:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            yield nxt
            if bool(done.all()):
                return
            current, position = nxt, position + 1

    def _generate_all(
        self, prompts: Sequence[str], max_new_tokens: int, stop_at_eos: bool
    ) -> Iterator[torch.Tensor]:
        """`generate_ids` for `fuse_span="all"`: after each new token the sharer re-reads the whole text
        (its tokenisation of a growing text can change, so its cache is not kept) and the receiver takes
        one cached step whose K/V are fused on the way into its cache."""
        generated: list[list[int]] = [[] for _ in prompts]
        batch = self.prepare_full(prompts, generated)
        logits, cache = self._forward_all(batch)
        eos = getattr(self.receiver_tokenizer, "eos_token_id", None)
        mask = batch.receiver_mask
        position = batch.context_lengths.clone()  # (B,) the next token's position
        nxt = logits[:, -1].argmax(-1)  # (B,)
        done = torch.zeros_like(nxt, dtype=torch.bool)
        for step in range(max_new_tokens):
            if eos is not None and stop_at_eos:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            yield nxt
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            for row, token in zip(generated, nxt.tolist(), strict=True):
                row.append(int(token))
            # Every row grows by one token, so each keeps its left padding and the new token's column is
            # the last column of the grown batch.
            cache.aligned = self._aligned_sharer(self.prepare_full(prompts, generated))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T + step + 1)
            out = self.receiver(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            position = position + 1
            nxt = out.logits[:, -1].argmax(-1)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy completions of `prompts` (batched), special tokens removed."""
        steps = list(self.generate_ids(prompts, max_new_tokens))
        if not steps:
            return ["" for _ in prompts]
        ids = torch.stack(steps, dim=1).tolist()  # (B, N)
        return [self.receiver_tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    def stream(self, prompt: str, max_new_tokens: int = 32) -> Iterator[str]:
        """Greedy completion of one prompt, yielded as text pieces as soon as each token is decoded."""
        ids: list[int] = []
        shown = ""
        eos = getattr(self.receiver_tokenizer, "eos_token_id", None)
        for step in self.generate_ids([prompt], max_new_tokens):
            token = int(step[0])
            if token == eos:
                break
            ids.append(token)
            text = self.receiver_tokenizer.decode(ids, skip_special_tokens=True)
            # A piece that ends inside a multi-byte character decodes to U+FFFD; wait for the rest.
            if text.endswith("\ufffd"):
                continue
            yield text[len(shown) :]
            shown = text
        # Whatever was held back (a character that never completed) goes out as it decodes, so the
        # stream always adds up to `generate`'s text.
        text = self.receiver_tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(shown):
            yield text[len(shown) :]

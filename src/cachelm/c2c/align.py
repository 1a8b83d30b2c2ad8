"""Token alignment between two tokenizers by character spans, and the sharer's position ids.

Both models read the same text. Each tokenizer reports, per token, the character span `[start, end)` it
came from (`return_offsets_mapping`). The rules, for each receiver token:

* **"last" (default)**: the sharer token that covers the receiver token's last character, i.e. the last
  sharer token (with a non-empty span) that starts before the receiver token ends. It has read at least all
  of the receiver token's characters, so its KV summarises the same text.
* **"mean"**: the average of every sharer token whose span overlaps the receiver token's span; when none
  overlaps, the "last" rule.
* **"causal"** (`align_causal`, needs the text): when every position is fused (`fuse_span="all"`), what
  a receiver token reads must depend only on text it has read. One sharer pass over the whole text cannot
  promise that per character: whether the sharer merged "stu"+"de" into "stude" or "st"+"ude" depends on
  the letters after the cut. It can at word boundaries, since the sharer's tokens do not cross
  whitespace (checked, not assumed). So a receiver token ending at character `e` reads the last sharer
  token that ends by `b`, the last whitespace character before `e` — the sharer's view of every word
  completed before the one being read — provided the sharer's tokens up to there are exactly its
  tokenisation of `text[:b]` (then their KV is a function of `text[:b]` alone); otherwise the next
  earlier boundary is tried. Before the first boundary a token reads the sharer's special token at
  offset 0 (BOS), or nothing (an all-zero row). The price: the sharer's view is up to one word behind.

Edge cases, and what the rules do with them:

* *Multi-byte characters* (byte-level BPE splits 東 into two or three tokens): every piece reports the span
  of the whole character, so all pieces map to the sharer token that covers that character.
* *Tokens that split differently* ("café" as one sharer token, "caf"+"é" as two receiver tokens): both
  receiver tokens map to the one sharer token; one receiver token spanning several sharer tokens maps to
  the last of them ("last") or their mean ("mean").
* *Special tokens* (BOS, chat markers) have empty spans `(c, c)`: a receiver special maps to the last
  sharer special at the same offset if there is one (BOS ↔ BOS), else to the last sharer token that starts
  before `c`, else to sharer token 0.
* *Whitespace*: both tokenizers attach a leading space to the next word ("Ġword", "▁word") and report it in
  the span; a receiver token that is only whitespace maps to the sharer token covering that whitespace; if
  the sharer tokenizer dropped it (no sharer token covers it), to the nearest sharer token before it.

Position ids: with `sharer_positions="receiver"` every sharer token gets the position id of the receiver
token it ends in, found by the same rule with the roles swapped, so both caches carry the same positions
and the decoding receiver continues at its own next position.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from cachelm.c2c.config import TokenAlignment
from cachelm.errors import ConfigError

Span = tuple[int, int]


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[Span]]:
    """Token ids (with the tokenizer's own special tokens) and character spans of `text`.

    Raises ConfigError when the tokenizer cannot report offsets (slow, non-Rust tokenizers).
    """
    if not isinstance(text, str):
        raise ConfigError(f"`text` must be a str, got {type(text).__name__}")
    try:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    except NotImplementedError as exc:
        raise ConfigError(f"`tokenizer` {type(tokenizer).__name__} cannot return character offsets") from exc
    ids = list(enc["input_ids"])
    spans: list[Span] = []
    read = 0  # end of the text tokens so far
    for s, e in enc["offset_mapping"]:
        start, end = int(s), int(e)
        if end > start:
            read = max(read, end)
        else:
            # Fast tokenizers report (0, 0) for every special their post-processor adds, an EOS after the
            # text too; taken at its word, such an EOS would pass for a BOS (and be read first).
            start = end = max(start, read)
        spans.append((start, end))
    return ids, spans


class _SpanIndex:
    """Lookups over one token sequence's spans: O(log n) per query."""

    def __init__(self, spans: Sequence[Span]) -> None:
        self.spans = spans
        self.text_tokens = [i for i, (s, e) in enumerate(spans) if e > s]
        # Starts of non-empty tokens are non-decreasing for every tokenizer we know; sorting keeps bisect
        # correct even if one is not, at the price of "last" meaning "last by start".
        self.text_tokens.sort(key=lambda i: spans[i][0])
        self.starts = [spans[i][0] for i in self.text_tokens]
        self.by_end = sorted(self.text_tokens, key=lambda i: spans[i][1])
        self.ends = [spans[i][1] for i in self.by_end]
        self.specials: dict[int, int] = {}
        for i, (s, e) in enumerate(spans):
            if e <= s:
                self.specials[s] = i  # the last special at each offset wins

    def last_starting_before(self, char: int) -> int | None:
        """The last text token whose span starts before `char`, or None."""
        k = bisect.bisect_left(self.starts, char)
        return self.text_tokens[k - 1] if k > 0 else None

    def last_ending_by(self, char: int) -> int | None:
        """The text token with the largest end `<= char` (the last such by end), or None."""
        k = bisect.bisect_right(self.ends, char)
        return self.by_end[k - 1] if k > 0 else None

    def overlapping(self, start: int, end: int) -> list[int]:
        """Text tokens whose spans overlap `[start, end)`, in order."""
        k = bisect.bisect_left(self.starts, end)
        return [i for i in self.text_tokens[:k] if self.spans[i][1] > start]

    def match(self, span: Span) -> int:
        """The token that the "last" rule maps `span` (from the other tokenizer) to."""
        start, end = span
        if end <= start:
            if start in self.specials:
                return self.specials[start]
            found = self.last_starting_before(start)
        else:
            found = self.last_starting_before(end)
        return found if found is not None else 0


def align_tokens(
    receiver_spans: Sequence[Span], sharer_spans: Sequence[Span], mode: TokenAlignment = "last"
) -> list[list[int]]:
    """For each receiver token, the sharer token indices whose KV it reads (one for "last")."""
    if not sharer_spans:
        raise ConfigError("`sharer_spans` is empty: the sharer has no tokens to align to")
    if mode == "causal":
        raise ConfigError("`mode` 'causal' needs the text and the sharer tokenizer: use `align_causal`")
    if mode not in ("last", "mean"):
        raise ConfigError(f"`mode` must be 'last' or 'mean', got {mode!r}")
    index = _SpanIndex(sharer_spans)
    out: list[list[int]] = []
    for span in receiver_spans:
        start, end = span
        if mode == "mean" and end > start:
            hits = index.overlapping(start, end)
            if hits:
                out.append(hits)
                continue
        out.append([index.match(span)])
    return out


def align_causal(
    receiver_spans: Sequence[Span], sharer_tokenizer: Any, text: str
) -> tuple[list[int], list[Span], list[list[int]]]:
    """The sharer's tokens of `text` (ids, spans) and, per receiver token, the sharer tokens it reads
    under the "causal" rule (module docstring): one index, or none. Tokenises `text[:b]` once per
    whitespace boundary `b` it checks."""
    s_ids, s_spans = encode_with_offsets(sharer_tokenizer, text)
    if not s_ids:
        raise ConfigError(f"`text` {text[:60]!r} gives the sharer no tokens")
    index = _SpanIndex(s_spans)
    blanks = [i for i, ch in enumerate(text) if ch.isspace()]
    stable: dict[int, int | None] = {}  # boundary -> last sharer token read there (None: not stable)

    def read_at(b: int) -> int | None:
        if b not in stable:
            j = index.last_ending_by(b)
            ids, prefix_spans = encode_with_offsets(sharer_tokenizer, text[:b])
            if j is not None:
                # Specials a tokenizer appends after the text (EOS) are not in the whole text's tokens there.
                ids = ids[: 1 + max((k for k, (s, e) in enumerate(prefix_spans) if e > s), default=-1)]
            # Specials before the first text token (BOS) count as read at every boundary.
            last = j if j is not None else len(ids) - 1
            stable[b] = last if last >= 0 and ids == s_ids[: last + 1] else None
        return stable[b]

    bos = index.specials.get(0)
    rows: list[list[int]] = []
    for start, end in receiver_spans:
        k = bisect.bisect_left(blanks, max(start, end))  # blanks[:k] were read by this token
        found = None
        while k > 0 and found is None:
            found = read_at(blanks[k - 1])
            k -= 1
        rows.append([found] if found is not None else [bos] if bos is not None else [])
    return s_ids, s_spans, rows


def sharer_position_ids(receiver_spans: Sequence[Span], sharer_spans: Sequence[Span]) -> list[int]:
    """Position id of each sharer token in receiver coordinates (the receiver token it ends in).

    The result never decreases when the spans do not, so causal attention stays consistent.
    """
    if not receiver_spans:
        raise ConfigError("`receiver_spans` is empty: nothing to take positions from")
    index = _SpanIndex(receiver_spans)
    positions = [index.match(span) for span in sharer_spans]
    # A sharer special token before any receiver text (e.g. BOS) would otherwise get 0 while a later one
    # could get less than its predecessor; a running maximum keeps the sequence monotone.
    for i in range(1, len(positions)):
        positions[i] = max(positions[i], positions[i - 1])
    return positions


def context_char_end(receiver_spans: Sequence[Span], num_context_tokens: int) -> int:
    """The character where the receiver's context (its first `num_context_tokens` tokens) ends."""
    return max((e for _, e in receiver_spans[:num_context_tokens]), default=0)

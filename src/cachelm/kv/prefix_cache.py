"""The KV prefix cache: token blocks → chained hashes → the longest cached prefix, across tiers.

    tokens ─► full blocks of `block_size` ─► chain_block_hashes(model fingerprint, tenant salt)
          ─► match: walk the chain while some tier (or the demotion queue) holds the block,
             capped one token short of the prompt (the last token's logits must be computed)
          ─► load: decode every block straight into one (P, L, 2, H, D) buffer on the model's device,
             promoting blocks found below the top tier to the top tier; blocks on disk or in Redis
             are read (and checksummed) a few at a time on a thread pool, ahead of the decoding
    store: new full blocks go to the top tier; what a tier evicts is demoted to the next tier by a
           write-behind worker thread (the serving thread never waits on disk or Redis for a store)

Tiers are inclusive: a promoted block stays where it was, so a disk or Redis copy survives a restart.
A failing tier (BackendError) is a miss plus a counter (``stats.backend_errors``), never a failed request.
Every block carries its tenant's `owner_tag` through every tier, so `purge_tenant` erases a tenant's KV
everywhere it went (a block's hash alone does not say whose it is).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from cachelm.errors import BackendError, ConfigError
from cachelm.keys import BlockHash, ModelFingerprint, chain_block_hashes
from cachelm.kv.codecs import Codec, EncodedBlock, codec_for, dtype_name
from cachelm.kv.layout import KVLayout
from cachelm.kv.tiers import RedisTier, Tier


def owner_tag(tenant_salt: bytes) -> str:
    """The owner stored with a tenant's blocks: a digest of its salt (the salt itself, which keys every
    block of the tenant, never leaves the process)."""
    if not isinstance(tenant_salt, bytes):
        raise ConfigError(f"`tenant_salt` must be bytes, got {type(tenant_salt).__name__}")
    return hashlib.sha256(b"cachelm/kv-owner/v1\0" + tenant_salt).hexdigest()[:32]


def layout_tag(layout: KVLayout) -> bytes:
    """32 bytes that differ between layouts (shape, dtype, sliding windows): folded into every block hash."""
    shape = [layout.num_layers, layout.num_kv_heads, layout.head_dim, dtype_name(layout.dtype)]
    return hashlib.sha256(
        b"cachelm/kv-layout/v1\0" + json.dumps([*shape, layout.sliding_windows]).encode()
    ).digest()


def _encoded(codec: Codec, kv: torch.Tensor, owner: str) -> EncodedBlock:
    """`kv` encoded by `codec` for the tenant `owner`: every way a block enters a tier goes through here."""
    return replace(codec.encode(kv), owner=owner)


@dataclass(kw_only=True)
class KVStats:
    """Counters of one prefix cache (monotonic; read them, never reset them in place). Bumped through
    `add` from the serving thread, the reader pool and the write-behind worker: ``+=`` on an attribute
    is a read and a write, and two threads interleaving them lose counts."""

    lookups: int = 0
    hit_tokens: int = 0  # prompt tokens served from the cache
    miss_tokens: int = 0  # prompt tokens computed
    stored_blocks: int = 0  # new blocks a tier took, or queued for a lower tier (which may yet refuse them)
    demoted_blocks: int = 0
    promoted_blocks: int = 0
    backend_errors: int = 0
    tier_hits: dict[str, int] = field(default_factory=dict)  # blocks read, by tier name
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def tier_hit(self, tier: str) -> None:
        with self._lock:
            self.tier_hits[tier] = self.tier_hits.get(tier, 0) + 1


@dataclass(frozen=True, kw_only=True)
class PrefixMatch:
    """The cached prefix of a prompt: its block hashes and where each block lives."""

    hashes: tuple[BlockHash, ...]  # every full block of the prompt
    tiers: tuple[int, ...]  # tier index per matched block (-1: in the demotion queue)
    block_size: int

    @property
    def num_blocks(self) -> int:
        return len(self.tiers)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


class KVPrefixCache:
    """Longest-prefix KV reuse for one model over a list of tiers (fastest first)."""

    def __init__(
        self,
        *,
        layout: KVLayout,
        model: ModelFingerprint,
        tiers: Sequence[Tier],
        block_size: int = 64,
        write_through: bool = False,
        read_threads: int | None = None,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ConfigError(f"`block_size` must be an int > 0, got {block_size!r}")
        if read_threads is None:
            read_threads = min(8, os.cpu_count() or 1)
        if isinstance(read_threads, bool) or not isinstance(read_threads, int) or read_threads <= 0:
            raise ConfigError(f"`read_threads` must be an int > 0, got {read_threads!r}")
        if not tiers:
            raise ConfigError("`tiers` must name at least one tier")
        self.layout = layout
        self.model = model
        # The fingerprint names the model, but a caller-chosen `model_id` can name two differently shaped
        # models (and a hand-made fingerprint may leave out the dtype): blocks of another layout must never
        # answer under the same hash (a crash or, where shapes broadcast, a wrong tensor). A fixed-length
        # prefix of the salt keeps the hashed bytes unambiguous.
        self._layout_tag = layout_tag(layout)
        self.tiers = list(tiers)
        self.block_size = block_size
        self.write_through = write_through  # also copy every new block to every lower tier (persistence)
        self.read_threads = read_threads  # blocks of disk and Redis tiers read at once by `load`
        # Its threads start with the first read submitted, so a cache with only memory tiers starts none.
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="kv-read")
        for tier in self.tiers[:-1]:
            tier.keep_evicted = True  # evicted data is demoted, so the tier must hand it over
        self.stats = KVStats()
        self._inflight: dict[BlockHash, EncodedBlock] = {}  # demotions not yet written below
        self._inflight_lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, BlockHash, EncodedBlock] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._demote_loop, name="kv-write-behind", daemon=True)
        self._worker.start()

    # ---- hashing and matching ------------------------------------------------------------------------
    def block_hashes(self, token_ids: Sequence[int], *, tenant_salt: bytes) -> list[BlockHash]:
        if not isinstance(tenant_salt, bytes):
            raise ConfigError(f"`tenant_salt` must be bytes, got {type(tenant_salt).__name__}")
        salt = self._layout_tag + tenant_salt
        return chain_block_hashes(token_ids, self.block_size, model=self.model, tenant_salt=salt)

    def match(self, token_ids: Sequence[int], *, tenant_salt: bytes) -> PrefixMatch:
        """The longest cached prefix of `token_ids`, at most ``len(token_ids) - 1`` tokens."""
        hashes = self.block_hashes(token_ids, tenant_salt=tenant_salt)
        usable = min(len(hashes), max(len(token_ids) - 1, 0) // self.block_size)
        where: list[int] = []
        for i in range(usable):
            tier_index = self._find(hashes[i])
            if tier_index is None:
                tier_index = self._probe_shared(hashes[i])
                if tier_index is None:
                    break
            where.append(tier_index)
        self.stats.add("lookups")
        return PrefixMatch(hashes=tuple(hashes), tiers=tuple(where), block_size=self.block_size)

    def _find(self, block_hash: BlockHash) -> int | None:
        for index, tier in enumerate(self.tiers):
            if block_hash in tier:
                return index
        with self._inflight_lock:
            return -1 if block_hash in self._inflight else None

    def _probe_shared(self, block_hash: BlockHash) -> int | None:
        """Ask shared tiers (Redis) whether another process stored `block_hash`."""
        for index, tier in enumerate(self.tiers):
            if isinstance(tier, RedisTier):
                try:
                    if tier.probe([block_hash])[0]:
                        return index
                except BackendError:
                    self.stats.add("backend_errors")
        return None

    # ---- loading -------------------------------------------------------------------------------------
    def load(
        self, match: PrefixMatch, *, device: torch.device | str | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The matched prefix as one ``(P, L, 2, H, D)`` tensor on `device`, or written into the first P rows
        of `out` (e.g. a static KV buffer; then the returned tensor is a view of `out`).

        P can be shorter than ``match.num_tokens`` when a block vanished since `match` (evicted, corrupt,
        tier down): loading stops at the first block it cannot read, so the result is always a prefix.
        """
        bs = self.block_size
        if out is None:
            if device is None:
                raise ConfigError("`device` or `out` is required")
            out = torch.empty(
                self.layout.block_shape(match.num_tokens),
                dtype=self.layout.dtype,
                device=torch.device(device),
            )
        elif out.shape[0] < match.num_tokens or tuple(out.shape[1:]) != self.layout.block_shape(0)[1:]:
            raise ConfigError(
                f"`out` must hold ({match.num_tokens}, ...) of the layout, got {tuple(out.shape)}"
            )
        loaded = 0
        promote: list[tuple[int, str]] = []
        for i, block in enumerate(self._blocks(match)):
            if block is None:
                break
            codec_for(block).decode(block, out=out[i * bs : (i + 1) * bs])
            if match.tiers[i] != 0:
                promote.append((i, block.owner))
            loaded += 1
        # Promote after reading everything, never evicting an earlier block of this prefix (see `store`).
        for i, owner in promote:
            self._promote(match.hashes[i], out[i * bs : (i + 1) * bs], owner, keep=match.hashes[:i])
        self._touch_first_last(match.hashes[:loaded], match.tiers)
        return out[: loaded * bs]

    def _blocks(self, match: PrefixMatch) -> Iterator[EncodedBlock | None]:
        """The matched blocks in order (None where one cannot be read). Blocks of tiers outside memory are
        read up to 2 × `read_threads` blocks ahead of the one yielded, on the reader pool."""
        ahead: dict[int, Future[EncodedBlock | None]] = {}
        submitted = 0
        try:
            for i, tier_index in enumerate(match.tiers):
                while submitted < min(match.num_blocks, i + 2 * self.read_threads):
                    j = submitted
                    submitted += 1
                    if match.tiers[j] >= 0 and not self.tiers[match.tiers[j]].in_memory:
                        ahead[j] = self._readers.submit(self.tiers[match.tiers[j]].get, match.hashes[j])
                yield self._read(match.hashes[i], tier_index, ahead.pop(i, None))
        finally:  # the caller stopped early (a block could not be read): drop the reads not yet started
            for future in ahead.values():
                future.cancel()

    def _read(
        self, block_hash: BlockHash, tier_index: int, pending: Future[EncodedBlock | None] | None = None
    ) -> EncodedBlock | None:
        """One block from its tier, or the result of its read already `pending` on the reader pool."""
        if tier_index == -1:
            with self._inflight_lock:
                return self._inflight.get(block_hash)
        tier = self.tiers[tier_index]
        try:
            block = tier.get(block_hash) if pending is None else pending.result()
        except BackendError:
            self.stats.add("backend_errors")
            return None
        if block is not None:
            self.stats.tier_hit(tier.name)
        return block

    def _promote(
        self, block_hash: BlockHash, block: torch.Tensor, owner: str, *, keep: Sequence[BlockHash]
    ) -> None:
        top = self.tiers[0]
        # Clone: the slice belongs to the caller's prefix buffer, which the model's cache will own.
        if self._put(0, block_hash, _encoded(top.codec, block.clone(), owner), keep=frozenset(keep)):
            self.stats.add("promoted_blocks")

    def _touch_first_last(self, hashes: Sequence[BlockHash], tiers: Sequence[int] = ()) -> None:
        """Mark a prefix's blocks used, its last block first: its first blocks become the most recently
        used, so LRU takes a prefix from its end. Taking its first block would strand every later one
        (unreachable, yet holding their bytes)."""
        for i in reversed(range(len(hashes))):
            self.tiers[0].touch(hashes[i])
            if i < len(tiers) and tiers[i] > 0:
                self.tiers[tiers[i]].touch(hashes[i])

    # ---- storing -------------------------------------------------------------------------------------
    def store(self, token_ids: Sequence[int], kv: torch.Tensor, *, tenant_salt: bytes, start: int = 0) -> int:
        """Store the full blocks of `token_ids` whose KV is in `kv`; return how many were new.

        `kv` is ``(N, L, 2, H, D)`` for tokens ``start .. start + N - 1`` of `token_ids`; only blocks that lie
        entirely inside that range (and are not cached yet) are stored.
        """
        expected = self.layout.block_shape(kv.shape[0])
        if kv.dim() != 5 or tuple(kv.shape) != expected:
            raise ConfigError(f"`kv` must have shape {expected}, got {tuple(kv.shape)}")
        if not 0 <= start <= len(token_ids) or start + kv.shape[0] > len(token_ids):
            raise ConfigError(
                f"`start` {start} + {kv.shape[0]} tokens exceeds the {len(token_ids)} token ids"
            )
        bs = self.block_size
        new = 0
        owner = owner_tag(tenant_salt)
        hashes = self.block_hashes(token_ids, tenant_salt=tenant_salt)
        # A block never evicts an earlier block of its own prompt: a prompt longer than the top tier keeps
        # its first blocks there and hands the rest down (evicting the first ones would leave a prefix
        # whose later blocks can never be reached, and the same prompt would miss on every repeat).
        earlier: set[BlockHash] = set()
        for i, block_hash in enumerate(hashes):
            lo, hi = i * bs - start, (i + 1) * bs - start
            if lo < 0 or hi > kv.shape[0] or self._find(block_hash) is not None:
                earlier.add(block_hash)
                continue
            block = kv[lo:hi].clone()  # owned copy: `kv` may be a view of a live cache
            self._put(0, block_hash, _encoded(self.tiers[0].codec, block, owner), keep=earlier)
            earlier.add(block_hash)
            if self.write_through:
                stored = self.tiers[0].get(block_hash)
                for lower in range(1, len(self.tiers)):
                    self._enqueue(lower - 1, block_hash, stored)
            if self._find(block_hash) is not None:  # not refused or failed everywhere
                new += 1
        self._touch_first_last(hashes)
        self.stats.add("stored_blocks", new)
        return new

    def _put(
        self,
        tier_index: int,
        block_hash: BlockHash,
        block: EncodedBlock,
        *,
        keep: Collection[BlockHash] = (),
    ) -> bool:
        """Put `block` into one tier, demoting what it evicts; whether that tier now holds it. A block the
        tier refuses (larger than its budget, or room only by evicting `keep`) goes to the next tier like
        an evicted one."""
        try:
            evicted = self.tiers[tier_index].put(block_hash, block, keep=keep)
        except BackendError:
            self.stats.add("backend_errors")
            return False
        for victim_hash, data in evicted:
            if data is not None:
                self._enqueue(tier_index, victim_hash, data)
        return all(victim_hash != block_hash for victim_hash, _ in evicted)

    def _enqueue(self, from_tier: int, block_hash: BlockHash, block: EncodedBlock | None) -> None:
        if block is None or from_tier + 1 >= len(self.tiers):
            return
        with self._inflight_lock:
            self._inflight[block_hash] = block
        self._queue.put((from_tier, block_hash, block))

    def _demote_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                from_tier, block_hash, block = item
                target = from_tier + 1
                tier = self.tiers[target]
                if block_hash in tier:
                    tier.touch(block_hash)
                else:
                    if block.codec != tier.codec.name:
                        decoded = codec_for(block).decode(block, device="cpu")
                        block = _encoded(tier.codec, decoded, block.owner)
                    if self._put(target, block_hash, block):
                        self.stats.add("demoted_blocks")
                with self._inflight_lock:
                    self._inflight.pop(block_hash, None)
            except Exception:  # the worker must survive a bad block or a failing tier
                self.stats.add("backend_errors")
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued demotion has been written."""
        self._queue.join()

    def purge_tenant(self, tenant_salt: bytes) -> int:
        """Erase every block stored for the tenant of `tenant_salt`, from every tier (in Redis, also the
        blocks other processes stored for it); returns how many were deleted. Pending demotions are
        written first, so none lands after the purge. A tier that fails raises BackendError: an erasure
        is not a cache lookup, and the caller must learn it did not finish."""
        owner = owner_tag(tenant_salt)
        self.flush()
        return sum(tier.purge_owner(owner) for tier in self.tiers)

    def close(self) -> None:
        """Finish pending demotions, stop the worker and close the tiers."""
        self.flush()
        self._queue.put(None)
        self._worker.join(timeout=10)
        self._readers.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

"""Prefix cache mechanics: hashing isolation, the one-token cap, demotion, promotion, failing tiers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis
import torch

from cachelm.errors import BackendError, ConfigError
from cachelm.keys import BlockHash, ModelFingerprint, tenant_salt
from cachelm.kv.codecs import EncodedBlock, Int8Codec, RawCodec
from cachelm.kv.layout import KVLayout
from cachelm.kv.prefix_cache import KVPrefixCache, owner_tag
from cachelm.kv.tiers import DiskTier, MemoryTier, RedisTier, Tier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float32, sliding_windows=(None, None))
MODEL = ModelFingerprint(model_id="m", revision="r1", dtype="float32")
SALT = tenant_salt("alice")
BS = 4
BLOCK_BYTES = BS * LAYOUT.bytes_per_token


def _kv(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(LAYOUT.block_shape(n), generator=torch.Generator().manual_seed(seed))


def _cache(*tiers: Tier, model: ModelFingerprint = MODEL) -> KVPrefixCache:
    return KVPrefixCache(
        layout=LAYOUT, model=model, tiers=list(tiers) or [MemoryTier(capacity_bytes=1 << 20)], block_size=BS
    )


def test_store_then_load_exact_prefix() -> None:
    pc = _cache()
    ids, kv = list(range(10)), _kv(10)
    assert pc.store(ids, kv, tenant_salt=SALT) == 2  # 2 full blocks of 4; the last 2 tokens are partial
    match = pc.match(ids, tenant_salt=SALT)
    assert match.num_tokens == 8 and match.tiers == (0, 0)
    assert torch.equal(pc.load(match, device="cpu"), kv[:8])


def test_hit_is_capped_one_token_short_of_the_prompt() -> None:
    pc = _cache()
    ids = list(range(8))
    pc.store(ids, _kv(8), tenant_salt=SALT)
    assert pc.match(ids, tenant_salt=SALT).num_tokens == 4  # 8 tokens cached, but the last must be computed
    assert pc.match([*ids, 99], tenant_salt=SALT).num_tokens == 8


def test_partial_block_and_divergence() -> None:
    pc = _cache()
    pc.store(list(range(12)), _kv(12), tenant_salt=SALT)
    assert pc.match([*range(6), 77, 78, 79, 80], tenant_salt=SALT).num_tokens == 4  # diverges in block 2
    assert pc.match([77, *range(1, 12)], tenant_salt=SALT).num_tokens == 0  # chained: no later-block hit


def test_tenant_and_model_isolation() -> None:
    tier = MemoryTier(capacity_bytes=1 << 20)
    pc = _cache(tier)
    ids = list(range(9))
    pc.store(ids, _kv(9), tenant_salt=SALT)
    assert pc.match(ids, tenant_salt=tenant_salt("bob")).num_tokens == 0
    other_revision = _cache(tier, model=ModelFingerprint(model_id="m", revision="r2", dtype="float32"))
    assert other_revision.match(ids, tenant_salt=SALT).num_tokens == 0


def test_store_with_offset_only_stores_covered_blocks() -> None:
    pc = _cache()
    ids = list(range(12))
    assert pc.store(ids, _kv(6), tenant_salt=SALT, start=6) == 1  # tokens 6..11 cover block 2 (8..11) only
    assert pc.store(ids, _kv(8), tenant_salt=SALT, start=4) == 1  # blocks 1 and 2; block 2 is already there
    assert pc.match(ids, tenant_salt=SALT).num_tokens == 0  # block 0 missing: no prefix


def test_eviction_demotes_to_the_next_tier_and_hits_promote(tmp_path: Path) -> None:
    top = MemoryTier(capacity_bytes=2 * BLOCK_BYTES)
    disk = DiskTier(tmp_path, capacity_bytes=1 << 20, codec=Int8Codec())
    pc = _cache(top, disk)
    ids, kv = list(range(17)), _kv(17)
    pc.store(ids, kv, tenant_salt=SALT)  # 4 blocks into a 2-block top tier
    pc.flush()
    hashes = pc.block_hashes(ids, tenant_salt=SALT)
    # A prompt keeps its first blocks on top: its later blocks never evict them, they go down instead.
    assert list(top) == hashes[1::-1] and set(disk) == set(hashes[2:])
    assert pc.stats.demoted_blocks == 2
    other = [100 + t for t in range(9)]
    pc.store(other, _kv(9, seed=1), tenant_salt=SALT)  # another prompt pushes the first two down too
    pc.flush()
    assert set(disk) == set(hashes) and pc.stats.demoted_blocks == 4
    match = pc.match(ids, tenant_salt=SALT)
    assert match.tiers == (1, 1, 1, 1)
    prefix = pc.load(match, device="cpu")
    assert torch.allclose(prefix, kv[:16], atol=0.05)  # int8 on disk
    # Blocks 0 and 1 evict the other prompt's blocks; 2 and 3 would evict 0 and 1, so they stay below.
    assert pc.stats.promoted_blocks == 2 and pc.stats.tier_hits == {"disk": 4}
    pc.flush()
    assert set(top) == set(hashes[:2])
    assert pc.match(ids, tenant_salt=SALT).tiers == (0, 0, 1, 1)
    pc.close()


def test_redis_shared_between_two_caches(redis_url: str, namespace: str) -> None:
    writer = _cache(
        MemoryTier(capacity_bytes=1 << 20), RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    )
    writer.write_through = True
    ids, kv = list(range(9)), _kv(9)
    writer.store(ids, kv, tenant_salt=SALT)
    writer.flush()
    reader = _cache(
        MemoryTier(capacity_bytes=1 << 20), RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    )
    match = reader.match(ids, tenant_salt=SALT)
    assert match.tiers == (1, 1)
    assert torch.equal(reader.load(match, device="cpu"), kv[:8])
    writer.tiers[1].clear()


def test_failing_tier_is_a_miss_not_an_error(redis_url: str, namespace: str) -> None:
    tier = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    pc = _cache(MemoryTier(capacity_bytes=BLOCK_BYTES), tier)
    ids = list(range(9))
    pc.store(ids, _kv(9), tenant_salt=SALT)
    pc.flush()
    tier.client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # the server "goes away"
    match = pc.match(ids, tenant_salt=SALT)
    assert match.tiers == (0, 1)
    assert pc.load(match, device="cpu").shape[0] == BS  # block 1 unreadable: the prefix ends, no exception
    assert pc.stats.backend_errors >= 1


def test_purge_tenant_erases_its_blocks_from_every_tier_and_keeps_the_others(tmp_path: Path) -> None:
    top = MemoryTier(capacity_bytes=2 * BLOCK_BYTES)
    pc = _cache(top, DiskTier(tmp_path, capacity_bytes=1 << 20, codec=Int8Codec()))
    bob = tenant_salt("bob")
    ids, kv = list(range(17)), _kv(17)
    pc.store(ids, kv, tenant_salt=SALT)  # alice: 4 blocks, 2 of them demoted to disk (re-encoded to int8)
    pc.store(ids, kv, tenant_salt=bob)  # bob: the same tokens, his own blocks; pushes alice's down
    pc.flush()
    match = pc.match(ids, tenant_salt=SALT)
    assert match.num_blocks == 4 and 1 in match.tiers
    pc.load(match, device="cpu")  # promotes alice's blocks back to memory: they keep her as owner
    pc.flush()

    def on_disk(salt: bytes) -> int:
        return len(list(tmp_path.glob(f"*/*.{owner_tag(salt)}.safetensors")))

    in_memory = sum(h in top for h in pc.block_hashes(ids, tenant_salt=SALT))
    alice_on_disk, bob_on_disk = on_disk(SALT), on_disk(bob)
    assert in_memory > 0 and alice_on_disk > 0 and bob_on_disk > 0
    assert pc.purge_tenant(SALT) == alice_on_disk + in_memory
    assert pc.match(ids, tenant_salt=SALT).num_blocks == 0 and on_disk(SALT) == 0
    assert pc.match(ids, tenant_salt=bob).num_blocks == 4 and on_disk(bob) == bob_on_disk  # untouched
    pc.close()
    reopened = _cache(DiskTier(tmp_path, capacity_bytes=1 << 20, codec=Int8Codec()))  # a restart
    assert reopened.match(ids, tenant_salt=SALT).num_blocks == 0
    assert reopened.purge_tenant(bob) == bob_on_disk  # found by their owner after the restart
    assert not list(tmp_path.glob("*/*.safetensors"))
    reopened.close()


def test_purge_tenant_reaches_blocks_another_process_stored_in_redis(redis_url: str, namespace: str) -> None:
    def shared() -> KVPrefixCache:
        pc = _cache(
            MemoryTier(capacity_bytes=1 << 20),
            RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20),
        )
        pc.write_through = True
        return pc

    writer, eraser = shared(), shared()
    ids = list(range(9))
    writer.store(ids, _kv(9), tenant_salt=SALT)
    writer.store(ids, _kv(9), tenant_salt=tenant_salt("bob"))
    writer.flush()
    assert eraser.purge_tenant(SALT) == 2  # the eraser never saw alice's blocks; Redis' owner set did
    writer.tiers[0].clear()  # the writer's memory copy is its own process' (erased there by its own call)
    stale = writer.match(ids, tenant_salt=SALT)  # its Redis index still lists them ...
    assert stale.tiers == (1, 1)
    assert writer.load(stale, device="cpu").shape[0] == 0  # ... but they are gone: no prefix
    assert writer.match(ids, tenant_salt=SALT).num_blocks == 0  # and now forgotten
    bob = writer.match(ids, tenant_salt=tenant_salt("bob"))
    assert writer.load(bob, device="cpu").shape[0] == 8
    writer.tiers[1].clear()


def test_a_failing_tier_fails_the_purge(redis_url: str, namespace: str) -> None:
    tier = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    pc = _cache(MemoryTier(capacity_bytes=1 << 20), tier)
    tier.client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    with pytest.raises(BackendError, match="redis tier purge failed"):
        pc.purge_tenant(SALT)  # an erasure that did not happen is reported, never a silent miss


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`block_size`"):
        KVPrefixCache(layout=LAYOUT, model=MODEL, tiers=[MemoryTier(capacity_bytes=10)], block_size=0)
    pc = _cache()
    with pytest.raises(ValueError, match="`kv`"):
        pc.store(list(range(8)), torch.zeros(8, 2, 2, 1, 4), tenant_salt=SALT)
    with pytest.raises(ValueError, match="`start`"):
        pc.store(list(range(8)), _kv(8), tenant_salt=SALT, start=4)
    assert RawCodec().name == "raw"


class _MeetingDiskTier(DiskTier):
    """A disk tier whose reads wait (at most 10 s) until `parties` reads are in flight at once."""

    def __init__(self, path: Path, parties: int) -> None:
        super().__init__(path, capacity_bytes=1 << 20)
        self.meeting = threading.Barrier(parties, timeout=10)

    def _read(self, block_hash: BlockHash) -> EncodedBlock | None:
        self.meeting.wait()
        return super()._read(block_hash)


def test_disk_blocks_are_read_in_parallel_and_load_the_same_prefix(tmp_path: Path) -> None:
    ids, kv = list(range(4 * BS + 1)), _kv(4 * BS + 1)
    disk = _MeetingDiskTier(tmp_path, parties=4)
    pc = KVPrefixCache(layout=LAYOUT, model=MODEL, tiers=[disk], block_size=BS, read_threads=4)
    pc.store(ids, kv, tenant_salt=SALT)
    pc.flush()
    match = pc.match(ids, tenant_salt=SALT)
    # all four blocks must be in flight together, or the barrier breaks and the load raises
    assert torch.equal(pc.load(match, device="cpu"), kv[: 4 * BS])
    assert pc.stats.tier_hits == {"disk": 4}
    pc.close()


def test_parallel_load_stops_at_the_first_unreadable_block(tmp_path: Path) -> None:
    ids, kv = list(range(6 * BS + 1)), _kv(6 * BS + 1)
    disk = DiskTier(tmp_path, capacity_bytes=1 << 20)
    pc = KVPrefixCache(layout=LAYOUT, model=MODEL, tiers=[disk], block_size=BS, read_threads=3)
    pc.store(ids, kv, tenant_salt=SALT)
    pc.flush()
    match = pc.match(ids, tenant_salt=SALT)
    disk._path(match.hashes[2]).unlink()  # block 2 vanishes behind the tier's back
    assert torch.equal(pc.load(match, device="cpu"), kv[: 2 * BS])  # blocks 3..5 are not used
    assert match.hashes[2] not in disk and pc.match(ids, tenant_salt=SALT).num_tokens == 2 * BS
    pc.close()


def test_read_threads_must_be_positive() -> None:
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ConfigError, match="`read_threads`"):
            KVPrefixCache(layout=LAYOUT, model=MODEL, tiers=[MemoryTier(capacity_bytes=10)], read_threads=bad)

"""The tier contract, run against every tier: CPU memory, disk, Redis (real server) and GPU (marked)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
import torch

from cachelm.crypto import Keyring, envelope_key_id
from cachelm.errors import BackendError, ConfigError, IntegrityError
from cachelm.keys import BlockHash
from cachelm.kv.codecs import EncodedBlock, RawCodec
from cachelm.kv.tiers import DiskTier, MemoryTier, RedisTier, Tier

TierFactory = Callable[[int], Tier]


def _h(i: int) -> BlockHash:
    return BlockHash(bytes([i]) * 32)


def _block(seed: int) -> EncodedBlock:
    x = torch.randn(4, 2, 2, 1, 8, generator=torch.Generator().manual_seed(seed))  # 512 bytes as float32
    return RawCodec().encode(x)


def _size(tier: Tier) -> int:
    """Bytes one block occupies in `tier` (memory: tensors; disk/Redis: safetensors bytes)."""
    probe = tier.put(_h(255), _block(255))
    assert probe == []
    size = tier.used_bytes
    tier.remove(_h(255))
    assert tier.used_bytes == 0
    return size


@pytest.fixture(
    params=["cpu", "disk", "disk-sealed", "redis", "redis-sealed", pytest.param("gpu", marks=pytest.mark.gpu)]
)
def make_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TierFactory]:
    made: list[Tier] = []
    keyring = Keyring.generate() if request.param.endswith("-sealed") else None

    def factory(capacity: int) -> Tier:
        tier: Tier
        if request.param == "cpu":
            tier = MemoryTier(capacity_bytes=capacity, device="cpu")
        elif request.param == "gpu":
            tier = MemoryTier(capacity_bytes=capacity, device="cuda")
        elif request.param.startswith("disk"):
            tier = DiskTier(tmp_path / "kv", capacity_bytes=capacity, keyring=keyring)
        else:
            url = request.getfixturevalue("redis_url")
            ns = request.getfixturevalue("namespace")
            tier = RedisTier(url, namespace=ns, capacity_bytes=capacity, keyring=keyring)
        made.append(tier)
        return tier

    yield factory
    for tier in made:
        tier.clear()
        tier.close()


def test_miss_is_none(make_tier: TierFactory) -> None:
    tier = make_tier(1 << 20)
    assert tier.get(_h(1)) is None and _h(1) not in tier and len(tier) == 0


def test_put_get_round_trip(make_tier: TierFactory) -> None:
    tier = make_tier(1 << 20)
    block = _block(1)
    assert tier.put(_h(1), block) == []
    got = tier.get(_h(1))
    assert got is not None and got.codec == "raw" and got.num_tokens == 4
    assert torch.equal(got.tensors["kv"].cpu(), block.tensors["kv"])
    assert _h(1) in tier and len(tier) == 1 and tier.used_bytes > 0


def test_lru_eviction_order_is_exact(make_tier: TierFactory) -> None:
    size = _size(make_tier(1 << 20))
    tier = make_tier(3 * size)
    tier.keep_evicted = True
    for i in (1, 2, 3):
        assert tier.put(_h(i), _block(i)) == []
    assert tier.get(_h(1)) is not None  # 1 becomes most recent: 2 is now the oldest
    evicted = tier.put(_h(4), _block(4))
    assert [h for h, _ in evicted] == [_h(2)]
    data = evicted[0][1]
    assert data is not None and torch.equal(data.tensors["kv"].cpu(), _block(2).tensors["kv"])
    assert list(tier) == [_h(3), _h(1), _h(4)]
    assert tier.used_bytes == 3 * size
    assert tier.get(_h(2)) is None


def test_evicted_without_keep_has_no_data(make_tier: TierFactory) -> None:
    size = _size(make_tier(1 << 20))
    tier = make_tier(size)
    tier.put(_h(1), _block(1))
    assert tier.put(_h(2), _block(2)) == [(_h(1), None)]


def test_block_larger_than_budget_is_refused(make_tier: TierFactory) -> None:
    tier = make_tier(100)
    block = _block(1)
    assert tier.put(_h(1), block) == [(_h(1), block)]
    assert len(tier) == 0 and tier.used_bytes == 0


def test_remove_and_clear(make_tier: TierFactory) -> None:
    tier = make_tier(1 << 20)
    tier.put(_h(1), _block(1))
    tier.put(_h(2), _block(2))
    tier.remove(_h(1))
    assert tier.get(_h(1)) is None and len(tier) == 1
    tier.clear()
    assert len(tier) == 0 and tier.used_bytes == 0


def test_unsealed_tiers_and_the_engine_need_no_cryptography(tmp_path: Path) -> None:
    # The GPU machine has torch but not `cryptography`: the KV layer must import and run there unsealed.
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "import cachelm.engine.engine\n"
        "from cachelm.kv.tiers import DiskTier\n"
        f"DiskTier({str(tmp_path)!r}, capacity_bytes=1 << 20)\n"
        "assert 'cachelm.crypto' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_purge_owner_deletes_that_owners_blocks_only(make_tier: TierFactory) -> None:
    tier = make_tier(1 << 20)
    tier.put(_h(1), replace(_block(1), owner="aa"))
    tier.put(_h(2), replace(_block(2), owner="bb"))
    tier.put(_h(3), _block(3))  # no owner
    assert tier.purge_owner("aa") == 1
    assert _h(1) not in tier and tier.get(_h(1)) is None
    kept, unowned = tier.get(_h(2)), tier.get(_h(3))
    assert kept is not None and kept.owner == "bb" and unowned is not None and unowned.owner == ""
    assert tier.purge_owner("aa") == 0
    with pytest.raises(ConfigError, match="`owner`"):
        tier.purge_owner("")
    with pytest.raises(ConfigError, match="`owner`"):
        tier.put(_h(4), replace(_block(4), owner="../x"))  # an owner becomes part of a file name


def test_disk_owner_survives_a_restart_and_purge_removes_the_file(tmp_path: Path) -> None:
    first = DiskTier(tmp_path, capacity_bytes=1 << 20)
    first.put(_h(1), replace(_block(1), owner="aa"))
    first.put(_h(2), replace(_block(2), owner="bb"))
    (tmp_path / "03").mkdir()
    (tmp_path / "03" / f"{_h(3).hex()}.NOT-HEX.safetensors").write_bytes(b"x")  # not a tier file: ignored
    again = DiskTier(tmp_path, capacity_bytes=1 << 20)
    assert set(again) == {_h(1), _h(2)}
    got = again.get(_h(1))
    assert got is not None and got.owner == "aa"
    assert again.purge_owner("aa") == 1
    assert sorted(p.name for p in tmp_path.glob("0[12]/*")) == [f"{_h(2).hex()}.bb.safetensors"]


def test_redis_purge_owner_reaches_blocks_other_processes_stored(redis_url: str, namespace: str) -> None:
    writer = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    eraser = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)  # opened before the writes
    writer.put(_h(1), replace(_block(1), owner="aa"))
    writer.put(_h(2), replace(_block(2), owner="bb"))
    assert eraser.purge_owner("aa") == 1
    client = redis.Redis.from_url(redis_url)
    assert not client.exists(f"{namespace}:kv:{_h(1).hex()}", f"{namespace}:kvowner:aa")
    assert writer.get(_h(1)) is None and writer.get(_h(2)) is not None
    again = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)  # owner sets are not blocks
    assert set(again) == {_h(2)}
    writer.clear()
    assert not client.exists(f"{namespace}:kvowner:bb")  # removing the last block empties its owner set


def test_disk_reindexes_on_restart_and_drops_temporaries(tmp_path: Path) -> None:
    first = DiskTier(tmp_path, capacity_bytes=1 << 20)
    for i in (1, 2):
        first.put(_h(i), _block(i))
    (tmp_path / "01" / "crashed.tmp").write_bytes(b"partial")
    again = DiskTier(tmp_path, capacity_bytes=1 << 20)
    assert set(again) == {_h(1), _h(2)} and again.used_bytes == first.used_bytes
    got = again.get(_h(2))
    assert got is not None and torch.equal(got.tensors["kv"], _block(2).tensors["kv"])
    assert not (tmp_path / "01" / "crashed.tmp").exists()


def test_disk_reindex_respects_a_smaller_budget(tmp_path: Path) -> None:
    first = DiskTier(tmp_path, capacity_bytes=1 << 20)
    for i in (1, 2, 3):
        first.put(_h(i), _block(i))
    one = first.used_bytes // 3
    again = DiskTier(tmp_path, capacity_bytes=2 * one)
    assert len(again) == 2 and again.used_bytes <= 2 * one


def test_disk_corrupt_file_is_a_counted_miss(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, capacity_bytes=1 << 20)
    tier.put(_h(1), _block(1))
    path = next(tmp_path.glob("*/*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert tier.get(_h(1)) is None
    assert tier.corrupt == 1 and _h(1) not in tier and not path.exists()


def test_redis_reindexes_on_restart(redis_url: str, namespace: str) -> None:
    first = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    for i in (1, 2):
        first.put(_h(i), _block(i))
    again = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    assert set(again) == {_h(1), _h(2)} and again.used_bytes == first.used_bytes
    other = RedisTier(redis_url, namespace=namespace + "x", capacity_bytes=1 << 20)
    assert len(other) == 0  # namespaces are isolated
    first.clear()


def test_redis_probe_adopts_blocks_of_another_process(redis_url: str, namespace: str) -> None:
    reader = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    writer = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    writer.put(_h(7), _block(7))
    assert _h(7) not in reader
    assert reader.probe([_h(7), _h(8)]) == [True, False]
    assert reader.get(_h(7)) is not None
    writer.clear()


def test_redis_block_adopted_then_read_leaves_its_owner_set_when_removed(
    redis_url: str, namespace: str
) -> None:
    reader = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    writer = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    writer.put(_h(7), replace(_block(7), owner="aa"))
    client = redis.Redis.from_url(redis_url)
    assert client.sismember(f"{namespace}:kvowner:aa", _h(7).hex())
    assert reader.probe([_h(7)]) == [True]  # adopted: the owner is not in the key
    got = reader.get(_h(7))  # the read learns it from the block
    assert got is not None and got.owner == "aa"
    reader.remove(_h(7))
    assert not client.exists(f"{namespace}:kv:{_h(7).hex()}", f"{namespace}:kvowner:aa")


def test_redis_corrupt_value_is_a_counted_miss(redis_url: str, namespace: str) -> None:
    tier = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    tier.put(_h(1), _block(1))
    redis.Redis.from_url(redis_url).set(f"{namespace}:kv:{_h(1).hex()}", b"garbage")
    assert tier.get(_h(1)) is None and tier.corrupt == 1


def test_redis_down_raises_backend_error(redis_url: str, namespace: str) -> None:
    tier = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20)
    tier.client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens there
    tier._adopt(_h(1), 10)  # indexed, as if another process had stored it
    with pytest.raises(BackendError, match="redis tier get failed"):
        tier.get(_h(1))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`capacity_bytes`"):
        MemoryTier(capacity_bytes=0)
    with pytest.raises(ConfigError, match="`device`"):
        MemoryTier(capacity_bytes=10, device="mps")
    with pytest.raises(ConfigError, match="`namespace`"):
        RedisTier("redis://127.0.0.1:6379", namespace="a*b", capacity_bytes=10)
    with pytest.raises(ConfigError, match="`keyring` must be a Keyring"):
        DiskTier(tmp_path, capacity_bytes=10, keyring="k1:secret")  # type: ignore[arg-type]


def _sealed_disk(path: Path, keyring: Keyring | None) -> DiskTier:
    return DiskTier(path, capacity_bytes=1 << 20, keyring=keyring)


def test_sealed_disk_block_holds_no_plaintext_and_reads_back(tmp_path: Path) -> None:
    keyring = Keyring.generate()
    tier = _sealed_disk(tmp_path, keyring)
    block = _block(1)
    tier.put(_h(1), block)
    stored = next(tmp_path.glob("*/*.safetensors")).read_bytes()
    raw = block.tensors["kv"].numpy().tobytes()
    assert stored.startswith(b"CLE1")
    assert raw[:64] not in stored and b"codec" not in stored and b"sha256" not in stored
    again = _sealed_disk(tmp_path, keyring)  # a restart with the same keyring
    got = again.get(_h(1))
    assert got is not None and torch.equal(got.tensors["kv"], block.tensors["kv"])


def test_sealed_disk_reads_blocks_of_a_rotated_key(tmp_path: Path) -> None:
    k1 = os.urandom(32)
    _sealed_disk(tmp_path, Keyring({"k1": k1})).put(_h(1), _block(1))
    tier = _sealed_disk(tmp_path, Keyring({"k1": k1, "k2": os.urandom(32)}))  # k2 now seals
    got = tier.get(_h(1))
    assert got is not None and torch.equal(got.tensors["kv"], _block(1).tensors["kv"])
    tier.put(_h(2), _block(2))
    assert envelope_key_id(next((tmp_path / _h(2).hex()[:2]).glob("*.safetensors")).read_bytes()) == "k2"


@pytest.mark.parametrize(
    ("writer", "reader"),
    [("plain", "sealed"), ("sealed", "plain"), ("sealed", "other key")],
)
def test_a_block_not_sealed_with_this_keyring_is_a_counted_miss(
    tmp_path: Path, writer: str, reader: str
) -> None:
    keyring = Keyring.generate()
    keyrings = {"plain": None, "sealed": keyring, "other key": Keyring.generate()}
    _sealed_disk(tmp_path, keyrings[writer]).put(_h(1), _block(1))
    tier = _sealed_disk(tmp_path, keyrings[reader])
    assert _h(1) in tier  # indexed on open ...
    assert tier.get(_h(1)) is None  # ... but it does not open: dropped, never served
    assert tier.corrupt == 1 and _h(1) not in tier
    assert not list(tmp_path.glob("*/*.safetensors"))


@pytest.mark.parametrize("shared", ["disk", "redis"])
def test_a_block_sealed_under_a_key_id_the_keyring_lacks_is_missed_and_left(
    tmp_path: Path, shared: str, request: pytest.FixtureRequest
) -> None:
    """A process still on the old keyring (a rolling rotation) or given a wrong one must not delete what
    the others sealed with a newer key: a counted miss, forgotten locally, left in place."""
    k1 = os.urandom(32)
    rotated, behind = Keyring({"k1": k1, "k2": os.urandom(32)}), Keyring({"k1": k1})  # k2 seals

    def open_tier(keyring: Keyring) -> Tier:
        if shared == "disk":
            return _sealed_disk(tmp_path, keyring)
        url, ns = request.getfixturevalue("redis_url"), request.getfixturevalue("namespace")
        return RedisTier(url, namespace=ns, capacity_bytes=1 << 20, keyring=keyring)

    writer = open_tier(rotated)
    writer.put(_h(1), _block(1))
    reader = open_tier(behind)
    assert _h(1) in reader  # indexed on open
    assert reader.get(_h(1)) is None
    assert reader.unknown_key == 1 and reader.corrupt == 0 and _h(1) not in reader
    again = open_tier(rotated)  # the block is still there for a process that holds k2
    got = again.get(_h(1))
    assert got is not None and torch.equal(got.tensors["kv"], _block(1).tensors["kv"])
    if shared == "redis":
        again.clear()


def test_a_sealed_block_moved_to_another_hash_fails(tmp_path: Path) -> None:
    keyring = Keyring.generate()
    tier = _sealed_disk(tmp_path, keyring)
    tier.put(_h(1), _block(1))
    tier.put(_h(2), _block(2))
    one, two = (next((tmp_path / _h(i).hex()[:2]).glob("*.safetensors")) for i in (1, 2))
    two.write_bytes(one.read_bytes())  # a valid envelope, but sealed for block 1
    assert tier.get(_h(2)) is None and tier.corrupt == 1
    assert tier.get(_h(1)) is not None


def test_sealed_redis_value_is_an_envelope_and_tampering_fails(redis_url: str, namespace: str) -> None:
    keyring = Keyring.generate()
    tier = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20, keyring=keyring)
    tier.put(_h(1), _block(1))
    client = redis.Redis.from_url(redis_url)
    key = f"{namespace}:kv:{_h(1).hex()}"
    value = client.get(key)
    assert value is not None and value.startswith(b"CLE1") and b"codec" not in value
    other = RedisTier(redis_url, namespace=namespace, capacity_bytes=1 << 20, keyring=keyring)
    got = other.get(_h(1))  # another process with the same keyring reads it
    assert got is not None and torch.equal(got.tensors["kv"], _block(1).tensors["kv"])
    flipped = bytearray(value)
    flipped[-1] ^= 1
    client.set(key, bytes(flipped))
    assert tier.get(_h(1)) is None and tier.corrupt == 1
    tier.clear()


class _ReplacingDiskTier(DiskTier):
    """A disk tier where another writer replaces the block while `get` is reading it (once)."""

    def __init__(self, path: Path, *, corrupt: bool) -> None:
        super().__init__(path, capacity_bytes=1 << 20)
        self.corrupt_first, self.replaced = corrupt, False

    def _read(self, block_hash: BlockHash) -> EncodedBlock | None:
        if self.replaced:
            return super()._read(block_hash)
        self.replaced = True
        self.remove(block_hash)  # runs now: the read holds no lock
        self.put(block_hash, _block(2))
        if self.corrupt_first:
            raise IntegrityError("the old copy was damaged")
        return None


@pytest.mark.parametrize("corrupt", [False, True])
def test_a_block_replaced_during_a_read_is_kept(tmp_path: Path, corrupt: bool) -> None:
    tier = _ReplacingDiskTier(tmp_path, corrupt=corrupt)
    tier.put(_h(1), _block(1))
    assert tier.get(_h(1)) is None  # the read lost its race: a miss ...
    assert _h(1) in tier and tier.corrupt == 0  # ... but the new copy is neither forgotten nor deleted
    got = tier.get(_h(1))
    assert got is not None and torch.equal(got.tensors["kv"], _block(2).tensors["kv"])


def test_a_block_stored_under_two_names_is_indexed_once(tmp_path: Path) -> None:
    """Processes sharing a folder can leave one block with and without its owner tag: the reopened tier
    counted it twice (a budget never freed); it keeps the newest file and removes the older."""
    DiskTier(tmp_path, capacity_bytes=1 << 20).put(_h(1), _block(1))
    old = next(tmp_path.glob("*/*.safetensors"))
    newer = old.with_name(f"{_h(1).hex()}.aa.safetensors")  # the same block, written again with its owner
    newer.write_bytes(old.read_bytes())
    os.utime(old, (1, 1))
    reopened = DiskTier(tmp_path, capacity_bytes=1 << 20)
    assert len(reopened) == 1 and reopened.used_bytes == newer.stat().st_size
    assert not old.exists() and newer.exists()
    got = reopened.get(_h(1))
    assert got is not None and torch.equal(got.tensors["kv"], _block(1).tensors["kv"])

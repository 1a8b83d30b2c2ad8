"""KV block tiers: GPU memory, (pinned) CPU memory, local disk, Redis — each with a byte budget and LRU.

A tier maps a `BlockHash` to an `EncodedBlock`. Contract (tested once for every tier):

- ``get`` of a missing block returns None (a miss) and a hit makes the block the most recently used;
  a corrupt stored block (checksum, truncation) is deleted, counted in ``corrupt`` and reported as a miss;
- ``put`` stores a block and returns the blocks it evicted to stay within ``capacity_bytes``, least recently
  used first, with their data when ``keep_evicted`` is set (the prefix cache demotes them to the next tier);
  a block larger than the whole budget is refused and returned as its own victim, and so is one that
  fits only by evicting a block in ``keep`` (the prefix cache protects the earlier blocks of a prefix);
- disk and Redis tiers re-index what is already stored when opened, so a restart keeps the cache warm;
- ``purge_owner`` deletes every block of one owner (a tenant's tag, kept with each block), including, in
  Redis, the blocks other processes stored for it: erasing a tenant reaches its KV too;
- a backend failure raises BackendError; the prefix cache turns it into a miss;
- disk and Redis tiers given a `Keyring` keep every block sealed (AES-256-GCM, `cachelm.crypto`): the
  envelope is bound to its block hash, so a file or key copied under another hash fails; a block that is
  not sealed with this keyring (written before encryption was turned on, or tampered) reads as corrupt. A
  block sealed under a key id the keyring lacks is a miss counted in ``unknown_key`` and left where it is:
  in a shared folder or Redis it is another process's, sealed after that one got a new master key (a
  rolling rotation), and deleting it would let one misconfigured process empty the cache for all.

Every tier is thread-safe (one lock each): the serving thread and the write-behind worker share them.
The LRU is a small OrderedDict kept here rather than `cachelm.policy.LRUPolicy` so tiers need nothing but
O(1) move-to-end and pop-oldest, with sizes counted in bytes of the encoded block.
"""

from __future__ import annotations

import itertools
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cachelm.errors import BackendError, ConfigError, IntegrityError, UnknownKeyError
from cachelm.keys import BlockHash
from cachelm.kv.codecs import Codec, EncodedBlock, RawCodec, check_owner, from_bytes, to_bytes

if TYPE_CHECKING:
    from cachelm.crypto import Keyring

Evicted = list[tuple[BlockHash, EncodedBlock | None]]

# The data key of sealed KV blocks. Blocks carry no tenant of their own (their hashes are salted per tenant),
# so one key domain covers them; the record key "kv:<hash>" keeps it apart from any response record.
KV_KEY_DOMAIN = "cachelm.kv"


class Tier(ABC):
    """Byte-budgeted LRU bookkeeping shared by every tier; subclasses store the bytes."""

    name: str = "tier"
    in_memory = False  # True where a read is a lookup (no file, no network): never worth a thread

    def __init__(self, *, capacity_bytes: int, codec: Codec | None = None) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ConfigError(f"`capacity_bytes` must be an int > 0, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.codec: Codec = codec if codec is not None else RawCodec()
        self.keep_evicted = False  # set by the prefix cache when a lower tier receives demotions
        self.used_bytes = 0
        self.corrupt = 0
        self.unknown_key = 0  # sealed blocks whose key id the keyring lacks: missed, never deleted
        self._sizes: OrderedDict[BlockHash, int] = OrderedDict()  # least recently used first
        self._stamps: dict[BlockHash, int] = {}  # which write a block is, so a read can tell it was replaced
        self._owners: dict[BlockHash, str] = {}  # the tenant tag of each block that has one
        self._writes = itertools.count()
        self._lock = threading.RLock()

    # ---- the storage a subclass provides -------------------------------------------------------------
    @abstractmethod
    def _read(self, block_hash: BlockHash) -> EncodedBlock | None: ...

    def _prepare(self, block_hash: BlockHash, block: EncodedBlock) -> tuple[EncodedBlock | bytes, int]:
        """The form `_write` stores `block` in, and the bytes it will occupy in this tier: known before
        anything is evicted, so the budget holds exactly (a file or a Redis value outweighs its tensors)."""
        return block, block.nbytes

    @abstractmethod
    def _write(self, block_hash: BlockHash, block: EncodedBlock, stored: EncodedBlock | bytes) -> None:
        """Store `block` (as `stored`, what `_prepare` made of it)."""

    @abstractmethod
    def _delete(self, block_hash: BlockHash) -> None: ...

    # ---- the contract --------------------------------------------------------------------------------
    def __contains__(self, block_hash: object) -> bool:
        with self._lock:
            return block_hash in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[BlockHash]:
        with self._lock:
            return iter(list(self._sizes))

    def get(self, block_hash: BlockHash) -> EncodedBlock | None:
        """The block, or None on a miss (a corrupt block is deleted and counted).

        The read itself runs outside the tier's lock, so several threads read blocks of one tier at once
        (files, Redis round trips). A block replaced or removed meanwhile is left as the writer left it.
        """
        with self._lock:
            stamp = self._stamps.get(block_hash)
            if stamp is None:
                return None
        corrupt = False
        try:
            block = self._read(block_hash)
        except UnknownKeyError:
            block = None
            self.unknown_key += 1  # forgotten here, left in place for the processes that hold the key
        except IntegrityError:
            block, corrupt = None, True
        with self._lock:
            if self._stamps.get(block_hash) != stamp:  # stored again or removed while it was read
                return block
            if block is None:  # vanished, corrupt or sealed under an unknown key: forget it
                if corrupt:
                    self.corrupt += 1
                    self._delete(block_hash)
                self._forget(block_hash)
                return None
            if block.owner:  # a block adopted without its owner (Redis: another process stored it)
                self._owners.setdefault(block_hash, block.owner)
            self._sizes.move_to_end(block_hash)
            return block

    def touch(self, block_hash: BlockHash) -> None:
        """Mark a block most recently used without reading it."""
        with self._lock:
            if block_hash in self._sizes:
                self._sizes.move_to_end(block_hash)

    def put(self, block_hash: BlockHash, block: EncodedBlock, *, keep: Collection[BlockHash] = ()) -> Evicted:
        """Store `block` under `block_hash`; return the evicted blocks, least recently used first.

        Blocks in `keep` are never evicted for it: when only that would make room, `block` is refused
        (returned as its own victim, nothing evicted). `block` is written before its victims leave, so for
        the moment of the write the tier holds one block beyond its budget."""
        with self._lock:
            if block_hash in self._sizes:
                self._sizes.move_to_end(block_hash)
                return []
            stored, size = self._prepare(block_hash, block)
            victims = self._victims(self.used_bytes + size - self.capacity_bytes, keep)
            if victims is None:
                return [(block_hash, block)]
            # Write first: a write that fails (a full disk, Redis down) raises with nothing evicted.
            # Evicting first lost the victims: gone from this tier, never handed to the next one.
            self._write(block_hash, block, stored)
            evicted = [self._evict(victim) for victim in victims]
            self._adopt(block_hash, size, block.owner)
            return evicted

    def remove(self, block_hash: BlockHash) -> None:
        with self._lock:
            if block_hash in self._sizes:
                self._delete(block_hash)
                self._forget(block_hash)

    def clear(self) -> None:
        with self._lock:
            for block_hash in list(self._sizes):
                self.remove(block_hash)

    def purge_owner(self, owner: str) -> int:
        """Delete every block stored for `owner` (`KVPrefixCache.owner_tag` of a tenant); how many."""
        check_owner(owner, empty=False)
        with self._lock:
            doomed = [h for h, o in self._owners.items() if o == owner]
            for block_hash in doomed:
                self._delete(block_hash)
                self._forget(block_hash)
        return len(doomed)

    def close(self) -> None:  # noqa: B027 - optional hook: most tiers hold nothing to release
        """Release resources (connections); stored data stays where the tier keeps it."""

    # ---- helpers -------------------------------------------------------------------------------------
    def _victims(self, excess: int, keep: Collection[BlockHash]) -> list[BlockHash] | None:
        """The least recently used blocks outside `keep` whose bytes cover `excess`; None when those
        are not enough. O(blocks evicted + blocks kept that precede them)."""
        victims: list[BlockHash] = []
        for block_hash, size in self._sizes.items():
            if excess <= 0:
                break
            if block_hash not in keep:
                victims.append(block_hash)
                excess -= size
        return victims if excess <= 0 else None

    def _evict_oldest(self) -> tuple[BlockHash, EncodedBlock | None]:
        return self._evict(next(iter(self._sizes)))

    def _evict(self, block_hash: BlockHash) -> tuple[BlockHash, EncodedBlock | None]:
        data: EncodedBlock | None = None
        if self.keep_evicted:
            try:
                data = self._read(block_hash)
            except IntegrityError:
                self.corrupt += 1
        self._delete(block_hash)
        self._forget(block_hash)
        return block_hash, data

    def _adopt(self, block_hash: BlockHash, size: int, owner: str = "") -> None:
        self.used_bytes -= self._sizes.get(block_hash, 0)  # adopted again: its old size no longer counts
        self._sizes[block_hash] = size
        self._stamps[block_hash] = next(self._writes)
        if owner:
            self._owners[block_hash] = owner
        self.used_bytes += size

    def _forget(self, block_hash: BlockHash) -> None:
        self._stamps.pop(block_hash, None)
        self._owners.pop(block_hash, None)
        self.used_bytes -= self._sizes.pop(block_hash, 0)

    def _index(self, entries: Iterable[tuple[BlockHash, int, str]]) -> None:
        """Adopt blocks already stored (restart), oldest first, evicting beyond the budget."""
        for block_hash, size, owner in entries:
            self._adopt(block_hash, size, owner)
        while self._sizes and self.used_bytes > self.capacity_bytes:
            self._evict_oldest()


class MemoryTier(Tier):
    """Blocks kept as tensors on `device`: a GPU tier ("cuda") or a CPU tier ("cpu", pinned when `pin`).

    Pinned host memory is what makes a CPU→GPU hit run at full PCIe/NVLink bandwidth with a non-blocking
    copy; pinning is skipped (silently, it is an optimisation) when CUDA is absent.
    """

    in_memory = True

    def __init__(
        self,
        *,
        capacity_bytes: int,
        device: str = "cpu",
        pin: bool = True,
        codec: Codec | None = None,
    ) -> None:
        super().__init__(capacity_bytes=capacity_bytes, codec=codec)
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"`device` must be 'cpu' or 'cuda[:N]', got {device!r}")
        self.pin = pin and self.device.type == "cpu" and torch.cuda.is_available()
        self.name = "gpu" if self.device.type == "cuda" else ("pinned" if self.pin else "cpu")
        self._blocks: dict[BlockHash, EncodedBlock] = {}

    def _read(self, block_hash: BlockHash) -> EncodedBlock | None:
        return self._blocks.get(block_hash)

    def _write(self, block_hash: BlockHash, block: EncodedBlock, stored: EncodedBlock | bytes) -> None:
        self._blocks[block_hash] = block.to(self.device, pin=self.pin)  # same tensors: same `nbytes`

    def _delete(self, block_hash: BlockHash) -> None:
        self._blocks.pop(block_hash, None)


class _BytesTier(Tier):
    """A tier that stores blocks as bytes (`codecs.to_bytes`), sealed when it has a keyring."""

    def __init__(
        self, *, capacity_bytes: int, codec: Codec | None = None, keyring: Keyring | None = None
    ) -> None:
        super().__init__(capacity_bytes=capacity_bytes, codec=codec)
        if keyring is not None:
            from cachelm.crypto import Keyring  # only here: unsealed tiers run without `cryptography`

            if not isinstance(keyring, Keyring):
                raise ConfigError(f"`keyring` must be a Keyring or None, got {type(keyring).__name__}")
        self.keyring = keyring

    def _prepare(self, block_hash: BlockHash, block: EncodedBlock) -> tuple[EncodedBlock | bytes, int]:
        data = self._to_stored(block_hash, block)
        return data, len(data)

    def _to_stored(self, block_hash: BlockHash, block: EncodedBlock) -> bytes:
        data = to_bytes(block)
        if self.keyring is None:
            return data
        return self.keyring.encrypt(data, tenant_id=KV_KEY_DOMAIN, record_key=f"kv:{block_hash.hex()}")

    def _from_stored(self, block_hash: BlockHash, data: bytes | bytearray) -> EncodedBlock:
        """The block stored as `data`; IntegrityError when it fails to open or to parse."""
        if self.keyring is None:
            return from_bytes(data)
        opened = self.keyring.decrypt_to_buffer(
            data, tenant_id=KV_KEY_DOMAIN, record_key=f"kv:{block_hash.hex()}"
        )
        return from_bytes(opened, authenticated=True)  # the GCM tag checked every byte


class DiskTier(_BytesTier):
    """One safetensors file per block under `directory` (``ab/abcdef….safetensors``, or
    ``ab/abcdef….<owner>.safetensors`` for a block with an owner, so a restart knows whose blocks are whose).

    Writes go to a temporary file in the same folder and are published with an atomic rename, so a crash
    never leaves a half-written block under a real name (leftover temporaries are removed on open). Every
    file carries a checksum of its tensors in its metadata (XXH3-128; SHA-256 in files written before
    2026-12-07), checked on read; with a `keyring` the file is that safetensors file sealed. On open the
    folder is re-indexed, oldest modification time first (a read refreshes the time, so the order
    approximates LRU).
    """

    name = "disk"
    _SUFFIX = ".safetensors"

    def __init__(
        self,
        directory: str | Path,
        *,
        capacity_bytes: int,
        codec: Codec | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        super().__init__(capacity_bytes=capacity_bytes, codec=codec, keyring=keyring)
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create disk tier folder {str(self.directory)!r}: {exc}") from exc
        self._reindex()

    def _path(self, block_hash: BlockHash, owner: str | None = None) -> Path:
        """Where the block is (`owner` None: the owner this tier indexed it under)."""
        if owner is None:
            owner = self._owners.get(block_hash, "")
        name = block_hash.hex()
        return self.directory / name[:2] / (name + (f".{owner}" if owner else "") + self._SUFFIX)

    def _reindex(self) -> None:
        found: list[tuple[float, BlockHash, int, str]] = []
        for path in self.directory.glob("*/*"):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write interrupted by a crash
                continue
            if not path.name.endswith(self._SUFFIX):
                continue
            name, _, owner = path.name.removesuffix(self._SUFFIX).partition(".")
            try:
                block_hash = BlockHash(bytes.fromhex(name))
                check_owner(owner, empty=True)
                st = path.stat()
            except (ValueError, ConfigError, OSError):
                continue
            found.append((st.st_mtime, block_hash, st.st_size, owner))
        found.sort(key=lambda item: item[0])
        # One block under two names (written with and without its owner tag, by processes sharing the
        # folder): the newest is indexed, the older file is the same block and goes.
        newest = {block_hash: owner for _, block_hash, _, owner in found}
        for _, block_hash, _, owner in found:
            if newest[block_hash] != owner:
                self._path(block_hash, owner).unlink(missing_ok=True)
        self._index(
            (block_hash, size, owner) for _, block_hash, size, owner in found if newest[block_hash] == owner
        )

    def _read(self, block_hash: BlockHash) -> EncodedBlock | None:
        path = self._path(block_hash)
        try:
            with path.open("rb") as f:  # into a bytearray: the block's tensors become views of it
                data = bytearray(os.fstat(f.fileno()).st_size)
                del data[f.readinto(data) :]  # a file cut short meanwhile fails its checks below
            os.utime(path)  # refresh the LRU order a restart will rebuild
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BackendError(f"disk tier read failed: {exc}") from exc
        return self._from_stored(block_hash, data)

    def _write(self, block_hash: BlockHash, block: EncodedBlock, stored: EncodedBlock | bytes) -> None:
        assert isinstance(stored, bytes)  # `_prepare` serialised it
        path = self._path(block_hash, block.owner)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            tmp.write_bytes(stored)
            os.replace(tmp, path)  # atomic publish
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise BackendError(f"disk tier write failed: {exc}") from exc

    def _delete(self, block_hash: BlockHash) -> None:
        self._path(block_hash).unlink(missing_ok=True)


class RedisTier(_BytesTier):
    """Blocks as Redis strings ``{namespace}:kv:{hash hex}`` (safetensors bytes with a checksum, sealed
    when a `keyring` is given).

    On open the namespace is re-indexed with SCAN (+ STRLEN for sizes). Several processes may share one
    namespace: a block another process wrote is found by `probe` (pipelined EXISTS) and adopted. The byte
    budget and LRU order are this process's view; Redis' own maxmemory policy remains the backstop.
    The hashes of each owner's blocks are kept in a set ``{namespace}:kvowner:{owner}``, written with the
    block, so `purge_owner` in any process deletes the blocks every process stored for that owner.
    """

    name = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str,
        capacity_bytes: int,
        codec: Codec | None = None,
        keyring: Keyring | None = None,
        client: Any = None,
    ) -> None:
        super().__init__(capacity_bytes=capacity_bytes, codec=codec, keyring=keyring)
        if not isinstance(namespace, str) or not namespace or any(c in namespace for c in " *?[]"):
            raise ConfigError(
                f"`namespace` must be a non-empty string without spaces or globs, got {namespace!r}"
            )
        if client is None:
            if not url:
                raise ConfigError("`url` or `client` is required for a Redis tier")
            import redis

            client = redis.Redis.from_url(url, socket_timeout=5.0)
        self.client = client
        self.prefix = f"{namespace}:kv:"
        self.owner_prefix = f"{namespace}:kvowner:"
        self._reindex()

    def _key(self, block_hash: BlockHash) -> str:
        return self.prefix + block_hash.hex()

    def _owner_key(self, owner: str) -> str:
        return self.owner_prefix + owner

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        import redis

        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise BackendError(f"redis tier {what} failed: {exc}") from exc

    def _reindex(self) -> None:
        keys = [
            k
            for k in self._call(
                "scan", lambda: list(self.client.scan_iter(match=self.prefix + "*", count=1000))
            )
        ]
        if not keys:
            return
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.strlen(key)
        sizes = self._call("strlen", pipe.execute)
        entries = []
        for key, size in zip(keys, sizes, strict=True):
            name = key.decode() if isinstance(key, bytes) else str(key)
            try:  # the owner is not in the key: `purge_owner` finds the blocks through the owner's set
                entries.append((BlockHash(bytes.fromhex(name.removeprefix(self.prefix))), int(size), ""))
            except ValueError:
                continue
        self._index(entries)

    def probe(self, hashes: list[BlockHash]) -> list[bool]:
        """Which of `hashes` exist in Redis (adopting blocks other processes stored)."""
        with self._lock:
            unknown = [h for h in hashes if h not in self._sizes]
        if unknown:
            pipe = self.client.pipeline(transaction=False)
            for h in unknown:
                pipe.strlen(self._key(h))
            sizes = self._call("probe", pipe.execute)
            with self._lock:
                for h, size in zip(unknown, sizes, strict=True):
                    if size and h not in self._sizes:
                        self._index([(h, int(size), "")])
        with self._lock:
            return [h in self._sizes for h in hashes]

    def _read(self, block_hash: BlockHash) -> EncodedBlock | None:
        data = self._call("get", self.client.get, self._key(block_hash))
        if data is None:
            return None
        return self._from_stored(block_hash, data)

    def _write(self, block_hash: BlockHash, block: EncodedBlock, stored: EncodedBlock | bytes) -> None:
        pipe = self.client.pipeline(transaction=True)  # the block and its owner's set entry, together
        pipe.set(self._key(block_hash), stored)
        if block.owner:
            pipe.sadd(self._owner_key(block.owner), block_hash.hex())
        self._call("set", pipe.execute)

    def _delete(self, block_hash: BlockHash) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._key(block_hash))
        if owner := self._owners.get(block_hash):
            pipe.srem(self._owner_key(owner), block_hash.hex())
        self._call("delete", pipe.execute)

    def purge_owner(self, owner: str) -> int:
        """Delete the blocks of `owner` that any process sharing this namespace stored; how many."""
        check_owner(owner, empty=False)
        with self._lock:
            doomed = {h for h, o in self._owners.items() if o == owner}
            for member in self._call("purge", self.client.smembers, self._owner_key(owner)):
                try:
                    doomed.add(BlockHash(bytes.fromhex(member.decode())))
                except ValueError:
                    continue
            if not doomed:
                return 0
            pipe = self.client.pipeline(transaction=True)
            for block_hash in doomed:
                pipe.delete(self._key(block_hash))
            # Only the members read above leave the set: a block another process adds meanwhile stays
            # findable by the next purge.
            pipe.srem(self._owner_key(owner), *(h.hex() for h in doomed))
            deleted = self._call("purge", pipe.execute)[:-1]
            for block_hash in doomed:
                self._forget(block_hash)
        return sum(int(n) for n in deleted)

    def close(self) -> None:
        self.client.close()

"""Defects found reviewing the KV reuse layer, each pinned by a test that failed before its fix:

- byte tiers (disk, Redis) evicted by tensor bytes but counted file bytes: over budget;
- a prompt longer than a tier evicted its own first blocks, so it missed on every repeat;
- a block a tier refused was dropped instead of going down, and refused or failed puts were counted;
- blocks of two models with one `model_id` but different layouts answered each other's hashes;
- a decoding step that failed mid-forward left misaligned KV that was then stored;
- int8/int4 turned a whole group into nan for one inf/nan or a value beyond fp16's range.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from cachelm.crypto import Keyring
from cachelm.engine.engine import Engine, SamplingParams, build_prefix_cache
from cachelm.engine.tiny import tiny_llama, tiny_tokenizer
from cachelm.errors import BackendError
from cachelm.keys import BlockHash, ModelFingerprint, tenant_salt
from cachelm.kv.codecs import Int4Codec, Int8Codec, RawCodec, codec_for, from_bytes, to_bytes
from cachelm.kv.layout import KVLayout
from cachelm.kv.prefix_cache import KVPrefixCache, owner_tag
from cachelm.kv.tiers import DiskTier, MemoryTier, RedisTier, Tier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float32, sliding_windows=(None, None))
MODEL = ModelFingerprint(model_id="m", revision="r1", dtype="float32")
SALT = tenant_salt("alice")
BS = 4
BLOCK_BYTES = BS * LAYOUT.bytes_per_token


def _kv(n: int, seed: int = 0, layout: KVLayout = LAYOUT) -> torch.Tensor:
    x = torch.randn(layout.block_shape(n), generator=torch.Generator().manual_seed(seed))
    return x.to(layout.dtype)


def _cache(*tiers: Tier, layout: KVLayout = LAYOUT, model: ModelFingerprint = MODEL) -> KVPrefixCache:
    return KVPrefixCache(layout=layout, model=model, tiers=list(tiers), block_size=BS)


def _h(i: int) -> BlockHash:
    return BlockHash(bytes([i]) * 32)


# ---- budgets -------------------------------------------------------------------------------------------
@pytest.fixture(params=["disk", "disk-sealed", "redis"])
def byte_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    keyring = Keyring.generate() if request.param.endswith("-sealed") else None
    made: list[Tier] = []

    def factory(capacity: int) -> Tier:
        tier: Tier
        if request.param.startswith("disk"):
            tier = DiskTier(tmp_path / "kv", capacity_bytes=capacity, keyring=keyring)
        else:
            url, ns = request.getfixturevalue("redis_url"), request.getfixturevalue("namespace")
            tier = RedisTier(url, namespace=ns, capacity_bytes=capacity)
        made.append(tier)
        return tier

    yield factory
    made[-1].clear()


def test_byte_tiers_hold_their_budget_exactly(byte_tier: Any) -> None:
    probe = byte_tier(1 << 20)
    block = RawCodec().encode(_kv(BS))
    probe.put(_h(1), block)
    stored = probe.used_bytes  # a safetensors file (or sealed envelope) is larger than its tensors
    assert stored > block.nbytes
    probe.remove(_h(1))
    tier = byte_tier(2 * stored - 1)  # room for one stored block, not two
    for i in range(3):
        tier.put(_h(10 + i), RawCodec().encode(_kv(BS, seed=i)))
        assert tier.used_bytes <= tier.capacity_bytes
    assert list(tier) == [_h(12)]


# ---- eviction order ------------------------------------------------------------------------------------
def test_a_prompt_longer_than_its_tier_still_hits_on_repeat() -> None:
    pc = _cache(MemoryTier(capacity_bytes=4 * BLOCK_BYTES))
    ids, kv = list(range(6 * BS + 1)), _kv(6 * BS + 1)
    hits = []
    for _ in range(3):
        match = pc.match(ids, tenant_salt=SALT)
        prefix = pc.load(match, device="cpu")
        hits.append(prefix.shape[0])
        assert torch.equal(prefix, kv[: prefix.shape[0]])
        pc.store(ids, kv, tenant_salt=SALT)
    # The tier keeps the prompt's first 4 blocks (before: it kept blocks 2..5, unreachable, and then
    # every repeat evicted the blocks the next repeat needed first: 0 hits forever).
    assert hits == [0, 4 * BS, 4 * BS]
    assert set(pc.tiers[0]) == set(pc.block_hashes(ids, tenant_salt=SALT)[:4])
    pc.close()


def test_a_later_prompt_evicts_an_earlier_prefix_from_its_end() -> None:
    pc = _cache(MemoryTier(capacity_bytes=4 * BLOCK_BYTES))
    ids = list(range(4 * BS + 1))
    pc.store(ids, _kv(4 * BS + 1), tenant_salt=SALT)
    pc.load(pc.match(ids, tenant_salt=SALT), device="cpu")  # a hit: blocks read first to last
    pc.store([100 + t for t in range(BS + 1)], _kv(BS + 1, seed=1), tenant_salt=SALT)  # needs one block
    assert pc.match(ids, tenant_salt=SALT).num_blocks == 3  # the last block went, not the first
    pc.close()


# ---- refusals and accounting ---------------------------------------------------------------------------
def test_a_block_the_top_tier_refuses_goes_to_the_next_tier() -> None:
    lower = MemoryTier(capacity_bytes=1 << 20)
    pc = _cache(MemoryTier(capacity_bytes=BLOCK_BYTES - 1), lower)  # too small for any block
    ids, kv = list(range(2 * BS + 1)), _kv(2 * BS + 1)
    assert pc.store(ids, kv, tenant_salt=SALT) == 2
    pc.flush()
    assert len(lower) == 2 and pc.stats.demoted_blocks == 2
    match = pc.match(ids, tenant_salt=SALT)
    assert match.tiers == (1, 1)
    assert torch.equal(pc.load(match, device="cpu"), kv[: 2 * BS])
    assert pc.stats.promoted_blocks == 0  # refused again: not counted
    pc.close()


def test_refused_demotions_and_stores_are_not_counted() -> None:
    pc = _cache(MemoryTier(capacity_bytes=BLOCK_BYTES), MemoryTier(capacity_bytes=BLOCK_BYTES - 1))
    pc.store(list(range(3 * BS + 1)), _kv(3 * BS + 1), tenant_salt=SALT)
    pc.flush()
    assert len(pc.tiers[1]) == 0 and pc.stats.demoted_blocks == 0
    alone = _cache(MemoryTier(capacity_bytes=BLOCK_BYTES - 1))
    assert alone.store(list(range(BS + 1)), _kv(BS + 1), tenant_salt=SALT) == 0
    assert alone.stats.stored_blocks == 0
    pc.close()
    alone.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_demotion_onto_a_full_disk_is_dropped_and_counted(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, capacity_bytes=1 << 20)
    pc = _cache(MemoryTier(capacity_bytes=BLOCK_BYTES), disk)
    ids, kv = list(range(2 * BS + 1)), _kv(2 * BS + 1)
    hashes = pc.block_hashes(ids, tenant_salt=SALT)
    # The worker's temporary file for block 1 is a link to /dev/full: its write fails with ENOSPC,
    # exactly as on a full file system.
    final = disk._path(hashes[1], owner_tag(SALT))
    final.parent.mkdir(parents=True, exist_ok=True)
    assert pc._worker.ident is not None
    tmp = final.with_name(f"{final.name}.{os.getpid()}.{pc._worker.ident}.tmp")
    tmp.symlink_to("/dev/full")
    pc.store(ids, kv, tenant_salt=SALT)  # block 1 goes down to the disk: the write fails
    pc.flush()
    assert pc.stats.backend_errors == 1 and pc.stats.demoted_blocks == 0
    assert len(disk) == 0 and disk.used_bytes == 0 and not tmp.exists() and not final.exists()
    match = pc.match(ids, tenant_salt=SALT)
    assert match.num_blocks == 1
    assert torch.equal(pc.load(match, device="cpu"), kv[:BS])
    pc.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_write_that_fails_on_a_full_disk_evicts_nothing(tmp_path: Path) -> None:
    # Before, the tier evicted its victims first and then wrote: when the write failed, the victims were
    # gone from the disk and, raised past, never handed down to the next tier.
    disk = DiskTier(tmp_path, capacity_bytes=1 << 20)
    old, new = BlockHash(b"\x01" * 16), BlockHash(b"\x02" * 16)
    owner = owner_tag(SALT)
    disk.put(old, replace(RawCodec().encode(_kv(BS)), owner=owner))
    disk.capacity_bytes = disk.used_bytes  # full: the next block needs `old` evicted
    final = disk._path(new, owner)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.symlink_to("/dev/full")  # this thread's temporary file for `new`: writing it fails with ENOSPC
    with pytest.raises(BackendError):
        disk.put(new, replace(RawCodec().encode(_kv(BS, seed=1)), owner=owner))
    kept = disk.get(old)
    assert kept is not None and torch.equal(codec_for(kept).decode(kept, device="cpu"), _kv(BS))
    assert new not in disk and len(disk) == 1 and not final.exists()
    assert not tmp.is_symlink()  # the failed write's temporary file is gone
    assert disk.put(new, replace(RawCodec().encode(_kv(BS, seed=1)), owner=owner)) != []  # room: evicts
    assert new in disk and old not in disk


# ---- identity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "other",
    [
        KVLayout(num_layers=3, num_kv_heads=1, head_dim=8, dtype=torch.float32, sliding_windows=(None,) * 3),
        KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, sliding_windows=(None,)),
        KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float16, sliding_windows=(None, None)),
        KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.float32, sliding_windows=(4, None)),
    ],
    ids=["more-layers", "fewer-layers", "dtype", "sliding"],
)
def test_models_of_another_layout_never_share_blocks(tmp_path: Path, other: KVLayout) -> None:
    # One caller-chosen id (and no dtype) for two models, one disk folder: before, the second model
    # matched the first one's blocks and crashed decoding them (more layers), broadcast one layer into
    # two (fewer layers: a wrong tensor), or read another dtype's or window's KV as its own.
    model = ModelFingerprint(model_id="tiny")
    first = _cache(DiskTier(tmp_path, capacity_bytes=1 << 20), model=model)
    ids = list(range(2 * BS + 1))
    first.store(ids, _kv(2 * BS + 1), tenant_salt=SALT)
    first.close()
    second = _cache(DiskTier(tmp_path, capacity_bytes=1 << 20), layout=other, model=model)
    match = second.match(ids, tenant_salt=SALT)
    assert match.num_blocks == 0
    second.store(ids, _kv(2 * BS + 1, seed=3, layout=other), tenant_salt=SALT)
    assert second.match(ids, tenant_salt=SALT).num_blocks == 2  # its own blocks, beside the first's
    assert len(second.tiers[0]) == 4
    second.close()


# ---- a failed decoding step ----------------------------------------------------------------------------
@pytest.mark.usefixtures("one_torch_thread")
def test_a_failed_decoding_step_stores_no_misaligned_kv() -> None:
    tokenizer, model = tiny_tokenizer(), tiny_llama(initializer_range=0.1)
    pc = build_prefix_cache(model, model_id="tiny", block_size=BS, cpu_bytes=1 << 22)
    engine, base = Engine(model, tokenizer, prefix_cache=pc), Engine(model, tokenizer)
    ids = list(range(5, 22))
    engine.generate(ids[: 2 * BS + 1], SamplingParams(max_new_tokens=1))  # a cached prefix of 2 blocks
    forwards = 0

    def fail_second_decoding_step(module: Any, args: Any, output: Any) -> None:
        nonlocal forwards
        forwards += 1
        if forwards == 3:  # prefill, decoding step 1, then step 2 fails in layer 2 of 4 (out of memory)
            raise RuntimeError("out of memory")

    hook = model.model.layers[2].register_forward_hook(fail_second_decoding_step)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):  # the real error, not one from `store`
            engine.generate(ids, SamplingParams(max_new_tokens=8))
    finally:
        hook.remove()
    answer = base.generate(ids, SamplingParams(max_new_tokens=8)).token_ids
    follow = ids + answer[:4] + [40]
    reused, fresh = (
        engine.generate(follow, SamplingParams(max_new_tokens=4)),
        base.generate(follow, SamplingParams(max_new_tokens=4)),
    )
    assert reused.first_logits is not None and fresh.first_logits is not None
    torch.testing.assert_close(reused.first_logits, fresh.first_logits, atol=1e-4, rtol=0)


# ---- codecs --------------------------------------------------------------------------------------------
def _special(kind: str) -> torch.Tensor:
    x = torch.randn(64, 2, 2, 2, 64, generator=torch.Generator().manual_seed(0))  # (T, L, 2, H, D)
    if kind == "inf":
        x[3, 0, 0, 1, 5] = float("inf")
    elif kind == "nan":
        x[7, 1, 1, 0, 9] = float("nan")
    else:  # int4's fp16 minima overflow beyond ±65504, int8's fp16 scales beyond 127 × 65504
        x[:, 1] *= 1e7
    return x


@pytest.mark.parametrize("kind", ["inf", "nan", "huge"])
@pytest.mark.parametrize("codec", [Int8Codec(), Int4Codec()], ids=["int8", "int4"])
def test_quantised_codecs_keep_blocks_fp16_scales_cannot_describe(codec: Any, kind: str) -> None:
    x = _special(kind)
    encoded = codec.encode(x)
    # Before: one non-finite value turned its whole group (64 tokens of a channel) into nan, and values
    # beyond what the fp16 statistics hold turned every affected group into nan or inf. Now such a
    # block is kept exactly (raw).
    stored = from_bytes(to_bytes(encoded))  # through a disk or Redis tier
    for back in (codec.decode(encoded), codec_for(stored).decode(stored)):
        assert bool(back[x.isfinite()].isfinite().all())  # before: nan or inf across whole groups
        torch.testing.assert_close(back, x, rtol=0, atol=0, equal_nan=True)
    out = torch.empty(80, *x.shape[1:])
    codec.decode(encoded, out=out[16:])
    torch.testing.assert_close(out[16:], x, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("codec", "peak"), [(Int8Codec(), 8e6), (Int4Codec(), 6e4)], ids=["int8", "int4"])
def test_large_finite_blocks_are_still_quantised_within_bounds(codec: Any, peak: float) -> None:
    x = _special("inf")
    x[3, 0, 0, 1, 5] = peak  # large, yet within what the codec's fp16 statistics hold
    encoded = codec.encode(x)
    assert encoded.codec == codec.name and "qk" in encoded.tensors
    back = codec.decode(encoded)
    assert bool(back.isfinite().all())
    assert (back - x).abs().max().item() <= (0.01 if codec.bits == 8 else 0.1) * peak

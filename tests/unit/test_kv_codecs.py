"""KV codecs: exact where lossless, bounded error where quantised, exact size ratios, bytes I/O."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch
import xxhash

from cachelm.errors import ConfigError, IntegrityError
from cachelm.kv.codecs import (
    Int4Codec,
    Int8Codec,
    RawCodec,
    checksum,
    codec_for,
    from_bytes,
    make_codec,
    to_bytes,
)


def _block(tokens: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 3, 2, 2, 64, generator=g)  # (T, L, 2, H, D)
    x[:, :, 0, :, 7] *= 25.0  # a key outlier channel, as real models have
    return x.to(dtype)


def test_raw_codec_is_exact() -> None:
    x = _block()
    enc = RawCodec().encode(x)
    assert torch.equal(RawCodec().decode(enc), x)
    assert enc.nbytes == x.numel() * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_codec_is_exact_for_a_model_of_that_dtype(dtype: torch.dtype) -> None:
    x = _block(dtype=dtype)
    assert torch.equal(RawCodec(dtype).decode(RawCodec(dtype).encode(x)), x)


@pytest.mark.parametrize(
    ("codec", "ratio", "max_rel_err"),
    [(Int8Codec(), 64 / 33, 0.01), (Int4Codec(), 32 / 9, 0.12)],
)
def test_quantised_codecs_size_and_error(
    codec: Int8Codec | Int4Codec, ratio: float, max_rel_err: float
) -> None:
    x = _block()
    enc = codec.encode(x)
    fp16_bytes = x.numel() * 2
    # int8: 1 + (2/64 + 2/64)/2 bytes per element; int4: 0.5 + (4/64 + 4/64)/2 (module docstring).
    assert fp16_bytes / enc.nbytes == pytest.approx(ratio)
    y = codec.decode(enc)
    assert y.shape == x.shape and y.dtype == x.dtype
    rel = ((y - x).norm() / x.norm()).item()
    assert 0 < rel < max_rel_err


def test_int4_packing_round_trips_every_code() -> None:
    codec = Int4Codec()
    q = torch.arange(16, dtype=torch.uint8).repeat(4)  # every 4-bit code, even length
    assert torch.equal(codec._unpack(codec._pack(q)), q)


def test_keys_are_per_channel_values_per_token() -> None:
    enc = Int4Codec(key_group=32, value_group=16).encode(_block(64))
    assert tuple(enc.tensors["k_scale"].shape) == (2, 3, 2, 64)  # (T/32, L, H, D)
    assert tuple(enc.tensors["v_scale"].shape) == (64, 3, 2, 4)  # (T, L, H, D/16)
    # The decoder reads group sizes from the shapes: default-constructed codecs decode it.
    assert codec_for(enc).decode(enc).shape == (64, 3, 2, 2, 64)


def test_decode_into_out_buffer() -> None:
    x = _block(16)
    out = torch.empty(32, *x.shape[1:])
    for codec in (RawCodec(), Int8Codec()):
        codec.decode(codec.encode(x), out=out[16:])
        assert torch.allclose(out[16:], x, atol=0.5)


@pytest.mark.parametrize("name", ["raw", "float16", "bfloat16", "int8", "int4"])
def test_bytes_round_trip(name: str) -> None:
    enc = make_codec(name).encode(_block(32))
    back = from_bytes(to_bytes(enc))
    assert back.codec == enc.codec and back.num_tokens == 32 and back.dtype == torch.float32
    for key, t in enc.tensors.items():
        assert torch.equal(back.tensors[key], t)


def test_authenticated_bytes_are_parsed_without_recomputing_the_checksum() -> None:
    data = bytearray(to_bytes(RawCodec().encode(_block(16))))
    data[-5] ^= 0xFF
    with pytest.raises(IntegrityError, match="checksum"):
        from_bytes(bytes(data))
    # The caller vouches for the bytes (a sealed tier: the AES-GCM tag covered each one); headers are
    # still checked.
    assert from_bytes(bytes(data), authenticated=True).num_tokens == 16
    with pytest.raises(IntegrityError, match="malformed"):
        from_bytes(bytes(data[:100]), authenticated=True)


def test_the_owner_travels_with_the_block() -> None:
    enc = replace(Int8Codec().encode(_block(16)), owner="0123abcd")
    assert from_bytes(to_bytes(enc)).owner == "0123abcd"
    moved = enc.to("cpu", pin=True)  # a copy (pinned where CUDA is present)
    assert moved is not enc and moved.owner == "0123abcd"
    assert from_bytes(to_bytes(Int8Codec().encode(_block(16)))).owner == ""


def test_corrupt_bytes_raise_integrity_error() -> None:
    data = bytearray(to_bytes(RawCodec().encode(_block(16))))
    data[-5] ^= 0xFF  # flip bits in the tensor data
    with pytest.raises(IntegrityError, match="checksum"):
        from_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        from_bytes(bytes(data[:100]))


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="`block`"):
        RawCodec().encode(torch.zeros(4, 4))
    with pytest.raises(ConfigError, match="`codec`"):
        make_codec("int3")
    with pytest.raises(ConfigError, match="`key_group`"):
        Int8Codec(key_group=0)


@pytest.mark.parametrize(
    ("algorithm", "new"),
    [("xxh3_128", xxhash.xxh3_128), ("sha256", hashlib.sha256)],
)
def test_checksum_is_the_stored_format(algorithm: str, new: Callable[..., Any]) -> None:
    # Blocks already on disk or in Redis carry this digest: over each tensor's name, shape and dtype (JSON)
    # and then its bytes, in name order. A change here would turn every stored block corrupt.
    tensors = {"v": torch.arange(6, dtype=torch.int8).view(2, 3), "k": torch.ones(2, dtype=torch.bfloat16)}
    expected = new()
    for name in sorted(tensors):
        t = tensors[name]
        expected.update(json.dumps([name, list(t.shape), str(t.dtype).removeprefix("torch.")]).encode())
        expected.update(t.view(torch.uint8).numpy().tobytes())
    assert checksum(tensors, algorithm) == expected.hexdigest()
    assert checksum({"e": torch.empty(0, 4)}, algorithm) == new(b'["e", [0, 4], "float32"]').hexdigest()
    with pytest.raises(ConfigError, match="`algorithm`"):
        checksum(tensors, "md5")


def test_blocks_are_written_with_xxh3_and_sha256_blocks_still_read() -> None:
    block = Int8Codec().encode(_block(16))
    data = to_bytes(block)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert "xxh3_128" in header["__metadata__"] and "sha256" not in header["__metadata__"]

    def as_before(h: dict[str, Any]) -> None:  # what a block stored before 2026-12-07 carries
        del h["__metadata__"]["xxh3_128"]
        h["__metadata__"]["sha256"] = checksum(block.tensors, "sha256")

    legacy = _with_header(data, as_before)
    assert torch.equal(from_bytes(legacy).tensors["qk"], block.tensors["qk"])
    damaged = bytearray(legacy)
    damaged[-3] ^= 1
    with pytest.raises(IntegrityError, match="checksum"):
        from_bytes(damaged)


def test_parsed_tensors_are_views_of_the_bytes_read() -> None:
    data = bytearray(to_bytes(Int4Codec().encode(_block(32))))
    back = from_bytes(data)
    start, end = _address(data), _address(data) + len(data)
    viewed = [t for t in back.tensors.values() if start <= t.data_ptr() < end]
    assert viewed, "no tensor shares the buffer"
    data_end = max(t.data_ptr() + t.numel() * t.element_size() for t in viewed)
    assert data_end <= end


def _address(buf: bytearray) -> int:
    return torch.frombuffer(buf, dtype=torch.uint8).data_ptr()


def _with_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """`data` (to_bytes output) with its JSON header edited, the tensor bytes unchanged."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["kv"].update(dtype="F64"),  # a dtype no codec stores
        lambda h: h["kv"].update(shape=[1, 2]),  # shape does not fill the bytes
        lambda h: h["kv"].update(data_offsets=[0, 1 << 40]),  # beyond the file
        lambda h: h["kv"].update(data_offsets=[8, 0]),  # reversed
        lambda h: h["kv"].update(shape=[-1, -2048]),  # negative sizes
        lambda h: h.pop("__metadata__"),  # no codec, dtype, token count or checksum
        lambda h: h["__metadata__"].pop("xxh3_128"),  # no checksum at all
        lambda h: h["__metadata__"].update(owner="../../etc"),  # an owner must be a tenant tag
    ],
)
def test_malformed_headers_raise_integrity_error(edit: Callable[[dict[str, Any]], None]) -> None:
    data = to_bytes(RawCodec().encode(_block(16)))
    assert from_bytes(_with_header(data, lambda h: None)).num_tokens == 16  # the edit alone breaks it
    with pytest.raises(IntegrityError, match="malformed"):
        from_bytes(_with_header(data, edit))

"""Envelope encryption: round trips, binding to tenant and key, rotation, tamper detection."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachelm.clock import ManualClock
from cachelm.crypto import MAGIC, Keyring, derive_key, envelope_key_id
from cachelm.errors import ConfigError, IntegrityError
from cachelm.store import EncryptedStore, MemoryStore, Record

K1, K2 = b"1" * 32, b"2" * 32


@settings(max_examples=50, deadline=None)
@given(plaintext=st.binary(max_size=4096), tenant=st.text(min_size=1, max_size=20), key=st.text(min_size=1))
def test_round_trip(plaintext: bytes, tenant: str, key: str) -> None:
    ring = Keyring({"k1": K1})
    envelope = ring.encrypt(plaintext, tenant_id=tenant, record_key=key)
    assert envelope.startswith(MAGIC) and envelope_key_id(envelope) == "k1"
    assert ring.decrypt(envelope, tenant_id=tenant, record_key=key) == plaintext


def test_a_bytearray_envelope_opens_like_bytes_into_a_buffer_and_is_left_unchanged() -> None:
    ring = Keyring({"k1": K1})
    envelope = ring.encrypt(b"kv block bytes" * 100, tenant_id="t", record_key="k")
    buf = bytearray(envelope)  # what a file read into a buffer gives
    assert envelope_key_id(buf) == "k1"
    assert ring.decrypt(buf, tenant_id="t", record_key="k") == b"kv block bytes" * 100
    opened = ring.decrypt_to_buffer(buf, tenant_id="t", record_key="k")
    assert isinstance(opened, bytearray) and opened == b"kv block bytes" * 100
    assert bytes(buf) == envelope
    with pytest.raises(IntegrityError, match="failed authentication"):
        ring.decrypt_to_buffer(buf, tenant_id="t", record_key="moved")
    buf[-1] ^= 1
    with pytest.raises(IntegrityError, match="failed authentication"):
        ring.decrypt(buf, tenant_id="t", record_key="k")


def test_envelopes_are_randomised_and_hide_the_plaintext() -> None:
    ring = Keyring({"k1": K1})
    plaintext = b"the launch code is 0000" * 4
    a = ring.encrypt(plaintext, tenant_id="t", record_key="k")
    b = ring.encrypt(plaintext, tenant_id="t", record_key="k")
    assert a != b  # fresh nonce each time
    assert b"launch" not in a and len(a) == len(plaintext) + len(MAGIC) + 1 + 2 + 12 + 16


def test_per_tenant_keys_differ_and_depend_on_key_id() -> None:
    assert derive_key(K1, key_id="k1", tenant_id="a") != derive_key(K1, key_id="k1", tenant_id="b")
    assert derive_key(K1, key_id="k1", tenant_id="a") != derive_key(K1, key_id="k2", tenant_id="a")
    assert derive_key(K1, key_id="k1", tenant_id="a") == derive_key(K1, key_id="k1", tenant_id="a")
    assert len(derive_key(K1, key_id="k1", tenant_id="a")) == 32


@pytest.mark.parametrize(
    "moved", [{"tenant_id": "other", "record_key": "k"}, {"tenant_id": "t", "record_key": "x"}]
)
def test_envelope_cannot_move_to_another_tenant_or_key(moved: dict[str, str]) -> None:
    ring = Keyring({"k1": K1})
    envelope = ring.encrypt(b"secret", tenant_id="t", record_key="k")
    with pytest.raises(IntegrityError, match="authentication"):
        ring.decrypt(envelope, **moved)


def test_any_flipped_bit_is_detected() -> None:
    ring = Keyring({"k1": K1})
    envelope = ring.encrypt(b"secret answer", tenant_id="t", record_key="k")
    for i in range(len(envelope)):
        tampered = bytearray(envelope)
        tampered[i] ^= 0x01
        with pytest.raises(IntegrityError):
            ring.decrypt(bytes(tampered), tenant_id="t", record_key="k")
    for cut in (0, 3, 10, len(envelope) - 1):
        with pytest.raises(IntegrityError):
            ring.decrypt(envelope[:cut], tenant_id="t", record_key="k")


def test_rotation_encrypts_with_newest_and_decrypts_old() -> None:
    old = Keyring({"k1": K1})
    rotated = Keyring({"k1": K1, "k2": K2})
    assert rotated.primary == "k2"
    sealed_old = old.encrypt(b"old", tenant_id="t", record_key="k")
    sealed_new = rotated.encrypt(b"new", tenant_id="t", record_key="k")
    assert envelope_key_id(sealed_new) == "k2"
    assert rotated.decrypt(sealed_old, tenant_id="t", record_key="k") == b"old"
    with pytest.raises(IntegrityError, match="unknown key id 'k2'"):
        old.decrypt(sealed_new, tenant_id="t", record_key="k")


def test_wrong_master_under_the_same_key_id_fails() -> None:
    sealed = Keyring({"k1": K1}).encrypt(b"x", tenant_id="t", record_key="k")
    with pytest.raises(IntegrityError):
        Keyring({"k1": K2}).decrypt(sealed, tenant_id="t", record_key="k")


def test_keyring_validation() -> None:
    with pytest.raises(ConfigError, match="keys"):
        Keyring({})
    with pytest.raises(ConfigError, match="length >= 32"):
        Keyring({"k1": b"short"})
    with pytest.raises(ConfigError, match="key_id"):
        Keyring({"bad id!": K1})
    with pytest.raises(ConfigError, match="primary"):
        Keyring({"k1": K1}, primary="k9")
    with pytest.raises(ConfigError, match="plaintext"):
        Keyring({"k1": K1}).encrypt("text", tenant_id="t", record_key="k")  # type: ignore[arg-type]


def test_parse_spec() -> None:
    spec = f"old:{base64.b64encode(K1).decode()}, new:{base64.b64encode(K2).decode()}"
    ring = Keyring.parse(spec)
    assert ring.key_ids == ("old", "new") and ring.primary == "new"
    with pytest.raises(ConfigError, match="base64"):
        Keyring.parse("k1:not base64!!")
    with pytest.raises(ConfigError, match="id:base64key"):
        Keyring.parse(base64.b64encode(os.urandom(32)).decode())


def test_encrypted_store_rotate_reencrypts_old_records() -> None:
    inner = MemoryStore(clock=ManualClock())
    EncryptedStore(inner, Keyring({"k1": K1})).put(Record(key="a", value=b"alpha", tenant="t"))
    store = EncryptedStore(inner, Keyring({"k1": K1, "k2": K2}))
    store.put(Record(key="b", value=b"beta", tenant="t"))
    assert store.rotate() == 1
    assert {envelope_key_id(r.value) for r in inner.scan()} == {"k2"}
    only_new = EncryptedStore(inner, Keyring({"k2": K2}))
    assert only_new.get("a") is not None and only_new.get("a").value == b"alpha"  # type: ignore[union-attr]


def test_encrypted_store_leaves_records_sealed_under_a_key_it_lacks() -> None:
    """A replica still on the old keyring (a rolling rotation) or given a wrong one misses on another's
    records, counts them, and deletes nothing: the replicas holding the key still read them."""
    inner = MemoryStore(clock=ManualClock())
    rotated = EncryptedStore(inner, Keyring({"k1": K1, "k2": K2}))  # k2 is its primary
    rotated.put(Record(key="a", value=b"alpha", tenant="t"))
    behind = EncryptedStore(inner, Keyring({"k1": K1}))
    assert behind.get("a") is None and behind.peek("a") is None and list(behind.scan()) == []
    assert behind.rotate() == 0
    assert behind.stats.unknown_key_reads == 4 and behind.stats.corrupt_reads == 0
    assert inner.peek("a") is not None and envelope_key_id(inner.peek("a").value) == "k2"  # type: ignore[union-attr]
    got = rotated.get("a")
    assert got is not None and got.value == b"alpha"
    # Bytes that are no envelope at all are still corrupt, and still dropped.
    inner.put(Record(key="b", value=b"plain bytes", tenant="t"))
    assert behind.get("b") is None and behind.stats.corrupt_reads == 1 and inner.peek("b") is None


def test_encrypted_store_undecryptable_record_is_a_counted_miss() -> None:
    inner = MemoryStore(clock=ManualClock())
    store = EncryptedStore(inner, Keyring({"k1": K1}))
    store.put(Record(key="a", value=b"alpha", tenant="t"))
    sealed = inner.peek("a")
    assert sealed is not None
    inner.put(Record(key="b", value=sealed.value, tenant="t"))  # an envelope moved to another key
    assert store.get("b") is None
    assert store.stats.corrupt_reads == 1 and inner.peek("b") is None
    assert store.get("a") is not None

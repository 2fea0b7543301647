"""The wire framing: round trips, and every malformed header refused before a payload is read."""

import io
import struct

import numpy as np
import pytest

from heinfer import wire
from heinfer.errors import SerializationError
from heinfer.wire import Kind, Section, WireError


def test_roundtrip_ciphertexts():
    items = [b"a" * 10, b"bb" * 7, b"\x00" * 3]
    body = wire.encode_ciphertexts(items)
    assert body[:4] == b"HEIW" and len(body) == 16 + 16 * 3 + sum(map(len, items))
    assert wire.decode_ciphertexts(body, expected_count=3, max_item_bytes=20) == items
    frame = wire.parse_header(body)
    assert frame.kind == Kind.CIPHERTEXTS and frame.count == 3
    assert frame.total_size == len(body)


def test_roundtrip_eval_keys_from_file():
    body = wire.encode_eval_keys(b"r" * 100, b"g" * 300)
    frame = wire.read_header(io.BytesIO(body), len(body), expected_kind=Kind.EVAL_KEYS)
    assert [s.type for s in frame.sections] == [Section.RELIN_KEYS, Section.GALOIS_KEYS]
    assert wire.payloads(body, frame) == [b"r" * 100, b"g" * 300]


def _header(magic=b"HEIW", version=1, kind=1, count=1, reserved=0):
    return struct.pack("<4sHHII", magic, version, kind, count, reserved)


def _entry(t=1, r1=0, r2=0, length=4):
    return struct.pack("<HHIQ", t, r1, r2, length)


@pytest.mark.parametrize("body,code,match", [
    (b"short", "malformed_body", "shorter than"),
    (_header(magic=b"JUNK") + _entry() + b"abcd", "malformed_body", "magic"),
    (_header(version=2) + _entry() + b"abcd", "malformed_body", "version 2"),
    (_header(reserved=1) + _entry() + b"abcd", "malformed_body", "reserved"),
    (_header(kind=9) + _entry() + b"abcd", "wrong_kind", "unknown body kind"),
    (_header(count=0), "wrong_count", "outside"),
    (_header(count=10**6), "wrong_count", "outside"),
    (_header(count=2) + _entry(), "malformed_body", "section table"),
    (_header() + _entry(r1=1) + b"abcd", "malformed_body", "reserved"),
    (_header() + _entry(t=7) + b"abcd", "malformed_body", "unknown type 7"),
    (_header() + _entry(t=15) + b"abcd", "secret_key_refused", "SECRET_KEY"),
    (_header() + _entry(t=3) + b"abcd", "wrong_kind", "RELIN_KEYS"),
    (_header() + _entry(length=0), "malformed_body", "empty"),
    (_header() + _entry(length=5) + b"abcd", "malformed_body", "truncated"),
    (_header() + _entry(length=3) + b"abcd", "malformed_body", "trailing"),
    (_header() + _entry(length=2**63) + b"abcd", "malformed_body", "truncated"),
])
def test_malformed_headers(body, code, match):
    with pytest.raises(WireError, match=match) as info:
        wire.parse_header(body)
    assert info.value.code == code
    assert isinstance(info.value, SerializationError)


def test_expectations_checked():
    body = wire.encode_ciphertexts([b"x" * 100, b"y"])
    with pytest.raises(WireError, match="expected 1") as e:
        wire.parse_header(body, expected_count=1)
    assert e.value.code == "wrong_count"
    with pytest.raises(WireError, match="EVAL_KEYS") as e:
        wire.parse_header(body, expected_kind=Kind.EVAL_KEYS)
    assert e.value.code == "wrong_kind"
    with pytest.raises(WireError, match="limit is 50") as e:
        wire.parse_header(body, max_item_bytes=50)
    assert e.value.code == "item_too_large"


def test_eval_keys_structure():
    only_galois = wire.encode(Kind.EVAL_KEYS, [(Section.GALOIS_KEYS, b"g")])
    with pytest.raises(WireError, match="RELIN_KEYS section"):
        wire.parse_header(only_galois)
    dup = wire.encode(Kind.EVAL_KEYS, [(Section.RELIN_KEYS, b"r"), (Section.RELIN_KEYS, b"r")])
    with pytest.raises(WireError, match="at most one"):
        wire.parse_header(dup)
    with pytest.raises(WireError) as e:
        wire.encode(Kind.EVAL_KEYS, [(Section.SECRET_KEY, b"s")])
    assert e.value.code == "secret_key_refused"
    with pytest.raises(WireError) as e:
        wire.encode(Kind.CIPHERTEXTS, [(Section.RELIN_KEYS, b"r")])
    assert e.value.code == "wrong_kind"


def test_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(WireError("boom", "wrong_count")))
    assert e.code == "wrong_count" and str(e) == "boom"


def test_random_bytes_never_crash():
    """Bounded fuzz: random bodies and bit flips of a valid body raise WireError or parse."""
    rng = np.random.default_rng(7)
    valid = wire.encode_ciphertexts([b"abc" * 20, b"z" * 9])
    for _ in range(300):
        body = bytearray(valid)
        for i in rng.integers(0, len(body), size=3):
            body[i] = int(rng.integers(0, 256))
        for candidate in (bytes(body), rng.bytes(int(rng.integers(0, 80)))):
            try:
                frame = wire.parse_header(candidate)
            except WireError:
                continue
            assert frame.total_size == len(candidate)


def test_ciphertext_bound_covers_real_ciphertexts():
    from heinfer.backends import make_backend
    from tests.conftest import small_params

    params = small_params(2)
    be = make_backend(params)
    be.generate_keys([])
    full = be.ciphertext_to_bytes(be.encrypt(np.random.default_rng(0).normal(size=be.slots)))
    bound = wire.ciphertext_bytes_bound(params.poly_modulus_degree, params.data_primes)
    assert len(full) <= bound < 3 * len(full)

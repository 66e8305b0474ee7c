"""Salted scrypt password hashes (EV_Central.passwords)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from EV_Central.passwords import hash_password, verify_password


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password("pass1")


def test_the_right_password_verifies(stored: str) -> None:
    assert verify_password("pass1", stored) is True


@pytest.mark.parametrize("attempt", ["pass2", "Pass1", "pass1 ", "pass", "", "pass11"])
def test_a_wrong_password_does_not(stored: str, attempt: str) -> None:
    assert verify_password(attempt, stored) is False


def test_non_ascii_passwords_round_trip() -> None:
    stored = hash_password("contraseña-€")
    assert verify_password("contraseña-€", stored)
    assert not verify_password("contrasena-€", stored)


def test_two_hashes_of_one_password_differ_by_their_salt() -> None:
    first, second = hash_password("pass1"), hash_password("pass1")
    assert first != second
    assert first.split("$")[4] != second.split("$")[4]  # the salts
    assert verify_password("pass1", first)
    assert verify_password("pass1", second)


def test_stored_format_carries_scheme_cost_salt_digest_and_no_plain_text(stored: str) -> None:
    parts = stored.split("$")
    assert len(parts) == 6
    scheme, n, r, p, salt_b64, digest_b64 = parts
    assert scheme == "scrypt"
    assert int(n) >= 2**14 and int(r) >= 8 and int(p) >= 1
    assert len(base64.b64decode(salt_b64)) == 16
    assert len(base64.b64decode(digest_b64)) == 32
    assert "pass1" not in stored
    assert base64.b64encode(b"pass1").decode() not in stored


def test_cost_is_read_from_the_stored_hash() -> None:
    # A hash made with other scrypt parameters (say, before the cost was raised) still verifies.
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"pass1", salt=salt, n=2**10, r=4, p=2, dklen=24)
    old = "$".join(
        [
            "scrypt",
            "1024",
            "4",
            "2",
            base64.b64encode(salt).decode(),
            base64.b64encode(digest).decode(),
        ]
    )
    assert verify_password("pass1", old)
    assert not verify_password("pass2", old)


def test_a_tampered_digest_does_not_verify(stored: str) -> None:
    head, digest_b64 = stored.rsplit("$", 1)
    digest = bytearray(base64.b64decode(digest_b64))
    digest[0] ^= 0x01
    assert not verify_password("pass1", f"{head}${base64.b64encode(bytes(digest)).decode()}")


def test_a_tampered_salt_does_not_verify(stored: str) -> None:
    scheme, n, r, p, _salt, digest = stored.split("$")
    other_salt = base64.b64encode(b"\x00" * 16).decode()
    assert not verify_password("pass1", "$".join([scheme, n, r, p, other_salt, digest]))


MALFORMED = [
    "",
    "pass1",  # a plain-text password where a hash should be
    "scrypt",
    "scrypt$16384$8$1$AAAA",  # a field missing
    "scrypt$16384$8$1$AAAA$AAAA$AAAA",  # a field too many
    "bcrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA",  # another scheme
    "scrypt$lots$8$1$AAAA$AAAA",  # cost not a number
    "scrypt$16384$8$1$!!!!$AAAA",  # salt not base64
    "scrypt$16384$8$1$AAAA$@@@",  # digest not base64
    "scrypt$3$8$1$AAAA$AAAA",  # n not a power of two
    "scrypt$16384$0$1$AAAA$AAAA",  # r = 0
    "scrypt$16384$8$0$AAAA$AAAA",  # p = 0
    "scrypt$16384$8$1$AAAA$",  # empty digest
    "scrypt$-16384$8$1$AAAA$AAAA",  # negative cost
    "scrypt$1073741824$8$1$AAAA$AAAA",  # more memory than allowed
    "scrypt$99999999999999999999999999$8$1$AAAA$AAAA",  # cost beyond any C integer
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_a_malformed_stored_hash_is_a_refusal_not_an_exception(bad: str) -> None:
    assert verify_password("pass1", bad) is False

"""Salted, slow password hashes (scrypt), compared in constant time; and CP secrets.

CP secrets (what a monitor presents at :5000) are random and long (192 bits), so a salted
SHA-256 is the right hash for them: a leaked database does not give them away, and checking one
costs microseconds, which matters when thousands of CPs reconnect at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

# scrypt cost: ~50 ms on a small machine; stored in each hash so it can be raised later.
N, R, P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    salt_b64 = base64.b64encode(salt).decode()
    digest_b64 = base64.b64encode(digest).decode()
    return f"scrypt${N}${R}${P}${salt_b64}${digest_b64}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(digest_b64)
        digest = hashlib.scrypt(
            password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def hash_secret(secret: str) -> str:
    salt = secrets.token_hex(8)
    digest = hashlib.sha256((salt + secret).encode()).hexdigest()
    return f"sha256${salt}${digest}"


def verify_secret(secret: str, stored: str | None) -> bool:
    """Constant-time check of a CP secret against its stored hash (False when there is none)."""
    if not stored or stored.count("$") != 2:
        # Same work either way: no timing difference between "no such hash" and "wrong".
        hashlib.sha256(secret.encode()).hexdigest()
        return False
    scheme, salt, expected = stored.split("$")
    digest = hashlib.sha256((salt + secret).encode()).hexdigest()
    return scheme == "sha256" and hmac.compare_digest(digest, expected)

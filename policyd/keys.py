"""Customer API key secrets: their format, generation and hashing.

A secret looks like ``pdk_live_`` or ``pdk_test_`` followed by 40 base62
characters (about 238 bits of entropy). The prefix lets secret scanners find
leaks (regex: ``pdk_(live|test)_[A-Za-z0-9]{40}``). Only the SHA-256 of a secret
is stored; a high-entropy random secret needs no slow hash. The secret is shown
once, when created or rotated.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string

SECRET_BODY_LENGTH = 40
SECRET_PATTERN = re.compile(r"^pdk_(live|test)_[A-Za-z0-9]{40}$")
DISPLAY_PREFIX_LENGTH = 12  # "pdk_live_AbC": enough to recognise, far too little to use
API_KEY_LENGTH_MAX = 256
_ALPHABET = string.ascii_letters + string.digits


def new_secret(test: bool = False) -> str:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_BODY_LENGTH))
    return f"pdk_{'test' if test else 'live'}_{body}"


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def is_well_formed(secret: str) -> bool:
    return len(secret) <= API_KEY_LENGTH_MAX and SECRET_PATTERN.match(secret) is not None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def display_prefix(secret: str) -> str:
    return secret[:DISPLAY_PREFIX_LENGTH]

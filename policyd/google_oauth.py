"""OAuth access tokens minted from a Google Cloud service account's key, for the provider accounts that
name one (Vertex AI: Gemini, and Claude on Vertex AI).

Vertex AI takes no API key: each request carries `Authorization: Bearer <access token>`, and a token
lasts about an hour. policyd mints it from the service account's key, by Google's OAuth 2.0 JWT bearer
grant (RFC 7523: a JWT signed with the key, exchanged at the key's `token_uri`), keeps it on the account,
and mints the next one before it lapses, in the background: a request never waits for a token.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_SECONDS = 3600  # the longest a JWT bearer assertion may ask for
REFRESH_BEFORE_SECONDS = 300  # a token is replaced this long before it lapses
MINT_TIMEOUT_SECONDS = 10


class ServiceAccountError(ValueError):
    """A service account key policyd cannot use, or a token endpoint that refused it."""


@dataclass
class ServiceAccountToken:
    """A service account's key and the access token last minted from it."""

    info: dict[str, Any] = field(repr=False)
    token: str = field(default="", repr=False)
    expires_at_seconds: float = 0.0  # wall-clock seconds the token lapses at (0: none yet)

    @classmethod
    def from_json(cls, text: str) -> "ServiceAccountToken":
        """A service account key as Google gives it (JSON: type, client_email, private_key, token_uri)."""
        try:
            info = json.loads(text)
        except ValueError:
            raise ServiceAccountError("a service account key is JSON") from None
        if not isinstance(info, dict) or info.get("type") != "service_account":
            raise ServiceAccountError("the key is not a service account's (its type is not service_account)")
        for name in ("client_email", "private_key"):
            if not isinstance(info.get(name), str) or not info[name]:
                raise ServiceAccountError(f"the service account key has no {name}")
        from google.auth import crypt

        try:
            crypt.RSASigner.from_service_account_info(info)
        except (ValueError, TypeError) as error:
            raise ServiceAccountError(f"the service account's private_key cannot sign: {error}") from None
        return cls({**info, "token_uri": info.get("token_uri") or GOOGLE_TOKEN_URI})

    @property
    def email(self) -> str:
        return str(self.info["client_email"])

    def due(self, now_seconds: float) -> bool:
        return now_seconds >= self.expires_at_seconds - REFRESH_BEFORE_SECONDS

    def assertion(self, now_seconds: float) -> bytes:
        """The JWT the token endpoint exchanges for an access token, signed with the account's key."""
        from google.auth import crypt, jwt

        issued = int(now_seconds)
        claims = {"iss": self.email, "scope": CLOUD_PLATFORM_SCOPE, "aud": self.info["token_uri"],
                  "iat": issued, "exp": issued + ASSERTION_SECONDS}
        return jwt.encode(crypt.RSASigner.from_service_account_info(self.info), claims)

    def mint(self, now_seconds: float) -> None:
        """A new access token from the token endpoint (blocking: run it on a thread)."""
        body = urllib.parse.urlencode({"grant_type": JWT_BEARER_GRANT,
                                       "assertion": self.assertion(now_seconds).decode()}).encode()
        request = urllib.request.Request(self.info["token_uri"], data=body, method="POST",
                                         headers={"content-type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(request, timeout=MINT_TIMEOUT_SECONDS) as reply:
                answer = json.loads(reply.read())
        except urllib.error.HTTPError as error:  # its body may echo the request: not kept
            raise ServiceAccountError(f"the token endpoint answered {error.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise ServiceAccountError(f"the token endpoint could not be read: {type(error).__name__}") from None
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise ServiceAccountError("the token endpoint gave no access_token")
        lifetime = answer.get("expires_in", ASSERTION_SECONDS)
        lifetime = lifetime if isinstance(lifetime, int) and not isinstance(lifetime, bool) and lifetime > 0 \
            else ASSERTION_SECONDS
        self.token, self.expires_at_seconds = token, now_seconds + lifetime

"""Provider accounts: the credentials policyd puts on upstream requests, pooled per provider.

Configured in a YAML file (`POLICYD_PROVIDERS_FILE`), never in the policy (policies are stored
and shown; secrets are not):

    accounts:
      - name: openai-1
        provider: openai
        cluster: openai            # the Envoy cluster requests on this account go to
        api_key_env: OPENAI_KEY_1  # the secret comes from the environment (or api_key: ...)
      - name: openai-2
        provider: openai
        cluster: openai
        api_key_env: OPENAI_KEY_2
      - name: azure-east
        provider: azure            # Azure OpenAI: the key goes as `api-key` (or set auth: bearer, ...)
        cluster: azure-east
        api_key_env: AZURE_KEY_EAST
      - name: bedrock-us
        provider: bedrock          # Amazon Bedrock: a Bedrock API key, sent as Authorization: Bearer
        cluster: bedrock-us        # bedrock-runtime.us-east-1.amazonaws.com
        api_key_env: BEDROCK_API_KEY
      - name: openai-research
        provider: openai
        api_key_env: OPENAI_KEY_3
        organization: org-...      # sent as OpenAI-Organization / OpenAI-Project with this account's
        project: proj_...          # requests (a client's own are never sent: they name its account)
        base_url: https://api.openai.com/v1   # where policyd asks for background responses (optional)
      - name: vertex-1
        provider: google           # Vertex AI (Gemini; provider anthropic for Claude on Vertex AI)
        cluster: vertex
        service_account_file: /secrets/vertex-sa.json   # or service_account_env: VERTEX_SA (the JSON)

An account given a Google Cloud service account's key authenticates with OAuth access tokens minted from
it (`Authorization: Bearer`), renewed before they lapse (policyd/google_oauth.py).

Requests are spread across the accounts of a provider; an account that answered 429 or 5xx
cools down (its retry-after, else COOLDOWN_SECONDS_DEFAULT) and the next requests use the next.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policyd.google_oauth import ServiceAccountError, ServiceAccountToken

log = logging.getLogger("policyd.providers")

COOLDOWN_SECONDS_DEFAULT = 30
COOLDOWN_SECONDS_MAX = 600
AUTH_HEADERS = {"bearer": "authorization", "x-api-key": "x-api-key", "x-goog-api-key": "x-goog-api-key",
                "api-key": "api-key"}  # api-key: Azure OpenAI's
ANTHROPIC_VERSION = "2023-06-01"  # the API version policyd's own calls to Anthropic name (its clients name theirs)
DEFAULT_AUTH = {"anthropic": "x-api-key", "google": "x-goog-api-key", "azure": "api-key"}


class AccountConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    provider: str = Field(min_length=1, max_length=64)
    cluster: str = Field("", max_length=128)
    api_key: str = Field("", repr=False)
    api_key_env: str = ""
    auth: Literal["bearer", "x-api-key", "x-goog-api-key", "api-key", ""] = ""
    provider_key_id: str = ""  # the provider's own id of this key (in its cost exports), for reconciliation
    organization: str = Field("", max_length=256)  # OpenAI's: the organization and project the key bills to
    project: str = Field("", max_length=256)
    # a Google Cloud service account's key (Vertex AI): the account's credential is an access token minted from it
    service_account_file: str = ""
    service_account_env: str = ""
    # where policyd itself reaches this account's API, as an SDK's base_url ("https://api.openai.com/v1"; Azure
    # OpenAI's dated API with its version, "https://R.openai.azure.com/openai?api-version=2024-10-21"): it asks
    # there for the background responses and batches it waits for, and reads batches' files
    base_url: str = Field("", max_length=512, pattern=r"^(https?://\S+)?$")


def _service_account(path: str, config: AccountConfig) -> ServiceAccountToken | None:
    if not (config.service_account_file or config.service_account_env):
        return None
    if config.api_key or config.api_key_env:
        raise SystemExit(f"{path}: account {config.name!r} gives both an api_key and a service account")
    try:
        text = Path(config.service_account_file).read_text() if config.service_account_file \
            else os.environ.get(config.service_account_env, "")
        return ServiceAccountToken.from_json(text)
    except (OSError, ServiceAccountError) as error:
        raise SystemExit(f"{path}: account {config.name!r}: its service account key: {error}") from None


class ProvidersFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    accounts: list[AccountConfig] = []


@dataclass
class Account:
    name: str
    provider: str
    cluster: str
    auth: str
    secret: str = field(repr=False)
    cooling_until_seconds: float = 0.0  # time.monotonic() seconds, not money
    provider_key_id: str = ""
    organization: str = ""
    project: str = ""
    service_account: ServiceAccountToken | None = None  # its secret is the access token last minted from it
    base_url: str = ""  # where policyd asks for this account's background responses ("": it cannot)

    def credential_header(self) -> tuple[str, str]:
        header = AUTH_HEADERS[self.auth]
        secret = self.service_account.token if self.service_account is not None else self.secret
        return header, (f"Bearer {secret}" if header == "authorization" else secret)

    def account_headers(self) -> list[tuple[str, str]]:
        """The OpenAI organization and project this account's requests bill to, where configured."""
        named = (("openai-organization", self.organization), ("openai-project", self.project))
        return [(name, value) for name, value in named if value]

    def request(self, path: str, body: bytes | None = None) -> urllib.request.Request:
        """A GET of <base_url>/<path> with this account's credential (a POST of the JSON `body`, where given); a
        query the base_url gives (Azure OpenAI's dated API: `https://R.openai.azure.com/openai?api-version=
        2024-10-21`) goes after the path."""
        header, value = self.credential_header()
        version = {"anthropic-version": ANTHROPIC_VERSION} if self.provider == "anthropic" else {}
        posted = {"content-type": "application/json"} if body is not None else {}
        base, _, query = self.base_url.partition("?")
        url = f"{base.rstrip('/')}/{path}" + (f"{'&' if '?' in path else '?'}{query}" if query else "")
        return urllib.request.Request(url, data=body, headers={
            header: value, **dict(self.account_headers()), **version, "accept": "application/json", **posted})

    def get(self, path: str, bytes_max: int, timeout_seconds: float, body: bytes | None = None) -> tuple[int, bytes]:
        """GET <base_url>/<path> with this account's credential (a POST of `body`, where given: a read the
        provider takes as one, Vertex AI's fetchPredictOperation) (blocking: run it on a thread): the provider's
        HTTP status and body (at most bytes_max + 1 bytes; none past a failure); status 0 when unreachable."""
        try:
            with urllib.request.urlopen(self.request(path, body), timeout=timeout_seconds) as reply:
                return reply.status, reply.read(bytes_max + 1)
        except urllib.error.HTTPError as error:
            return error.code, b""
        except (OSError, ValueError):
            return 0, b""


class ProviderPool:
    def __init__(self, accounts: list[Account] | None = None, clock=time.monotonic,
                 wall_ms=lambda: time.time_ns() // 1_000_000) -> None:
        self.clock = clock
        self.wall_ms = wall_ms
        self.accounts: dict[str, list[Account]] = {}
        for account in accounts or []:
            self.accounts.setdefault(account.provider, []).append(account)
        self._turns = {provider: itertools.count() for provider in self.accounts}
        self._announced: dict[str, int] = {}  # cool-downs begun here, not yet shared: account -> until (unix ms)

    @classmethod
    def load(cls, path: str) -> "ProviderPool":
        if not path:
            return cls()
        try:
            data = ProvidersFile.model_validate(yaml.safe_load(Path(path).read_text()) or {})
        except ValidationError as error:
            raise SystemExit(f"{path}: {error}") from None
        accounts = []
        for config in data.accounts:
            service_account = _service_account(path, config)
            secret = config.api_key or (os.environ.get(config.api_key_env, "") if config.api_key_env else "")
            if not secret and service_account is None:
                raise SystemExit(f"{path}: account {config.name!r} has no api_key (or {config.api_key_env} is unset)")
            auth = "bearer" if service_account is not None else \
                config.auth or DEFAULT_AUTH.get(config.provider, "bearer")
            accounts.append(Account(config.name, config.provider, config.cluster or config.provider, auth, secret,
                                    provider_key_id=config.provider_key_id, organization=config.organization,
                                    project=config.project, service_account=service_account,
                                    base_url=config.base_url.rstrip("/")))
        return cls(accounts)

    def minting(self) -> list[Account]:
        """The accounts whose credential is an access token minted from a service account's key."""
        return [a for accounts in self.accounts.values() for a in accounts if a.service_account is not None]

    async def mint_due_tokens(self) -> None:
        """A new access token for each account whose token lapses within REFRESH_BEFORE_SECONDS (or that has
        none yet), minted on a thread. One that fails keeps the token it had (it may still be good) and is
        tried again on the next pass; the error is logged without the key or the token."""
        now = self.wall_ms() / 1000
        for account in self.minting():
            assert account.service_account is not None
            if not account.service_account.due(now):
                continue
            try:
                await asyncio.to_thread(account.service_account.mint, now)
            except ServiceAccountError as error:
                log.error("account %s: no access token minted from service account %s: %s", account.name,
                          account.service_account.email, error)

    def named(self, provider: str, name: str) -> Account | None:
        """The provider's account of this name (where a stored response lives), else any (`pick`): an
        account since removed from the configuration cannot serve it, and the provider will say so."""
        for account in self.accounts.get(provider, ()):
            if account.name == name:
                return account
        return self.pick(provider)

    def account(self, name: str) -> Account | None:
        """The account of this name, of whichever provider; None when the configuration has none."""
        return next((a for accounts in self.accounts.values() for a in accounts if a.name == name), None)

    def follows(self, provider: str, name: str = "") -> bool:
        """Whether policyd can ask the provider for a background response a request makes on the account of
        this name, or on whichever of the provider's accounts it is given: each has a base_url."""
        accounts = [a for a in self.accounts.get(provider, ()) if not name or a.name == name]
        return bool(accounts) and all(a.base_url for a in accounts)

    def follows_any(self) -> bool:
        """Whether any account has a base_url: a process without one asks no provider for background responses."""
        return any(a.base_url for accounts in self.accounts.values() for a in accounts)

    def pick(self, provider: str) -> Account | None:
        """The next account of the provider that is not cooling down (the least cooled one if all are)."""
        accounts = self.accounts.get(provider)
        if not accounts:
            return None
        now = self.clock()
        start = next(self._turns[provider])
        for i in range(len(accounts)):
            account = accounts[(start + i) % len(accounts)]
            if account.cooling_until_seconds <= now:
                return account
        return min(accounts, key=lambda a: a.cooling_until_seconds)

    def cooling_providers(self) -> frozenset[str]:
        """Providers all of whose accounts are cooling down."""
        now = self.clock()
        return frozenset(p for p, accounts in self.accounts.items() if all(a.cooling_until_seconds > now for a in accounts))

    def cool_down(self, name: str, seconds: int = COOLDOWN_SECONDS_DEFAULT) -> None:
        seconds = min(max(seconds, 1), COOLDOWN_SECONDS_MAX)
        for accounts in self.accounts.values():
            for account in accounts:
                if account.name == name:
                    account.cooling_until_seconds = self.clock() + seconds
                    self._announced[name] = self.wall_ms() + seconds * 1000

    def announce(self, cooldowns: dict[str, int]) -> None:
        """Cool-downs (account -> until, unix ms) to share again: a publication that failed."""
        for name, until in cooldowns.items():
            self._announced[name] = max(until, self._announced.get(name, 0))

    def take_announced(self) -> dict[str, int]:
        """Cool-downs begun in this process since the last call (account -> until, unix ms), to share."""
        announced, self._announced = self._announced, {}
        return announced

    def adopt(self, shared: dict[str, int]) -> None:
        """Cool-downs any replica began (account -> until, unix ms): an account another replica saw
        answer 429 or 5xx cools down here too."""
        now_ms, now = self.wall_ms(), self.clock()
        for accounts in self.accounts.values():
            for account in accounts:
                until = shared.get(account.name, 0)
                if until > now_ms:
                    account.cooling_until_seconds = max(account.cooling_until_seconds, now + (until - now_ms) / 1000)

    def accounts_by_provider_key(self) -> dict[str, str]:
        """The provider's key id -> the account name policyd records."""
        return {a.provider_key_id: a.name for accounts in self.accounts.values() for a in accounts if a.provider_key_id}


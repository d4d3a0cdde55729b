"""Who may do what on the AdminService.

    operator            the bearer of POLICYD_ADMIN_TOKEN (or anyone, when no token is set: loopback use)
    scoped credential   pdadm_ + 40 base62 (scanner regex: ``pdadm_[A-Za-z0-9]{40}``), made by
                        CreateAdminCredential for one customer: it acts on that customer and on the
                        customers linked under it (LinkCustomer), to any depth up to ANCESTRY_DEPTH_MAX,
                        and never on policy, credit, reconciliation, period closing, audit or rebuild.

Resources by id (keys, credentials) outside a caller's scope are reported exactly like missing ones,
so a scoped caller cannot learn that another customer's key exists.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import time
from dataclasses import dataclass

from sqlalchemy import select, tuple_

from policyd.db import AdminCredentialRow, ApiKeyRow, CustomerParentRow, LedgerEntryRow
from policyd.domain import PolicydError
from policyd.store import Store

SECRET_PREFIX = "pdadm_"
SECRET_PATTERN = re.compile(r"^pdadm_[A-Za-z0-9]{40}$")
ANCESTRY_DEPTH_MAX = 8
CREDENTIALS_PER_CUSTOMER_MAX = 100
_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Principal:
    customer_id: str = ""  # "" = the operator
    credential_id: str = ""

    @property
    def operator(self) -> bool:
        return not self.customer_id


OPERATOR = Principal()


def out_of_scope(message: str = "this call is not open to a scoped admin credential") -> PolicydError:
    return PolicydError("PERMISSION_DENIED", "out_of_scope", message)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class AdminAccess:
    def __init__(self, store: Store, operator_token: str) -> None:
        self.store = store
        self.operator_token = operator_token

    # ------------------------------------------------------------------ who is calling
    def resolve(self, authorization: str) -> Principal | None:
        """The principal of an `authorization` metadata value, or None (unauthenticated)."""
        token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        if token.startswith(SECRET_PREFIX):
            if not SECRET_PATTERN.match(token):
                return None
            with self.store.session() as session:
                row = session.scalar(select(AdminCredentialRow).where(
                    AdminCredentialRow.secret_hash == hash_secret(token), AdminCredentialRow.revoked_ms == 0))
            return Principal(row.customer_id, row.id) if row is not None else None
        if not self.operator_token:
            return OPERATOR
        if hmac.compare_digest(token.encode(), self.operator_token.encode()):
            return OPERATOR
        return None

    # ------------------------------------------------------------------ scope
    def ancestors(self, customer_id: str) -> list[str]:
        chain: list[str] = []
        with self.store.session() as session:
            current = customer_id
            for _ in range(ANCESTRY_DEPTH_MAX):
                parent = session.scalar(select(CustomerParentRow.parent_id).where(CustomerParentRow.customer_id == current))
                if not parent or parent in chain:
                    break
                chain.append(parent)
                current = parent
        return chain

    def in_scope(self, principal: Principal, customer_id: str) -> bool:
        if principal.operator:
            return True
        return bool(customer_id) and (customer_id == principal.customer_id
                                      or principal.customer_id in self.ancestors(customer_id))

    def customers_in_scope(self, principal: Principal) -> set[str]:
        """The principal's customer and every customer linked under it."""
        found = {principal.customer_id}
        frontier = [principal.customer_id]
        with self.store.session() as session:
            for _ in range(ANCESTRY_DEPTH_MAX):
                if not frontier:
                    break
                children = set(session.scalars(select(CustomerParentRow.customer_id)
                                               .where(CustomerParentRow.parent_id.in_(frontier))))
                frontier = list(children - found)
                found |= children
        return found

    def require_operator(self, principal: Principal) -> None:
        if not principal.operator:
            raise out_of_scope()

    def require_customer(self, principal: Principal, customer_id: str) -> None:
        if not self.in_scope(principal, customer_id):
            raise out_of_scope(f"customer {customer_id!r} is outside this credential's scope")

    # ------------------------------------------------------------------ credentials and links
    def create_credential(self, principal: Principal, customer_id: str, label: str) -> tuple[AdminCredentialRow, str]:
        if not customer_id or len(customer_id) > 128 or len(label) > 256:
            raise PolicydError("INVALID_ARGUMENT", "invalid_request", "customer_id (1-128 characters) is required")
        self.require_customer(principal, customer_id)
        secret = SECRET_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(40))
        row = AdminCredentialRow(id="adm_" + secrets.token_hex(8), secret_hash=hash_secret(secret), prefix=secret[:10],
                                 customer_id=customer_id, label=label, created_ms=time.time_ns() // 1_000_000)
        with self.store.session() as session, session.begin():
            count = len(session.scalars(select(AdminCredentialRow.id).where(
                AdminCredentialRow.customer_id == customer_id, AdminCredentialRow.revoked_ms == 0)).all())
            if count >= CREDENTIALS_PER_CUSTOMER_MAX:
                raise PolicydError("RESOURCE_EXHAUSTED", "too_many_credentials",
                                   f"at most {CREDENTIALS_PER_CUSTOMER_MAX} working credentials per customer")
            session.add(row)
        return row, secret

    def credentials(self, principal: Principal, customer_id: str, after: tuple[int, str] | None = None,
                    count: int = 0) -> list[AdminCredentialRow]:
        """The credentials the principal may see (of one customer, when named), oldest first: `count` of them (0:
        all) past `after` (a credential's created_ms and id)."""
        if customer_id:
            self.require_customer(principal, customer_id)
            customers = {customer_id}
        else:
            customers = set() if principal.operator else self.customers_in_scope(principal)
        c = AdminCredentialRow
        with self.store.session() as session:
            query = select(c).order_by(c.created_ms, c.id)
            if customers:
                query = query.where(c.customer_id.in_(customers))
            if after is not None:
                query = query.where(tuple_(c.created_ms, c.id) > tuple_(*after))
            return list(session.scalars(query.limit(count) if count else query))

    def revoke_credential(self, principal: Principal, credential_id: str) -> AdminCredentialRow:
        with self.store.session() as session, session.begin():
            row = session.get(AdminCredentialRow, credential_id)
            if row is None or not self.in_scope(principal, row.customer_id):
                raise PolicydError("NOT_FOUND", "unknown_credential", f"no admin credential {credential_id!r}")
            if not row.revoked_ms:
                row.revoked_ms = time.time_ns() // 1_000_000
            session.flush()
            session.expunge(row)
            return row

    def link(self, principal: Principal, customer_id: str, parent_id: str) -> None:
        if not customer_id or not parent_id or customer_id == parent_id or max(len(customer_id), len(parent_id)) > 128:
            raise PolicydError("INVALID_ARGUMENT", "invalid_request", "customer_id and parent_id must differ (1-128 characters)")
        self.require_customer(principal, parent_id)
        if customer_id in self.ancestors(parent_id):
            raise PolicydError("INVALID_ARGUMENT", "invalid_request", "that link would make a cycle")
        if len(self.ancestors(parent_id)) + 1 >= ANCESTRY_DEPTH_MAX:
            raise PolicydError("INVALID_ARGUMENT", "invalid_request", f"at most {ANCESTRY_DEPTH_MAX} levels of customers")
        with self.store.session() as session, session.begin():
            existing = session.get(CustomerParentRow, customer_id)
            if existing is not None:
                if existing.parent_id == parent_id:
                    return
                if not principal.operator:
                    raise out_of_scope(f"customer {customer_id!r} is outside this credential's scope")
                existing.parent_id = parent_id
                return
            if not principal.operator:
                # a scoped caller may only bring in customers nobody has seen yet
                known = session.scalar(select(ApiKeyRow.id).where(ApiKeyRow.customer_id == customer_id).limit(1)) \
                    or session.scalar(select(LedgerEntryRow.entry_id).where(LedgerEntryRow.customer_id == customer_id).limit(1))
                if known or session.scalar(select(AdminCredentialRow.id).where(
                        AdminCredentialRow.customer_id == customer_id).limit(1)):
                    raise out_of_scope(f"customer {customer_id!r} is outside this credential's scope")
            session.add(CustomerParentRow(customer_id=customer_id, parent_id=parent_id,
                                          created_ms=time.time_ns() // 1_000_000))

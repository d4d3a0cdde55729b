"""The `policyd` command. `serve` runs the service; every other command talks to a running
policyd through its AdminService (like kubectl to an API server), so a change reaches
counters, SQL and every replica together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import grpc
from google.protobuf.json_format import MessageToDict

from policyd.gateway_defaults import ROUTE_TIMEOUT_SECONDS, SHAPES, UPSTREAM_IDLE_TIMEOUT_SECONDS
from policyd.money import MONEY_UNITS, MoneyError, format_amount, parse_amount
from policyd_client.v1 import admin_pb2, admin_pb2_grpc, types_pb2

EXIT_ERROR = 1
EXIT_AUDIT_FAILED = 3


def _serve(args: argparse.Namespace) -> int:
    from policyd.server import serve, work

    settings = _settings(args)
    if args.command == "serve" and settings.workers > 1:
        from policyd.workers import Supervisor

        return Supervisor(settings).run()

    async def main() -> None:
        shutdown, stop_now = asyncio.Event(), asyncio.Event()

        def signalled() -> None:  # the first signal: stop once the calls open have ended; a second: now
            (stop_now if shutdown.is_set() else shutdown).set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled)
        if args.command == "writer":
            await work(settings, shutdown=shutdown)
        else:
            await serve(settings, shutdown=shutdown, stop_now=stop_now)

    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(main())
    except Exception:  # logged as every line is (JSON, its traceback a field), not printed raw
        logging.getLogger("policyd").exception("policyd %s ended on an error", args.command)
        return EXIT_ERROR
    return 0


def _settings(args: argparse.Namespace) -> Any:
    from policyd.settings import Settings

    overrides: dict[str, Any] = {}
    for name in ("listen", "redis_url", "database_url", "admin_token", "workers"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.policy:
        overrides["policy_file"] = args.policy
    if args.command == "writer":
        overrides["writer_enabled"] = True
    settings = Settings(**overrides)
    from policyd.logs import configure

    configure(settings.log_level)
    return settings


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """Plain, TLS (--tls-ca) or mutual TLS (--tls-ca with --tls-cert and --tls-key)."""
    if not getattr(args, "tls_ca", ""):
        return grpc.insecure_channel(args.server)
    key = Path(args.tls_key).read_bytes() if args.tls_key else None
    cert = Path(args.tls_cert).read_bytes() if args.tls_cert else None
    return grpc.secure_channel(args.server, grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes(), key, cert))


def _stub(args: argparse.Namespace) -> tuple[admin_pb2_grpc.AdminServiceStub, list[tuple[str, str]]]:
    channel = _channel(args)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    return admin_pb2_grpc.AdminServiceStub(channel), metadata


def _admin_credentials(args: argparse.Namespace) -> int:
    stub, metadata = _stub(args)
    if args.credentials_command == "create":
        made = stub.CreateAdminCredential(admin_pb2.CreateAdminCredentialRequest(
            customer_id=args.customer, label=args.label), metadata=metadata)
        _print(args, made, f"{made.credential.id} for customer {made.credential.customer_id}\n"
                           f"secret (shown once, keep it safe): {made.secret}")
    elif args.credentials_command == "list":
        credentials, more = _pages(args, lambda asked: stub.ListAdminCredentials(asked, metadata=metadata),
                                   admin_pb2.ListAdminCredentialsRequest(customer_id=args.customer, limit=args.limit),
                                   "credentials")
        _print(args, admin_pb2.ListAdminCredentialsResponse(credentials=credentials, next_page_token=more), "\n".join(
            f"{c.id}  {c.customer_id}  {c.prefix}…  {'revoked' if c.revoked_unix_ms else 'active'}  {c.label}"
            for c in credentials) or "no admin credentials")
        _more(args, more)
    else:
        revoked = stub.RevokeAdminCredential(admin_pb2.RevokeAdminCredentialRequest(id=args.id), metadata=metadata)
        _print(args, revoked, f"{revoked.id} revoked")
    return 0


def _link_customer(args: argparse.Namespace) -> int:
    stub, metadata = _stub(args)
    linked = stub.LinkCustomer(admin_pb2.LinkCustomerRequest(customer_id=args.customer, parent_id=args.parent),
                               metadata=metadata)
    _print(args, linked, f"{linked.customer_id} is a sub-customer of {linked.parent_id}")
    return 0


def _print(args: argparse.Namespace, message: Any, text: str) -> None:
    if args.json:
        print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2, sort_keys=True))
    else:
        print(text)


def _pages(args: argparse.Namespace, call: Callable[[Any], Any], asked: Any, field: str) -> tuple[list[Any], str]:
    """The items (`field`) of a listing's first page, or of every page with --all, and the next page's token."""
    response = call(asked)
    items = list(getattr(response, field))
    while getattr(args, "all", False) and response.next_page_token:
        asked.page_token = response.next_page_token
        response = call(asked)
        items += getattr(response, field)
    return items, response.next_page_token


def _more(args: argparse.Namespace, next_page_token: str) -> None:
    if next_page_token and not args.json:
        print("(more: --all lists every page)")


def _key_line(key: admin_pb2.ApiKey) -> str:
    import time

    state = admin_pb2.KeyState.Name(key.state).lower()
    if key.expires_unix_ms and key.expires_unix_ms <= time.time() * 1000 and state != "revoked":
        state = "expired"
    o = key.owner
    ends = f"  (ends {_utc(key.expires_unix_ms)})" if key.expires_unix_ms else ""
    own = f"  (own limits: {', '.join(_limit_text(limit) for limit in key.limits)})" if key.limits else ""
    if key.owner_limits:
        own += f"  (its owners': {', '.join(_limit_text(limit) for limit in key.owner_limits)})"
    models = f"  (models: {', '.join(key.scopes)})" if key.scopes else ""
    return (f"{key.id}  {key.prefix}…  {state:8} {o.customer_id:20} {o.environment:16} {o.plan:16} {key.label}"
            f"{ends}{models}{own}")


def _limit_text(limit: admin_pb2.KeyLimit) -> str:
    value = format_amount(limit.limit) if limit.unit in MONEY_UNITS else str(limit.limit)
    whose = f"{limit.scope}: " if limit.scope else ""
    alerts = f" (alerts at {', '.join(f'{p}%' for p in limit.thresholds)})" if limit.thresholds else ""
    on = f" on {', '.join(limit.models)}" if limit.models else ""
    until = time.strftime(" until %Y-%m-%d %H:%M UTC", time.gmtime(limit.until_unix_ms / 1000)) \
        if limit.until_unix_ms else ""
    return f"{whose}{value} {limit.unit} a {limit.window}{on}" + (f" ({limit.timezone})" if limit.timezone else "") \
        + alerts + until


def _key_limit(text: str) -> admin_pb2.KeyLimit:
    """WINDOW[@ZONE]:UNIT:VALUE[:ALERTS][ on MODELS][ until WHEN], e.g. month:money:20.00, minute:requests:60,
    day@Asia/Tokyo:tokens:100000, month:money:500.00:75,90 (alerts at 75% and 90% of it), day:money:5.00 on
    gpt-4o,tier:premium (only requests served on those models count), month:money:100.00 until 2027-01-01 (binds
    until then, ISO 8601, UTC unless it says otherwise; then the plan's limit again)."""
    text, _, until_text = text.partition(" until ")
    try:
        until = _moment(until_text.strip()) if until_text.strip() else 0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: until takes an ISO 8601 date or time, not "
                                         f"{until_text.strip()!r}") from None
    text, _, on = text.partition(" on ")
    models = [m.strip() for m in on.split(",") if m.strip()]
    window, _, rest = text.strip().partition(":")
    unit, _, rest = rest.partition(":")
    value, _, alerts = rest.partition(":")
    window, _, zone = window.partition("@")
    try:
        limit = parse_amount(value) if unit in MONEY_UNITS else int(value)
        thresholds = [int(p) for p in alerts.split(",")] if alerts else []
    except (MoneyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: WINDOW:UNIT:VALUE[:ALERTS], e.g. month:money:20.00 or "
                                         "month:money:500.00:75,90") from None
    return admin_pb2.KeyLimit(window=window, unit=unit, limit=limit, timezone=zone, thresholds=thresholds,
                              models=models, until_unix_ms=until)


def _utc(ms: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms // 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


KEY_LIMIT_HELP = ("a limit of this key's own, WINDOW[@ZONE]:UNIT:VALUE[ on MODELS] (month:money:20.00, "
                  "minute:requests:60, 'day:money:5.00 on gpt-4o,tier:premium'); in place of the plan's key limit of "
                  "the same unit and window (and models); repeatable")


def _expiry_arguments(parser: argparse.ArgumentParser, never: bool = False) -> None:
    when = parser.add_mutually_exclusive_group(required=never)
    when.add_argument("--expires-in", help="the key ends this long from now: 30d, 24h, 90m")
    when.add_argument("--expires-at", help="the key ends at this time (ISO 8601; UTC unless it says otherwise)")
    if never:
        when.add_argument("--never", action="store_true", help="the key does not end")


def _keys(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    if args.keys_command == "create":
        response = stub.CreateKey(admin_pb2.CreateKeyRequest(
            label=args.label, customer_id=args.customer, workspace_id=args.workspace, project_id=args.project,
            team_id=args.team, environment=args.environment, plan=args.plan, scopes=args.scope or [],
            test=args.test, expires_unix_ms=_expiry_ms(args), limits=args.limit or []), metadata=md)
        _print(args, response, f"{_key_line(response.key)}\nsecret (shown once, store it now): {response.secret}")
    elif args.keys_command == "list":
        keys, more = _pages(args, lambda asked: stub.ListKeys(asked, metadata=md),
                            admin_pb2.ListKeysRequest(customer_id=args.customer, limit=args.limit), "keys")
        _print(args, admin_pb2.ListKeysResponse(keys=keys, next_page_token=more),
               "\n".join(_key_line(k) for k in keys) or "no keys")
        _more(args, more)
    elif args.keys_command == "show":
        review = stub.ReviewKey(admin_pb2.GetKeyRequest(id=args.id), metadata=md)
        _print(args, review, _review_text(review))
    elif args.keys_command == "expire":
        response = stub.SetKeyExpiry(admin_pb2.SetKeyExpiryRequest(id=args.id, expires_unix_ms=_expiry_ms(args)),
                                     metadata=md)
        _print(args, response, _key_line(response))
    elif args.keys_command == "limits":
        response = stub.SetKeyLimits(admin_pb2.SetKeyLimitsRequest(id=args.id, limits=args.limit or []), metadata=md)
        _print(args, response, _key_line(response))
    elif args.keys_command == "scopes":
        response = stub.SetKeyScopes(admin_pb2.SetKeyScopesRequest(id=args.id, scopes=args.scope or []), metadata=md)
        _print(args, response, _key_line(response))
    elif args.keys_command == "plan":
        moved = stub.SetPlan(admin_pb2.SetPlanRequest(key_id=args.key or "", customer_id=args.customer or "",
                                                      plan=args.plan), metadata=md)
        _print(args, moved, "\n".join(_key_line(k) for k in moved.keys) or "no key moved (already on the plan)")
    elif args.keys_command == "rotate":
        request = admin_pb2.RotateKeyRequest(id=args.id)
        if args.grace_seconds is not None:
            request.grace_seconds = args.grace_seconds
        response = stub.RotateKey(request, metadata=md)
        _print(args, response, f"{_key_line(response.key)}\nnew secret (shown once): {response.secret}")
    else:
        action = {"pause": stub.PauseKey, "resume": stub.ResumeKey, "revoke": stub.RevokeKey}[args.keys_command]
        response = action(admin_pb2.KeyActionRequest(id=args.id, reason=args.reason), metadata=md)
        _print(args, response, _key_line(response))
    return 0


def _review_text(r: admin_pb2.KeyReview) -> str:
    from datetime import datetime, timezone

    def when(ms: int) -> str:
        return datetime.fromtimestamp(ms // 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if ms else "never"

    k, o = r.key, r.key.owner
    lines = [
        f"key          {k.id} ({k.prefix}…) {admin_pb2.KeyState.Name(k.state).lower()}  label {k.label!r}",
        f"owner        customer {o.customer_id}  workspace {o.workspace_id or '-'}  project {o.project_id or '-'}"
        f"  team {o.team_id or '-'}",
        f"environment  {o.environment}   plan {o.plan}",
        f"routes       {', '.join(r.allowed_models) or 'none'}",
        f"created      {when(k.created_unix_ms)}   rotated {when(k.rotated_unix_ms)}   ends {when(k.expires_unix_ms)}",
        f"last used    {when(r.last_used_unix_ms)}",
        f"spend        today {format_amount(r.spend_today_nanos)}   this month {format_amount(r.spend_month_nanos)}",
        f"requests     {r.requests}   denied {r.denials}   errors {r.errors}",
    ]
    if r.denials_by_reason:
        lines.append("denials      " + ", ".join(f"{k}: {v}" for k, v in sorted(r.denials_by_reason.items())))
    for b in r.buckets:
        used = format_amount(b.used) if b.unit in MONEY_UNITS else str(b.used)
        limit = format_amount(b.limit) if b.unit in MONEY_UNITS else str(b.limit)
        lines.append(f"bucket       {b.label}: {used} of {limit} {b.unit} this {b.window}")
    return "\n".join(lines)


def _invoice(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    request = admin_pb2.InvoiceRequest(customer_id=args.customer, period=args.period, lines_by=args.by)
    if args.invoice_command == "close":
        response = stub.ClosePeriod(request, metadata=md)
        print(f"closed {args.customer} {args.period}: digest {response.digest}")
        return 0
    response = stub.ExportInvoice(request, metadata=md)
    print(response.csv if args.format == "csv" else response.json, end="")
    return 0


EXIT_RECONCILE_MISMATCH = 4


def _reconcile(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    tolerance = _amount_argument(args.tolerance)
    if tolerance is None:
        return EXIT_ERROR
    export = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    r = stub.Reconcile(admin_pb2.ReconcileRequest(provider=args.provider, export=export, tolerance_nanos=tolerance,
                                                  tolerance_bps=args.tolerance_bps), metadata=md)
    lines = [f"{'day':10} {'model':28} {'status':18} {'provider':>14} {'ledger':>14} {'difference':>14}"]
    for c in r.lines:
        if r.basis == "amount":
            figures = (format_amount(c.provider_nanos), format_amount(c.ledger_nanos), format_amount(c.difference_nanos))
        else:
            figures = (str(c.provider_tokens), str(c.ledger_tokens), str(c.provider_tokens - c.ledger_tokens))
        model = f"{c.model} @ {c.provider_account}" if c.provider_account else c.model
        lines.append(f"{c.day:10} {model[:28]:28} {c.status:18} {figures[0]:>14} {figures[1]:>14} {figures[2]:>14}")
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(r.totals.items()) if not k.endswith("_nanos"))
    lines.append(f"{'ok' if r.ok else 'NOT RECONCILED'} ({r.basis}): {counts}; provider "
                 f"{format_amount(r.totals.get('provider_nanos', 0))}, ledger {format_amount(r.totals.get('ledger_nanos', 0))}")
    _print(args, r, "\n".join(lines))
    return 0 if r.ok else EXIT_RECONCILE_MISMATCH


def _apply(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    response = stub.ApplyPolicy(admin_pb2.ApplyPolicyRequest(yaml=text, source_name=args.file, dry_run=args.dry_run),
                                metadata=md)
    begun = f"\n{response.limits_begun} limits begin mid-window: each starts from what its requests used in its " \
            "window so far" if response.limits_begun else ""
    if args.dry_run:
        _print(args, response, (response.diff or "no changes") + begun +
               f"\n(dry run: active version stays {response.version})")
    elif response.changed:
        _print(args, response, f"{response.diff}{begun}" + (f" ({response.buckets_seeded} buckets)" if begun else "")
               + f"\napplied: policy version {response.version}")
    else:
        _print(args, response, f"no changes: policy version {response.version} stays active")
    return 0


def _amount_argument(text: str) -> int | None:
    """A decimal amount from the command line, in nanos; None (and the reason on stderr) when it is not one."""
    try:
        return parse_amount(text)
    except MoneyError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def _wallet_text(w: admin_pb2.Wallet) -> str:
    return (f"{w.customer_id}{'/' + w.workspace_id if w.workspace_id else ''}: balance {format_amount(w.balance_nanos)} {w.currency}, reserved "
            f"{format_amount(w.reserved_nanos)}, available {format_amount(w.available_nanos)}")


def _credit(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    nanos = _amount_argument(args.amount)
    if nanos is None:
        return EXIT_ERROR
    import time

    expires = int(time.time() * 1000) + args.expires_in_days * 86_400_000 if args.expires_in_days > 0 else 0
    response = stub.GrantCredit(admin_pb2.GrantCreditRequest(
        customer_id=args.customer, amount=types_pb2.Money(currency=args.currency, nanos=nanos), source=args.source,
        grant_id=args.grant_id, note=args.note, expires_unix_ms=expires, workspace_id=args.workspace), metadata=md)
    _print(args, response, ("already granted: " if response.exists else f"granted {response.grant_id}: ")
           + _wallet_text(response.wallet))
    return 0


def _wallet(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    response = stub.GetWallet(admin_pb2.GetWalletRequest(customer_id=args.customer, workspace_id=args.workspace),
                              metadata=md)
    _print(args, response, _wallet_text(response))
    return 0


def _events(args: argparse.Namespace) -> int:
    import time

    stub, md = _stub(args)
    since, until = _window(args)
    response = stub.ListEvents(admin_pb2.ListEventsRequest(
        kind=args.kind, customer_id=args.customer, since_unix_ms=since, until_unix_ms=until, limit=args.limit),
        metadata=md)
    lines = []
    for e in response.events:
        detail = json.loads(e.detail_json or "{}")
        said = " ".join(f"{k}={v}" for k, v in sorted(detail.items()))
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.created_unix_ms / 1000))
        lines.append(f"{when} {e.kind} {e.customer_id or '-'} {said}")
    _print(args, response, "\n".join(lines) or "no events")
    return 0


def _owner_limits_line(owner: admin_pb2.OwnerLimits, changed: str = "") -> str:
    """An owner's limits; `changed`: what a change did, after them; then what each holds in its current window."""
    whose = owner.customer_id + (f" {owner.scope} {owner.owner_id}" if owner.owner_id else "")
    limits = (", ".join(_limit_text(limit) for limit in owner.limits) or "none (its plans' alone)") + \
        (" (paused: its requests refused)" if owner.paused else "") + changed
    used = [f"{_quantity(c.unit, c.used)} of {_quantity(c.unit, c.limit)} {c.unit} this {c.window}"
            + (time.strftime(" until %Y-%m-%d %H:%M UTC", time.gmtime(c.resets_unix)) if c.resets_unix else "")
            for c in owner.current]
    return f"{whose}: {limits}" + (f"\n    used: {'; '.join(used)}" if used else "")


def _quantity(unit: str, amount: int) -> str:
    return format_amount(amount) if unit in MONEY_UNITS else str(amount)


def _limits(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    if args.limits_command == "set":
        response = stub.SetOwnerLimits(admin_pb2.SetOwnerLimitsRequest(
            customer_id=args.customer, workspace_id=args.workspace, project_id=args.project, team_id=args.team,
            end_user_id=args.end_user, limits=args.limit or []), metadata=md)
        _print(args, response, _owner_limits_line(response, f" ({response.keys_changed} keys changed)"))
    elif args.limits_command in ("pause", "resume"):
        response = stub.SetEndUserPaused(admin_pb2.SetEndUserPausedRequest(
            customer_id=args.customer, end_user_id=args.end_user, paused=args.limits_command == "pause"), metadata=md)
        _print(args, response, _owner_limits_line(response, f" ({response.keys_changed} keys changed)"))
    elif args.limits_command == "reset":
        reset = stub.ResetLimits(admin_pb2.ResetLimitsRequest(
            customer_id=args.customer, key_id=args.key, workspace_id=args.workspace, project_id=args.project,
            team_id=args.team, end_user_id=args.end_user, feature=args.feature, model=args.model,
            thread_id=args.thread, tag=args.tag, unit=args.unit, window=args.window, name=args.name,
            reason=args.reason),
            metadata=md)
        whose = reset.customer_id + (f" {reset.scope} {reset.owner_id}" if reset.owner_id else "")
        _print(args, reset, f"{whose}: " + "; ".join(
            f"{r.limit.name}: {_quantity(r.limit.unit, r.forgiven)} forgiven, "
            f"{_quantity(r.limit.unit, r.limit.used)} of {_quantity(r.limit.unit, r.limit.limit)} {r.limit.unit} "
            f"held this {r.limit.window}" for r in reset.limits))
    else:
        named = [(scope, owner) for scope, owner in (("workspace", args.workspace), ("project", args.project),
                                                     ("team", args.team), ("end_user", args.end_user)) if owner]
        scope, owner_id = named[0] if named else (args.scope, "")
        owners, more = _pages(args, lambda asked: stub.ListOwnerLimits(asked, metadata=md),
                              admin_pb2.ListOwnerLimitsRequest(customer_id=args.customer, scope=scope,
                                                               owner_id=owner_id, limit=args.limit), "owners")
        _print(args, admin_pb2.ListOwnerLimitsResponse(owners=owners, next_page_token=more),
               "\n".join(_owner_limits_line(o) for o in owners) or "no limits of its own")
        _more(args, more)
    return 0


def _caps(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    if args.caps_command == "reset":
        reset = stub.ResetCap(admin_pb2.ResetCapRequest(name=args.name, reason=args.reason), metadata=md)
        _print(args, reset, f"{_quantity(reset.cap.unit, reset.forgiven)} forgiven; " + _cap_line(reset.cap))
        return 0
    response = stub.ListCaps(admin_pb2.ListCapsRequest(), metadata=md)
    _print(args, response, "\n".join(_cap_line(c) for c in response.caps) or "no caps in the policy in force")
    return 0


def _cap_line(c: Any) -> str:
    """A cap's current window, as `policyd caps` shows it."""
    import time

    used, limit = (format_amount(c.used), format_amount(c.limit)) if c.unit in MONEY_UNITS else (c.used, c.limit)
    covers = " ".join(filter(None, (c.provider, ",".join(c.models)))) or "every request"
    ends = time.strftime(" until %Y-%m-%d %H:%M UTC", time.gmtime(c.resets_unix)) if c.resets_unix else ""
    action = f", then {c.action}" + (f" to {c.downgrade_to}" if c.downgrade_to else "") if c.action != "block" else ""
    return f"{c.name}: {used} of {limit} {c.unit} this {c.window}{ends} ({covers}{action})"


def _audit(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    response = stub.Audit(admin_pb2.AuditRequest(), metadata=md)
    lines = [f"{'ok' if response.ok else 'MISMATCH'}: {response.counters_checked} counters checked"]
    lines += [f"  {m.counter}: redis {m.redis_value} ledger {m.ledger_value}" for m in response.mismatches]
    _print(args, response, "\n".join(lines))
    return 0 if response.ok else EXIT_AUDIT_FAILED


def _rebuild(args: argparse.Namespace) -> int:
    stub, md = _stub(args)
    response = stub.Rebuild(admin_pb2.RebuildRequest(), metadata=md)
    _print(args, response, f"rebuilt: {response.counters_written} counters written from SQL")
    return 0


def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = _channel(args)
    try:
        grpc.channel_ready_future(channel).result(timeout=args.wait)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    except grpc.FutureTimeoutError:
        print(f"not serving: nothing answered at {args.server}", file=sys.stderr)
        return EXIT_ERROR
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print("serving" if serving else "not serving")
    return 0 if serving else EXIT_ERROR


def _authorize(args: argparse.Namespace) -> int:
    from policyd_client.v1 import policy_pb2, policy_pb2_grpc

    stub = policy_pb2_grpc.PolicyServiceStub(_channel(args))
    request = policy_pb2.AuthorizeRequest(
        api_key=args.key, endpoint=types_pb2.EndpointFamily.Value(args.endpoint.upper()), model=args.model,
        shape=policy_pb2.RequestShape(prompt_bytes=len(args.prompt.encode()), message_count=1,
                                      max_output_tokens=args.max_tokens),
        attribution=types_pb2.Attribution(request_id=args.request_id, feature=args.feature, thread_id=args.thread,
                                          end_user_id=args.end_user),
    )
    response = stub.Authorize(request)
    decision = policy_pb2.Decision.Name(response.decision).lower()
    text = (f"{decision} {response.request_id}: served {response.served_model} via {response.route}, reserved "
            f"{format_amount(response.reserved.nanos)} {response.reserved.currency}, output cap {response.max_output_tokens}"
            if decision != "deny" else f"deny ({response.reason}, HTTP {response.http_status}): {response.message}")
    _print(args, response, text)
    return 0 if decision != "deny" else 2


def _settle(args: argparse.Namespace) -> int:
    from policyd_client.v1 import policy_pb2, policy_pb2_grpc

    stub = policy_pb2_grpc.PolicyServiceStub(_channel(args))
    response = stub.Settle(policy_pb2.SettleRequest(request_id=args.request_id, usage=policy_pb2.Usage(
        input_tokens=args.input_tokens, cached_input_tokens=args.cached_input_tokens,
        output_tokens=args.output_tokens)))
    outcome = policy_pb2.SettleOutcome.Name(response.outcome).lower()
    _print(args, response, f"{outcome}: cost {format_amount(response.cost.nanos)}, charge "
           f"{format_amount(response.charge.nanos)} {response.charge.currency}, balance "
           f"{format_amount(response.balance_before.nanos)} -> {format_amount(response.balance_after.nanos)}")
    return 0


def _usage(args: argparse.Namespace) -> int:
    from policyd.demo import _usage_table

    stub, md = _stub(args)
    if args.usage_command in ("list", "show"):
        asked = admin_pb2.ListUsageRequest(
            customer_id=args.customer, limit=args.limit if args.usage_command == "list" else 1,
            request_id=args.request_id, api_key_id=getattr(args, "key", ""),
            since_unix_ms=_moment(args.since) if getattr(args, "since", None) else 0,
            until_unix_ms=_moment(args.until) if getattr(args, "until", None) else 0)
        records, more = _pages(args, lambda asked: stub.ListUsage(asked, metadata=md), asked, "records")
        if args.usage_command == "show":
            if not records:
                print(f"error: no usage record {args.request_id}", file=sys.stderr)
                return EXIT_ERROR
            print(json.dumps(MessageToDict(records[0], preserving_proto_field_name=True), indent=2, sort_keys=True))
            return 0
        _print(args, admin_pb2.ListUsageResponse(records=records, next_page_token=more), _usage_table(records))
        _more(args, more)
        return 0
    if args.usage_command == "refund":
        nanos = _amount_argument(args.amount) if args.amount else 0
        if nanos is None:
            return EXIT_ERROR
        refund = stub.RefundUsage(admin_pb2.RefundUsageRequest(
            request_id=args.request_id, amount=types_pb2.Money(nanos=nanos), note=args.note), metadata=md)
        _print(args, refund, f"refunded {format_amount(refund.refunded.nanos)} {refund.refunded.currency} of "
                             f"{refund.request_id} ({refund.grant_id}): {_wallet_text(refund.wallet)}")
        return 0
    since, until = _window(args)
    report = stub.UsageReport(admin_pb2.UsageReportRequest(
        group_by=[g for g in args.group_by.split(",") if g], since_unix_ms=since, until_unix_ms=until,
        bucket=args.bucket, customer_id=args.customer, compare_previous=args.top_movers, timezone=args.timezone),
        metadata=md)
    rows = [{**dict(r.group), **({"bucket": r.bucket} if r.bucket else {}), **dict(r.figures)} for r in report.rows]
    fmt = "json" if args.json else args.format
    print(render_report(rows, [g for g in args.group_by.split(",") if g], fmt, report.currency), end="")
    return 0


REPORT_COLUMNS = ("requests", "allowed", "denied", "downgraded", "failed", "input_tokens", "cached_input_tokens",
                  "output_tokens", "cost_nanos", "charge_nanos", "margin_nanos", "cost_per_success_nanos",
                  "retries", "fallbacks")
MOVER_COLUMNS = ("previous_charge_nanos", "charge_change_nanos")


def render_report(rows: list[dict[str, Any]], group_by: list[str], fmt: str, currency: str) -> str:
    """A usage report as a table (amounts in currency units), CSV (amounts in nanos) or JSON."""
    import csv
    import io

    from policyd.reports import USAGE_FIGURES

    # the figures of what providers bill apart: always in CSV and JSON, in the table where some row has one
    usage = [c for c in USAGE_FIGURES if fmt != "table" or any(int(r.get(c, 0) or 0) for r in rows)]
    columns = [*group_by, *(["bucket"] if any("bucket" in r for r in rows) else []), *REPORT_COLUMNS, *usage,
               *([c for c in MOVER_COLUMNS if any(c in r for r in rows)])]
    if fmt == "json":
        return json.dumps({"currency": currency, "rows": [{c: r.get(c, 0 if c.endswith(("s", "nanos")) else "")
                                                           for c in columns} for r in rows]}, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([r.get(c, "") for c in columns])
        return out.getvalue()
    headers = [c.removesuffix("_nanos") + (f" {currency}" if c.endswith("_nanos") else "") for c in columns]
    cells = [[format_amount(int(r.get(c, 0))) if c.endswith("_nanos") else str(r.get(c, "")) for c in columns]
             for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(v.ljust(w) if i < len(group_by) else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines) + ("\n" if lines else "")


def _moment(text: str, zone_name: str = "") -> int:
    """An ISO 8601 date or time: in UTC, or in `zone_name` (an IANA time zone), unless it says otherwise."""
    from datetime import datetime, timezone
    from zoneinfo import ZoneInfo

    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"policyd: a date or time is ISO 8601 (2026-12-01, 2026-12-01T09:30, "
                         f"2026-12-01T09:30:00+01:00), not {text!r}") from None
    if moment.tzinfo is None:
        try:
            zone = ZoneInfo(zone_name) if zone_name and zone_name != "UTC" else timezone.utc
        except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
            raise SystemExit(f"policyd: unknown time zone {zone_name!r} (an IANA name such as 'Europe/Paris')")
        moment = moment.replace(tzinfo=zone)
    return int(moment.timestamp()) * 1000


def _window(args: argparse.Namespace) -> tuple[int, int]:
    import time

    zone = getattr(args, "timezone", "") or ""
    until = _moment(args.until, zone) if args.until else int(time.time() * 1000)
    if args.since:
        return _moment(args.since, zone), until
    return until - _duration_ms(args.last), until


def _duration_ms(text: str) -> int:
    """ "90m", "24h", "30d" in milliseconds."""
    amount, unit = text[:-1], text[-1:]
    if not amount.isdigit() or unit not in ("m", "h", "d"):
        raise SystemExit(f"policyd: a duration is a whole number and m, h or d (30d, 24h, 90m), not {text!r}")
    return int(amount) * {"m": 60_000, "h": 3_600_000, "d": 86_400_000}[unit]


def _expiry_ms(args: argparse.Namespace) -> int:
    """--expires-at (ISO 8601, UTC unless it says otherwise) or --expires-in (a duration from now); 0 = never."""
    import time

    if getattr(args, "expires_at", None):
        return _moment(args.expires_at)
    if getattr(args, "expires_in", None):
        return int(time.time() * 1000) + _duration_ms(args.expires_in)
    return 0


def _mock_provider(args: argparse.Namespace) -> int:
    import time

    from policyd.mock_provider import MockProvider

    mock = MockProvider(host=args.host, port=args.port, api_keys=tuple(args.api_key or ()),
                        keep_alive_seconds=args.keep_alive).start()
    print(f"mock provider on http://{args.host}:{mock.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        mock.stop()
    return 0


def _print_settings_reference(args: argparse.Namespace) -> int:
    from policyd.settings import reference

    print(reference(), end="")
    return 0


def _gateway_config(args: argparse.Namespace) -> int:
    from policyd.gateway_config import host_and_port, parse_upstream, render

    try:  # a spec it cannot take is said in a line, not as a traceback (nor a cluster taken as something else)
        (host, port), *more = [host_and_port(address) for address in args.policyd.split(",")]
        upstreams = [parse_upstream(spec) for spec in args.cluster or
                     ["openai=127.0.0.1:8080", "anthropic=127.0.0.1:8080", "google=127.0.0.1:8080"]]
        config = render(listen_port=args.listen_port, policyd_host=host, policyd_port=port,
                        admin_port=args.admin_port, upstreams=tuple(upstreams), failure_mode_allow=args.fail_open,
                        shape=args.shape, more_policyd=tuple(more), route_timeout_seconds=args.route_timeout,
                        cors_origins=tuple(args.cors_origin or ()), access_log_path=args.access_log or "",
                        upstream_idle_timeout_seconds=args.upstream_idle_timeout, trusted_proxies=args.trusted_proxies)
    except ValueError as error:
        raise SystemExit(f"policyd gateway-config: {error}") from None
    print(config, end="")
    from policyd.gateway_defaults import STREAM_TIMEOUT_MARGIN_SECONDS
    from policyd.settings import Settings

    needed = args.route_timeout + STREAM_TIMEOUT_MARGIN_SECONDS
    if needed > Settings.model_fields["reservation_ttl_seconds"].default:  # a reply still running at its deadline
        print(f"policyd: a route timeout of {args.route_timeout} s needs POLICYD_RESERVATION_TTL_SECONDS of at least "
              f"{needed} and POLICYD_SHUTDOWN_GRACE_SECONDS as long on every replica", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from policyd.demo import run

    stub, md = _stub(args)
    return run(args.base_url, args.key_a, args.key_b, stub, md)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="policyd", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    def client(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", default=os.environ.get("POLICYD_SERVER", "127.0.0.1:50051"),
                       help="address of a running policyd (env POLICYD_SERVER)")
        p.add_argument("--token", default=os.environ.get("POLICYD_ADMIN_TOKEN", ""),
                       help="admin token (env POLICYD_ADMIN_TOKEN)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--tls-ca", dest="tls_ca", default=os.environ.get("POLICYD_TLS_CA", ""),
                       help="PEM CA of the server's certificate: connect over TLS")
        p.add_argument("--tls-cert", dest="tls_cert", default=os.environ.get("POLICYD_TLS_CLIENT_CERT", ""),
                       help="client certificate, for mutual TLS")
        p.add_argument("--tls-key", dest="tls_key", default=os.environ.get("POLICYD_TLS_CLIENT_KEY", ""))
        return p

    serve = commands.add_parser("serve", help="run the policy decision service")
    serve.add_argument("--listen", help="host:port (env POLICYD_LISTEN, default 127.0.0.1:50051)")
    serve.add_argument("--redis-url", dest="redis_url", help="env POLICYD_REDIS_URL; empty = embedded store")
    serve.add_argument("--database-url", dest="database_url", help="env POLICYD_DATABASE_URL; default sqlite:///policyd.db")
    serve.add_argument("--admin-token", dest="admin_token", help="env POLICYD_ADMIN_TOKEN")
    serve.add_argument("--policy", help="policy YAML to apply at start")
    serve.add_argument("--workers", type=int, help="processes sharing the port (env POLICYD_WORKERS, default 1)")
    serve.set_defaults(run=_serve)

    writer = commands.add_parser("writer", help="move decisions from Redis to SQL (and run the background loops) "
                                                "in a process of its own; pair with POLICYD_WRITER_ENABLED=false on serve")
    for flag, dest in (("--redis-url", "redis_url"), ("--database-url", "database_url")):
        writer.add_argument(flag, dest=dest)
    writer.set_defaults(run=_serve, listen=None, admin_token=None, policy=None, workers=None)

    apply = client(commands.add_parser("apply", help="apply a policy YAML file (- for stdin)"))
    apply.add_argument("-f", "--file", required=True)
    apply.add_argument("--dry-run", action="store_true", help="show the diff, apply nothing")
    apply.set_defaults(run=_apply)

    keys = commands.add_parser("keys", help="customer API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = client(key_commands.add_parser("create", help="create a key; its secret is shown once"))
    create.add_argument("--customer", required=True)
    create.add_argument("--plan", required=True)
    create.add_argument("--environment", default="production")
    create.add_argument("--workspace", default="")
    create.add_argument("--project", default="")
    create.add_argument("--team", default="")
    create.add_argument("--label", default="")
    create.add_argument("--scope", action="append", help="narrow the plan's models (glob or tier:NAME); repeatable")
    create.add_argument("--test", action="store_true", help="a pdk_test_ key")
    create.add_argument("--limit", action="append", type=_key_limit, help=KEY_LIMIT_HELP)
    _expiry_arguments(create)
    expire = client(key_commands.add_parser("expire", help="set when a key ends (--never: it does not)"))
    expire.add_argument("id")
    _expiry_arguments(expire, never=True)
    listing = client(key_commands.add_parser("list", help="list keys (never their secrets)"))
    listing.add_argument("--customer", default="")
    listing.add_argument("--limit", type=int, default=0, help="keys a page (default and at most 1000)")
    listing.add_argument("--all", action="store_true", help="every page")
    own = client(key_commands.add_parser("limits", help="set a key's own limits (the whole set; --none: the plan's alone)"))
    own.add_argument("id")
    given = own.add_mutually_exclusive_group(required=True)
    given.add_argument("--limit", action="append", type=_key_limit, help=KEY_LIMIT_HELP)
    given.add_argument("--none", action="store_true", help="no limits of its own")
    narrow = client(key_commands.add_parser("scopes", help="the models a key may use within its plan (--all: the plan's)"))
    narrow.add_argument("id")
    which = narrow.add_mutually_exclusive_group(required=True)
    which.add_argument("--scope", action="append", help="a model glob or tier:NAME; repeatable")
    which.add_argument("--all", action="store_true", help="every model of its plan")
    plan = client(key_commands.add_parser("plan", help="move a key, or every key of a customer, to another plan"))
    plan.add_argument("plan")
    whose = plan.add_mutually_exclusive_group(required=True)
    whose.add_argument("--key", help="the key's id")
    whose.add_argument("--customer", help="every key of this customer")
    for name in ("show", "pause", "resume", "revoke", "rotate"):
        p = client(key_commands.add_parser(name, help=f"{name} a key"))
        p.add_argument("id")
        p.add_argument("--reason", default="")
        if name == "rotate":
            p.add_argument("--grace-seconds", type=int, default=None,
                           help="how long the old secret keeps working (default 86400)")
    keys.set_defaults(run=_keys)

    limits = commands.add_parser("limits", help="the limits of a customer, or of one of its workspaces, projects, teams or end users")
    limit_commands = limits.add_subparsers(dest="limits_command", required=True)
    owner = client(limit_commands.add_parser(
        "set", help="set an owner's limits, binding every key of it (the whole set; --none: its plans' alone)"))
    owner.add_argument("--customer", required=True)
    one_of = owner.add_mutually_exclusive_group()
    one_of.add_argument("--workspace", default="", help="this workspace of the customer's, not the whole customer")
    one_of.add_argument("--project", default="", help="this project of the customer's")
    one_of.add_argument("--team", default="", help="this team of the customer's")
    one_of.add_argument("--end-user", default="", help="this end user of the customer's (as requests name it: "
                        "x-end-user-id, the body's user): the requests naming it, of any of its keys")
    given = owner.add_mutually_exclusive_group(required=True)
    given.add_argument("--limit", action="append", type=_key_limit,
                       help="WINDOW[@ZONE]:UNIT:VALUE[ on MODELS] (month:money:500.00, 'day:money:50.00 on "
                            "tier:premium'); in place of its plans' limit of the same scope, unit and window (and "
                            "models); repeatable")
    given.add_argument("--none", action="store_true", help="no limits of its own")
    for command, what in (("pause", "pause an end user of a customer: the requests naming it, of any of its keys, "
                                    "are refused (end_user_paused) until resumed; its limits kept"),
                          ("resume", "resume an end user paused")):
        paused = client(limit_commands.add_parser(command, help=what))
        paused.add_argument("--customer", required=True)
        paused.add_argument("--end-user", required=True, help="as requests name it: x-end-user-id, the body's user")
    listing = client(limit_commands.add_parser(
        "list", help="a customer's limits and its owners', with their use (every customer's without --customer)"))
    listing.add_argument("--customer", default="")
    scope_of = listing.add_mutually_exclusive_group()
    scope_of.add_argument("--scope", default="", choices=["", "customer", "workspace", "project", "team", "end_user"],
                          help="only the owners of this scope")
    for flag, what in (("--workspace", "workspace"), ("--project", "project"), ("--team", "team"),
                       ("--end-user", "end user")):
        scope_of.add_argument(flag, default="", help=f"only this {what}'s")
    listing.add_argument("--limit", type=int, default=50, help="owners a page (at most 1000)")
    listing.add_argument("--all", action="store_true", help="every page")
    reset = client(limit_commands.add_parser(
        "reset", help="forgive what the current window of an owner's limits counted of its settled requests "
                      "(requests in flight keep their holds; no money moves)"))
    reset.add_argument("--customer", default="", help="the customer (with --key: may be left out)")
    one_of = reset.add_mutually_exclusive_group()
    one_of.add_argument("--key", default="", help="this key's limits, not the customer's")
    for flag, what in (("--workspace", "workspace"), ("--project", "project"), ("--team", "team"),
                       ("--end-user", "end user"), ("--feature", "feature"), ("--model", "model"),
                       ("--thread", "thread")):
        one_of.add_argument(flag, default="", help=f"this {what} of the customer's, not the whole customer")
    one_of.add_argument("--tag", default="", metavar="TAG=VALUE",
                        help="this value of a tag limits of scope tag count apart, not the whole customer")
    reset.add_argument("--unit", default="", choices=["", "money", "cost", "tokens", "requests"],
                       help="only the limits of this unit")
    reset.add_argument("--window", default="", choices=["", "minute", "hour", "day", "month", "total"],
                       help="only the limits of this window")
    reset.add_argument("--name", default="", help="only the limit of this name (as refusals name it)")
    reset.add_argument("--reason", default="", help="kept with the reset")
    limits.set_defaults(run=_limits)

    creds = commands.add_parser("admin-credentials", help="admin credentials scoped to a customer and its sub-customers")
    cred_commands = creds.add_subparsers(dest="credentials_command", required=True)
    cred_create = client(cred_commands.add_parser("create", help="create one; its secret is shown once"))
    cred_create.add_argument("--customer", required=True)
    cred_create.add_argument("--label", default="")
    cred_list = client(cred_commands.add_parser("list", help="list them (never their secrets)"))
    cred_list.add_argument("--customer", default="")
    cred_list.add_argument("--limit", type=int, default=0, help="credentials a page (default and at most 1000)")
    cred_list.add_argument("--all", action="store_true", help="every page")
    client(cred_commands.add_parser("revoke", help="revoke one at once")).add_argument("id")
    creds.set_defaults(run=_admin_credentials)

    link = client(commands.add_parser("link-customer", help="make a customer a sub-customer of another (resellers)"))
    link.add_argument("customer")
    link.add_argument("--parent", required=True)
    link.set_defaults(run=_link_customer)

    credit = commands.add_parser("credit", help="prepaid credit")
    credit_commands = credit.add_subparsers(dest="credit_command", required=True)
    grant = client(credit_commands.add_parser("grant", help="add credit to a customer's wallet"))
    grant.add_argument("--customer", required=True)
    grant.add_argument("--workspace", default="", help="credit this workspace's own wallet (wallet_scope: workspace)")
    grant.add_argument("--amount", required=True,
                       help="decimal, e.g. 10.00; a debit (-5.00) with --source adjustment")
    grant.add_argument("--currency", default="")
    grant.add_argument("--source", default="purchase", choices=["purchase", "promo", "refund", "adjustment"])
    grant.add_argument("--grant-id", dest="grant_id", default="", help="idempotency key")
    grant.add_argument("--note", default="")
    grant.add_argument("--expires-in-days", dest="expires_in_days", type=int, default=0,
                       help="what is left of this credit is removed after this many days (0: never)")
    credit.set_defaults(run=_credit)

    invoice = commands.add_parser("invoice", help="invoice line items per customer and month")
    invoice_commands = invoice.add_subparsers(dest="invoice_command", required=True)
    for name, text in (("export", "invoice-ready lines (reproducible byte for byte)"),
                       ("close", "close a period: later corrections land in the next one")):
        p = client(invoice_commands.add_parser(name, help=text))
        p.add_argument("--customer", required=True)
        p.add_argument("--period", required=True, help="YYYY-MM (UTC)")
        p.add_argument("--by", default="model", choices=["model", "feature"])
        if name == "export":
            p.add_argument("--format", default="csv", choices=["csv", "json"])
    invoice.set_defaults(run=_invoice)

    recon = client(commands.add_parser("reconcile", help="a provider's cost export against the ledger"))
    recon.add_argument("--provider", required=True)
    recon.add_argument("--file", required=True,
                       help="OpenAI costs or usage JSON, Anthropic cost report JSON, or CSV (- for stdin)")
    recon.add_argument("--tolerance", default="0", help="an absolute difference within tolerance, e.g. 0.01")
    recon.add_argument("--tolerance-bps", dest="tolerance_bps", type=int, default=0,
                       help="or a relative one, in basis points of the ledger's figure")
    recon.set_defaults(run=_reconcile)

    wallet = client(commands.add_parser("wallet", help="show a customer's wallet"))
    wallet.add_argument("customer")
    wallet.add_argument("--workspace", default="")
    wallet.set_defaults(run=_wallet)

    health = client(commands.add_parser("health", help="is a policyd serving? (gRPC health check)"))
    health.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the server")
    health.set_defaults(run=_health)

    authorize = client(commands.add_parser("authorize", help="ask for a decision, as a proxy would (for trying things)"))
    authorize.add_argument("--key", required=True)
    authorize.add_argument("--model", required=True)
    authorize.add_argument("--endpoint", default="chat_completions")
    authorize.add_argument("--prompt", default="Hello!")
    authorize.add_argument("--max-tokens", dest="max_tokens", type=int, default=0)
    authorize.add_argument("--request-id", dest="request_id", default="")
    authorize.add_argument("--feature", default="")
    authorize.add_argument("--thread", default="")
    authorize.add_argument("--end-user", dest="end_user", default="")
    authorize.set_defaults(run=_authorize)

    settle = client(commands.add_parser("settle", help="settle a request with its actual usage (for trying things)"))
    settle.add_argument("request_id")
    settle.add_argument("--input-tokens", dest="input_tokens", type=int, required=True)
    settle.add_argument("--cached-input-tokens", dest="cached_input_tokens", type=int, default=0)
    settle.add_argument("--output-tokens", dest="output_tokens", type=int, required=True)
    settle.set_defaults(run=_settle)

    usage = commands.add_parser("usage", help="usage records and reports")
    usage_commands = usage.add_subparsers(dest="usage_command", required=True)
    listing = client(usage_commands.add_parser("list", help="the latest usage records"))
    listing.add_argument("--customer", default="")
    listing.add_argument("--limit", type=int, default=20, help="records a page (at most 1000)")
    listing.add_argument("--request-id", dest="request_id", default="")
    listing.add_argument("--key", default="", help="one key's records (its id)")
    listing.add_argument("--since", help="records made at or after (ISO date or time, UTC)")
    listing.add_argument("--until", help="records made before (ISO date or time, UTC)")
    listing.add_argument("--all", action="store_true", help="every page, not the first alone")
    show = client(usage_commands.add_parser("show", help="one request's record, every field (its x-policyd-request-id)"))
    show.add_argument("request_id")
    show.add_argument("--customer", default="")
    refund = client(usage_commands.add_parser(
        "refund", help="give back what a settled request was charged: to its wallet and its money limits"))
    refund.add_argument("request_id")
    refund.add_argument("--amount", default="", help="a part of the charge (decimal); default: all of it")
    refund.add_argument("--note", default="", help="why (kept in the ledger)")
    report = client(usage_commands.add_parser("report", help="usage grouped by any dimension over a window"))
    report.add_argument("--group-by", dest="group_by", default="customer",
                        help="comma-separated: customer, workspace, project, team, key, environment, feature, route, "
                             "thread, end_user, model, requested_model, provider, decision, status, reason")
    report.add_argument("--since", help="start (ISO date or time, UTC or --timezone's)")
    report.add_argument("--until", help="end (ISO date or time, UTC or --timezone's; default now)")
    report.add_argument("--last", default="7d", help="window length when --since is not given: 24h, 7d, 30d ...")
    report.add_argument("--bucket", default="", choices=["", "hour", "day", "month"])
    report.add_argument("--timezone", default="", help="the IANA time zone whose hours, days and months the "
                        "buckets are, and in which --since and --until are read (default: buckets of the policy's "
                        "time zone; UTC)")
    report.add_argument("--customer", default="")
    report.add_argument("--top-movers", dest="top_movers", action="store_true",
                        help="compare each group with the window before: what caused the spike")
    report.add_argument("--format", default="table", choices=["table", "csv", "json"])
    usage.set_defaults(run=_usage)

    mock = commands.add_parser("mock-provider", help="a small OpenAI/Anthropic-compatible provider for demos and tests")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8080)
    mock.add_argument("--api-key", action="append", help="the provider key it accepts (repeatable; none = any)")
    mock.add_argument("--keep-alive", type=float, metavar="SECONDS",
                      help="close a connection unused this long (as uvicorn does after 5 s); by default never")
    mock.set_defaults(run=_mock_provider)

    gateway = commands.add_parser("gateway-config", help="print an Envoy config that makes Envoy a policyd gateway")
    gateway.add_argument("--listen-port", type=int, default=10000)
    gateway.add_argument("--admin-port", type=int, default=9901)
    gateway.add_argument("--policyd", default="127.0.0.1:50051",
                         help="host:port of policyd; several replicas comma-separated (or a name that resolves to them)")
    gateway.add_argument("--cluster", action="append",
                         help="NAME=HOST:PORT[:tls][:idle=SECONDS], repeatable (idle: a provider that closes an "
                              "unused connection sooner than --upstream-idle-timeout)")
    gateway.add_argument("--fail-open", action="store_true", help="serve unmetered while policyd is down")
    gateway.add_argument("--shape", choices=SHAPES, default=SHAPES[0],
                         help="ext_authz+ext_proc (default) or ext_proc alone (one stream per request)")
    gateway.add_argument("--route-timeout", type=int, default=ROUTE_TIMEOUT_SECONDS,
                         help="seconds the gateway waits for a reply and its next bytes (policyd's "
                              "POLICYD_RESERVATION_TTL_SECONDS must be longer)")
    gateway.add_argument("--cors-origin", action="append",
                         help="a web origin (https://app.example, or * for any) whose pages may call the gateway "
                              "from a browser, repeatable; none by default")
    gateway.add_argument("--upstream-idle-timeout", type=int, default=UPSTREAM_IDLE_TIMEOUT_SECONDS, metavar="SECONDS",
                         help="seconds a connection to a provider stays open unused: below the provider's own "
                              f"keep-alive timeout (default {UPSTREAM_IDLE_TIMEOUT_SECONDS}: uvicorn and Node.js "
                              "close theirs after 5)")
    gateway.add_argument("--trusted-proxies", type=int, default=0, metavar="N",
                         help="the operator's own proxies before the gateway (a load balancer: 1): the client's "
                              "address is the one the first of them saw; by default the connection's")
    gateway.add_argument("--access-log", metavar="PATH",
                         help="a file where Envoy writes a JSON line a request (its status and why: response flags "
                              "and code details; no secret); none by default")
    gateway.set_defaults(run=_gateway_config)

    demo = client(commands.add_parser("demo", help="drive a running gateway with the openai SDK"))
    demo.add_argument("--base-url", default="http://127.0.0.1:10000/v1")
    demo.add_argument("--key-a", required=True, help="a key of customer alice (plan pro)")
    demo.add_argument("--key-b", required=True, help="a key of customer bob (plan free)")
    demo.set_defaults(run=_demo)

    commands.add_parser("config-reference", help="print the configuration reference (Markdown)").set_defaults(
        run=_print_settings_reference)

    caps = client(commands.add_parser("caps", help="the operator's caps: what each holds this window"))
    caps_commands = caps.add_subparsers(dest="caps_command")
    cap_reset = client(caps_commands.add_parser(
        "reset", help="forgive what a cap counted of its settled requests this window (requests in flight keep "
                      "their holds; no money moves)"))
    cap_reset.add_argument("name", help="the cap, by its name in the policy")
    cap_reset.add_argument("--reason", default="", help="kept with the reset")
    caps.set_defaults(run=_caps)
    events = client(commands.add_parser(
        "events", help="what happened beside the usage: admin actions (who did what), alerts, refused settles..."))
    events.add_argument("--kind", default="", help="admin_action, alert, rejected, key_state, reconciliation")
    events.add_argument("--customer", default="")
    events.add_argument("--since", help="start (ISO date or time, UTC)")
    events.add_argument("--until", help="end (ISO date or time, UTC; default now)")
    events.add_argument("--last", default="7d", help="window length when --since is not given: 24h, 7d, 30d ...")
    events.add_argument("--limit", type=int, default=50)
    events.set_defaults(run=_events)
    client(commands.add_parser("audit", help="check Redis counters against the SQL ledger")).set_defaults(run=_audit)
    client(commands.add_parser("rebuild", help="rewrite every counter from SQL")).set_defaults(run=_rebuild)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except grpc.RpcError as error:
        code = error.code()
        reason = dict(error.trailing_metadata() or ()).get("policyd-reason", code.name.lower() if code else "error")
        if getattr(args, "json", False):
            print(json.dumps({"error": {"code": code.name if code else "", "reason": reason, "message": error.details()}}))
        else:
            print(f"error ({reason}): {error.details()}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # a file named that cannot be read (a policy, an export, a TLS key): a line, no traceback
        said = f"{error.filename}: {error.strerror}" if error.filename else str(error)
        print(f"policyd: {said}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

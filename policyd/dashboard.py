"""The web dashboard: spend, keys, budgets, incidents and reconciliation for the people who pay the bill.

Served by policyd itself (`POLICYD_DASHBOARD_LISTEN`), as server-rendered HTML with inline SVG
charts and one stylesheet shipped in the package: no script, no CDN, works offline and on a phone.

Access is protected like the AdminService:
- no admin token configured (loopback development): read-only for everyone, no login;
- otherwise a login (or `Authorization: Bearer`) with the admin token gives admin rights (pause and
  resume keys, each confirmed and recorded as an admin action), and with `POLICYD_DASHBOARD_VIEWER_TOKEN`
  read-only rights. Sessions are random ids in an HttpOnly, SameSite=Strict cookie; every form carries
  a CSRF token bound to the session; pages are sent with a strict Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from importlib import resources
from typing import Any, Awaitable, Callable, MutableMapping
from urllib.parse import parse_qs, quote, unquote

from policyd import charts
from policyd.admin import Admin
from policyd.dashboard_data import (
    INCIDENT_DIMENSIONS,
    OVERVIEW_DIMENSIONS,
    TOP_DIMENSIONS,
    DashboardData,
)
from policyd.domain import PolicydError
from policyd.money import MONEY_UNITS, NANOS_PER_UNIT

log = logging.getLogger("policyd.dashboard")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SESSION_COOKIE = "policyd_session"
SESSION_SECONDS = 8 * 3600
SESSIONS_MAX = 10_000
FORM_BYTES_MAX = 16 * 1024
WINDOW_DAYS = (1, 7, 30, 90)
INCIDENT_HOURS = (1, 6, 24, 168)
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


def amount(nanos: int, currency: str = "") -> str:
    """Exact: 1234500000 -> '1.2345' (at least two decimals, never rounded)."""
    sign = "-" if nanos < 0 else ""
    units, rest = divmod(abs(nanos), NANOS_PER_UNIT)
    decimals = f"{rest:09d}".rstrip("0")
    text = f"{sign}{units:,}.{decimals.ljust(2, '0')}"
    return f"{text} {currency}".strip()


def _money(nanos: int, currency: str) -> str:
    return f'<span class="money" data-nanos="{nanos}">{escape(amount(nanos, currency))}</span>'


def _count(value: int) -> str:
    return f'<span data-value="{value}">{value:,}</span>'


def _when(ms: int) -> str:
    if not ms:
        return "never"
    return datetime.fromtimestamp(ms // 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class Viewer:
    role: str  # viewer | admin
    session: str = ""  # "" when no login is needed

    @property
    def admin(self) -> bool:
        return self.role == "admin"


class Sessions:
    def __init__(self) -> None:
        self._sessions: dict[str, tuple[str, float]] = {}
        self._key = secrets.token_bytes(32)

    def create(self, role: str) -> str:
        if len(self._sessions) >= SESSIONS_MAX:
            self._expire()
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = (role, time.monotonic() + SESSION_SECONDS)
        return sid

    def role(self, sid: str) -> str | None:
        entry = self._sessions.get(sid)
        if entry is None or entry[1] < time.monotonic():
            self._sessions.pop(sid, None)
            return None
        return entry[0]

    def drop(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def csrf(self, sid: str) -> str:
        return hmac.new(self._key, sid.encode(), hashlib.sha256).hexdigest()

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, (_, until) in self._sessions.items() if until < now]:
            del self._sessions[sid]
        while len(self._sessions) >= SESSIONS_MAX:
            self._sessions.pop(next(iter(self._sessions)))


class Response:
    def __init__(self, status: int, body: str | bytes, content_type: str = "text/html; charset=utf-8",
                 headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = [("content-type", content_type), *(headers or [])]


def redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(303, b"", headers=[("location", location), *(headers or [])])


class Dashboard:
    """The ASGI app."""

    def __init__(self, admin: Admin, admin_token: str, viewer_token: str = "") -> None:
        self.admin = admin
        self.data = DashboardData(admin)
        self.admin_token = admin_token
        self.viewer_token = viewer_token
        self.sessions = Sessions()
        self.stylesheet = resources.files("policyd").joinpath("dashboard_assets/dashboard.css").read_bytes()

    # ------------------------------------------------------------------ HTTP plumbing
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        try:
            response = await self._route(scope, receive)
        except PolicydError as error:
            status = {"NOT_FOUND": 404, "FAILED_PRECONDITION": 409, "INVALID_ARGUMENT": 400}.get(error.status, 500)
            response = Response(status, self._page("Error", f"<p>{escape(error.message)}</p>", None))
        except Exception:
            log.exception("dashboard page failed")
            response = Response(500, self._page("Error", "<p>Something went wrong; see policyd's log.</p>", None))
        headers = [(k.encode(), v.encode()) for k, v in response.headers]
        headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store"),
                    (b"content-length", str(len(response.body)).encode())]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _route(self, scope: Scope, receive: Receive) -> Response:
        method, path = scope["method"], scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        if path == "/assets/dashboard.css":
            return Response(200, self.stylesheet, "text/css; charset=utf-8")
        if path == "/login":
            return await self._login(method, scope, receive)
        viewer = self._viewer(scope)
        if viewer is None:
            if path.startswith("/api/") or _header(scope, "authorization"):
                return Response(401, b'{"error":"unauthorized"}', "application/json")
            return redirect("/login")
        if path == "/logout" and method == "POST":
            form = await _form(receive)
            if viewer.session and hmac.compare_digest(form.get("csrf", ""), self.sessions.csrf(viewer.session)):
                self.sessions.drop(viewer.session)
            return redirect("/login", [("set-cookie", f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict")])
        parts = [unquote(p) for p in path.strip("/").split("/")] if path != "/" else []
        if method == "GET" and not parts:
            return Response(200, await self._overview(query, viewer))
        if method == "GET" and len(parts) == 2 and parts[0] == "customers":
            return Response(200, await self._customer(parts[1], viewer))
        if len(parts) >= 2 and parts[0] == "keys":
            if method == "GET" and len(parts) == 2:
                return Response(200, await self._key(parts[1], viewer))
            if len(parts) == 3 and parts[2] in ("pause", "resume"):
                return await self._key_action(parts[1], parts[2], method, receive, viewer, scope)
        if method == "GET" and parts == ["incidents"]:
            return Response(200, await self._incidents(query, viewer))
        if method == "GET" and parts == ["reconciliation"]:
            return Response(200, await self._reconciliation(viewer))
        return Response(404, self._page("Not found", "<p>No such page.</p>", viewer))

    def _viewer(self, scope: Scope) -> Viewer | None:
        if not self.admin_token:
            return Viewer("viewer")  # no credentials configured: read-only, loopback use
        authorization = _header(scope, "authorization")
        if authorization.lower().startswith("bearer "):
            role = self._role_of(authorization[7:].strip())
            return Viewer(role) if role else None
        sid = _cookies(scope).get(SESSION_COOKIE, "")
        role = self.sessions.role(sid) if sid else None
        return Viewer(role, sid) if role else None

    def _role_of(self, token: str) -> str | None:
        if self.admin_token and hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return "admin"
        if self.viewer_token and hmac.compare_digest(token.encode(), self.viewer_token.encode()):
            return "viewer"
        return None

    async def _login(self, method: str, scope: Scope, receive: Receive) -> Response:
        if not self.admin_token:
            return redirect("/")
        problem = ""
        if method == "POST":
            form = await _form(receive)
            role = self._role_of(form.get("token", ""))
            if role:
                sid = self.sessions.create(role)
                return redirect("/", [("set-cookie", f"{SESSION_COOKIE}={sid}; Path=/; Max-Age={SESSION_SECONDS}; "
                                                     "HttpOnly; SameSite=Strict")])
            log.warning("dashboard login refused from %s", (scope.get("client") or ("?",))[0])
            problem = '<p class="notice">That token is not valid.</p>'
        body = f"""{problem}<section class="card"><form method="post" action="/login">
<label>Admin or viewer token <input type="password" name="token" autocomplete="current-password" required></label>
<p><button type="submit">Sign in</button></p></form></section>"""
        return Response(401 if problem else 200, self._page("Sign in", body, None))

    # ------------------------------------------------------------------ pages
    def _currency(self) -> str:
        policy = self.admin.book.current
        return policy.document.currency if policy else ""

    def _page(self, title: str, body: str, viewer: Viewer | None, here: str = "") -> str:
        links = [("/", "Overview"), ("/incidents", "Incidents"), ("/reconciliation", "Reconciliation")]
        nav = "".join(f'<a href="{href}" class="{"here" if href == here else ""}">{name}</a>' for href, name in links)
        who = ""
        if viewer is not None:
            who = f'<span class="who">{"admin" if viewer.admin else "read-only"}'
            if viewer.session:
                who += (f' · <form method="post" action="/logout" class="inline"><input type="hidden" name="csrf" '
                        f'value="{self.sessions.csrf(viewer.session)}"><button type="submit">Sign out</button></form>')
            who += "</span>"
        return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)} · policyd</title>
<link rel="stylesheet" href="/assets/dashboard.css"></head><body>
<header><span class="brand">policyd</span>{nav if viewer else ""}{who}</header>
<main><h1>{escape(title)}</h1>{body}</main></body></html>"""

    async def _overview(self, query: dict[str, str], viewer: Viewer) -> str:
        days = _choice(query.get("days"), WINDOW_DAYS, 7)
        by = query.get("by") if query.get("by") in OVERVIEW_DIMENSIONS else "customer"
        metric = query.get("metric") if query.get("metric") in ("charge", "cost") else "charge"
        view = await self.data.overview(days, by, metric)
        currency = self._currency()
        figure = f"{metric}_nanos"
        t = view.totals
        filters = f"""<form class="filters" method="get" action="/">
{_select("days", "Window", [(str(d), f"last {d} day{'s' if d > 1 else ''}") for d in WINDOW_DAYS], str(days))}
{_select("by", "Stacked by", [(d, d) for d in OVERVIEW_DIMENSIONS], by)}
{_select("metric", "Amount", [("charge", "charge (what customers pay)"), ("cost", "cost (what providers bill)")], metric)}
<button type="submit">Show</button></form>"""
        figures = f"""<div class="figures">
<div class="figure" id="total-charge"><div class="name">Charged</div><div class="value">{_money(t["charge_nanos"], currency)}</div></div>
<div class="figure" id="total-cost"><div class="name">Provider cost</div><div class="value">{_money(t["cost_nanos"], currency)}</div></div>
<div class="figure" id="total-requests"><div class="name">Requests</div><div class="value">{_count(t["requests"])}</div></div>
<div class="figure" id="total-denied"><div class="name">Denied</div><div class="value">{_count(t["denied"])}</div></div>
<div class="figure" id="total-downgraded"><div class="name">Downgraded</div><div class="value">{_count(t["downgraded"])}</div></div>
</div>"""
        spend = charts.stacked_bars(view.buckets, view.series, lambda v: amount(v, currency), f"{metric} over time")
        tops = "".join(self._top_table(d, view.tops[d], figure, currency) for d in TOP_DIMENSIONS)
        denials = charts.stacked_bars(view.buckets, view.denial_series, lambda v: f"{v:,} requests",
                                      "denied and downgraded requests")
        reasons = "".join(f'<tr><td>{escape(r)}</td><td class="num">{_count(d)}</td><td class="num">{_count(g)}</td></tr>'
                          for r, d, g in view.denial_reasons)
        caps = "".join(_bucket_row({"label": cap.name, "owner": " ".join(filter(None, (cap.provider, ", ".join(cap.models))))
                                    or "every request", "window": cap.window, "used": used, "limit": cap.limit,
                                    "unit": cap.unit, "thresholds": list(cap.thresholds), "action": cap.action},
                                   currency) for cap, used, _ in await self.admin.caps())
        caps_card = f"""<section class="card"><h2>Caps, across every customer</h2><table id="caps"><thead><tr>
<th>cap</th><th>on</th><th>window</th><th class="num">used</th><th class="num">limit</th><th>use</th><th>on limit</th></tr></thead>
<tbody>{caps}</tbody></table></section>""" if caps else ""
        body = f"""{filters}{figures}{caps_card}
<section class="card"><h2>{escape(metric.capitalize())} over time, by {escape(by)}</h2>{spend}</section>
<div class="grid">{tops}</div>
<section class="card"><h2>Denied and downgraded requests</h2>{denials}
<table id="denial-reasons"><thead><tr><th>reason</th><th class="num">denied</th><th class="num">downgraded</th></tr></thead>
<tbody>{reasons or '<tr><td colspan="3" class="empty">none</td></tr>'}</tbody></table></section>"""
        return self._page("Spend overview", body, viewer, "/")

    def _top_table(self, dimension: str, rows: list[Any], figure: str, currency: str) -> str:
        def link(value: str) -> str:
            if dimension == "customer" and value:
                return f'<a href="/customers/{quote(value, safe="")}">{escape(value)}</a>'
            if dimension == "key" and value:
                return f'<a href="/keys/{quote(value, safe="")}">{escape(value)}</a>'
            return escape(value or "(none)")

        body = "".join(f'<tr><td>{link(r.group[dimension])}</td><td class="num">{_money(r.figures[figure], currency)}</td>'
                       f'<td class="num">{_count(r.figures["requests"])}</td></tr>' for r in rows)
        title = f"Top {dimension}s" + (" (last 24 hours at most)" if dimension == "thread" else "")
        return f"""<section class="card" id="top-{dimension}"><h2>{title}</h2><table>
<thead><tr><th>{dimension}</th><th class="num">{figure.split("_")[0]}</th><th class="num">requests</th></tr></thead>
<tbody>{body or '<tr><td colspan="3" class="empty">none</td></tr>'}</tbody></table></section>"""

    async def _customer(self, customer_id: str, viewer: Viewer) -> str:
        view = await self.data.customer(customer_id)
        currency = self._currency()
        figures = f"""<div class="figures">
<div class="figure" id="wallet-balance"><div class="name">Balance</div><div class="value">{_money(view.balance_nanos, currency)}</div></div>
<div class="figure" id="wallet-reserved"><div class="name">Reserved now</div><div class="value">{_money(view.reserved_nanos, currency)}</div></div>
<div class="figure" id="wallet-available"><div class="name">Available</div><div class="value">{_money(view.balance_nanos - view.reserved_nanos, currency)}</div></div>
</div>"""
        history = charts.line(view.history, lambda v: amount(v, currency), "balance at the end of each day")
        daily = "".join(f'<tr><td>{escape(d)}</td><td class="num">{_money(g, currency)}</td><td class="num">{_money(c, currency)}</td></tr>'
                        for d, g, c in reversed(view.daily))
        grants = "".join(
            f'<tr><td>{_when(e.created_ms)}</td><td>{escape(e.kind)}</td><td>{escape(e.source)}</td>'
            f'<td class="num">{_money(e.amount_nanos, e.currency)}</td><td>{_when(e.expires_ms) if e.expires_ms else "never"}</td>'
            f'<td>{escape(e.note)}</td></tr>' for e in view.grants)
        buckets = "".join(_bucket_row(b, currency) for b in view.buckets)
        keys = "".join(
            f'<tr><td><a href="/keys/{quote(k.id, safe="")}">{escape(k.id)}</a></td><td>{escape(k.label)}</td>'
            f'<td class="state-{escape(k.status)}">{escape(k.status)}</td><td>{escape(k.environment)}</td>'
            f'<td>{escape(k.plan)}</td><td>{escape(k.prefix)}…</td></tr>' for k in view.keys)
        records = "".join(_record_row(r) for r in view.records)
        body = f"""{figures}
<section class="card"><h2>Balance history (last 30 days)</h2>{history}
<table id="daily"><thead><tr><th>day</th><th class="num">credit added</th><th class="num">charged and expired</th></tr></thead>
<tbody>{daily or '<tr><td colspan="3" class="empty">no movement</td></tr>'}</tbody></table></section>
<section class="card"><h2>Credit grants</h2><table id="grants"><thead><tr><th>when</th><th>kind</th><th>source</th>
<th class="num">amount</th><th>expires</th><th>note</th></tr></thead>
<tbody>{grants or '<tr><td colspan="6" class="empty">none</td></tr>'}</tbody></table></section>
<section class="card"><h2>Budgets and quotas</h2><table id="buckets"><thead><tr><th>bucket</th><th>of</th><th>window</th>
<th class="num">used</th><th class="num">limit</th><th>use (marks: soft thresholds)</th><th>on limit</th></tr></thead>
<tbody>{buckets or '<tr><td colspan="7" class="empty">this plan sets no limits</td></tr>'}</tbody></table></section>
<section class="card"><h2>Keys</h2><table id="keys"><thead><tr><th>key</th><th>label</th><th>state</th><th>environment</th>
<th>plan</th><th>prefix</th></tr></thead><tbody>{keys or '<tr><td colspan="6" class="empty">no keys</td></tr>'}</tbody></table></section>
<section class="card"><h2>Latest usage</h2>{_records_table(records)}</section>"""
        return self._page(f"Customer {customer_id}", body, viewer)

    async def _key(self, key_id: str, viewer: Viewer) -> str:
        review = await self.admin.review_key(key_id)
        row = review["key"]
        currency = self._currency()
        actions = ""
        if viewer.admin and row.status in ("active", "paused"):
            verb = "pause" if row.status == "active" else "resume"
            actions = (f'<p><a id="key-{verb}" class="button{" danger" if verb == "pause" else ""}" '
                       f'href="/keys/{quote(row.id, safe="")}/{verb}">{verb.capitalize()} this key</a></p>')
        owner = " / ".join(escape(v) for v in (row.customer_id, row.workspace_id, row.project_id) if v)
        facts = [
            ("Owner", f'<a href="/customers/{quote(row.customer_id, safe="")}">{owner}</a>'),
            ("State", f'<span id="key-state" class="state-{escape(row.status)}">{escape(row.status)}</span>'),
            ("Label", escape(row.label)), ("Environment", escape(row.environment)), ("Plan", escape(row.plan)),
            ("Prefix", f"{escape(row.prefix)}…"), ("Created", _when(row.created_ms)),
            ("Rotated", _when(row.rotated_ms)), ("State changed", _when(row.status_changed_ms)),
            ("Last used", _when(review["last_used_ms"])),
            ("Spend today", _money(review["spend_today"], currency)),
            ("Spend this month", _money(review["spend_month"], currency)),
            ("Requests", _count(review["requests"])), ("Denials", _count(review["denials"])),
            ("Errors (released or expired)", _count(review["errors"])),
        ]
        table = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in facts)
        routes = "".join(f"<li>{escape(m)}</li>" for m in review["models"]) or '<li class="empty">none</li>'
        buckets = "".join(_bucket_row({**b, "owner": row.id if b["scope"] == "key" else b["scope"]}, currency)
                          for b in review["buckets"])
        denials = "".join(f'<tr><td>{escape(r)}</td><td class="num">{_count(n)}</td></tr>'
                          for r, n in sorted(review["denials_by_reason"].items()))
        body = f"""{actions}<div class="grid"><section class="card"><h2>Review</h2><table id="review">{table}</table></section>
<section class="card"><h2>Allowed routes</h2><ul id="routes">{routes}</ul>
<h2>Denials by reason</h2><table><tbody>{denials or '<tr><td class="empty">none</td></tr>'}</tbody></table></section></div>
<section class="card"><h2>Quota state</h2><table id="buckets"><thead><tr><th>bucket</th><th>of</th><th>window</th>
<th class="num">used</th><th class="num">limit</th><th>use</th><th>on limit</th></tr></thead>
<tbody>{buckets or '<tr><td colspan="7" class="empty">this plan sets no limits</td></tr>'}</tbody></table></section>"""
        return self._page(f"Key {row.id}", body, viewer)

    async def _key_action(self, key_id: str, verb: str, method: str, receive: Receive, viewer: Viewer,
                          scope: Scope) -> Response:
        if not viewer.admin:
            return Response(403, self._page("Not allowed", "<p>Pausing and resuming keys needs admin rights.</p>", viewer))
        row = await self.admin.get_key(key_id)
        if method == "GET":
            csrf = self.sessions.csrf(viewer.session) if viewer.session else ""
            body = f"""<section class="card"><p>{verb.capitalize()} key <strong>{escape(row.id)}</strong>
({escape(row.label or row.prefix)}) of customer <strong>{escape(row.customer_id)}</strong>?
{"Requests with it are refused on every replica from the next one on; the customer's other keys keep working." if verb == "pause" else "Requests with it are allowed again."}</p>
<form method="post" action="/keys/{quote(row.id, safe="")}/{verb}"><input type="hidden" name="csrf" value="{csrf}">
<button id="confirm" type="submit" class="{"danger" if verb == "pause" else ""}">Yes, {verb} it</button>
<a href="/keys/{quote(row.id, safe="")}">Cancel</a></form></section>"""
            return Response(200, self._page(f"{verb.capitalize()} key {row.id}?", body, viewer))
        if method != "POST":
            return Response(405, b"", headers=[("allow", "GET, POST")])
        form = await _form(receive)
        if viewer.session and not hmac.compare_digest(form.get("csrf", ""), self.sessions.csrf(viewer.session)):
            return Response(403, self._page("Not allowed", "<p>The form expired; open the page again.</p>", viewer))
        await self.admin.set_state(key_id, "paused" if verb == "pause" else "active")
        client = (scope.get("client") or ("",))[0]
        await self.admin.record_action(f"key_{verb}", "operator", customer_id=row.customer_id, key_id=key_id,
                                       via="dashboard", client_address=str(client))
        log.info("dashboard: key %s %sd", key_id, verb)
        return redirect(f"/keys/{quote(key_id, safe='')}")

    async def _incidents(self, query: dict[str, str], viewer: Viewer) -> str:
        hours = _choice(query.get("hours"), INCIDENT_HOURS, 24)
        view = await self.data.incidents(hours)
        currency = self._currency()
        filters = f"""<form class="filters" method="get" action="/incidents">
{_select("hours", "Window", [(str(h), f"last {h} hour{'s' if h > 1 else ''}") for h in INCIDENT_HOURS], str(hours))}
<button type="submit">Compare with the window before</button></form>"""
        sections = []
        for d in INCIDENT_DIMENSIONS:
            rows = "".join(_mover_row(d, r, currency) for r in view.movers[d])
            sections.append(f"""<section class="card" id="movers-{d}"><h2>{d.capitalize()}s that moved</h2><table>
<thead><tr><th>{d}</th><th class="num">charge now</th><th class="num">before</th><th class="num">change</th>
<th class="num">tokens now</th><th class="num">before</th><th class="num">requests</th></tr></thead>
<tbody>{rows or '<tr><td colspan="7" class="empty">nothing moved</td></tr>'}</tbody></table></section>""")
        threads = "".join(f'<tr><td>{escape(r.group["thread"])}</td><td class="num">{_count(r.figures["requests"])}</td>'
                          f'<td class="num">{_money(r.figures["charge_nanos"], currency)}</td></tr>'
                          for r in view.busiest_threads)
        anomalies = "".join(
            f'<tr class="anomaly-{escape(str(a.detail.get("anomaly")))}"><td>{_when(a.created_ms)}</td>'
            f'<td>{escape(str(a.detail.get("anomaly")))}</td>'
            f'<td>{escape(str(a.detail.get("thread_id") or a.detail.get("api_key_id") or ""))}</td>'
            f'<td>{escape(str(a.detail.get("customer_id", "")))}</td>'
            f'<td class="num">{escape(str(a.detail.get("requests", "")))}</td></tr>' for a in view.anomalies)
        body = f"""{filters}<div class="grid">{"".join(sections)}</div>
<section class="card" id="threads"><h2>Busiest threads (loops stand out here)</h2><table><thead><tr><th>thread</th>
<th class="num">requests</th><th class="num">charge</th></tr></thead>
<tbody>{threads or '<tr><td colspan="3" class="empty">no threads</td></tr>'}</tbody></table></section>
<section class="card" id="anomalies"><h2>Detected anomalies</h2><table><thead><tr><th>when</th><th>kind</th>
<th>subject</th><th>customer</th><th class="num">requests</th></tr></thead>
<tbody>{anomalies or '<tr><td colspan="5" class="empty">none</td></tr>'}</tbody></table></section>"""
        return self._page("Incidents: what moved", body, viewer, "/incidents")

    async def _reconciliation(self, viewer: Viewer) -> str:
        run = await self.data.reconciliation()
        if run is None:
            body = '<p class="empty">No reconciliation has run yet (<code>policyd reconcile</code>).</p>'
            return self._page("Reconciliation", body, viewer, "/reconciliation")
        d = run.detail
        currency = self._currency()
        totals = d.get("totals", {})
        summary = "".join(f'<div class="figure" id="recon-{escape(k)}"><div class="name">{escape(k.replace("_", " "))}</div>'
                          f'<div class="value">{_count(int(v))}</div></div>' for k, v in sorted(totals.items()))
        lines = "".join(
            f'<tr class="status-{escape(c["status"])}"><td>{escape(c["day"])}</td><td>{escape(c["model"])}</td>'
            f'<td>{escape(c.get("account", ""))}</td><td>{escape(c["status"])}</td>'
            f'<td class="num">{_money(int(c["provider_nanos"]), currency)}</td>'
            f'<td class="num">{_money(int(c["ledger_nanos"]), currency)}</td>'
            f'<td class="num">{_money(int(c["provider_nanos"]) - int(c["ledger_nanos"]), currency)}</td></tr>'
            for c in d.get("lines", []))
        body = f"""<p>Provider <strong>{escape(str(d.get("provider")))}</strong>, compared by {escape(str(d.get("basis")))},
{_when(run.created_ms)}: <strong id="recon-result">{"all matched" if d.get("ok") else "differences found"}</strong>.</p>
<div class="figures">{summary}</div>
<section class="card"><table id="recon-lines"><thead><tr><th>day</th><th>model</th><th>provider key</th><th>status</th>
<th class="num">provider</th><th class="num">ledger</th><th class="num">difference</th></tr></thead>
<tbody>{lines}</tbody></table></section>"""
        return self._page("Reconciliation", body, viewer, "/reconciliation")


# ---------------------------------------------------------------------- helpers
def _header(scope: Scope, name: str) -> str:
    for key, value in scope.get("headers", []):
        if key.decode("latin-1").lower() == name:
            return value.decode("latin-1")
    return ""


def _cookies(scope: Scope) -> dict[str, str]:
    out = {}
    for part in _header(scope, "cookie").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


async def _form(receive: Receive) -> dict[str, str]:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > FORM_BYTES_MAX:
            return {}
        if not message.get("more_body"):
            break
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


def _choice(value: str | None, allowed: tuple[int, ...], default: int) -> int:
    return int(value) if value and value.isdigit() and int(value) in allowed else default


def _select(name: str, label: str, options: list[tuple[str, str]], chosen: str) -> str:
    items = "".join(f'<option value="{escape(v)}"{" selected" if v == chosen else ""}>{escape(t)}</option>'
                    for v, t in options)
    return f'<label>{escape(label)}<select name="{name}">{items}</select></label>'


def _meter(used: int, limit: int, thresholds: list[int]) -> str:
    width = 160
    fill = min(used * width // limit, width) if limit > 0 else (width if used else 0)
    over = limit > 0 and used >= limit
    marks = "".join(f'<rect x="{t * width // 100 - 1}" y="0" width="2" height="12" fill="#0f172a">'
                    f'<title>soft threshold {t}%</title></rect>' for t in thresholds)
    return (f'<svg class="meter-svg" width="{width}" height="12" viewBox="0 0 {width} 12" role="img" '
            f'aria-label="{used} of {limit}"><rect width="{width}" height="12" rx="5" fill="#e2e8f0"/>'
            f'<rect width="{fill}" height="12" rx="5" fill="{"#dc2626" if over else "#2563eb"}"/>{marks}</svg>')


def _bucket_row(b: dict[str, Any], currency: str) -> str:
    if b["unit"] in MONEY_UNITS:
        used, limit = _money(b["used"], currency), _money(b["limit"], currency)
    else:
        used, limit = f'{_count(b["used"])} {escape(b["unit"])}', f'{_count(b["limit"])} {escape(b["unit"])}'
    return (f'<tr><td>{escape(b["label"])}</td><td>{escape(str(b.get("owner", "")))}</td><td>{escape(b["window"])}</td>'
            f'<td class="num">{used}</td><td class="num">{limit}</td>'
            f'<td>{_meter(b["used"], b["limit"], b.get("thresholds", []))}</td><td>{escape(b.get("action", ""))}</td></tr>')


def _record_row(r: Any) -> str:
    return (f'<tr data-request-id="{escape(r.request_id)}"><td>{_when(r.created_ms)}</td><td>{escape(r.request_id)}</td>'
            f'<td>{escape(r.api_key_id)}</td><td>{escape(r.feature)}</td><td>{escape(r.thread_id)}</td>'
            f'<td>{escape(r.served_model)}</td><td>{escape(r.status)}</td><td>{escape(r.reason)}</td>'
            f'<td class="num">{_count(r.input_tokens)}</td><td class="num">{_count(r.output_tokens)}</td>'
            f'<td class="num">{_money(r.cost_nanos, r.currency)}</td><td class="num">{_money(r.charge_nanos, r.currency)}</td>'
            f'<td class="num">{_money(r.balance_before_nanos, r.currency) if r.balance_before_nanos is not None else ""}</td>'
            f'<td class="num">{_money(r.balance_after_nanos, r.currency) if r.balance_after_nanos is not None else ""}</td></tr>')


def _records_table(rows: str) -> str:
    return f"""<table id="records"><thead><tr><th>when</th><th>request</th><th>key</th><th>feature</th><th>thread</th>
<th>model</th><th>status</th><th>reason</th><th class="num">input</th><th class="num">output</th><th class="num">cost</th>
<th class="num">charge</th><th class="num">balance before</th><th class="num">after</th></tr></thead>
<tbody>{rows or '<tr><td colspan="14" class="empty">no usage yet</td></tr>'}</tbody></table>"""


def _mover_row(dimension: str, r: Any, currency: str) -> str:
    now, before = r.figures["charge_nanos"], r.previous.get("charge_nanos", 0)
    tokens = r.figures["input_tokens"] + r.figures["output_tokens"]
    tokens_before = r.previous.get("input_tokens", 0) + r.previous.get("output_tokens", 0)
    value = r.group[dimension]
    if dimension == "key":
        value_html = f'<a href="/keys/{quote(value, safe="")}">{escape(value)}</a>'
    else:
        value_html = escape(value)
    return (f'<tr><td>{value_html}</td><td class="num">{_money(now, currency)}</td><td class="num">{_money(before, currency)}</td>'
            f'<td class="num {"up" if now > before else "down"}">{_money(now - before, currency)}</td>'
            f'<td class="num">{_count(tokens)}</td><td class="num">{_count(tokens_before)}</td>'
            f'<td class="num">{_count(r.figures["requests"])}</td></tr>')


class _Server:
    """uvicorn in policyd's own event loop, leaving signals to policyd."""

    def __init__(self, app: Dashboard, listen: str) -> None:
        import uvicorn

        host, _, port = listen.rpartition(":")

        class Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # type: ignore[no-untyped-def]
                yield

            def install_signal_handlers(self) -> None:
                pass

        config = uvicorn.Config(app, host=host or "127.0.0.1", port=int(port), log_level="warning", access_log=False,
                                lifespan="off")
        try:  # bound here, so an address taken is a clear error (uvicorn's own bind exits the process)
            self.socket = config.bind_socket()
        except SystemExit:
            raise SystemExit(f"cannot serve the dashboard on {listen}: the address is taken, or not one of this "
                             "machine's") from None
        self.server = Quiet(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises the reason it could not start
                raise SystemExit("the dashboard could not start")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait_for(self.task, timeout=10)


async def serve_dashboard(admin: Admin, listen: str, admin_token: str, viewer_token: str) -> _Server | None:
    if not listen:
        return None
    server = _Server(Dashboard(admin, admin_token, viewer_token), listen)
    await server.start()
    log.info("dashboard on http://%s/ (%s)", listen, "login required" if admin_token else "read-only, no login")
    return server

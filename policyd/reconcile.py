"""Provider invoice reconciliation: a provider's cost export against policyd's ledger.

Both sides are summed per UTC day x model (the provider's dated model names, e.g.
gpt-4o-2024-08-06, map to the price table's longest matching name; the images a Responses API
image_generation tool made count under their image model, as the provider bills them) and compared:
matched (equal to the nano), within_tolerance, mismatched, missing_in_ledger (the provider billed
what policyd never saw) or missing_in_export (policyd recorded cost the provider did not bill).

Formats read:
- OpenAI organization costs API JSON (pages of buckets, results with amount.value/currency,
  line_item "model, input|output|cached input", project_id);
- OpenAI organization usage API JSON (completions results: input/output/cached tokens per model);
  compared on tokens, since it carries no amounts;
- Anthropic's cost report JSON (`/v1/organizations/cost_report`: buckets with starting_at, results with
  amount, a decimal string in cents, its currency and, grouped by description, its model); lines it gives
  no model (web search, code execution, a report not grouped by description) make their day compared
  whole, every model of it together, as the ledger holds a request's searches in its model's cost;
- a generic CSV with a header: date, model, [key|project], [input_tokens, output_tokens | tokens],
  amount, [currency].
Provider amounts are read from their text as decimals (never floats) and rounded to the nano by
the project's one rule. The ledger side is the provider cost policyd recorded for every settled
request, whatever the customer was charged (promotional, free, at-cost and downgraded requests
included) and for every upstream attempt Envoy made (per-request prices x attempts), so what was
paid to the provider but not charged to the customer is reconciled too. When the export names
API keys that the provider accounts file maps (`provider_key_id`), lines compare per key as well.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from policyd.db import UsageRecordRow
from policyd.money import MoneyError, parse_external_amount
from policyd.reports import ReportError, require_kept

FILE_BYTES_MAX = 50 * 1024 * 1024
LINES_MAX = 1_000_000
DAY_MS = 86_400_000


class ReconcileError(ValueError):
    pass


@dataclass
class Line:
    day: str
    model: str
    amount_nanos: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    key: str = ""  # the provider's id of the API key, when the export is broken down by key


@dataclass
class Comparison:
    day: str
    model: str
    status: str
    provider_nanos: int
    ledger_nanos: int
    provider_tokens: int = 0
    ledger_tokens: int = 0
    account: str = ""  # the provider account (key), when both sides are broken down by key

    @property
    def difference_nanos(self) -> int:
        return self.provider_nanos - self.ledger_nanos


@dataclass
class Result:
    basis: str  # amount | tokens
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status in ("matched", "within_tolerance") for c in self.comparisons)

    def totals(self) -> dict[str, int]:
        out = {"provider_nanos": sum(c.provider_nanos for c in self.comparisons),
               "ledger_nanos": sum(c.ledger_nanos for c in self.comparisons)}
        for c in self.comparisons:
            out[c.status] = out.get(c.status, 0) + 1
        return out


def _day(seconds: int | float | Decimal) -> str:
    return datetime.fromtimestamp(int(seconds), tz=timezone.utc).strftime("%Y-%m-%d")


def _model_of(line_item: str) -> str:
    return line_item.split(",", 1)[0].strip()


def parse(content: bytes, currency: str) -> tuple[str, list[Line]]:
    """(basis, lines) from an export; raises ReconcileError for the wrong shape or currency, or duplicates."""
    if len(content) > FILE_BYTES_MAX:
        raise ReconcileError(f"the export is larger than {FILE_BYTES_MAX} bytes")
    text = content.decode("utf-8-sig", errors="strict") if content else ""
    stripped = text.lstrip()
    if stripped.startswith("{") or stripped.startswith("["):
        try:
            data = json.loads(text, parse_float=Decimal)
        except ValueError as error:
            raise ReconcileError(f"the export is not valid JSON: {error}") from None
        if _anthropic_report(data):
            return "amount", _anthropic(data, currency)
        return _openai(data, currency)
    return "amount", _csv(text, currency)


def _anthropic_report(data: Any) -> bool:
    pages = data.get("data") if isinstance(data, dict) else None
    return isinstance(pages, list) and bool(pages) and isinstance(pages[0], dict) and "starting_at" in pages[0]


CENTS = Decimal(100)


def _anthropic(data: dict[str, Any], currency: str) -> list[Line]:
    """Anthropic's cost report: an amount in cents a line, per day (its bucket's UTC start) x model."""
    lines: list[Line] = []
    seen: set[tuple[Any, ...]] = set()
    for bucket in data["data"]:
        if not isinstance(bucket, dict) or not isinstance(bucket.get("results"), list) \
                or not isinstance(bucket.get("starting_at"), str):
            raise ReconcileError("each bucket needs starting_at and a results list")
        try:
            day = datetime.strptime(bucket["starting_at"][:10], "%Y-%m-%d").strftime("%Y-%m-%d")
        except ValueError:
            raise ReconcileError(f"a bucket's starting_at is not a date: {bucket['starting_at']!r}") from None
        for result in bucket["results"]:
            if not isinstance(result, dict) or not isinstance(result.get("amount"), (str, int, Decimal)):
                raise ReconcileError("each result needs an amount (a decimal string in cents)")
            if str(result.get("currency") or currency).upper() != currency.upper():
                raise ReconcileError(f"the export is in {result.get('currency')}, the ledger in {currency}")
            identity = (day, *(result.get(name) for name in ("model", "description", "cost_type", "token_type",
                                                             "workspace_id", "service_tier", "context_window",
                                                             "inference_geo")))
            if identity in seen:
                raise ReconcileError(f"duplicated line: {day} {result.get('description') or result.get('model')}")
            seen.add(identity)
            try:
                nanos = parse_external_amount(Decimal(str(result["amount"])) / CENTS)
            except (MoneyError, ArithmeticError, ValueError) as error:
                raise ReconcileError(f"{day}: not an amount: {result['amount']!r} ({error})") from None
            lines.append(Line(day, str(result.get("model") or ""), amount_nanos=nanos))
            if len(lines) > LINES_MAX:
                raise ReconcileError(f"more than {LINES_MAX} lines")
    return lines


def _openai(data: Any, currency: str) -> tuple[str, list[Line]]:
    pages = data.get("data") if isinstance(data, dict) else None
    if not isinstance(pages, list):
        raise ReconcileError("an OpenAI export is an object with a data list of buckets")
    lines: list[Line] = []
    basis = ""
    seen: set[tuple[Any, ...]] = set()
    for bucket in pages:
        if not isinstance(bucket, dict) or not isinstance(bucket.get("results"), list) \
                or not isinstance(bucket.get("start_time"), (int, Decimal)):
            raise ReconcileError("each bucket needs start_time and a results list")
        day = _day(bucket["start_time"])
        for result in bucket["results"]:
            if not isinstance(result, dict):
                raise ReconcileError("each result must be an object")
            kind = str(result.get("object", ""))
            if "costs" in kind or "amount" in result:
                amount = result.get("amount") or {}
                if not isinstance(amount, dict) or "value" not in amount:
                    raise ReconcileError("a costs result needs amount.value")
                if str(amount.get("currency", currency)).upper() != currency.upper():
                    raise ReconcileError(f"the export is in {amount.get('currency')}, the ledger in {currency}")
                line_item = str(result.get("line_item") or "")
                identity = (day, line_item, result.get("project_id"), result.get("api_key_id"))
                if identity in seen:
                    raise ReconcileError(f"duplicated line: {day} {line_item}")
                seen.add(identity)
                try:
                    nanos = parse_external_amount(amount["value"])
                except MoneyError as error:
                    raise ReconcileError(str(error)) from None
                lines.append(Line(day, _model_of(line_item), amount_nanos=nanos, key=str(result.get("api_key_id") or "")))
                basis = basis or "amount"
            elif "usage" in kind or "input_tokens" in result:
                identity = (day, result.get("model"), result.get("project_id"), result.get("api_key_id"))
                if identity in seen:
                    raise ReconcileError(f"duplicated line: {day} {result.get('model')}")
                seen.add(identity)
                lines.append(Line(day, str(result.get("model") or ""), input_tokens=int(result.get("input_tokens") or 0),
                                  output_tokens=int(result.get("output_tokens") or 0),
                                  key=str(result.get("api_key_id") or "")))
                basis = basis or "tokens"
            else:
                raise ReconcileError(f"unknown result object {kind!r}")
            if len(lines) > LINES_MAX:
                raise ReconcileError(f"more than {LINES_MAX} lines")
    return basis or "amount", lines


def _csv(text: str, currency: str) -> list[Line]:
    reader = csv.DictReader(io.StringIO(text))
    fields = {f.strip().lower() for f in reader.fieldnames or []}
    if not {"date", "model", "amount"} <= fields:
        raise ReconcileError("a CSV export needs a header with at least date, model and amount")
    lines: list[Line] = []
    seen: set[tuple[str, ...]] = set()
    for number, raw in enumerate(reader, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
        if row.get("currency") and row["currency"].upper() != currency.upper():
            raise ReconcileError(f"line {number}: the export is in {row['currency']}, the ledger in {currency}")
        identity = (row["date"], row["model"], row.get("key", ""), row.get("project", ""))
        if identity in seen:
            raise ReconcileError(f"line {number}: duplicated line {row['date']} {row['model']}")
        seen.add(identity)
        try:
            day = datetime.strptime(row["date"][:10], "%Y-%m-%d").strftime("%Y-%m-%d")
            nanos = parse_external_amount(row["amount"])
            tokens_in = int(row.get("input_tokens") or row.get("tokens") or 0)
            tokens_out = int(row.get("output_tokens") or 0)
        except (ValueError, MoneyError) as error:
            raise ReconcileError(f"line {number}: {error}") from None
        lines.append(Line(day, _model_of(row["model"]), nanos, tokens_in, tokens_out, row.get("key", "")))
        if len(lines) > LINES_MAX:
            raise ReconcileError(f"more than {LINES_MAX} lines")
    return lines


def _canonical_model(name: str, models: list[str]) -> str:
    """A provider's dated model name -> the price table's longest name it starts with."""
    matches = [m for m in models if name == m or name.startswith(m + "-")]
    return max(matches, key=len) if matches else name


def reconcile(session: Session, provider: str, basis: str, lines: list[Line], models: list[str],
              tolerance_nanos: int = 0, tolerance_bps: int = 0, accounts: dict[str, str] | None = None) -> Result:
    """Compare per day x model, and per provider key too when the export names keys (`accounts` maps the
    provider's key ids to the account names policyd records)."""
    accounts = accounts or {}
    by_key = any(line.key in accounts for line in lines)  # keys policyd knows as accounts: compare per key
    provider_side: dict[tuple[str, ...], list[int]] = {}
    for line in lines:
        key: tuple[str, ...] = (line.day, _canonical_model(line.model, models))
        if by_key:
            key += (accounts.get(line.key, line.key),)
        totals = provider_side.setdefault(key, [0, 0])
        totals[0] += line.amount_nanos
        totals[1] += line.input_tokens + line.output_tokens
    days = sorted({key[0] for key in provider_side})
    r = UsageRecordRow
    ledger_side: dict[tuple[str, ...], list[int]] = {}
    if days:
        start = int(datetime.strptime(days[0], "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()) * 1000
        end = int(datetime.strptime(days[-1], "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()) * 1000 + DAY_MS
        try:
            require_kept(session, start)  # days whose records retention deleted would all read as missing
        except ReportError as error:
            raise ReconcileError(str(error)) from None
        day_start = (r.created_ms - r.created_ms % DAY_MS).label("day")
        charged = (r.provider == provider, r.status.in_(("settled", "settled_late")), r.created_ms >= start,
                   r.created_ms < end)
        query = (select(day_start, r.served_model, r.provider_account,
                        func.sum(r.cost_nanos - r.image_generation_cost_nanos - r.other_models_cost_nanos),
                        func.sum(r.input_tokens + r.output_tokens))
                 .where(*charged).group_by(day_start, r.served_model, r.provider_account))
        # the images an image_generation tool made: billed under the image model, apart from the model's tokens
        images = (select(day_start, r.image_model, r.provider_account, func.sum(r.image_generation_cost_nanos),
                         func.sum(r.image_generation_input_tokens + r.image_generation_output_tokens))
                  .where(*charged, r.image_generation_cost_nanos > 0)
                  .group_by(day_start, r.image_model, r.provider_account))
        # the parts other models ran (an advisor's calls, a fallback's declined attempts): billed under each
        others = (select(day_start, r.served_model, r.provider_account, r.other_models)
                  .where(*charged, r.other_models_cost_nanos > 0))
        lines = [*session.execute(query), *session.execute(images)]
        for day_ms, served, account, parts in session.execute(others):
            for model, (cost, tokens) in (parts or {}).items():
                lines += [(day_ms, model, account, cost, tokens), (day_ms, served, account, 0, -tokens)]
        for day_ms, model, account, cost, tokens in lines:
            key = (_day(int(day_ms) // 1000), model) + ((account or "",) if by_key else ())
            totals = ledger_side.setdefault(key, [0, 0])
            totals[0] += int(cost or 0)
            totals[1] += int(tokens or 0)
    # a day the export gives lines of no model (an Anthropic report's web searches, or one not broken down by
    # model) is compared whole: the ledger holds a request's searches in its model's cost
    whole_days = {key[0] for key in provider_side if key[1] == ""}
    if whole_days:
        provider_side, ledger_side = _by_day(provider_side, whole_days), _by_day(ledger_side, whole_days)
    result = Result(basis)
    for key in sorted(set(provider_side) | set(ledger_side)):
        p = provider_side.get(key)
        l = ledger_side.get(key)
        if p is None:
            status = "missing_in_export"
        elif l is None:
            status = "missing_in_ledger"
        else:
            a, b = (p[0], l[0]) if basis == "amount" else (p[1], l[1])
            allowed = max(tolerance_nanos if basis == "amount" else 0, abs(b) * tolerance_bps // 10_000)
            status = "matched" if a == b else "within_tolerance" if abs(a - b) <= allowed else "mismatched"
        result.comparisons.append(Comparison(key[0], key[1], status, (p or [0, 0])[0], (l or [0, 0])[0],
                                             (p or [0, 0])[1], (l or [0, 0])[1], key[2] if by_key else ""))
    return result


def _by_day(side: dict[tuple[str, ...], list[int]], days: set[str]) -> dict[tuple[str, ...], list[int]]:
    """The totals of `days` folded into one line a day (model ""), every other line as it was."""
    folded: dict[tuple[str, ...], list[int]] = {}
    for key, (nanos, tokens) in side.items():
        into = (key[0], "", *key[2:]) if key[0] in days else key
        totals = folded.setdefault(into, [0, 0])
        totals[0] += nanos
        totals[1] += tokens
    return folded

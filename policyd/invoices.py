"""Invoice line items per customer and calendar month, from the ledger, and the period close.

A line is the customer's charges for one model (or feature) in the period: requests, tokens and
the charge. Charges are summed in nanos and rounded to the invoice unit (a cent) **here, once per
line**, by the project's one rule (up). Credits (grants by source, expiries) and promotional usage
(charged 0, cost shown) are listed apart. The same ledger always gives the same bytes.

Closing a period stores its export and digest; a closed period is exported from that snapshot.
Charges that reach the ledger for a closed period afterwards (a writer that caught up late) are
never edited into it: they appear as adjustment lines of the period they reached the ledger in (that one alone).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from policyd.db import LedgerEntryRow, PeriodCloseRow, UsageRecordRow
from policyd.money import NANOS_PER_UNIT, ceil_div, format_amount
from policyd.reports import ReportError, month_bounds

INVOICE_UNIT_NANOS = NANOS_PER_UNIT // 100  # invoices are in cents
GROUPINGS = {"model": UsageRecordRow.served_model, "feature": UsageRecordRow.feature}


class InvoiceError(ValueError):
    pass


def to_invoice_unit(nanos: int) -> int:
    """Nanos -> cents, rounded up (the project's one rounding rule, applied at the invoice line)."""
    return ceil_div(nanos, INVOICE_UNIT_NANOS) if nanos >= 0 else -ceil_div(-nanos, INVOICE_UNIT_NANOS)


def _cents(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"


@dataclass(frozen=True)
class Invoice:
    customer_id: str
    period: str
    group_by: str
    text: str  # canonical JSON: what is stored on close and compared
    closed: bool = False

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def data(self) -> dict[str, Any]:
        return json.loads(self.text)


def _charge_lines(session: Session, customer_id: str, start: int, end: int, column: Any) -> list[dict[str, Any]]:
    """The customer's charges that reached the ledger dated in [start, end), grouped by `column`."""
    r, l = UsageRecordRow, LedgerEntryRow
    query = (select(column.label("item"), func.count(), func.sum(r.input_tokens), func.sum(r.output_tokens),
                    func.sum(-l.amount_nanos))
             .join(r, r.request_id == l.request_id)
             .where(l.customer_id == customer_id, l.kind == "charge", l.created_ms >= start, l.created_ms < end,
                    r.billing_mode != "promo")
             .group_by(column))
    return [{"item": item or "(none)", "requests": int(n), "input_tokens": int(i or 0), "output_tokens": int(o or 0),
             "charge_nanos": int(c or 0)} for item, n, i, o, c in session.execute(query)]


def build(session: Session, customer_id: str, period: str, group_by: str = "model") -> Invoice:
    if group_by not in GROUPINGS:
        raise InvoiceError(f"lines are by model or by feature, not {group_by!r}")
    try:
        start, end = month_bounds(period)
    except ReportError as error:
        raise InvoiceError(str(error)) from None
    known = session.scalar(select(func.count()).select_from(LedgerEntryRow).where(LedgerEntryRow.customer_id == customer_id))
    if not known:
        raise InvoiceError(f"unknown customer {customer_id!r}: no ledger entries")
    closed = session.get(PeriodCloseRow, (customer_id, period, group_by))
    if closed is not None:
        return Invoice(customer_id, period, group_by, closed.export, closed=True)
    column = GROUPINGS[group_by]
    lines = sorted(_charge_lines(session, customer_id, start, end, column), key=lambda x: x["item"])
    for line in lines:
        line["amount"] = _cents(to_invoice_unit(line["charge_nanos"]))
    adjustments = _late_entries(session, customer_id, start, end, column)
    for line in adjustments:
        line["amount"] = _cents(to_invoice_unit(line["charge_nanos"]))
    l = LedgerEntryRow
    credits = [{"source": s, "entries": int(n), "amount_nanos": int(a), "amount": _cents(to_invoice_unit(int(a)))}
               for s, n, a in session.execute(
                   select(l.source, func.count(), func.sum(l.amount_nanos))
                   .where(l.customer_id == customer_id, l.kind.in_(("grant", "expiry")), l.created_ms >= start,
                          l.created_ms < end).group_by(l.source).order_by(l.source))]
    r = UsageRecordRow
    promo = session.execute(
        select(func.count(), func.sum(r.cost_nanos)).where(
            r.customer_id == customer_id, r.billing_mode == "promo", r.status.in_(("settled", "settled_late")),
            r.closed_ms >= start, r.closed_ms < end)).one()
    subtotal = sum(to_invoice_unit(x["charge_nanos"]) for x in lines + adjustments)
    currency = session.scalar(select(l.currency).where(l.customer_id == customer_id, l.currency != "").limit(1)) or ""
    document = {
        "customer_id": customer_id, "period": period, "currency": currency, "lines_by": group_by,
        "rounding": "each line's charge, summed in nanos, rounded up to the cent",
        "lines": lines, "adjustments_from_closed_periods": adjustments,
        "credits": credits, "promotional_usage": {"requests": int(promo[0] or 0), "cost_nanos": int(promo[1] or 0),
                                                  "charge": "0.00"},
        "total": _cents(subtotal),
    }
    return Invoice(customer_id, period, group_by, json.dumps(document, sort_keys=True, indent=2) + "\n")


def _late_entries(session: Session, customer_id: str, before_ms: int, until_ms: int, column: Any
                  ) -> list[dict[str, Any]]:
    """Charges for an earlier, closed period that reached the ledger after it was closed, in this period ([before_ms,
    until_ms)): each is an adjustment of the one period it reached the ledger in, never of the ones after it too."""
    out: list[dict[str, Any]] = []
    l, r = LedgerEntryRow, UsageRecordRow
    closes = session.scalars(select(PeriodCloseRow).where(PeriodCloseRow.customer_id == customer_id)).all()
    periods: dict[str, int] = {}
    for close in closes:
        periods[close.period] = min(periods.get(close.period, close.closed_ms), close.closed_ms)
    for period, closed_ms in sorted(periods.items()):
        start, end = month_bounds(period)
        if end > before_ms:
            continue
        query = (select(column, func.count(), func.sum(-l.amount_nanos))
                 .join(r, r.request_id == l.request_id)
                 .where(l.customer_id == customer_id, l.kind == "charge", l.created_ms >= start, l.created_ms < end,
                        l.recorded_ms > closed_ms, l.recorded_ms >= before_ms, l.recorded_ms < until_ms)
                 .group_by(column))
        for item, n, charge in session.execute(query):
            out.append({"item": f"late usage of {period}: {item or '(none)'}", "requests": int(n),
                        "charge_nanos": int(charge or 0)})
    return sorted(out, key=lambda x: x["item"])


def close(session: Session, invoice: Invoice, now_ms: int) -> None:
    if invoice.closed:
        raise InvoiceError(f"period {invoice.period} of {invoice.customer_id} is already closed")
    _, end = month_bounds(invoice.period)
    if end > now_ms:
        raise InvoiceError(f"period {invoice.period} has not ended yet")
    session.add(PeriodCloseRow(customer_id=invoice.customer_id, period=invoice.period, lines_by=invoice.group_by,
                               closed_ms=now_ms, digest=invoice.digest, export=invoice.text))


def to_csv(invoice: Invoice) -> str:
    data = invoice.data()
    rows = ["kind,item,requests,input_tokens,output_tokens,charge_nanos,amount"]
    for line in data["lines"]:
        rows.append(f"line,{_q(line['item'])},{line['requests']},{line['input_tokens']},{line['output_tokens']},"
                    f"{line['charge_nanos']},{line['amount']}")
    for line in data["adjustments_from_closed_periods"]:
        rows.append(f"adjustment,{_q(line['item'])},{line['requests']},,,{line['charge_nanos']},{line['amount']}")
    for credit in data["credits"]:
        rows.append(f"credit,{_q(credit['source'])},{credit['entries']},,,{credit['amount_nanos']},{credit['amount']}")
    promo = data["promotional_usage"]
    rows.append(f"promotional,promotional usage (cost {format_amount(promo['cost_nanos'])}),{promo['requests']},,,0,0.00")
    rows.append(f"total,,,,,,{data['total']}")
    return "\n".join(rows) + "\n"


def _q(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text

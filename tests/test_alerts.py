"""Alerts reach webhooks at least once, signed, retried with backoff against a receiver that fails."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from policyd.alerts import AlertDelivery, deliveries, payload
from policyd.server import Service
from tests.helpers import ask, fund, new_key, usage


class Receiver:
    """A real local HTTP endpoint that answers 500 to the first `failures` requests."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                status = 500 if len(receiver.received) < receiver.failures else 200
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/policyd"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_threshold_alerts_are_delivered_signed_after_retries(service: Service) -> None:
    _, secret = await new_key(service, plan="free", customer="tiny")
    await fund(service, "tiny", "10")
    for _ in range(17):  # key-rpm is 20: crossing 50% and 80%
        await service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=10))
    await service.writer.drain()
    receiver = Receiver(failures=3)
    clock = [1_000_000]
    delivery = AlertDelivery(service.store, [receiver.url], "webhook-secret", clock=lambda: clock[0])
    try:
        assert delivery.deliver_due() == 0  # both fail (attempt 1)
        assert delivery.deliver_due() == 0  # not due yet: nothing sent
        assert len(receiver.received) == 2
        clock[0] += 1_000
        assert delivery.deliver_due() == 1  # one fails again, the other gets through
        clock[0] += 2_000
        assert delivery.deliver_due() == 1
        clock[0] += 60_000
        assert delivery.deliver_due() == 0  # delivered once each: nothing more is sent
    finally:
        receiver.close()
    delivered = [(h, b) for h, b, status in receiver.received if status == 200]
    assert len(delivered) == 2
    bodies = [json.loads(b) for _, b in delivered]
    assert sorted(b["percent"] for b in bodies) == ["50", "80"]
    assert {b["label"] for b in bodies} == {"key-rpm"}
    for headers, body in delivered:
        expected = "sha256=" + hmac.new(b"webhook-secret", body, hashlib.sha256).hexdigest()
        assert headers["x-policyd-signature"] == expected
        assert headers["x-policyd-event-id"] == json.loads(body)["id"]
    rows = deliveries(service.store)
    assert all(r.delivered_ms > 0 for r in rows) and sorted(r.attempts for r in rows) == [2, 3]


async def test_spend_spikes_and_thread_loops_become_alerts_once(service: Service) -> None:
    from policyd.anomalies import AnomalyDetector
    from tests.helpers import usage

    window = 600_000
    start = 1_793_491_200_000  # a window boundary
    clock = [start - 86_400_000]
    service.engine.clock = lambda: clock[0]
    key_id, secret = await new_key(service)
    await fund(service, "acme", "100")
    # the day before: a little spend, spread out
    for i in range(6):
        clock[0] = start - 86_400_000 + i * 4 * 3_600_000
        await service.engine.authorize(ask(secret, request_id=f"usual-{i}", model="gpt-4o-mini"))
        await service.engine.settle(usage(f"usual-{i}", input_tokens=100, output_tokens=10))
    # the window: a runaway agent on one thread, on an expensive model
    for i in range(60):
        clock[0] = start + i * 5_000
        await service.engine.authorize(ask(secret, request_id=f"loop-{i}", model="gpt-4o", thread_id="agent-7"))
        await service.engine.settle(usage(f"loop-{i}", input_tokens=20_000, output_tokens=1_000))
    await service.writer.drain()
    detector = AnomalyDetector(service.store, window_ms=window, factor=5, spend_min_nanos=1_000_000,
                               thread_requests=50, clock=lambda: start + window + 1)
    assert detector.detect() == 2
    detector.detect()  # a second replica, or a second look at the same window: the same ids, recorded once
    alerts = [e.detail for e in service.store.events("alert") if "anomaly" in e.detail]
    assert sorted(a["anomaly"] for a in alerts) == ["spend_spike", "thread_loop"]
    spike = next(a for a in alerts if a["anomaly"] == "spend_spike")
    assert spike["api_key_id"] == key_id and spike["spend_nanos"] >= 5 * spike["usual_nanos"]
    loop = next(a for a in alerts if a["anomaly"] == "thread_loop")
    assert (loop["thread_id"], loop["requests"]) == ("agent-7", 60)


async def test_a_prepaid_wallet_taken_below_an_alert_amount_is_an_alert_once_a_crossing(service: Service) -> None:
    """A plan's `balance_alerts`: a charge that takes a prepaid wallet's balance below one of them is an
    alert (delivered as any other), once a crossing; a grant that lifts the balance above re-arms it. A
    postpaid wallet (plan wallet: none) is never alerted."""
    import yaml

    from policyd.money import parse_amount
    from tests.conftest import SAMPLE_POLICY
    from tests.helpers import usage

    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["plans"]["pro"]["balance_alerts"] = ["0.10", "0.50"]
    await service.admin.apply_policy(yaml.safe_dump(doc), "alerts.yaml")
    assert service.book.current.plan("internal-staging").balance_alerts == (parse_amount("0.50"),
                                                                            parse_amount("0.10"))
    _, secret = await new_key(service, customer="topup")
    _, postpaid = await new_key(service, customer="later", plan="internal-staging")
    await fund(service, "topup", "0.60")

    async def spend(key: str, request_id: str, output_tokens: int = 50_000) -> int:
        await service.engine.authorize(ask(key, request_id=request_id))
        return (await service.engine.settle(usage(request_id, 100_000, output_tokens))).balance_after

    balances = [await spend(secret, f"s{i}") for i in range(3)]  # 0.054 a charge: 0.546, 0.492, 0.438
    await fund(service, "topup", "0.20")  # 0.638: above 0.50 again
    balances += [await spend(secret, f"t{i}") for i in range(3)]  # 0.584, 0.530, 0.476
    balances.append(await spend(secret, "big", output_tokens=500_000))  # 0.042 + 0.36 = 0.402: 0.074
    for i in range(3):
        await spend(postpaid, f"p{i}")
    await service.writer.drain()
    crossed = [e.detail for e in service.store.events("alert") if e.detail.get("label") == "low-balance"]
    assert [(a["customer_id"], int(a["below"]), int(a["balance"])) for a in crossed] == [
        ("topup", parse_amount("0.50"), balances[1]), ("topup", parse_amount("0.50"), balances[5]),
        ("topup", parse_amount("0.10"), balances[6])]
    assert balances[1] < parse_amount("0.50") <= balances[0] and balances[6] < parse_amount("0.10")

    receiver = Receiver(failures=0)
    delivery = AlertDelivery(service.store, [receiver.url], "webhook-secret")
    try:
        while delivery.deliver_due():
            pass
    finally:
        receiver.close()
    bodies = [json.loads(body) for _, body, _ in receiver.received]
    assert sorted(b["below"] for b in bodies if b.get("label") == "low-balance") == sorted(
        a["below"] for a in crossed)


async def test_an_owners_and_a_keys_limits_alert_at_the_percentages_given(service: Service) -> None:
    """A limit given through the admin API (a customer's, a key's) alerts once a window at the percentages it
    names (none named: 50 and 80, as a plan limit does); bad ones are refused."""
    from policyd.domain import PolicydError

    key_id, secret = await new_key(service, plan="free", customer="watched")
    await fund(service, "watched", "10")
    await service.admin.set_owner_limits([{"window": "minute", "unit": "requests", "limit": 10, "thresholds": [30]}],
                                         "watched")
    await service.admin.set_limits(key_id, [{"window": "hour", "unit": "requests", "limit": 100}])
    for _ in range(6):
        assert (await service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=10))).decision == "allow"
    await service.writer.drain()
    alerts = [(e.detail["label"], e.detail["percent"]) for e in service.store.events("alert") if "label" in e.detail]
    assert sorted(alerts) == [("customer-requests-minute", "30")]  # the key's 100 an hour: 6% used, none
    assert (await service.admin.owner_limits("watched"))[0].limits[0]["thresholds"] == [30]
    for bad in ([0], [101], [10, 20, 30, 40, 50], ["half"]):
        with pytest.raises(PolicydError) as refused:
            await service.admin.set_owner_limits([{"window": "day", "unit": "money", "limit": 1, "thresholds": bad}],
                                                 "watched")
        assert refused.value.reason == "invalid_limit"


async def test_a_limit_refusing_requests_alerts_once_a_window_naming_whose_they_were(service: Service) -> None:
    """The first request a limit refuses in its window is an alert (percent 100, `reached`), however many are
    refused after it; every limit alert names the customer and key whose request crossed it; a reset of the
    limit arms it again."""
    key_id, secret = await new_key(service, plan="free", customer="blocked")
    await fund(service, "blocked", "10")
    await service.admin.set_limits(key_id, [{"window": "day", "unit": "requests", "limit": 2, "thresholds": [50]}])
    decisions = [await service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=10))
                 for _ in range(6)]
    assert [d.decision for d in decisions] == ["allow", "allow", "deny", "deny", "deny", "deny"]
    await service.writer.drain()
    alerts = [e for e in service.store.events("alert") if e.detail.get("label") == "key-requests-day"]
    assert [(e.detail["percent"], e.detail.get("reached")) for e in alerts] == [("50", None), ("100", "1")]
    assert {(e.customer_id, e.detail["api_key_id"]) for e in alerts} == {("blocked", key_id)}
    assert alerts[1].request_id == decisions[2].request_id  # the first refused
    body = json.loads(payload(alerts[1]))
    assert (body["customer_id"], body["reached"], body["used"], body["limit"]) == ("blocked", "1", "2", "2")
    await service.admin.reset_limits(key_id=key_id, window="day")  # nothing was settled: it holds its 2 still
    assert (await service.engine.authorize(ask(secret, request_id="still"))).decision == "deny"
    for d in decisions[:2]:
        await service.engine.settle(usage(d.request_id))
    await service.admin.reset_limits(key_id=key_id, window="day")
    assert [(await service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=10))).decision
            for _ in range(3)] == ["allow", "allow", "deny"]
    await service.writer.drain()
    alerts = [e for e in service.store.events("alert") if e.detail.get("label") == "key-requests-day"]
    assert [e.detail["percent"] for e in alerts] == ["50", "100", "50", "100"]  # armed again by the reset


async def test_limits_of_one_bucket_each_count_a_request_once_and_alert_at_their_own_percentages(
        service: Service) -> None:
    """A plan's request limit with a shadow limit of the same bucket beside it (what an operator tries before
    tightening), and a customer's day budget beside the downgrade limit of its bucket: a request counts once in
    the bucket, whichever limits count there; each limit refuses (or notes) at its own limit and alerts at its own
    percentages; a reset of one is the other's too (one counter), listed for both, each armed again."""
    from tests.conftest import SAMPLE_POLICY

    free_rpm = "      - {name: key-rpm, scope: key, window: minute, unit: requests, limit: 20}"
    premium_day = "      - {name: premium-day, scope: customer,"
    await service.admin.apply_policy(SAMPLE_POLICY.replace(free_rpm, (
        "      - {name: key-total, scope: key, window: total, unit: requests, limit: 4, thresholds: [50]}\n"
        "      - {name: key-total-watch, scope: key, window: total, unit: requests, limit: 2, thresholds: [50],"
        " action: shadow}"), 1).replace(premium_day, (
            '      - {name: customer-day, scope: customer, window: day, unit: money, limit: "60.00"}\n' + premium_day)),
        "shared.yaml")
    key_id, secret = await new_key(service, plan="free", customer="shared")
    await fund(service, "shared", "10")
    decisions = [await service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=10)) for _ in range(6)]
    assert [(d.decision, d.shadow_denials) for d in decisions] == [
        ("allow", ()), ("allow", ()), ("allow", ("key-total-watch",)), ("allow", ("key-total-watch",)),
        ("deny", ()), ("deny", ())]
    assert [r.remaining for d in decisions[:4] for r in d.rate_limits if r.unit == "requests"] == [3, 2, 1, 0]
    await service.writer.drain()
    alerts = [(e.detail["label"], e.detail["percent"]) for e in service.store.events("alert")
              if e.detail.get("label", "").startswith("key-total")]
    assert alerts == [("key-total-watch", "50"), ("key-total", "50"), ("key-total", "100")]
    for d in decisions[:4]:
        await service.engine.settle(usage(d.request_id))
    _, resets = await service.admin.reset_limits(key_id=key_id, name="key-total")
    assert sorted((r.limit.label, r.forgiven, r.used) for r in resets) == [("key-total", 4, 0),
                                                                          ("key-total-watch", 4, 0)]
    assert [(await service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=10))).decision
            for _ in range(5)] == ["allow"] * 4 + ["deny"]
    await service.writer.drain()
    alerts = [(e.detail["label"], e.detail["percent"]) for e in service.store.events("alert")
              if e.detail.get("label", "").startswith("key-total")]
    assert alerts[3:] == [("key-total-watch", "50"), ("key-total", "50"), ("key-total", "100")]  # armed again

    _, pro = await new_key(service, plan="pro", customer="shared-pro")
    await fund(service, "shared-pro", "10")
    premium = await service.engine.authorize(ask(pro, model="gpt-4o", request_id="premium"))
    assert (premium.decision, premium.served_model) == ("allow", "gpt-4o")
    (bucket,) = [k async for k in service.counters.client.scan_iter(match="*:b:customer:shared-pro:money:day*")]
    assert int(await service.counters.client.hget(bucket, "used")) == premium.reserved  # once, not a limit's each
    settled = await service.engine.settle(usage("premium", input_tokens=100, output_tokens=40))
    assert int(await service.counters.client.hget(bucket, "used")) == settled.charge
    await service.writer.drain()
    assert (await service.admin.audit()).ok


async def test_limits_of_one_bucket_hold_at_the_blocking_figure_under_concurrent_requests(service: Service) -> None:
    """Twenty requests at once against a key's limit of 5 with a shadow limit of 2 in its bucket: exactly 5 are
    served (not 2 or 3, as counting each request once a limit would give), the bucket holds 5."""
    import asyncio

    from tests.conftest import SAMPLE_POLICY

    free_rpm = "      - {name: key-rpm, scope: key, window: minute, unit: requests, limit: 20}"
    await service.admin.apply_policy(SAMPLE_POLICY.replace(free_rpm, (
        "      - {name: key-total, scope: key, window: total, unit: requests, limit: 5}\n"
        "      - {name: key-total-watch, scope: key, window: total, unit: requests, limit: 2, action: shadow}"), 1),
        "shared-at-once.yaml")
    _, secret = await new_key(service, plan="free", customer="at-once")
    await fund(service, "at-once", "10")
    decisions = await asyncio.gather(*(service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=10))
                                       for _ in range(20)))
    assert sorted(d.decision for d in decisions) == ["allow"] * 5 + ["deny"] * 15
    assert sum(bool(d.shadow_denials) for d in decisions) == 3  # the 3rd to 5th served: over the watch's 2
    (bucket,) = [k async for k in service.counters.client.scan_iter(match="*:b:key:*:requests:total:*")]
    assert int(await service.counters.client.hget(bucket, "used")) == 5

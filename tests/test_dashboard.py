"""The web dashboard against a policyd process with known data: HTTP-level access rules, and browser
tests in headless Chromium (Debian's chromium + chromedriver, driven by Selenium) that read each page's
numbers, compare them with the ledger, pause a key and see the next Authorize denied. Screenshots go
to $POLICYD_TEST_ARTIFACTS (default: test-artifacts/) as test artifacts."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2
from tests.conftest import ROOT
from tests.processes import PolicydProcess
from tests.servers import free_port, wait_port

ADMIN_TOKEN = "dashboard-admin-token-for-tests"
VIEWER_TOKEN = "dashboard-viewer-token-for-tests"
ARTIFACTS = Path(os.environ.get("POLICYD_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


class Deployment:
    def __init__(self, tmp: Path) -> None:
        self.database = tmp / "policyd.db"
        self.dashboard_port = free_port()
        self.policyd = PolicydProcess("", f"sqlite:///{self.database}", policy=str(ROOT / "policyd/samples/policy.yaml"),
                                      cwd=str(tmp), extra_env={
                                          "POLICYD_ADMIN_TOKEN": ADMIN_TOKEN,
                                          "POLICYD_DASHBOARD_LISTEN": f"127.0.0.1:{self.dashboard_port}",
                                          "POLICYD_DASHBOARD_VIEWER_TOKEN": VIEWER_TOKEN})
        wait_port(self.dashboard_port, timeout=30)
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.channel = grpc.insecure_channel(self.policyd.address)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.keys: dict[str, tuple[str, str]] = {}

    def seed(self) -> None:
        """Two customers, three keys, settled calls on several features, threads and models, denials,
        a release, and a reconciliation run with one mismatched line."""
        for customer, credit in (("acme", 20 * 10**9), ("globex", 5 * 10**9)):
            self.admin.GrantCredit(admin_pb2.GrantCreditRequest(
                customer_id=customer, source="purchase", grant_id=f"g-{customer}",
                amount=types_pb2.Money(currency="USD", nanos=credit)), metadata=AUTH)
        for name, customer, plan in (("acme-prod", "acme", "pro"), ("acme-batch", "acme", "pro"),
                                     ("globex-app", "globex", "free")):
            created = self.admin.CreateKey(admin_pb2.CreateKeyRequest(
                customer_id=customer, plan=plan, environment="production", label=name), metadata=AUTH)
            self.keys[name] = (created.key.id, created.secret)
        calls = [("acme-prod", "gpt-4o", "support", "t-1", 1200, 300), ("acme-prod", "gpt-4o", "support", "t-1", 900, 250),
                 ("acme-prod", "gpt-4o-mini", "search", "t-2", 400, 100), ("acme-batch", "claude-sonnet-4", "batch", "t-3", 3000, 800),
                 ("globex-app", "gpt-4o-mini", "chat", "t-9", 500, 120), ("globex-app", "gpt-4o-mini", "chat", "t-9", 600, 140)]
        for i, (key, model, feature, thread, tokens_in, tokens_out) in enumerate(calls):
            self.call(key, model, f"seed-{i}", feature, thread, settle=(tokens_in, tokens_out))
        self.call("globex-app", "gpt-4o", "seed-denied", "chat", "t-9")  # free plan: model_not_allowed
        self.call("acme-prod", "gpt-4o-mini", "seed-released", "search", "t-2")
        self.policy.Release(policy_pb2.ReleaseRequest(request_id="seed-released", reason="provider_error"))
        costs = self.sql("select date(created_ms / 1000, 'unixepoch') as day, served_model, sum(cost_nanos) as cost "
                         "from usage_records where provider = 'openai' and status = 'settled' group by 1, 2")
        lines = ["date,model,amount,currency"]
        for row in costs:
            nanos = row["cost"] + (1_000_000 if row["served_model"] == "gpt-4o" else 0)  # one line is off by 0.001
            lines.append(f"{row['day']},{row['served_model']},{Decimal(nanos) / Decimal(10**9)},USD")
        self.admin.Reconcile(admin_pb2.ReconcileRequest(provider="openai", export=("\n".join(lines) + "\n").encode()),
                             metadata=AUTH)

    def call(self, key: str, model: str, request_id: str, feature: str, thread: str,
             settle: tuple[int, int] | None = None) -> Any:
        decision = self.policy.Authorize(policy_pb2.AuthorizeRequest(
            api_key=self.keys[key][1], endpoint=types_pb2.CHAT_COMPLETIONS, model=model,
            attribution=types_pb2.Attribution(request_id=request_id, feature=feature, thread_id=thread),
            shape=policy_pb2.RequestShape(prompt_bytes=2000, message_count=2, max_output_tokens=1000)))
        if settle and decision.decision != policy_pb2.DENY:
            self.policy.Settle(policy_pb2.SettleRequest(request_id=request_id, usage=policy_pb2.Usage(
                input_tokens=settle[0], output_tokens=settle[1])))
        return decision

    def sql(self, query: str, *args: Any) -> list[sqlite3.Row]:
        assert self.admin.Audit(admin_pb2.AuditRequest(), metadata=AUTH).ok  # drains the writer first
        with sqlite3.connect(self.database) as db:
            db.row_factory = sqlite3.Row
            return db.execute(query, args).fetchall()

    def close(self) -> None:
        self.channel.close()
        self.policyd.stop()


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    tmp = Path(tempfile.mkdtemp(prefix="policyd-dashboard-"))
    d = Deployment(tmp)
    d.seed()
    yield d
    d.close()
    shutil.rmtree(tmp, ignore_errors=True)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch(url: str, token: str = "", data: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if data is not None else "GET")
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def test_access_is_protected_like_the_admin_service(deployment: Deployment) -> None:
    status, headers, _ = fetch(deployment.url + "/")
    assert status == 303 and headers["location"] == "/login"
    assert fetch(deployment.url + "/", token="wrong")[0] == 401
    status, _, _ = fetch(deployment.url + "/login", data={"token": "wrong"})
    assert status == 401
    status, headers, _ = fetch(deployment.url + "/login", data={"token": VIEWER_TOKEN})
    assert status == 303 and "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    key_id = deployment.keys["acme-batch"][0]
    status, headers, page = fetch(f"{deployment.url}/keys/{key_id}", token=VIEWER_TOKEN)
    assert status == 200 and "read-only" in page and "Pause this key" not in page
    assert "default-src 'none'" in headers["content-security-policy"]
    assert fetch(f"{deployment.url}/keys/{key_id}/pause", token=VIEWER_TOKEN, data={"csrf": ""})[0] == 403
    status, _, page = fetch(f"{deployment.url}/keys/{key_id}", token=ADMIN_TOKEN)
    assert status == 200 and "Pause this key" in page
    for secret in (s for _, s in deployment.keys.values()):
        for path in ("/", "/customers/acme", f"/keys/{key_id}", "/incidents"):
            assert secret not in fetch(deployment.url + path, token=ADMIN_TOKEN)[2]
    assert fetch(deployment.url + "/customers/nobody", token=ADMIN_TOKEN)[0] == 200  # an empty customer page
    assert fetch(deployment.url + "/keys/key_missing", token=ADMIN_TOKEN)[0] == 404


# ---------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are required (scripts/system-deps.sh)"
    profile = tempfile.mkdtemp(prefix="policyd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    session.set_page_load_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield session
    session.quit()
    shutil.rmtree(profile, ignore_errors=True)


def shot(browser: Any, name: str) -> None:
    path = ARTIFACTS / f"{name}.png"
    assert browser.save_screenshot(str(path)) and path.stat().st_size > 5_000


def nanos(browser: Any, css: str) -> int:
    """The exact amount an element shows: its data-nanos, checked against the text people read."""
    from selenium.webdriver.common.by import By

    element = browser.find_element(By.CSS_SELECTOR, f"{css} .money" if not css.endswith(".money") else css)
    value = int(element.get_attribute("data-nanos"))
    shown = Decimal(element.text.split()[0].replace(",", ""))
    assert shown * 10**9 == value, (element.text, value)
    return value


def wait_for(browser: Any, css: str, text: str, contains: bool = False) -> None:
    """After a click: wait until the next page shows `text` in `css` (the old page's elements go stale)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(driver: Any) -> bool:
        try:
            found = driver.find_element(By.CSS_SELECTOR, css).text
        except WebDriverException as error:  # newer ChromeDrivers report a node gone with the old page so
            if "does not belong to the document" in str(error):
                return False
            raise
        return text in found if contains else found == text

    WebDriverWait(browser, 20, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(shown)


def login(browser: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url + "/login")
    browser.find_element(By.NAME, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(browser, "h1", "Spend overview")


def test_pages_show_the_ledgers_numbers_and_pause_works(deployment: Deployment, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    login(browser, deployment.url, ADMIN_TOKEN)

    # overview: totals and the top customers equal the ledger's
    totals = deployment.sql("select sum(case when status in ('settled','settled_late') then charge_nanos else 0 end) c, "
                            "sum(case when status in ('settled','settled_late') then cost_nanos else 0 end) k, "
                            "count(*) n, sum(decision = 'deny') d from usage_records")[0]
    browser.get(deployment.url + "/?days=7&by=feature")
    assert nanos(browser, "#total-charge") == totals["c"] > 0
    assert nanos(browser, "#total-cost") == totals["k"] > 0
    assert int(browser.find_element(By.CSS_SELECTOR, "#total-requests [data-value]").get_attribute("data-value")) == totals["n"]
    assert int(browser.find_element(By.CSS_SELECTOR, "#total-denied [data-value]").get_attribute("data-value")) == totals["d"] == 1
    top = browser.find_elements(By.CSS_SELECTOR, "#top-customer tbody tr")
    by_customer = {r["customer_id"]: r["c"] for r in deployment.sql(
        "select customer_id, sum(charge_nanos) c from usage_records where status = 'settled' group by 1")}
    assert [row.find_element(By.TAG_NAME, "a").text for row in top] == sorted(by_customer, key=lambda c: -by_customer[c])
    for row in top:
        customer = row.find_element(By.TAG_NAME, "a").text
        assert int(row.find_element(By.CSS_SELECTOR, ".money").get_attribute("data-nanos")) == by_customer[customer]
    assert "model_not_allowed" in browser.find_element(By.ID, "denial-reasons").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart rect")) > 0
    shot(browser, "overview")

    # customer page: wallet, grants, buckets with thresholds, keys, latest records with balance before/after
    browser.get(deployment.url + "/customers/acme")
    wallet = deployment.admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="acme"), metadata=AUTH)
    assert nanos(browser, "#wallet-balance") == wallet.balance_nanos
    assert wallet.balance_nanos == 20 * 10**9 - by_customer["acme"]
    assert nanos(browser, "#wallet-reserved") == wallet.reserved_nanos == 0
    assert "purchase" in browser.find_element(By.ID, "grants").text
    buckets = browser.find_element(By.ID, "buckets")
    assert "premium-day" in buckets.text and len(buckets.find_elements(By.CSS_SELECTOR, "rect title")) >= 2
    record = deployment.sql("select * from usage_records where request_id = 'seed-1'")[0]
    row = browser.find_element(By.CSS_SELECTOR, "#records tr[data-request-id='seed-1']")
    shown = [int(m.get_attribute("data-nanos")) for m in row.find_elements(By.CSS_SELECTOR, ".money")]
    assert shown == [record["cost_nanos"], record["charge_nanos"], record["balance_before_nanos"],
                     record["balance_after_nanos"]]
    assert record["balance_before_nanos"] - record["charge_nanos"] == record["balance_after_nanos"]
    assert {"acme-prod", "acme-batch"} <= set(browser.find_element(By.ID, "keys").text.split())
    shot(browser, "customer")

    # key page: review, then pause through the confirmation, recorded, and the next Authorize is denied
    key_id, secret = deployment.keys["acme-batch"]
    browser.get(f"{deployment.url}/keys/{key_id}")
    review = browser.find_element(By.ID, "review").text
    assert "acme" in review and "production" in review and "pro" in review
    spend = deployment.sql("select sum(charge_nanos) c from usage_records where api_key_id = ?", key_id)[0]["c"]
    assert nanos(browser, "#review tr:nth-child(12) td") == spend  # spend this month
    shot(browser, "key")
    browser.find_element(By.ID, "key-pause").click()
    wait_for(browser, "h1", "Pause key", contains=True)
    shot(browser, "key-pause-confirm")
    browser.find_element(By.ID, "confirm").click()
    wait_for(browser, "#key-state", "paused")
    denied = deployment.call("acme-batch", "gpt-4o-mini", "after-pause", "batch", "t-3")
    assert (denied.decision, denied.reason) == (policy_pb2.DENY, "key_paused")
    assert deployment.call("acme-prod", "gpt-4o-mini", "sibling", "search", "t-2").decision == policy_pb2.ALLOW
    actions = [a for a in deployment.sql("select detail from events where kind = 'admin_action'")
               if "dashboard" in str(a["detail"])]  # (the deployment's own calls over gRPC are recorded too)
    assert len(actions) == 1 and key_id in actions[0]["detail"] and "key_pause" in actions[0]["detail"]
    browser.find_element(By.ID, "key-resume").click()
    wait_for(browser, "h1", "Resume key", contains=True)
    browser.find_element(By.ID, "confirm").click()
    wait_for(browser, "#key-state", "active")
    assert deployment.call("acme-batch", "gpt-4o-mini", "after-resume", "batch", "t-3").decision == policy_pb2.ALLOW

    # incidents: this window against the one before; every charged key moved up
    browser.get(deployment.url + "/incidents?hours=24")
    movers = browser.find_element(By.ID, "movers-key").text
    assert deployment.keys["acme-prod"][0] in movers
    assert "t-1" in browser.find_element(By.ID, "threads").text
    shot(browser, "incidents")

    # reconciliation: the latest run, line by line
    browser.get(deployment.url + "/reconciliation")
    assert browser.find_element(By.ID, "recon-result").text == "differences found"
    lines = browser.find_elements(By.CSS_SELECTOR, "#recon-lines tbody tr")
    statuses = {line.find_elements(By.TAG_NAME, "td")[1].text: line.find_elements(By.TAG_NAME, "td")[3].text
                for line in lines}
    assert statuses == {"gpt-4o": "mismatched", "gpt-4o-mini": "matched"}
    off = [line for line in lines if "gpt-4o" == line.find_elements(By.TAG_NAME, "td")[1].text][0]
    assert int(off.find_elements(By.CSS_SELECTOR, ".money")[2].get_attribute("data-nanos")) == 1_000_000
    shot(browser, "reconciliation")


def test_pages_fit_a_phone_screen(deployment: Deployment, browser: Any) -> None:
    login(browser, deployment.url, VIEWER_TOKEN)
    browser.set_window_size(390, 844)
    try:
        for name, path in (("overview", "/"), ("customer", "/customers/acme"), ("incidents", "/incidents")):
            browser.get(deployment.url + path)
            overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{path} scrolls sideways on a phone by {overflow}px"
            shot(browser, f"phone-{name}")
    finally:
        browser.set_window_size(1280, 1000)


def test_the_overview_shows_the_operators_caps(deployment: Deployment) -> None:
    """With caps in the policy, the overview shows what each holds now, as ListCaps does; without, none."""
    assert 'id="caps"' not in fetch(deployment.url + "/", token=ADMIN_TOKEN)[2]
    sample = (ROOT / "policyd/samples/policy.yaml").read_text()
    capped = sample + '\ncaps:\n  - {name: openai-day, provider: openai, window: day, unit: cost, limit: "900.00"}\n'
    deployment.admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(yaml=capped, source_name="capped.yaml"), metadata=AUTH)
    try:
        deployment.call("acme-prod", "gpt-4o-mini", "capped-1", "search", "t-2")  # held, not settled
        held = deployment.admin.ListCaps(admin_pb2.ListCapsRequest(), metadata=AUTH).caps[0].used
        status, _, page = fetch(deployment.url + "/", token=ADMIN_TOKEN)
        assert status == 200 and held > 0
        table = page.split('id="caps"', 1)[1].split("</table>", 1)[0]
        assert "openai-day" in table and f'data-nanos="{held}"' in table and 'data-nanos="900000000000"' in table
    finally:
        deployment.policy.Release(policy_pb2.ReleaseRequest(request_id="capped-1", reason="test_done"))
        deployment.admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(yaml=sample, source_name="policy.yaml"),
                                     metadata=AUTH)

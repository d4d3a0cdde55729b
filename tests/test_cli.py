"""The `policyd` command against a running `policyd serve` on the embedded default, as a new user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.processes import PolicydProcess, policyd_command

SAMPLE = str(ROOT / "policyd" / "samples" / "policy.yaml")


@pytest.fixture
def server(tmp_path: Path):
    process = PolicydProcess("", f"sqlite:///{tmp_path / 'policyd.db'}", policy=SAMPLE, cwd=str(tmp_path))
    yield process
    process.stop()


def run(server: PolicydProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*policyd_command(), *args, "--server", server.address], capture_output=True, text=True,
                          timeout=60)


def test_a_new_users_tour(server: PolicydProcess, tmp_path: Path) -> None:
    assert run(server, "health").stdout.strip() == "serving"
    granted = run(server, "credit", "grant", "--customer", "demo", "--amount", "10.00", "--grant-id", "welcome")
    assert granted.returncode == 0 and "balance 10.000000000 USD" in granted.stdout
    created = json.loads(run(server, "keys", "create", "--customer", "demo", "--plan", "pro", "--json").stdout)
    secret, key_id = created["secret"], created["key"]["id"]
    assert secret.startswith("pdk_live_")

    listed = run(server, "keys", "list", "--json")
    assert key_id in listed.stdout and secret not in listed.stdout
    second = json.loads(run(server, "keys", "create", "--customer", "demo", "--plan", "pro", "--json").stdout)
    first_page = run(server, "keys", "list", "--customer", "demo", "--limit", "1").stdout
    assert key_id in first_page and second["key"]["id"] not in first_page and "(more: --all" in first_page
    every = run(server, "keys", "list", "--customer", "demo", "--limit", "1", "--all").stdout
    assert key_id in every and second["key"]["id"] in every and "(more" not in every

    allowed = run(server, "authorize", "--key", secret, "--model", "gpt-4o", "--max-tokens", "200",
                  "--request-id", "tour-1")
    assert allowed.returncode == 0 and allowed.stdout.startswith("allow tour-1: served gpt-4o")
    settled = run(server, "settle", "tour-1", "--input-tokens", "12", "--output-tokens", "150")
    # gpt-4o: 12 x 2.50/1M + 150 x 10.00/1M = 0.00153; pro: +20% = 0.001836
    assert settled.returncode == 0
    assert "charge 0.001836000 USD, balance 10.000000000 -> 9.998164000" in settled.stdout
    assert "balance 9.998164000 USD, reserved 0.000000000" in run(server, "wallet", "demo").stdout

    assert run(server, "keys", "pause", key_id).returncode == 0
    denied = run(server, "authorize", "--key", secret, "--model", "gpt-4o")
    assert denied.returncode == 2 and "key_paused" in denied.stdout
    assert run(server, "keys", "resume", key_id).returncode == 0
    assert run(server, "authorize", "--key", secret, "--model", "gpt-4o").returncode == 0

    rotated = json.loads(run(server, "keys", "rotate", key_id, "--grace-seconds", "60", "--json").stdout)
    assert rotated["secret"] != secret
    assert run(server, "authorize", "--key", rotated["secret"], "--model", "gpt-4o").returncode == 0
    assert run(server, "authorize", "--key", secret, "--model", "gpt-4o").returncode == 0  # grace period

    audit = run(server, "audit")
    assert audit.returncode == 0 and audit.stdout.startswith("ok:")

    review = run(server, "keys", "show", key_id)
    assert review.returncode == 0 and "spend        today 0.001836000" in review.stdout
    assert "denials      key_paused: 1" in review.stdout and secret not in review.stdout
    report = run(server, "usage", "report", "--group-by", "customer,model", "--format", "csv")
    assert report.returncode == 0
    assert report.stdout.splitlines()[0].startswith("customer,model,requests,allowed,denied")
    assert "demo,gpt-4o,5,4,1" in report.stdout
    import datetime

    today = datetime.datetime.now(datetime.timezone(datetime.timedelta(hours=14))).date()  # Kiribati's, ahead of all
    zoned = run(server, "usage", "report", "--bucket", "day", "--timezone", "Pacific/Kiritimati", "--since",
                str(today), "--format", "csv")  # since its midnight: every request of the tour, on its today
    assert zoned.returncode == 0 and f"demo,{today},5,4,1" in zoned.stdout, zoned.stdout
    unknown = run(server, "usage", "report", "--bucket", "day", "--timezone", "Mars/Olympus_Mons", "--since", "2026-11-01")
    assert unknown.returncode != 0 and "unknown time zone" in unknown.stderr
    for args in (["usage", "report", "--since", "yesterday"], ["keys", "create", "--customer", "demo", "--plan", "pro",
                                                               "--expires-at", "soon"]):
        unread = run(server, *args)  # said in a line, not as a traceback
        assert unread.returncode != 0 and unread.stderr.startswith("policyd: a date or time is ISO 8601"), unread.stderr

    assert run(server, "keys", "revoke", key_id).returncode == 0
    revoked = run(server, "authorize", "--key", rotated["secret"], "--model", "gpt-4o")
    assert revoked.returncode == 2 and "key_revoked" in revoked.stdout

    log = server.log()
    assert secret not in log and rotated["secret"] not in log


def test_keys_that_end(server: PolicydProcess) -> None:
    before = time.time() * 1000
    trial = json.loads(run(server, "keys", "create", "--customer", "trial", "--plan", "pro", "--expires-in", "30d",
                           "--json").stdout)
    ends = int(trial["key"]["expires_unix_ms"])
    assert before + 30 * 86_400_000 <= ends <= time.time() * 1000 + 30 * 86_400_000
    assert "(ends " in run(server, "keys", "list").stdout
    shown = run(server, "keys", "expire", trial["key"]["id"], "--expires-at", "2099-01-01T00:00:00Z")
    assert shown.returncode == 0 and "(ends 2099-01-01 00:00:00Z)" in shown.stdout
    never = json.loads(run(server, "keys", "expire", trial["key"]["id"], "--never", "--json").stdout)
    assert "expires_unix_ms" not in never or int(never["expires_unix_ms"]) == 0
    past = run(server, "keys", "expire", trial["key"]["id"], "--expires-at", "2001-01-01")
    assert past.returncode != 0 and "in the future" in past.stderr
    assert run(server, "keys", "expire", trial["key"]["id"]).returncode != 0  # when, or --never, must be said


def test_keys_move_to_another_plan(server: PolicydProcess) -> None:
    created = json.loads(run(server, "keys", "create", "--customer", "mover", "--plan", "free", "--json").stdout)
    run(server, "credit", "grant", "--customer", "mover", "--amount", "5")
    refused = run(server, "authorize", "--key", created["secret"], "--model", "gpt-4o")
    assert refused.returncode == 2 and "model_not_allowed" in refused.stdout
    moved = run(server, "keys", "plan", "pro", "--customer", "mover")
    assert moved.returncode == 0 and created["key"]["id"] in moved.stdout and "pro" in moved.stdout
    assert run(server, "authorize", "--key", created["secret"], "--model", "gpt-4o").returncode == 0
    again = run(server, "keys", "plan", "pro", "--key", created["key"]["id"])
    assert again.returncode == 0 and "no key moved" in again.stdout
    unknown = run(server, "keys", "plan", "platinum", "--key", created["key"]["id"])
    assert unknown.returncode != 0 and "unknown_plan" in unknown.stderr
    assert run(server, "keys", "plan", "pro").returncode != 0  # whose keys must be said


def test_keys_with_limits_of_their_own(server: PolicydProcess) -> None:
    created = json.loads(run(server, "keys", "create", "--customer", "capped", "--plan", "pro",
                             "--limit", "month:money:0.000001", "--json").stdout)
    assert created["key"]["limits"] == [{"window": "month", "unit": "money", "limit": "1000"}]  # nanos
    run(server, "credit", "grant", "--customer", "capped", "--amount", "5")
    refused = run(server, "authorize", "--key", created["secret"], "--model", "gpt-4o-mini")
    assert refused.returncode == 2 and "budget_exceeded" in refused.stdout and "key-money-month" in refused.stdout
    assert "(own limits: 0.000001000 money a month)" in run(server, "keys", "list", "--customer", "capped").stdout
    lifted = run(server, "keys", "limits", created["key"]["id"], "--none")
    assert lifted.returncode == 0 and "own limits" not in lifted.stdout
    assert run(server, "authorize", "--key", created["secret"], "--model", "gpt-4o-mini").returncode == 0
    narrowed = run(server, "keys", "scopes", created["key"]["id"], "--scope", "gpt-4o")
    assert narrowed.returncode == 0 and "(models: gpt-4o)" in narrowed.stdout
    refused = run(server, "authorize", "--key", created["secret"], "--model", "gpt-4o-mini")
    assert refused.returncode == 2 and "model_not_allowed" in refused.stdout
    assert run(server, "keys", "scopes", created["key"]["id"], "--all").returncode == 0
    assert run(server, "authorize", "--key", created["secret"], "--model", "gpt-4o-mini").returncode == 0
    wrong = run(server, "keys", "limits", created["key"]["id"], "--limit", "month:money:lots")
    assert wrong.returncode != 0 and "WINDOW:UNIT:VALUE" in wrong.stderr
    on_one = run(server, "keys", "limits", created["key"]["id"], "--limit", "day:money:0.000001 on gpt-4o, tier:nope")
    assert on_one.returncode != 0 and "invalid_limit" in on_one.stderr and "'tier:nope'" in on_one.stderr
    on_one = run(server, "keys", "limits", created["key"]["id"], "--limit", "day:money:0.000001 on gpt-4o")
    assert on_one.returncode == 0 and "(own limits: 0.000001000 money a day on gpt-4o)" in on_one.stdout
    refused = run(server, "authorize", "--key", created["secret"], "--model", "gpt-4o")
    assert refused.returncode == 2 and "key-money-day[gpt-4o]" in refused.stdout
    for_a_while = run(server, "keys", "limits", created["key"]["id"], "--limit", "month:money:9.00 until 2099-01-01")
    assert for_a_while.returncode == 0 and "9.000000000 money a month until 2099-01-01 00:00 UTC" in for_a_while.stdout
    past = run(server, "keys", "limits", created["key"]["id"], "--limit", "month:money:9.00 until 2001-01-01")
    assert past.returncode != 0 and "invalid_limit" in past.stderr
    assert run(server, "authorize", "--key", created["secret"], "--model", "gpt-4o-mini").returncode == 0


def test_an_owners_limits_from_the_command_line(server: PolicydProcess) -> None:
    keys = [json.loads(run(server, "keys", "create", "--customer", "tenant", "--plan", "pro", "--json").stdout)
            for _ in range(2)]
    run(server, "credit", "grant", "--customer", "tenant", "--amount", "5")
    given = run(server, "limits", "set", "--customer", "tenant", "--limit", "month:money:0.000001")
    assert given.returncode == 0 and "tenant: customer: 0.000001000 money a month (2 keys changed)" in given.stdout
    assert "used: 0.000000000 of 0.000001000 money this month until " in given.stdout  # what it holds already
    for key in keys:  # each of its keys bound
        refused = run(server, "authorize", "--key", key["secret"], "--model", "gpt-4o-mini")
        assert refused.returncode == 2 and "budget_exceeded" in refused.stdout and "customer-money-month" in refused.stdout
    assert "(its owners': customer: 0.000001000 money a month)" in run(server, "keys", "list", "--customer",
                                                                       "tenant").stdout
    team = run(server, "limits", "set", "--customer", "tenant", "--team", "t1", "--limit", "minute:requests:5:60,90")
    assert team.returncode == 0 and "tenant team t1: team: 5 requests a minute (alerts at 60%, 90%) (0 keys changed)" \
        in team.stdout
    listed = run(server, "limits", "list").stdout  # every customer's
    assert "tenant: customer: 0.000001000 money a month" in listed and "tenant team t1" in listed
    assert "used: 0.000000000 of 0.000001000 money this month until " in listed  # refused requests hold nothing
    assert "used: 0 of 5 requests this minute until " in listed
    assert run(server, "limits", "set", "--customer", "tenant", "--none").returncode == 0
    assert run(server, "authorize", "--key", keys[0]["secret"], "--model", "gpt-4o-mini").returncode == 0
    both = run(server, "limits", "set", "--customer", "tenant", "--team", "t", "--project", "p", "--none")
    assert both.returncode != 0 and "not allowed with" in both.stderr
    alice = run(server, "limits", "set", "--customer", "tenant", "--end-user", "alice", "--limit", "day:requests:1")
    assert alice.returncode == 0 and "tenant end_user alice: end_user: 1 requests a day (2 keys changed)" in alice.stdout
    asked = [run(server, "authorize", "--key", keys[0]["secret"], "--model", "gpt-4o-mini", "--end-user", "alice")
             for _ in range(2)]
    assert [a.returncode for a in asked] == [0, 2] and "end_user-requests-day" in asked[1].stdout
    assert run(server, "authorize", "--key", keys[1]["secret"], "--model", "gpt-4o-mini", "--end-user",
               "bob").returncode == 0
    assert run(server, "limits", "set", "--customer", "tenant", "--end-user", "bob", "--limit",
               "day:requests:9").returncode == 0
    hers = run(server, "limits", "list", "--customer", "tenant", "--end-user", "alice").stdout
    assert hers.startswith("tenant end_user alice: end_user: 1 requests a day") and "bob" not in hers
    first = run(server, "limits", "list", "--customer", "tenant", "--scope", "end_user", "--limit", "1").stdout
    assert "tenant end_user alice" in first and "bob" not in first and "(more: --all lists every page)" in first
    both = run(server, "limits", "list", "--customer", "tenant", "--scope", "end_user", "--limit", "1", "--all")
    assert "tenant end_user alice" in both.stdout and "tenant end_user bob" in both.stdout and "more" not in both.stdout
    paused = run(server, "limits", "pause", "--customer", "tenant", "--end-user", "bob")
    assert paused.returncode == 0 and "tenant end_user bob: end_user: 9 requests a day (paused: its requests " \
        "refused) (0 keys changed)" in paused.stdout
    refused = run(server, "authorize", "--key", keys[1]["secret"], "--model", "gpt-4o-mini", "--end-user", "bob")
    assert refused.returncode == 2 and "end_user_paused" in refused.stdout
    resumed = run(server, "limits", "resume", "--customer", "tenant", "--end-user", "bob")
    assert resumed.returncode == 0 and "(paused" not in resumed.stdout
    assert run(server, "authorize", "--key", keys[1]["secret"], "--model", "gpt-4o-mini", "--end-user",
               "bob").returncode == 0


def test_a_limits_window_reset_from_the_command_line(server: PolicydProcess) -> None:
    """A key stopped by its day's request limit is served again once the operator resets it, the reset recorded
    with its reason; a reset that names no limit binding the owner is refused."""
    created = json.loads(run(server, "keys", "create", "--customer", "support", "--plan", "pro",
                             "--limit", "day:requests:1", "--json").stdout)
    run(server, "credit", "grant", "--customer", "support", "--amount", "5")
    secret, key_id = created["secret"], created["key"]["id"]
    assert run(server, "authorize", "--key", secret, "--model", "gpt-4o-mini", "--request-id", "once").returncode == 0
    assert run(server, "settle", "once", "--input-tokens", "10", "--output-tokens", "5").returncode == 0
    refused = run(server, "authorize", "--key", secret, "--model", "gpt-4o-mini")
    assert refused.returncode == 2 and "key-requests-day" in refused.stdout
    reset = run(server, "limits", "reset", "--key", key_id, "--window", "day", "--reason", "ticket 7")
    assert reset.returncode == 0, reset.stderr
    assert f"support key {key_id}: key-requests-day: 1 forgiven, 0 of 1 requests held this day" in reset.stdout
    assert run(server, "authorize", "--key", secret, "--model", "gpt-4o-mini").returncode == 0
    events = json.loads(run(server, "events", "--kind", "admin_action", "--json").stdout)["events"]
    (done,) = [json.loads(e["detail_json"]) for e in events if json.loads(e["detail_json"])["action"] == "limit_reset"]
    assert (done["scope"], done["owner_id"], done["limits"], done["forgiven"], done["reason"]) == (
        "key", key_id, ["key-requests-day"], [1], "ticket 7")
    none = run(server, "limits", "reset", "--customer", "support", "--end-user", "alice")
    assert none.returncode != 0 and "limit_not_found" in none.stderr


def test_caps_from_the_command_line(server: PolicydProcess, tmp_path: Path) -> None:
    """An operator caps OpenAI's daily bill across every customer, sees what the cap holds, and a request
    that would cross it is refused, naming the cap."""
    assert run(server, "caps").stdout.strip() == "no caps in the policy in force"
    capped = tmp_path / "capped.yaml"
    capped.write_text(Path(SAMPLE).read_text() + '\ncaps:\n  - {name: openai-day, provider: openai, window: day, '
                                                  'unit: cost, limit: "LIMIT"}\n')
    capped.write_text(capped.read_text().replace("LIMIT", "1.00"))
    applied = run(server, "apply", "-f", str(capped))
    assert applied.returncode == 0 and "1 limits begin mid-window" in applied.stdout
    for customer in ("one", "two"):
        secret = json.loads(run(server, "keys", "create", "--customer", customer, "--plan", "pro", "--json").stdout)["secret"]
        run(server, "credit", "grant", "--customer", customer, "--amount", "5")
        assert run(server, "authorize", "--key", secret, "--model", "gpt-4o-mini").returncode == 0
    state = json.loads(run(server, "caps", "--json").stdout)["caps"][0]
    held = int(state["used"])
    assert held > 0 and state["limit"] == "1000000000" and state["provider"] == "openai"
    assert run(server, "caps").stdout.startswith(f"openai-day: 0.{held:09d} of 1.000000000 cost this day until ")
    capped.write_text(capped.read_text().replace('limit: "1.00"', f'limit: "0.{held + 1:09d}"'))
    assert run(server, "apply", "-f", str(capped)).returncode == 0
    refused = run(server, "authorize", "--key", secret, "--model", "gpt-4o-mini")
    assert refused.returncode == 2 and "budget_exceeded" in refused.stdout and "openai-day" in refused.stdout
    # the operator forgives what the cap counted of settled requests (those above are in flight: they keep theirs)
    reset = run(server, "caps", "reset", "openai-day", "--reason", "bill checked")
    assert reset.returncode == 0, reset.stderr
    assert re.match(r"0\.\d{9} forgiven; openai-day: 0\.\d{9} of 0\.\d{9} cost this day until ", reset.stdout)
    events = json.loads(run(server, "events", "--kind", "admin_action", "--json").stdout)["events"]
    assert [json.loads(e["detail_json"])["reason"] for e in events
            if json.loads(e["detail_json"])["action"] == "cap_reset"] == ["bill checked"]
    unknown = run(server, "caps", "reset", "nobody")
    assert unknown.returncode != 0 and "unknown_cap" in unknown.stderr


def test_apply_dry_run_and_errors(server: PolicydProcess, tmp_path: Path) -> None:
    changed = tmp_path / "changed.yaml"
    changed.write_text(Path(SAMPLE).read_text().replace('output: "10.00"', 'output: "8.00"'))
    dry = run(server, "apply", "-f", str(changed), "--dry-run")
    assert dry.returncode == 0
    assert "+      output: '8.000000000'" in dry.stdout and "active version stays 1" in dry.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text("currency: USD\nprice_table:\n  version: '1'\n  models: {}\nplans:\n  pro: {modles: []}\n")
    failed = run(server, "apply", "-f", str(broken))
    assert failed.returncode == 1
    assert "invalid_policy" in failed.stderr and "broken.yaml:4" in failed.stderr and "broken.yaml:6" in failed.stderr
    unknown_plan = run(server, "keys", "create", "--customer", "c", "--plan", "gold")
    assert unknown_plan.returncode == 1 and "unknown_plan" in unknown_plan.stderr
    applied = run(server, "apply", "-f", str(changed))
    assert applied.returncode == 0 and "applied: policy version 2" in applied.stdout
    again = run(server, "apply", "-f", str(changed), "--json")
    assert json.loads(again.stdout)["version"] == "2"


def test_embedded_store_rebuilds_counters_from_sqlite_at_start(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'policyd.db'}"
    first = PolicydProcess("", database, policy=SAMPLE, cwd=str(tmp_path))
    try:
        run(first, "credit", "grant", "--customer", "demo", "--amount", "2.50")
        secret = json.loads(run(first, "keys", "create", "--customer", "demo", "--plan", "pro", "--json").stdout)["secret"]
        assert run(first, "authorize", "--key", secret, "--model", "gpt-4o-mini", "--request-id", "keep").returncode == 0
    finally:
        assert first.stop() == 0, first.log()
    second = PolicydProcess("", database, cwd=str(tmp_path))
    try:
        wallet = run(second, "wallet", "demo", "--json")
        data = json.loads(wallet.stdout)
        assert data["balance_nanos"] == "2500000000" and int(data["reserved_nanos"]) > 0
        assert run(second, "settle", "keep", "--input-tokens", "5", "--output-tokens", "5").returncode == 0
        assert run(second, "authorize", "--key", secret, "--model", "gpt-4o-mini").returncode == 0
        assert run(second, "audit").returncode == 0
    finally:
        second.stop()


@pytest.mark.parametrize("setting, says", [
    ("POLICYD_LISTEN", "cannot listen on"), ("POLICYD_ADMIN_LISTEN", "cannot listen on"),
    ("POLICYD_METRICS_LISTEN", "cannot serve /metrics on"), ("POLICYD_DASHBOARD_LISTEN", "cannot serve the dashboard on"),
])
def test_serve_whose_address_is_taken_ends_at_once_saying_why(tmp_path: Path, setting: str, says: str) -> None:
    """An address taken by another process: `policyd serve` exits non-zero with the address named, instead of
    running on without listening (started background loops once kept the process alive, deaf even to SIGTERM)."""
    import os

    from tests.servers import free_port, taken_address

    with taken_address() as (_, address):
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
        env.update(POLICYD_LISTEN=f"127.0.0.1:{free_port()}", POLICYD_DATABASE_URL=f"sqlite:///{tmp_path}/p.db")
        env[setting] = address
        done = subprocess.run([*policyd_command(), "serve", "--policy", SAMPLE], env=env, cwd=str(tmp_path),
                              capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stderr
    assert f"{says} {address}" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("policy, says", [
    ("missing.yaml", "cannot read the policy file {path}: No such file or directory"),
    ("typo.yaml", "invalid policy file: {path}:3: invalid YAML"),
    ("plans.yaml", "invalid policy file: {path}:1: a policy is a mapping with price_table and plans"),
])
def test_serve_with_a_policy_file_it_cannot_apply_ends_at_once_saying_why(tmp_path: Path, policy: str,
                                                                          says: str) -> None:
    """A policy file missing, or not a policy: `policyd serve` ends before it starts anything, with the file and the
    reason in one line (it was a traceback in a JSON field, after the counters' rebuild), and nothing served."""
    import os

    from tests.servers import free_port

    (tmp_path / "typo.yaml").write_text("plans:\n  free: [oops\n")
    (tmp_path / "plans.yaml").write_text("- a list\n")
    path = str(tmp_path / policy)
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env.update(POLICYD_LISTEN=f"127.0.0.1:{free_port()}", POLICYD_DATABASE_URL=f"sqlite:///{tmp_path}/p.db")
    done = subprocess.run([*policyd_command(), "serve", "--policy", path], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert says.format(path=path) in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "policyd serving" not in done.stderr


def test_serve_that_cannot_reach_redis_exits_with_the_error_logged_as_json(tmp_path: Path) -> None:
    """Redis refusing connections at start: `policyd serve` exits non-zero at once, the error one JSON log line
    with its traceback a field (not printed raw), and no drain tried of a service that never started."""
    import os

    from tests.servers import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env.update(POLICYD_LISTEN=f"127.0.0.1:{free_port()}", POLICYD_REDIS_URL="redis://127.0.0.1:1/0",
               POLICYD_DATABASE_URL=f"sqlite:///{tmp_path}/p.db")
    done = subprocess.run([*policyd_command(), "serve"], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]  # every line JSON
    (error,) = [line for line in lines if line["level"] == "ERROR"]
    assert error["message"] == "policyd serve ended on an error" and "127.0.0.1:1" in error["exception"]


def test_serve_told_to_stop_while_it_starts_says_so_and_a_second_signal_stops_it_now(tmp_path: Path) -> None:
    """A start may take long (counters rebuilt from SQL; here a Redis that accepts and never answers): a first
    SIGTERM (Ctrl-C) is said at once and heeded once the start is done, a second cancels the start; it exits 0
    without ever listening, and not by waiting for the start to fail (before: both signals went unheeded)."""
    import os
    import signal
    import socket

    from tests.servers import free_port, taken_address

    with taken_address() as (silent, redis_address):  # a Redis that takes connections and never answers
        silent.settimeout(60)
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
        port = free_port()
        env.update(POLICYD_LISTEN=f"127.0.0.1:{port}", POLICYD_REDIS_URL=f"redis://{redis_address}/0",
                   POLICYD_DATABASE_URL=f"sqlite:///{tmp_path}/p.db")
        serve = subprocess.Popen([*policyd_command(), "serve"], env=env, cwd=str(tmp_path), stderr=subprocess.PIPE,
                                 text=True)
        connection, _ = silent.accept()  # it is starting: its first call to Redis waits
        with connection:
            serve.send_signal(signal.SIGTERM)
            said = serve.stderr.readline()
            while "told to stop while it starts" not in said:
                assert said, "the first signal was not said"
                said = serve.stderr.readline()
            serve.send_signal(signal.SIGTERM)
            rest = serve.communicate(timeout=60)[1]
    assert serve.returncode == 0, rest[-2000:]
    assert "its start cancelled" in rest and "policyd stopped before it served" in rest
    assert "ended on an error" not in rest
    with socket.socket() as probe:  # it never listened
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_finance_commands(server: PolicydProcess, tmp_path: Path) -> None:
    run(server, "credit", "grant", "--customer", "fin", "--amount", "5")
    secret = json.loads(run(server, "keys", "create", "--customer", "fin", "--plan", "pro", "--json").stdout)["secret"]
    assert run(server, "authorize", "--key", secret, "--model", "gpt-4o", "--request-id", "fin-1").returncode == 0
    assert run(server, "settle", "fin-1", "--input-tokens", "1000", "--output-tokens", "100").returncode == 0
    import time

    today = time.strftime("%Y-%m-%d", time.gmtime())
    export = tmp_path / "costs.csv"
    export.write_text(f"date,model,amount\n{today},gpt-4o,0.0035\n")  # 1000 x 2.50 + 100 x 10.00 per 1M
    ok = run(server, "reconcile", "--provider", "openai", "--file", str(export))
    assert ok.returncode == 0 and "matched" in ok.stdout, ok.stdout + ok.stderr
    export.write_text(f"date,model,amount\n{today},gpt-4o,0.0036\n")
    off = run(server, "reconcile", "--provider", "openai", "--file", str(export))
    assert off.returncode == 4 and "mismatched" in off.stdout
    bad = run(server, "reconcile", "--provider", "openai", "--file", str(export), "--tolerance", "abc")
    assert bad.returncode == 1
    period = time.strftime("%Y-%m", time.gmtime())
    invoice = run(server, "invoice", "export", "--customer", "fin", "--period", period)
    assert invoice.returncode == 0 and invoice.stdout.startswith("kind,item,requests")
    assert "line,gpt-4o,1,1000,100,4200000,0.01" in invoice.stdout  # 0.0042 with the 20% markup: 1 cent, rounded up
    closing = run(server, "invoice", "close", "--customer", "fin", "--period", period)
    assert closing.returncode == 1 and "has not ended" in closing.stderr
    unknown = run(server, "invoice", "export", "--customer", "nobody", "--period", period)
    assert unknown.returncode == 1 and "unknown customer" in unknown.stderr


def test_a_charge_made_in_error_is_refunded_from_the_command_line(server: PolicydProcess) -> None:
    run(server, "credit", "grant", "--customer", "wronged", "--amount", "5")
    secret = json.loads(run(server, "keys", "create", "--customer", "wronged", "--plan", "pro", "--json").stdout)["secret"]
    assert run(server, "authorize", "--key", secret, "--model", "gpt-4o", "--request-id", "wrong-1").returncode == 0
    assert run(server, "settle", "wrong-1", "--input-tokens", "1000", "--output-tokens", "100").returncode == 0
    refunded = run(server, "usage", "refund", "wrong-1", "--amount", "0.001", "--note", "priced twice")
    assert refunded.returncode == 0, refunded.stderr
    assert refunded.stdout.startswith("refunded 0.001000000 USD of wrong-1 (refund:wrong-1): wronged: balance "
                                      "4.996800000 USD")  # 5 - 0.0042 + 0.001
    again = run(server, "usage", "refund", "wrong-1")
    assert again.returncode != 0 and "already_refunded" in again.stderr
    listed = json.loads(run(server, "usage", "list", "--customer", "wronged", "--json").stdout)
    (record,) = listed["records"]
    assert (record["request_id"], record["refunded_nanos"]) == ("wrong-1", "1000000")
    invoice = run(server, "invoice", "export", "--customer", "wronged", "--period", time.strftime("%Y-%m", time.gmtime()))
    assert "credit,refund,1,,,1000000,0.01" in invoice.stdout  # listed apart, as every credit is
    shown = json.loads(run(server, "usage", "show", "wrong-1").stdout)  # one request's record, every field
    assert (shown["request_id"], shown["refunded_nanos"], shown["charge"]["nanos"]) == ("wrong-1", "1000000", "4200000")
    missing = run(server, "usage", "show", "wrong-9")
    assert missing.returncode == 1 and "no usage record wrong-9" in missing.stderr
    assert run(server, "authorize", "--key", secret, "--model", "gpt-4o", "--request-id", "wrong-2").returncode == 0
    first_page = run(server, "usage", "list", "--customer", "wronged", "--limit", "1")
    assert "wrong-2" in first_page.stdout and "wrong-1" not in first_page.stdout and "(more: --all lists every page)" in first_page.stdout
    every = json.loads(run(server, "usage", "list", "--customer", "wronged", "--limit", "1", "--all", "--json").stdout)
    assert [r["request_id"] for r in every["records"]] == ["wrong-2", "wrong-1"]
    one = json.loads(run(server, "usage", "list", "--request-id", "wrong-1", "--json").stdout)
    assert [r["request_id"] for r in one["records"]] == ["wrong-1"]
    report = json.loads(run(server, "usage", "report", "--customer", "wronged", "--format", "json").stdout)
    (row,) = report["rows"]
    assert (row["charge_nanos"], row["refunded_nanos"]) == (4_200_000, 1_000_000)  # charges gross, refunds beside


def test_every_log_line_is_json_and_holds_no_secret(server: PolicydProcess) -> None:
    created = json.loads(run(server, "keys", "create", "--customer", "logs", "--plan", "pro", "--json").stdout)
    run(server, "authorize", "--key", created["secret"], "--model", "gpt-4o")
    run(server, "authorize", "--key", created["secret"][:-1] + "x", "--model", "gpt-4o")
    server.stop()
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(entry)
        assert created["secret"][9:] not in line and created["secret"][9:-1] not in line


def test_scoped_admin_credentials_from_the_command_line(server: PolicydProcess) -> None:
    assert run(server, "credit", "grant", "--customer", "shop", "--amount", "5").returncode == 0
    assert run(server, "link-customer", "shop-eu", "--parent", "shop").returncode == 0
    made = json.loads(run(server, "admin-credentials", "create", "--customer", "shop", "--json").stdout)
    secret = made["secret"]
    assert secret.startswith("pdadm_")
    scoped = ["--token", secret]
    assert run(server, "keys", "create", "--customer", "shop-eu", "--plan", "pro", *scoped).returncode == 0
    refused = run(server, "keys", "create", "--customer", "elsewhere", "--plan", "pro", *scoped)
    assert refused.returncode != 0 and "out_of_scope" in refused.stderr
    assert run(server, "credit", "grant", "--customer", "shop", "--amount", "5", *scoped).returncode != 0
    listed = run(server, "admin-credentials", "list")
    assert made["credential"]["id"] in listed.stdout and secret not in listed.stdout
    assert run(server, "admin-credentials", "revoke", made["credential"]["id"]).returncode == 0
    gone = run(server, "keys", "list", *scoped)
    assert gone.returncode != 0 and "unauthenticated" in gone.stderr
    assert secret not in server.log() and secret[6:] not in server.log()
    # who did what: every change recorded once done, by the operator or the credential that made it; the
    # refused ones not at all; no secret in the record
    events = json.loads(run(server, "events", "--kind", "admin_action", "--json").stdout)["events"]
    actions = [(e["customer_id"], json.loads(e["detail_json"])) for e in reversed(events)]
    assert [(c, d["action"], d["by"]) for c, d in actions] == [
        ("shop", "credit_grant", "operator"), ("shop-eu", "customer_link", "operator"),
        ("shop", "credential_create", "operator"), ("shop-eu", "key_create", made["credential"]["id"]),
        ("shop", "credential_revoke", "operator")]
    assert actions[0][1]["amount_nanos"] == 5_000_000_000 and actions[3][1]["key_id"].startswith("key_")
    everything = run(server, "events", "--json").stdout
    assert "pdk_live_" not in everything and "pdadm_" not in everything
    text = run(server, "events", "--kind", "admin_action", "--customer", "shop-eu")
    assert text.returncode == 0 and "customer_link" in text.stdout and "credit_grant" not in text.stdout


def test_gateway_config_names_the_reservation_ttl_a_longer_route_timeout_needs() -> None:
    """A reply may run as long as the route waits; a reservation whose deadline comes first is charged as
    held there and its own usage refused, so a longer route timeout says what the replicas need."""
    longer = subprocess.run([*policyd_command(), "gateway-config", "--route-timeout", "1200"], capture_output=True,
                            text=True, timeout=60)
    assert longer.returncode == 0 and "timeout: 1200s" in longer.stdout
    assert "POLICYD_RESERVATION_TTL_SECONDS of at least 1260" in longer.stderr
    default = subprocess.run([*policyd_command(), "gateway-config"], capture_output=True, text=True, timeout=60)
    assert default.returncode == 0 and default.stderr == ""


def test_a_file_the_command_cannot_read_is_said_in_a_line(tmp_path: Path) -> None:
    """A policy, a provider's export or a TLS file that is not there: one line and exit status 1, not a traceback."""
    missing = str(tmp_path / "missing")
    for args in (["apply", "-f", missing], ["reconcile", "--provider", "openai", "--file", missing],
                 ["wallet", "acme", "--tls-ca", missing]):
        run = subprocess.run([*policyd_command(), *args], capture_output=True, text=True, timeout=60)
        assert (run.returncode, run.stdout, run.stderr) == (1, "", f"policyd: {missing}: No such file or directory\n")


def test_the_command_line_starts_without_loading_the_service() -> None:
    """Each `policyd` command is a process of its own: one that loaded the request parser, the policy models and the
    settings at start (what rendering a gateway config or serving needs) took 0.4 s before doing anything, about
    2.5 times what it takes without them. It loads them where a command needs them."""
    import sys

    loaded = subprocess.run([sys.executable, "-c", "import sys, policyd.cli; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert "policyd.cli" in loaded
    assert not {"policyd.http_api", "policyd.policy", "policyd.settings", "policyd.gateway_config",
                "policyd.engine"} & set(loaded)

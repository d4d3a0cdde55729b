"""Policy loading: strict, with the file and line of every error; versions and diffs."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.domain import PolicydError
from policyd.policy import PolicyError, canonical_text, parse_policy
from policyd.server import Service
from tests.conftest import SAMPLE_POLICY
from tests.helpers import ask, fund, new_key

FIXTURES = Path(__file__).parent / "fixtures" / "policies"


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("bad_yaml.yaml", "bad_yaml.yaml:6: invalid YAML"),
        ("unknown_field.yaml", "unknown_field.yaml:8: price_table.models.gpt-4o.ouput: Extra inputs are not permitted"),
        ("unknown_plan.yaml", "extends unknown plan 'gold'"),
        ("float_price.yaml", "float_price.yaml:7: price_table.models.gpt-4o.input: 1E-10 has more than 9 decimals"),
        ("unknown_downgrade.yaml", "downgrade_to 'gpt-3' is not in the price table"),
        ("unknown_image_generation_model.yaml", "image_generation_model 'gpt-image-9' is not in the price table"),
        ("unknown_model_pattern.yaml", "model 'claude-*' matches nothing"),
        ("pattern_upstream_model.yaml", "a pattern prices many models, each sent by its own name: it takes no upstream_model"),
        ("negative_price.yaml", "negative_price.yaml:5: price_table.models.gpt-4o.input: a price or amount must not be negative"),
        ("bad_environment.yaml", "bad_environment.yaml:9: plans.pro.environments: unknown environment 'prod'"),
        ("unknown_time_zone.yaml", "unknown_time_zone.yaml:10: plans.pro.limits.0: unknown time zone 'Europe/Pariss'"),
        ("time_zone_of_an_hour.yaml", "time_zone_of_an_hour.yaml:11: plans.pro.limits.0: timezone is for day and month"),
    ],
)
def test_bad_policies_name_the_file_line_and_reason(fixture: str, expected: str) -> None:
    with pytest.raises(PolicyError) as error:
        parse_policy((FIXTURES / fixture).read_text(), fixture)
    assert expected in str(error.value)


def test_a_limit_keeps_its_own_time_zone_and_the_rest_take_the_policys() -> None:
    text = (FIXTURES / "time_zone_of_an_hour.yaml").read_text().replace(
        "{name: hourly, scope: key, window: hour, unit: requests, limit: 100, timezone: Asia/Kolkata}",
        "{name: monthly, scope: key, window: month, unit: requests, limit: 100, timezone: UTC}\n"
        "      - {name: daily, scope: key, window: day, unit: requests, limit: 10}\n"
        "      - {name: hourly, scope: key, window: hour, unit: requests, limit: 5}")
    document = parse_policy(text)
    zones = {limit.name: limit.timezone for limit in document.plans["pro"].limits}
    assert zones == {"hourly": "", "daily": "Asia/Kolkata", "monthly": "UTC"}
    assert parse_policy(canonical_text(document)) == document
    with pytest.raises(PolicyError, match="timezone: unknown time zone 'Mars/Olympus'"):
        parse_policy(text.replace("timezone: Asia/Kolkata\n", "timezone: Mars/Olympus\n", 1))


def test_canonical_text_round_trips() -> None:
    document = parse_policy(SAMPLE_POLICY)
    again = parse_policy(canonical_text(document))
    assert again == document
    assert document.plans["internal-staging"].billing == "at_cost"
    assert document.plans["internal-staging"].limits == document.plans["pro"].limits


def test_a_policy_reads_as_before_unless_its_limits_name_models() -> None:
    """The canonical text a version's digest is taken of: a limit on every model, for good, reads as it did before
    limits could name models or an end (the same policy, the same version); one on some models names them, and
    round-trips."""
    text = canonical_text(parse_policy(SAMPLE_POLICY))
    assert "models: []" not in text and "until_unix_ms" not in text and "key-rpm" in text
    on_premium = SAMPLE_POLICY.replace("window: day, unit: money, limit: \"50.00\",",
                                       "window: day, unit: money, limit: \"50.00\", models: [\"tier:premium\"],")
    document = parse_policy(on_premium)
    assert document.plans["pro"].limits[-1].models == ("tier:premium",)
    assert parse_policy(canonical_text(document)) == document and "- tier:premium" in canonical_text(document)


async def test_apply_versions_dry_run_and_atomicity(service: Service) -> None:
    assert service.book.current.version == 1
    unchanged = await service.admin.apply_policy(SAMPLE_POLICY, "same.yaml")
    assert (unchanged.version, unchanged.changed, unchanged.diff) == (1, False, "")
    cheaper = SAMPLE_POLICY.replace('output: "10.00"', 'output: "8.00"')
    dry = await service.admin.apply_policy(cheaper, "cheaper.yaml", dry_run=True)
    assert dry.version == 1 and not dry.changed
    assert "-      output: '10.000000000'" in dry.diff and "+      output: '8.000000000'" in dry.diff
    assert service.book.current.version == 1
    with pytest.raises(PolicydError) as error:
        await service.admin.apply_policy((FIXTURES / "unknown_field.yaml").read_text(), "unknown_field.yaml")
    assert error.value.reason == "invalid_policy" and "unknown_field.yaml:8" in error.value.message
    assert service.book.current.version == 1  # nothing partial was applied
    applied = await service.admin.apply_policy(cheaper, "cheaper.yaml")
    assert (applied.version, applied.changed) == (2, True)
    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    assert (await service.engine.authorize(ask(secret))).policy_version == 2


async def test_policy_that_drops_a_plan_in_use_is_refused(service: Service) -> None:
    await new_key(service, plan="free", customer="x")
    without_free = SAMPLE_POLICY.split("  free:")[0] + "  pro:" + SAMPLE_POLICY.split("  pro:")[1]
    with pytest.raises(PolicydError, match="plans used by keys are missing: free"):
        await service.admin.apply_policy(without_free, "nofree.yaml")
    assert service.book.current.version == 1


async def test_another_replica_picks_up_a_new_version(redis_server, postgres_server) -> None:
    """Replicas share only Redis and SQL (the embedded store is one process, so this needs real parts)."""
    from tests.conftest import make_settings

    backend = {"redis_url": redis_server.url, "database_url": postgres_server.create_database("replicas")}
    await _flush(redis_server.url)
    service = await Service.build(make_settings(backend))
    await service.start()
    await service.admin.apply_policy(SAMPLE_POLICY, "sample.yaml")
    other = await Service.build(make_settings(backend))
    await other.start()
    try:
        assert other.book.current.version == 1
        await service.admin.apply_policy(SAMPLE_POLICY.replace('output: "10.00"', 'output: "9.00"'), "v2.yaml")
        await other.book.refresh()
        assert other.book.current.version == 2
    finally:
        await other.close()
        await service.close()


async def _flush(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    await client.flushall()
    await client.aclose()


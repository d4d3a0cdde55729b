"""The shipped deployment files stay consistent with the code."""

from __future__ import annotations

import json
import re

import yaml

from policyd import metrics
from tests.conftest import ROOT


def test_grafana_dashboard_queries_metrics_that_exist() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "policyd.json").read_text())
    exported = {m.name for m in metrics.REGISTRY.collect()}
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"policyd_[a-z_]+", target["expr"])}
    assert used
    for name in used:
        base = re.sub(r"_(bucket|total|count|sum)$", "", name)
        assert base in exported, f"{name} is not a metric policyd exports"


def test_kubernetes_example_parses_and_wires_the_sidecar() -> None:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "policyd-sidecar.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    env = {e["name"] for e in containers["policyd"]["env"]}
    assert {"POLICYD_REDIS_URL", "POLICYD_DATABASE_URL", "POLICYD_ADMIN_TOKEN", "POLICYD_METRICS_LISTEN"} <= env
    assert containers["policyd"]["readinessProbe"]["grpc"]["port"] == 50051
    from policyd.settings import Settings

    # the pod outlasts policyd's own wait for the replies still passing (else they are cut, then charged as held)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > Settings.model_fields["shutdown_grace_seconds"].default
    for name in env:
        if name.startswith("POLICYD_"):
            assert name.removeprefix("POLICYD_").lower() in Settings.model_fields, name

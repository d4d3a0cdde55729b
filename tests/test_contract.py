"""The contract and the schema: generated code is fresh, migrations match the models."""

from __future__ import annotations

import filecmp
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    gen_proto.generate(tmp_path)
    fresh = tmp_path
    committed = gen_proto.PACKAGE_DIR
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert "policy_pb2_grpc.py" in names, "the generator produced nothing"
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    stale = [n for n in names if not filecmp.cmp(fresh / n, committed / n, shallow=False)]
    assert not stale, f"run `make proto`: stale generated files {stale}"


def test_migrations_match_models(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from policyd.db import migrate

    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate(url)
    config = Config()
    config.set_main_option("script_location", str(ROOT / "policyd" / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    command.check(config)  # raises when the models have changes no migration makes


def test_migrations_run_on_postgres(postgres_server) -> None:
    from sqlalchemy import create_engine, inspect

    from policyd.db import migrate

    url = postgres_server.create_database("migrations")
    migrate(url)
    migrate(url)  # a second run is a no-op
    engine = create_engine(url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"api_keys", "policy_versions", "usage_records", "ledger_entries", "events", "alembic_version"} <= tables


def test_no_float_in_the_contract() -> None:
    for proto in (ROOT / "proto").rglob("*.proto"):
        code = "\n".join(line.split("//")[0] for line in proto.read_text().splitlines())
        assert " double " not in code and " float " not in code, proto


def test_readme_configuration_reference_is_generated_from_the_settings_model() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_config_reference
    finally:
        sys.path.pop(0)
    from policyd.settings import Settings

    readme = (ROOT / "README.md").read_text()
    assert gen_config_reference.render(readme) == readme, "run `make docs`: the README's configuration table is stale"
    for name in Settings.model_fields:
        assert f"`POLICYD_{name.upper()}`" in readme

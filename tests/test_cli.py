"""The her2low command: configuration errors name their variable; no start on an old schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from her2low.core.settings import ConfigurationError, load_settings


def _her2low(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "her2low", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_show_lists_every_setting_with_a_description(tmp_path: Path) -> None:
    result = _her2low("config", "--show", "--json", env={"HER2LOW_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    names = {row["variable"] for row in rows}
    assert {
        "HER2LOW_NODE_AE_TITLE",
        "HER2LOW_CDS_TRUSTED_ISSUERS",
        "HER2LOW_CDS_PUBLIC_BASE_URL",
        "HER2LOW_QUEUE_URL",
        "HER2LOW_NODE_PORT",
    } <= names
    assert all(row["description"] for row in rows)


def test_secret_values_are_masked(tmp_path: Path) -> None:
    result = _her2low(
        "config",
        "--show",
        "--json",
        env={"HER2LOW_HOME": str(tmp_path), "HER2LOW_RESULTS_API_TOKEN": "s3cret-value"},
    )
    assert "s3cret-value" not in result.stdout


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HER2LOW_NODE_PORT", "eleven"),
        ("HER2LOW_CDS_TRUSTED_ISSUERS", "{not json"),
        ("HER2LOW_NODE_AE_TITLE", "A" * 17),
    ],
)
def test_invalid_value_names_its_variable(tmp_path: Path, variable: str, value: str) -> None:
    result = _her2low("config", "--show", env={"HER2LOW_HOME": str(tmp_path), variable: value})
    assert result.returncode == 2
    assert variable in result.stderr


def test_toml_file_is_read_and_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "her2low.toml"
    config.write_text('node_ae_title = "FROMTOML"\nnode_port = 11200\n')
    monkeypatch.setenv("HER2LOW_CONFIG", str(config))
    monkeypatch.setenv("HER2LOW_NODE_PORT", "11300")
    settings = load_settings()
    assert settings.node_ae_title == "FROMTOML" and settings.node_port == 11300


def test_load_settings_raises_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HER2LOW_CDS_PORT", "-x")
    with pytest.raises(ConfigurationError, match="HER2LOW_CDS_PORT"):
        load_settings()


def test_node_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    result = _her2low("node", env={"HER2LOW_HOME": str(tmp_path)})
    assert result.returncode == 3
    assert "her2low db upgrade" in result.stderr


def test_db_upgrade_then_node_database_is_current(tmp_path: Path) -> None:
    from dicom_node.db import MIGRATIONS

    result = _her2low("db", "upgrade", env={"HER2LOW_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    MIGRATIONS.check_current(f"sqlite:///{tmp_path / 'node.db'}")


def test_logs_carry_no_patient_fields() -> None:
    import logging

    from her2low.core.logs import JsonFormatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "stored", None, None)
    record.patient_name = "DOE^JANE"
    record.series_uid = "1.2.3"
    record.access_token = "eyJ..."
    line = json.loads(JsonFormatter().format(record))
    assert line["series_uid"] == "1.2.3"
    assert "patient_name" not in line and "access_token" not in line


def test_model_schema_json_lists_every_feature(tmp_path: Path) -> None:
    result = _her2low("model", "schema", "--json", env={"HER2LOW_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    features = {f["name"]: f for f in json.loads(result.stdout)["features"]}
    assert features["mass_shape"]["kind"] == "categorical"
    assert set(features["mass_shape"]["values"]) == {"oval", "round", "irregular"}
    assert features["mass_shape"]["applies_to"] == ["mass"]
    assert features["dapp_median"]["kind"] == "numeric"
    assert features["dapp_median"]["unit"] == "mm2/s" and len(features["dapp_median"]["range"]) == 2
    assert len([f for f in features.values() if f["kind"] == "numeric"]) == 21


def test_model_list_shows_the_reference_variants(tmp_path: Path) -> None:
    result = _her2low("model", "list", env={"HER2LOW_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    for variant in ("combined", "descriptors", "quantitative"):
        assert f"her2low-reference 0.1.0 {variant} reference" in result.stdout


def test_config_rows_name_their_component() -> None:
    from her2low.core.settings import SECTIONS, describe, load_settings

    rows = {row["variable"]: row["section"] for row in describe(load_settings())}
    assert rows["HER2LOW_HOME"] == "floor" and rows["HER2LOW_NODE_PORT"] == "node"
    assert rows["HER2LOW_QUEUE_URL"] == "worker" and rows["HER2LOW_CDS_PORT"] == "service"
    assert rows["HER2LOW_MODEL_DIR"] == "model"
    assert set(rows.values()) <= set(SECTIONS)


def test_busy_port_is_named_with_its_setting(tmp_path: Path) -> None:
    import socket

    from her2low.up import busy_ports
    from tests.conftest import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(
            home=tmp_path, cds_host="127.0.0.1", cds_port=port, node_port=free_port()
        )
        assert busy_ports(settings) == [f"port {port} (HER2LOW_CDS_PORT) is already in use"]
    assert busy_ports(settings) == []


def test_demo_key_is_trusted_beside_configured_issuers(tmp_path: Path) -> None:
    from her2low import demo_ehr
    from her2low.up import trusted_issuers

    settings = load_settings(home=tmp_path, cds_trusted_issuers={"https://ehr.test": "/k.json"})
    issuers = trusted_issuers(settings, demo=True)
    assert issuers is not None
    assert issuers["https://ehr.test"] == "/k.json" and demo_ehr.ISSUER in issuers
    assert trusted_issuers(settings, demo=False) is None


def test_concurrent_demo_runs_each_write_their_own_folder(tmp_path: Path) -> None:
    """`her2low demo` while up's demo is still writing: no FileExistsError, one study."""
    from concurrent.futures import ThreadPoolExecutor

    from her2low.demo import demo_study

    settings = load_settings(home=tmp_path)
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda seed: demo_study(settings, seed), [7, 7]))
    assert all((f / "manifest.json").exists() for f in folders)
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["study-seed7"]


def test_demo_token_is_signed_by_the_demo_key_for_the_hook(tmp_path: Path) -> None:
    import jwt

    from her2low import demo_ehr

    result = _her2low(
        "demo",
        "token",
        env={"HER2LOW_HOME": str(tmp_path), "HER2LOW_CDS_PUBLIC_BASE_URL": "http://h.test:81"},
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), options={"verify_signature": False})
    assert claims["iss"] == demo_ehr.ISSUER
    assert claims["aud"] == "http://h.test:81/cds-services/her2low-mri"

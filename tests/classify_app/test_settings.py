"""Settings come from CLASSIFY_* variables, typed and checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from classify_app.settings import Settings, SettingsError
from classify_app.worker import faust_options


def test_defaults_run_on_a_laptop() -> None:
    settings = Settings.from_env({})
    assert settings.broker == "kafka://localhost:9092"
    assert settings.profile == "production"
    assert not settings.is_local


def test_variables_are_converted_to_the_field_types() -> None:
    settings = Settings.from_env(
        {"CLASSIFY_BATCH_MAX_SIZE": "32", "CLASSIFY_DOWNLOAD_TIMEOUT_S": "2.5"}
    )
    assert settings.batch_max_size == 32
    assert settings.download_timeout_s == 2.5
    assert "CLASSIFY_BATCH_MAX_SIZE=32" in settings.describe()


@pytest.mark.parametrize(
    "environ",
    [
        {"CLASSIFY_PARTITIONS": "many"},
        {"CLASSIFY_PARTITIONS": "0"},
        {"CLASSIFY_PROFILE": "staging"},
        {"CLASSIFY_ANNOUNCE_AFTER_S": "-1"},
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="CLASSIFY_"):
        Settings.from_env(environ)


def test_broker_workarounds_apply_only_to_the_local_profile() -> None:
    production = faust_options(Settings.from_env({}))
    local = faust_options(Settings.from_env({"CLASSIFY_PROFILE": "local"}))
    assert "recovery_consistency_check" not in production
    assert production["web_bind"] == "0.0.0.0"
    assert local["recovery_consistency_check"] is False
    assert local["producer_max_batch_size"] == 1
    assert production["producer_max_batch_size"] == 16384 and production["producer_linger"] == 0
    assert local["broker_session_timeout"] == 6
    assert local["web_bind"] == "127.0.0.1"


def test_producer_batches_are_set_in_bytes_and_milliseconds() -> None:
    options = faust_options(
        Settings.from_env(
            {
                "CLASSIFY_PROFILE": "local",
                "CLASSIFY_PRODUCER_BATCH_BYTES": "65536",
                "CLASSIFY_PRODUCER_LINGER_MS": "5",
            }
        )
    )
    assert options["producer_max_batch_size"] == 65536
    assert options["producer_linger"] == 0.005
    with pytest.raises(SettingsError, match="CLASSIFY_PRODUCER_LINGER_MS must not be negative"):
        Settings(producer_linger_ms=-1).validate()


def test_booleans_and_a_disabled_store() -> None:
    settings = Settings.from_env(
        {"CLASSIFY_MONGO_MIGRATE_ON_START": "no", "CLASSIFY_MONGO_URI": ""}
    )
    assert settings.mongo_migrate_on_start is False
    assert not settings.mongo_enabled
    with pytest.raises(SettingsError, match="CLASSIFY_MONGO_MIGRATE_ON_START"):
        Settings.from_env({"CLASSIFY_MONGO_MIGRATE_ON_START": "maybe"})


def test_the_start_up_log_hides_the_database_password() -> None:
    settings = Settings.from_env({"CLASSIFY_MONGO_URI": "mongodb://app:s3cret@db:27017/?tls=true"})
    assert "s3cret" not in settings.describe()
    assert "CLASSIFY_MONGO_URI=mongodb://app:***@db:27017/?tls=true" in settings.describe()


def test_secrets_are_read_from_files_and_never_printed(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret-pw\n")
    settings = Settings.from_env(
        {
            "CLASSIFY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "CLASSIFY_KAFKA_USERNAME": "classify",
            "CLASSIFY_KAFKA_PASSWORD_FILE": str(secret),
            "CLASSIFY_API_TOKEN": "t0ken",
        }
    )
    assert settings.kafka_password == "s3cret-pw"
    described = settings.describe()
    assert "s3cret-pw" not in described and "t0ken" not in described
    assert "CLASSIFY_KAFKA_PASSWORD=***" in described
    with pytest.raises(SettingsError, match="not both"):
        Settings.from_env(
            {"CLASSIFY_KAFKA_PASSWORD": "x", "CLASSIFY_KAFKA_PASSWORD_FILE": str(secret)}
        )
    with pytest.raises(SettingsError, match="cannot be read"):
        Settings.from_env({"CLASSIFY_API_TOKEN_FILE": str(tmp_path / "missing")})


def test_kafka_security_settings_are_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="SASL_MECHANISM"):
        Settings(kafka_sasl_mechanism="GSSAPI").validate()
    with pytest.raises(SettingsError, match="USERNAME"):
        Settings(kafka_sasl_mechanism="PLAIN").validate()
    with pytest.raises(SettingsError, match="is not a file"):
        Settings(kafka_tls=True, kafka_ca_file=str(tmp_path / "nope.pem")).validate()


def test_faust_reads_none_of_the_environment_and_production_defaults_are_safe() -> None:
    options = faust_options(Settings())
    assert options["env"] == {} and options["topic_replication_factor"] == 3
    assert faust_options(Settings(profile="local"))["topic_replication_factor"] == 1
    assert Settings().creates_input_topic is False and Settings(profile="local").creates_input_topic
    assert options["web_tables_enabled"] is False and options["web_router_enabled"] is False
    assert "consumer_group_instance_id" not in options
    assert faust_options(Settings(group_instance_id="classify-2"))[
        "consumer_group_instance_id"
    ] == ("classify-2")

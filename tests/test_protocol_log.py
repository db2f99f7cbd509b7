"""The protocol log's rollover and redaction, and the settings value parser."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from popguard.cli.popsettings import OPTION_TO_FIELD, option_name, parse_value
from popguard.directory.settings import PopSettings, RollOver
from popguard.services.protocol_log import FIELDS, ProtocolLog, ProtocolLogConfig, ProtocolLogRecord


def record(command: str, parameters: str, sequence: int = 1) -> ProtocolLogRecord:
    return ProtocolLogRecord(
        "abc", sequence, "127.0.2.1:1110", "127.0.0.1:5000", "u@example.test", 1.4, 10, 20,
        command, parameters,
    )  # fmt: skip


def test_rolls_over_when_a_file_reaches_its_quota(tmp_path: Path) -> None:
    log = ProtocolLog("POP3BE")
    log.configure(ProtocolLogConfig(True, tmp_path, RollOver.DAILY, size_quota=1000))
    for sequence in range(60):
        log.write(record("STAT", "", sequence))
    log.close()
    files = sorted(tmp_path.glob("POP3BE*.LOG"))
    assert len(files) >= 3
    assert [f.name.rsplit("-", 1)[1] for f in files[:3]] == ["1.LOG", "2.LOG", "3.LOG"]
    for path in files:
        text = path.read_text()
        assert text.startswith("#Software: popguard")
        assert f"#Fields: {','.join(FIELDS)}" in text
        assert path.stat().st_size < 1000 + 200


def test_disabled_log_writes_nothing(tmp_path: Path) -> None:
    log = ProtocolLog("POP3BE")
    log.configure(ProtocolLogConfig(False, tmp_path, RollOver.HOURLY, 0))
    log.write(record("STAT", ""))
    assert not list(tmp_path.iterdir())


def test_secrets_are_redacted_even_if_a_caller_forgets(tmp_path: Path) -> None:
    log = ProtocolLog("POP3BE")
    log.configure(ProtocolLogConfig(True, tmp_path, RollOver.MONTHLY, 0))
    log.write(record("PASS", "hunter2"))
    log.write(record("AUTH", "PLAIN AGFsaWNlAGh1bnRlcjI="))
    log.close()
    text = next(tmp_path.glob("POP3BE*.LOG")).read_text()
    assert "hunter2" not in text and "AGFsaWNl" not in text
    assert ",PASS,****," in text and ",AUTH,PLAIN ****," in text


def test_every_setting_has_an_option() -> None:
    assert set(OPTION_TO_FIELD.values()) == set(PopSettings.model_fields)
    assert option_name("MaxConnectionFromSingleIP") == "max-connection-from-single-ip"
    assert option_name("X509CertificateName") == "x509-certificate-name"
    assert OPTION_TO_FIELD["protocol-logging-enabled"] == "ProtocolLogEnabled"


@given(st.integers(0, 30), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_timespans_parse_to_seconds(days: int, hours: int, minutes: int, seconds: int) -> None:
    text = f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    if days:
        text = f"{days}.{text}"
    expected = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    assert parse_value("AuthenticatedConnectionTimeout", text) == expected


@given(st.integers(0, 10**6), st.sampled_from(["", "B", "KB", "MB", "GB", "kb", "Mb"]))
def test_sizes_parse_to_bytes(number: int, unit: str) -> None:
    factor = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[unit.upper()]
    assert parse_value("LogPerFileSizeQuota", f"{number}{unit}") == number * factor


@given(st.text(max_size=30))
def test_any_text_is_a_value_or_a_clear_error(text: str) -> None:
    from popguard.errors import UserError

    for field in ("ProtocolLogEnabled", "LogPerFileSizeQuota", "PreAuthenticatedConnectionTimeout"):
        try:
            value = parse_value(field, text)
            PopSettings().with_changes({field: value})
        except UserError as exc:
            assert field in str(exc)

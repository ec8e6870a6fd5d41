from __future__ import annotations

import pytest
import structlog
from structlog.testing import capture_logs

from enclave_keys import log
from enclave_keys.log import configure_logging, redact_bytes


def test_redact_bytes_replaces_every_bytes_like_value() -> None:
    secret = bytes(range(32))
    event = {
        "event": "round_key_created",
        "round_id": "e3:1",
        "raw": secret,
        "buf": bytearray(secret),
        "view": memoryview(secret),
        "many": [secret, "ok"],
    }
    out = redact_bytes(None, "info", dict(event))
    assert out["round_id"] == "e3:1"
    assert out["raw"] == "<32 bytes redacted>"
    assert out["buf"] == "<32 bytes redacted>"
    assert out["view"] == "<32 bytes redacted>"
    assert out["many"] == ["<32 bytes redacted>", "ok"]
    assert secret.hex() not in repr(out)


def test_redaction_runs_inside_a_structlog_chain() -> None:
    with capture_logs(processors=[redact_bytes]) as logs:
        structlog.get_logger("t").info("wrapped", blob=b"\x01\x02\x03")
    assert logs == [{"event": "wrapped", "blob": "<3 bytes redacted>", "log_level": "info"}]


@pytest.mark.parametrize("cache", [True, False])
def test_configure_logging_caches_loggers_as_asked(cache: bool) -> None:
    configure_logging(cache=cache)
    assert structlog.get_config()["cache_logger_on_first_use"] is cache


def test_configure_logging_caches_by_default_outside_the_test_suite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(log, "CACHE_LOGGERS_DEFAULT", True)  # what a node process has
    configure_logging()
    assert structlog.get_config()["cache_logger_on_first_use"] is True

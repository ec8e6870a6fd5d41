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


def test_redact_bytes_looks_into_maps_sets_and_nested_containers() -> None:
    secret = bytes(range(32))
    event = {
        "detail": {"share": secret, "n": 1},
        "nested": [("a", [secret])],
        "keys": {secret: "by key"},
        "set": {secret},
        "deep": [[[[[[[[[[secret]]]]]]]]]],
        "plain": {"round_id": "e3:1"},
    }
    plain = event["plain"]
    out = redact_bytes(None, "info", dict(event))
    assert out["detail"] == {"share": "<32 bytes redacted>", "n": 1}
    assert out["nested"] == [["a", ["<32 bytes redacted>"]]]
    assert out["keys"] == {"<32 bytes redacted>": "by key"}
    assert out["set"] == ["<32 bytes redacted>"]
    assert out["plain"] is plain  # nothing to redact: left as it was
    assert secret.hex() not in repr(out)
    assert repr(secret) not in repr(out)


def test_fields_bound_in_context_are_redacted_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(json=True, cache=False)
    secret = bytes(range(0xA0, 0xC0))
    with structlog.contextvars.bound_contextvars(round_key=secret):
        structlog.get_logger("t").info("bound")
    line = capsys.readouterr().err
    assert '"round_key": "<32 bytes redacted>"' in line
    assert secret.hex() not in line
    assert "\\xa0" not in line


def test_a_container_inside_itself_is_redacted_once() -> None:
    """A list that holds itself eight times: looked into once, not 8**8 times."""
    looped: list[object] = [b"\x01" * 4]
    looped.extend([looped] * 8)
    out = redact_bytes(None, "info", {"looped": looped})
    assert out["looped"][0] == "<4 bytes redacted>"
    assert out["looped"][1:] == ["<list not looked into: redacted>"] * 8


def test_a_wide_value_is_looked_into_within_a_budget() -> None:
    secret = bytes(range(32))
    wide = [[[secret] * 30] * 30] * 30  # 27,000 leaves, shared
    out = redact_bytes(None, "info", {"wide": wide})
    assert secret.hex() not in repr(out)
    assert repr(secret) not in repr(out)


def test_redacted_map_keys_lose_no_entry() -> None:
    event = {"by_id": {1: b"\x00" * 32, "1": "other", b"a" * 4: "x", b"b" * 4: "y"}}
    out = redact_bytes(None, "info", dict(event))
    assert out["by_id"] == {
        1: "<32 bytes redacted>",
        "1": "other",
        "<4 bytes redacted>": "x",
        "<4 bytes redacted> #2": "y",
    }

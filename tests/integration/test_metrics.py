"""/metrics and request ids through the real FastAPI app on a real store."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from mailkms.api import create_app, create_http_app
from tests.conftest import make_csr, transport_pem


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{series} not in /metrics"
    return float(match.group(1))


def test_metrics_count_issuance_refusals_and_outbox(services, clock) -> None:  # type: ignore[no-untyped-def]
    client = TestClient(create_app(services))
    before = client.get("/metrics").text
    issued_before = _value(before, 'mailkms_certificates_issued_total{kind="signing"}')
    # The counters are process-global and earlier tests raised them: compare with a delta.
    used = 'mailkms_refusals_total{action="enrolment",reason="token-used"}'
    refused_before = _value(before, used) if used in before else 0.0
    assert _value(before, "mailkms_outbox_depth") == 0

    token = services.users.add("m@example.org", "", None, "admin:test")
    csr, _ = make_csr("m@example.org")
    pem, _, _ = transport_pem()
    ok = client.post(
        "/api/v1/enrolments",
        json={"mailbox": "m@example.org", "token": token, "csr": csr.decode(), "transport_certificate": pem},
    )
    assert ok.status_code == 202, ok.text
    refused = client.post(
        "/api/v1/enrolments",
        json={"mailbox": "m@example.org", "token": token, "csr": csr.decode(), "transport_certificate": pem},
        headers={"X-Request-ID": "req-42"},
    )
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "req-42"
    clock.advance(__import__("datetime").timedelta(seconds=90))

    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert _value(text, 'mailkms_certificates_issued_total{kind="signing"}') == issued_before + 1
    assert _value(text, used) == refused_before + 1
    assert _value(text, "mailkms_outbox_depth") == 1  # the delivery mail, not yet sent
    assert _value(text, "mailkms_outbox_oldest_age_seconds") == 90
    assert "mailkms_keypool_size" in text and "mailkms_http_request_seconds_count" in text
    # A made-up or unsafe request id is replaced by one of ours.
    echoed = client.get("/healthz", headers={"X-Request-ID": "bad id\nwith newline"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", echoed)


def test_metrics_stay_off_plain_http_unless_configured(services) -> None:  # type: ignore[no-untyped-def]
    assert TestClient(create_http_app(services)).get("/metrics").status_code == 404


def _with_metrics(services, **metrics):  # type: ignore[no-untyped-def]
    from mailkms.services import Services

    settings = services.settings.model_copy(update={"metrics": services.settings.metrics.model_copy(update=metrics)})
    return Services.build(settings, services.clock, db=services.db)


def test_metrics_token_is_required_when_configured(services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    locked = _with_metrics(services, token="s3cret-metrics-token")
    client = TestClient(create_app(locked))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-metrics-token"}):
        refused = client.get("/metrics", headers=headers)
        assert refused.status_code == 401, headers
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"].endswith(":metrics-token")
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "mailkms_" not in refused.text
    ok = client.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics-token"})
    assert ok.status_code == 200 and "mailkms_ocsp_cache_bytes" in ok.text
    # From a file (first line), which wins over the inline token.
    (tmp_path / "token").write_text("from-the-file\n")
    filed = TestClient(create_app(_with_metrics(services, token="inline", token_file=str(tmp_path / "token"))))
    assert filed.get("/metrics", headers={"Authorization": "Bearer inline"}).status_code == 401
    assert filed.get("/metrics", headers={"Authorization": "Bearer from-the-file"}).status_code == 200


def test_metrics_listen_moves_metrics_off_the_api_ports(services) -> None:  # type: ignore[no-untyped-def]
    from mailkms.api import create_metrics_app

    moved = _with_metrics(services, listen="127.0.0.1:9464")
    assert TestClient(create_app(moved)).get("/metrics").status_code == 404
    with_http = moved.settings.model_copy(
        update={"server": moved.settings.server.model_copy(update={"metrics_on_http": True})}
    )
    from mailkms.services import Services

    assert (
        TestClient(create_http_app(Services.build(with_http, services.clock, db=services.db)))
        .get("/metrics")
        .status_code
        == 404
    )
    only = TestClient(create_metrics_app(moved))
    assert only.get("/metrics").status_code == 200
    assert only.get("/api/v1/server").status_code == 404 and only.get("/ocsp/AA").status_code == 404
    # Default: today's behaviour, /metrics on the HTTPS app for anyone.
    assert TestClient(create_app(services)).get("/metrics").status_code == 200


def test_metrics_listen_must_be_host_and_port() -> None:
    import pytest
    from pydantic import ValidationError

    from mailkms.config import MetricsConfig

    for bad in ("9464", "localhost", ":9464", "127.0.0.1:99999", "127.0.0.1:http"):
        with pytest.raises(ValidationError):
            MetricsConfig(listen=bad)
    assert MetricsConfig(listen="[::1]:9464").listen_address == ("::1", 9464)

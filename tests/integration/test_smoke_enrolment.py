"""Enrolment through the services on a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest

from mailkms.errors import TokenUsed
from tests.conftest import make_csr, transport_pem


def test_enrol_issues_pair_and_queues_one_mail(services) -> None:
    token = services.users.add("alice@example.org", "Alice", None, "admin:test")
    csr, _ = make_csr("alice@example.org")
    pem, _, _ = transport_pem()
    accepted = services.enrolment.enrol("alice@example.org", token, csr, pem)
    assert accepted.generation == 1
    view = services.users.show("alice@example.org")
    assert view.state.value == "ACTIVE"
    assert {c.kind for c in view.certificates} == {"signing", "encryption"}
    with pytest.raises(TokenUsed):
        services.enrolment.enrol("alice@example.org", token, csr, pem)
    assert services.verify_audit().ok

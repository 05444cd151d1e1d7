"""The console's approval pages in process: only officers (and superusers) start or approve, at
the server (403), CSRF required, a mailbox with nothing archived refused before any officer works.
The two-officer recovery itself: tests/e2e/test_console_approvals.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from mailkms.api import create_app
from mailkms.errors import RoleForbidden
from mailkms.services import Principal, Role
from tests.integration.test_admin_api import _admin, _login


def test_only_officers_start_or_approve(services, clock) -> None:
    _, op_totp = _admin(services, "olga", Role.OPERATOR)
    _, of_totp = _admin(services, "otto", Role.OFFICER)
    services.users.add("bob@example.org", "Bob", None, "admin:test")

    op = TestClient(create_app(services), base_url="https://testserver")
    csrf = _login(op, "olga", op_totp, clock.now())
    listing = op.get("/admin/approvals")
    assert listing.status_code == 200 and "Start recovery" not in listing.text
    assert op.post("/admin/approvals", data={"email": "bob@example.org", "csrf": csrf}).status_code == 403
    with pytest.raises(RoleForbidden):
        services.approvals.approve(Principal("olga", Role.OPERATOR), 1, b"{}", b"x")

    of = TestClient(create_app(services), base_url="https://testserver")
    csrf = _login(of, "otto", of_totp, clock.now())
    assert "Start recovery" in of.get("/admin/approvals").text
    assert of.post("/admin/approvals", data={"email": "bob@example.org"}).status_code == 403  # no CSRF token
    nothing = of.post("/admin/approvals", data={"email": "bob@example.org", "csrf": csrf}, follow_redirects=False)
    assert nothing.status_code in (404, 409) and services.approvals.list() == []
    assert of.get("/admin/approvals/99").status_code == 404

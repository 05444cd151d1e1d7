"""One approval model for the dangerous acts, in process on SQLite and PostgreSQL: a bulk revoke
above [admin] bulk_revoke_approval_threshold waits for [admin] bulk_revoke_approvals approvals from
administrators who may revoke and did not start it; through the admin API (JSON) and the console
(CSRF); roles refused at the server (403); nobody approves twice or their own request; an expired
request takes no approval; concurrent last approvals release it once (PostgreSQL)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from mailkms.api import create_app
from mailkms.errors import ApprovalClosed, MailkmsError, RoleForbidden, UserNotFound
from mailkms.pki._recovery import MIN_SCRYPT_N
from mailkms.services import Principal, Role, Services, ShareInput
from mailkms.store import ApprovalVote
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL
from tests.integration.test_admin_api import _admin, _csrf, _login
from tests.integration.test_recovery import _rsa_cert, appoint, assert_openssl_opens, enrol, shares_of

USERS = [f"u{i:02}@example.org" for i in range(5)]


@pytest.fixture
def strict(data_dir, db_url, clock):  # type: ignore[no-untyped-def]
    """Services where more than 3 users at once need 2 approvals."""
    from mailkms.config import load_settings

    settings = load_settings(
        data_dir,
        database_url=db_url,
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
        admin={"bulk_revoke_approval_threshold": 3, "bulk_revoke_approvals": 2},
    )
    svc = Services.build(settings, clock)
    for mailbox in USERS:
        svc.users.add(mailbox, "", None, "admin:test")
    yield svc
    svc.close()


def _states(services: Services) -> Counter[str]:
    return Counter(services.users.show(m).state.value for m in USERS)


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _actions(services: Services, action: str) -> list[dict[str, object]]:
    return [r.to_dict() for r in services.audit_records(action=action, limit=100)]


def test_bulk_revoke_through_the_admin_api(strict, clock) -> None:
    olga, _ = _admin(strict, "olga", Role.OPERATOR)
    oscar, _ = _admin(strict, "oscar", Role.OPERATOR)
    sue, _ = _admin(strict, "sue", Role.SUPERUSER)
    audrey, _ = _admin(strict, "audrey", Role.AUDITOR)
    otto, _ = _admin(strict, "otto", Role.OFFICER)
    api = TestClient(create_app(strict), base_url="https://testserver")

    assert api.post("/api/v1/admin/revocations", json={"emails": USERS}, headers=_bearer(audrey)).status_code == 403
    unknown = api.post(
        "/api/v1/admin/revocations", json={"emails": [*USERS, "nobody@example.org"]}, headers=_bearer(olga)
    )
    assert unknown.status_code == 404 and "nobody@example.org" in unknown.text
    bad = api.post("/api/v1/admin/revocations", json={"emails": USERS, "reason": "because"}, headers=_bearer(olga))
    assert bad.status_code == 400
    assert strict.approvals.list() == []  # refused before anything was asked

    asked = api.post(
        "/api/v1/admin/revocations", json={"emails": USERS, "reason": "affiliationChanged"}, headers=_bearer(olga)
    )
    assert asked.status_code == 202, asked.text
    approval = asked.json()["approval"]
    assert asked.json()["revoked"] == [] and approval["kind"] == "bulk_revoke" and approval["threshold"] == 2
    assert _states(strict) == {"REGISTERED": 5}
    rid = approval["id"]
    url = f"/api/v1/admin/approvals/{rid}/approve"

    assert api.post(url, headers=_bearer(audrey)).status_code == 403
    assert api.post(url, headers=_bearer(otto)).status_code == 403  # an officer may not revoke
    own = api.post(url, headers=_bearer(olga))
    assert own.status_code == 409 and own.json()["type"].endswith("approval-closed")
    first = api.post(url, headers=_bearer(oscar))
    assert first.status_code == 200 and first.json()["approvers"] == ["oscar"] and first.json()["released_at"] is None
    assert api.post(url, headers=_bearer(oscar)).status_code == 409  # not twice
    assert _states(strict) == {"REGISTERED": 5}

    done = api.post(url, headers=_bearer(sue))
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["released_by"] == "sue" and body["approvers"] == ["oscar", "sue"]
    assert sorted(body["outcome"]["revoked"]) == USERS
    assert _states(strict) == {"REVOKED": 5}
    assert api.post(url, headers=_bearer(olga)).status_code == 409  # released: nothing more
    (released,) = _actions(strict, "approval.released")
    assert released["actor"] == "admin:sue"
    assert released["details"]["started_by"] == "olga" and released["details"]["approved_by"] == ["oscar", "sue"]
    revoked = _actions(strict, "user.revoked")
    assert len(revoked) == 5 and {r["actor"] for r in revoked} == {"admin:olga"}
    assert api.get(f"/api/v1/admin/approvals/{rid}", headers=_bearer(audrey)).json()["released_by"] == "sue"

    # up to the threshold: revoked at once, no approval
    strict.users.add("direct@example.org", "", None, "admin:test")
    now = api.post("/api/v1/admin/revocations", json={"emails": ["Direct@example.org"]}, headers=_bearer(olga))
    assert now.status_code == 200 and now.json()["approval"] is None
    assert now.json()["revoked"][0]["email"] == "direct@example.org"
    assert strict.verify_audit().ok
    openapi = api.get("/openapi.json").json()["paths"]
    assert "/api/v1/admin/revocations" in openapi and "/api/v1/admin/approvals/{request_id}/approve" in openapi


def test_expired_request_takes_no_approval(strict, clock) -> None:
    rid = strict.approvals.start_bulk_revoke(Principal("olga", Role.OPERATOR), USERS, None)
    clock.advance(dt.timedelta(hours=24, seconds=1))
    with pytest.raises(ApprovalClosed):
        strict.approvals.approve_plain(Principal("oscar", Role.OPERATOR), rid)
    with pytest.raises(RoleForbidden):
        strict.approvals.start_bulk_revoke(Principal("audrey", Role.AUDITOR), USERS, None)
    with pytest.raises(UserNotFound):
        strict.approvals.start_bulk_revoke(Principal("olga", Role.OPERATOR), ["nobody@example.org"], None)
    assert _states(strict) == {"REGISTERED": 5} and strict.approvals.show(rid).approvers == ()


def test_a_failed_act_is_not_released_and_can_be_approved_again(strict) -> None:
    olga, oscar, sue = (Principal(n, Role.OPERATOR) for n in ("olga", "oscar", "sue"))
    rid = strict.approvals.start_bulk_revoke(olga, USERS, None)
    strict.approvals.approve_plain(oscar, rid)
    strict.revocation.revoke_users(USERS[:1], None, "admin:test")  # revoked meanwhile: the act fails
    with pytest.raises(MailkmsError):
        strict.approvals.approve_plain(sue, rid)
    view = strict.approvals.show(rid)
    assert view.released_at is None and view.approvers == ("oscar", "sue")
    assert [r["details"]["error"] for r in _actions(strict, "approval.failed")] == ["already-revoked"]


def test_bulk_revoke_in_the_console(strict, clock) -> None:
    _, olga = _admin(strict, "olga", Role.OPERATOR)
    _, oscar = _admin(strict, "oscar", Role.OPERATOR)
    _, audrey = _admin(strict, "audrey", Role.AUDITOR)
    seen = TestClient(create_app(strict), base_url="https://testserver")
    csrf = _login(seen, "audrey", audrey, clock.now())
    assert "Ask for bulk revoke" not in seen.get("/admin/approvals").text
    form = {"emails": "\n".join(USERS), "confirm": "yes", "csrf": csrf}
    assert seen.post("/admin/approvals/bulk-revoke", data=form).status_code == 403

    asker = TestClient(create_app(strict), base_url="https://testserver")
    csrf = _login(asker, "olga", olga, clock.now())
    assert asker.post("/admin/approvals/bulk-revoke", data={**form, "csrf": "wrong"}).status_code == 403
    assert asker.post("/admin/approvals/bulk-revoke", data={**form, "csrf": csrf, "confirm": ""}).status_code == 400
    started = asker.post("/admin/approvals/bulk-revoke", data={**form, "csrf": csrf}, follow_redirects=False)
    assert started.status_code == 303, started.text
    where = started.headers["location"]
    mine = asker.get(where)
    assert "u04@example.org" in mine.text and "Approve: revoke" not in mine.text  # not for the one who asked
    assert asker.post(f"{where}/approve", data={"csrf": csrf}).status_code == 409

    other = TestClient(create_app(strict), base_url="https://testserver")
    csrf2 = _login(other, "oscar", oscar, clock.now())
    assert "Approve: revoke these 5 users" in other.get(where).text
    assert other.post(f"{where}/approve", data={}).status_code == 403  # no CSRF token
    assert seen.post(f"{where}/approve", data={"csrf": _csrf(seen, where)}).status_code == 403
    approved = other.post(f"{where}/approve", data={"csrf": csrf2})
    assert approved.status_code == 200 and "1 of 2" in approved.text and _states(strict) == {"REGISTERED": 5}
    assert "#1 bulk_revoke" in other.get("/admin/approvals").text


def test_concurrent_last_approvals_release_once(strict, db_url) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("the row lock race is a PostgreSQL matter; SQLite writers are serialised")
    rid = strict.approvals.start_bulk_revoke(Principal("olga", Role.OPERATOR), USERS, None)
    strict.approvals.approve_plain(Principal("oscar", Role.OPERATOR), rid)
    go = threading.Barrier(4)
    results: list[str] = []

    def approve(name: str) -> None:
        go.wait()
        try:
            done = strict.approvals.approve_plain(Principal(name, Role.OPERATOR), rid)
            results.append("released" if done.revoked else "counted")
        except ApprovalClosed:
            results.append("closed")

    threads = [threading.Thread(target=approve, args=(f"op{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["closed", "closed", "closed", "released"]
    assert len(_actions(strict, "approval.released")) == 1 and len(_actions(strict, "user.revoked")) == 5
    assert _states(strict) == {"REVOKED": 5} and len(strict.approvals.show(rid).approvers) == 2


def _export_setup(services, data_dir, tmp_path):  # type: ignore[no-untyped-def]
    """One enrolled user, a 2-of-3 ceremony (its shares), an RSA recipient (cert and key PEM files),
    officers otto and pia and operator olga (API token, TOTP)."""
    services.recovery.scrypt_n = MIN_SCRYPT_N
    enrol(services, "jo@example.org")
    shares = shares_of(appoint(services.recovery, data_dir, tmp_path).share_files)
    _, cert_pem, key_pem = _rsa_cert(tmp_path)
    people = [
        _admin(services, n, r) for n, r in (("otto", Role.OFFICER), ("pia", Role.OFFICER), ("olga", Role.OPERATOR))
    ]
    return shares, cert_pem, key_pem, people


def test_archive_export_released_by_two_officers_shares(services, data_dir, tmp_path) -> None:
    """Through the admin API: an officer starts the export, two officers approve with their shares
    (base64) in their own names; openssl opens the released document with the recipient's key."""
    shares, cert_pem, key_pem, ((otto, _), (pia, _), (olga, _)) = _export_setup(services, data_dir, tmp_path)
    api = TestClient(create_app(services), base_url="https://testserver")

    start = {"kind": "export", "recipient": cert_pem.read_text()}
    assert api.post("/api/v1/admin/approvals", json=start, headers=_bearer(olga)).status_code == 403
    bad = api.post("/api/v1/admin/approvals", json={**start, "recipient": "not a pem"}, headers=_bearer(otto))
    assert bad.status_code == 400
    made = api.post("/api/v1/admin/approvals", json=start, headers=_bearer(otto))
    assert made.status_code == 201 and made.json()["with_shares"] and "recipient" not in made.json()["payload"]
    url = f"/api/v1/admin/approvals/{made.json()['id']}/approve"

    def give(token: str, share: ShareInput) -> dict[str, str]:
        return {"share": base64.b64encode(share.data).decode(), "passphrase": share.passphrase.decode()}

    assert api.post(url, headers=_bearer(otto)).status_code == 400  # a share is needed
    wrong = {**give(otto, shares[0]), "passphrase": "wrong passphrase"}
    assert api.post(url, json=wrong, headers=_bearer(otto)).status_code in (401, 403)
    first = api.post(url, json=give(otto, shares[0]), headers=_bearer(otto))
    assert first.status_code == 200 and first.json()["outcome"] is None
    assert api.post(url, json=give(otto, shares[1]), headers=_bearer(otto)).status_code == 409  # not twice
    assert api.post(url, json=give(pia, shares[0]), headers=_bearer(pia)).status_code == 409  # that share again
    done = api.post(url, json=give(pia, shares[1]), headers=_bearer(pia))
    assert done.status_code == 200 and done.json()["outcome"]["keys"] == 1
    entry = json.loads(done.json()["outcome"]["document"])["keys"][0]
    assert_openssl_opens(entry, tmp_path, cert_pem, key_pem)
    seen_by_operator = api.get(f"/api/v1/admin/approvals/{made.json()['id']}", headers=_bearer(olga)).json()
    assert seen_by_operator["outcome"] == {"keys": 1}  # the document only for officers
    (released,) = _actions(services, "approval.released")
    assert released["details"]["approved_by"] == ["otto", "pia"] and "document" not in released["details"]
    with services.db.read_only() as session:
        assert session.execute(select(ApprovalVote.sealed).where(ApprovalVote.sealed.is_not(None))).first() is None


def test_archive_export_in_the_console(services, clock, data_dir, tmp_path) -> None:
    shares, cert_pem, key_pem, ((_, otto), (_, pia), (_, olga)) = _export_setup(services, data_dir, tmp_path)
    first = TestClient(create_app(services), base_url="https://testserver")
    csrf = _login(first, "otto", otto, clock.now())
    pem = {"recipient": ("r.pem", cert_pem.read_bytes(), "application/x-pem-file")}
    assert first.post("/admin/approvals/export", files=pem, data={}).status_code == 403  # no CSRF
    junk = {"recipient": ("r.pem", b"not a certificate", "text/plain")}
    assert first.post("/admin/approvals/export", files=junk, data={"csrf": csrf}).status_code == 400
    made = first.post("/admin/approvals/export", files=pem, data={"csrf": csrf}, follow_redirects=False)
    assert made.status_code == 303
    where = made.headers["location"]
    assert "Export of the whole archive" in first.get(where).text
    share = {"share": ("s.json", shares[0].data, "application/json")}
    one = first.post(f"{where}/approve", files=share, data={"passphrase": shares[0].passphrase.decode(), "csrf": csrf})
    assert one.status_code == 200 and "1 of 2" in one.text
    assert first.get(f"{where}/export.json").status_code == 404  # nothing released yet

    second = TestClient(create_app(services), base_url="https://testserver")
    csrf2 = _login(second, "pia", pia, clock.now())
    share = {"share": ("s.json", shares[1].data, "application/json")}
    two = second.post(
        f"{where}/approve", files=share, data={"passphrase": shares[1].passphrase.decode(), "csrf": csrf2}
    )
    assert two.status_code == 200 and "download the export" in two.text
    document = second.get(f"{where}/export.json")
    assert document.status_code == 200 and "attachment" in document.headers["content-disposition"]
    assert_openssl_opens(document.json()["keys"][0], tmp_path, cert_pem, key_pem)

    operator = TestClient(create_app(services), base_url="https://testserver")
    _login(operator, "olga", olga, clock.now())
    assert operator.get(f"{where}/export.json").status_code == 403
    assert "download the export" not in operator.get(where).text


def test_replacing_officers_through_approvals(services, data_dir, tmp_path) -> None:
    """Two current officers' shares release a new 2-of-2 split to otto and pia; each collects their
    share once under a passphrase of their own; the new shares recover, the old ones no longer."""
    shares, _, _, ((otto, _), (pia, _), (olga, _)) = _export_setup(services, data_dir, tmp_path)
    api = TestClient(create_app(services), base_url="https://testserver")
    start = {"kind": "replace_officers", "officers": ["otto", "pia"], "threshold": 2}
    assert api.post("/api/v1/admin/approvals", json=start, headers=_bearer(olga)).status_code == 403
    olga_named = api.post(
        "/api/v1/admin/approvals", json={**start, "officers": ["otto", "olga"]}, headers=_bearer(otto)
    )
    assert olga_named.status_code == 400  # an operator could not collect a share
    assert api.post("/api/v1/admin/approvals", json={**start, "threshold": 3}, headers=_bearer(otto)).status_code == 400
    made = api.post("/api/v1/admin/approvals", json=start, headers=_bearer(otto))
    assert made.status_code == 201
    rid = made.json()["id"]

    def give(share: ShareInput) -> dict[str, str]:
        return {"share": base64.b64encode(share.data).decode(), "passphrase": share.passphrase.decode()}

    collect = f"/api/v1/admin/approvals/{rid}/share"
    new_pass = {"otto": "otto's brand new passphrase", "pia": "pia's brand new passphrase"}
    assert api.post(collect, json={"passphrase": new_pass["otto"]}, headers=_bearer(otto)).status_code == 409
    api.post(f"/api/v1/admin/approvals/{rid}/approve", json=give(shares[0]), headers=_bearer(otto))
    done = api.post(f"/api/v1/admin/approvals/{rid}/approve", json=give(shares[2]), headers=_bearer(pia))
    assert done.status_code == 200, done.text
    outcome = done.json()["outcome"]
    assert outcome["rewrapped"] == 1 and outcome["to_collect"] == ["otto", "pia"] and "handover" not in outcome

    new_shares = []
    for name, token in (("otto", otto), ("pia", pia)):
        got = api.post(collect, json={"passphrase": new_pass[name]}, headers=_bearer(token))
        assert got.status_code == 200, got.text
        new_shares.append(ShareInput(base64.b64decode(got.json()["share"]), new_pass[name].encode()))
        assert api.post(collect, json={"passphrase": new_pass[name]}, headers=_bearer(token)).status_code == 409
    assert api.get(f"/api/v1/admin/approvals/{rid}", headers=_bearer(olga)).json()["outcome"]["to_collect"] == []
    assert services.recovery.status().threshold == 2
    recovered = services.recovery.recover("jo@example.org", new_shares, "admin:test")
    assert len(recovered.key_serials) == 1
    with pytest.raises(MailkmsError):
        services.recovery.recover("jo@example.org", shares[:2], "admin:test")
    (released,) = _actions(services, "approval.released")
    assert "handover" not in released["details"] and released["details"]["approved_by"] == ["otto", "pia"]
    assert len(_actions(services, "approval.share.collected")) == 2
    everything = " ".join(json.dumps(r) for r in _actions(services, "approval.share.collected"))
    assert new_pass["otto"] not in everything


def test_replacing_officers_in_the_console(services, clock, data_dir, tmp_path) -> None:
    shares, _, _, ((_, otto), _, _) = _export_setup(services, data_dir, tmp_path)
    browser = TestClient(create_app(services), base_url="https://testserver")
    csrf = _login(browser, "otto", otto, clock.now())
    form = {"officers": "otto, pia", "threshold": "1"}
    assert browser.post("/admin/approvals/replace-officers", data=form).status_code == 403  # no CSRF
    made = browser.post("/admin/approvals/replace-officers", data={**form, "csrf": csrf}, follow_redirects=False)
    assert made.status_code == 303
    where = made.headers["location"]
    rid = int(where.rsplit("/", 1)[1])
    assert "New recovery officers: otto, pia" in browser.get(where).text
    services.approvals.approve(Principal("otto", Role.OFFICER), rid, shares[0].data, shares[0].passphrase)
    services.approvals.approve(Principal("pia", Role.OFFICER), rid, shares[1].data, shares[1].passphrase)
    page = browser.get(where).text
    assert "shares still to collect: otto, pia" in page and "Download my new share" in page
    mine = {"passphrase": "otto's own new passphrase", "again": "otto's own new passphrase", "csrf": csrf}
    assert browser.post(f"{where}/share", data={**mine, "again": "something else!!"}).status_code == 400
    got = browser.post(f"{where}/share", data=mine)
    assert got.status_code == 200 and "attachment" in got.headers["content-disposition"]
    assert browser.post(f"{where}/share", data=mine).status_code == 409  # once
    assert "Download my new share" not in browser.get(where).text
    new = ShareInput(got.content, b"otto's own new passphrase")
    assert len(services.recovery.recover("jo@example.org", [new], "admin:test").key_serials) == 1  # 1 of 2 now

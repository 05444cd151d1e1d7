"""ACME for S/MIME through the real mail path (issue 15 §3): `mailkms serve` relays through Postfix
(submission, STARTTLS, SASL, certificate verified) into Dovecot; the user reads the challenge over
IMAPS and replies through Postfix as herself; Dovecot delivers the reply into the challenge
address's Maildir, which the server reads (`[acme] reply_maildir`). certbot's `acme` package is the
ACME client; pkilint judges the certificate."""

from __future__ import annotations

import email.policy
import smtplib
import ssl
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.conftest import init_deployment
from tests.e2e.test_acme_e2e import (
    EmailReply00Response,
    World,
    challenge_of,
    deadline,
    email_order,
    new_client,
    reply_message,
    response_for,
)
from tests.e2e.test_real_mail_loop import _relay_env, _wait
from tests.imap_support import Imap
from tests.judges import lint_smime
from tests.mailstack import mail_stack, mail_tools_missing

pytestmark = pytest.mark.e2e

ALICE = "alice@example.org"
CHALLENGES = "acme-challenge@example.org"
LOGIN, RELAY_PASSWORD = "mailkms@example.org", "relay-password-made-for-this-run"
PASSWORDS = {ALICE: "alice-imap-password-of-this-run", CHALLENGES: "challenge-box-password-of-this-run"}


def test_acme_through_postfix_dovecot_and_imap(tmp_path: Path) -> None:
    if missing := mail_tools_missing():
        pytest.fail(f"{', '.join(missing)} not installed (scripts/system-deps.sh installs them)")
    with mail_stack(tmp_path / "mailstack-logs", {LOGIN: RELAY_PASSWORD, **PASSWORDS}) as (postfix, dovecot, tls):
        imap = Imap(dovecot, tls)
        password_file = tmp_path / "relay-password"
        password_file.write_text(RELAY_PASSWORD + "\n")
        password_file.chmod(0o600)
        dep = init_deployment(tmp_path / "data")
        dep.server_env = {
            **_relay_env(postfix, tls.ca_pem, password_file),
            "MAILKMS_ACME__ENABLED": "true",
            "MAILKMS_ACME__ALLOWED_DOMAINS": '["example.org"]',
            "MAILKMS_ACME__CHALLENGE_FROM": CHALLENGES,
            "MAILKMS_ACME__REPLY_MAILDIR": str(dovecot.maildir(CHALLENGES)),
        }
        root = tmp_path / "root.pem"
        root.write_bytes((dep.data / "ca" / "root.crt.pem").read_bytes())
        dep.start()
        try:
            acme = new_client(World(dep, root, f"{dep.url}/acme/directory"))
            orderr = email_order(acme, ALICE)
            challb = challenge_of(orderr, CHALLENGES)

            # the challenge: Postfix -> Dovecot -> IMAPS, read as Alice
            _wait("the challenge mail in Alice's INBOX", lambda: imap.bodies(ALICE, "INBOX"))
            mail = BytesParser(policy=email.policy.default).parsebytes(imap.bodies(ALICE, "INBOX")[0])
            assert isinstance(mail, EmailMessage)
            assert str(mail["Subject"]).startswith("ACME: ") and mail["From"] == CHALLENGES
            token1 = str(mail["Subject"]).removeprefix("ACME: ")
            response = response_for(token1, challb.chall.jobj["token"], acme.net.key)

            # the reply: Alice's submission through Postfix (STARTTLS, her login) -> Dovecot
            context = ssl.create_default_context(cafile=str(tls.ca_pem))
            with smtplib.SMTP("localhost", postfix.submission_port, timeout=30) as smtp:
                smtp.starttls(context=context)
                smtp.login(ALICE, PASSWORDS[ALICE])
                smtp.send_message(reply_message(mail, ALICE, response), from_addr=ALICE, to_addrs=[CHALLENGES])
            _wait("the reply in the challenge Maildir", lambda: imap.bodies(CHALLENGES, "INBOX"))

            acme.answer_challenge(challb, EmailReply00Response(key_authorization="by-mail"))
            orderr = acme.poll_authorizations(orderr, deadline(60))
            orderr = acme.finalize_order(orderr, deadline(60))
            cert = x509.load_pem_x509_certificates(orderr.fullchain_pem.encode())[0]
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.RFC822Name) == [ALICE]
            verdict = lint_smime(cert)
            assert verdict.exit_code == 0, str(verdict)
            assert (
                cert.issuer
                == x509.load_pem_x509_certificate((dep.data / "ca" / "issuing.crt.pem").read_bytes()).subject
            )
        finally:
            dep.stop()

"""normalise_mailbox: what `mailkms user add` accepts is exactly what can be certified cleanly."""

from __future__ import annotations

import pytest

from mailkms.errors import Malformed
from mailkms.pki import CertKind, KeyType
from mailkms.services import normalise_mailbox
from tests.judges import lint_smime
from tests.testca import ca_of, key_of

ACCEPTED = [
    ("alice@example.org", "alice@example.org"),
    ("  Alice.Example@Example.ORG \n", "alice.example@example.org"),
    ("alice+tag@example.org", "alice+tag@example.org"),
    ("o'brien@example.org", "o'brien@example.org"),
    ("a!#$%&*/=?^_`{|}~-@example.org", "a!#$%&*/=?^_`{|}~-@example.org"),
    ("alice@mail.eu.example.org", "alice@mail.eu.example.org"),
    ("alice@xn--mller-kva.de", "alice@xn--mller-kva.de"),
    ("alice@a-b.example.org", "alice@a-b.example.org"),
    ("a" * 64 + "@example.org", "a" * 64 + "@example.org"),  # longest local part, too long for a CN
    ("alice@" + "b" * 63 + ".org", "alice@" + "b" * 63 + ".org"),  # longest label
]

REFUSED = [
    "",
    "alice",
    "alice@",
    "@example.org",
    "alice@localhost",  # no dot: an internal name
    "alice@@example.org",
    "alice@example..org",
    "al..ice@example.org",
    ".alice@example.org",  # leading dot in the local part
    "alice.@example.org",  # trailing dot in the local part
    "alice@-example.org",
    "alice@example-.org",
    "alice@example.org.",
    "alice@example.123",  # numeric top-level label
    "alice@example.o",  # one-letter top-level label
    "alice@" + "b" * 64 + ".org",  # label longer than 63
    "a" * 65 + "@example.org",  # local part longer than 64
    "alice@" + ("b" * 60 + ".") * 5 + "org",  # longer than 254
    "al ice@example.org",
    '"alice"@example.org',  # quoted local parts are not offered
    "alice@[127.0.0.1]",
    "alice@127.0.0.1",
    "ålice@example.org",  # SmtpUTF8Mailbox is not supported yet
    "alice@exämple.org",
]


@pytest.mark.parametrize(("text", "mailbox"), ACCEPTED, ids=[a for a, _ in ACCEPTED])
def test_accepted_mailboxes(text: str, mailbox: str) -> None:
    assert normalise_mailbox(text) == mailbox


@pytest.mark.parametrize("text", REFUSED)
def test_refused_mailboxes(text: str) -> None:
    with pytest.raises(Malformed, match="not a valid e-mail address"):
        normalise_mailbox(text)


@pytest.mark.parametrize("mailbox", [m for _, m in ACCEPTED], ids=[m for _, m in ACCEPTED])
def test_every_accepted_mailbox_gives_a_pkilint_clean_certificate(mailbox: str) -> None:
    """Regression: a leading or trailing dot, a 64-character label or a numeric top-level label
    were accepted and made certificates pkilint rejects; a mailbox longer than 64 characters
    made issuing fail (the CN cannot hold it)."""
    cert = ca_of(KeyType.P256, "mailboxes").issue(CertKind.SIGNING, key_of(KeyType.P256), mailbox)
    verdict = lint_smime(cert)
    assert verdict.exit_code == 0, str(verdict)

"""Each check the client makes before installing a delivery, alone (issue 12).

Every mail below passes all checks but one: it is signed, its chain and certificates are real where
the check under test does not look, and the same mail with that one part put right installs
(test_each_forgery_differs_from_the_real_reply_in_one_part). So each test fails when its check is
taken out of `Client._check_delivery`, which is how they were verified.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography import x509

from mailkms.errors import MailkmsError
from mailkms.pki import CertKind, KeyType, Manifest, PrivateKey, same_public_key
from tests.testca import MAIL_FROM, SessionCA, ca_of, key_of
from tests.unit.client.delivery_kit import PASSPHRASE, REQUEST_ID, Kit, Pair, hexserial, make_kit

BOB = "bob@example.org"


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "home")


@pytest.fixture(scope="module")
def impostor() -> SessionCA:
    """A CA with the very names of the real one and keys of its own."""
    return ca_of(KeyType.RSA3072, tag="impostor")


def _keys_of(kit: Kit) -> list[str]:
    return sorted(p.name for p in kit.client.store.keys_dir.iterdir())


def refused(kit: Kit, raw: bytes, reason: str) -> None:
    """Refused by that check (its own words), and nothing written: no key file, no generation."""
    keys_before = _keys_of(kit)
    state = kit.fresh_state()
    with pytest.raises(MailkmsError) as caught:
        kit.client._install(state, raw)
    assert reason in caught.value.detail, caught.value.detail
    assert _keys_of(kit) == keys_before
    assert state.generations == [] and state.encryption_history == {}
    assert state.pending is not None and state.pending.request_id == kit.manifest.request_id


def _clients_key(kit: Kit) -> PrivateKey:
    """The signing key alice's client made and keeps for the request."""
    return kit.client.store.read_key(f"signing-pending-{REQUEST_ID}.pem", PASSPHRASE)


def _manifest_for(kit: Kit, signing: x509.Certificate, encryption: x509.Certificate) -> Manifest:
    return dataclasses.replace(
        kit.manifest,
        signing_serial=hexserial(signing),
        encryption_serial=hexserial(encryption),
        key_serials=(hexserial(encryption),),
    )


# --- the control: the real reply installs --------------------------------------------------------------------
def test_the_real_reply_installs(kit: Kit) -> None:
    state = kit.fresh_state()
    assert kit.client._install(state, kit.deliver()).startswith("installed generation 1")
    assert state.current is not None and state.current.encryption_serial == hexserial(kit.encryption)


def test_each_forgery_differs_from_the_real_reply_in_one_part(kit: Kit) -> None:
    """The parameters the forgeries below change, put back to the real ones, install."""
    raw = kit.deliver(
        dataclasses.replace(kit.manifest),
        [kit.signing, kit.encryption, kit.ca.issuing, kit.ca.root],
        keys=[(hexserial(kit.encryption), kit.encryption_key)],
        signer=kit.signer,
        signer_chain=[kit.ca.issuing, kit.ca.root],
    )
    assert kit.client._install(kit.fresh_state(), raw).startswith("installed generation 1")


# --- the signer is the server's mail identity --------------------------------------------------------------
def _bob_signer(kit: Kit) -> Pair:
    key = key_of(KeyType.RSA2048, tag=31)
    return kit.ca.issue(CertKind.SIGNING, key, BOB), key


def test_a_delivery_signed_by_a_colleague_of_the_same_ca_is_refused(kit: Kit) -> None:
    """Everything else is the real reply: only who signed it is wrong."""
    cert, key = _bob_signer(kit)
    raw = kit.deliver(signer=(cert, key))
    refused(kit, raw, f"not signed by the server's mail identity {MAIL_FROM}")


def test_a_colleague_forging_alices_delivery_installs_nothing(kit: Kit) -> None:
    """The realistic attack: bob holds a valid S/MIME signing certificate from the same CA. He writes a
    manifest for alice (right mailbox, even the right request id, a plausible generation), puts in
    alice's real certificates (he cannot get any for her mailbox) and an encryption key of his own
    making, enveloped to alice's transport key, and signs it all. Refused, left in the mailbox,
    nothing installed; the real reply that comes after installs the real key."""
    cert, key = _bob_signer(kit)
    bobs_key = key_of(KeyType.RSA2048, tag=32)
    forged = kit.deliver(
        Manifest(
            kind="enrolment",
            mailbox="Alice@Example.org",
            request_id=kit.manifest.request_id,
            generation=1,
            signing_serial=hexserial(kit.signing),
            encryption_serial=hexserial(kit.encryption),
            key_serials=(hexserial(kit.encryption),),
            issued_at=kit.manifest.issued_at,
            reminder_at=kit.manifest.reminder_at,
        ),
        [kit.signing, kit.encryption, kit.ca.issuing, kit.ca.root],
        keys=[(hexserial(kit.encryption), bobs_key)],
        signer=(cert, key),
    )
    refused(kit, forged, "not signed by the server's mail identity")
    name = kit.add_mail(forged)
    report = kit.client.sync()
    assert report.installed == [] and len(report.refused) == 1
    state = kit.client.state()
    assert state.generations == [] and state.processed[name].startswith("refused: the mail was not signed")
    assert any(name in p.name for p in (kit.maildir / "new").iterdir())  # left where it was
    kit.add_mail(kit.deliver())
    assert len(kit.client.sync().installed) == 1
    installed = kit.client.store.read_key(f"encryption-{hexserial(kit.encryption)}.pem", PASSPHRASE)
    assert same_public_key(installed.public_key(), kit.encryption_key.public_key())


# --- the delivery is for this mailbox ------------------------------------------------------------------------
def test_a_manifest_for_another_mailbox_is_refused(kit: Kit) -> None:
    """Signed by the server, alice's certificates, but the manifest says bob's."""
    raw = kit.deliver(dataclasses.replace(kit.manifest, mailbox=BOB))
    refused(kit, raw, f"the delivery is for {BOB}, not for alice@example.org")


def test_certificates_for_another_mailbox_are_refused(kit: Kit) -> None:
    """The manifest says alice, the certificates (of the keys alice's client holds) say bob."""
    signing = kit.ca.issue(CertKind.SIGNING, _clients_key(kit), BOB)
    encryption = kit.ca.issue(CertKind.ENCRYPTION, kit.encryption_key, BOB)
    raw = kit.deliver(
        _manifest_for(kit, signing, encryption),
        [signing, encryption, kit.ca.issuing, kit.ca.root],
        keys=[(hexserial(encryption), kit.encryption_key)],
    )
    refused(kit, raw, "a delivered certificate is for another mailbox")


# --- it answers a request made from this key store -------------------------------------------------------------
def test_a_delivery_for_another_request_is_refused(kit: Kit) -> None:
    raw = kit.deliver(dataclasses.replace(kit.manifest, request_id="req-made-elsewhere"))
    refused(kit, raw, "this delivery answers no request made from this key store")


def test_a_delivery_when_no_request_is_pending_is_refused(kit: Kit) -> None:
    state = kit.fresh_state()
    state.pending = None
    kit.client.store.save(state)
    with pytest.raises(MailkmsError, match="answers no request made from this key store"):
        kit.client._install(kit.fresh_state(), kit.deliver())


# --- the signing certificate carries the key this client made -------------------------------------------------
def test_a_signing_certificate_for_another_key_is_refused(kit: Kit) -> None:
    """alice's mailbox, the real CA, but a key the client never made (the server's, or anyone's)."""
    signing = kit.ca.issue(CertKind.SIGNING, key_of(KeyType.P256, tag=33))
    raw = kit.deliver(
        _manifest_for(kit, signing, kit.encryption), [signing, kit.encryption, kit.ca.issuing, kit.ca.root]
    )
    refused(kit, raw, "the signing certificate does not match the key this client made")


# --- the delivered encryption key matches its certificate -----------------------------------------------------
def test_an_encryption_key_that_is_not_the_certificates_is_refused(kit: Kit) -> None:
    raw = kit.deliver(keys=[(hexserial(kit.encryption), key_of(KeyType.RSA2048, tag=34))])
    refused(kit, raw, "the delivered encryption key does not match the encryption certificate")


def test_a_delivery_without_the_encryption_key_is_refused(kit: Kit) -> None:
    other = kit.ca.issue(CertKind.ENCRYPTION, key_of(KeyType.RSA2048, tag=35))
    raw = kit.deliver(
        dataclasses.replace(kit.manifest, key_serials=(hexserial(other),)),
        [kit.signing, kit.encryption, other, kit.ca.issuing, kit.ca.root],
        keys=[(hexserial(other), key_of(KeyType.RSA2048, tag=35))],
    )
    refused(kit, raw, "the delivered encryption key does not match the encryption certificate")


# --- the chain goes to the pinned root --------------------------------------------------------------------------
def test_a_signer_from_a_ca_with_the_same_names_is_refused(kit: Kit, impostor: SessionCA) -> None:
    """The mail identity's address and the CA names are right; the keys are another CA's."""
    key = key_of(KeyType.RSA2048, tag=36)
    cert = impostor.issue(CertKind.MAIL_SIGNER, key, MAIL_FROM)
    raw = kit.deliver(signer=(cert, key), signer_chain=[impostor.issuing, impostor.root])
    refused(kit, raw, "does not chain to the pinned mailkms CA")


def test_delivered_certificates_from_a_ca_with_the_same_names_are_refused(kit: Kit, impostor: SessionCA) -> None:
    """Signed by the real server identity, alice's mailbox and keys, but certified by another CA."""
    signing = impostor.issue(CertKind.SIGNING, _clients_key(kit))
    encryption = impostor.issue(CertKind.ENCRYPTION, kit.encryption_key)
    raw = kit.deliver(
        _manifest_for(kit, signing, encryption),
        [signing, encryption, impostor.issuing, impostor.root],
        keys=[(hexserial(encryption), kit.encryption_key)],
    )
    refused(kit, raw, "does not chain to the pinned mailkms CA")

"""A mail that cannot be read is refused, once, and never jams the client.

Anyone can send a user a mail with the X-Mailkms-Delivery header. Before issue 12, a certificate
in it with a duplicated extension or a public key of an algorithm cryptography does not know
raised the library's own exception out of `sync` on every later log-on.
"""

from __future__ import annotations

import base64
import email.policy
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailkms.client import _core
from mailkms.client._core import Client
from mailkms.errors import DeliveryRefused, MailkmsError
from mailkms.pki import sign_opaque
from tests.unit.client import delivery_kit as kit_
from tests.unit.client.delivery_kit import Kit, make_kit

DER = serialization.Encoding.DER


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "home")


def _der(*certs: x509.Certificate) -> list[bytes]:
    return [c.public_bytes(DER) for c in certs]


def _refused(kit: Kit, raw: bytes) -> MailkmsError:
    """Through the install path: a mailkms refusal, and nothing written to the key store."""
    keys_before = sorted(p.name for p in kit.client.store.keys_dir.iterdir())
    state = kit.fresh_state()
    with pytest.raises(MailkmsError) as caught:
        kit.client._install(state, raw)
    assert "could not be read" not in caught.value.detail  # refused by a check, not by the safety net
    assert sorted(p.name for p in kit.client.store.keys_dir.iterdir()) == keys_before
    assert state.generations == [] and state.pending is not None
    return caught.value


# --- the good path: the tests below can fail --------------------------------------------------------------
def test_the_untouched_delivery_installs(kit: Kit) -> None:
    state = kit.fresh_state()
    outcome = kit.client._install(state, kit.deliver())
    assert outcome.startswith("installed generation 1")
    assert state.current is not None and state.pending is None


def test_the_kit_rebuilds_a_delivery_that_still_installs(kit: Kit) -> None:
    """Taking the certs-only part out and putting it back (re-signed) changes nothing."""
    raw = kit.deliver()
    certs = _der(kit.signing, kit.encryption, kit.ca.issuing, kit.ca.root)
    again = kit_.replace_part(kit, raw, kit_.is_certs, kit_.certs_only_der(certs))
    assert kit.client._install(kit.fresh_state(), again).startswith("installed generation 1")


# --- duplicated extension ----------------------------------------------------------------------------------
def test_a_delivered_certificate_with_a_duplicated_extension_is_refused(kit: Kit) -> None:
    """Even issued by the real CA and delivered in mail signed by the real server key."""
    doubled = kit_.edited_certificate(kit.signing, kit_.duplicate_extension(), kit.ca.issuing_key)
    with pytest.raises(x509.DuplicateExtension):
        _ = x509.load_der_x509_certificate(doubled).extensions  # what cryptography does with it
    certs = [doubled, *_der(kit.encryption, kit.ca.issuing, kit.ca.root)]
    raw = kit_.replace_part(kit, kit.deliver(), kit_.is_certs, kit_.certs_only_der(certs))
    error = _refused(kit, raw)
    assert "extension" in error.detail


def test_a_duplicated_extension_among_the_signature_certificates_is_refused(kit: Kit) -> None:
    """A stranger's signature carrying a CA certificate with a duplicated extension."""
    cert, key = kit_.forger()
    doubled = kit_.edited_certificate(kit.ca.issuing, kit_.duplicate_extension())
    raw = kit.deliver()
    headers, _ = kit_.split(raw)
    der = sign_opaque(kit_.signed_content(raw), cert, key, [x509.load_der_x509_certificate(doubled)])
    _refused(kit, kit_.rebuilt(headers, der))


def test_a_signer_certificate_with_a_duplicated_extension_is_refused(kit: Kit) -> None:
    cert, key = kit_.forger()
    doubled = x509.load_der_x509_certificate(kit_.edited_certificate(cert, kit_.duplicate_extension(), key))
    raw = kit.deliver()
    headers, _ = kit_.split(raw)
    _refused(kit, kit_.rebuilt(headers, sign_opaque(kit_.signed_content(raw), doubled, key, [])))


# --- unknown key algorithm ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unknown", "ed448", "dsa"])
def test_a_signer_key_of_an_unknown_algorithm_is_refused(kit: Kit, kind: str) -> None:
    cert, key = kit_.forger()
    odd = kit_.odd_key_certificate(kind, key, cert)
    raw = kit.deliver()
    headers, _ = kit_.split(raw)
    error = _refused(kit, kit_.rebuilt(headers, sign_opaque(kit_.signed_content(raw), odd, key, [])))
    assert "key" in error.detail


def test_a_delivered_ca_certificate_with_an_unknown_key_algorithm_is_refused(kit: Kit) -> None:
    """The issuing CA's certificate in the certs-only part says its key is of an unknown algorithm."""
    odd = kit_.edited_certificate(
        kit.ca.issuing, kit_.key_algorithm(kit_.RSA_ENCRYPTION, kit_.UNKNOWN_9), kit.ca.root_key
    )
    certs = [odd, *_der(kit.signing, kit.encryption, kit.ca.root)]
    raw = kit_.replace_part(kit, kit.deliver(), kit_.is_certs, kit_.certs_only_der(certs))
    _refused(kit, raw)


# --- through sync: refused once, recorded, the next mail still installs -----------------------------------------
def test_sync_refuses_a_jamming_mail_once_and_installs_the_real_one(kit: Kit) -> None:
    jam = kit.add_mail(kit_.jamming_mail(kit))
    first = kit.client.sync()
    assert first.installed == [] and len(first.refused) == 1 and first.already == 0
    assert kit.client.state().processed[jam].startswith("refused: ")
    second = kit.client.sync()
    assert second.refused == [] and second.installed == [] and second.already == 1  # not reported again
    kit.add_mail(kit.deliver())
    third = kit.client.sync()
    assert len(third.installed) == 1 and third.refused == [] and third.already == 1
    assert kit.client.state().current is not None


def test_anything_else_a_message_raises_is_a_refusal_by_class_name_only(
    kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net: an exception no pki check foresaw refuses that one message."""

    def broken(raw: bytes) -> object:
        raise LookupError("secret content of the mail")

    monkeypatch.setattr(_core, "open_delivery", broken)
    with pytest.raises(DeliveryRefused, match=r"^the message could not be read \(LookupError\)$"):
        kit.client._read_delivery(kit.fresh_state(), kit.deliver())
    key = kit.add_mail(kit.deliver())
    report = kit.client.sync()
    assert len(report.refused) == 1 and "LookupError" in report.refused[0] and "secret" not in report.refused[0]
    assert kit.client.state().processed[key] == "refused: the message could not be read (LookupError)"


def test_the_safety_net_does_not_hide_a_broken_key_store(kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError is the machine's trouble, not the message's: it is not recorded as a refusal."""

    def unreadable(self: Client, name: str, passphrase: bytes) -> object:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(kit.client.store), "read_key", unreadable)
    key = kit.add_mail(kit.deliver())
    with pytest.raises(PermissionError):
        kit.client.sync()
    assert key not in kit.client.state().processed


def test_refusal_reasons_carry_no_content_of_the_mail(kit: Kit) -> None:
    """A stranger's manifest cannot write its own text (or terminal escapes) into the user's terminal."""
    raw = kit.deliver()
    manifest = b'{"version": "\\u001b[31mPWNED", "kind": "x"}'
    cert, key = kit_.forger()
    inner = kit_.inner_message(raw)
    for part in inner.walk():
        if kit_.is_manifest(part):
            part.set_payload(base64.encodebytes(manifest).decode())
    headers, _ = kit_.split(raw)
    der = sign_opaque(inner.as_bytes(policy=email.policy.SMTP), cert, key, [])
    error = _refused(kit, kit_.rebuilt(headers, der))
    assert "PWNED" not in error.detail and "\x1b" not in error.detail


def test_a_manifest_nested_too_deep_for_json_is_refused(kit: Kit) -> None:
    """json.loads raises RecursionError (no ValueError) for deeply nested arrays."""
    raw = kit.deliver()
    cert, key = kit_.forger()
    content = kit_.signed_content(raw).replace(
        kit_.smtp_base64(kit_.part_payload(raw, kit_.is_manifest)), kit_.smtp_base64(b"[" * 100_000)
    )
    headers, _ = kit_.split(raw)
    error = _refused(kit, kit_.rebuilt(headers, sign_opaque(content, cert, key, [])))
    assert "RecursionError" in error.detail

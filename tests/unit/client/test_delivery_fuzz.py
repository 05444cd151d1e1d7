"""Fuzz: no mail, however malformed, makes the client raise anything but a mailkms refusal.

(a) the real delivery, mutated at every layer: the raw mail, its base64 body, the CMS DER, the
    certificates the CMS carries (byte flips, a duplicated extension, another key algorithm, some
    signed again by the real CA so that they chain), and, signed again by the real server key so
    that the mutation passes the signature check, the inner MIME, the manifest, the certs-only
    part, the enveloped key and the private key inside it;
(b) random MIME structures, through `sync` itself;
(c) random DER, wherever the delivery carries DER.

The install path is called below its safety net (Client._check_delivery), so what is tested is
that the pki functions themselves turn every library exception into a mailkms error; the sync
tests also check that no refusal came from the safety net ("could not be read").
Deterministic (derandomize, no example database) and about 250 examples a strategy.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable

import pytest
from asn1crypto import cms as a_cms
from asn1crypto import x509 as a_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from mailkms.client._core import _Checked
from mailkms.errors import ClientStateError, DeliveryRefused, MailkmsError, Malformed, Unauthorized
from mailkms.pki import DELIVERY_HEADER, envelope, private_key_der
from tests.unit.client import delivery_kit as kit_
from tests.unit.client.delivery_kit import Kit, make_kit

EXAMPLES = 200
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
REFUSALS = (DeliveryRefused, Malformed, Unauthorized)  # what a message may be refused with
DER = serialization.Encoding.DER


@dataclasses.dataclass(frozen=True, repr=False)  # a failing example prints `lab` too: keep it short
class Lab:
    kit: Kit
    raw: bytes  # the real delivery
    headers: bytes
    cms: bytes  # its SignedData
    content: bytes  # the signed inner MIME
    manifest: bytes
    certs_only: bytes
    enveloped_key: bytes
    pkcs8: bytes  # the encryption key inside the envelope
    cms_certs: tuple[bytes, ...]  # the signer and its chain as the CMS carries them
    delivered: tuple[bytes, ...]  # signing, encryption, issuing CA, root


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    kit = make_kit(tmp_path_factory.mktemp("fuzz") / "home")
    raw = kit.deliver()
    headers, cms = kit_.split(raw)
    signed = a_cms.ContentInfo.load(cms)["content"]
    return Lab(
        kit=kit,
        raw=raw,
        headers=headers,
        cms=cms,
        content=kit_.signed_content(raw),
        manifest=kit_.part_payload(raw, kit_.is_manifest),
        certs_only=kit_.part_payload(raw, kit_.is_certs),
        enveloped_key=kit_.part_payload(raw, kit_.is_key),
        pkcs8=private_key_der(kit.encryption_key),
        cms_certs=tuple(c.chosen.dump() for c in signed["certificates"]),
        delivered=tuple(c.public_bytes(DER) for c in (kit.signing, kit.encryption, kit.ca.issuing, kit.ca.root)),
    )


def outcome(lab: Lab, raw: bytes) -> str:
    """What the install path makes of `raw`: 'checked', 'already', or the refusal's class.
    Anything else it raises fails the test."""
    try:
        result = lab.kit.client._check_delivery(lab.kit.fresh_state(), raw)
    except REFUSALS as exc:
        _safe(exc)
        return _seen(f"{exc.__class__.__name__}: {exc.detail[:40]}")
    return _seen("checked" if isinstance(result, _Checked) else "already")


def _seen(what: str) -> str:
    """How far the examples got (pytest --hypothesis-show-statistics lists these)."""
    if currently_in_test_context():
        event(what)
    return what


def _safe(exc: MailkmsError) -> None:
    assert "could not be read" not in exc.detail  # not the client's safety net: pki itself refused
    assert exc.detail.isprintable() and len(exc.detail) < 300, exc.detail


# --- the checks can fail ----------------------------------------------------------------------------------------
def test_the_untouched_delivery_passes_every_check(lab: Lab) -> None:
    assert outcome(lab, lab.raw) == "checked"
    assert outcome(lab, kit_.resigned(lab.kit, lab.raw, lab.content)) == "checked"


def test_outcome_lets_a_library_exception_through(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: bytes) -> object:
        raise x509.DuplicateExtension("as cryptography raises it", x509.oid.ExtensionOID.BASIC_CONSTRAINTS)

    monkeypatch.setattr("mailkms.client._core.open_delivery", broken)
    with pytest.raises(x509.DuplicateExtension):
        outcome(lab, lab.raw)


def test_a_local_trouble_is_no_refusal(lab: Lab) -> None:
    assert not issubclass(ClientStateError, REFUSALS)


# --- mutations --------------------------------------------------------------------------------------------------
Edit = tuple[str, int, bytes]
EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "set"]),
        st.integers(min_value=0, max_value=1 << 20),
        st.binary(min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=4,
)
FLIPS = st.lists(st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=1)), min_size=1)


def apply(data: bytes, edits: list[Edit], lo: int = 0, hi: int | None = None) -> bytes:
    """Each edit at a position in [lo, hi): flip bits, insert, delete or overwrite some bytes."""
    out = bytearray(data)
    for op, where, blob in edits:
        end = len(out) if hi is None else min(hi, len(out))
        if end <= lo:
            break
        at = lo + where % (end - lo)
        if op == "flip":
            out[at] ^= blob[0] or 0x01
        elif op == "insert":
            out[at:at] = blob
        elif op == "delete":
            del out[at : at + len(blob)]
        else:
            out[at : at + len(blob)] = blob
    return bytes(out)


def _with_part(lab: Lab, old: bytes, data: bytes) -> bytes:
    """The delivery with one inner part's payload `old` swapped for `data`, signed again by the server."""
    content = lab.content.replace(kit_.smtp_base64(old), kit_.smtp_base64(data))
    return kit_.resigned(lab.kit, lab.raw, content)


def _with_cms_certs(lab: Lab, certs: list[bytes]) -> bytes:
    info = a_cms.ContentInfo.load(lab.cms)
    info["content"]["certificates"] = [a_x509.Certificate.load(c) for c in certs]
    return kit_.rebuilt(lab.headers, info.dump())


@FUZZ
@given(edits=EDITS)
def test_mutated_raw_mail(lab: Lab, edits: list[Edit]) -> None:
    outcome(lab, apply(lab.raw, edits))


@FUZZ
@given(edits=EDITS)
def test_mutated_base64_body(lab: Lab, edits: list[Edit]) -> None:
    outcome(lab, apply(lab.raw, edits, lo=len(lab.headers) + 4))


@FUZZ
@given(edits=EDITS)
def test_mutated_cms_der(lab: Lab, edits: list[Edit]) -> None:
    """The certificates, signer info and the structure around them are not covered by the signature."""
    outcome(lab, kit_.rebuilt(lab.headers, apply(lab.cms, edits)))


CERT_EDITS = st.one_of(
    st.tuples(st.just("flips"), FLIPS),
    st.tuples(st.just("edits"), EDITS),
    st.tuples(st.just("duplicate"), st.integers(0, 12)),
    st.tuples(st.just("key-oid"), st.sampled_from([kit_.UNKNOWN_9, kit_.DSA_7])),
)


def _edited(cert: x509.Certificate, how: tuple[str, object], ca_key: kit_.PrivateKey | None) -> bytes | None:
    kind, arg = how
    der = cert.public_bytes(DER)
    if kind == "flips":  # inside the TBS only, so that the CA's signature makes them chain
        return kit_.edited_certificate(cert, lambda tbs: apply(tbs, arg, lo=4), ca_key)  # type: ignore[arg-type]
    if kind == "edits":
        return apply(der, arg)  # type: ignore[arg-type]
    if kind == "duplicate":
        return kit_.edited_certificate(cert, kit_.duplicate_extension(int(arg)), ca_key)  # type: ignore[call-overload]
    assert isinstance(arg, bytes)
    old = kit_.RSA_ENCRYPTION if len(arg) == len(kit_.RSA_ENCRYPTION) else kit_.EC_PUBLIC_KEY
    if der.count(old) != 1:
        return None
    return kit_.edited_certificate(cert, kit_.key_algorithm(old, arg), ca_key)


def _one_changed(
    lab: Lab,
    ders: tuple[bytes, ...],
    which: int,
    how: tuple[str, object],
    resign: bool,
    build: Callable[[list[bytes]], bytes],
    wrap: Callable[[bytes, bytes], bytes],
) -> bytes | None:
    """The mail with certificate `which` of `ders` changed `how`, signed again by its real CA when
    `resign` (so that it still chains); `build` puts the list in, `wrap(old, new)` swaps the bytes when
    asn1crypto cannot take the changed certificate at all."""
    kit = lab.kit
    cert = x509.load_der_x509_certificate(ders[which])
    ca_key = kit.ca.root_key if cert in (kit.ca.issuing, kit.ca.root) else kit.ca.issuing_key
    edited = _edited(cert, how, ca_key if resign else None)
    if edited is None:
        return None
    certs = list(ders)
    certs[which] = edited
    try:
        return build(certs)
    except ValueError:
        return wrap(ders[which], edited)


@FUZZ
@given(which=st.integers(0, 3), how=CERT_EDITS, resign=st.booleans())
def test_mutated_delivered_certificate(lab: Lab, which: int, how: tuple[str, object], resign: bool) -> None:
    """One certificate of the certs-only part changed, in a delivery signed again by the real server key."""
    raw = _one_changed(
        lab,
        lab.delivered,
        which,
        how,
        resign,
        lambda certs: _with_part(lab, lab.certs_only, kit_.certs_only_der(certs)),
        lambda old, new: _with_part(lab, lab.certs_only, lab.certs_only.replace(old, new)),
    )
    if raw is not None:
        outcome(lab, raw)


@FUZZ
@given(which=st.integers(0, 2), how=CERT_EDITS, resign=st.booleans())
def test_mutated_signature_certificate(lab: Lab, which: int, how: tuple[str, object], resign: bool) -> None:
    """One certificate the CMS carries (the server's signer, its issuing CA, the root) changed."""
    raw = _one_changed(
        lab,
        lab.cms_certs,
        which,
        how,
        resign,
        lambda certs: _with_cms_certs(lab, certs),
        lambda old, new: kit_.rebuilt(lab.headers, lab.cms.replace(old, new)),
    )
    if raw is not None:
        outcome(lab, raw)


@FUZZ
@given(edits=EDITS)
def test_mutated_inner_mime_signed_again(lab: Lab, edits: list[Edit]) -> None:
    outcome(lab, kit_.resigned(lab.kit, lab.raw, apply(lab.content, edits)))


@FUZZ
@given(edits=EDITS)
def test_mutated_certs_only_signed_again(lab: Lab, edits: list[Edit]) -> None:
    outcome(lab, _with_part(lab, lab.certs_only, apply(lab.certs_only, edits)))


@FUZZ
@given(edits=EDITS, reenvelope=st.booleans())
def test_mutated_key_signed_again(lab: Lab, edits: list[Edit], reenvelope: bool) -> None:
    """The envelope broken, or (reenvelope) a broken PKCS#8 key properly enveloped to the client."""
    if reenvelope:
        data = envelope(apply(lab.pkcs8, edits), [lab.kit.transport[0]])
    else:
        data = apply(lab.enveloped_key, edits)
    outcome(lab, _with_part(lab, lab.enveloped_key, data))


FIELDS = ["version", "kind", "mailbox", "request_id", "generation", "signing_serial", "encryption_serial"]
FIELDS += ["key_serials", "issued_at", "reminder_at"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    mode=st.sampled_from(["bytes", "fields", "top"]),
    edits=EDITS,
    changes=st.dictionaries(st.sampled_from(FIELDS), JSON | st.just("<drop>"), min_size=1, max_size=4),
    top=JSON,
)
def test_mutated_manifest_signed_again(
    lab: Lab, mode: str, edits: list[Edit], changes: dict[str, object], top: object
) -> None:
    if mode == "bytes":
        data = apply(lab.manifest, edits)
    elif mode == "top":  # any JSON value at all
        data = json.dumps(top).encode()
    else:
        manifest = json.loads(lab.manifest)
        for name, value in changes.items():
            if value == "<drop>":
                manifest.pop(name, None)
            else:
                manifest[name] = value
        data = json.dumps(manifest).encode()
    outcome(lab, _with_part(lab, lab.manifest, data))


# --- random DER ---------------------------------------------------------------------------------------------------
def tlv(tag: int, body: bytes) -> bytes:
    return kit_._tlv(tag, body)


PRIMITIVE_TAGS = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x16, 0x17, 0x18, 0x1E, 0x80, 0x81, 0x82]
CONSTRUCTED_TAGS = [0x30, 0x31, 0xA0, 0xA1, 0xA3]
DER_VALUES = st.recursive(
    st.builds(tlv, st.sampled_from(PRIMITIVE_TAGS), st.binary(max_size=24)),
    lambda inner: st.builds(
        lambda tag, items: tlv(tag, b"".join(items)), st.sampled_from(CONSTRUCTED_TAGS), st.lists(inner, max_size=5)
    ),
    max_leaves=30,
)
OIDS = [bytes.fromhex(h) for h in ("06092a864886f70d010702", "06092a864886f70d010703", "06092a864886f70d010701")]
BLOBS = st.one_of(
    st.binary(max_size=300),
    DER_VALUES,
    # ContentInfo-shaped: signedData / envelopedData / data OID, then random content
    st.builds(lambda oid, body: tlv(0x30, oid + tlv(0xA0, body)), st.sampled_from(OIDS), DER_VALUES),
)


@FUZZ
@given(where=st.sampled_from(["signed-data", "certs-only", "key", "cms-certificate"]), blob=BLOBS)
def test_random_der(lab: Lab, where: str, blob: bytes) -> None:
    if where == "signed-data":
        raw = kit_.rebuilt(lab.headers, blob)
    elif where == "certs-only":
        raw = _with_part(lab, lab.certs_only, blob)
    elif where == "key":
        raw = _with_part(lab, lab.enveloped_key, blob)
    else:
        try:
            raw = _with_cms_certs(lab, [*lab.cms_certs, blob])
        except ValueError:
            return
    outcome(lab, raw)


# --- random MIME, through sync ------------------------------------------------------------------------------------------
TYPES = [
    "application/pkcs7-mime",
    "application/x-pkcs7-mime",
    "multipart/mixed",
    "multipart/signed",
    "text/plain",
    "message/rfc822",
    "application/pkcs7-mime; smime-type=signed-data",
    "application/pkcs7-mime; smime-type=certs-only",
    "application/pkcs7-mime; smime-type=enveloped-data",
    "application/json",
]
ENCODINGS = ["base64", "quoted-printable", "7bit", "8bit", "binary", "x-uuencode", "uuencode", "bogus", ""]
HEADER_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40).map(
    lambda t: t.replace("\r", "").replace("\n", " ")
)
PARAMS = st.lists(
    st.tuples(
        st.sampled_from(["smime-type", "name", "filename", "boundary", "charset", "filename*", "name*0*", "name*1"]),
        HEADER_TEXT,
    ),
    max_size=3,
)


@st.composite
def mime_part(draw: st.DrawFn, depth: int = 0) -> bytes:
    ctype = draw(st.sampled_from(TYPES))
    lines = [f"Content-Type: {ctype}" + "".join(f'; {k}="{v}"' for k, v in draw(PARAMS))]
    encoding = draw(st.sampled_from(ENCODINGS))
    if encoding:
        lines.append(f"Content-Transfer-Encoding: {encoding}")
    if draw(st.booleans()):
        name = draw(st.sampled_from(["mailkms-delivery.json", "certs.p7c", "key-1.p7m", "smime.p7m", "x"]))
        lines.append(f'Content-Disposition: attachment; filename="{name}"')
    for _ in range(draw(st.integers(0, 2))):
        lines.append(
            f"{draw(st.sampled_from(['Subject', 'From', 'Message-ID', 'X-Other', 'MIME-Version']))}: {draw(HEADER_TEXT)}"
        )
    if ctype.startswith("multipart") and depth < 3:
        boundary = draw(st.sampled_from(["b1", "==b==", "x" * 70, ""]))
        lines[0] += f'; boundary="{boundary}"'
        parts = draw(st.lists(mime_part(depth + 1), max_size=3))
        body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
        body += draw(st.sampled_from([b"--" + boundary.encode() + b"--\r\n", b"", b"--junk"]))
    else:
        data = draw(st.one_of(BLOBS, st.binary(max_size=200), st.just(b'{"version": 1}')))
        body = base64.encodebytes(data).replace(b"\n", b"\r\n") if draw(st.booleans()) else data
    head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    return head + b"\r\n\r\n" + body


@st.composite
def mime_mail(draw: st.DrawFn) -> bytes:
    outer = [
        f"From: {draw(st.sampled_from(['mailkms@kms.example.org', '', '<>', '=?utf-8?b?////?=']) | HEADER_TEXT)}",
        f"Message-ID: {draw(st.sampled_from(['<a@b>', '<', '', '=?x?q?=ff?=']) | HEADER_TEXT)}",
        f"{DELIVERY_HEADER}: {draw(HEADER_TEXT)}",
        "MIME-Version: 1.0",
    ]
    return "\r\n".join(outer).encode("utf-8", "surrogateescape") + b"\r\n" + draw(mime_part())


@pytest.fixture(scope="module")
def sync_kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return make_kit(tmp_path_factory.mktemp("fuzz-sync") / "home")


@FUZZ
@given(raw=mime_mail())
def test_random_mime_through_sync(sync_kit: Kit, raw: bytes) -> None:
    key = sync_kit.add_mail(raw)
    report = sync_kit.client.sync()  # anything but a mailkms refusal would raise here
    assert report.installed == []
    for line in report.refused:
        assert "could not be read" not in line and line.isprintable(), line
    processed = sync_kit.client.state().processed
    assert key not in processed or processed[key].startswith("refused: ")


@FUZZ
@given(raw=mime_mail(), edits=EDITS)
def test_random_mime_around_the_real_signed_data(lab: Lab, raw: bytes, edits: list[Edit]) -> None:
    """A random MIME tree whose first pkcs7 body is the real (or a mutated) SignedData."""
    body = base64.encodebytes(apply(lab.cms, edits) if edits[0][0] != "set" else lab.cms).replace(b"\n", b"\r\n")
    outcome(lab, raw.replace(b"\r\n\r\n", b"\r\n\r\n" + body + b"\r\n", 1))

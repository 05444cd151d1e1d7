"""CMP requests made by `openssl cmp` itself: written with -reqout while nothing listens on the
port (the connection is refused), optionally at a given time (libfaketime), and answers read back."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailkms.pki import PrivateKey
from mailkms.pki._cmp import parse_request as parse_cmp_request
from tests.smime_support import require_tools


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openssl_request(tmp: Path, *args: str, at: dt.datetime | None = None) -> bytes:
    """What `openssl cmp ARGS` sends (at `at`, when given)."""
    require_tools("openssl", package="openssl")
    env = dict(os.environ)
    if at is not None:
        from tests.e2e.conftest import libfaketime

        stamp = at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        env.update({"LD_PRELOAD": libfaketime(), "FAKETIME": f"@{stamp}", "TZ": "UTC"})
    out = tmp / f"req-{os.urandom(4).hex()}.der"
    command = ["openssl", "cmp", "-server", f"127.0.0.1:{_closed_port()}", "-path", "cmp", "-reqout", str(out)]
    subprocess.run([*command, *args], capture_output=True, timeout=60, cwd=tmp, env=env)
    assert out.exists(), "openssl cmp wrote no request"
    return out.read_bytes()


def write_key(path: Path, key: PrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def answer_of(data: bytes) -> tuple[str, list[int], str]:
    """(body, the failInfo bits set, statusString) of an answer; bits and text empty unless an error."""
    answer = parse_cmp_request(data)
    if answer.body != "error":
        return answer.body, [], ""
    info = answer.message["body"]["error"]["pKIStatusInfo"]
    bits = [i for i, bit in enumerate(info["failInfo"]) if bit] if info["failInfo"].isValue else []
    text = " ".join(str(t) for t in info["statusString"]) if info["statusString"].isValue else ""
    return "error", bits, text


def issued_certificate(data: bytes) -> x509.Certificate:
    from pyasn1.codec.der import encoder

    answer = parse_cmp_request(data)
    rep = answer.message["body"][answer.body]
    cert = rep["response"][0]["certifiedKeyPair"]["certOrEncCert"]["certificate"]
    from pyasn1_alt_modules import rfc5280

    plain = rfc5280.Certificate()  # the [0] EXPLICIT wrapper off: the same fields, untagged
    for name, value in cert.items():
        plain[name] = value
    return x509.load_der_x509_certificate(bytes(encoder.encode(plain)))

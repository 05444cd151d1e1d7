"""What the default `mailkms init` makes, judged by pkilint (issue 12): the root and issuing CA
certificates by `lint_pkix_cert`, the server's mail-signing certificate and a user's pair by
`lint_cabf_smime_cert`; with and without `--country`. 0 findings at WARNING."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.e2e.conftest import enrolled, init_deployment
from tests.judges import lint_pkix, lint_smime


@pytest.mark.parametrize("country", [None, "DE"], ids=["no-country", "country"])
def test_default_init_certificates_pass_pkilint(tmp_path: Path, country: str | None) -> None:
    dep = init_deployment(tmp_path / "data", ["--country", country] if country else [])
    try:
        ca = dep.data / "ca"
        root = x509.load_pem_x509_certificate((ca / "root.crt.pem").read_bytes())
        issuing = x509.load_pem_x509_certificate((ca / "issuing.crt.pem").read_bytes())
        for cert in (root, issuing):
            countries = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)]
            assert countries == ([country] if country else [])  # the option reached the names
            verdict = lint_pkix(cert)
            assert verdict.exit_code == 0, f"{cert.subject.rfc4514_string()}: {verdict}"
        signer = x509.load_pem_x509_certificate((dep.data / "mail" / "signer.crt.pem").read_bytes())
        verdict = lint_smime(signer)
        assert verdict.exit_code == 0, f"mail signer: {verdict}"

        dep.start()
        alice = enrolled(dep, tmp_path, "alice@example.org")
        for kind in ("signing", "encryption"):
            cert = x509.load_pem_x509_certificate(alice.run("cert", kind).out.encode())
            assert cert.issuer == issuing.subject
            verdict = lint_smime(cert)
            assert verdict.exit_code == 0, f"{kind}: {verdict}"
    finally:
        dep.stop()

"""Outside judges for certificates: pkilint (in process, through its own command-line entry points)
and `openssl verify` (a real subprocess). Tests assert on what they say, never on our own opinion.

pkilint's `main(cli_args)` functions are the console scripts themselves, so calling them in process
gives the same verdict as `lint_cabf_smime_cert lint -d -s WARNING cert.pem` without paying for a
Python start-up per certificate. The exit code is the number of findings at the given severity.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib
import io
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

_TOOLS = {
    "lint_cabf_smime_cert",
    "lint_pkix_cert",
    "lint_cabf_serverauth_cert",
    "lint_crl",
    "lint_ocsp_response",
}


@dataclass(frozen=True)
class Verdict:
    exit_code: int
    output: str

    def __str__(self) -> str:
        return f"exit {self.exit_code}\n{self.output}"


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pkilint(tool: str, args: Sequence[str], document: x509.Certificate | bytes) -> Verdict:
    """Run `<tool> lint <args> FILE` in process; `document` is a certificate or PEM/DER bytes."""
    if tool not in _TOOLS:
        raise ValueError(f"unknown pkilint tool {tool}")
    main = importlib.import_module(f"pkilint.bin.{tool}").main
    data = pem(document) if isinstance(document, x509.Certificate) else document
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "document.pem"
        path.write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(["lint", *args, str(path)])
            except SystemExit as exc:  # argparse refusals
                code = exc.code if isinstance(exc.code, int) else 1
    return Verdict(int(code), (out.getvalue() + err.getvalue()).strip())


@functools.cache
def _smime_validator(level: object, generation: object) -> Any:
    from pkilint.cabf import smime
    from pkilint.pkix import certificate

    return certificate.create_pkix_certificate_validator_container(
        smime.create_decoding_validators(), smime.create_subscriber_validators(level, generation)
    )


def lint_smime(cert: x509.Certificate) -> Verdict:
    """The subscriber judge, `lint_cabf_smime_cert lint -d -s WARNING`, with the validator built once
    per certificate type (as pkilint's own REST server does) instead of once per certificate: the
    build is 95% of the console script's time. test_profiles checks that both give one verdict."""
    from pkilint import loader, report
    from pkilint.cabf import smime
    from pkilint.validation import ValidationFindingSeverity

    doc = loader.RFC5280CertificateDocumentLoader().load_der_document(
        cert.public_bytes(serialization.Encoding.DER), "certificate"
    )
    level_generation = smime.determine_validation_level_and_generation(doc)
    if level_generation is None:
        return Verdict(1, "Could not determine validation level and generation")
    results = _smime_validator(*level_generation).validate(doc.root)
    severity = ValidationFindingSeverity.WARNING
    count = min(report.get_findings_count(results, severity), 255)
    return Verdict(count, str(report.report_wrapper(report.ReportGeneratorPlaintext, results, severity)).strip())


def lint_pkix(cert: x509.Certificate) -> Verdict:
    return pkilint("lint_pkix_cert", ["-s", "WARNING"], cert)


def lint_serverauth(cert: x509.Certificate, *type_args: str) -> Verdict:
    """TLS BR linter as the stand-in for CA certificates: `-t ROOT-CA`, `-d`, `-t OCSP-RESPONDER`."""
    return pkilint("lint_cabf_serverauth_cert", [*type_args, "-s", "WARNING"], cert)


def openssl_verify(
    leaf: x509.Certificate,
    root: x509.Certificate,
    untrusted: Sequence[x509.Certificate] = (),
    *,
    purpose: str,
    at: dt.datetime,
    crls: Sequence[x509.CertificateRevocationList] = (),
) -> Verdict:
    """`openssl verify -x509_strict -purpose P -attime T -CAfile root -untrusted chain leaf`; with
    `crls`, `-crl_check_all -CRLfile crls` (every certificate of the chain needs its CRL)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "root.pem").write_bytes(pem(root))
        (d / "leaf.pem").write_bytes(pem(leaf))
        cmd = ["openssl", "verify", "-x509_strict", "-purpose", purpose, "-attime", str(int(at.timestamp()))]
        cmd += ["-CAfile", str(d / "root.pem")]
        if crls:
            (d / "crls.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))
            cmd += ["-crl_check_all", "-CRLfile", str(d / "crls.pem")]
        if untrusted:
            (d / "untrusted.pem").write_bytes(b"".join(pem(c) for c in untrusted))
            cmd += ["-untrusted", str(d / "untrusted.pem")]
        done = subprocess.run([*cmd, str(d / "leaf.pem")], capture_output=True, text=True, timeout=60)
    return Verdict(done.returncode, (done.stdout + done.stderr).strip())

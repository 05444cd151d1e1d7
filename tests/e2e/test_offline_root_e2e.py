"""Issue 15 §2 end to end: an offline root. Real `mailkms init --offline-root`, `mailkms serve`,
`mailkms-client`, the ceremony commands and `mailkms ca import`, under faketime; judged by openssl
(s_client, verify -crl_check_all), pkilint and the server's own /metrics and log.

  day 0    init with the root key only in ROOT/; serve; alice enrols; TLS verifies to the root
           through the infrastructure CA; everything is pkilint-clean
  day 160  the root CRL (180 days) is within 30 days of nextUpdate: the server warns (log, /metrics,
           doctor) instead of signing; a ceremony signs a new issuing CA certificate, a new
           infrastructure CA (new key) and a root CRL; the server imports them and restarts
  day 380  alice renews under the new issuing CA certificate; openssl verify -crl_check_all passes
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.conftest import BIN, PUBLIC_URL, ClientHome, Deployment, Result, _env, enrolled, openssl
from tests.judges import lint_pkix, lint_serverauth, lint_smime, pkilint

ROOT_PASSPHRASE = "root passphrase for this e2e run, 42 & more"
WARN_DAY = 160  # the first root CRL runs 180 days; the warning starts 30 days before
RENEW_DAY = 380


def _mailkms(dep: Deployment, *args: str, offset_days: float | None = None, root: bool = False) -> Result:
    """The admin CLI; only ceremony and init runs get the root passphrase (never the server)."""
    extra = {**dep.env, **({"MAILKMS_ROOT_PASSPHRASE": ROOT_PASSPHRASE} if root else {})}
    proc = subprocess.run(
        [str(BIN / "mailkms"), *args],
        env=_env(extra, offset_days),
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == 0, f"mailkms {' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}"
    return result


def init_offline(tmp_path: Path) -> tuple[Deployment, Path]:
    """`mailkms init --offline-root` into tmp/data, the root folder at tmp/removable/root."""
    dep = Deployment(tmp_path / "data")
    root_dir = tmp_path / "removable" / "root"
    init = ["init", "--hostname", "localhost", "--public-url", PUBLIC_URL, "--offline-root", str(root_dir)]
    _mailkms(dep, *init, "--country", "DE", root=True)
    return dep, root_dir


def _pem(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _served_chain(dep: Deployment, root: Path, work: Path, offset_days: float | None = None) -> list[x509.Certificate]:
    """openssl s_client against the running server, trusting only the root: verify result 0."""
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{dep.https_port}", "-servername", "localhost"]
    args += ["-CAfile", str(root), "-verify_return_error", "-verify_hostname", "localhost", "-showcerts"]
    if offset_days:
        args += ["-attime", str(int((dt.datetime.now(dt.UTC) + dt.timedelta(days=offset_days)).timestamp()))]
    done = subprocess.run(args, input=b"", capture_output=True, timeout=60)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0 and "Verify return code: 0 (ok)" in out, out + done.stderr.decode(errors="replace")
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", out, re.S)
    return [x509.load_pem_x509_certificate(b.encode()) for b in blocks]


def _metrics(dep: Deployment) -> dict[str, float]:
    # The TLS chain is judged by s_client (with -attime under faketime); here only the numbers count.
    text = httpx.get(f"{dep.url}/metrics", verify=False, timeout=10).text
    wanted = ("mailkms_root_crl_next_update_seconds", "mailkms_root_crl_due")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.split(" ")[0] in wanted}


def _lint_crl(der: bytes, kind: str) -> None:
    pem = x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
    verdict = pkilint("lint_crl", ["-t", kind, "-p", "BR", "-s", "WARNING"], pem)
    assert verdict.exit_code == 0, f"{kind}: {verdict}"


def _fetch_published(dep: Deployment, url: str) -> bytes:
    """A URL written into a certificate (PUBLIC_URL...), fetched from the server's plain-http port."""
    assert url.startswith(PUBLIC_URL), url
    got = httpx.get(f"http://127.0.0.1:{dep.http_port}/{url.removeprefix(PUBLIC_URL)}", timeout=10)
    assert got.status_code == 200, f"{url}: {got.status_code} {got.text}"
    return got.content


def _tls_chain_checks_crls(
    dep: Deployment, chain: list[x509.Certificate], root_pem: Path, work: Path, days: int
) -> None:
    """The TLS leaf's CDP and AIA resolve on the server; `openssl verify -crl_check_all` passes on the
    whole TLS chain with the CRLs found there (root CRL for the infrastructure CA, its CRL for the
    leaf); pkilint finds nothing in the infrastructure CA's CRL (BR CRL profile)."""
    leaf, infra = chain[0], chain[1]
    cdp = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    [crl_url] = [str(n.value) for p in cdp for n in p.full_name or []]
    aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    [issuer_url] = [str(a.access_location.value) for a in aia]
    assert x509.load_der_x509_certificate(_fetch_published(dep, issuer_url)) == infra
    infra_crl = _fetch_published(dep, crl_url)
    _lint_crl(infra_crl, "CRL")  # the leaf names localhost here: pkilint judges it in the unit test (kms.example.org)
    root_crl = _fetch_published(dep, PUBLIC_URL + "crl/root.crl")
    work.mkdir(exist_ok=True)
    (work / "tls-leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (work / "tls-infra.pem").write_bytes(infra.public_bytes(serialization.Encoding.PEM))
    (work / "tls-crls.pem").write_bytes(
        b"".join(x509.load_der_x509_crl(d).public_bytes(serialization.Encoding.PEM) for d in (infra_crl, root_crl))
    )
    attime = str(int((dt.datetime.now(dt.UTC) + dt.timedelta(days=days, minutes=5)).timestamp()))
    ok = openssl(
        *("verify", "-x509_strict", "-purpose", "sslserver", "-attime", attime, "-CAfile", str(root_pem)),
        *("-untrusted", str(work / "tls-infra.pem"), "-crl_check_all", "-CRLfile", str(work / "tls-crls.pem")),
        str(work / "tls-leaf.pem"),
    )
    assert ok.returncode == 0, (ok.stdout + ok.stderr).decode()


def test_offline_root_ceremony_import_and_renewal(tmp_path: Path) -> None:
    dep, root_dir = init_offline(tmp_path)
    ca = dep.data / "ca"
    root_pem = ca / "root.crt.pem"
    root = _pem(root_pem)

    # The data folder holds no root key: none of its keys opens to the root's public key.
    assert not (ca / "root.key.pem").exists() and (root_dir / "root.key.pem").exists()
    ca_passphrase = (ca / "passphrase").read_bytes().strip()
    for path in dep.data.rglob("*"):
        if path.is_file() and b"PRIVATE KEY" in path.read_bytes():
            key = serialization.load_pem_private_key(path.read_bytes(), ca_passphrase)
            assert key.public_key() != root.public_key(), path
    stored_root = serialization.load_pem_private_key((root_dir / "root.key.pem").read_bytes(), ROOT_PASSPHRASE.encode())
    assert stored_root.public_key() == root.public_key()

    infra_old = _pem(ca / "infrastructure.crt.pem")
    issuing_old = _pem(ca / "issuing.crt.pem")
    assert lint_pkix(root).exit_code == 0
    assert lint_serverauth(root, "-t", "ROOT-CA").exit_code == 0
    for cert in (issuing_old, infra_old):
        for verdict in (lint_pkix(cert), lint_serverauth(cert, "-d")):
            assert verdict.exit_code == 0, f"{cert.subject.rfc4514_string()}: {verdict}"
    _lint_crl((dep.data / "crl" / "root.crl").read_bytes(), "ARL")

    try:
        dep.start()
        chain = _served_chain(dep, root_pem, tmp_path)
        assert [c.subject for c in chain] == [chain[0].subject, infra_old.subject]
        assert chain[0].issuer == infra_old.subject  # TLS from the infrastructure CA, not from the root
        _tls_chain_checks_crls(dep, chain, root_pem, tmp_path / "tls0", 0)
        alice = enrolled(dep, tmp_path, "alice@example.org")
        for kind in ("signing", "encryption"):
            verdict = lint_smime(x509.load_pem_x509_certificate(alice.run("cert", kind).out.encode()))
            assert verdict.exit_code == 0, f"{kind}: {verdict}"
        issuing_crl = httpx.get(f"http://127.0.0.1:{dep.http_port}/crl/issuing.crl", timeout=10).content
        _lint_crl(issuing_crl, "CRL")
        fresh = _metrics(dep)
        assert fresh["mailkms_root_crl_due"] == 0
        assert 179 * 86400 < fresh["mailkms_root_crl_next_update_seconds"] <= 180 * 86400

        # Day 160: the server cannot sign the root CRL; it says so, in the log, /metrics and doctor.
        dep.stop()
        dep.start(offset_days=WARN_DAY)
        due = _metrics(dep)
        assert due["mailkms_root_crl_due"] == 1
        assert 19 * 86400 < due["mailkms_root_crl_next_update_seconds"] < 21 * 86400
        assert "the root CRL (number 1) expires at" in dep.log() and "root-ceremony sign-crl" in dep.log()
        doctor = dep.admin("doctor", "--json", offset_days=WARN_DAY, check=False).json()
        assert isinstance(doctor, dict)
        assert "root-crl-due" in [f["code"] for f in doctor["findings"]]

        # The ceremony: CSRs out, certificates and a CRL back.
        work = tmp_path / "carry"
        work.mkdir()
        _mailkms(dep, "ca", "request", "--kind", "issuing", "--out", str(work / "issuing.csr"))
        _mailkms(dep, "ca", "request", "--kind", "infrastructure", "--new-key", "--out", str(work / "infra.csr"))
        ceremony = ["ca", "root-ceremony"]
        at = {"offset_days": WARN_DAY, "root": True}
        _mailkms(
            dep,
            *ceremony,
            "sign-ca",
            "--root",
            str(root_dir),
            str(work / "issuing.csr"),
            "--out",
            str(work / "issuing.crt"),
            **at,
        )  # type: ignore[arg-type]
        _mailkms(
            dep,
            *ceremony,
            "sign-ca",
            "--root",
            str(root_dir),
            str(work / "infra.csr"),
            "--out",
            str(work / "infra.crt"),
            **at,
        )  # type: ignore[arg-type]
        revoke = f"{infra_old.serial_number:x}:superseded"
        signed = _mailkms(
            dep,
            *ceremony,
            "sign-crl",
            "--root",
            str(root_dir),
            "--days",
            "365",
            "--revoke",
            revoke,
            "--out",
            str(work / "root.crl"),
            "--json",
            **at,
        )  # type: ignore[arg-type]
        assert signed.json()["crl_number"] == 2  # type: ignore[index]
        issuing_new, infra_new = _pem(work / "issuing.crt"), _pem(work / "infra.crt")
        for cert in (issuing_new, infra_new):
            for verdict in (lint_pkix(cert), lint_serverauth(cert, "-d")):
                assert verdict.exit_code == 0, f"{cert.subject.rfc4514_string()}: {verdict}"
        _lint_crl((work / "root.crl").read_bytes(), "ARL")
        assert issuing_new.serial_number != issuing_old.serial_number
        assert infra_new.public_key() != infra_old.public_key()
        imported = _mailkms(
            dep,
            "ca",
            "import",
            str(work / "issuing.crt"),
            str(work / "infra.crt"),
            str(work / "root.crl"),
            "--json",
            offset_days=WARN_DAY,
        ).json()
        assert [i["what"] for i in imported["imported"]] == ["issuing-ca", "infrastructure-ca", "root-crl"]  # type: ignore[index]

        # No restart: the running server notices the files ([ca] reload_check_seconds, 5 s) and takes them.
        wanted = {
            "ca/issuing.crt": issuing_new.public_bytes(serialization.Encoding.DER),
            "ca/infrastructure.crt": infra_new.public_bytes(serialization.Encoding.DER),
            "crl/root.crl": (work / "root.crl").read_bytes(),
        }
        everything = ["infrastructure-ca", "infrastructure-crl", "issuing-ca", "root-crl", "tls"]
        deadline = time.monotonic() + 60
        while True:  # the import writes file by file: one round or several, each logged when done
            taken = re.findall(r"CA files changed: took ([a-z, -]+) without a restart", dep.log())
            if sorted(w for line in taken for w in line.split(", ")) == everything:
                break
            assert time.monotonic() < deadline, dep.log()
            time.sleep(0.5)
        for path, der in wanted.items():
            assert _fetch_published(dep, PUBLIC_URL + path) == der, path
        assert dep.proc is not None  # SIGHUP: looked at once, and the server stays up
        os.kill(dep.proc.pid, signal.SIGHUP)
        while "SIGHUP: the CA files are unchanged" not in dep.log():
            assert time.monotonic() < deadline + 30 and dep.proc.poll() is None, dep.log()
            time.sleep(0.2)
        assert _metrics(dep)["mailkms_root_crl_due"] == 0
        chain = _served_chain(dep, root_pem, tmp_path, WARN_DAY)  # new handshakes: the new TLS certificate
        assert chain[1] == infra_new and chain[0].issuer == infra_new.subject
        _tls_chain_checks_crls(dep, chain, root_pem, tmp_path / "tls160", WARN_DAY)  # the new key signs its CRL
        # Issuance goes on after the swap: the signer processes were replaced by ones holding the new certificate.
        bob = ClientHome(tmp_path / "client-bob", "bob@example.org")
        assert bob.enroll(dep, dep.add_user("bob@example.org", offset_days=WARN_DAY), offset_days=WARN_DAY).code == 0
        dep.wait_for_mails("bob@example.org", 1)
        assert bob.run("sync", offset_days=WARN_DAY).code == 0
        bob_cert = x509.load_pem_x509_certificate(bob.run("cert", "signing", offset_days=WARN_DAY).out.encode())
        assert bob_cert.issuer == issuing_new.subject
        bob_cert.verify_directly_issued_by(issuing_new)
        served_root_crl = httpx.get(f"http://127.0.0.1:{dep.http_port}/crl/root.crl", timeout=10).content
        assert served_root_crl == (work / "root.crl").read_bytes()

        # Day 380: renewal under the new issuing CA certificate (the same key), then -crl_check_all.
        dep.stop()
        dep.start(offset_days=RENEW_DAY)
        res = alice.run("logon", "--answer", "yes", offset_days=RENEW_DAY)
        assert res.code == 0 and "update request was sent" in res.out, res.out + res.err
        dep.wait_for_mails("alice@example.org", 2)
        res = alice.run("logon", offset_days=RENEW_DAY)
        assert res.code == 0 and "Installed" in res.out, res.out + res.err
        renewed = x509.load_pem_x509_certificate(alice.run("cert", "signing").out.encode())
        assert renewed.not_valid_before_utc > issuing_new.not_valid_before_utc
        verdict = lint_smime(renewed)
        assert verdict.exit_code == 0, str(verdict)

        leaf = tmp_path / "renewed.pem"
        leaf.write_bytes(renewed.public_bytes(serialization.Encoding.PEM))
        (tmp_path / "issuing-new.pem").write_bytes(issuing_new.public_bytes(serialization.Encoding.PEM))
        crls = tmp_path / "crls.pem"
        issuing_crl = httpx.get(f"http://127.0.0.1:{dep.http_port}/crl/issuing.crl", timeout=10).content
        _lint_crl(issuing_crl, "CRL")
        crls.write_bytes(
            x509.load_der_x509_crl(issuing_crl).public_bytes(serialization.Encoding.PEM)
            + x509.load_der_x509_crl(served_root_crl).public_bytes(serialization.Encoding.PEM)
        )
        attime = str(int((dt.datetime.now(dt.UTC) + dt.timedelta(days=RENEW_DAY, minutes=5)).timestamp()))
        base = ["verify", "-x509_strict", "-purpose", "smimesign", "-attime", attime, "-CAfile", str(root_pem)]
        ok = openssl(
            *base, "-untrusted", str(tmp_path / "issuing-new.pem"), "-crl_check_all", "-CRLfile", str(crls), str(leaf)
        )
        assert ok.returncode == 0, (ok.stdout + ok.stderr).decode()
        # openssl did read the root CRL: without it the issuing CA has no CRL (error 3), and the old
        # infrastructure CA, revoked at the ceremony, is reported revoked (error 23).
        only_issuing = tmp_path / "issuing-crl.pem"
        only_issuing.write_bytes(x509.load_der_x509_crl(issuing_crl).public_bytes(serialization.Encoding.PEM))
        issuing_new_pem = str(tmp_path / "issuing-new.pem")
        no_root_crl = openssl(
            *base, "-untrusted", issuing_new_pem, "-crl_check_all", "-CRLfile", str(only_issuing), str(leaf)
        )
        assert (
            no_root_crl.returncode != 0 and b"unable to get certificate CRL" in no_root_crl.stdout + no_root_crl.stderr
        )
        old_infra = tmp_path / "infra-old.pem"
        old_infra.write_bytes(infra_old.public_bytes(serialization.Encoding.PEM))
        revoked = openssl(
            "verify", "-attime", attime, "-CAfile", str(root_pem), "-crl_check", "-CRLfile", str(crls), str(old_infra)
        )
        assert revoked.returncode != 0 and b"certificate revoked" in revoked.stdout + revoked.stderr
    finally:
        dep.stop()


def test_init_refuses_a_weak_or_missing_root_passphrase_and_writes_nothing(tmp_path: Path) -> None:
    data, root_dir = tmp_path / "data", tmp_path / "root"
    base = [str(BIN / "mailkms"), "init", "--public-url", PUBLIC_URL, "--offline-root", str(root_dir)]
    cases = [
        ({"MAILKMS_ROOT_PASSPHRASE": "short"}, base, 2),  # too easy to guess
        ({}, base, 78),  # none given and no terminal
        ({"MAILKMS_ROOT_PASSPHRASE": ROOT_PASSPHRASE}, [*base[:-1], str(data / "root")], 2),  # inside DATA
    ]
    for extra, cmd, code in cases:
        done = subprocess.run(
            cmd,
            env=_env({"MAILKMS_DATA": str(data), **extra}, None),
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == code, done.stdout + done.stderr
        assert not root_dir.exists() and not (data / "ca").exists()

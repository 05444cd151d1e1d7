"""Signing certificates from CSRs at the speed of the cores: signed by the signer processes,
stored by group commit, one audit record each. A caller is answered only once its certificate is
committed; concurrent callers share transactions, never records."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from cryptography import x509
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.pki import CertKind, SignJob, SignOutcome, subscriber_validity
from mailkms.services._audit import AuditLog
from mailkms.services._batching import GroupCommit
from mailkms.services._bulk import defer_insert
from mailkms.services._issuance import certificate_values, serial_hex
from mailkms.services._signers import SignerPool
from mailkms.services._users import normalise_mailbox
from mailkms.store import Certificate


class CertificateIssuance:
    def __init__(
        self, signers: SignerPool, commits: GroupCommit, settings: Settings, clock: Clock, audit: AuditLog
    ) -> None:
        self._signers = signers
        self._commits = commits
        self._settings = settings
        self._clock = clock
        self._audit = audit

    def _job(self, csr: bytes, mailbox: str) -> SignJob:
        policy = self._settings.policy
        validity = subscriber_validity(self._clock.now(), policy.lifetime_months)
        return SignJob(
            CertKind.SIGNING.value,
            normalise_mailbox(mailbox),
            validity.not_before,
            validity.not_after,
            tuple(k.value for k in policy.signing_key_types),
            csr=csr,
        )

    def issue_signing(self, csr: bytes, mailbox: str, actor: str) -> x509.Certificate:
        """A signing certificate for the CSR's key, naming `mailbox` (the CSR may name no other):
        checked and signed by a signer process, stored and audited; returned once durable."""
        job = self._job(csr, mailbox)
        if self._signers.processes == 0 or not self._commits.batches_units:
            cert = self._signers.sign([job])[0]
            self._commits.run(lambda session: self._record(session, [(job.mailbox, cert)], actor), isolated=False)
            return cert
        # Signed, then stored, without waking the caller in between: the signer's answer hands the
        # unit to the writer (on the signer pool's result thread), and the caller wakes once, when
        # its certificate is committed. One thread switch fewer per certificate under load.
        done: Future[x509.Certificate] = Future()

        def store(outcome: Future[SignOutcome]) -> None:
            try:
                cert = self._signers.certificate(outcome.result())

                def work(session: Session) -> x509.Certificate:
                    self._record(session, [(job.mailbox, cert)], actor)
                    return cert

                self._commits.submit(work, isolated=False).add_done_callback(lambda unit: _settle(done, unit))
            except BaseException as exc:  # noqa: BLE001 -- a refusal (or a dead signer) is the caller's answer
                done.set_exception(exc)

        self._signers.submit(job).add_done_callback(store)
        return done.result()

    def issue_signing_many(self, requests: Sequence[tuple[bytes, str]], actor: str) -> list[x509.Certificate]:
        """Many (CSR, mailbox) at once: all or none (one refused request refuses the call)."""
        jobs = [self._job(csr, mailbox) for csr, mailbox in requests]
        certs = self._signers.sign(jobs)
        pairs = [(job.mailbox, cert) for job, cert in zip(jobs, certs, strict=True)]
        self._commits.run(lambda session: self._record(session, pairs, actor), isolated=False)
        return certs

    def _record(self, session: Session, issued: Sequence[tuple[str, x509.Certificate]], actor: str) -> None:
        """Rows and records go in with the batch's other issuances, one INSERT per table (bulk)."""
        for mailbox, cert in issued:
            serial = serial_hex(cert.serial_number)
            defer_insert(session, Certificate, certificate_values(cert, None, "signing", 0))
            self._audit.append_deferred(
                session,
                actor,
                "certificate.issued",
                mailbox,
                serial=serial,
                kind="signing",
                not_after=cert.not_valid_after_utc.isoformat(),
            )

    def close(self) -> None:
        self._signers.close()
        self._commits.close()


def _settle(done: Future[x509.Certificate], unit: Future[Any]) -> None:
    exc = unit.exception()
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(unit.result())

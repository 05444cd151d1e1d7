"""Signing on every core: worker processes that hold the issuing CA key, loaded once per process.

The key is handed to each worker once, at its start, through the pipe multiprocessing opens to it
(never on a command line, never in a file); requests then carry only what is signed (mailbox,
public key or CSR, validity) and come back as DER. Requests from concurrent callers are gathered
into chunks (`signer_chunk`) so the pipe is crossed once per chunk, not once per certificate.
With `signer_processes = 0` the same code signs in the calling process.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailkms import errors
from mailkms.errors import MailkmsError
from mailkms.pki import (
    Issuer,
    KeyType,
    PrivateKey,
    PublicURLs,
    SignJob,
    SignOutcome,
    SoftSigner,
    generate_key,
    generate_key_der,
    init_signer,
    sign_chunk,
)
from mailkms.pki._pkcs11 import TokenECKey, TokenKeyRef, TokenRSAKey
from mailkms.services._batching import Batcher


def _error(name: str, detail: str) -> MailkmsError:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, MailkmsError):
        return cls(detail)
    return errors.Internal(detail)


class SignerPool:
    """`sign(jobs)` -> certificates, signed by `processes` workers (or in process when 0)."""

    def __init__(
        self, signer: SoftSigner, urls: PublicURLs, processes: int, chunk: int, ca_issuers: str | None = None
    ) -> None:
        self._signer = signer
        self._urls = urls
        self._ca_issuers = ca_issuers
        self._issuer = Issuer(signer, urls, ca_issuers)
        self._public_url = urls.base
        self.processes = processes
        self._chunk = chunk
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._batcher: Batcher[SignJob] = Batcher("mailkms-signers", self._dispatch, chunk, 0.0)

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                key = self._issuer_key_der()
                self._executor = ProcessPoolExecutor(
                    self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=init_signer,
                    initargs=(
                        self._signer.certificate.public_bytes(serialization.Encoding.DER),
                        key,
                        self._public_url,
                        self._ca_issuers,
                    ),
                )
            return self._executor

    def _issuer_key_der(self) -> bytes | TokenKeyRef:
        key = self._signer.private_key
        if isinstance(key, TokenRSAKey | TokenECKey):
            return key.reference  # each worker opens its own session on the token
        return key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def use(self, signer: SoftSigner, ca_issuers: str | None = None) -> None:
        """A new issuing CA certificate (or key) imported into a running server: the next chunks go
        to new worker processes that hold it; chunks already sent finish on the old ones."""
        with self._lock:
            self._signer = signer
            self._ca_issuers = ca_issuers
            self._issuer = Issuer(signer, self._urls, ca_issuers)
            old, self._executor = self._executor, None
        if old is not None:
            old.shutdown(wait=False)

    def start(self) -> None:
        """Start the workers now (a server at start-up), so the first requests do not wait for them."""
        if self.processes > 0:
            pool = self._pool()
            list(pool.map(_noop, range(self.processes)))

    def submit(self, job: SignJob) -> Future[SignOutcome]:
        """The job on its way to a signer process (with concurrent callers' jobs in one chunk), its
        outcome for `certificate`. Only with signer processes (`sign` signs in process without)."""
        if self.processes == 0:
            raise errors.Internal("no signer processes to submit to")
        return self._batcher.submit(job)

    def sign(self, jobs: Sequence[SignJob]) -> list[x509.Certificate]:
        if self.processes == 0:
            outcomes = sign_chunk(jobs, self._issuer)
        else:
            futures = [self._batcher.submit(job) for job in jobs]
            outcomes = [f.result() for f in futures]
        return [self.certificate(value) for value in outcomes]

    @staticmethod
    def certificate(outcome: SignOutcome) -> x509.Certificate:
        if isinstance(outcome, tuple):
            raise _error(*outcome)
        return x509.load_der_x509_certificate(outcome)

    def make_key(self, key_type: KeyType) -> PrivateKey:
        """A new key made by a worker process (both cores, the server's GIL free meanwhile); in
        process when there are no workers. The caller should hold no lock while it waits."""
        if self.processes == 0:
            return generate_key(key_type)
        pool = self._pool()
        try:
            der = pool.submit(generate_key_der, key_type.value).result()
        except BrokenProcessPool:
            self._forget(pool)
            raise
        # Made by our own worker and handed over by pipe: the RSA consistency check (as long as
        # a tenth of making the key) is skipped, as for pooled keys.
        key = serialization.load_der_private_key(der, None, unsafe_skip_rsa_key_validation=True)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise errors.Internal("the signer process returned an unexpected key")
        return key

    def _dispatch(self, batch: list[tuple[SignJob, Future[Any]]]) -> None:
        """Called on the batcher's thread: send the chunk, settle its futures when it comes back."""
        pool = self._pool()
        try:
            done = pool.submit(sign_chunk, [job for job, _ in batch])
        except BrokenProcessPool:
            self._forget(pool)  # a worker died (killed, out of memory): the next chunk starts new ones
            raise

        def settle(result: Future[list[SignOutcome]]) -> None:
            exc = result.exception()
            if isinstance(exc, BrokenProcessPool):
                self._forget(pool)
            for i, (_, future) in enumerate(batch):
                if exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(result.result()[i])

        done.add_done_callback(settle)

    def _forget(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is pool:
                self._executor = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._batcher.close()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _noop(_: int) -> None:
    # busy long enough that each start-up task is given to a process of its own. A timed wait, not time.sleep: under libfaketime with a large offset (the e2e
    # tests) clock_nanosleep on an absolute deadline fails with EINVAL and kills the worker.
    threading.Event().wait(0.2)

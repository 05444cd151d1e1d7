"""OCSP answers: a lookup in a cache of signed responses, a signature only on a miss.

Each answer is signed once by the delegated responder and served from memory until it is
`ocsp_refresh_hours` old (its nextUpdate is `ocsp_validity_hours` away, BR 4.9.10). A revocation
drops the certificate's answers at once in this process, and within `poll_seconds` on every other
node (`sync`, which asks the store what was revoked since it last looked).

Floods: a serial this CA never issued ("unused", S/MIME BR 4.9.10) is answered `unauthorized`
(RFC 6960 §2.3, RFC 5019 §2.2.3: the responder cannot answer authoritatively for it), a
constant unsigned response: no signature, no cache entry. So the cache holds answers for issued
certificates only, and is bounded in bytes (`ocsp_cache_bytes`, LRU) besides. Look-ups and
signatures run on their own few threads (`ocsp_sign_threads`) with at most `ocsp_sign_queue`
requests waiting; past that `submit` gives None and the caller answers `tryLater` at once, so a
flood cannot take the threads the outbox, the API and CRL publication run on.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from sqlalchemy import select

from mailkms import metrics
from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import Internal, KeyStoreUnavailable, Malformed
from mailkms.pki import (
    HASH_NAMES,
    MALFORMED_RESPONSE,
    SUBSCRIBER_REASONS,
    TRY_LATER_RESPONSE,
    UNAUTHORIZED_RESPONSE,
    CASigner,
    CertState,
    CertStatus,
    OCSPQuery,
    SoftSigner,
    issuer_hashes,
    parse_request,
    sign_response,
)
from mailkms.services._ca import CAPaths, load_key_at, previous_responder_certificates
from mailkms.services._issuance import serial_hex
from mailkms.store import Certificate, Database

log = logging.getLogger(__name__)

# Other nodes' clocks and commit delays: look back a little further than the last poll.
SYNC_OVERLAP = dt.timedelta(minutes=5)
# What an entry costs beyond its DER bytes: key tuple and int, _Signed, OrderedDict node, the bytes
# object's header (tracemalloc: ~245 + 33 bytes with a 159-bit serial).
ENTRY_OVERHEAD = 288


@dataclass(frozen=True, slots=True)
class OCSPAnswer:
    der: bytes
    status: str  # good | revoked | unused (never issued: answered unauthorized) | unauthorized | malformed | tryLater
    max_age: int = 0  # seconds a cache in front of us may keep it


@dataclass(frozen=True, slots=True)
class _Signed:
    der: bytes
    status: CertStatus
    signed_at: dt.datetime
    responder: x509.Certificate


@dataclass(frozen=True, slots=True)
class _Issuer:
    hashes: dict[str, tuple[bytes, bytes]]
    signer: CASigner | None  # None: the current key, answered by the delegated responder
    ski: bytes | None


def _ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def _aki(der: bytes) -> bytes | None:
    try:
        ext = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        return None
    return ext.value.key_identifier


class ResponderKeys(Protocol):
    """What an OCSP responder signs with: the CA's CAContext in `serve`, files in an OCSP-only process."""

    @property
    def issuing_certificate(self) -> x509.Certificate: ...

    def require_ocsp_responder(self) -> CASigner: ...

    def answering_for_previous(self) -> list[tuple[x509.Certificate, CASigner]]: ...


class FileResponderKeys:
    """The delegated responder's certificate and key from DATA/ocsp (no CA key), re-read when `serve`
    renews them: `refresh` compares the certificate files' mtimes. After `ca rekey`, the responder
    certificates the replaced keys issued for the same responder key (DATA/ca/previous/<SKI>/ocsp.crt.pem)
    answer for what those keys issued: still no CA key in this process."""

    def __init__(self, paths: CAPaths, passphrase: bytes) -> None:
        self._paths = paths
        self._passphrase = passphrase
        self.issuing_certificate = x509.load_pem_x509_certificate(paths.issuing_cert.read_bytes())
        self._signer: SoftSigner | None = None
        self._previous: list[tuple[x509.Certificate, CASigner]] = []
        self._stamp: tuple[int, ...] = ()
        self.refresh()

    def _files_stamp(self) -> tuple[int, ...]:
        folder = self._paths.previous_dir
        kept = sorted(folder.glob("*/ocsp.crt.pem")) if folder.exists() else []
        stamps = []
        for path in (self._paths.ocsp_cert, *kept):
            try:
                stamps.append(path.stat().st_mtime_ns)
            except FileNotFoundError:
                stamps.append(0)
        return tuple(stamps)

    def refresh(self) -> bool:
        """Load the responder again if its certificate files changed; True when they did."""
        if not self._paths.ocsp_cert.exists():
            return False
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return False
        cert = x509.load_pem_x509_certificate(self._paths.ocsp_cert.read_bytes())
        key = load_key_at(self._paths.ocsp_key, self._passphrase)
        # A rekey re-issues the responder: the issuing CA and the replaced keys' responders are read again
        # with it, all before any is taken (requests meanwhile see the old set whole)
        issuing = x509.load_pem_x509_certificate(self._paths.issuing_cert.read_bytes())
        previous: list[tuple[x509.Certificate, CASigner]] = []
        for old_ca, responder in previous_responder_certificates(self._paths):
            if responder.public_key() == cert.public_key():  # certified for this responder key
                previous.append((old_ca, SoftSigner(responder, key)))
        self._signer, self.issuing_certificate, self._previous, self._stamp = (
            SoftSigner(cert, key),
            issuing,
            previous,
            stamp,
        )
        return True

    def answering_for_previous(self) -> list[tuple[x509.Certificate, CASigner]]:
        return self._previous

    def require_ocsp_responder(self) -> SoftSigner:
        if self._signer is None:
            raise Internal("the server has no OCSP responder certificate")
        return self._signer


class OCSPResponder:
    def __init__(self, db: Database, ca: ResponderKeys, settings: Settings, clock: Clock) -> None:
        self._db = db
        self._ca = ca
        self._cfg = settings.revocation
        self._clock = clock
        self._validity = dt.timedelta(hours=self._cfg.ocsp_validity_hours)
        self._refresh = dt.timedelta(hours=self._cfg.ocsp_refresh_hours)
        self._cache: OrderedDict[tuple[int, str], _Signed] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(self._cfg.ocsp_sign_threads + self._cfg.ocsp_sign_queue)
        self._pending = 0
        # Per issuing CA certificate (the current one, and those of keys `ca rekey` replaced): its
        # CertID hashes and who signs for it; recomputed when the CA files change (rekey, import).
        self._issuers: tuple[tuple[x509.Certificate, ...], list[_Issuer]] | None = None
        self._synced_at = clock.now()

    def _signer_for(self, query: OCSPQuery) -> tuple[CASigner, bytes | None] | None:
        """Who answers for the CertID's issuer: the delegated responder for the current key, the
        replaced CA key itself for its own certificates (with that CA's SKI, to check the serial's
        issuer); None when the issuer is not ours."""
        responder = self._ca.require_ocsp_responder()
        previous = self._ca.answering_for_previous()
        current = (
            self._ca.issuing_certificate,
            responder.certificate,
            *(c for old_ca, signer in previous for c in (old_ca, signer.certificate)),
        )
        if self._issuers is None or self._issuers[0] != current:
            issuers = [_Issuer(issuer_hashes(self._ca.issuing_certificate, responder.certificate), None, None)]
            # A rekey keeps the CA's name: the responder's issuer name is the replaced keys' too.
            issuers += [
                _Issuer(issuer_hashes(old_ca, responder.certificate), signer, _ski(old_ca))
                for old_ca, signer in previous
            ]
            self._issuers = (current, issuers)
        wanted = (query.issuer_name_hash, query.issuer_key_hash)
        for issuer in self._issuers[1]:
            if issuer.hashes.get(query.hash_name) == wanted:
                if issuer.signer is None:  # the current key: it checks AKIs only when there are others
                    return responder, (_ski(self._ca.issuing_certificate) if len(self._issuers[1]) > 1 else None)
                return issuer.signer, issuer.ski
        return None

    def answer_cached(self, request_der: bytes) -> OCSPAnswer | None:
        """The fast path (no I/O, no signature): a fresh cached answer, a refusal, or None."""
        found = self._lookup(request_der)
        return found if isinstance(found, OCSPAnswer) else None

    def answer(self, request_der: bytes) -> OCSPAnswer:
        """Any request: cached, or looked up in the store and signed now (then cached).

        A serial never issued here is answered `unauthorized`, unsigned and not cached.
        """
        found = self._lookup(request_der)
        if isinstance(found, OCSPAnswer):
            return found
        query = found
        found_signer = self._signer_for(query)
        if found_signer is None:
            return OCSPAnswer(UNAUTHORIZED_RESPONSE, "unauthorized")
        responder = found_signer[0]
        ski = found_signer[1]
        state = self._state_of(query) if ski is None else self._state_of(query, ski)
        if state.status is CertStatus.UNKNOWN:
            return OCSPAnswer(UNAUTHORIZED_RESPONSE, "unused")
        now = self._clock.now()
        try:
            der = sign_response(responder, query, state, now=now, validity=self._validity)
        except KeyStoreUnavailable as exc:  # the responder key's token is gone or locked: RFC 6960 tryLater
            log.warning("OCSP answer not signed: %s", exc.detail)
            return OCSPAnswer(TRY_LATER_RESPONSE, "tryLater")
        signed = _Signed(der, state.status, now, responder.certificate)
        key = (query.serial, query.hash_name)
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._bytes -= len(old.der) + ENTRY_OVERHEAD
            self._cache[key] = signed
            self._bytes += len(der) + ENTRY_OVERHEAD
            while self._cache and (
                self._bytes > self._cfg.ocsp_cache_bytes or len(self._cache) > self._cfg.ocsp_cache_size
            ):
                _, dropped = self._cache.popitem(last=False)
                self._bytes -= len(dropped.der) + ENTRY_OVERHEAD
            self._gauges()
        return OCSPAnswer(der, state.status.value, self._max_age(signed, now))

    def submit(self, request_der: bytes) -> Future[OCSPAnswer] | None:
        """`answer` on the OCSP threads; None when they are busy and the queue is full (tryLater)."""
        if not self._slots.acquire(blocking=False):
            return None
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._cfg.ocsp_sign_threads, thread_name_prefix="ocsp")
            self._pending += 1
            metrics.OCSP_PENDING.set(self._pending)
        try:
            future = self._executor.submit(self.answer, request_der)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: Future[OCSPAnswer] | None) -> None:
        with self._lock:
            self._pending -= 1
            metrics.OCSP_PENDING.set(self._pending)
        self._slots.release()

    def close(self) -> None:
        """Stop the OCSP threads (at the end of `serve`); running work finishes."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _lookup(self, request_der: bytes) -> OCSPAnswer | OCSPQuery:
        """An answer without signing (cached, malformed, not our CA), or the parsed query to sign for."""
        try:
            query = parse_request(request_der)
        except Malformed:
            return OCSPAnswer(MALFORMED_RESPONSE, "malformed")
        found = self._signer_for(query)
        if found is None:
            return OCSPAnswer(UNAUTHORIZED_RESPONSE, "unauthorized")  # RFC 5019 §2.2.3: not our CA
        responder = found[0]
        now = self._clock.now()
        with self._lock:
            hit = self._cache.get((query.serial, query.hash_name))
            if hit is not None and now - hit.signed_at < self._refresh and hit.responder is responder.certificate:
                self._cache.move_to_end((query.serial, query.hash_name))
                return OCSPAnswer(hit.der, hit.status.value, self._max_age(hit, now))
        return query

    def _max_age(self, signed: _Signed, now: dt.datetime) -> int:
        # Caches in front of us may keep an answer only until we would re-sign it.
        return max(0, int((signed.signed_at + self._refresh - now).total_seconds()))

    def _state_of(self, query: OCSPQuery, issuer_ski: bytes | None = None) -> CertState:
        """With `issuer_ski` (the CA has more than one key) the certificate must name that key as its
        authority key, else it is not that issuer's: unknown."""
        revoked_at: dt.datetime | None
        reason: str | None
        with self._db.read_only() as session:
            where = Certificate.serial == serial_hex(query.serial)
            if issuer_ski is None:
                row = session.execute(
                    select(Certificate.revoked_at, Certificate.revocation_reason).where(where)
                ).one_or_none()
                if row is None:
                    return CertState(CertStatus.UNKNOWN)
                revoked_at, reason = row
            else:
                full = session.execute(
                    select(Certificate.revoked_at, Certificate.revocation_reason, Certificate.der).where(where)
                ).one_or_none()
                if full is None or _aki(full[2]) != issuer_ski:
                    return CertState(CertStatus.UNKNOWN)
                revoked_at, reason = full[0], full[1]
        if revoked_at is None:
            return CertState(CertStatus.GOOD)
        return CertState(CertStatus.REVOKED, revoked_at, SUBSCRIBER_REASONS.get(reason) if reason else None)

    def forget(self, serials: Iterable[str]) -> None:
        """Drop the cached answers of these certificates (just revoked)."""
        with self._lock:
            for serial in serials:
                number = int(serial, 16)
                for hash_name in HASH_NAMES:
                    dropped = self._cache.pop((number, hash_name), None)
                    if dropped is not None:
                        self._bytes -= len(dropped.der) + ENTRY_OVERHEAD
            self._gauges()

    def sync(self) -> int:
        """Called every poll: forget the answers of certificates revoked (on any node) lately.

        The window overlaps the previous one, so an answer signed from a read that raced a
        revocation is dropped again at the next poll.
        """
        start = self._synced_at - SYNC_OVERLAP
        self._synced_at = self._clock.now()
        with self._db.read_only() as session:
            serials = list(session.execute(select(Certificate.serial).where(Certificate.revoked_at >= start)).scalars())
        self.forget(serials)
        return len(serials)

    def cached(self) -> int:
        return len(self._cache)

    def cached_bytes(self) -> int:
        """The cache's size as it is bounded: each answer's DER plus ENTRY_OVERHEAD."""
        return self._bytes

    def _gauges(self) -> None:
        metrics.OCSP_CACHE_BYTES.set(self._bytes)
        metrics.OCSP_CACHE_ENTRIES.set(len(self._cache))
